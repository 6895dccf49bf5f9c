"""Built-in plugin: job lifecycle metrics from the worker hooks.

Counts attempts, how long jobs waited in the queue, how they ended and how long they ran,
from ``pacsfetch_job_started`` and ``pacsfetch_job_finished``. Registered like any other
plugin, so a site can see how a metrics plugin of its own would plug in. Instance counters
are not here: the pipeline counts them itself (see :class:`pacsfetch.metrics.InstanceMeter`),
because it alone sees instances it refused and which transport delivered them.
"""

from __future__ import annotations

from pacsfetch import hookimpl
from pacsfetch.metrics import (
    JOB_ATTEMPTS,
    JOB_DURATION,
    JOB_FAILURES,
    JOB_QUEUED,
    JOBS_FINISHED,
    NO_TRANSPORT,
)
from pacsfetch.models import JobRecord, JobStatus

UNCLASSIFIED = "unclassified"
"""Error-kind label of a failed or partial job that carries no error kind."""


@hookimpl
def pacsfetch_job_started(job: JobRecord, attempt: int) -> None:
    source = job.request.source
    JOB_ATTEMPTS.labels(source).inc()
    # Later attempts restart the clock: only the first start measures the wait in the queue.
    if attempt == 1 and job.started_at is not None:
        waited = (job.started_at - job.created_at).total_seconds()
        JOB_QUEUED.labels(source).observe(max(0.0, waited))


@hookimpl
def pacsfetch_job_finished(job: JobRecord) -> None:
    source = job.request.source
    transport = job.transport or NO_TRANSPORT
    JOBS_FINISHED.labels(job.status.value, transport, source).inc()
    if job.status in (JobStatus.FAILED, JobStatus.PARTIAL):
        JOB_FAILURES.labels(job.error_kind or UNCLASSIFIED, transport, source).inc()
    if job.started_at is not None and job.finished_at is not None:
        JOB_DURATION.labels(job.status.value, source).observe(
            max(0.0, (job.finished_at - job.started_at).total_seconds()))
