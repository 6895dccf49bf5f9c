"""``/jobs``: submit, follow, list and cancel retrieve jobs."""

from __future__ import annotations

import json
from typing import Annotated

from celery import Celery
from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError

from pacsfetch import audit
from pacsfetch.api.auth import CallerDep
from pacsfetch.api.deps import get_celery, get_config, get_jobstore, get_submitter
from pacsfetch.api.schemas import (
    MAX_CURSOR,
    MAX_OFFSET,
    InstancePage,
    JobAccepted,
    JobBatch,
    JobBatchAccepted,
    JobPage,
    StoredInstance,
)
from pacsfetch.api.submit import GroupCommit, record_and_enqueue
from pacsfetch.config import Config
from pacsfetch.jobstore import JobNotFound, JobStore
from pacsfetch.metrics import JOBS_SUBMITTED
from pacsfetch.models import JobRecord, JobRequest, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])


ConfigDep = Annotated[Config, Depends(get_config)]
StoreDep = Annotated[JobStore, Depends(get_jobstore)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
SubmitterDep = Annotated[GroupCommit, Depends(get_submitter)]


def _field_error(field: str, message: str, kind: str,
                 where: tuple[str | int, ...] = ("body",)) -> RequestValidationError:
    return RequestValidationError([{"loc": (*where, field), "msg": message, "type": kind}])


def check_against_config(request: JobRequest, config: Config,
                         where: tuple[str | int, ...] = ("body",)) -> None:
    """Refuse names the configuration does not define, naming the field (422)."""
    source = config.sources.get(request.source)
    if source is None:
        raise _field_error("source", f"unknown source {request.source!r}; configured: "
                           f"{', '.join(sorted(config.sources)) or 'none'}", "unknown_source", where)
    configured = ', '.join(sorted(config.stores)) or 'none'
    if request.store is not None and request.store not in config.stores:
        raise _field_error("store", f"unknown store {request.store!r}; configured: {configured}",
                           "unknown_store", where)
    for i, name in enumerate(request.stores or ()):
        if name not in config.stores:
            raise RequestValidationError([{
                "loc": (*where, "stores", i), "type": "unknown_store",
                "msg": f"unknown store {name!r}; configured: {configured}"}])
    if request.transport != "auto" and request.transport not in source.transports:
        raise _field_error("transport", f"source {request.source!r} does not offer transport "
                           f"{request.transport!r}; it offers: auto, {', '.join(source.transports)}",
                           "unknown_transport", where)


def _job(store: JobStore, job_id: str) -> JobRecord:
    try:
        return store.get(job_id)
    except JobNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}") from None


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted,
             responses={422: {"description": "A field is invalid; `detail[].loc` names it."}})
async def submit_job(request: JobRequest, response: Response, config: ConfigDep,
                     submitter: SubmitterDep, caller: CallerDep) -> JobAccepted:
    """Record a retrieve job and put it on the queue; follow it at the `Location` URL."""
    check_against_config(request, config)
    record = await submitter.submit(request, caller.name)
    audit.record(config, "job.submit", record, caller.name)
    JOBS_SUBMITTED.labels(request.source, request.transport, request.store).inc()
    response.headers["Location"] = f"/jobs/{record.id}"
    return JobAccepted(id=record.id, status=record.status)


@router.post("/batch", status_code=status.HTTP_202_ACCEPTED, response_model=JobBatchAccepted,
             responses={422: {"description": "An entry is invalid; `detail[].loc` names its "
                              "index and field (`body.jobs.3.study_uid`); nothing was recorded."}})
def submit_jobs(batch: JobBatch, config: ConfigDep, store: StoreDep,
                celery: CeleryDep, caller: CallerDep) -> JobBatchAccepted:
    """Record and enqueue many jobs in one call (one Redis round trip to record them).

    Every entry is checked before anything is recorded: one bad entry refuses the batch.
    """
    for index, request in enumerate(batch.jobs):
        check_against_config(request, config, ("body", "jobs", index))
    records = record_and_enqueue(store, celery, batch.jobs, caller.name)
    audit.record(config, "job.submit", records, caller.name)
    return JobBatchAccepted(jobs=[JobAccepted(id=r.id, status=r.status) for r in records])


@router.get("", response_model=JobPage)
def list_jobs(store: StoreDep,
              status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
              offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
              limit: Annotated[int, Query(ge=1, le=500)] = 50) -> JobPage:
    """Jobs, newest first, optionally only those with one status."""
    items, total = store.list(status_filter, offset, limit)
    return JobPage(items=items, total=total, offset=offset, limit=limit)


_NOT_FOUND = {404: {"description": "No job with that id (or it expired: `[jobs] retention_days`)."}}


@router.get("/{job_id}", response_model=JobRecord, responses=_NOT_FOUND)
def get_job(job_id: str, store: StoreDep) -> JobRecord:
    """A job with its status, progress counters, timestamps, transport and error."""
    return _job(store, job_id)


@router.get("/{job_id}/instances", response_model=InstancePage, responses=_NOT_FOUND)
def job_instances(job_id: str, store: StoreDep,
                  cursor: Annotated[int, Query(ge=0, le=MAX_CURSOR)] = 0,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> InstancePage:
    """What the job wrote: each SOP instance and where each store put it."""
    _job(store, job_id)
    next_cursor, rows = store.scan_instances(job_id, cursor, limit)
    items = [StoredInstance(sop_instance_uid=sop, locations=_locations(raw)) for sop, raw in rows]
    return InstancePage(items=items, total=store.count_instances(job_id), cursor=next_cursor)


def _locations(raw: str) -> dict[str, str]:
    return json.loads(raw)


@router.delete("/{job_id}", response_model=JobRecord,
               responses={**_NOT_FOUND, 409: {"description": "The job already finished."}})
def cancel_job(job_id: str, store: StoreDep, config: ConfigDep, caller: CallerDep) -> JobRecord:
    """Cancel: a queued job at once; a running one is stopped with C-CANCEL by its worker."""
    job = _job(store, job_id)
    if job.status.is_final:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job already {job.status.value}")
    job = store.request_cancel(job_id)
    audit.record(config, "job.cancel", job, caller.name)
    return job
