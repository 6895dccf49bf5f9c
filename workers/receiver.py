"""``pacsfetch receiver``: the storage SCP every C-MOVE of every worker delivers to.

It runs as a process of its own (one Deployment behind a Service with a stable port), so
the PACS is configured with one move destination however many workers there are. Each
incoming C-STORE is matched to a running job through the move expectations workers
register in Redis (:mod:`pacsfetch.moves`): by Move Originator AE Title and Message ID
where the PACS sends them, else by the UIDs the job asked for. Matched instances go through
the job's own :class:`~pacsfetch.workers.pipeline.InstancePipeline` (scope, dedupe,
validation, stage and commit in the job's stores, batched records), one pipeline per job
and association; instances no running job claims are refused, never written.
"""

from __future__ import annotations

import logging
import socketserver
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from pacsfetch.config import Config
from pacsfetch.metrics import INSTANCE_FAILURES
from pacsfetch.models import Level, Progress
from pacsfetch.moves import MoveBook, MoveExpectation
from pacsfetch.plugins.contracts import InstanceIdentity, StoreSession
from pacsfetch.plugins.dicomfile import UnreadableInstance, read_identity
from pacsfetch.plugins.dimse.legacy import STORE_STATUS
from pacsfetch.plugins.dulpace import pace
from pacsfetch.plugins.registry import Registry
from pacsfetch.workers import lifecycle
from pacsfetch.workers.moves import MIN_EXPECTATION_TTL
from pacsfetch.workers.pipeline import InstancePipeline

log = logging.getLogger(__name__)

# Stream each incoming C-STORE data set to a spool file instead of memory.
_config.STORE_RECV_CHUNKED_DATASET = True

EXPECTATION_CACHE_SECONDS = 1.0
"""How long the receiver trusts its copy of the move expectations; a C-STORE that matches
none of them re-reads them at once, so a job registered a moment ago is never refused."""

NO_JOB_STATUS = 0x0124
"""Refused: Not Authorised -- the instance belongs to no running job."""


class _MoveJobState:
    """The :class:`~pacsfetch.workers.state.JobState` of a job as the receiver sees it.

    Records go to the move expectation (which the worker counts) and, for jobs of the job
    store, to the job's record of stored instances (which a retried attempt skips); the
    job's progress belongs to the worker, which adopts these records.
    """

    def __init__(self, book: MoveBook, expectation: MoveExpectation) -> None:
        self._book = book
        self._expectation = expectation
        self._recorded_bytes = 0

    def stored_instances(self) -> dict[str, str]:
        if self._expectation.persisted:
            return self._book.jobs.stored_instances(self._expectation.job_id)
        return dict(self._book.received_since(self._expectation.job_id, 0)[0])

    def previous_progress(self) -> Progress:
        return Progress()

    def transport_started(self, name: str) -> None:
        """The worker that sent the C-MOVE already recorded the transport."""

    def record(self, locations: Mapping[str, str], progress: Progress) -> None:
        nbytes = progress.bytes - self._recorded_bytes
        if not locations and not nbytes:
            return
        self._recorded_bytes = progress.bytes
        if not self._book.record_received(self._expectation, locations, nbytes,
                                          MIN_EXPECTATION_TTL):
            log.warning("stored instances for a job that stopped waiting for them",
                        extra={"job_id": self._expectation.job_id, "instances": len(locations)})

    def cancel_requested(self) -> bool:
        return False


class _Expectations:
    """A briefly cached view of the move expectations, and the matching of instances."""

    def __init__(self, book: MoveBook) -> None:
        self._book = book
        self._lock = threading.Lock()
        self._items: list[MoveExpectation] = []
        self._read_at = float("-inf")

    def _refresh(self, force: bool) -> list[MoveExpectation]:
        with self._lock:
            if force or time.monotonic() - self._read_at > EXPECTATION_CACHE_SECONDS:
                self._items = self._book.active()
                self._read_at = time.monotonic()
            return self._items

    def still_active(self, job_id: str) -> bool:
        """Re-read the expectations: is *job_id* still waiting? (once per association and job)"""
        return any(item.job_id == job_id for item in self._refresh(force=True))

    def match(self, originator_ae: str | None, message_id: int | None,
              identity: InstanceIdentity) -> MoveExpectation | None:
        for force in (False, True):
            found = _match(self._refresh(force), originator_ae, message_id, identity)
            if found is not None:
                return found
        return None


def _match(items: list[MoveExpectation], originator_ae: str | None, message_id: int | None,
           identity: InstanceIdentity) -> MoveExpectation | None:
    """By Move Originator AE Title and Message ID when given, else by the job's UIDs.

    A PACS that sends an originator AE title with a message ID of its own (not ours) is
    still matched by UIDs, among the jobs of that originator.
    """
    if originator_ae:
        items = [item for item in items if item.originator_ae == originator_ae]
        for item in items:
            if message_id in item.message_ids:
                return item
    for item in items:
        request = item.request
        if identity.study_uid != request.study_uid:
            continue
        if request.series_uid and identity.series_uid != request.series_uid:
            continue
        if request.level is Level.IMAGE and identity.sop_instance_uid not in request.sop_uids:
            continue
        return item
    return None


@dataclass
class _AssociationJobs:
    """The pipelines (one per job) of one incoming association."""

    pipelines: dict[str, InstancePipeline] = field(default_factory=dict)
    sessions: list[StoreSession] = field(default_factory=list)


@dataclass
class ReceiverStats:
    """What the receiver did, since it started.

    The one place to read from for metrics: ``[metrics] receiver_port`` exposes these.
    """

    associations: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    no_job: int = 0


class MoveReceiver:
    """The storage SCP; :meth:`start` serves in background threads, :meth:`stop` ends it."""

    def __init__(self, config: Config, registry: Registry, store_settings: dict[str, BaseModel],
                 book: MoveBook) -> None:
        self.config = config
        self.registry = registry
        self.store_settings = store_settings
        self.book = book
        self.stats = ReceiverStats()
        self._expectations = _Expectations(book)
        self._associations: dict[int, _AssociationJobs] = {}
        self._lock = threading.Lock()
        self._spool = tempfile.TemporaryDirectory(prefix="pacsfetch-receiver-")
        self._server: ThreadedAssociationServer | None = None
        self._previous_tempdir: str | None = None

    def _ae(self) -> AE:
        settings = self.config.receiver
        ae = AE(ae_title=settings.ae_title)
        # The PACS calls us by the move destination it knows; which name does not matter.
        ae.require_called_aet = False
        if settings.accept_from:
            ae.require_calling_aet = list(settings.accept_from)
        ae.maximum_associations = 64
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        settings = self.config.receiver
        # pynetdicom spools each data set with tempfile: keep the spool ours.
        self._previous_tempdir, tempfile.tempdir = tempfile.tempdir, self._spool.name
        self._server = self._ae().start_server(
            (settings.bind, settings.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_c_store),
                          (evt.EVT_CONN_OPEN, self._on_open),
                          (evt.EVT_ACCEPTED, self._on_accepted),
                          (evt.EVT_CONN_CLOSE, self._on_close)],
        )
        log.info("receiver listening", extra={
            "ae_title": settings.ae_title, "bind": settings.bind, "port": settings.port,
            "accept_from": list(settings.accept_from)})

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            tempfile.tempdir = self._previous_tempdir
        self._spool.cleanup()

    def serve_forever(self) -> None:
        """Serve until SIGTERM or Ctrl-C, then drain (see :mod:`pacsfetch.workers.lifecycle`)."""
        self.start()
        server = self._server
        assert server is not None
        try:
            lifecycle.serve_until_drained(
                stop_accepting=lambda: (socketserver.BaseServer.shutdown(server),
                                        server.server_close()),
                busy=lambda: len(server.active_associations),
                abort_all=lambda: [assoc.abort() for assoc in server.active_associations],
                alive=lambda: server.socket.fileno() != -1,
                drain_seconds=self.config.worker.drain_seconds)
        finally:
            self.stop()

    # events -------------------------------------------------------------------
    def _on_open(self, event: evt.Event) -> None:
        with self._lock:
            self._associations[id(event.assoc)] = _AssociationJobs()
            self.stats.associations += 1

    def _on_accepted(self, event: evt.Event) -> None:
        # Most PACS send with Nagle's algorithm on: without prompt ACKs (and a DUL thread
        # that blocks instead of polling) every instance would wait ~40 ms for our ACK.
        pace(event.assoc)

    def _on_close(self, event: evt.Event) -> None:
        with self._lock:
            jobs = self._associations.pop(id(event.assoc), None)
        if jobs is None:
            return
        for job_id, pipeline in jobs.pipelines.items():
            try:
                pipeline.flush()
            except Exception:
                log.exception("could not record a job's instances", extra={"job_id": job_id})
        for session in jobs.sessions:
            session.close()

    def _on_c_store(self, event: evt.Event) -> int:
        request = event.request
        path = Path(event.dataset_path)
        spool_handle = getattr(request, "_dataset_file", None)
        if spool_handle is not None:
            spool_handle.close()
        try:
            pipeline = self._pipeline_for(event.assoc, request, path)
        except Exception:
            path.unlink(missing_ok=True)
            raise
        if pipeline is None:
            path.unlink(missing_ok=True)
            self.stats.no_job += 1
            INSTANCE_FAILURES.labels(reason="no-job", transport="c-move", source="none").inc()
            return NO_JOB_STATUS
        verdict = pipeline.accept(path, sop_class_uid=str(request.AffectedSOPClassUID),
                                  sop_instance_uid=str(request.AffectedSOPInstanceUID))
        self.stats.verdicts[verdict.value] = self.stats.verdicts.get(verdict.value, 0) + 1
        return STORE_STATUS[verdict]

    def _pipeline_for(self, assoc: Association, request: object,
                      path: Path) -> InstancePipeline | None:
        originator = str(getattr(request, "MoveOriginatorApplicationEntityTitle", "") or "").strip()
        message_id = getattr(request, "MoveOriginatorMessageID", None)
        try:
            identity = read_identity(path)
        except UnreadableInstance:
            identity = None
        if identity is None:
            expectation = None
        else:
            expectation = self._expectations.match(originator or None, message_id, identity)
        if expectation is None:
            log.warning("refused an instance that belongs to no running job", extra={
                "calling_ae": assoc.requestor.ae_title, "by_originator": bool(originator)})
            return None
        if expectation.request.store not in self.store_settings:
            log.error("refused an instance for a store this receiver's config lacks: give the "
                      "receiver the workers' configuration", extra={
                          "job_id": expectation.job_id, "store": expectation.request.store})
            return None
        with self._lock:
            jobs = self._associations.setdefault(id(assoc), _AssociationJobs())
        pipeline = jobs.pipelines.get(expectation.job_id)
        if pipeline is None:
            if not self._expectations.still_active(expectation.job_id):
                log.warning("refused an instance for a job that stopped waiting",
                            extra={"job_id": expectation.job_id})
                return None
            pipeline = self._open_pipeline(expectation, jobs)
        return pipeline

    def _open_pipeline(self, expectation: MoveExpectation, jobs: _AssociationJobs) -> InstancePipeline:
        store = expectation.request.store
        backend = self.registry.store_backends[self.config.stores[store].plugin]
        session = backend.open(store, self.store_settings[store], expectation.job_id)
        jobs.sessions.append(session)
        pipeline = InstancePipeline(
            expectation.job_id, expectation.request, {store: session},
            _MoveJobState(self.book, expectation), self.registry.hooks.hook,
            Path(self._spool.name), self.config.worker.progress_interval,
        )
        pipeline.use_transport("c-move")
        jobs.pipelines[expectation.job_id] = pipeline
        log.info("receiving for a job", extra={"job_id": expectation.job_id, "store": store})
        return pipeline
