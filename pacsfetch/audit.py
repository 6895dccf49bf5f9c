"""The audit trail: who asked for which study, from where, into which stores, and what came.

Hospitals must be able to say who accessed which patient's images (IHE ATNA, DICOM PS3.15
Annex A.5). Every API and worker process appends one JSON line per event to
``[audit] path``: a job submitted or cancelled (by the API, naming the caller), started and
finished (by the worker, naming who created the job). Each line is written with a single
``write`` on a file opened ``O_APPEND``, so processes sharing the file never interleave
lines, and nothing is ever rewritten. Events carry study UIDs, as the trail must, but no
patient names or IDs; the ordinary logs carry neither.

Fields: ``time``, ``event`` (``job.submit``, ``job.cancel``, ``job.start``, ``job.finish``,
or another feature's), ``atna_event`` (the DICOM event code where one fits), ``caller``,
``created_by``, ``job_id``, ``origin``, ``source``, ``level``, ``study_uids``, ``series_uid``,
``sop_count``, ``stores``, ``status``, ``counts``, ``error_kind``, ``host``, ``pid``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pacsfetch.config import Config
from pacsfetch.metrics import AUDIT_WRITE_FAILURES
from pacsfetch.models import JobRecord, JobStatus

ATNA_EVENTS = {
    "job.start": "110102 Begin Transferring DICOM Instances",
    "job.finish": "110104 DICOM Instances Transferred",
}
"""DICOM audit event IDs (PS3.16 CID 400) for the events that are transfers."""

ATNA_OUTCOMES = {JobStatus.SUCCEEDED: 0, JobStatus.PARTIAL: 4, JobStatus.CANCELLED: 4,
                 JobStatus.FAILED: 8}
"""EventOutcomeIndicator: 0 success, 4 minor failure, 8 serious failure."""

log = logging.getLogger(__name__)

_lock = threading.Lock()
_files: dict[tuple[int, Path], int] = {}


def _fd(path: Path) -> int:
    """This process's descriptor for *path* (a forked worker opens its own)."""
    key = (os.getpid(), path)
    with _lock:
        fd = _files.get(key)
        if fd is None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            _files[key] = fd
        return fd


def job_event(event: str, job: JobRecord, caller: str | None = None,
              **extra: Any) -> dict[str, Any]:
    """The audit line for *event* on *job*; *caller* defaults to who created the job."""
    request = job.request
    line: dict[str, Any] = {
        "event": event, "caller": caller or job.created_by or "unknown",
        "created_by": job.created_by, "job_id": job.id, "origin": job.origin,
        "source": request.source, "level": request.level.value,
        "study_uids": [request.study_uid], "series_uid": request.series_uid,
        "sop_count": len(request.sop_uids), "stores": request.store_names,
        "status": job.status.value,
    }
    if event in ATNA_EVENTS:
        line["atna_event"] = ATNA_EVENTS[event]
    if job.status.is_final:
        progress = job.progress
        line["atna_outcome"] = ATNA_OUTCOMES[job.status]
        line["counts"] = {"completed": progress.completed, "failed": progress.failed,
                          "warning": progress.warning, "skipped": progress.skipped,
                          "bytes": progress.bytes}
        line["error_kind"] = job.error_kind
    return {**line, **extra}


def write(config: Config, events: Iterable[dict[str, Any]]) -> None:
    """Append *events* (one line each, stamped with time, host and pid) in one write.

    A failed write is logged and counted (``pacsfetch_audit_write_failures_total``, alert
    on it), never raised: the job it describes is already recorded and queued, or running,
    and failing the caller or the worker then would lose track of it, not audit it."""
    path = config.audit.path
    if path is None:
        return
    stamp = {"time": datetime.now(UTC).isoformat(), "host": socket.gethostname(),
             "pid": os.getpid()}
    lines = [json.dumps({**stamp, **e}, separators=(",", ":")) + "\n" for e in events]
    if not lines:
        return
    try:
        os.write(_fd(path), "".join(lines).encode())
    except OSError as exc:
        AUDIT_WRITE_FAILURES.inc(len(lines))
        log.error("could not append to the audit trail",
                  extra={"events": len(lines), "reason": exc.strerror or type(exc).__name__})


def record(config: Config, event: str, jobs: JobRecord | Sequence[JobRecord],
           caller: str | None = None, **extra: Any) -> None:
    """Append one audit line per job for *event* (the one-line call sites use)."""
    jobs = [jobs] if isinstance(jobs, JobRecord) else jobs
    write(config, (job_event(event, job, caller, **extra) for job in jobs))
