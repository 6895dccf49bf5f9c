"""How long records live in Redis, so that job history does not grow without bound.

A job reaching a final status gets a TTL of ``[jobs] retention_days`` on its hash and its
instance list, set atomically with the status change (:mod:`pacsfetch.jobstore`): Redis
deletes them itself, even when no pacsfetch process runs. What Redis cannot do is take the
expired ids out of the sorted-set indexes; :func:`sweep` does that, as a scheduler duty.

Migrations and prefetch requests set the same TTL on their own keys when they finish
(:class:`MigrationStore` and :class:`PrefetchStore` take :func:`retention_seconds`); the
sweep drops expired migrations from their index too.
"""

from __future__ import annotations

import logging
import time

from pacsfetch.config import Config
from pacsfetch.jobstore import JobStore
from pacsfetch.migrations import MigrationStore

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 3600.0
"""Seconds between sweeps: an index holding a few expired ids for an hour costs nothing."""


def retention_seconds(config: Config) -> int:
    """``[jobs] retention_days`` in whole seconds (at least one)."""
    return max(1, round(config.jobs.retention_days * 86400))


def jobstore(config: Config) -> JobStore:
    """The job store with the configured retention (what every process should build)."""
    return JobStore.from_url(config.broker.url, retention_days=config.jobs.retention_days)


def sweep(config: Config, store: JobStore | None = None, now: float | None = None) -> int:
    """Remove ids of expired jobs and migrations from the indexes; returns how many."""
    store = store or jobstore(config)
    cutoff = (time.time() if now is None else now) - retention_seconds(config)
    removed = store.prune_indexes(cutoff)
    migrations = MigrationStore.from_url(config.broker.url).prune_index()
    if removed or migrations:
        log.info("expired records removed from the indexes",
                 extra={"jobs": removed, "migrations": migrations})
    return removed + migrations
