"""The Celery tasks: idempotent, leased, explicitly retried.

A job may be delivered more than once (a worker died before acknowledging it, the
visibility timeout lapsed): the job's status and its lease in Redis decide what a delivery
does. A final job is left alone; a job leased by a live worker is retried later; a lease
held by a dead process on this host is broken at once. Each attempt resumes from what
earlier attempts recorded as stored.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import replace
from typing import Any

import redis
from celery import Task

from pacsfetch import audit
from pacsfetch.errors import RetrieveError
from pacsfetch.jobstore import JobNotFound, JobStore, encode_notes
from pacsfetch.metrics import JOB_RETRIES, JOBS_IN_FLIGHT
from pacsfetch.models import BULK_ORIGINS, FINAL_STATUSES, JobStatus
from pacsfetch.plugins.dimse.services import echo as dicom_echo
from pacsfetch.plugins.find import find_studies as dicom_find_studies
from pacsfetch.queue import ECHO_TASK, FIND_STUDIES_TASK, QUEUE, RETRIEVE_TASK, redis_priority
from pacsfetch.redisconn import outage_client
from pacsfetch.studyquery import StudyQuery
from pacsfetch.workers import lifecycle
from pacsfetch.workers.celery_app import app, config, registry, store_settings
from pacsfetch.workers.runner import JobRunner, Outcome
from pacsfetch.workers.state import RedisJobState

log = logging.getLogger(__name__)

_stores: dict[int, JobStore] = {}


def jobstore() -> JobStore:
    """One Redis client per process: prefork children must not share their parent's sockets.

    Its calls ride out a Redis outage of up to ``[worker] redis_outage_seconds`` (a restart),
    so a running job keeps going instead of failing on its next progress update."""
    pid = os.getpid()
    if pid not in _stores:
        _stores.clear()
        client = outage_client(config.broker.url, config.worker.redis_outage_seconds)
        _stores[pid] = JobStore(client, retention_days=config.jobs.retention_days)
    return _stores[pid]


def _lease_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _holder_is_dead_here(holder: str) -> bool:
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _Heartbeat(threading.Thread):
    """Renews the job's lease while the attempt runs."""

    def __init__(self, store: JobStore, job_id: str, owner: str, ttl: float) -> None:
        super().__init__(daemon=True, name=f"lease-{job_id[:8]}")
        self._store, self._job_id, self._owner, self._ttl = store, job_id, owner, ttl
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Renew until stopped; an error (Redis away longer than the outage budget) is
        logged and the next renewal tried, so the lease is back as soon as Redis is."""
        while not self._stop_event.wait(self._ttl / 3):
            try:
                self._store.acquire_lease(self._job_id, self._owner, self._ttl)
            except redis.RedisError as exc:
                log.warning("could not renew the job's lease; trying again", extra={
                    "job_id": self._job_id, "reason": type(exc).__name__})

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@app.task(name=RETRIEVE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
          max_retries=None)
def retrieve(self: Task, job_id: str) -> None:
    store = jobstore()
    try:
        job = store.get(job_id)
    except JobNotFound:
        log.error("job not found; dropping its message", extra={"job_id": job_id})
        return
    if job.status in FINAL_STATUSES:
        log.info("job already final; nothing to do", extra={"job_id": job_id, "status": job.status.value})
        return
    owner = _lease_owner()
    lease_ttl = config.worker.lease_seconds
    holder = store.acquire_lease(job_id, owner, lease_ttl)
    if holder != owner:
        if _holder_is_dead_here(holder) and store.break_lease(job_id, holder):
            holder = store.acquire_lease(job_id, owner, lease_ttl)
        if holder != owner:
            log.info("job leased by another worker; checking again later", extra={"job_id": job_id})
            raise self.retry(countdown=lease_ttl, priority=redis_priority(job.request.priority))
    heartbeat = _Heartbeat(store, job_id, owner, lease_ttl)
    heartbeat.start()
    try:
        handed_back = _attempt(self, store, job_id)
    finally:
        heartbeat.stop()
        store.release_lease(job_id, owner)
    if handed_back:  # lease released first, so the next worker starts at once
        app.send_task(RETRIEVE_TASK, args=[job_id], queue=QUEUE,
                      priority=redis_priority(job.request.priority), retries=self.request.retries)


def _attempt(task: Task, store: JobStore, job_id: str) -> bool:
    """One attempt; True when the worker is stopping and handed the job back (re-queued)."""
    changed, previous = store.transition(
        job_id, JobStatus.RUNNING, allowed_from=[JobStatus.QUEUED, JobStatus.RUNNING],
        error=None, error_kind=None, transport_notes=None,
    )
    if not changed:
        log.info("job no longer runnable", extra={"job_id": job_id, "status": str(previous)})
        return False
    attempt = store.incr_attempts(job_id)
    job = store.get(job_id)
    hooks = registry.hooks.hook
    hooks.pacsfetch_job_started(job=job, attempt=attempt)
    log.info("job started", extra={"job_id": job_id, "attempt": attempt, "source": job.request.source})
    audit.record(config, "job.start", job, attempt=attempt)
    runner = JobRunner(config, registry, store_settings)
    try:
        with JOBS_IN_FLIGHT.labels(job.request.source).track_inprogress():
            outcome = runner.run(job_id, job.request,
                                 lifecycle.HandBackState(RedisJobState(store, job_id)),
                                 bulk=job.origin in BULK_ORIGINS)
    except RetrieveError as exc:  # the runner raises only retryable errors
        outcome = Outcome(JobStatus.FAILED, store.get(job_id).progress, None, exc.message,
                          exc.kind.value, retry=True)
    except Exception as exc:  # a bug, not the PACS: fail the job loudly, keep the worker
        log.exception("job crashed", extra={"job_id": job_id})
        outcome = Outcome(JobStatus.FAILED, store.get(job_id).progress, None,
                          f"internal error: {type(exc).__name__}: {exc}", "internal")
    if lifecycle.handed_back(outcome.status is JobStatus.CANCELLED,
                             lambda: store.cancel_requested(job_id)):
        store.set_progress(job_id, outcome.progress)
        store.transition(job_id, JobStatus.QUEUED, allowed_from=[JobStatus.RUNNING],
                         error=f"attempt {attempt} handed back by a stopping worker after "
                         f"{outcome.progress.completed} instance(s); another worker resumes it",
                         error_kind=None)
        log.info("job handed back", extra={"job_id": job_id, "attempt": attempt,
                                           "completed": outcome.progress.completed})
        return True
    if outcome.retry:
        retries = task.request.retries
        if retries < config.worker.max_retries:
            kind = outcome.error_kind or "internal"
            JOB_RETRIES.labels(job.request.source, kind).inc()
            countdown = config.worker.retry_backoff * (2**retries)
            store.set_progress(job_id, outcome.progress)
            store.transition(
                job_id, JobStatus.QUEUED, allowed_from=[JobStatus.RUNNING],
                error=f"attempt {attempt} failed, retrying in {countdown:g} s: {outcome.error}",
                error_kind=kind,
            )
            log.warning("attempt failed; retrying", extra={
                "job_id": job_id, "attempt": attempt, "error_kind": kind})
            raise task.retry(countdown=countdown, priority=redis_priority(job.request.priority),
                             max_retries=config.worker.max_retries) from None
        if attempt > 1:
            outcome = replace(outcome, error=f"{outcome.error} (gave up after {attempt} attempts)")
    _finish(store, job_id, outcome)
    return False


def _finish(store: JobStore, job_id: str, outcome: Outcome) -> None:
    store.set_progress(job_id, outcome.progress)
    fields: dict[str, Any] = {"error": outcome.error, "error_kind": outcome.error_kind}
    if outcome.transport:
        fields["transport"] = outcome.transport
    if outcome.transport_notes:
        fields["transport_notes"] = encode_notes(outcome.transport_notes)
    store.transition(job_id, outcome.status, allowed_from=[JobStatus.RUNNING], **fields)
    job = store.get(job_id)
    log.info("job finished", extra={
        "job_id": job_id, "status": job.status.value, "completed": job.progress.completed,
        "failed": job.progress.failed, "bytes": job.progress.bytes})
    audit.record(config, "job.finish", job)
    registry.hooks.hook.pacsfetch_job_finished(job=job)


@app.task(name=ECHO_TASK, ignore_result=False, acks_late=False)
def echo(source_name: str) -> dict[str, Any]:
    """C-ECHO a configured source on behalf of the API (which never talks DICOM itself)."""
    source = config.sources.get(source_name)
    if source is None:
        return {"ok": False, "message": f"unknown source {source_name!r}", "elapsed_ms": 0.0}
    result = dicom_echo(source, source_name)
    return {"ok": result.ok, "message": result.message, "elapsed_ms": round(result.elapsed_ms, 1)}


@app.task(name=FIND_STUDIES_TASK, ignore_result=False, acks_late=False)
def find_studies(source_name: str, query: dict[str, Any]) -> dict[str, Any]:
    """Study C-FIND for the API; the answer holds patient identifiers, so nothing is logged."""
    source = config.sources.get(source_name)
    if source is None:
        return {"ok": False, "error_kind": "config", "error": f"unknown source {source_name!r}"}
    try:
        found = dicom_find_studies(source, StudyQuery.model_validate(query), source_name)
    except RetrieveError as exc:
        return {"ok": False, "error_kind": exc.kind.value, "error": exc.message}
    return {"ok": True, "result": found.model_dump(mode="json")}
