"""Running migrations: the scheduler duty that plans, feeds, skips, verifies and reports.

One duty of the scheduler's leader (exactly one process in the fleet) works on every active
migration each tick. What takes the network (planning C-FINDs, asking the destination what
it holds, verifying a study) runs on a small thread pool so a tick stays short; everything
it decides is in Redis (:mod:`pacsfetch.migrations`), so a new leader after any restart
redoes at most the study checks that were in progress, which are idempotent.

Per study: *check* (does every store already hold it? then ``skipped``; does one hold part
of it? then only the missing instances are fetched), a job through the normal machinery
(:meth:`JobStore.create_or_join`, origin ``migration``: bulk work, which keeps to the
source's windows and never takes its reserved slots), then *verify* (the source's SOP
Instance UIDs by instance-level C-FIND against what each store lists) -> ``verified``, or
``mismatch`` with the missing UIDs. At most the migration's in-flight limit of studies are
between check and verify at once; a source answering "busy" lowers it
(:mod:`pacsfetch.pushback`).

Feeding also stops :data:`CLOSING_MARGIN` seconds before the source's time window closes (a
study started then would open its association just to be told to stop), and, when the
source has ``max_mb_per_second``, until the bytes the migration moved fit under that rate
(:func:`next_feed_at`): the per-association limiter paces each transfer, this keeps the
migration's average under the cap however many studies run at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime

import redis
from celery import Celery

from pacsfetch import retention
from pacsfetch.config import Config
from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.gate import AssociationGate, process_gate
from pacsfetch.jobstore import JobNotFound, JobStore
from pacsfetch.migrations import (
    MigrationRequest,
    MigrationStatus,
    MigrationStore,
    StudyRow,
    StudyState,
)
from pacsfetch.models import MAX_SOP_UIDS_PER_JOB, JobRequest, JobStatus, Level
from pacsfetch.plugins.registry import Registry, get_registry
from pacsfetch.plugins.stores.dicom_inventory import find_study_instances
from pacsfetch.pushback import Pace
from pacsfetch.queue import enqueue_retrieves, make_celery
from pacsfetch.retention import retention_seconds
from pacsfetch.workers.inventory import missing_from, study_inventory
from pacsfetch.workers.planner import run_planning
from pacsfetch.workers.scheduler import Duty

log = logging.getLogger(__name__)

INTERVAL = 1.0
"""Seconds between ticks of the feeder."""
THREADS = 4
"""Planning, checks and verifications running at once (each holds at most one association)."""
PLAN_RETRY_SECONDS = 30.0
PLAN_ATTEMPTS = 5
"""Planning attempts in a row that may fail before the migration fails."""
RATE_SECONDS = 10.0
"""The current rate is measured over windows of this length."""
CLOSING_MARGIN = 10.0
"""Seconds before a window closes in which no new study is fed."""
CHECK = "check"
VERIFY = "verify"


class MigrationFeeder:
    """The duty's state: the thread pool and what it is doing (the rest is in Redis)."""

    def __init__(self, config: Config, *, store: MigrationStore | None = None,
                 jobs: JobStore | None = None, celery: Celery | None = None,
                 gate: AssociationGate | None = None, registry: Registry | None = None,
                 threads: int = THREADS) -> None:
        self.config = config
        self.store = store or MigrationStore.from_url(
            config.broker.url, retention_seconds=retention_seconds(config))
        self.jobs = jobs or retention.jobstore(config)
        self.celery = celery or make_celery(config)
        self.gate = gate or process_gate(config)
        self.registry = registry or get_registry()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="migration")
        self._tasks: dict[tuple[str, str], Future[None]] = {}
        self._stop = threading.Event()
        self._plan_failures: dict[str, int] = {}
        self._plan_retry_at: dict[str, float] = {}
        self._retry_at: dict[tuple[str, str], float] = {}
        self._orphaned: dict[str, float] = {}
        """Running jobs seen without a lease holder: job id -> since when."""

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # the tick ---------------------------------------------------------------------------
    def tick(self, now: datetime | None = None) -> None:
        """One pass over every active migration; *now* (tests) sets the clock of the
        windows and the rate cap."""
        for key in [k for k, f in self._tasks.items() if f.done()]:
            del self._tasks[key]
        for mig_id in self.store.active():
            try:
                self._tick_one(mig_id, now or datetime.now(UTC))
            except redis.RedisError:
                raise
            except Exception:  # one migration's trouble must not stop the others
                log.exception("migration tick failed", extra={"migration": mig_id})

    def busy(self) -> bool:
        """Whether any planning, check or verification is still running (for tests)."""
        return any(not f.done() for f in self._tasks.values())

    def _submit(self, key: tuple[str, str], work: Callable[[], None]) -> None:
        if key in self._tasks or time.monotonic() < self._retry_at.get(key, 0.0):
            return

        def run() -> None:
            try:
                work()
            except RetrieveError as exc:
                self._retry_at[key] = time.monotonic() + PLAN_RETRY_SECONDS / 3
                log.warning("migration step failed; retrying later", extra={
                    "migration": key[0], "step": work.__name__, "error_kind": exc.kind.value})
            except Exception:
                self._retry_at[key] = time.monotonic() + PLAN_RETRY_SECONDS
                log.exception("migration step crashed", extra={"migration": key[0]})

        self._tasks[key] = self._pool.submit(run)

    def _tick_one(self, mig_id: str, now: datetime) -> None:
        fields = self.store.fields(mig_id)
        request = MigrationRequest.model_validate_json(fields["request"])
        if fields.get("cancel") == "1":
            self._cancel(mig_id)
            return
        paused = fields.get("paused") == "1"
        plan_done = fields.get("plan_done") == "1"
        inflight = self.store.inflight(mig_id)
        self._follow(mig_id, request, inflight)
        closed = self.gate.window_wait(request.source, now)
        if not plan_done and not paused and closed is None:
            self._plan(mig_id)
        pace = Pace.from_fields(fields, request.max_in_flight)
        closes = self.gate.schedule(request.source).closes_at(now)
        closing = closes is not None and (closes - now).total_seconds() < CLOSING_MARGIN
        capped = now.timestamp() < float(fields.get("rate_next") or 0)
        if not paused and closed is None and not closing and not capped \
                and not pace.backing_off(now.timestamp()):
            for uid in self.store.take(mig_id, pace.limit):
                self._submit((mig_id, uid), self._checker(mig_id, request, uid))
        self._report(mig_id, fields, request, closed, plan_done, inflight)

    def _follow(self, mig_id: str, request: MigrationRequest, inflight: dict[str, str]) -> None:
        """Start what each study in flight waits for: its check, or its verification once
        its job is final (after a restart too, as the in-flight set is in Redis)."""
        for uid, value in inflight.items():
            if value == CHECK:
                self._submit((mig_id, uid), self._checker(mig_id, request, uid))
            elif value == VERIFY:
                self._submit((mig_id, uid), self._verifier(mig_id, request, uid))
            else:
                try:
                    job = self.jobs.get(value)
                except JobNotFound:
                    job = None
                if job is None or job.status.is_final:
                    self.store.client.hset(self.store.key(mig_id, "inflight"), uid, VERIFY)
                    self._submit((mig_id, uid), self._verifier(mig_id, request, uid))
                else:
                    self._revive(job.id, job.status, job.request.priority)

    def _revive(self, job_id: str, status: JobStatus, priority: int) -> None:
        """Queue again a running job nobody runs any more (its worker was killed: Celery
        would redeliver its message only after the broker's visibility timeout, an hour by
        default). A second message for a job is harmless: the task leaves a job that is
        leased or final alone."""
        if status is not JobStatus.RUNNING or self.jobs.lease_holder(job_id) is not None:
            self._orphaned.pop(job_id, None)
            return
        now = time.monotonic()
        since = self._orphaned.setdefault(job_id, now)
        if now - since >= 2 * self.config.worker.lease_seconds:
            log.warning("re-queueing a study job whose worker vanished", extra={"job_id": job_id})
            enqueue_retrieves(self.celery, [(job_id, priority)])
            self._orphaned.pop(job_id, None)

    def _plan(self, mig_id: str) -> None:
        key = (mig_id, "")
        if key in self._tasks or time.monotonic() < self._plan_retry_at.get(mig_id, 0.0):
            return

        def planning() -> None:
            try:
                run_planning(self.config, self.store, self.gate, mig_id, self._stop)
                self._plan_failures.pop(mig_id, None)
            except RetrieveError as exc:
                failures = self._plan_failures.get(mig_id, 0) + 1
                self._plan_failures[mig_id] = failures
                self._plan_retry_at[mig_id] = time.monotonic() + PLAN_RETRY_SECONDS
                self.store.set_fields(mig_id, error=f"planning: {exc.message}")
                if failures >= PLAN_ATTEMPTS:
                    self.store.finish_planning(
                        mig_id, f"planning gave up after {failures} attempts: {exc.message}")
                raise

        self._submit(key, planning)

    # one study --------------------------------------------------------------------------
    def _checker(self, mig_id: str, request: MigrationRequest, uid: str) -> Callable[[], None]:
        def check() -> None:
            self._check(mig_id, request, uid)
        return check

    def _verifier(self, mig_id: str, request: MigrationRequest, uid: str) -> Callable[[], None]:
        def verify() -> None:
            self._verify(mig_id, request, uid)
        return verify

    def _held(self, request: MigrationRequest, uid: str) -> list[frozenset[str] | None]:
        held = []
        for name in request.stores:
            try:
                held.append(study_inventory(self.config, name, uid, self.registry))
            except RetrieveError as exc:
                log.warning("store inventory failed", extra={"store": name,
                                                             "error_kind": exc.kind.value})
                held.append(None)
        return held

    def source_instances(self, request: MigrationRequest, uid: str) -> frozenset[str] | None:
        """The study's SOP Instance UIDs at the source, by C-FIND on a bulk slot (so it
        waits for the source's window and leaves the reserved slots alone)."""
        with self.gate.acquire(request.source, bulk=True,
                               cancelled=self._stop.is_set):
            return find_study_instances(self.config.sources[request.source], uid,
                                        request.source)

    def _check(self, mig_id: str, request: MigrationRequest, uid: str) -> None:
        row = self.store.study(mig_id, uid)
        if row is None or row.state.is_done:
            self.store.client.hdel(self.store.key(mig_id, "inflight"), uid)
            return
        expected = row.instances_source or 0
        held = self._held(request, uid)
        sop_uids: list[str] = []
        if any(held):
            if expected and all(h is not None and len(h) >= expected for h in held):
                return self._skip(mig_id, row, min(len(h or ()) for h in held))
            source = self.source_instances(request, uid)
            if source is not None:
                missing: set[str] = set()
                for h in held:
                    missing |= source - (h or frozenset())
                if not missing:
                    return self._skip(mig_id, row, len(source))
                if len(missing) < len(source) and len(missing) <= MAX_SOP_UIDS_PER_JOB:
                    sop_uids = sorted(missing)
        job = JobRequest(source=request.source, study_uid=uid, stores=request.stores,
                         level=Level.IMAGE if sop_uids else Level.STUDY, sop_uids=sop_uids,
                         transport=request.transport, priority=request.priority)
        created_by = self.store.client.hget(self.store.key(mig_id), "created_by") or None
        joined = self.jobs.create_or_join(job, origin="migration", created_by=created_by)
        if not joined.joined or joined.requeue:
            enqueue_retrieves(self.celery, [(joined.record.id, joined.record.request.priority)])
        running = StudyRow(uid, StudyState.RUNNING, row.study_date, row.instances_source,
                           None, joined.record.id)
        self.store.set_study(mig_id, running, inflight=joined.record.id)

    def _skip(self, mig_id: str, row: StudyRow, held: int) -> None:
        done = StudyRow(row.study_uid, StudyState.SKIPPED, row.study_date, row.instances_source,
                        held)
        self.store.set_study(mig_id, done, done_instances=row.instances_source or 0)

    def _verify(self, mig_id: str, request: MigrationRequest, uid: str) -> None:
        row = self.store.study(mig_id, uid)
        if row is None or row.state.is_done:
            self.store.client.hdel(self.store.key(mig_id, "inflight"), uid)
            return
        try:
            job = self.jobs.get(row.job_id)
        except JobNotFound:
            job = None
        if job is not None and job.error_kind == ErrorKind.PEER_BUSY.value:
            return self._push_back(mig_id, row, job.error or "")
        source = self.source_instances(request, uid)
        missing = (missing_from(self.config, request.stores, uid, source, self.registry)
                   if source is not None else None)
        moved = job.progress.completed if job else 0
        moved_bytes = job.progress.bytes if job else 0
        done_count = row.instances_source or (len(source) if source else 0)
        job_error = (job.error or "") if job else f"job {row.job_id} vanished"
        if missing is None:
            # Source or destination could not list the study: the job's word is all there is.
            ok = job is not None and job.status is JobStatus.SUCCEEDED
            state = StudyState.VERIFIED if ok else StudyState.FAILED
            error = "" if ok else job_error
            if ok:
                error = "verified by the job's own record (a store or the source cannot list)"
            dst = moved if ok else None
        elif not missing:
            state, error, dst = StudyState.VERIFIED, "", len(source or ())
        else:
            failed = job is None or job.status in (JobStatus.FAILED, JobStatus.CANCELLED)
            state = StudyState.FAILED if failed else StudyState.MISMATCH
            error = job_error if failed else \
                f"{len(missing)} instance(s) missing at the destination after the job"
            dst = len(source or ()) - len(missing)
            self.store.record_missing(mig_id, uid, sorted(missing))
        final = StudyRow(uid, state, row.study_date, row.instances_source, dst, row.job_id,
                         error)
        self.store.set_study(mig_id, final, moved=moved, moved_bytes=moved_bytes,
                             done_instances=done_count)
        self.moved(mig_id, request, moved_bytes)
        if state is StudyState.VERIFIED:
            Pace.recovered(self.store, mig_id, request.max_in_flight)

    def moved(self, mig_id: str, request: MigrationRequest, nbytes: int,
              now: float | None = None) -> None:
        """Account a study's bytes against the source's rate cap (see :func:`next_feed_at`)."""
        cap = self.config.sources[request.source].max_mb_per_second
        if cap and nbytes > 0:
            previous = float(self.store.fields(mig_id).get("rate_next") or 0)
            self.store.set_fields(mig_id, rate_next=next_feed_at(
                previous, time.time() if now is None else now, nbytes, cap))

    def _push_back(self, mig_id: str, row: StudyRow, error: str) -> None:
        """The source said "busy": the study goes back to the front of the queue, and the
        migration slows down (fewer studies in flight, a pause before the next)."""
        again = StudyRow(row.study_uid, StudyState.PLANNED, row.study_date, row.instances_source)
        self.store.set_study(mig_id, again, requeue=1)
        Pace.pushed_back(self.store, mig_id, error)

    # the migration as a whole -----------------------------------------------------------
    def _cancel(self, mig_id: str) -> None:
        for uid, value in self.store.inflight(mig_id).items():
            if value not in (CHECK, VERIFY):
                try:
                    self.jobs.request_cancel(value)
                except JobNotFound:
                    pass
            self._tasks.pop((mig_id, uid), None)
        self.store.finish(mig_id, MigrationStatus.CANCELLED)
        log.info("migration cancelled", extra={"migration": mig_id})

    def _report(self, mig_id: str, fields: dict[str, str], request: MigrationRequest,
                closed: object, plan_done: bool, inflight: dict[str, str]) -> None:
        record = self.store.get(mig_id)
        counts = record.studies
        if plan_done and not inflight and self.store.queued(mig_id) == 0 \
                and not self._working_on(mig_id):
            if counts.failed + counts.mismatched == 0 and not (record.error and not counts.planned):
                status = MigrationStatus.SUCCEEDED
            elif counts.verified + counts.skipped > 0:
                status = MigrationStatus.PARTIAL
            else:
                status = MigrationStatus.FAILED
            self.store.finish(mig_id, status)
            log.info("migration finished", extra={
                "migration": mig_id, "status": status.value, "studies": counts.planned})
            return
        waiting_until = getattr(closed, "until", None)
        status = (MigrationStatus.WAITING_WINDOW if closed is not None
                  else MigrationStatus.RUNNING if plan_done else MigrationStatus.PLANNING)
        updates: dict[str, str | int | float | None] = {
            "status": status.value,
            "waiting_until": waiting_until.isoformat() if isinstance(waiting_until, datetime)
            else None}
        now = time.time()
        since = float(fields.get("rate_ts") or 0)
        if now - since >= RATE_SECONDS:
            if since:
                span = now - since
                ips = (record.instances_moved - int(fields.get("rate_inst") or 0)) / span
                bps = (record.bytes_moved - int(fields.get("rate_bytes") or 0)) / span
                done_rate = (record.instances_done - int(fields.get("rate_done") or 0)) / span
                remaining = max(record.instances_planned - record.instances_done, 0)
                updates.update(rate_ips=round(ips, 2), rate_bps=round(bps),
                               eta=round(remaining / done_rate) if done_rate > 0 else None)
            updates.update(rate_ts=now, rate_inst=record.instances_moved,
                           rate_bytes=record.bytes_moved, rate_done=record.instances_done)
        self.store.set_fields(mig_id, **updates)

    def _working_on(self, mig_id: str) -> bool:
        return any(key[0] == mig_id and not f.done() for key, f in self._tasks.items())


def next_feed_at(previous: float, now: float, nbytes: int, mb_per_second: float) -> float:
    """When the next study may be fed after one that moved *nbytes*: a virtual clock that
    advances by the time *nbytes* take at the cap (GCRA, with a burst of one study). A study
    that already took that long adds no wait; studies that ran in parallel add up."""
    cost = nbytes / (mb_per_second * 1_000_000)
    return max(previous, now - cost) + cost


def migration_duty(config: Config) -> Duty:
    """The scheduler duty that runs every active migration."""
    feeder = MigrationFeeder(config)
    return Duty("migrations", INTERVAL, feeder.tick)
