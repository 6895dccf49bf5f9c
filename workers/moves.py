"""The worker's side of C-MOVE: register what the job expects, count what the receiver stored.

Implements :class:`~pacsfetch.plugins.contracts.MoveTracker` on top of
:class:`~pacsfetch.moves.MoveBook`; what the receiver stored is adopted into the job's
:class:`~pacsfetch.workers.pipeline.InstancePipeline`, so progress, the record of stored
instances and the final decision work exactly as for instances received in-process.
"""

from __future__ import annotations

import time

import redis

from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.models import JobRequest
from pacsfetch.moves import MoveBook, Plan
from pacsfetch.workers.pipeline import InstancePipeline

MIN_EXPECTATION_TTL = 60.0
"""Seconds an expectation outlives its last refresh: a dead worker's job stops claiming
instances after this, while a live one refreshes it with every C-MOVE response."""


class RedisMoveTracker:
    """One attempt's expectation; :meth:`withdraw` must end it."""

    def __init__(self, book: MoveBook, job_id: str, request: JobRequest,
                 pipeline: InstancePipeline, timeout: float, interval: float) -> None:
        self._book = book
        self._job_id = job_id
        self._request = request
        self._pipeline = pipeline
        self._ttl = max(MIN_EXPECTATION_TTL, 4 * timeout)
        self._interval = interval
        self._registered = False
        self._offset = 0
        self._bytes = 0
        self._next_collect = 0.0
        self._plan: Plan | None = None
        self._refusals: dict[str, int] = {}

    def next_message_id(self) -> int:
        return self._book.next_message_id()

    def plan(self, instances: frozenset[str], whole_series: frozenset[str]) -> None:
        self._plan = Plan(instances, whole_series)

    def refused(self) -> dict[str, int]:
        if self._registered:
            self._refusals = self._book.refusals(self._job_id)
        return dict(self._refusals)

    def expect(self, originator_ae: str, message_id: int) -> None:
        try:
            if not self._registered:
                self._book.expect(self._job_id, self._request, originator_ae, self._ttl,
                                  self._plan)
                self._registered = True
            self._book.add_message_id(self._job_id, message_id, self._ttl)
        except redis.RedisError as exc:
            raise RetrieveError(
                ErrorKind.CONNECTION,
                f"C-MOVE needs Redis (broker.url), where workers meet `pacsfetch receiver`, "
                f"and it is not answering: {exc}",
            ) from None

    def collect(self) -> int:
        now = time.monotonic()
        if now >= self._next_collect:
            self._next_collect = now + self._interval
            return self.collect_now()
        return self._offset

    def collect_now(self) -> int:
        if not self._registered:
            return 0
        rows, total = self._book.received_since(self._job_id, self._offset)
        self._book.touch(self._job_id, self._ttl)
        self._offset += len(rows)
        self._pipeline.adopt(dict(rows), total - self._bytes)
        self._bytes = total
        return self._offset

    def withdraw(self) -> None:
        if self._registered:
            self.collect_now()
            self._refusals = self._book.refusals(self._job_id)
            self._book.withdraw(self._job_id)
            self._registered = False
