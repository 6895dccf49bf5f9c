"""The sink every transport hands instances to: check, store, record, count.

Runs on the thread that answers the PACS, once per instance, so it does the minimum:
read the header up to Instance Number, compare it with the job's scope, write through the
job's stores (stage in all, then commit in all) and buffer the record. Records and progress
are flushed in batches (every ``progress_interval`` seconds), after the stores have made
their commits durable, so a job that dies re-fetches at most the last batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import pluggy

from pacsfetch.errors import ErrorKind, RetrieveError, no_space_left
from pacsfetch.metrics import NO_TRANSPORT, InstanceMeter
from pacsfetch.models import JobRequest, Level, Progress
from pacsfetch.plugins.contracts import IncomingInstance, InstanceIdentity, StoreSession, Verdict
from pacsfetch.plugins.dicomfile import UnreadableInstance, read_identity
from pacsfetch.workers.receiver_policy import content_digest
from pacsfetch.workers.state import JobState

log = logging.getLogger(__name__)

CANCEL_CHECK_INTERVAL = 0.5


class InstancePipeline:
    """Implements :class:`~pacsfetch.plugins.contracts.InstanceSink` and the progress reporter."""

    def __init__(
        self,
        job_id: str,
        request: JobRequest,
        sessions: dict[str, StoreSession],
        state: JobState,
        hooks: pluggy.HookRelay,
        spool_dir: Path,
        progress_interval: float,
        digests: dict[str, str] | None = None,
    ) -> None:
        """*digests* (the move receiver's, shared by a job's associations): content digests
        of what was stored, so a second copy with different content is refused, not kept."""
        self._job_id = job_id
        self._request = request
        self._sop_scope = frozenset(request.sop_uids)
        self._sessions = sessions
        self._state = state
        self._hooks = hooks
        self._spool_dir = spool_dir
        self._interval = progress_interval
        self.stored: dict[str, str] = state.stored_instances()
        self.already_stored = frozenset(self.stored)
        previous = state.previous_progress()
        self._bytes = previous.bytes
        self._peer = Progress()
        self._unrecorded: dict[str, str] = {}
        self._next_flush = 0.0
        self._next_cancel_check = 0.0
        self._cancelled = False
        self.refused = 0
        self.invalid = 0
        self.duplicates = 0
        self.store_failures = 0
        self.conflicts = 0
        self._digests = digests
        self.last_store_error: str | None = None
        self.failed_stores: set[str] = set()
        self.full_stores: set[str] = set()
        """Stores whose file system is full: a retry cannot help until space is freed."""
        self._meter: InstanceMeter | None = None
        """Bound when a transport starts, so no empty series labelled "none" is exported."""

    def use_transport(self, name: str) -> None:
        """Count what arrives from now on under transport *name* (the runner's current one)."""
        self._state.transport_started(name)
        self._bind_meter(name)

    def _bind_meter(self, transport: str) -> InstanceMeter:
        self._meter = InstanceMeter(transport, self._request.source, self._sessions)
        return self._meter

    # InstanceSink -----------------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        return self._spool_dir

    def accept(self, path: Path, *, sop_class_uid: str, sop_instance_uid: str,
               identity: InstanceIdentity | None = None) -> Verdict:
        """:meth:`InstanceSink.accept`; *identity* is the file's header when the caller
        already read it (the move receiver does, to pick the job), so it is not read twice."""
        try:
            return self._accept(path, sop_class_uid, sop_instance_uid, identity)
        finally:
            path.unlink(missing_ok=True)

    def _accept(self, path: Path, sop_class_uid: str, sop_instance_uid: str,
                identity: InstanceIdentity | None) -> Verdict:
        meter = self._meter or self._bind_meter(NO_TRANSPORT)
        size = path.stat().st_size
        meter.received(size)
        verdict = self._check_and_store(path, size, sop_class_uid, sop_instance_uid, identity)
        if verdict is Verdict.STORED:
            meter.stored(size)
        elif verdict is not Verdict.DUPLICATE:
            meter.refused(verdict.value)
        return verdict

    def _check_and_store(self, path: Path, size: int, sop_class_uid: str,
                         sop_instance_uid: str, identity: InstanceIdentity | None) -> Verdict:
        if identity is None:
            try:
                identity = read_identity(path)
            except UnreadableInstance as exc:
                self.invalid += 1
                log.warning("refused an unreadable instance",
                            extra={"job_id": self._job_id, "reason": str(exc)})
                return Verdict.INVALID
        if (identity.sop_instance_uid, identity.sop_class_uid) != (sop_instance_uid, sop_class_uid):
            self.invalid += 1
            log.warning("refused an instance whose header contradicts its C-STORE command",
                        extra={"job_id": self._job_id})
            return Verdict.INVALID
        if not self._in_scope(identity):
            self.refused += 1
            log.warning("refused an instance the job did not ask for", extra={"job_id": self._job_id})
            return Verdict.OUT_OF_SCOPE
        digest = None
        if self._digests is not None:
            digest = content_digest(path)
            known = self._digests.get(identity.sop_instance_uid)
            if known is not None and known != digest:
                self.conflicts += 1
                log.warning("refused a second copy of an instance with different content; the "
                            "first copy is kept", extra={"job_id": self._job_id})
                return Verdict.INVALID
            if known is not None:
                self.duplicates += 1
                return Verdict.DUPLICATE
        if identity.sop_instance_uid in self.stored:
            self.duplicates += 1
            return Verdict.DUPLICATE
        instance = IncomingInstance(identity, path, size)
        locations = self._store(instance)
        if locations is None:
            return Verdict.STORE_FAILED
        if self._digests is not None and digest is not None:
            self._digests[identity.sop_instance_uid] = digest
        encoded = json.dumps(locations, separators=(",", ":"))
        self.stored[identity.sop_instance_uid] = encoded
        self._unrecorded[identity.sop_instance_uid] = encoded
        self._bytes += instance.size
        self._hooks.pacsfetch_instance_stored(job_id=self._job_id, instance=instance, locations=locations)
        self._maybe_flush()
        return Verdict.STORED

    def _in_scope(self, identity: InstanceIdentity) -> bool:
        request = self._request
        if identity.study_uid != request.study_uid:
            return False
        if request.series_uid and identity.series_uid != request.series_uid:
            return False
        return request.level is not Level.IMAGE or identity.sop_instance_uid in self._sop_scope

    def _store(self, instance: IncomingInstance) -> dict[str, str] | None:
        """Stage in every store, then commit in every store; None if any store failed."""
        staged = []
        name = ""
        try:
            for name, session in self._sessions.items():
                staged.append((name, session, session.write(instance)))
            locations = {}
            while staged:
                name, session, token = staged[0]
                locations[name] = session.commit(token)
                staged.pop(0)
            return locations
        except Exception as exc:
            for _, session, token in staged:
                session.abort(token)
            self.store_failures += 1
            self.store_failed(name, exc)
            return None

    def store_failed(self, name: str, exc: BaseException) -> None:
        """Note that store *name* failed with *exc* (also for its spool and its syncs)."""
        self.failed_stores.add(name)
        if no_space_left(exc):
            self.full_stores.add(name)
            reason = "no space left on device"
        else:
            reason = (exc.message if isinstance(exc, RetrieveError)
                      else f"{type(exc).__name__}: {exc}")
        self.last_store_error = f"store {name!r}: {reason}"
        log.error("store failed", extra={"job_id": self._job_id, "store": name,
                                         "reason": reason})

    def adopt(self, locations: Mapping[str, str], nbytes: int) -> None:
        """Count instances the move receiver (another process) stored for this job.

        They were checked and written there by a pipeline like this one; here they join
        the job's record and counters as if they had come through :meth:`accept`.
        """
        for sop_instance_uid, where in locations.items():
            if sop_instance_uid not in self.stored:
                self.stored[sop_instance_uid] = where
                self._unrecorded[sop_instance_uid] = where
        self._bytes += nbytes
        self._maybe_flush()

    # ProgressReporter -------------------------------------------------------
    def peer_counts(self, *, remaining: int | None, completed: int, failed: int, warning: int) -> None:
        self._peer = Progress(remaining=remaining, completed=completed, failed=failed, warning=warning)
        self._maybe_flush()

    def cancelled(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now >= self._next_cancel_check:
            self._next_cancel_check = now + CANCEL_CHECK_INTERVAL
            self._cancelled = self._state.cancel_requested()
        return self._cancelled

    # records ------------------------------------------------------------------
    @property
    def progress(self) -> Progress:
        return Progress(
            completed=len(self.stored),
            failed=self._peer.failed,
            warning=self._peer.warning,
            remaining=self._peer.remaining,
            skipped=len(self.already_stored),
            bytes=self._bytes,
        )

    def _maybe_flush(self) -> None:
        now = time.monotonic()
        if now >= self._next_flush:
            self._next_flush = now + self._interval
            self.flush()

    def flush(self) -> None:
        """Make stored instances durable, then record them with the current counters.

        A store that cannot make the batch durable (its disk filled up) fails the batch:
        those instances are not recorded as stored, so a later attempt fetches them again,
        and the failure is the job's to report, not an exception on the PACS's thread."""
        for name, session in self._sessions.items():
            try:
                session.sync()
            except Exception as exc:
                self.store_failed(name, exc)
                self.store_failures += len(self._unrecorded)
                for sop_instance_uid in self._unrecorded:
                    self.stored.pop(sop_instance_uid, None)
                self._unrecorded = {}
        self._state.record(self._unrecorded, self.progress)
        self._unrecorded = {}

    def problems(self) -> list[tuple[ErrorKind, str]]:
        """What this sink refused or failed to store, for the job's error text."""
        found = []
        if self.full_stores:
            names = ", ".join(f"store {name!r}" for name in sorted(self.full_stores))
            found.append((ErrorKind.STORE, f"{names}: no space left on device after "
                          f"{len(self.stored)} instance(s) were stored; free space, then "
                          "retry the job (it resumes from what is stored)"))
        elif self.failed_stores:
            names = ", ".join(repr(name) for name in sorted(self.failed_stores))
            found.append((ErrorKind.STORE, f"{self.store_failures} instance(s) could not be stored, "
                          f"failing store(s): {names} (last: {self.last_store_error})"))
        if self.refused:
            found.append((ErrorKind.PEER_STATUS, f"the PACS sent {self.refused} instance(s) the job "
                          "did not ask for; they were refused"))
        if self.invalid:
            found.append((ErrorKind.PEER_STATUS, f"the PACS sent {self.invalid} unreadable or "
                          "inconsistent instance(s); they were refused"))
        if self.conflicts:
            found.append((ErrorKind.PEER_STATUS, f"{self.conflicts} second copies of instances "
                          "already stored had different content; they were refused, the first "
                          "copies kept"))
        return found
