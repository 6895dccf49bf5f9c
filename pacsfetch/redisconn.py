"""Redis clients for workers that ride out a Redis outage instead of failing the job.

A Redis restart (AOF on, as production runs it) takes a few seconds; a failover longer.
Without this, the first refused connection of a running job's progress update failed the
job for good, with hundreds of instances already stored. A worker's clients retry every
call that hit a connection error, with back-off, until ``[worker] redis_outage_seconds``
have passed since that call first failed; only then the error reaches the caller.

The retry lives in the client (redis-py's ``Retry`` hook), so no call site changes and
the per-instance path pays nothing while Redis answers: state updates are batched
already (:class:`~pacsfetch.workers.pipeline.InstancePipeline` flushes per interval).
The API does not use this: it answers ``503`` at once while Redis is down.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_PAUSE = 0.05
LONGEST_PAUSE = 1.0
"""Seconds between tries: from 50 ms, doubling, at most 1 s (a restart is seen quickly)."""
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, socket.timeout)
"""What an outage looks like to a client (``BusyLoadingError``, Redis replaying its AOF
after a restart, is a ``ConnectionError``)."""


class OutageRetry(Retry):
    """redis-py's retry policy, bounded by time instead of by a count of tries."""

    def __init__(self, outage_seconds: float) -> None:
        super().__init__(ExponentialBackoff(cap=LONGEST_PAUSE, base=FIRST_PAUSE),
                         retries=1_000_000, supported_errors=REDIS_DOWN)
        self.outage_seconds = outage_seconds

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OutageRetry) and other.outage_seconds == self.outage_seconds

    __hash__ = Retry.__hash__

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        """Call *do* until it answers or the outage budget is spent, then re-raise."""
        backoff = ExponentialBackoff(cap=LONGEST_PAUSE, base=FIRST_PAUSE)
        failures = 0
        deadline = 0.0
        while True:
            try:
                result = do()
            except REDIS_DOWN as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                now = time.monotonic()
                if failures == 1:
                    deadline = now + self.outage_seconds
                    log.warning("Redis did not answer; retrying until it does", extra={
                        "reason": type(error).__name__, "outage_seconds": self.outage_seconds})
                if now >= deadline:
                    raise
                time.sleep(min(backoff.compute(failures), deadline - now))
            else:
                if failures:
                    log.info("Redis answers again", extra={"retries": failures})
                return result


def outage_client(url: str, outage_seconds: float) -> redis.Redis:
    """A client (text answers) whose calls ride out an outage of *outage_seconds*."""
    return redis.Redis.from_url(url, decode_responses=True, retry=OutageRetry(outage_seconds),
                                retry_on_error=list(REDIS_DOWN))
