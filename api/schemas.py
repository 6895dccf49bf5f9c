"""Response bodies of the HTTP API (requests use :class:`pacsfetch.models.JobRequest`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pacsfetch.models import JobRecord, JobRequest, JobStatus

MAX_BATCH = 1000
"""Jobs per ``POST /jobs/batch``: large enough to enqueue 10,000 in a few calls, small
enough that one request's validation and Redis round trip stay well under a second."""


class JobAccepted(BaseModel):
    id: str
    status: JobStatus


class JobBatch(BaseModel):
    """Several jobs submitted together: all are recorded and enqueued, or none."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[JobRequest] = Field(min_length=1, max_length=MAX_BATCH)


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
