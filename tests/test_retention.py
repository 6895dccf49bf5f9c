"""Job records do not grow without bound: finished jobs expire, with their instance lists,
after ``[jobs] retention_days``; the sweep takes their ids out of the indexes (real Redis)."""

from __future__ import annotations

import time

import pytest
import redis

from pacsfetch import retention
from pacsfetch.config import ConfigError, parse_config
from pacsfetch.jobstore import JobNotFound, JobStore
from pacsfetch.models import JobRequest, JobStatus

STUDY = "1.2.826.0.1.3680043.8.498.31"
DAY = 86400


def _request() -> JobRequest:
    return JobRequest(source="orthanc", study_uid=STUDY, store="local")


def test_retention_days_defaults_to_30_and_is_checked() -> None:
    assert parse_config({}).jobs.retention_days == 30
    assert parse_config({"jobs": {"retention_days": 7}}).jobs.retention_days == 7
    with pytest.raises(ConfigError, match="jobs.retention_days"):
        parse_config({"jobs": {"retention_days": 0}})
    with pytest.raises(ConfigError, match="jobs.retention_day: unknown key"):
        parse_config({"jobs": {"retention_day": 3}})


@pytest.mark.parametrize("final", [JobStatus.SUCCEEDED, JobStatus.PARTIAL, JobStatus.FAILED,
                                   JobStatus.CANCELLED])
def test_a_final_status_sets_the_ttl_on_the_job_and_its_instances(
        redis_url: str, final: JobStatus) -> None:
    store = JobStore.from_url(redis_url, retention_days=7)
    r = redis.Redis.from_url(redis_url)
    job = store.create(_request())
    store.transition(job.id, JobStatus.RUNNING)
    store.record_instances(job.id, {f"{STUDY}.1.{n}": '{"local": "x"}' for n in range(3)})
    keys = [f"pacsfetch:job:{job.id}", f"pacsfetch:job:{job.id}:instances"]
    assert [r.ttl(k) for k in keys] == [-1, -1]  # running: kept
    store.transition(job.id, final)
    for key in keys:
        assert 7 * DAY - 60 < r.ttl(key) <= 7 * DAY


def test_a_job_going_back_to_queued_is_kept_again(redis_url: str) -> None:
    """A final job retried (queued again) must not vanish under its worker."""
    store = JobStore.from_url(redis_url, retention_days=1)
    r = redis.Redis.from_url(redis_url)
    job = store.create(_request())
    store.transition(job.id, JobStatus.FAILED)
    assert r.ttl(f"pacsfetch:job:{job.id}") > 0
    store.transition(job.id, JobStatus.QUEUED)
    assert r.ttl(f"pacsfetch:job:{job.id}") == -1


def test_expired_jobs_leave_the_indexes_on_sweep(redis_url: str) -> None:
    config = parse_config({"broker": {"url": redis_url},
                           "jobs": {"retention_days": 1 / DAY}})  # one second
    store = retention.jobstore(config)
    done = store.create(_request())
    store.transition(done.id, JobStatus.RUNNING)
    store.record_instances(done.id, {f"{STUDY}.1.1": '{"local": "x"}'})
    store.transition(done.id, JobStatus.SUCCEEDED)
    waiting = store.create(_request())
    deadline = time.monotonic() + 10
    while store.exists(done.id) and time.monotonic() < deadline:
        time.sleep(0.2)
    with pytest.raises(JobNotFound):
        store.get(done.id)
    assert store.count_instances(done.id) == 0
    assert store.list()[1] == 2  # the index still names it, until the sweep
    assert retention.sweep(config, store, now=time.time() + 2) == 2  # all, succeeded
    assert [j.id for j in store.list()[0]] == [waiting.id] and store.list()[1] == 1
    assert store.count_by_status()[JobStatus.SUCCEEDED] == 0
    assert store.get(waiting.id).status is JobStatus.QUEUED  # never expires while not final


def test_other_records_expire_with_the_same_setting(redis_url: str) -> None:
    """What a migration's or a prefetch's finished records call."""
    config = parse_config({"broker": {"url": redis_url}, "jobs": {"retention_days": 2}})
    r = redis.Redis.from_url(redis_url)
    r.hset("pacsfetch:mig:abc", "status", "finished")
    r.hset("pacsfetch:mig:abc:studies", "1.2.3", "x")
    retention.expire_finished(r, ["pacsfetch:mig:abc", "pacsfetch:mig:abc:studies"], config)
    assert all(2 * DAY - 60 < r.ttl(k) <= 2 * DAY
               for k in ("pacsfetch:mig:abc", "pacsfetch:mig:abc:studies"))
