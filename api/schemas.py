"""Response bodies of the HTTP API (requests use :class:`pacsfetch.models.JobRequest`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pacsfetch.models import JobRecord, JobRequest, JobStatus

MAX_BATCH = 1000
"""Jobs per ``POST /jobs/batch``: large enough to enqueue 10,000 in a few calls, small
enough that one request's validation and Redis round trip stay well under a second."""
MAX_OFFSET = 2**62
"""Largest list ``offset``: beyond any count, and Redis's 64-bit ranges still hold
``offset + limit`` (past them Redis refused the range and the API answered 500)."""
MAX_CURSOR = 2**64 - 1
"""Largest page ``cursor``: a Redis SCAN cursor is an unsigned 64-bit number."""

MAX_BATCH_SOP_UIDS = 100_000
"""SOP Instance UIDs in one batch, all jobs together: a full batch is then at most ~7 MB
of JSON and ~100 MB of API memory while it is parsed (1,000 jobs of 10,000 UIDs each, the
per-job limit, were 378 MB of JSON and took the API to 2.26 GB)."""


class JobAccepted(BaseModel):
    id: str
    status: JobStatus


class JobBatch(BaseModel):
    """Several jobs submitted together: all are recorded and enqueued, or none."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[JobRequest] = Field(min_length=1, max_length=MAX_BATCH, description=(
        f"1 to {MAX_BATCH} jobs, with at most {MAX_BATCH_SOP_UIDS} `sop_uids` in all."))

    @field_validator("jobs")
    @classmethod
    def _bounded_uids(cls, jobs: list[JobRequest]) -> list[JobRequest]:
        total = sum(len(job.sop_uids) for job in jobs)
        if total > MAX_BATCH_SOP_UIDS:
            raise ValueError(f"lists {total} sop_uids in all; a batch may list at most "
                             f"{MAX_BATCH_SOP_UIDS} (split it)")
        return jobs


class JobBatchAccepted(BaseModel):
    jobs: list[JobAccepted] = Field(description="In the order submitted.")


class JobPage(BaseModel):
    items: list[JobRecord]
    total: int = Field(description="Jobs matching the filter, over all pages.")
    offset: int
    limit: int


class StoredInstance(BaseModel):
    sop_instance_uid: str
    locations: dict[str, str] = Field(description="Store name -> where the instance is.")


class InstancePage(BaseModel):
    items: list[StoredInstance]
    total: int
    cursor: int = Field(description="Pass as `cursor` for the next page; 0 when done.")


class SourceInfo(BaseModel):
    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    transports: list[str]
    dicomweb_url: str | None = None


class EchoReply(BaseModel):
    ok: bool
    message: str
    elapsed_ms: float


class Health(BaseModel):
    status: str
    redis: str
