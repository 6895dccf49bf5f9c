"""``/migrations``: move an archive, follow it, steer it, and get its report.

The API only records a migration in Redis (:mod:`pacsfetch.migrations`); the scheduler's
leader plans and runs it through workers, so nothing here talks DICOM.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from pacsfetch.api.deps import get_config
from pacsfetch.api.schemas import MAX_CURSOR, MAX_OFFSET
from pacsfetch.config import Config
from pacsfetch.migrations import (
    MigrationNotFound,
    MigrationRecord,
    MigrationRequest,
    MigrationStore,
    StudyState,
)

router = APIRouter(prefix="/migrations", tags=["migrations"])


async def get_migrations(request: Request) -> MigrationStore:
    return request.app.state.migrations


ConfigDep = Annotated[Config, Depends(get_config)]
StoreDep = Annotated[MigrationStore, Depends(get_migrations)]


class MigrationAccepted(BaseModel):
    id: str
    status: str


class MigrationPage(BaseModel):
    items: list[MigrationRecord]
    total: int
    offset: int
    limit: int


class MigrationStudy(BaseModel):
    study_uid: str
    status: StudyState
    study_date: str | None = None
    instances_source: int | None = Field(None, description="As the source's C-FIND reported.")
    instances_destination: int | None = Field(None, description="Held by the stores when the "
                                              "study was skipped or verified.")
    job_id: str | None = None
    error: str | None = None
    missing: list[str] = Field(default_factory=list, description="For a mismatch: SOP Instance "
                               "UIDs the source holds and a store lacks (first 1000).")


class StudyPage(BaseModel):
    items: list[MigrationStudy]
    cursor: int = Field(description="Pass it back for the next page; 0 when there is none.")


def _refuse(loc: tuple[str | int, ...], message: str, kind: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", *loc), "msg": message, "type": kind}])


def _check(request: MigrationRequest, config: Config) -> None:
    source = config.sources.get(request.source)
    if source is None:
        raise _refuse(("source",), f"unknown source {request.source!r}; configured: "
                      f"{', '.join(sorted(config.sources)) or 'none'}", "unknown_source")
    for i, name in enumerate(request.stores):
        if name not in config.stores:
            raise _refuse(("stores", i), f"unknown store {name!r}; configured: "
                          f"{', '.join(sorted(config.stores)) or 'none'}", "unknown_store")
    if request.transport != "auto" and request.transport not in source.transports:
        raise _refuse(("transport",), f"source {request.source!r} does not offer transport "
                      f"{request.transport!r}; it offers: auto, {', '.join(source.transports)}",
                      "unknown_transport")


def _get(store: MigrationStore, mig_id: str) -> MigrationRecord:
    try:
        return store.get(mig_id)
    except MigrationNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no migration {mig_id!r}") from None


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=MigrationAccepted,
             responses={422: {"description": "A field is invalid; `detail[].loc` names it."}})
def create_migration(request: MigrationRequest, response: Response, config: ConfigDep,
                     store: StoreDep) -> MigrationAccepted:
    """Record a migration; the scheduler plans and runs it. Follow it at `Location`."""
    _check(request, config)
    record = store.create(request)
    response.headers["Location"] = f"/migrations/{record.id}"
    return MigrationAccepted(id=record.id, status=record.status.value)


@router.get("", response_model=MigrationPage)
def list_migrations(store: StoreDep, offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                    limit: Annotated[int, Query(ge=1, le=500)] = 50) -> MigrationPage:
    """Migrations, newest first."""
    items, total = store.list(offset, limit)
    return MigrationPage(items=items, total=total, offset=offset, limit=limit)


@router.get("/{mig_id}", response_model=MigrationRecord)
def get_migration(mig_id: str, store: StoreDep) -> MigrationRecord:
    """Status, study counts by state, instances and bytes moved, current rate and ETA."""
    return _get(store, mig_id)


@router.get("/{mig_id}/studies", response_model=StudyPage)
def migration_studies(mig_id: str, store: StoreDep,
                      status_filter: Annotated[StudyState | None, Query(alias="status")] = None,
                      cursor: Annotated[int, Query(ge=0, le=MAX_CURSOR)] = 0,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> StudyPage:
    """The plan, one page at a time (follow `cursor` until it is 0). With `status`, a page
    may hold fewer studies than `limit`, even none, before the end."""
    _get(store, mig_id)
    next_cursor, rows = store.studies_page(mig_id, cursor, limit, status_filter)
    items = []
    for row in rows:
        data: dict[str, Any] = row.as_dict()
        if row.state is StudyState.MISMATCH:
            data["missing"] = store.missing(mig_id, row.study_uid)
        items.append(MigrationStudy(**data))
    return StudyPage(items=items, cursor=next_cursor)


@router.post("/{mig_id}/pause", response_model=MigrationRecord)
def pause_migration(mig_id: str, store: StoreDep) -> MigrationRecord:
    """Feed no more studies; jobs already running finish and are verified."""
    _get(store, mig_id)
    return store.pause(mig_id, True)


@router.post("/{mig_id}/resume", response_model=MigrationRecord)
def resume_migration(mig_id: str, store: StoreDep) -> MigrationRecord:
    _get(store, mig_id)
    return store.pause(mig_id, False)


@router.post("/{mig_id}/retry-failed", response_model=MigrationRecord)
def retry_failed(mig_id: str, store: StoreDep) -> MigrationRecord:
    """Queue every failed or mismatched study again (a finished migration runs again)."""
    record = _get(store, mig_id)
    if record.status.value == "cancelled":
        raise HTTPException(status.HTTP_409_CONFLICT, "the migration was cancelled")
    store.retry_failed(mig_id)
    return store.get(mig_id)


@router.delete("/{mig_id}", response_model=MigrationRecord,
               responses={409: {"description": "The migration already finished."}})
def cancel_migration(mig_id: str, store: StoreDep) -> MigrationRecord:
    """Cancel: no more studies are fed, and the study jobs in flight are cancelled."""
    record = _get(store, mig_id)
    if record.status.is_final:
        raise HTTPException(status.HTTP_409_CONFLICT, f"migration already {record.status.value}")
    return store.cancel(mig_id)


@router.get("/{mig_id}/report", response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {}}}})
def migration_report(mig_id: str, store: StoreDep) -> StreamingResponse:
    """One CSV row per study: UIDs, date, counts at source and destination, status, the
    missing UIDs of a mismatch, and the error."""
    _get(store, mig_id)
    rows: Iterator[str] = store.report_csv(mig_id)
    return StreamingResponse(rows, media_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="migration-{mig_id}.csv"'})
