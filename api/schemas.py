"""Response bodies of the HTTP API (requests use :class:`pacsfetch.models.JobRequest`)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from pacsfetch.models import JobRecord, JobStatus


class JobAccepted(BaseModel):
    id: str
    status: JobStatus


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
