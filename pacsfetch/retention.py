"""How long records live in Redis, so that job history does not grow without bound.

A job reaching a final status gets a TTL of ``[jobs] retention_days`` on its hash and its
instance list, set atomically with the status change (:mod:`pacsfetch.jobstore`): Redis
deletes them itself, even when no pacsfetch process runs. What Redis cannot do is take the
expired ids out of the sorted-set indexes; :func:`sweep` does that, as a scheduler duty.

Other finished records (a migration's, a prefetch's) call :func:`expire_finished` with
their keys when they reach a final state, and so share the one retention setting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import redis

from pacsfetch.config import Config
from pacsfetch.jobstore import JobStore

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 3600.0
"""Seconds between sweeps: an index holding a few expired ids for an hour costs nothing."""


def retention_seconds(config: Config) -> int:
    """``[jobs] retention_days`` in whole seconds (at least one)."""
    return max(1, round(config.jobs.retention_days * 86400))


def jobstore(config: Config) -> JobStore:
    """The job store with the configured retention (what every process should build)."""
    return JobStore.from_url(config.broker.url, retention_days=config.jobs.retention_days)


def expire_finished(client: redis.Redis, keys: Iterable[str], config: Config) -> None:
    """Let a finished record's *keys* expire after the retention."""
    seconds = retention_seconds(config)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.expire(key, seconds)
    pipe.execute()


def sweep(config: Config, store: JobStore | None = None, now: float | None = None) -> int:
    """Remove ids of expired jobs from the indexes; returns how many."""
    store = store or jobstore(config)
    cutoff = (time.time() if now is None else now) - retention_seconds(config)
    removed = store.prune_indexes(cutoff)
    if removed:
        log.info("expired jobs removed from the indexes", extra={"jobs": removed})
    return removed
