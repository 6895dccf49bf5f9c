"""The DIMSE engine against real peers that behave oddly: pynetdicom SCPs configured to
fragment, collide on release, abort in the middle of a data set, and DCMTK's dcmqrscp.

Every case ends in success or a clear error, leaves no file outside the spool (nothing
half-written in the store), and the next job against the same peer still works.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import CALLING_AE, make_config, run_job
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import A_RELEASE_RQ, P_DATA_TF
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from pacsfetch.config import Config, parse_config
from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.models import JobRequest, JobStatus
from pacsfetch.plugins.dimse import messages as m
from pacsfetch.plugins.dimse import pdu
from pacsfetch.sandbox.peers import DcmQrScp, free_port
from pacsfetch.sandbox.samples import SampleStudy, generate_uniform_study

SMALL_PDU = 4096


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    # 64 x 64 x 16 bits: 8 KB of pixels, two 4 KB PDUs and more per instance.
    return generate_uniform_study(tmp_path_factory.mktemp("odd"), n_instances=8, rows=64,
                                  columns=64, patient_id="PF-ODD", seed=3)


class GetPeer:
    """A pynetdicom C-FIND/C-GET SCP serving *study*, sending a C-GET-RSP pending after
    each C-STORE (pynetdicom's way: the pendings interleave with the sub-operations).

    *max_pdu*: the maximum PDU it announces (we must fragment to it). *collide*: it answers
    our A-RELEASE-RQ with an A-RELEASE-RQ of its own first. *abort_at*: it sends A-ABORT
    in the middle of that (0-based) instance's data set. ``received_sizes`` are the PDU
    lengths it received from us.
    """

    def __init__(self, study: SampleStudy, *, max_pdu: int = 0, collide: bool = False,
                 abort_at: int | None = None) -> None:
        self.datasets = [dcmread(i.path) for i in study.instances]
        self.port = free_port()
        self.collide, self.abort_at = collide, abort_at
        self.received_sizes: list[int] = []
        self.commands_sent: list[int] = []
        self.collisions = 0
        self._big_data_sets = 0
        self._in_data_set = False
        ae = AE(ae_title="ODDPEER")
        ae.maximum_pdu_size = max_pdu
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                                 scu_role=True, scp_role=True)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_FIND, self._find), (evt.EVT_C_GET, self._get),
            (evt.EVT_PDU_RECV, self._received), (evt.EVT_PDU_SENT, self._sent)])

    def close(self) -> None:
        self.server.shutdown()

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        seen: set[str] = set()
        for ds in self.datasets:
            if query.QueryRetrieveLevel == "SERIES" and ds.SeriesInstanceUID not in seen:
                seen.add(ds.SeriesInstanceUID)
                yield 0xFF00, _answer(ds, "SERIES", "StudyInstanceUID", "SeriesInstanceUID",
                                      "Modality")
            elif query.QueryRetrieveLevel == "IMAGE" and (
                    query.SeriesInstanceUID == ds.SeriesInstanceUID):
                yield 0xFF00, _answer(ds, "IMAGE", "StudyInstanceUID", "SeriesInstanceUID",
                                      "SOPInstanceUID", "SOPClassUID")
        yield 0x0000, None

    def _get(self, event: Any) -> Iterator[int | tuple[int, Dataset | None]]:
        query = event.identifier
        wanted = query.get("SOPInstanceUID")
        wanted = None if wanted in (None, "") else (
            {wanted} if isinstance(wanted, str) else set(wanted))
        matches = [ds for ds in self.datasets if query.StudyInstanceUID == ds.StudyInstanceUID
                   and query.get("SeriesInstanceUID", ds.SeriesInstanceUID) in (
                       "", ds.SeriesInstanceUID)
                   and (wanted is None or ds.SOPInstanceUID in wanted)]
        yield len(matches)
        for ds in matches:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, ds

    def _received(self, event: Any) -> None:
        self.received_sizes.append(len(event.pdu.encode()) - 6)
        if self.collide and isinstance(event.pdu, A_RELEASE_RQ):
            # Before pynetdicom answers with A-RELEASE-RP: a release of our own crosses theirs.
            self.collisions += 1
            event.assoc.dul.socket.send(pdu.RELEASE_RQ_PDU)

    def _sent(self, event: Any) -> None:
        if not isinstance(event.pdu, P_DATA_TF):
            return
        for item in event.pdu.presentation_data_value_items:
            header = item.presentation_data_value[0]
            if header == 3:  # a whole command in one PDV: note which
                self.commands_sent.append(
                    m.decode_command(item.presentation_data_value[1:])[m.COMMAND_FIELD])
            if self.abort_at is None:
                continue
            if header == 0 and not self._in_data_set:
                # The first fragment of a data set that spans PDUs: an instance (C-FIND
                # identifiers fit in one). The earlier ones went whole.
                self._in_data_set = True
                if self._big_data_sets == self.abort_at:
                    raw = event.assoc.dul.socket.socket
                    raw.sendall(pdu.abort_pdu())
                    raw.shutdown(socket.SHUT_RDWR)
                    self.abort_at = None
                    return
                self._big_data_sets += 1
            elif header & 2:
                self._in_data_set = False


def _answer(ds: Dataset, level: str, *keywords: str) -> Dataset:
    answer = Dataset()
    answer.QueryRetrieveLevel = level
    for keyword in keywords:
        setattr(answer, keyword, getattr(ds, keyword))
    return answer


@pytest.fixture
def peer_config(redis_url: str, tmp_path: Path) -> Callable[..., Config]:
    def build(port: int, ae_title: str = "ODDPEER", **source: Any) -> Config:
        return parse_config(make_config(
            redis_url=redis_url, store_root=tmp_path / "store", extra_sources={"odd": {
                "ae_title": ae_title, "host": "127.0.0.1", "port": port,
                "calling_ae_title": CALLING_AE, "transports": ["c-get"], "timeout": 10,
                **source}}))

    return build


def check_store(root: Path, study: SampleStudy, expect: int | None = None) -> set[str]:
    """Every file in the store is a whole instance, byte-equal in its data set to the
    original; nothing is left in the spool. The SOP Instance UIDs stored."""
    files = [p for p in root.rglob("*") if p.is_file()]
    spool_or_meta = [p for p in files if ".pacsfetch" in p.parts]
    assert not [p for p in spool_or_meta if p.suffix == ".part" or "spool" in p.parts]
    originals = {i.sop_instance_uid: i.path for i in study.instances}
    stored = set()
    for path in (p for p in files if ".pacsfetch" not in p.parts):
        assert path.suffix == ".dcm", path
        ds = dcmread(path)
        original = dcmread(originals[ds.SOPInstanceUID])
        assert ds.PixelData == original.PixelData
        stored.add(ds.SOPInstanceUID)
    if expect is not None:
        assert len(stored) == expect
    return stored


def request(study: SampleStudy) -> JobRequest:
    return JobRequest(source="odd", study_uid=study.study_uid, store="local")


def test_a_4096_byte_maximum_pdu_fragments_both_ways(
        peer_config: Callable[..., Config], study: SampleStudy, tmp_path: Path) -> None:
    peer = GetPeer(study, max_pdu=SMALL_PDU)
    try:
        config = peer_config(peer.port, max_pdu=SMALL_PDU, associations_per_job=2)
        outcome = run_job(config, request(study))
        assert outcome.status is JobStatus.SUCCEEDED, outcome.error
        check_store(tmp_path / "store", study, expect=len(study.instances))
        assert peer.received_sizes and max(peer.received_sizes) <= SMALL_PDU
        # Its C-GET-RSP pendings came between the C-STOREs, as pynetdicom sends them.
        sequence = [c for c in peer.commands_sent if c in (m.C_STORE_RQ, m.C_GET_RSP)]
        assert sequence.count(m.C_STORE_RQ) == len(study.instances)
        pairs = list(zip(sequence, sequence[1:]))
        assert (m.C_GET_RSP, m.C_STORE_RQ) in pairs and (m.C_STORE_RQ, m.C_GET_RSP) in pairs
    finally:
        peer.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_release_collision_ends_cleanly_and_the_next_job_works(
        peer_config: Callable[..., Config], study: SampleStudy, tmp_path: Path) -> None:
    peer = GetPeer(study, collide=True)
    try:
        config = peer_config(peer.port, associations_per_job=1)
        outcome = run_job(config, request(study))
        assert outcome.status is JobStatus.SUCCEEDED, outcome.error
        # The C-FIND's release and the C-GET's. (pynetdicom's own state machine, made to
        # collide behind its back, then raises in its reactor thread: hence the filter.)
        assert peer.collisions >= 2
        check_store(tmp_path / "store", study, expect=len(study.instances))
        again = run_job(config, request(study))  # everything is there: a duplicate run
        assert again.status is JobStatus.SUCCEEDED, again.error
    finally:
        peer.close()


def test_an_abort_in_the_middle_of_a_data_set_leaves_nothing_half_written(
        peer_config: Callable[..., Config], study: SampleStudy, tmp_path: Path) -> None:
    peer = GetPeer(study, max_pdu=SMALL_PDU, abort_at=3)
    try:
        config = peer_config(peer.port, max_pdu=SMALL_PDU, associations_per_job=1)
        with pytest.raises(RetrieveError) as failed:  # retryable: the worker would retry
            run_job(config, request(study))
        assert failed.value.kind is ErrorKind.ASSOCIATION_ABORTED
        assert failed.value.message == (
            f"ODDPEER@127.0.0.1:{peer.port} aborted the association during C-GET (after 3 "
            "instance(s) this attempt; a retry resumes the job) (A-ABORT by the peer)")
        assert check_store(tmp_path / "store", study) == {
            i.sop_instance_uid for i in study.instances[:3]}
        # The peer is fine again; the next job fetches all (the first three again: a new job).
        outcome = run_job(config, request(study))
        assert outcome.status is JobStatus.SUCCEEDED, outcome.error
        check_store(tmp_path / "store", study, expect=len(study.instances))
    finally:
        peer.close()


def test_dcmqrscp_as_a_striped_c_get_peer(
        peer_config: Callable[..., Config], study: SampleStudy, tmp_path: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    with DcmQrScp(tmp_path_factory.mktemp("qr"), files=[i.path for i in study.instances]
                  ) as qr:
        config = peer_config(qr.port, ae_title=qr.aet, associations_per_job=3)
        outcome = run_job(config, request(study))
        assert outcome.status is JobStatus.SUCCEEDED, outcome.error
        check_store(tmp_path / "store", study, expect=len(study.instances))
        again = run_job(config, request(study))
        assert again.status is JobStatus.SUCCEEDED, again.error
