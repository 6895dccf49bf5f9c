"""Job state in a real Redis."""

from __future__ import annotations

import pytest

from pacsfetch.jobstore import JobNotFound, JobStore
from pacsfetch.models import JobRequest, JobStatus, Progress

STUDY = "1.2.826.0.1.3680043.8.498.10"


def _request(**kw: object) -> JobRequest:
    return JobRequest(source="orthanc", study_uid=STUDY, store="local", **kw)


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url)


def test_create_get_and_progress(store: JobStore) -> None:
    job = store.create(_request())
    assert store.get(job.id).status is JobStatus.QUEUED
    store.set_progress(job.id, Progress(completed=3, remaining=7, bytes=1024))
    got = store.get(job.id)
    assert (got.progress.completed, got.progress.remaining, got.progress.bytes) == (3, 7, 1024)


def test_unknown_and_malformed_ids(store: JobStore) -> None:
    for job_id in ["0" * 32, "../etc", "a:b"]:
        with pytest.raises(JobNotFound):
            store.get(job_id)


def test_transition_respects_allowed_from_and_keeps_index(store: JobStore) -> None:
    job = store.create(_request())
    assert store.transition(job.id, JobStatus.RUNNING, allowed_from=[JobStatus.QUEUED]) == (
        True, JobStatus.QUEUED)
    assert store.transition(job.id, JobStatus.RUNNING, allowed_from=[JobStatus.QUEUED]) == (
        False, JobStatus.RUNNING)
    store.transition(job.id, JobStatus.SUCCEEDED, error=None)
    got = store.get(job.id)
    assert got.started_at is not None and got.finished_at is not None
    assert [j.id for j in store.list(JobStatus.SUCCEEDED)[0]] == [job.id]
    assert store.list(JobStatus.QUEUED)[1] == 0 and store.list(JobStatus.RUNNING)[1] == 0


def test_list_pages_newest_first(store: JobStore) -> None:
    ids = [store.create(_request()).id for _ in range(5)]
    page, total = store.list(offset=1, limit=2)
    assert total == 5
    assert [j.id for j in page] == [ids[3], ids[2]]


def test_cancel_queued_is_immediate_and_running_is_a_request(store: JobStore) -> None:
    queued = store.create(_request())
    assert store.request_cancel(queued.id).status is JobStatus.CANCELLED
    running = store.create(_request())
    store.transition(running.id, JobStatus.RUNNING)
    after = store.request_cancel(running.id)
    assert after.status is JobStatus.RUNNING and after.cancel_requested
    assert store.cancel_requested(running.id)


def test_lease_is_exclusive_until_released_or_broken(store: JobStore) -> None:
    job = store.create(_request())
    assert store.acquire_lease(job.id, "a", 30) == "a"
    assert store.acquire_lease(job.id, "b", 30) == "a"
    assert not store.break_lease(job.id, "b")
    assert store.break_lease(job.id, "a")
    assert store.acquire_lease(job.id, "b", 30) == "b"
    store.release_lease(job.id, "b")
    assert store.acquire_lease(job.id, "c", 30) == "c"


def test_instance_record_pages(store: JobStore) -> None:
    job = store.create(_request())
    store.record_instances(job.id, {f"1.2.{i}": '{"local":"x"}' for i in range(50)})
    seen: dict[str, str] = {}
    cursor = 0
    while True:
        cursor, rows = store.scan_instances(job.id, cursor, 10)
        seen.update(rows)
        if cursor == 0:
            break
    assert len(seen) == 50 == store.count_instances(job.id)


def test_the_same_study_into_the_same_stores_is_one_job_until_it_ends(redis_url: str) -> None:
    store = JobStore.from_url(redis_url)
    bulk = JobRequest(source="pacs", study_uid="1.2.3", stores=["b", "a"], priority=0)
    first = store.create_or_join(bulk, origin="migration")
    again = store.create_or_join(bulk, origin="migration")
    assert not first.joined and again.joined and again.record.id == first.record.id
    assert not again.requeue  # nothing more urgent joined
    other_stores = store.create_or_join(bulk.model_copy(update={"stores": ["a"]}))
    assert other_stores.record.id != first.record.id
    # A prefetch of the same study joins the migration's job and makes it urgent, not bulk.
    prefetch = store.create_or_join(
        JobRequest(source="pacs", study_uid="1.2.3", stores=["a", "b"], priority=8),
        origin="prefetch")
    assert prefetch.joined and prefetch.requeue and prefetch.record.id == first.record.id
    assert (prefetch.record.request.priority, prefetch.record.origin) == (8, "prefetch")
    assert store.list(JobStatus.QUEUED)[1] == 2
    # Once the job ends, the same work makes a new job.
    store.transition(first.record.id, JobStatus.RUNNING)
    assert store.create_or_join(bulk, origin="migration").record.id == first.record.id
    store.transition(first.record.id, JobStatus.SUCCEEDED)
    later = store.create_or_join(bulk, origin="migration")
    assert not later.joined and later.record.id != first.record.id
    assert later.record.status is JobStatus.QUEUED and later.record.origin == "migration"


def test_series_and_image_jobs_are_never_joined(redis_url: str) -> None:
    store = JobStore.from_url(redis_url)
    series = JobRequest(source="pacs", level="SERIES", study_uid="1.2.3", series_uid="1.2.3.4",
                        store="a")
    assert store.create_or_join(series).record.id != store.create_or_join(series).record.id
