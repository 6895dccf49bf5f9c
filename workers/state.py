"""Where a running job's progress, records and cancel flag live.

A Celery worker keeps them in Redis (:class:`RedisJobState`) so the API can show them;
``pacsfetch retrieve`` runs a job inline with no broker and keeps them in memory
(:class:`LocalJobState`), showing progress in the terminal instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from pacsfetch.gate import Waiting
from pacsfetch.jobstore import JobStore
from pacsfetch.models import Progress


class JobState(Protocol):
    def stored_instances(self) -> dict[str, str]:
        """SOP Instance UID -> locations of everything earlier attempts stored."""
        ...

    def previous_progress(self) -> Progress: ...

    def record(self, locations: Mapping[str, str], progress: Progress) -> None:
        """Persist newly stored instances and the current counters, together."""
        ...

    def cancel_requested(self) -> bool: ...

    def transport_started(self, name: str) -> None:
        """The attempt now retrieves with transport *name* (shown while the job runs)."""
        ...

    def waiting(self, reason: Waiting | None) -> None:
        """The attempt waits for an association slot or a window (None: no longer)."""
        ...


class RedisJobState:
    def __init__(self, store: JobStore, job_id: str) -> None:
        self._store = store
        self._job_id = job_id

    def stored_instances(self) -> dict[str, str]:
        return self._store.stored_instances(self._job_id)

    def previous_progress(self) -> Progress:
        return self._store.get(self._job_id).progress

    def record(self, locations: Mapping[str, str], progress: Progress) -> None:
        self._store.record_instances(self._job_id, locations)
        self._store.set_progress(self._job_id, progress)

    def cancel_requested(self) -> bool:
        return self._store.cancel_requested(self._job_id)

    def transport_started(self, name: str) -> None:
        self._store.set_fields(self._job_id, transport=name)

    def waiting(self, reason: Waiting | None) -> None:
        self._store.set_waiting(self._job_id, None if reason is None else str(reason))


class LocalJobState:
    """In-memory state for an inline retrieve; *on_progress* drives a progress bar."""

    def __init__(self, on_progress: Callable[[Progress], None] | None = None) -> None:
        self.instances: dict[str, str] = {}
        self.progress = Progress()
        self._on_progress = on_progress
        self.cancel = False
        self.transport: str | None = None
        self.waiting_for: Waiting | None = None

    def stored_instances(self) -> dict[str, str]:
        return dict(self.instances)

    def previous_progress(self) -> Progress:
        return self.progress

    def record(self, locations: Mapping[str, str], progress: Progress) -> None:
        self.instances.update(locations)
        self.progress = progress
        if self._on_progress:
            self._on_progress(progress)

    def cancel_requested(self) -> bool:
        return self.cancel

    def transport_started(self, name: str) -> None:
        self.transport = name

    def waiting(self, reason: Waiting | None) -> None:
        self.waiting_for = reason
