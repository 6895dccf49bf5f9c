"""``/migrations``: move an archive, follow it, steer it, and get its report.

The API only records a migration in Redis (:mod:`pacsfetch.migrations`); the scheduler's
leader plans and runs it through workers, so nothing here talks DICOM. Creating and steering
a migration reaches a whole archive, so it takes the ``admin`` scope; reading takes ``read``.
Creating and cancelling are audit events naming the caller (:mod:`pacsfetch.audit`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from pacsfetch import audit
from pacsfetch.api.auth import CallerDep, require_admin
from pacsfetch.api.deps import get_config
from pacsfetch.api.schemas import MAX_CURSOR, MAX_OFFSET
from pacsfetch.config import Config
from pacsfetch.migrations import (
    CSV_KEYS,
    CsvProblem,
    MigrationNotFound,
    MigrationRecord,
    MigrationRequest,
    MigrationStore,
    StudyState,
    read_key_csv,
)

router = APIRouter(prefix="/migrations", tags=["migrations"])


async def get_migrations(request: Request) -> MigrationStore:
    return request.app.state.migrations


ConfigDep = Annotated[Config, Depends(get_config)]
StoreDep = Annotated[MigrationStore, Depends(get_migrations)]
ADMIN = [Depends(require_admin)]
ADMIN_ANSWER = {403: {"description": "The token lacks the `admin` scope."}}


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


def _audit(config: Config, event: str, record: MigrationRecord, caller: str) -> None:
    """Source, stores and the filter's shape; list filters by their size only (they may be
    patient IDs, which the trail does not carry)."""
    flt = record.request.filter
    audit.write(config, [{
        "event": event, "caller": caller, "created_by": record.created_by,
        "migration_id": record.id, "source": record.request.source,
        "stores": list(record.request.stores), "status": record.status.value,
        "filter": {"from": flt.date_from, "to": flt.date_to, "modalities": flt.modalities,
                   "patient_ids": len(flt.patient_ids),
                   "accession_numbers": len(flt.accession_numbers),
                   "study_uids": len(flt.study_uids)}}])


def _create(request: MigrationRequest, response: Response, config: Config,
            store: MigrationStore, caller: str, in_query: bool = False) -> MigrationAccepted:
    try:
        _check(request, config)
    except RequestValidationError as exc:
        if not in_query:
            raise
        raise _in_query(exc.errors(), 1) from None
    record = store.create(request, created_by=caller)
    _audit(config, "migration.create", record, caller)
    response.headers["Location"] = f"/migrations/{record.id}"
    return MigrationAccepted(id=record.id, status=record.status.value)


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=MigrationAccepted,
             dependencies=ADMIN, responses={
                 **ADMIN_ANSWER,
                 422: {"description": "A field is invalid; `detail[].loc` names it."}})
def create_migration(request: MigrationRequest, response: Response, config: ConfigDep,
                     store: StoreDep, caller: CallerDep) -> MigrationAccepted:
    """Record a migration; the scheduler plans and runs it. Follow it at `Location`."""
    return _create(request, response, config, store, caller.name)


@router.post("/csv", status_code=status.HTTP_202_ACCEPTED, response_model=MigrationAccepted,
             dependencies=ADMIN, openapi_extra={"requestBody": {
                 "required": True, "content": {"text/csv": {"schema": {"type": "string"}}}}},
             responses={**ADMIN_ANSWER, 422: {
                 "description": "A parameter or a CSV cell is invalid: `detail[].loc` is "
                                "`[\"query\", NAME]` or `[\"body\", LINE, COLUMN]`."}})
async def create_migration_csv(
        http: Request, response: Response, config: ConfigDep, store: StoreDep,
        caller: CallerDep,
        source: Annotated[str, Query(min_length=1, max_length=64)],
        stores: Annotated[list[str], Query(alias="store", min_length=1, max_length=8)],
        key: Annotated[str | None, Query(
            pattern="^(" + "|".join(CSV_KEYS) + ")$",
            description="The column to read; needed for one column without a header.")] = None,
        date_from: Annotated[str | None, Query(alias="from", max_length=8)] = None,
        date_to: Annotated[str | None, Query(alias="to", max_length=8)] = None,
        modalities: Annotated[list[str] | None, Query(alias="modality", max_length=32)] = None,
        transport: Annotated[str, Query(min_length=1, max_length=32)] = "auto",
        priority: Annotated[int, Query(ge=0, le=9)] = 0,
        max_in_flight: Annotated[int, Query(ge=1, le=64)] = 4) -> MigrationAccepted:
    """A migration of the studies a CSV body lists (patient IDs, accession numbers or study
    UIDs, one per row, the first row naming the column); the other settings as query
    parameters, as in `POST /migrations`. A bad cell is answered 422 naming its line and
    column; nothing is recorded then."""
    try:
        text = (await http.body()).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _refuse((1,), "the CSV is not UTF-8", "csv") from None
    try:
        field, values, _ = read_key_csv(text, key)
    except CsvProblem as exc:
        loc: tuple[str | int, ...] = (exc.line, exc.column) if exc.column else (exc.line,)
        raise _refuse(loc, str(exc), "csv") from None
    flt: dict[str, Any] = {field: values, "modalities": modalities or []}
    if date_from:
        flt["from"] = date_from
    if date_to:
        flt["to"] = date_to
    try:
        request = MigrationRequest.model_validate({
            "source": source, "stores": stores, "filter": flt, "transport": transport,
            "priority": priority, "max_in_flight": max_in_flight})
    except ValidationError as exc:
        raise _in_query(exc.errors(), 0) from None
    return _create(request, response, config, store, caller.name, in_query=True)


def _in_query(errors: Sequence[Any], skip: int) -> RequestValidationError:
    """Errors about request fields (after *skip* leading loc parts) located at the query
    parameters that set them."""
    names = {"stores": "store", "modalities": "modality"}
    located = []
    for error in errors:
        loc = tuple(error["loc"][skip:])
        if loc[:1] == ("filter",):
            loc = loc[1:]
        if loc:
            loc = (names.get(str(loc[0]), loc[0]), *loc[1:])
        located.append({**error, "loc": ("query", *loc)})
    return RequestValidationError(located)


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


@router.post("/{mig_id}/pause", response_model=MigrationRecord, dependencies=ADMIN,
             responses=ADMIN_ANSWER)
def pause_migration(mig_id: str, store: StoreDep) -> MigrationRecord:
    """Feed no more studies; jobs already running finish and are verified."""
    _get(store, mig_id)
    return store.pause(mig_id, True)


@router.post("/{mig_id}/resume", response_model=MigrationRecord, dependencies=ADMIN,
             responses=ADMIN_ANSWER)
def resume_migration(mig_id: str, store: StoreDep) -> MigrationRecord:
    _get(store, mig_id)
    return store.pause(mig_id, False)


@router.post("/{mig_id}/retry-failed", response_model=MigrationRecord, dependencies=ADMIN,
             responses=ADMIN_ANSWER)
def retry_failed(mig_id: str, store: StoreDep) -> MigrationRecord:
    """Queue every failed or mismatched study again (a finished migration runs again)."""
    record = _get(store, mig_id)
    if record.status.value == "cancelled":
        raise HTTPException(status.HTTP_409_CONFLICT, "the migration was cancelled")
    store.retry_failed(mig_id)
    return store.get(mig_id)


@router.delete("/{mig_id}", response_model=MigrationRecord, dependencies=ADMIN,
               responses={**ADMIN_ANSWER,
                          409: {"description": "The migration already finished."}})
def cancel_migration(mig_id: str, store: StoreDep, config: ConfigDep,
                     caller: CallerDep) -> MigrationRecord:
    """Cancel: no more studies are fed, and the study jobs in flight are cancelled."""
    record = _get(store, mig_id)
    if record.status.is_final:
        raise HTTPException(status.HTTP_409_CONFLICT, f"migration already {record.status.value}")
    cancelled = store.cancel(mig_id)
    _audit(config, "migration.cancel", cancelled, caller.name)
    return cancelled


@router.get("/{mig_id}/report", response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {}}}})
def migration_report(mig_id: str, store: StoreDep) -> StreamingResponse:
    """One CSV row per study: UIDs, date, counts at source and destination, status, the
    missing UIDs of a mismatch, and the error."""
    _get(store, mig_id)
    rows: Iterator[str] = store.report_csv(mig_id)
    return StreamingResponse(rows, media_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="migration-{mig_id}.csv"'})
