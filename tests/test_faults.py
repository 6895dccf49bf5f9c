"""Faults end with the true reason, and are retried where a retry can help (issue 14, item 4).

Every fault here is real: a Redis restarted under a running job, a store on a file system
that fills up, a forward destination that is down and comes back. Workers are real
``pacsfetch worker`` processes, the PACS a real Orthanc.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import WorkerProcess, make_config, wait_for

from pacsfetch.api.app import create_app
from pacsfetch.config import parse_config
from pacsfetch.sandbox.peers import Orthanc, RedisServer
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
