"""Graceful stop with real processes: a worker sent SIGTERM (what Kubernetes sends on
scale-down or a rolling update) mid-job hands the job back, another worker finishes it.

The PACS is a real Orthanc holding a 1,000-instance study; a latency proxy (20 ms round
trip) on the path that carries the instances keeps the job running long after the drain
time (1 s) is up, so the hand-back is what the test sees, not a job that happened to finish.
The receiver test drives ``pacsfetch receiver`` the same way.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from helpers import CALLING_AE, ReceiverProcess, WorkerProcess, make_config, wait_for, write_toml
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pacsfetch.api.app import create_app
from pacsfetch.config import parse_config
from pacsfetch.sandbox.latency import LatencyProxy
from pacsfetch.sandbox.peers import Orthanc, free_port
from pacsfetch.sandbox.samples import SampleStudy, generate_uniform_study

pytestmark = pytest.mark.slow

RECEIVER_AE = "PACSFETCH"
N = 1000


@pytest.fixture(scope="module")
def thousand(tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    return generate_uniform_study(tmp_path_factory.mktemp("thousand"), n_instances=N, rows=32,
                                  columns=32, patient_id="PF-DRAIN", seed=1313)


@pytest.fixture(scope="module")
def receiver_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def to_receiver(receiver_port: int) -> Iterator[LatencyProxy]:
    """The PACS's path to the receiver, slowed down: a C-MOVE that lasts."""
    with LatencyProxy("127.0.0.1", receiver_port, rtt_ms=20) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, thousand: SampleStudy,
         to_receiver: LatencyProxy) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("drain-orthanc"), aet="DRAINPACS", dicomweb=False,
                 modalities={RECEIVER_AE: (RECEIVER_AE, "127.0.0.1", to_receiver.port)}) as server:
        server.upload_study(thousand)
        yield server


@pytest.fixture(scope="module")
def to_pacs(pacs: Orthanc) -> Iterator[LatencyProxy]:
    """The workers' path to the PACS, slowed down: a C-GET that lasts."""
    with LatencyProxy("127.0.0.1", pacs.dicom_port, rtt_ms=20) as proxy:
        yield proxy


@pytest.fixture
def settings(redis_url: str, tmp_path: Path, pacs: Orthanc, to_pacs: LatencyProxy,
             receiver_port: int) -> dict[str, Any]:
    source = {"ae_title": pacs.aet, "host": "127.0.0.1", "calling_ae_title": CALLING_AE,
              "timeout": 20}
    data = make_config(
        redis_url=redis_url, store_root=tmp_path / "store",
        extra_sources={
            "slow-get": {**source, "port": to_pacs.port, "transports": ["c-get"]},
            "slow-move": {**source, "port": pacs.dicom_port, "transports": ["c-move"],
                          "move_destination": RECEIVER_AE},
        },
        worker={"drain_seconds": 1, "lease_seconds": 5, "max_retries": 0},
    )
    data["receiver"] = {"ae_title": RECEIVER_AE, "port": receiver_port, "bind": "127.0.0.1"}
    return data


def _files(root: Path) -> dict[Path, tuple[int, int]]:
    """Every visible file of the store (not its staging area), with inode and mtime."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and ".pacsfetch" not in p.parts}


def _job(client: TestClient, job_id: str) -> dict[str, Any]:
    return client.get(f"/jobs/{job_id}").json()


def _sigterm_mid_job(settings: dict[str, Any], start_worker: Callable[..., WorkerProcess],
                     source: str, study: SampleStudy, store: Path) -> None:
    """SIGTERM worker A mid-job; A hands the job back; worker B completes it."""
    client = TestClient(create_app(parse_config(settings)))
    first = start_worker(settings)
    job_id = client.post("/jobs", json={"source": source, "study_uid": study.study_uid,
                                        "store": "local"}).json()["id"]
    wait_for(lambda: _job(client, job_id)["progress"]["completed"] >= 50, 120, 0.05,
             "the job to store its first 50 instances")
    first.proc.send_signal(signal.SIGTERM)  # the main process only, as Kubernetes does
    assert first.proc.wait(60) == 0, first.log_path.read_text()[-3000:]

    handed = _job(client, job_id)
    assert handed["status"] == "queued", handed
    assert "handed back by a stopping worker" in handed["error"]
    before = _files(store)
    assert 50 <= len(before) < N  # stopped mid-job, what it stored is there
    assert handed["progress"]["completed"] == len(before)

    start_worker(settings)
    job = wait_for(lambda: (j := _job(client, job_id))["status"] in {
        "succeeded", "failed", "partial"} and j, 300, 0.2, "the second worker to finish")
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    assert job["progress"]["completed"] == N

    after = _files(store)
    # Each instance exactly once, complete, under its own name; nothing half-written.
    assert sorted(p.stem for p in after) == sorted(i.sop_instance_uid for i in study.instances)
    for path in list(after)[::97]:
        assert pydicom.dcmread(path).SOPInstanceUID == path.stem
    # The second worker resumed: what the first stored was neither fetched nor written again.
    assert {p: after[p] for p in before} == before
    assert [p for p in (store / ".pacsfetch" / "spool").rglob("*") if p.is_file()] == []


def test_sigterm_mid_c_get_hands_the_job_to_another_worker(
    settings: dict[str, Any], start_worker: Callable[..., WorkerProcess],
    thousand: SampleStudy, tmp_path: Path,
) -> None:
    _sigterm_mid_job(settings, start_worker, "slow-get", thousand, tmp_path / "store")


@pytest.fixture
def receiver(settings: dict[str, Any], tmp_path: Path) -> Iterator[ReceiverProcess]:
    process = ReceiverProcess(write_toml(settings, tmp_path / "receiver.toml"),
                              tmp_path / "receiver.log", settings["receiver"]["port"])
    process.wait_ready()
    yield process
    process.stop()


def test_sigterm_mid_c_move_hands_the_job_to_another_worker(
    settings: dict[str, Any], start_worker: Callable[..., WorkerProcess],
    thousand: SampleStudy, tmp_path: Path, receiver: ReceiverProcess,
) -> None:
    _sigterm_mid_job(settings, start_worker, "slow-move", thousand, tmp_path / "store")


def test_worker_and_receiver_probes(settings: dict[str, Any],
                                   start_worker: Callable[..., WorkerProcess],
                                   receiver: ReceiverProcess) -> None:
    """/healthz and /readyz answer on the metrics ports; a draining receiver is not ready
    and refuses new associations, and exits once its associations are done."""
    worker = start_worker(settings)
    metrics = settings["metrics"]
    for port in (metrics["worker_port"], metrics["receiver_port"]):
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["status"] == "ok"
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 200, ready.text
        served = httpx.get(f"http://127.0.0.1:{port}/metrics")  # metrics stay on every path
        assert served.headers["content-type"].startswith("text/plain")

    # An open association keeps the draining receiver alive; the port refuses new ones.
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", receiver.port, ae_title=RECEIVER_AE)
    assert held.is_established
    receiver.proc.send_signal(signal.SIGTERM)
    readyz = f"http://127.0.0.1:{metrics['receiver_port']}/readyz"
    wait_for(lambda: httpx.get(readyz).status_code == 503, 10, 0.05, "the receiver to drain")
    assert "draining" in httpx.get(readyz).json()["failing"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", receiver.port), timeout=2)
    assert held.send_c_echo().Status == 0x0000  # the open association still works
    assert receiver.proc.poll() is None
    held.release()
    assert receiver.proc.wait(30) == 0

    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(30) == 0
