"""Faults end with the true reason, and are retried where a retry can help (issue 14, item 4).

Every fault here is real: a Redis restarted under a running job, a store on a file system
that fills up, a forward destination that is down and comes back. Workers are real
``pacsfetch worker`` processes, the PACS a real Orthanc.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import WorkerProcess, make_config, run_job, wait_for
from pydicom import dcmread

from pacsfetch.api.app import create_app
from pacsfetch.config import Config, parse_config
from pacsfetch.models import JobRequest, JobStatus
from pacsfetch.sandbox.peers import Orthanc, RedisServer, StoreScp, free_port
from pacsfetch.sandbox.samples import SampleStudy

FINAL = {"succeeded", "partial", "failed", "cancelled"}


def _client(config: dict[str, Any]) -> TestClient:
    return TestClient(create_app(parse_config(config)))


def _job(client: TestClient, job_id: str) -> dict[str, Any]:
    return client.get(f"/jobs/{job_id}").json()


def _final(client: TestClient, job_id: str, timeout: float = 180) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = _job(client, job_id)
        return job if job.get("status") in FINAL else None

    return wait_for(done, timeout, 0.2, f"job {job_id} to finish")


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and ".pacsfetch" not in p.parts]


# Redis restarts under a running job ---------------------------------------------------------
OUTAGE_SECONDS = 3.0
"""How long Redis is down in the test: a restart, well within redis_outage_seconds (60)."""


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, with AOF as production runs it, so it can be restarted."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    with server:
        yield server


def test_redis_restart_during_a_job_is_ridden_out_and_the_job_finishes(
    own_redis: RedisServer, orthanc: Orthanc, big_study: SampleStudy, tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    config = make_config(redis_url=own_redis.url, store_root=tmp_path / "store",
                         orthanc=orthanc)
    worker = start_worker(config)
    client = _client(config)
    job_id = client.post("/jobs", json={"source": "orthanc", "study_uid": big_study.study_uid,
                                        "store": "local"}).json()["id"]
    wait_for(lambda: _job(client, job_id)["progress"]["completed"] >= 40, 60, 0.02,
             "the job to be well under way")
    own_redis.kill()  # as a crash or a lost node would; AOF keeps what was acknowledged
    time.sleep(OUTAGE_SECONDS)
    own_redis.start()
    job = _final(client, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1, "the outage was ridden out, not retried"
    assert job["progress"]["completed"] == len(big_study.instances)
    files = _files(tmp_path / "store")
    assert sorted(p.stem for p in files) == sorted(i.sop_instance_uid for i in big_study.instances)
    log = worker.log_path.read_text()
    assert "Exception in thread lease-" not in log, "the lease heartbeat died"
    assert "Redis did not answer" in log  # the outage is logged, once per call that waited


# A store on a file system that fills up -------------------------------------------------------
SMALL_DISK = "4m"
"""The store's file system: room for about a hundred of big_study's 400 instances (33 KB)."""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of SMALL_DISK as the store root (mounting needs root: skipped without)."""
    root = tmp_path / "small"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs",
                              str(root)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def _assert_nothing_half_written(root: Path, completed: int) -> None:
    """Every visible file is a whole instance; the job recorded no more than are there
    (a batch whose sync failed is not recorded, and is fetched again by a later attempt)."""
    files = _files(root)
    assert 0 < completed <= len(files)
    assert not [p for p in files if p.suffix == ".part"]
    for path in files:
        assert dcmread(path).SOPInstanceUID == path.stem


def test_full_store_disk_ends_partial_naming_the_store_and_is_not_retried(
    orthanc: Orthanc, big_study: SampleStudy, small_disk: Path, redis_url: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    config = make_config(redis_url=redis_url, store_root=small_disk, orthanc=orthanc)
    start_worker(config)
    client = _client(config)
    job_id = client.post("/jobs", json={"source": "orthanc", "study_uid": big_study.study_uid,
                                        "store": "local"}).json()["id"]
    job = _final(client, job_id)
    assert job["status"] == "partial", job["error"]
    assert job["error_kind"] == "store"
    assert "store 'local'" in job["error"] and "no space left" in job["error"].lower()
    assert job["attempts"] == 1, "a full disk is not retried until space returns"
    assert 0 < job["progress"]["completed"] < len(big_study.instances)
    _assert_nothing_half_written(small_disk, job["progress"]["completed"])


def test_full_store_disk_by_dicomweb_names_the_store(
    config_factory: Callable[..., Config], orthanc: Orthanc, big_study: SampleStudy,
    small_disk: Path,
) -> None:
    config = config_factory(store_root=small_disk, extra_sources={"web": {
        "ae_title": "GATEWAY", "host": "127.0.0.1", "port": 104, "transports": ["dicomweb"],
        "dicomweb_url": orthanc.dicomweb_url, "timeout": 10}})
    outcome = run_job(config, JobRequest(source="web", study_uid=big_study.study_uid,
                                         store="local"))
    assert outcome.status is JobStatus.PARTIAL, outcome.error
    assert outcome.error_kind == "store"
    assert "store 'local'" in (outcome.error or "")
    assert "no space left" in (outcome.error or "").lower()
    assert not outcome.retry
    _assert_nothing_half_written(small_disk, outcome.progress.completed)


# A store that fails for another reason: retried like a connection failure ---------------------
def _forwarding(config: dict[str, Any], port: int) -> dict[str, Any]:
    """*config* with a DICOM forward store 'newpacs' at *port* beside the filesystem."""
    config["stores"]["newpacs"] = {"plugin": "dicom", "ae_title": "NEWPACS",
                                   "host": "127.0.0.1", "port": port, "timeout": 5}
    return config


def test_store_down_then_back_is_retried_with_back_off_and_the_job_succeeds(
    orthanc: Orthanc, mixed_study: SampleStudy, redis_url: str, tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    port = free_port()
    config = _forwarding(make_config(redis_url=redis_url, store_root=tmp_path / "store",
                                     orthanc=orthanc,
                                     worker={"max_retries": 3, "retry_backoff": 2.0}), port)
    start_worker(config)
    client = _client(config)
    job_id = client.post("/jobs", json={"source": "orthanc", "study_uid": mixed_study.study_uid,
                                        "stores": ["newpacs", "local"]}).json()["id"]
    waiting = wait_for(lambda: (job := _job(client, job_id))["status"] == "queued"
                       and job["error"] and job, 60, 0.05, "the first attempt to fail")
    assert waiting["error_kind"] == "store"
    assert waiting["error"].startswith("attempt 1 failed, retrying in 2 s")
    assert "'newpacs'" in waiting["error"]
    with StoreScp(tmp_path / "newpacs", aet="NEWPACS", port=port) as archive:
        job = _final(client, job_id)
        forwarded = list(archive.received_dir.glob("*.dcm"))
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] >= 2
    assert len(forwarded) == len(mixed_study.instances)
    assert len(_files(tmp_path / "store")) == len(mixed_study.instances)


def test_store_that_stays_down_fails_naming_it_after_the_retries(
    orthanc: Orthanc, mixed_study: SampleStudy, redis_url: str, tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    config = _forwarding(make_config(redis_url=redis_url, store_root=tmp_path / "store",
                                     orthanc=orthanc), free_port())
    start_worker(config)
    client = _client(config)
    job_id = client.post("/jobs", json={"source": "orthanc", "study_uid": mixed_study.study_uid,
                                        "stores": ["newpacs", "local"]}).json()["id"]
    job = _final(client, job_id)
    assert job["status"] == "failed"
    assert job["error_kind"] == "store"
    assert job["attempts"] == 3  # the first try and worker.max_retries = 2 retries
    assert "failing store(s): 'newpacs'" in job["error"]
    assert "cannot connect to 127.0.0.1" in job["error"]
    assert job["error"].endswith("(gave up after 3 attempts)")
    assert _files(tmp_path / "store") == []  # 'newpacs' commits first and failed each time
