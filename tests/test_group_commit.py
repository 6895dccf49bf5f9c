"""Group commit of single submissions against a real Redis: concurrent ``POST /jobs`` calls
share pipelines, yet each gets its own job, recorded and queued before it is answered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from test_api import queued_messages

from pacsfetch.api.submit import GroupCommit
from pacsfetch.config import Config
from pacsfetch.jobstore import JobStore
from pacsfetch.models import JobRequest, JobStatus
from pacsfetch.queue import make_celery

STUDY = "1.2.826.0.1.3680043.8.498.91"


def _requests(n: int) -> list[JobRequest]:
    return [JobRequest(source="orthanc", study_uid=f"{STUDY}.{i}", store="local", priority=i % 10)
            for i in range(n)]


def test_concurrent_submissions_each_get_their_own_recorded_queued_job(
        config_factory: Callable[..., Config], redis_url: str) -> None:
    config = config_factory()
    store = JobStore.from_url(redis_url)
    committer = GroupCommit(store, make_celery(config))
    requests = _requests(300)  # more than one group's worth

    async def submit_all() -> list:
        return await asyncio.gather(*(committer.submit(r) for r in requests))

    try:
        records = asyncio.run(submit_all())
    finally:
        committer.close()
    assert [r.request.study_uid for r in records] == [r.study_uid for r in requests]
    assert len({r.id for r in records}) == len(requests)
    for record in records[::37]:
        stored = store.get(record.id)
        assert stored.status is JobStatus.QUEUED and stored.request == record.request
    queued = {m["headers"]["argsrepr"] for m in queued_messages(redis_url)}
    assert queued == {repr([r.id]) for r in records}


def test_close_answers_what_is_waiting_and_a_later_submit_starts_again(
        config_factory: Callable[..., Config], redis_url: str) -> None:
    config = config_factory()
    committer = GroupCommit(JobStore.from_url(redis_url), make_celery(config))

    async def one(request: JobRequest) -> str:
        return (await committer.submit(request)).id

    first = asyncio.run(one(_requests(1)[0]))
    committer.close()
    second = asyncio.run(one(_requests(2)[1]))
    committer.close()
    assert first != second
    assert {m["headers"]["argsrepr"] for m in queued_messages(redis_url)} == {
        repr([first]), repr([second])}
