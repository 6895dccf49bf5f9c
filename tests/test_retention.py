"""Job records do not grow without bound: finished jobs expire, with their instance lists,
after ``[jobs] retention_days``; the sweep takes their ids out of the indexes (real Redis)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import redis

from pacsfetch import retention
from pacsfetch.config import ConfigError, parse_config
from pacsfetch.jobstore import JobNotFound, JobStore
from pacsfetch.migrations import (
    MigrationRequest,
    MigrationStatus,
    MigrationStore,
    StudyRow,
    StudyState,
)
from pacsfetch.models import JobRequest, JobStatus
from pacsfetch.prefetch import CurrentExam, PrefetchRequest, PrefetchStore
from pacsfetch.prefetch_rules import RuleMatch

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


def test_finished_migrations_and_prefetches_expire_with_the_same_setting(
        redis_url: str) -> None:
    """Every key of a finished migration (its plan and the missing-UID lists too) and a
    finished prefetch get the jobs' TTL; a migration running again keeps its keys; the sweep
    drops an expired migration from the index."""
    config = parse_config({"broker": {"url": redis_url}, "jobs": {"retention_days": 2}})
    ttl = retention.retention_seconds(config)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    migrations = MigrationStore.from_url(redis_url, retention_seconds=ttl)
    mig = migrations.create(MigrationRequest(source="orthanc", stores=["local"]), "alice")
    assert mig.created_by == "alice"
    migrations.add_studies(mig.id, [StudyRow(STUDY, StudyState.PLANNED, "20200101", 3)])
    migrations.take(mig.id, 1)
    migrations.set_study(mig.id, StudyRow(STUDY, StudyState.MISMATCH, "20200101", 3, 2))
    migrations.record_missing(mig.id, STUDY, ["1.2.3.4"])
    migrations.finish(mig.id, MigrationStatus.PARTIAL)
    keys = [migrations.key(mig.id), migrations.key(mig.id, "studies"),
            migrations.key(mig.id, f"missing:{STUDY}")]
    assert all(2 * DAY - 60 < r.ttl(k) <= 2 * DAY for k in keys), [r.ttl(k) for k in keys]
    assert migrations.retry_failed(mig.id) == 1  # running again: nothing expires meanwhile
    assert all(r.ttl(k) == -1 for k in keys[:2])

    prefetches = PrefetchStore.from_url(redis_url, retention_seconds=ttl)
    request = PrefetchRequest(patient_id="P-RET", current=CurrentExam(modality="CT"))
    record, _ = prefetches.create(request, rule=RuleMatch(name="ct", reason="test"),
                                  lead=timedelta(0), suppress=timedelta(hours=1),
                                  trigger="api", created_by="alice")
    assert r.ttl(f"pacsfetch:prefetch:{record.id}") == -1  # live: kept
    prefetches.cancel(record.id, "test")
    assert 2 * DAY - 60 < r.ttl(f"pacsfetch:prefetch:{record.id}") <= 2 * DAY

    r.delete(*keys[:2])  # as Redis does once the TTL runs out
    assert retention.sweep(config) == 1
    assert migrations.list()[1] == 0 and migrations.active() == []
