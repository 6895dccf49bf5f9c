"""One attempt at one job: choose transports, open stores, retrieve, decide the outcome.

Shared by the Celery task and by ``pacsfetch retrieve`` (inline, no broker), so both run
exactly the same transport and store plugins.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from pacsfetch.config import Config
from pacsfetch.errors import ErrorKind, RetrieveError, no_space_left
from pacsfetch.gate import AssociationGate, JobGate, process_gate
from pacsfetch.models import JobRequest, JobStatus, Progress, TransportNote
from pacsfetch.moves import MoveBook
from pacsfetch.plugins.contracts import RetrieveContext, RetrieveResult, StoreSession, Transport
from pacsfetch.plugins.registry import Registry
from pacsfetch.redisconn import outage_client
from pacsfetch.workers.moves import RedisMoveTracker
from pacsfetch.workers.pipeline import InstancePipeline
from pacsfetch.workers.state import JobState

log = logging.getLogger(__name__)

FALLBACK_KINDS = frozenset(
    {ErrorKind.NEGOTIATION, ErrorKind.ASSOCIATION_REJECTED, ErrorKind.PEER_STATUS,
     ErrorKind.TRANSFER_SYNTAX, ErrorKind.MOVE_DESTINATION, ErrorKind.AUTH}
)
"""Failures another transport may not suffer from: with ``auto``, try the next one (C-GET
refused -> C-MOVE; move destination unknown -> DICOMweb; gateway credentials -> DIMSE).
A transport that raised one, or returned with instances missing for one, gives way; the
next starts from what the job has stored so far."""


@dataclass(frozen=True)
class Outcome:
    status: JobStatus
    progress: Progress
    transport: str | None = None
    error: str | None = None
    error_kind: str | None = None
    transport_notes: tuple[TransportNote, ...] = ()
    retry: bool = False
    """A retry (resuming from what is stored) may succeed: the task retries while the job's
    retries allow, and ends with this outcome when they are spent."""


class JobRunner:
    """Runs jobs with the plugins of one registry against one configuration."""

    def __init__(self, config: Config, registry: Registry, store_settings: dict[str, BaseModel],
                 gate: AssociationGate | None = None) -> None:
        self.config = config
        self.registry = registry
        self.store_settings = store_settings
        # Connects on first use (C-MOVE); rides out a Redis restart like the job's state.
        self.moves = MoveBook(outage_client(config.broker.url, config.worker.redis_outage_seconds))
        self.gate = gate or process_gate(config)

    def _transports(self, request: JobRequest) -> list[Transport]:
        source = self.config.sources[request.source]
        names = list(source.transports) if request.transport == "auto" else [request.transport]
        missing = [n for n in names if n not in self.registry.transports]
        if missing:
            raise RetrieveError(ErrorKind.CONFIG, f"no transport plugin named {missing[0]!r} is installed")
        return [self.registry.transports[n] for n in names]

    def run(self, job_id: str, request: JobRequest, state: JobState, *,
            bulk: bool = False) -> Outcome:
        """Run one attempt; raises :class:`RetrieveError` only for retryable failures.

        *bulk* work (a migration's) yields to other work at its source and keeps to the
        source's time windows (see :mod:`pacsfetch.gate`)."""
        if request.source not in self.config.sources:
            return self._config_failure(f"unknown source {request.source!r}")
        unknown = [name for name in request.store_names if name not in self.config.stores]
        if unknown:
            return self._config_failure(f"unknown store {unknown[0]!r}")
        try:
            transports = self._transports(request)
        except RetrieveError as exc:
            return self._config_failure(exc.message)
        with ExitStack() as stack:
            try:
                sessions = self._open_stores(job_id, request, stack)
            except RetrieveError as exc:
                if exc.retryable:
                    raise
                return Outcome(JobStatus.FAILED, Progress(), None, exc.message, exc.kind.value)
            spool_owner = next((name for name, s in sessions.items() if s.spool_dir), None)
            spool = sessions[spool_owner].spool_dir if spool_owner else None
            spool = spool or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            pipeline = InstancePipeline(
                job_id, request, sessions, state, self.registry.hooks.hook,
                spool, self.config.worker.progress_interval,
            )
            notes: list[TransportNote] = []
            error: RetrieveError | None = None
            try:
                gate = JobGate(self.gate, request.source, bulk=bulk, on_wait=state.waiting,
                               cancelled=pipeline.cancelled)
                result, used = self._try_transports(job_id, request, transports, pipeline, notes,
                                                    gate)
            except RetrieveError as exc:
                error = exc
            except OSError as exc:  # spooling on the store's file system failed
                if spool_owner is None or not no_space_left(exc):
                    raise
                pipeline.store_failed(spool_owner, exc)
            finally:
                pipeline.flush()
            if pipeline.failed_stores and (error is not None or pipeline.full_stores):
                # The transport stopped because our own store failed (the PACS aborted
                # after failed C-STOREs, the spool could not be written): that is the reason.
                return self._store_failure(pipeline, notes)
            if error is not None:
                if error.retryable:
                    raise error
                return Outcome(JobStatus.FAILED, pipeline.progress, None, error.message,
                               error.kind.value, tuple(notes))
            return self._decide(result, used, notes, pipeline)

    def _open_stores(self, job_id: str, request: JobRequest, stack: ExitStack) -> dict[str, StoreSession]:
        """A session in every store of the job, each closed when the attempt ends.

        A store that cannot be opened (bucket missing, credentials refused, root not
        writable) fails the job before the PACS is asked for anything, naming the store.
        """
        sessions: dict[str, StoreSession] = {}
        for name in request.store_names:
            backend = self.registry.store_backends[self.config.stores[name].plugin]
            try:
                session = backend.open(name, self.store_settings[name], job_id)
            except RetrieveError as exc:
                raise RetrieveError(exc.kind, f"store {name!r}: {exc.message}") from None
            except Exception as exc:  # a plugin's own error types: still the store's fault
                raise RetrieveError(ErrorKind.STORE, f"store {name!r} could not be opened: "
                                    f"{type(exc).__name__}: {exc}") from None
            stack.callback(self._close_store, job_id, name, session)
            sessions[name] = session
        return sessions

    @staticmethod
    def _close_store(job_id: str, name: str, session: StoreSession) -> None:
        """Close a session; a failure here is logged only: what the job recorded was made
        durable by the pipeline's last flush, and the job's outcome already says why not."""
        try:
            session.close()
        except Exception as exc:
            log.warning("store could not be closed cleanly", extra={
                "job_id": job_id, "store": name, "reason": f"{type(exc).__name__}: {exc}"})

    def _try_transports(
        self, job_id: str, request: JobRequest, transports: list[Transport],
        pipeline: InstancePipeline, notes: list[TransportNote], gate: JobGate,
    ) -> tuple[RetrieveResult, str]:
        """Run the transports in order until one does the job; *notes* collects why not."""
        source = self.config.sources[request.source]
        for position, transport in enumerate(transports):
            may_fall_back = request.transport == "auto" and position < len(transports) - 1
            ctx = RetrieveContext(
                job_id=job_id, request=request, source_name=request.source, source=source,
                sink=pipeline, progress=pipeline, already_stored=frozenset(pipeline.stored),
                moves=RedisMoveTracker(self.moves, job_id, request, pipeline, source.timeout,
                                       self.config.worker.progress_interval),
                gate=gate,
            )
            pipeline.use_transport(transport.name)
            try:
                result = transport.retrieve(ctx)
            except RetrieveError as exc:
                if not may_fall_back or exc.kind not in FALLBACK_KINDS:
                    if notes:
                        exc.message = "; ".join(
                            [*(f"{n.transport}: {n.error}" for n in notes),
                             f"{transport.name}: {exc.message}"])
                    raise
                note = TransportNote(transport=transport.name, error_kind=exc.kind.value,
                                     error=exc.message)
            else:
                if not (may_fall_back and self._gave_up(result, pipeline)):
                    return result, transport.name
                note = TransportNote(transport=transport.name,
                                     error_kind=result.problem_kind or ErrorKind.PEER_STATUS.value,
                                     error="; ".join(result.problems))
            notes.append(note)
            log.warning("transport gave way, trying the next", extra={
                "job_id": job_id, "transport": transport.name, "error_kind": note.error_kind,
                "reason": note.error, "stored": len(pipeline.stored)})
        raise AssertionError("unreachable: the last transport returns or re-raises")

    @staticmethod
    def _gave_up(result: RetrieveResult, pipeline: InstancePipeline) -> bool:
        """Instances are missing for a reason another transport may not share."""
        if result.cancelled or result.problem_kind not in FALLBACK_KINDS:
            return False
        return result.expected is None or not result.expected <= set(pipeline.stored)

    def _decide(
        self, result: RetrieveResult, used: str, notes: list[TransportNote],
        pipeline: InstancePipeline,
    ) -> Outcome:
        progress = pipeline.progress
        problems = [text for _, text in pipeline.problems()] + result.problems
        # When our own store refused instances, the PACS's failure counts are a consequence.
        kind = (ErrorKind.STORE.value if pipeline.failed_stores else result.problem_kind) or next(
            (k.value for k, _ in pipeline.problems()), None)
        if result.cancelled:
            return Outcome(JobStatus.CANCELLED, progress, used, "cancelled by request",
                           "cancelled", tuple(notes))
        stored = set(pipeline.stored)
        expected = result.expected if result.expected is not None else stored
        missing = expected - stored
        explained_failures = pipeline.refused + pipeline.invalid  # extras we refused ourselves
        if not missing and result.peer_failed <= explained_failures and not pipeline.failed_stores:
            return Outcome(JobStatus.SUCCEEDED, progress, used, transport_notes=tuple(notes))
        summary = f"{len(missing)} of {len(expected)} instance(s) not stored"
        earlier = [f"{n.transport}: {n.error}" for n in notes]
        text = "; ".join([summary, *earlier, *problems]) if problems or notes else (
            summary + ": the PACS did not send them")
        status = JobStatus.PARTIAL if stored & expected else JobStatus.FAILED
        # A store failing for any reason but a full disk may pass, like a connection failure;
        # a transport says when the PACS stopped part-way for a reason that may pass.
        retry = (bool(pipeline.failed_stores) or result.retry) and not pipeline.full_stores
        return Outcome(status, progress, used, text, kind or ErrorKind.PEER_STATUS.value,
                       tuple(notes), retry=retry)

    @staticmethod
    def _store_failure(pipeline: InstancePipeline, notes: list[TransportNote]) -> Outcome:
        """The attempt ended because a store failed: partial when some instances are
        stored. A full disk waits for an operator to free space; any other store failure
        is retried like a connection failure."""
        stored = len(pipeline.stored)
        text = "; ".join(t for k, t in pipeline.problems() if k is ErrorKind.STORE)
        return Outcome(JobStatus.PARTIAL if stored else JobStatus.FAILED, pipeline.progress,
                       None, text, ErrorKind.STORE.value, tuple(notes),
                       retry=not pipeline.full_stores)

    @staticmethod
    def _config_failure(message: str) -> Outcome:
        return Outcome(JobStatus.FAILED, Progress(), None, message, ErrorKind.CONFIG.value)
