"""Every Prometheus metric of pacsfetch: names, labels, buckets, and serving them.

One module, so the API, the workers and the move receiver count with the same vocabulary
and the Grafana dashboard has one place to agree with. Names follow Prometheus conventions
(prefix ``pacsfetch_``, base units, ``_total`` on counters, which prometheus-client appends).

Label values come only from bounded sets the configuration or the code defines: source and
store names from the config, transport names, job statuses, error kinds, DICOM service names.
Never a UID, an AE title a caller sent, or anything from a data set: label values are kept
forever by Prometheus and shown to whoever sees a dashboard.

Workers run under Celery's prefork pool, so ``pacsfetch worker`` switches prometheus-client
to multiprocess mode (see :mod:`pacsfetch.metrics_dir`) and serves the sum over its child
processes; gauges therefore declare how their per-process values combine.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

from pacsfetch import health
from pacsfetch.config import ConfigError, MetricsConfig
from pacsfetch.metrics_dir import MULTIPROC_ENV
from pacsfetch.procs import pid_alive

NO_TRANSPORT = "none"
"""Transport label of a job that ended before any transport ran (bad config, crash)."""

# Seconds: a single instance retrieve takes well under a second, a migrated study hours.
JOB_DURATION_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
QUEUED_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)
# Bytes per second of one association: from a slow WAN link to a 10 Gbit/s LAN.
THROUGHPUT_BUCKETS = (1e5, 5e5, 1e6, 2.5e6, 5e6, 1e7, 2.5e7, 5e7, 1e8, 2.5e8, 5e8, 1e9)

# --- API ----------------------------------------------------------------------------------
JOBS_SUBMITTED = Counter(
    "pacsfetch_jobs_submitted", "Jobs accepted by the API and put on the queue.",
    ["source", "transport", "store"],
)
QUEUE_MESSAGES = "pacsfetch_queue_messages"
"""Gauge collected by the API at scrape time: messages waiting in the Redis queue, by
queue and job priority (9 most urgent)."""
JOBS_BY_STATUS = "pacsfetch_jobs"
"""Gauge collected by the API at scrape time: jobs in the job store, by status."""
MIGRATIONS = "pacsfetch_migrations"
"""Gauge collected by the API at scrape time: migrations Redis holds, by status."""
MIGRATION_STUDIES = "pacsfetch_migration_studies"
"""Gauge (scrape time): studies in migration plans, by source and study state (`planned`,
`running`, `skipped`, `verified`, `mismatch`, `failed`)."""
MIGRATION_INSTANCES_PLANNED = "pacsfetch_migration_instances_planned"
"""Gauge (scrape time): instances the sources reported for the plans, by source."""
MIGRATION_INSTANCES_MOVED = "pacsfetch_migration_instances_moved"
"""Gauge (scrape time): instances moved by migrations, by source. A gauge, not a counter:
it is read from the migration records, which expire after the retention."""
MIGRATION_BYTES_MOVED = "pacsfetch_migration_bytes_moved"
"""Gauge (scrape time): bytes moved by migrations, by source."""
MIGRATION_ETA = "pacsfetch_migration_eta_seconds"
"""Gauge (scrape time): the longest ETA of an unfinished migration, by source."""
SCRAPE_TIME_METRICS = (QUEUE_MESSAGES, JOBS_BY_STATUS, MIGRATIONS, MIGRATION_STUDIES,
                       MIGRATION_INSTANCES_PLANNED, MIGRATION_INSTANCES_MOVED,
                       MIGRATION_BYTES_MOVED, MIGRATION_ETA)

# --- workers: jobs ------------------------------------------------------------------------
JOB_ATTEMPTS = Counter(
    "pacsfetch_job_attempts", "Attempts workers started at jobs (first runs and retries).",
    ["source"],
)
JOB_RETRIES = Counter(
    "pacsfetch_job_retries", "Attempts that failed in a retryable way and were re-queued.",
    ["source", "error_kind"],
)
JOBS_FINISHED = Counter(
    "pacsfetch_jobs_finished", "Jobs that reached a final status.",
    ["status", "transport", "source"],
)
JOB_FAILURES = Counter(
    "pacsfetch_job_failures", "Jobs that ended failed or partial, by the kind of their error.",
    ["error_kind", "transport", "source"],
)
JOB_DURATION = Histogram(
    "pacsfetch_job_duration_seconds",
    "Running time of a job's final attempt, from its start to its final status.",
    ["status", "source"], buckets=JOB_DURATION_BUCKETS,
)
JOB_QUEUED = Histogram(
    "pacsfetch_job_queued_seconds", "Time from a job's submission to its first start.",
    ["source"], buckets=QUEUED_BUCKETS,
)
JOBS_IN_FLIGHT = Gauge(
    "pacsfetch_jobs_in_flight", "Job attempts running now.", ["source"],
    multiprocess_mode="livesum",
)

# --- workers: instances (the hot path: one inc per instance) ------------------------------
INSTANCES_RECEIVED = Counter(
    "pacsfetch_instances_received", "Instances a transport handed over, stored or not.",
    ["transport", "source"],
)
RECEIVED_BYTES = Counter(
    "pacsfetch_received_bytes", "Bytes of the instances a transport handed over.",
    ["transport", "source"],
)
INSTANCES_STORED = Counter(
    "pacsfetch_instances_stored", "Instances committed to a store.",
    ["transport", "source", "store"],
)
STORED_BYTES = Counter(
    "pacsfetch_stored_bytes", "Bytes of the instances committed to a store.",
    ["transport", "source", "store"],
)
INSTANCE_FAILURES = Counter(
    "pacsfetch_instance_failures",
    "Instances received but not stored, by reason (out-of-scope, invalid, store-failed).",
    ["reason", "transport", "source"],
)

# --- workers: DICOM associations ----------------------------------------------------------
ASSOCIATIONS_OPENED = Counter(
    "pacsfetch_associations_opened", "Associations established with a PACS, by DICOM service.",
    ["source", "service"],
)
ASSOCIATIONS_OPEN = Gauge(
    "pacsfetch_associations_open", "Associations with a PACS open now.", ["source"],
    multiprocess_mode="livesum",
)
ASSOCIATION_THROUGHPUT = Histogram(
    "pacsfetch_association_throughput_bytes_per_second",
    "Bytes received per second over the life of one association.",
    ["source", "service"], buckets=THROUGHPUT_BUCKETS,
)

ASSOCIATION_SLOT_WAITING = Gauge(
    "pacsfetch_association_slot_waiting",
    "Callers waiting now to open an association to a PACS, by reason: `slot` (the source's "
    "max_associations are in use) or `window` (bulk work outside the source's time windows).",
    ["source", "reason"], multiprocess_mode="livesum",
)
ASSOCIATION_SLOT_WAIT = Histogram(
    "pacsfetch_association_slot_wait_seconds",
    "How long callers that had to wait waited for an association slot.",
    ["source"], buckets=QUEUED_BUCKETS,
)

# --- prefetch (API, HL7 listener, workers, scheduler) ---------------------------------------
PREFETCH_REQUESTS = Counter(
    "pacsfetch_prefetch_requests",
    "Prefetch requests by trigger (`api`, `hl7`, `worklist`) and outcome: at intake "
    "`accepted`, `duplicate` (joined the same order's request), `no-rule`, `cancelled`; at the "
    "end `done` or `failed`.",
    ["trigger", "outcome"],
)
PREFETCH_PRIORS = Counter(
    "pacsfetch_prefetch_priors",
    "Candidate priors by decision: `chosen`, `left-out`, `in-place` (held already, skipped), "
    "`fetched` (its retrieve succeeded), `failed`.",
    ["decision"],
)
# Seconds before the exam that all priors were in place; negative when late.
LEAD_TIME_BUCKETS = (-3600, -600, -60, 0, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400,
                     86400)
PREFETCH_LEAD_TIME = Histogram(
    "pacsfetch_prefetch_lead_time_seconds",
    "How long before scheduled_at a prefetch had every chosen prior in place (negative: late).",
    buckets=LEAD_TIME_BUCKETS,
)

# --- move receiver: trust ---------------------------------------------------------------
RECEIVER_REFUSALS = Counter(
    "pacsfetch_receiver_refusals",
    "Associations and instances the move receiver refused, by reason (see "
    "pacsfetch.workers.receiver_policy.Refusal: unknown-address, busy, idle, wrong-peer, "
    "not-planned, conflicting-copy, tls).",
    ["reason"],
)

# --- audit trail (pacsfetch/audit.py) -----------------------------------------------------
AUDIT_WRITE_FAILURES = Counter(
    "pacsfetch_audit_write_failures",
    "Audit events that could not be appended to [audit] path (full disk, permissions).",
)


class InstanceMeter:
    """The instance counters of one job attempt with one transport, labels bound once.

    Binding label values costs a dictionary lookup under a lock; doing it once per attempt
    leaves one increment per counter on the per-instance path.
    """

    def __init__(self, transport: str, source: str, stores: Iterable[str]) -> None:
        self._received = INSTANCES_RECEIVED.labels(transport, source)
        self._received_bytes = RECEIVED_BYTES.labels(transport, source)
        self._stored = [
            (INSTANCES_STORED.labels(transport, source, store),
             STORED_BYTES.labels(transport, source, store))
            for store in stores
        ]
        self._transport, self._source = transport, source

    def received(self, size: int) -> None:
        self._received.inc()
        self._received_bytes.inc(size)

    def stored(self, size: int) -> None:
        for count, volume in self._stored:
            count.inc()
            volume.inc(size)

    def refused(self, reason: str) -> None:
        INSTANCE_FAILURES.labels(reason, self._transport, self._source).inc()


_DEFINED = (
    JOBS_SUBMITTED, JOB_ATTEMPTS, JOB_RETRIES, JOBS_FINISHED, JOB_FAILURES, JOB_DURATION,
    JOB_QUEUED, JOBS_IN_FLIGHT, INSTANCES_RECEIVED, RECEIVED_BYTES, INSTANCES_STORED,
    STORED_BYTES, INSTANCE_FAILURES, ASSOCIATIONS_OPENED, ASSOCIATIONS_OPEN,
    ASSOCIATION_THROUGHPUT, ASSOCIATION_SLOT_WAITING, ASSOCIATION_SLOT_WAIT,
    PREFETCH_REQUESTS, PREFETCH_PRIORS, PREFETCH_LEAD_TIME,
    RECEIVER_REFUSALS,
)


def metric_names() -> set[str]:
    """Every metric family name pacsfetch exposes, as PromQL sees it (without suffixes)."""
    names = {metric.name for collector in _DEFINED for metric in collector.describe()}
    return names | set(SCRAPE_TIME_METRICS)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def forget_process(pid: int) -> None:
    """Drop the live gauges of a worker child that exited (Celery's process shutdown)."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(pid)


class _LiveProcessCollector(multiprocess.MultiProcessCollector):
    """Sums the processes' files, first dropping live gauges of processes that are gone.

    A pool child killed outright (the OOM killer, SIGKILL) never runs Celery's shutdown
    signal, so its in-flight jobs and open associations would otherwise count forever.
    """

    def collect(self) -> Iterable[Metric]:
        for path in Path(os.environ[MULTIPROC_ENV]).glob("gauge_live*_*.db"):
            pid = path.stem.rpartition("_")[2]
            if pid.isdigit() and not pid_alive(int(pid)):
                multiprocess.mark_process_dead(int(pid))
        return super().collect()


def serving_registry() -> CollectorRegistry:
    """What a metrics port serves: the sum over all processes in multiprocess mode."""
    if not multiprocess_enabled():
        return REGISTRY
    registry = CollectorRegistry()
    _LiveProcessCollector(registry)
    return registry


def serve(port: int, bind: str, key: str) -> None:
    """Serve the metrics on *bind*:*port* from a background thread of this process.

    Raises :class:`ConfigError` naming *key* when the port cannot be used, so a second
    worker on the same host fails at start-up instead of silently exporting nothing.
    """
    try:
        health.serve(port, bind, serving_registry())  # also /healthz and /readyz
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{key}: cannot serve metrics on {bind}:{port}: {reason}") from None


def serve_worker_metrics(config: MetricsConfig) -> None:
    """Serve a worker's metrics on ``[metrics] worker_port`` unless metrics are disabled."""
    if config.enabled:
        serve(config.worker_port, config.bind, "metrics.worker_port")


def serve_receiver_metrics(config: MetricsConfig) -> None:
    """Serve the move receiver's metrics on ``[metrics] receiver_port`` (one call at start)."""
    if config.enabled:
        serve(config.receiver_port, config.bind, "metrics.receiver_port")


def serve_hl7_metrics(config: MetricsConfig) -> None:
    """Serve the HL7 listener's metrics on ``[metrics] hl7_port``."""
    if config.enabled:
        serve(config.hl7_port, config.bind, "metrics.hl7_port")


def serve_scheduler_metrics(config: MetricsConfig) -> None:
    """Serve the scheduler's metrics (worklist intake, prefetch lead times) on
    ``[metrics] scheduler_port``."""
    if config.enabled:
        serve(config.scheduler_port, config.bind, "metrics.scheduler_port")
