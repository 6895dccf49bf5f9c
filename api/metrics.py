"""``/metrics``: the API's own counters plus queue depth, job and migration counts read at
scrape time.

Queue depth and job counts live in Redis, shared by every API and worker replica; reading
them when Prometheus scrapes (a few LLEN and ZCARD calls) keeps them exact without any
process having to maintain a gauge. Like ``/healthz``, ``/metrics`` needs no bearer token:
scrapers rarely carry one, and it shows only counts labelled with configured names. Restrict
who reaches it at the network level (a Kubernetes NetworkPolicy, say) if that matters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pacsfetch.jobstore import JobStore
from pacsfetch.metrics import (
    JOBS_BY_STATUS,
    MIGRATION_BYTES_MOVED,
    MIGRATION_ETA,
    MIGRATION_INSTANCES_MOVED,
    MIGRATION_INSTANCES_PLANNED,
    MIGRATION_STUDIES,
    MIGRATIONS,
    QUEUE_MESSAGES,
)
from pacsfetch.migrations import MigrationStore, MigrationTotals
from pacsfetch.queue import QUEUE, priority_queue_keys

log = logging.getLogger(__name__)

router = APIRouter(tags=["metrics"])


class RedisStateCollector(Collector):
    """Queue depth per priority list, job counts per status and migration progress per
    source, read from Redis."""

    def __init__(self, client: redis.Redis, jobstore: JobStore,
                 migrations: MigrationStore) -> None:
        self._client = client
        self._jobstore = jobstore
        self._migrations = migrations

    def collect(self) -> Iterator[Metric]:
        try:
            keys = priority_queue_keys()
            pipe = self._client.pipeline(transaction=False)
            for key in keys.values():
                pipe.llen(key)
            lengths = pipe.execute()
            by_status = self._jobstore.count_by_status()
            migrations = self._migrations.totals()
        except redis.RedisError as exc:  # the scrape still shows the API's own counters
            log.warning("metrics: Redis unreachable", extra={"reason": str(exc)})
            return
        queue = GaugeMetricFamily(QUEUE_MESSAGES, "Messages waiting in the Redis queue.",
                                  labels=["queue", "priority"])
        for priority, length in zip(keys, lengths, strict=True):
            queue.add_metric([QUEUE, str(priority)], int(length))
        yield queue
        jobs = GaugeMetricFamily(JOBS_BY_STATUS, "Jobs in the job store, by status.",
                                 labels=["status"])
        for status, count in by_status.items():
            jobs.add_metric([status.value], count)
        yield jobs
        yield from _migration_metrics(migrations)


def _migration_metrics(totals: MigrationTotals) -> Iterator[Metric]:
    by_status = GaugeMetricFamily(MIGRATIONS, "Migrations Redis holds, by status.",
                                  labels=["status"])
    for status, count in sorted(totals.by_status.items()):
        by_status.add_metric([status], count)
    yield by_status
    studies = GaugeMetricFamily(MIGRATION_STUDIES, "Studies in migration plans, by source "
                                "and study state.", labels=["source", "state"])
    for (source, state), count in sorted(totals.studies.items()):
        studies.add_metric([source, state], count)
    yield studies
    for name, text, values in (
            (MIGRATION_INSTANCES_PLANNED, "Instances the source reported for the plans.",
             totals.instances_planned),
            (MIGRATION_INSTANCES_MOVED, "Instances moved by migrations.", totals.instances_moved),
            (MIGRATION_BYTES_MOVED, "Bytes moved by migrations.", totals.bytes_moved),
            (MIGRATION_ETA, "Longest ETA of an unfinished migration.", totals.eta)):
        family = GaugeMetricFamily(name, text, labels=["source"])
        for source, value in sorted(values.items()):
            family.add_metric([source], value)
        yield family


class _ProcessMetrics(Collector):
    """This process's counters (the default registry), beside the per-app collector."""

    def collect(self) -> Iterator[Metric]:
        return REGISTRY.collect()


def build_registry(broker_url: str, jobstore: JobStore) -> CollectorRegistry:
    """A registry per app, so tests can build many apps in one process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ProcessMetrics())
    registry.register(RedisStateCollector(redis.Redis.from_url(broker_url), jobstore,
                                          MigrationStore.from_url(broker_url)))
    return registry


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text exposition of the API's metrics."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
