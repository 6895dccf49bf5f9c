"""Instances per second of C-GET and DICOMweb on the same study, inline, against a local Orthanc.

Usage: python scripts/bench_transports.py [N_INSTANCES]   (default 500, 64x64 16-bit CT)
Runs in a temporary directory with its own Redis-free inline runner; prints one line per
transport. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from pacsfetch.config import parse_config
from pacsfetch.models import JobRequest, JobStatus
from pacsfetch.plugins.registry import get_registry
from pacsfetch.sandbox.peers import Orthanc
from pacsfetch.sandbox.samples import generate_uniform_study
from pacsfetch.workers.runner import JobRunner
from pacsfetch.workers.state import LocalJobState


def main(n_instances: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        study = generate_uniform_study(work / "study", n_instances=n_instances, rows=64,
                                       columns=64)
        with Orthanc(work / "orthanc") as orthanc:
            orthanc.upload_study(study)
            for transport in ("c-get", "dicomweb"):
                config = parse_config({
                    "sources": {"orthanc": {
                        "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
                        "transports": ["c-get", "dicomweb"],
                        "dicomweb_url": orthanc.dicomweb_url}},
                    "stores": {"local": {"plugin": "filesystem", "root": str(work / transport),
                                         "fsync": True}},
                })
                registry = get_registry()
                runner = JobRunner(config, registry, registry.check_config(config))
                request = JobRequest(source="orthanc", study_uid=study.study_uid, store="local",
                                     transport=transport)
                started = time.perf_counter()
                outcome = runner.run("b" * 32, request, LocalJobState())
                elapsed = time.perf_counter() - started
                assert outcome.status is JobStatus.SUCCEEDED, outcome.error
                print(f"{transport:9s} {outcome.progress.completed} instances in {elapsed:.1f} s: "
                      f"{outcome.progress.completed / elapsed:.0f} instances/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
