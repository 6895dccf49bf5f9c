"""``pacsfetch receiver``: the storage SCP every C-MOVE of every worker delivers to.

It runs as a process of its own (one Deployment behind a Service with a stable port), so
the PACS is configured with one move destination however many workers there are. Each
incoming C-STORE is matched to a running job through the move expectations workers
register in Redis (:mod:`pacsfetch.moves`): by Move Originator AE Title and Message ID
where the PACS sends them, else by the UIDs the job asked for. Matched instances go through
the job's own :class:`~pacsfetch.workers.pipeline.InstancePipeline` (scope, dedupe,
validation, stage and commit in the job's stores, batched records), one pipeline per job
and association; instances no running job claims are refused, never written.

The server runs on the project's DIMSE engine (:mod:`pacsfetch.plugins.dimse`): one
thread blocks in ``accept``, and each admitted connection gets a thread of its own that
owns the association from the A-ASSOCIATE-RQ to the close. Data sets go fragment by
fragment from the socket into a spool file
(:func:`~pacsfetch.plugins.dimse.services.receive_store`), as for C-GET. Timeouts are
deadlines on the blocking reads: ARTIM for a peer that connects and says nothing,
``[receiver] idle_timeout`` for one that sends no data sets. With ``[receiver.tls]`` every
accepted connection is wrapped in TLS before any DICOM is read.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydicom._uid_dict import UID_dictionary
from pydicom.uid import AllTransferSyntaxes

from pacsfetch.config import Config, ConfigError
from pacsfetch.metrics import INSTANCE_FAILURES
from pacsfetch.models import Level, Progress
from pacsfetch.moves import MoveBook, MoveExpectation, Plan
from pacsfetch.plugins.contracts import InstanceIdentity, StoreSession
from pacsfetch.plugins.dicomfile import UnreadableInstance, read_identity
from pacsfetch.plugins.dimse import messages as m
from pacsfetch.plugins.dimse import pdu
from pacsfetch.plugins.dimse.association import (
    Association,
    DimseError,
    PeerReleased,
    PeerTimeout,
)
from pacsfetch.plugins.dimse.services import (
    QUERY_SYNTAXES,
    STORE_STATUS,
    VERIFICATION,
    Spool,
    StoreHandler,
    discard,
    receive_store,
)
from pacsfetch.plugins.dimse.tls import server_context
from pacsfetch.plugins.registry import Registry
from pacsfetch.workers import lifecycle
from pacsfetch.workers.moves import MIN_EXPECTATION_TTL
from pacsfetch.workers.pipeline import InstancePipeline
from pacsfetch.workers.receiver_policy import ReceiverPolicy, Refusal, count_refusal

log = logging.getLogger(__name__)

EXPECTATION_CACHE_SECONDS = 1.0
"""How long the receiver trusts its copy of the move expectations; a C-STORE that matches
none of them re-reads them at once, so a job registered a moment ago is never refused."""

NO_JOB_STATUS = 0x0124
"""Refused: Not Authorised -- the instance belongs to no running job."""
UNRECOGNISED_OPERATION = 0x0211

ARTIM_SECONDS = 10.0
"""How long a new connection may take to send its A-ASSOCIATE-RQ (and finish the TLS
handshake): a peer that connects and says nothing holds a slot no longer than this."""
MAX_RECEIVE_PDU = pdu.RECEIVE_UNLIMITED
"""The maximum PDU length the receiver announces."""
LISTEN_BACKLOG = 128

STORAGE_CLASSES = frozenset(
    uid for uid, entry in UID_dictionary.items()
    if entry[1] == "SOP Class" and entry[4].endswith("Storage")
)
"""Every storage SOP class of the standard (pydicom's UID dictionary): what we accept."""
TRANSFER_SYNTAXES = frozenset(AllTransferSyntaxes)
"""Transfer syntaxes pydicom can read headers of; instances are stored as they arrive."""


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

    def current(self) -> list[MoveExpectation]:
        """The expectations as last read (no Redis round trip)."""
        return list(self._items)

    def match(self, originator_ae: str | None, message_id: int | None,
              identity: InstanceIdentity, fresh: bool = False) -> MoveExpectation | None:
        """The job that claims the instance; *fresh*: re-read the expectations first."""
        for force in ((True,) if fresh else (False, True)):
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


@dataclass(eq=False)
class _Inbound:
    """One incoming association: who it is, the pipelines (one per job) it feeds, and the
    C-STORE command being served (its Move Originator attributes pick the job)."""

    assoc: Association
    address: str
    calling_ae: str
    pipelines: dict[str, InstancePipeline] = field(default_factory=dict)
    sessions: list[StoreSession] = field(default_factory=list)
    plans: dict[str, Plan | None] = field(default_factory=dict)
    command: dict[int, Any] = field(default_factory=dict)


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
        self.policy = ReceiverPolicy(config)
        self._digests: dict[str, dict[str, str]] = {}
        """Per job: SOP Instance UID -> content digest of the copy this receiver stored."""
        self._connections: dict[socket.socket, str] = {}
        """Every admitted connection (until its thread ends) -> the peer's address."""
        self._inbound: dict[socket.socket, _Inbound] = {}
        """The established associations among them."""
        self._lock = threading.Lock()
        self._spool = tempfile.TemporaryDirectory(prefix="pacsfetch-receiver-")
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._tls: ssl.SSLContext | None = None
        self._names = itertools.count(1)

    # serving ------------------------------------------------------------------
    def start(self) -> None:
        """Listen on ``[receiver] bind:port`` and accept in a background thread."""
        settings = self.config.receiver
        if settings.tls is not None:
            try:
                self._tls = server_context(settings.tls)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"receiver.tls: cannot load the certificate, key or CA "
                                  f"file: {exc}") from None
        family = socket.AF_INET6 if ":" in settings.bind else socket.AF_INET
        self._listener = socket.create_server((settings.bind, settings.port), family=family,
                                              backlog=LISTEN_BACKLOG)
        self._acceptor = threading.Thread(target=self._accept_loop, args=(self._listener,),
                                          name="receiver-accept", daemon=True)
        self._acceptor.start()
        log.info("receiver listening", extra={
            "ae_title": settings.ae_title, "bind": settings.bind, "port": settings.port,
            "accept_from": list(settings.accept_from), "tls": self._tls is not None})

    def stop(self) -> None:
        """Stop accepting, abort what is still open, remove the spool."""
        self._stop_accepting()
        self._abort_all()
        deadline = time.monotonic() + 5
        while self._busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._spool.cleanup()

    def serve_forever(self) -> None:
        """Serve until SIGTERM or Ctrl-C, then drain (see :mod:`pacsfetch.workers.lifecycle`)."""
        self.start()
        try:
            lifecycle.serve_until_drained(
                stop_accepting=self._stop_accepting, busy=self._busy,
                abort_all=self._abort_all, alive=self._accepting,
                drain_seconds=self.config.worker.drain_seconds)
        finally:
            self.stop()

    def _stop_accepting(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        listener.close()
        if self._acceptor is not None:
            self._acceptor.join(5)

    def _accepting(self) -> bool:
        return (self._listener is not None and self._acceptor is not None
                and self._acceptor.is_alive())

    def _busy(self) -> int:
        with self._lock:
            return len(self._connections)

    def _abort_all(self) -> None:
        """A-ABORT every open association; their threads wake up to a closed connection."""
        with self._lock:
            open_now = list(self._inbound.values())
            bare = [sock for sock in self._connections if sock not in self._inbound]
        for inbound in open_now:
            _shut(inbound.assoc.sock, pdu.abort_pdu())
        for sock in bare:
            _shut(sock, b"")

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                if self._listener is not listener:
                    return  # closed: draining or stopped
                time.sleep(0.01)  # out of file descriptors: let a connection end
                continue
            address = str(peer[0])
            if not self._admit(conn, address):
                _shut(conn, b"")  # refused at once, before any DICOM is read
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, address), daemon=True,
                             name=f"receiver-{next(self._names)}").start()

    def _admit(self, conn: socket.socket, address: str) -> bool:
        with self._lock:
            from_address = sum(1 for a in self._connections.values() if a == address)
            refusal = self.policy.admit(address, from_address, len(self._connections))
            if refusal is None:
                self._connections[conn] = address
        if refusal is not None:
            count_refusal(refusal, address=address)
        return refusal is None

    def _serve(self, conn: socket.socket, address: str) -> None:
        """One connection, in its own thread: TLS, A-ASSOCIATE, messages, close."""
        sock: socket.socket = conn
        inbound: _Inbound | None = None
        try:
            if self._tls is not None:
                wrapped = self._handshake(conn, address)
                if wrapped is None:
                    return
                sock = wrapped
                with self._lock:
                    self._connections[sock] = self._connections.pop(conn)
            assoc = Association.accept(sock, self._decide, max_receive=MAX_RECEIVE_PDU,
                                       timeout=self.config.receiver.idle_timeout,
                                       artim=ARTIM_SECONDS)
            if assoc is None:
                return
            assert assoc.peer is not None
            inbound = _Inbound(assoc, address, assoc.peer.calling_ae)
            with self._lock:
                self._inbound[sock] = inbound
                self.stats.associations += 1
            self._serve_association(inbound)
        except Exception:
            log.exception("receiver association failed", extra={"address": address})
        finally:
            if inbound is not None:
                inbound.assoc.close()
                self._finish(inbound)
            try:
                sock.close()
            except OSError:
                pass
            with self._lock:
                self._inbound.pop(sock, None)
                self._connections.pop(sock, None)
                self._connections.pop(conn, None)

    def _handshake(self, conn: socket.socket, address: str) -> socket.socket | None:
        """The TLS server handshake within ARTIM; a failure is logged, counted, and closes."""
        assert self._tls is not None
        conn.settimeout(ARTIM_SECONDS)
        try:
            return self._tls.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            count_refusal(Refusal.TLS, address=address,
                          detail=f"TLS handshake failed: {exc}")
            _shut(conn, b"")
            return None

    def _decide(self, rq: pdu.AssociateRequest) -> pdu.AssociateRequest | bytes:
        """A-ASSOCIATE-AC for storage and verification, or the A-ASSOCIATE-RJ PDU.

        The PACS calls us by the move destination it knows: which called AE title does not
        matter. ``[receiver] accept_from`` limits calling AE titles.
        """
        accept_from = self.config.receiver.accept_from
        if accept_from and rq.calling_ae not in accept_from:
            log.warning("receiver rejected an association from an unlisted calling AE title",
                        extra={"calling_ae": rq.calling_ae})
            return pdu.reject_pdu(1, 1, 3)  # permanent, service user: calling AE unknown
        answered = []
        for cx in rq.contexts:
            if cx.abstract_syntax == VERIFICATION:
                usable = [ts for ts in cx.transfer_syntaxes if ts in QUERY_SYNTAXES]
            elif cx.abstract_syntax in STORAGE_CLASSES:
                usable = [ts for ts in cx.transfer_syntaxes if ts in TRANSFER_SYNTAXES]
            else:
                answered.append(pdu.ProposedContext(cx.id, cx.abstract_syntax, [], result=3))
                continue
            answered.append(pdu.ProposedContext(cx.id, cx.abstract_syntax, usable[:1],
                                                result=0 if usable else 4))
        # Role selection: the peer stays the storage SCU; it never gets our SCP role back.
        roles = {uid: (scu, False) for uid, (scu, _) in rq.roles.items()
                 if uid in STORAGE_CLASSES}
        return pdu.AssociateRequest(called_ae=rq.called_ae, calling_ae=rq.calling_ae,
                                    contexts=answered, max_pdu=MAX_RECEIVE_PDU, roles=roles)

    def _serve_association(self, inbound: _Inbound) -> None:
        """C-STOREs and C-ECHOs until the peer releases or aborts, or goes idle.

        Idleness is a deadline on the blocking read: an association that received no data
        set for ``idle_timeout`` seconds is aborted, C-ECHOs or not.
        """
        assoc = inbound.assoc
        idle = self.config.receiver.idle_timeout
        spool = Spool(Path(self._spool.name))
        store = self._store_handler(inbound)
        last_data = time.monotonic()
        shortened = False
        try:
            while True:
                if shortened:
                    left = idle - (time.monotonic() - last_data)
                    if left <= 0:
                        self._idle(inbound)
                        return
                    assoc.sock.settimeout(left)
                try:
                    pcid, command = assoc.read_command()
                except PeerTimeout:
                    self._idle(inbound)
                    return
                except PeerReleased:
                    return
                field_ = command[m.COMMAND_FIELD]
                if field_ == m.C_STORE_RQ:
                    if shortened:
                        assoc.sock.settimeout(idle)
                        shortened = False
                    inbound.command = command
                    receive_store(assoc, pcid, command, spool, store)
                    last_data = time.monotonic()
                    continue
                shortened = True
                if field_ == m.C_ECHO_RQ:
                    assoc.send_message(pcid, m.response(
                        m.C_ECHO_RSP, command.get(m.MESSAGE_ID, 0), 0x0000,
                        sop_class=VERIFICATION))
                    continue
                if m.has_data_set(command):
                    assoc.read_data_set(pcid, discard)
                if not field_ & 0x8000 and field_ != m.C_CANCEL_RQ:
                    assoc.send_message(pcid, m.response(
                        field_ | 0x8000, command.get(m.MESSAGE_ID, 0), UNRECOGNISED_OPERATION))
        except DimseError as exc:
            log.info("receiver association ended", extra={
                "address": inbound.address, "calling_ae": inbound.calling_ae,
                "reason": str(exc)})
        finally:
            spool.close()

    def _idle(self, inbound: _Inbound) -> None:
        count_refusal(Refusal.IDLE, address=inbound.address, calling_ae=inbound.calling_ae)
        inbound.assoc.abort()

    def _finish(self, inbound: _Inbound) -> None:
        """Record what the association's pipelines hold, close their store sessions."""
        for job_id, pipeline in inbound.pipelines.items():
            try:
                pipeline.flush()
            except Exception:
                log.exception("could not record a job's instances", extra={"job_id": job_id})
        for session in inbound.sessions:
            session.close()

    # instances ----------------------------------------------------------------
    def _store_handler(self, inbound: _Inbound) -> StoreHandler:
        """The C-STORE sink of one association: (spool path, SOP class, SOP instance) ->
        status. The path is the pipeline's (or removed) once it returns."""

        def store(path: Path, sop_class: str, sop_instance: str) -> int:
            found = self._pipeline_for(inbound, path)
            if found is None:
                self.stats.no_job += 1
                INSTANCE_FAILURES.labels(reason="no-job", transport="c-move",
                                         source="none").inc()
                return NO_JOB_STATUS
            if isinstance(found, Refusal):
                return NO_JOB_STATUS
            pipeline, job_id, identity = found
            conflicts = pipeline.conflicts
            verdict = pipeline.accept(path, sop_class_uid=sop_class,
                                      sop_instance_uid=sop_instance, identity=identity)
            if pipeline.conflicts > conflicts:
                self._refuse(Refusal.CONFLICTING_COPY, job_id, inbound)
            self.stats.verdicts[verdict.value] = self.stats.verdicts.get(verdict.value, 0) + 1
            return STORE_STATUS[verdict]

        return store

    def _refuse(self, reason: Refusal, job_id: str, inbound: _Inbound) -> None:
        count_refusal(reason, job_id=job_id, address=inbound.address,
                      calling_ae=inbound.calling_ae)
        self.book.refuse(job_id, reason.value)

    def _pipeline_for(
        self, inbound: _Inbound, path: Path,
    ) -> tuple[InstancePipeline, str, InstanceIdentity] | Refusal | None:
        """The job's pipeline for the instance at *path*, the job and the header read to
        pick it (handed on, so the pipeline does not read it again); else why not."""
        command = inbound.command
        originator = str(command.get(m.MOVE_ORIGINATOR_AE) or "").strip()
        message_id = command.get(m.MOVE_ORIGINATOR_ID)
        try:
            identity = read_identity(path)
        except UnreadableInstance:
            identity = None
        expectation = None
        if identity is not None:
            expectation = self._expectations.match(originator or None, message_id, identity)
            if expectation is not None and expectation.job_id not in inbound.pipelines:
                # The first of this job on this association: match on a fresh view, as the
                # cached one may hold a job that ended since and claimed the same study.
                expectation = self._expectations.match(originator or None, message_id,
                                                       identity, fresh=True)
        if expectation is None:
            log.warning("refused an instance that belongs to no running job", extra={
                "calling_ae": inbound.calling_ae, "by_originator": bool(originator)})
            return None
        job_id = expectation.job_id
        refusal = self.policy.sender_refusal(expectation.request.source, inbound.address,
                                             inbound.calling_ae)
        if refusal is not None:
            self._refuse(refusal, job_id, inbound)
            return refusal
        missing = [n for n in expectation.request.store_names if n not in self.store_settings]
        if missing:
            log.error("refused an instance for a store this receiver's config lacks: give the "
                      "receiver the workers' configuration", extra={
                          "job_id": job_id, "store": missing[0]})
            return None
        pipeline = inbound.pipelines.get(job_id)
        if pipeline is None:
            inbound.plans[job_id] = self.book.plan_of(job_id)
            pipeline = self._open_pipeline(expectation, inbound)
        plan = inbound.plans[job_id]
        assert identity is not None  # no expectation matches an unreadable instance
        if plan is not None and not plan.allows(identity.sop_instance_uid, identity.series_uid):
            self._refuse(Refusal.NOT_PLANNED, job_id, inbound)
            return Refusal.NOT_PLANNED
        return pipeline, job_id, identity

    def _open_pipeline(self, expectation: MoveExpectation, inbound: _Inbound) -> InstancePipeline:
        """The job's pipeline on this association, writing to every store the job names."""
        sessions: dict[str, StoreSession] = {}
        for store in expectation.request.store_names:
            backend = self.registry.store_backends[self.config.stores[store].plugin]
            sessions[store] = backend.open(store, self.store_settings[store], expectation.job_id)
            inbound.sessions.append(sessions[store])
        with self._lock:
            active = {item.job_id for item in self._expectations.current()}
            for job_id in [j for j in self._digests if j not in active]:
                del self._digests[job_id]
            digests = self._digests.setdefault(expectation.job_id, {})
        pipeline = InstancePipeline(
            expectation.job_id, expectation.request, sessions,
            _MoveJobState(self.book, expectation), self.registry.hooks.hook,
            Path(self._spool.name), self.config.worker.progress_interval, digests=digests,
        )
        pipeline.use_transport("c-move")
        inbound.pipelines[expectation.job_id] = pipeline
        log.info("receiving for a job", extra={"job_id": expectation.job_id,
                                               "stores": list(sessions)})
        return pipeline


def _shut(sock: socket.socket, last: bytes) -> None:
    """Send *last* (an A-ABORT, or nothing) and shut the connection both ways: a thread
    blocked reading it wakes up to its end (closing alone would not wake it)."""
    try:
        if last:
            sock.settimeout(1.0)
            sock.sendall(last)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
