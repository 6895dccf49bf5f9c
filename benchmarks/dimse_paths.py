"""The DIMSE paths beside DCMTK doing the same work in the same run (issue on the engine).

- ``move``: DCMTK ``movescu`` moving a study into DCMTK ``storescp``, beside a pacsfetch
  C-MOVE job on one worker through ``pacsfetch receiver`` (rows of :mod:`benchmarks.tools`).
- ``forward``: DCMTK ``storescu`` sending a study's files to ``storescp``, beside
  pacsfetch's forward store (``plugin = "dicom"``) sending the same files to the same
  ``storescp`` (:mod:`benchmarks.forward`, a process of its own like ``storescu``).
- ``wan``: the :class:`~pacsfetch.sandbox.latency.LatencyProxy` between the retriever and
  Orthanc at 2 and 10 ms round trip: DCMTK ``getscu`` (one association) beside ``pacsfetch
  retrieve`` with ``associations_per_job = 4``.

Each row counts the files that actually arrived, as everywhere in the harness.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from benchmarks import tools
from benchmarks.tools import CALLING_AE, Measurement, _fresh, _measure_process, _result
from pacsfetch.sandbox.latency import LatencyProxy
from pacsfetch.sandbox.peers import Orthanc, StoreScp
from pacsfetch.sandbox.samples import SampleStudy

DCMTK_MOVESCU = "/usr/bin/movescu"
DCMTK_STORESCU = "/usr/bin/storescu"
STORESCP_AE = "PFSTORESCP"
"""The AE title of the benchmark's ``storescp``: also an Orthanc modality (C-MOVE target)."""
WAN_RTTS_MS = (2, 10)
WAN_ASSOCIATIONS = 4
_NODELAY = {**os.environ, "TCP_NODELAY": "1"}
_REPO = Path(__file__).resolve().parents[1]


def dcmtk_movescu(peer: Orthanc, study_name: str, study: SampleStudy, storescp_port: int,
                  work: Path) -> Measurement:
    """``movescu`` asks *peer* to move the study to ``storescp`` (its modality
    :data:`STORESCP_AE`); the time is the C-MOVE's, the count what ``storescp`` wrote."""
    label = f"dcmtk-movescu-{study_name}"
    with StoreScp(_fresh(work / label), aet=STORESCP_AE, port=storescp_port) as scp:
        argv = [DCMTK_MOVESCU, "-S", "-aet", CALLING_AE, "-aec", peer.aet, "-aem", STORESCP_AE,
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
                "127.0.0.1", str(peer.dicom_port)]
        seconds, rss, tree_rss, _, _ = _measure_process(argv, _fresh(work / f"{label}-cwd"),
                                                        env=_NODELAY)
        files = sorted(scp.received_dir.rglob("*.dcm"))
    return _result("dcmtk-movescu", study_name, study, False, seconds, files,
                   transport="c-move", peak_rss_mb=rss, peak_tree_rss_mb=tree_rss)


def dcmtk_storescu(study_name: str, study: SampleStudy, work: Path) -> Measurement:
    """``storescu`` sends the study's files (one association) to a fresh ``storescp``."""
    label = f"dcmtk-storescu-{study_name}"
    with StoreScp(_fresh(work / label), aet=STORESCP_AE) as scp:
        argv = [DCMTK_STORESCU, "-aet", CALLING_AE, "-aec", STORESCP_AE, "+sd", "+r",
                "127.0.0.1", str(scp.port), str(study.instances[0].path.parent)]
        seconds, rss, tree_rss, _, _ = _measure_process(argv, _fresh(work / f"{label}-cwd"),
                                                        env=_NODELAY)
        files = sorted(scp.received_dir.rglob("*.dcm"))
    return _result("dcmtk-storescu", study_name, study, False, seconds, files,
                   peak_rss_mb=rss, peak_tree_rss_mb=tree_rss)


def pacsfetch_forward(study_name: str, study: SampleStudy, work: Path) -> Measurement:
    """pacsfetch's forward store sends the same files to a fresh ``storescp``."""
    label = f"pacsfetch-forward-{study_name}"
    with StoreScp(_fresh(work / label), aet=STORESCP_AE) as scp:
        argv = [sys.executable, "-m", "benchmarks.forward", "--ae-title", STORESCP_AE,
                "--port", str(scp.port), str(study.instances[0].path.parent)]
        env = {**os.environ, "PYTHONPATH": str(_REPO)}  # the harness runs from the checkout
        seconds, rss, tree_rss, _, _ = _measure_process(argv, _fresh(work / f"{label}-cwd"),
                                                        env=env)
        files = sorted(scp.received_dir.rglob("*.dcm"))
    return _result("pacsfetch-forward", study_name, study, False, seconds, files,
                   transport="dicom", peak_rss_mb=rss, peak_tree_rss_mb=tree_rss)


def wan_rows(peer: Orthanc, study_name: str, study: SampleStudy, work: Path,
             redis_url: str, receiver_port: int) -> list[Measurement]:
    """DCMTK ``getscu`` and pacsfetch (4 associations) through the latency proxy."""
    rows = []
    for rtt in WAN_RTTS_MS:
        with LatencyProxy("127.0.0.1", peer.dicom_port, rtt) as proxy:
            far = _Behind(peer, proxy.port)
            row = tools.dcmtk_getscu(far, f"{study_name}", study, False, work / f"wan{rtt}")
            row.peer = f"wan{rtt}ms"  # the round trip the proxy adds
            rows.append(row)
            row = tools.pacsfetch_inline(
                far, study_name, study, False, work / f"wan{rtt}", transport="c-get",
                redis_url=redis_url, receiver_port=receiver_port,
                source_extra={"associations_per_job": WAN_ASSOCIATIONS,
                              "max_associations": WAN_ASSOCIATIONS})
            row.peer = f"wan{rtt}ms"
            rows.append(row)
    return rows


class _Behind:
    """*peer* as seen through a proxy: the same AE title, another port."""

    def __init__(self, peer: Orthanc, port: int) -> None:
        self.aet = peer.aet
        self.dicom_port = port
        self.dicomweb_url = peer.dicomweb_url
