"""The interfaces between workers, transports and stores.

A *transport* talks to a PACS and spools each instance it receives as a DICOM Part-10 file;
it hands the file to an :class:`InstanceSink` (implemented by the workers) that checks the
instance, writes it through the job's stores and records it. A *store* writes instances
somewhere; its session stages an instance (``write``) and makes it visible (``commit``) as
two steps, so a job with several stores only shows an instance once every store has it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel

from pacsfetch.config import SourceConfig
from pacsfetch.gate import AssociationGate, JobGate
from pacsfetch.models import JobRequest


@dataclass(frozen=True, slots=True)
class InstanceIdentity:
    """Who an instance is, read from its own header (never trusted before validation)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    """Further header values a store layout may use (Modality, SeriesNumber, ...)."""


@dataclass(frozen=True, slots=True)
class IncomingInstance:
    """A received instance, spooled to a complete Part-10 file the sink owns."""

    identity: InstanceIdentity
    path: Path
    size: int


class Verdict(Enum):
    """What the sink did with an instance; transports map it to their protocol's status."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    """Already stored by this job (a re-delivery): acknowledged, not written again."""
    OUT_OF_SCOPE = "out-of-scope"
    """Not part of what the job asked for (another study, series or instance): refused."""
    INVALID = "invalid"
    """Unreadable header, malformed UIDs, or header disagreeing with the transport's claim."""
    STORE_FAILED = "store-failed"


class InstanceSink(Protocol):
    """Where a transport hands every instance it receives."""

    @property
    def spool_dir(self) -> Path:
        """Where transports should spool incoming files (same filesystem as the store)."""
        ...

    def accept(
        self, path: Path, *, sop_class_uid: str, sop_instance_uid: str
    ) -> Verdict:
        """Check, store and record the spooled file at *path*; the sink removes the file.

        *sop_class_uid* and *sop_instance_uid* are what the transport's protocol claimed
        (for DIMSE, the C-STORE command); the header must agree with them.
        """
        ...


class ProgressReporter(Protocol):
    """How a transport tells the job what the PACS reports, and learns of cancellation."""

    def peer_counts(
        self, *, remaining: int | None, completed: int, failed: int, warning: int
    ) -> None:
        """Sub-operation counters as the PACS reports them (pending C-GET/C-MOVE responses)."""
        ...

    def cancelled(self) -> bool:
        """True once somebody asked to cancel the job; cheap enough to call per response."""
        ...


class MoveTracker(Protocol):
    """How a C-MOVE transport works with the move receiver, a separate process.

    The PACS delivers C-MOVE sub-operations to ``pacsfetch receiver``, not to the worker;
    the worker registers what its job expects, and counts what the receiver stored.
    """

    def expect(self, originator_ae: str, message_id: int) -> None:
        """Tell the receiver that the C-MOVE with *message_id* from *originator_ae* is ours;
        call before sending it."""
        ...

    def next_message_id(self) -> int:
        """A Message ID no other worker uses at the moment (they may share an AE title)."""
        ...

    def plan(self, instances: frozenset[str], whole_series: frozenset[str]) -> None:
        """What the C-MOVEs may bring (call before :meth:`expect`): the receiver refuses any
        other instance, except those of *whole_series*, which the PACS listed only in part."""
        ...

    def refused(self) -> dict[str, int]:
        """How many instances the receiver refused for this attempt, by reason."""
        ...

    def collect(self) -> int:
        """Count into the job what the receiver stored so far; returns how many this attempt.

        Cheap to call per C-MOVE response: it reads the receiver's records at most once per
        progress interval.
        """
        ...

    def collect_now(self) -> int:
        """Like :meth:`collect`, but always reads the receiver's records."""
        ...

    def withdraw(self) -> None:
        """Stop expecting anything: the receiver refuses what still comes for the job."""
        ...


@dataclass(slots=True)
class RetrieveContext:
    """Everything a transport needs for one attempt at one job."""

    job_id: str
    request: JobRequest
    source_name: str
    source: SourceConfig
    sink: InstanceSink
    progress: ProgressReporter
    already_stored: frozenset[str] = frozenset()
    """SOP Instance UIDs an earlier attempt of this job stored: ask the PACS only for the rest."""
    moves: MoveTracker | None = None
    """The job's link with the move receiver (C-MOVE); None where no broker is configured."""
    gate: JobGate | None = None
    """The source's association cap, windows and rate cap, bound to this job: hold a slot
    (``gate.acquire()``) for the life of every association or concurrent request to the
    source. Built for this one process when not given."""

    def __post_init__(self) -> None:
        if self.gate is None:
            self.gate = JobGate(AssociationGate.local({self.source_name: self.source}),
                                self.source_name, cancelled=self.progress.cancelled)


@dataclass(slots=True)
class RetrieveResult:
    """What a transport learnt; the worker decides the job's final status from it."""

    expected: frozenset[str] | None
    """SOP Instance UIDs the PACS said match the job (None when it could not tell)."""
    problems: list[str] = field(default_factory=list)
    """Operator-facing explanations of whatever did not arrive."""
    problem_kind: str | None = None
    peer_failed: int = 0
    cancelled: bool = False
    retry: bool = False
    """The PACS stopped part-way for a reason that may pass: retry (resuming) when the
    job's retries allow, else end with what arrived."""


@runtime_checkable
class Transport(Protocol):
    """A strategy for bringing instances from a PACS: C-GET, C-MOVE, DICOMweb, ..."""

    name: str

    def retrieve(self, ctx: RetrieveContext) -> RetrieveResult:
        """Retrieve what ``ctx.request`` names into ``ctx.sink``.

        Raise :class:`pacsfetch.errors.RetrieveError` when the attempt cannot go on (the PACS
        unreachable, the association rejected or aborted); instances already handed to the
        sink stay stored, and a retried attempt gets them in ``already_stored``.
        """
        ...


class StoreSession(Protocol):
    """One job's use of one store."""

    @property
    def spool_dir(self) -> Path | None:
        """A directory on the store's own filesystem where transports may spool, if any."""
        ...

    def write(self, instance: IncomingInstance) -> Any:
        """Stage the instance durably but invisibly; returns a token for commit/abort.

        Must not consume ``instance.path``: other stores of the job may read it too.
        """
        ...

    def commit(self, staged: Any) -> str:
        """Make a staged instance visible; returns where it is (path, key, AE).

        A store may finish the work in the background (the filesystem store fsyncs, then
        renames), but the instance must be whole whenever it is visible, and visible once
        :meth:`sync` returns.
        """
        ...

    def abort(self, staged: Any) -> None:
        """Discard a staged instance that will not be committed."""
        ...

    def sync(self) -> None:
        """Make every commit so far visible and durable (called before the job records them)."""
        ...

    def close(self) -> None:
        """End the session, successful or not; leaves nothing half-written behind."""
        ...


class StoreBackend(Protocol):
    """A store plugin: validates its config section and opens sessions."""

    name: str
    """The value of ``plugin =`` in a ``[stores.NAME]`` section."""
    settings_model: type[BaseModel]
    """Pydantic model of the section's other keys; it should forbid unknown keys."""

    def open(self, store_name: str, settings: BaseModel, job_id: str) -> StoreSession: ...
