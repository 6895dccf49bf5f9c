"""The queued path end to end: API -> Redis -> `pacsfetch worker` -> C-GET -> filesystem.

Each test starts real worker processes against the session's Redis and Orthanc.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import WorkerProcess, make_config, wait_for

from pacsfetch.api.app import create_app
from pacsfetch.config import parse_config
from pacsfetch.sandbox.latency import LatencyProxy
from pacsfetch.sandbox.peers import Orthanc
from pacsfetch.sandbox.samples import SampleStudy


@pytest.fixture
def setup(redis_url: str, tmp_path: Path, orthanc: Orthanc) -> dict[str, Any]:
    return make_config(redis_url=redis_url, store_root=tmp_path / "store", orthanc=orthanc)


@pytest.fixture
def slow_setup(setup: dict[str, Any], orthanc: Orthanc) -> Iterator[dict[str, Any]]:
    """The same PACS 20 ms of round trip away, so a 400-instance C-GET takes seconds.

    Orthanc waits for each C-STORE response before sending the next instance, so every
    instance costs a round trip: long enough for a test to act while the job runs, on a
    machine of any speed (on loopback the whole study arrives in well under a second).
    """
    with LatencyProxy("127.0.0.1", orthanc.dicom_port, rtt_ms=20) as proxy:
        setup["sources"]["orthanc"]["port"] = proxy.port
        yield setup


def _client(config: dict[str, Any]) -> TestClient:
    return TestClient(create_app(parse_config(config)))


def _final(client: TestClient, job_id: str, timeout: float = 120) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] in {"succeeded", "partial", "failed", "cancelled"} else None

    return wait_for(done, timeout, 0.2, f"job {job_id} to finish")


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and ".pacsfetch" not in p.parts]


def test_study_through_api_and_worker(setup: dict[str, Any], start_worker: Callable[..., WorkerProcess],
                                      mixed_study: SampleStudy, tmp_path: Path) -> None:
    start_worker(setup)
    client = _client(setup)
    job_id = client.post("/jobs", json={"source": "orthanc", "study_uid": mixed_study.study_uid,
                                        "store": "local"}).json()["id"]
    job = _final(client, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["transport"] == "c-get" and job["attempts"] == 1
    assert job["progress"]["completed"] == len(mixed_study.instances)
    assert job["progress"]["remaining"] == 0
    assert job["started_at"] and job["finished_at"]
    files = _files(tmp_path / "store")
    assert len(files) == len(mixed_study.instances)
    page = client.get(f"/jobs/{job_id}/instances", params={"limit": 1000}).json()
    assert page["total"] == len(mixed_study.instances)
    listed = {item["locations"]["local"] for item in page["items"]}
    assert listed == {p.relative_to(tmp_path / "store").as_posix() for p in files}


def test_echo_through_a_worker(setup: dict[str, Any], start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker(setup)
    reply = _client(setup).post("/sources/orthanc/echo")
    assert reply.status_code == 200
    assert reply.json()["ok"] is True


def test_echo_without_worker_times_out(setup: dict[str, Any]) -> None:
    setup["api"] = {"echo_timeout": 1.0}
    reply = _client(setup).post("/sources/orthanc/echo")
    assert reply.status_code == 504 and "no worker answered" in reply.json()["detail"]


def test_cancel_a_running_job_stops_the_c_get(slow_setup: dict[str, Any],
                                              start_worker: Callable[..., WorkerProcess],
                                              big_study: SampleStudy, tmp_path: Path) -> None:
    start_worker(slow_setup)
    client = _client(slow_setup)
    job_id = client.post("/jobs", json={"source": "orthanc", "study_uid": big_study.study_uid,
                                        "store": "local"}).json()["id"]
    wait_for(lambda: client.get(f"/jobs/{job_id}").json()["progress"]["completed"] >= 10,
             60, 0.02, "the job to store its first instances")
    running = client.get(f"/jobs/{job_id}").json()
    assert running["status"] == "running" and running["transport"] == "c-get"
    assert client.delete(f"/jobs/{job_id}").status_code == 200
    job = _final(client, job_id)
    assert job["status"] == "cancelled"
    stored = len(_files(tmp_path / "store"))
    assert 10 <= stored < len(big_study.instances)
    assert not list((tmp_path / "store").rglob("*.part"))


def test_killed_worker_process_job_is_redelivered_and_completes(
    slow_setup: dict[str, Any], start_worker: Callable[..., WorkerProcess],
    big_study: SampleStudy, tmp_path: Path,
) -> None:
    worker = start_worker(slow_setup)
    client = _client(slow_setup)
    job_id = client.post("/jobs", json={"source": "orthanc", "study_uid": big_study.study_uid,
                                        "store": "local"}).json()["id"]
    wait_for(lambda: client.get(f"/jobs/{job_id}").json()["progress"]["completed"] >= 40,
             60, 0.02, "the job to be well under way")
    (child,) = worker.children()
    os.kill(child, signal.SIGKILL)  # as the kernel's OOM killer would
    job = _final(client, job_id, timeout=180)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    assert job["progress"]["skipped"] >= 40
    assert job["progress"]["completed"] == len(big_study.instances)
    files = _files(tmp_path / "store")
    assert sorted(p.stem for p in files) == sorted(i.sop_instance_uid for i in big_study.instances)
    assert all(p.stat().st_size > 0 for p in files)
    assert not list((tmp_path / "store").rglob("*.part"))


def test_pacs_down_fails_clearly_after_retries(redis_url: str, tmp_path: Path,
                                              start_worker: Callable[..., WorkerProcess]) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = make_config(redis_url=redis_url, store_root=tmp_path / "store", extra_sources={
        "down": {"ae_title": "DOWN", "host": "127.0.0.1", "port": port, "timeout": 2}})
    start_worker(config)
    client = _client(config)
    job_id = client.post("/jobs", json={"source": "down", "study_uid": "1.2.3", "store": "local"}).json()["id"]
    job = _final(client, job_id, timeout=60)
    assert job["status"] == "failed"
    assert job["error_kind"] == "connection"
    assert job["attempts"] == 3  # the first try and worker.max_retries = 2 retries
    assert f"cannot connect to 127.0.0.1:{port}" in job["error"]
    assert "gave up after 3 attempts" in job["error"]


def test_urgent_job_overtakes_a_queued_backlog(setup: dict[str, Any], start_worker: Callable[..., WorkerProcess],
                                               mixed_study: SampleStudy) -> None:
    # Jobs wait in Redis while no worker runs; one worker process then takes them one by one.
    client = _client(setup)
    series = mixed_study.series_uids

    def submit(series_uid: str, priority: int) -> str:
        return client.post("/jobs", json={"source": "orthanc", "level": "SERIES", "priority": priority,
                                          "study_uid": mixed_study.study_uid, "series_uid": series_uid,
                                          "store": "local"}).json()["id"]

    backlog = [submit(uid, 0) for uid in series[:4]]
    urgent = submit(series[4], 9)
    start_worker(setup)
    jobs = {job_id: _final(client, job_id) for job_id in [*backlog, urgent]}
    assert all(job["status"] == "succeeded" for job in jobs.values())
    order = sorted(jobs, key=lambda job_id: jobs[job_id]["started_at"])
    assert order[0] == urgent, [jobs[j]["priority"] for j in order]
