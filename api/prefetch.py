"""``/prefetch``: ask for a patient's prior studies before an exam, and see what happened.

The API only records the request (the shared intake, :mod:`pacsfetch.prefetch_intake`);
the scheduler starts it at ``scheduled_at - lead`` and a worker searches and fetches, so no
DICOM is spoken here. Showing a request reads its retrieve jobs' current status.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError

from pacsfetch.api.auth import CallerDep
from pacsfetch.api.deps import get_config, get_jobstore
from pacsfetch.config import Config
from pacsfetch.jobstore import JobNotFound, JobStore
from pacsfetch.prefetch import (
    FINAL,
    PrefetchNotFound,
    PrefetchRecord,
    PrefetchRequest,
    PrefetchStore,
)
from pacsfetch.prefetch_intake import NoRule, audit_prefetch, request_prefetch

router = APIRouter(prefix="/prefetch", tags=["prefetch"])

ConfigDep = Annotated[Config, Depends(get_config)]
JobsDep = Annotated[JobStore, Depends(get_jobstore)]


async def get_prefetch_store(request: Request) -> PrefetchStore:
    return request.app.state.prefetch


PrefetchDep = Annotated[PrefetchStore, Depends(get_prefetch_store)]


def _with_job_status(record: PrefetchRecord, jobs: JobStore) -> PrefetchRecord:
    candidates = []
    for cand in record.candidates:
        if cand.job_id is not None:
            try:
                cand = cand.model_copy(update={"job_status": jobs.get(cand.job_id).status.value})
            except JobNotFound:
                cand = cand.model_copy(update={"job_status": "unknown"})
        candidates.append(cand)
    return record.model_copy(update={"candidates": candidates})


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=PrefetchRecord,
             responses={422: {"description": "A field is invalid or no rule applies; "
                                             "`detail[].loc` names the field."}})
def create_prefetch(body: PrefetchRequest, response: Response, config: ConfigDep,
                    store: PrefetchDep, caller: CallerDep) -> PrefetchRecord:
    """Schedule a prefetch of the patient's priors; follow it at the `Location` URL. A second
    request for the same order (patient and accession number) returns the first while it
    is live; after a cancel, a new request schedules the order again."""
    try:
        record, _ = request_prefetch(store, config, body, "api", caller.name)
    except NoRule as exc:
        field = "rule" if body.rule is not None else "current"
        raise RequestValidationError([{"loc": ("body", field), "msg": str(exc),
                                       "type": "no_rule"}]) from None
    response.headers["Location"] = f"/prefetch/{record.id}"
    return record


@router.get("/{prefetch_id}", response_model=PrefetchRecord)
def get_prefetch(prefetch_id: str, store: PrefetchDep, jobs: JobsDep) -> PrefetchRecord:
    """Status, the rule and why it matched, each candidate prior with its decision and reason,
    and the retrieve job of each chosen prior."""
    try:
        return _with_job_status(store.get(prefetch_id), jobs)
    except PrefetchNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no prefetch {prefetch_id!r}") from None


@router.get("", response_model=list[PrefetchRecord])
def list_prefetches(store: PrefetchDep, jobs: JobsDep,
                    patient_id: Annotated[str, Query(min_length=1, max_length=64)],
                    limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[PrefetchRecord]:
    """A patient's prefetch requests, newest first."""
    return [_with_job_status(record, jobs) for record in store.for_patient(patient_id, limit)]


@router.delete("/{prefetch_id}", response_model=PrefetchRecord,
               responses={409: {"description": "The prefetch already finished."}})
def cancel_prefetch(prefetch_id: str, store: PrefetchDep, config: ConfigDep,
                    caller: CallerDep) -> PrefetchRecord:
    """Cancel a prefetch that has not finished (retrieve jobs already submitted go on: other
    requests may share them). A repeat of its order from the worklist or the RIS leaves it
    cancelled; a new `POST /prefetch` for it schedules it again."""
    try:
        record = store.get(prefetch_id)
    except PrefetchNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no prefetch {prefetch_id!r}") from None
    if record.status in FINAL:
        raise HTTPException(status.HTTP_409_CONFLICT, f"prefetch already {record.status.value}")
    cancelled = store.cancel(prefetch_id, f"cancelled by {caller.name}")
    audit_prefetch(config, "prefetch.cancel", cancelled, caller.name)
    return cancelled
