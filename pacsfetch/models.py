"""The job: what a caller asks for, and what the system tells about it.

These models are shared by the API (request and response bodies), the job-state store and
the workers, so that all three agree on one vocabulary.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from pacsfetch.uids import UID_MAX_LENGTH, UID_PATTERN, check_uid

UID = Annotated[str, AfterValidator(check_uid), WithJsonSchema({
    "type": "string", "pattern": f"^{UID_PATTERN}$", "minLength": 3,
    "maxLength": UID_MAX_LENGTH,
    "description": "A DICOM UID: digits and dots, no leading zeros, at most 64 characters."})]

BULK_ORIGINS = frozenset({"migration"})
"""Job origins whose work is bulk: it leaves reserved association slots to other work, keeps
to the source's time windows, and gives way to more urgent work (see ``pacsfetch.gate``)."""

MAX_SOP_UIDS_PER_JOB = 10_000
MAX_STORES_PER_JOB = 8


class Level(StrEnum):
    """Query/Retrieve level of a job (Study Root information model)."""

    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.PARTIAL, JobStatus.FAILED, JobStatus.CANCELLED}
)


class JobRequest(BaseModel):
    """What to retrieve, from where, into which store."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={
        # The store/stores rule, stated for clients and schema-driven test tools.
        "oneOf": [{"required": ["store"], "not": {"required": ["stores"]}},
                  {"required": ["stores"], "not": {"required": ["store"]}}]})

    source: str = Field(min_length=1, description="Name of a `[sources.NAME]` section.")
    level: Level = Level.STUDY
    study_uid: UID = Field(description="Study Instance UID (required at every level).")
    series_uid: UID | None = Field(None, description="Series Instance UID; required for SERIES.")
    sop_uids: list[UID] = Field(
        default_factory=list,
        max_length=MAX_SOP_UIDS_PER_JOB,
        description="SOP Instance UIDs; required for IMAGE.",
    )
    transport: str = Field("auto", min_length=1, description="`auto` or a transport name.")
    store: str | None = Field(
        None, min_length=1, description="Name of a `[stores.NAME]` section (give this or `stores`)."
    )
    stores: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None,
        min_length=1,
        max_length=MAX_STORES_PER_JOB,
        validate_default=True,
        description="Several `[stores.NAME]` sections, written together: an instance counts as "
        "stored only once every one has committed it (give this or `store`).",
    )
    priority: int = Field(5, ge=0, le=9, description="0 (lowest) to 9 (most urgent).")

    @field_validator("stores")
    @classmethod
    def _store_or_stores(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if "store" not in info.data:  # ``store`` itself was invalid, and its error says so
            return value
        if value is not None and info.data["store"] is not None:
            raise ValueError("give either store or stores, not both")
        if value is None and info.data["store"] is None:
            raise ValueError("name where to write: give store or stores")
        if value is not None and len(set(value)) != len(value):
            raise ValueError("lists a store twice")
        return value

    @property
    def store_names(self) -> list[str]:
        """Every store the job writes to, in the order given."""
        return list(self.stores) if self.stores is not None else [str(self.store)]

    @model_validator(mode="after")
    def _level_has_its_uids(self) -> Self:
        if self.level is Level.SERIES and not self.series_uid:
            raise ValueError("series_uid is required when level is SERIES")
        if self.level is Level.IMAGE and not self.sop_uids:
            raise ValueError("sop_uids is required when level is IMAGE")
        if self.level is not Level.IMAGE and self.sop_uids:
            raise ValueError("sop_uids is only allowed when level is IMAGE")
        if self.level is Level.STUDY and self.series_uid:
            raise ValueError("series_uid is not allowed when level is STUDY")
        if len(set(self.sop_uids)) != len(self.sop_uids):
            raise ValueError("sop_uids lists a UID twice")
        return self


class Progress(BaseModel):
    """Counters of one job, as the PACS and the stores report them."""

    completed: int = 0
    failed: int = 0
    warning: int = 0
    remaining: int | None = Field(None, description="Unknown until the PACS first reports it.")
    skipped: int = Field(0, description="Instances a resumed job already had stored.")
    bytes: int = 0


class TransportNote(BaseModel):
    """Why a transport of an ``auto`` job gave way to the next one in the source's list."""

    transport: str
    error_kind: str
    error: str


class JobRecord(BaseModel):
    """A job as the API shows it."""

    id: str
    status: JobStatus
    request: JobRequest
    progress: Progress = Progress()
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    transport: str | None = Field(None, description="The transport that ran (last) attempt.")
    transport_notes: list[TransportNote] = Field(
        default_factory=list,
        description="With transport `auto`: each transport that was tried before `transport` "
        "and why it did not do (all of) the job.",
    )
    attempts: int = 0
    error: str | None = Field(None, description="Why the job failed or is partial, for operators.")
    error_kind: str | None = Field(None, description="Machine-readable class of `error`.")
    cancel_requested: bool = False
    waiting_for: str | None = Field(
        None, description="While running: what the job waits for before it can go on (an "
        "association slot of its source, or the source's time window).",
    )
    origin: str = Field(
        "api", description="What created the job: `api` (a caller), or a feature such as "
        "`migration` or `prefetch` (whose work is scheduled by priority and windows).",
    )
    created_by: str | None = Field(
        None, description="Who created the job: the API token's name, or the service's "
        "(`hl7-listener`, `scheduler`); `anonymous` while the API needs no token.",
    )
