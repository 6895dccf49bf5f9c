"""What an overloaded PACS says, and how bulk work slows down when it says it.

Archives under load do not fail cleanly. Seen in the field: a C-GET or C-MOVE answered
with Success and zero sub-operations (IMPAX), a final status 0xA7xx (out of resources),
an association rejected as *transient* (PS3.8 A-ASSOCIATE-RJ result 2). When instances were
expected, each of these means "not now", never "done" or "broken": the transports raise
:data:`ErrorKind.PEER_BUSY` (retryable), and a migration whose study job ended so puts the
study back at the front of its queue and slows down (:class:`Pace`): its in-flight limit
halves and feeding pauses for a back-off that doubles (5 s to 5 min); each verified study
raises the limit by one again, up to the migration's ``max_in_flight`` (AIMD, as TCP does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pacsfetch.errors import ErrorKind, RetrieveError

if TYPE_CHECKING:
    from pacsfetch.migrations import MigrationStore

REJECTED_TRANSIENT = 0x02
"""A-ASSOCIATE-RJ result: rejected-transient (try again later)."""
FIRST_BACKOFF = 5.0
MAX_BACKOFF = 300.0


def is_busy_status(code: int | None) -> bool:
    """0xA700-0xA7FF: "Refused: Out of Resources" in every Q/R service."""
    return code is not None and 0xA700 <= code <= 0xA7FF


def busy_error(where: str, what: str) -> RetrieveError:
    return RetrieveError(ErrorKind.PEER_BUSY, f"{where} is busy: {what}; trying again later, "
                         "more slowly")


def retrieve_pushback(where: str, service: str, final_code: int | None, delivered: int,
                      expected: int) -> RetrieveError | None:
    """The transports' hook at the end of a C-GET/C-MOVE: a :data:`ErrorKind.PEER_BUSY`
    error when the PACS pushed back instead of answering, else None."""
    if is_busy_status(final_code) and delivered == 0:
        return busy_error(where, f"it ended a {service} with 0x{final_code:04X} (out of "
                          "resources)")
    if final_code == 0x0000 and delivered == 0 and expected > 0:
        return busy_error(where, f"it answered a {service} with success but sent none of "
                          f"the {expected} instance(s) it lists")
    return None


def association_pushback(where: str, result: int | None, purpose: str) -> RetrieveError | None:
    """The association hook: a transient rejection is "busy", not a configuration error."""
    if result == REJECTED_TRANSIENT:
        return busy_error(where, f"it rejected the association for {purpose} as transient")
    return None


@dataclass
class Pace:
    """A migration's current pace: studies in flight allowed, and any back-off."""

    limit: int
    busy_until: float = 0.0

    @classmethod
    def from_fields(cls, fields: dict[str, str], max_in_flight: int) -> Pace:
        limit = int(fields.get("limit") or max_in_flight)
        return cls(max(1, min(limit, max_in_flight)), float(fields.get("busy_until") or 0))

    def backing_off(self, now: float | None = None) -> bool:
        return (now or time.time()) < self.busy_until

    @staticmethod
    def pushed_back(store: MigrationStore, mig_id: str, reason: str) -> None:
        """Halve the limit and pause feeding for a back-off that doubles each time."""
        fields = store.fields(mig_id)
        limit = max(1, int(fields.get("limit") or 1) // 2)
        backoff = min(max(float(fields.get("busy_backoff") or 0) * 2, FIRST_BACKOFF),
                      MAX_BACKOFF)
        store.set_fields(mig_id, limit=limit, busy_backoff=backoff,
                         busy_until=time.time() + backoff, error=reason[:500])

    @staticmethod
    def recovered(store: MigrationStore, mig_id: str, max_in_flight: int) -> None:
        """A study went through: one more in flight again, up to *max_in_flight*."""
        fields = store.fields(mig_id)
        limit = int(fields.get("limit") or max_in_flight)
        if limit < max_in_flight or fields.get("busy_backoff"):
            store.set_fields(mig_id, limit=min(limit + 1, max_in_flight), busy_backoff=None)
