"""Recording and queueing submitted jobs, with group commit for single submissions.

Every ``POST /jobs`` costs two Redis writes (the job record, the Celery message). Done one
request at a time they cost a thread-pool hand-off, a kombu Redis client and two round
trips each, and on a small machine that CPU decides the latency under load. A
:class:`GroupCommit` thread instead takes whatever submissions are waiting, records them
in one pipeline and queues them in one kombu publish batch, then answers each request.
Nothing is answered before its job is both recorded and queued, so a 202 still means the
job is on the queue; when only one request is waiting the group is that one request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from contextlib import suppress
from dataclasses import dataclass

import redis
from celery import Celery
from fastapi import HTTPException, status

from pacsfetch.jobstore import JobStore
from pacsfetch.models import JobRecord, JobRequest, JobStatus
from pacsfetch.queue import enqueue_retrieves

log = logging.getLogger(__name__)

MAX_GROUP = 256
"""Submissions recorded and queued together at most; bounds one pipeline's size."""


def record_and_enqueue(store: JobStore, celery: Celery, requests: list[JobRequest],
                       created_by: str | list[str | None] | None = None) -> list[JobRecord]:
    """Record jobs, then queue them; 503 when Redis or the queue refuses (and then the
    records that were written say why). *created_by*: the caller's name, or one per job."""
    try:
        records = store.create_many(requests, created_by=created_by)
    except redis.RedisError:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "the job store (Redis) is unavailable") from None
    try:
        enqueue_retrieves(celery, [(r.id, r.request.priority) for r in records])
    except Exception as exc:
        with suppress(redis.RedisError):  # Redis gone too: the 503 still says what happened
            for record in records:
                store.transition(record.id, JobStatus.FAILED, error=f"could not enqueue: {exc}",
                                 error_kind="queue")
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "the queue is unavailable") from None
    return records


@dataclass(slots=True)
class _Pending:
    request: JobRequest
    created_by: str | None
    future: asyncio.Future[JobRecord]
    loop: asyncio.AbstractEventLoop


class GroupCommit:
    """One thread that records and queues submissions in groups (see the module docstring)."""

    def __init__(self, store: JobStore, celery: Celery) -> None:
        self._store, self._celery = store, celery
        self._waiting: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def warm(self) -> None:
        """Start the thread and do the one-time work of a first submission now: Celery
        imports its transport and result backend and opens its broker connection on first
        use, a few hundred milliseconds that would otherwise land on the first requests
        after every start (a rolling deploy, say)."""
        self._start()
        try:
            self._store.ping()
            _ = self._celery.backend
            with self._celery.producer_or_acquire() as producer:
                producer.connection.ensure_connection(max_retries=1)
        except Exception as exc:  # Redis down at start: /healthz says so; submissions retry
            log.warning("could not reach Redis while starting", extra={"error": str(exc)})

    async def submit(self, request: JobRequest, created_by: str | None = None) -> JobRecord:
        """The recorded job once it is on the queue; raises the 503 if the queue refused it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[JobRecord] = loop.create_future()
        self._start()
        self._waiting.put(_Pending(request, created_by, future, loop))
        return await future

    def close(self) -> None:
        """Finish the submissions already waiting, then stop the thread."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._waiting.put(None)
            thread.join()

    def _start(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="pacsfetch-submit",
                                                    daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._waiting.get()
            if first is None:
                return
            group = [first]
            while len(group) < MAX_GROUP:
                try:
                    item = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                group.append(item)
            self._commit(group)

    def _commit(self, group: list[_Pending]) -> None:
        try:
            records = record_and_enqueue(self._store, self._celery, [p.request for p in group],
                                         [p.created_by for p in group])
        except BaseException as exc:  # every waiting request gets the error (the 503, usually)
            for pending in group:
                pending.loop.call_soon_threadsafe(_settle, pending.future, None, exc)
            return
        for pending, record in zip(group, records, strict=True):
            pending.loop.call_soon_threadsafe(_settle, pending.future, record, None)


def _settle(future: asyncio.Future[JobRecord], record: JobRecord | None,
            error: BaseException | None) -> None:
    if future.done():  # the client went away; its job stays recorded and queued
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert record is not None
        future.set_result(record)
