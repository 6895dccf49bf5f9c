"""The object-storage store (``plugin = "s3"``): one object per instance in an S3 bucket.

Works with AWS S3 and S3-compatible stores (``endpoint_url``) through boto3; credentials come
from the standard AWS chain (environment, profile, instance role), never from the config.

Two-phase writes, honestly. S3 has no rename, so "stage invisibly, then make visible" is done
with the two primitives that make an object appear atomically at its final key:

* instances of at least ``multipart_threshold`` bytes are uploaded during ``write`` as a
  multipart upload to the final key, part by part from the spool file (memory holds one part
  at most); the object does not exist until ``commit`` completes the upload, and ``abort`` /
  ``close`` abort it. An upload left behind by a crash stays invisible (set a bucket lifecycle
  rule ``AbortIncompleteMultipartUpload`` to reclaim its space).
* smaller instances are staged by the sink's spool file, which stays in place until every
  store of the job has committed; ``commit`` sends them in one streamed PUT, which S3 makes
  visible whole or not at all. A staging object plus a server-side copy would triple the
  requests for the many small instances of a typical study without making anything safer.

Integrity: every object is sent with its SHA-256 (``x-amz-checksum-sha256``, which S3 checks
and keeps, and ``x-amz-meta-sha256`` for readers and re-deliveries) and its Content-MD5; the
ETag S3 computes from what it received is then compared with the MD5 we computed (per part and
in total for multipart uploads), so a corrupted transfer fails the instance even against a
server that ignores the checksum headers. With ``sse = "aws:kms"`` the ETag is not an MD5, and
S3's own SHA-256 check is what remains. A re-delivered instance whose object already holds the
same SHA-256 is not uploaded again (one HEAD per instance decides).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from pacsfetch import hookimpl
from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.plugins.contracts import IncomingInstance, StoreBackend
from pacsfetch.plugins.stores.layout import DEFAULT_LAYOUT, check_layout, render_layout
from pacsfetch.plugins.stores.listing import study_listing

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MIN_PART_SIZE = 5 * MIB
"""S3's smallest part of a multipart upload (every part but the last)."""
MAX_PART_SIZE = 5 * 1024 * MIB
READ_BLOCK = MIB
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_STORAGE_CLASS = re.compile(r"^[A-Z_]{1,32}$")


class S3Settings(BaseModel):
    """Keys of a ``[stores.NAME]`` section with ``plugin = "s3"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str = Field(description="Bucket that holds the store; it must exist.")
    prefix: str = Field("", description="Key prefix every object goes under (no '..').")
    layout: str = Field(DEFAULT_LAYOUT, description="Key template below the prefix.")
    region: str | None = Field(None, description="AWS region; default from the AWS chain.")
    endpoint_url: AnyHttpUrl | None = Field(None, description="For S3-compatible stores.")
    sse: Literal["AES256", "aws:kms"] | None = Field(None, description="Server-side encryption.")
    storage_class: str | None = Field(None, description="e.g. STANDARD_IA, INTELLIGENT_TIERING.")
    multipart_threshold: int = Field(
        16 * MIB, ge=MIN_PART_SIZE, description="Bytes from which an instance goes up in parts.")
    multipart_chunksize: int = Field(
        8 * MIB, ge=MIN_PART_SIZE, le=MAX_PART_SIZE,
        description="Bytes per part; also the most memory one upload holds.")
    timeout: float = Field(60.0, gt=0, description="Seconds for connect and each read.")
    max_attempts: int = Field(3, ge=1, le=10, description="Tries per request (botocore retries).")

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not _BUCKET_NAME.match(value) or ".." in value:
            raise ValueError("not a valid S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
        return value

    @field_validator("prefix")
    @classmethod
    def _clean_prefix(cls, value: str) -> str:
        value = value.strip("/")
        if value and any(part in ("", ".", "..") for part in value.split("/")):
            raise ValueError("must be a key prefix without empty, '.' or '..' segments")
        return value

    @field_validator("layout")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        return check_layout(value)

    @field_validator("storage_class")
    @classmethod
    def _storage_class(cls, value: str | None) -> str | None:
        if value is not None and not _STORAGE_CLASS.match(value):
            raise ValueError("must be an S3 storage class such as STANDARD_IA")
        return value


@dataclass(slots=True)
class _Digests:
    sha256: bytes
    md5: bytes

    @property
    def sha256_b64(self) -> str:
        return base64.b64encode(self.sha256).decode()


@dataclass(slots=True)
class _Staged:
    key: str
    path: Path
    size: int
    digests: _Digests
    present: bool = False
    """An identical object is already there (a re-delivery): commit uploads nothing."""
    upload_id: str | None = None
    parts: list[dict[str, Any]] = field(default_factory=list)
    part_md5s: list[bytes] = field(default_factory=list)


def _make_client(settings: S3Settings) -> Any:
    """A boto3 client of its own (boto3's default session is not thread-safe).

    boto3 is imported here, not with the plugin: every pacsfetch process loads the plugin,
    and boto3 costs a tenth of a second of start-up to jobs that never touch S3."""
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.session.Session().client(
        "s3",
        region_name=settings.region,
        endpoint_url=str(settings.endpoint_url) if settings.endpoint_url else None,
        config=BotoConfig(
            connect_timeout=settings.timeout,
            read_timeout=settings.timeout,
            retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        ),
    )


def _digests(path: Path) -> _Digests:
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while block := fh.read(READ_BLOCK):
            sha.update(block)
            md5.update(block)
    return _Digests(sha.digest(), md5.digest())


class S3Session:
    """One job writing into one bucket; see the module docstring for the two phases."""

    def __init__(self, settings: S3Settings, store_name: str, job_id: str) -> None:
        self._settings = settings
        self._store_name = store_name
        self._job_id = job_id
        self._bucket = settings.bucket
        self._endpoint = str(settings.endpoint_url) if settings.endpoint_url else None
        self._client = _make_client(settings)
        self._extra: dict[str, str] = {}
        if settings.sse:
            self._extra["ServerSideEncryption"] = settings.sse
        if settings.storage_class:
            self._extra["StorageClass"] = settings.storage_class
        self._check_etags = settings.sse != "aws:kms"
        self._pending: dict[str, str] = {}
        """Multipart uploads written but not yet completed or aborted: upload id -> key."""
        try:
            self._call("check the bucket", self._client.head_bucket, Bucket=self._bucket)
        except RetrieveError:
            self._client.close()
            raise

    @property
    def spool_dir(self) -> Path | None:
        return None

    def _key(self, instance: IncomingInstance) -> str:
        relative = render_layout(self._settings.layout, instance.identity)
        parts = relative.split("/")
        if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise RetrieveError(ErrorKind.STORE, "layout rendered a key outside the prefix")
        prefix = self._settings.prefix
        return f"{prefix}/{relative}" if prefix else relative

    def _location(self, key: str) -> str:
        return f"s3://{self._bucket}/{key}"

    def write(self, instance: IncomingInstance) -> _Staged:
        staged = _Staged(self._key(instance), instance.path, instance.size,
                         _digests(instance.path))
        if self._holds_identical(staged):
            staged.present = True
        elif staged.size >= self._settings.multipart_threshold:
            self._upload_parts(staged)
        return staged

    def _holds_identical(self, staged: _Staged) -> bool:
        try:
            head = self._client.head_object(Bucket=self._bucket, Key=staged.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._explain(exc, "check for an existing object") from None
        except BotoCoreError as exc:
            raise self._explain(exc, "check for an existing object") from None
        return bool(head.get("Metadata", {}).get("sha256") == staged.digests.sha256.hex()
                    and head.get("ContentLength") == staged.size)

    def _upload_parts(self, staged: _Staged) -> None:
        created = self._call(
            "start a multipart upload", self._client.create_multipart_upload,
            Bucket=self._bucket, Key=staged.key, ChecksumAlgorithm="SHA256",
            ContentType="application/dicom", Metadata={"sha256": staged.digests.sha256.hex()},
            **self._extra,
        )
        staged.upload_id = created["UploadId"]
        self._pending[staged.upload_id] = staged.key
        try:
            with staged.path.open("rb") as fh:
                number = 0
                while chunk := fh.read(self._settings.multipart_chunksize):
                    number += 1
                    self._upload_part(staged, number, chunk)
        except BaseException:
            self.abort(staged)
            raise

    def _upload_part(self, staged: _Staged, number: int, chunk: bytes) -> None:
        md5 = hashlib.md5(chunk, usedforsecurity=False).digest()
        sha = base64.b64encode(hashlib.sha256(chunk).digest()).decode()
        sent = self._call(
            "upload a part", self._client.upload_part,
            Bucket=self._bucket, Key=staged.key, UploadId=staged.upload_id, PartNumber=number,
            Body=chunk, ChecksumSHA256=sha, ContentMD5=base64.b64encode(md5).decode(),
        )
        self._verify_etag(sent.get("ETag"), md5.hex(), f"part {number}")
        staged.parts.append({"ETag": sent["ETag"], "PartNumber": number, "ChecksumSHA256": sha})
        staged.part_md5s.append(md5)

    def commit(self, staged: _Staged) -> str:
        if staged.present:
            return self._location(staged.key)
        if staged.upload_id is not None:
            done = self._call(
                "complete a multipart upload", self._client.complete_multipart_upload,
                Bucket=self._bucket, Key=staged.key, UploadId=staged.upload_id,
                MultipartUpload={"Parts": staged.parts},
            )
            self._pending.pop(staged.upload_id, None)
            expected = hashlib.md5(b"".join(staged.part_md5s), usedforsecurity=False).hexdigest()
            self._verify_or_remove(staged, done.get("ETag"), f"{expected}-{len(staged.parts)}")
        else:
            with staged.path.open("rb") as body:
                sent = self._call(
                    "upload an object", self._client.put_object,
                    Bucket=self._bucket, Key=staged.key, Body=body, ContentLength=staged.size,
                    ContentType="application/dicom", ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=staged.digests.sha256_b64,
                    ContentMD5=base64.b64encode(staged.digests.md5).decode(),
                    Metadata={"sha256": staged.digests.sha256.hex()}, **self._extra,
                )
            self._verify_or_remove(staged, sent.get("ETag"), staged.digests.md5.hex())
        return self._location(staged.key)

    def _verify_or_remove(self, staged: _Staged, etag: str | None, expected: str) -> None:
        """A visible object whose bytes are not ours must not stay visible."""
        try:
            self._verify_etag(etag, expected, "object")
        except RetrieveError:
            try:
                self._client.delete_object(Bucket=self._bucket, Key=staged.key)
            except (ClientError, BotoCoreError):
                log.error("could not remove a corrupted object", extra={
                    "job_id": self._job_id, "store": self._store_name})
            raise

    def _verify_etag(self, etag: str | None, expected: str, what: str) -> None:
        if self._check_etags and (etag or "").strip('"') != expected:
            raise RetrieveError(
                ErrorKind.STORE,
                f"bucket {self._bucket!r}: the {what} S3 stored does not match what was sent "
                f"(ETag {etag}, expected MD5 {expected}); the transfer was corrupted",
            )

    def abort(self, staged: _Staged) -> None:
        if staged.upload_id is not None:
            self._abort_upload(staged.upload_id)

    def _abort_upload(self, upload_id: str) -> None:
        key = self._pending.pop(upload_id, None)
        if key is None:
            return
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            # Still invisible; a lifecycle rule reclaims it. Nothing else can be done here.
            log.warning("could not abort a multipart upload", extra={
                "job_id": self._job_id, "store": self._store_name, "reason": type(exc).__name__})

    def sync(self) -> None:
        """Nothing to do: S3 acknowledges a PUT or a completed upload once it is durable."""

    def close(self) -> None:
        for upload_id in list(self._pending):
            self._abort_upload(upload_id)
        self._client.close()

    def _call(self, action: str, method: Any, **kwargs: Any) -> Any:
        try:
            return method(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._explain(exc, action) from None

    def _explain(self, exc: Exception, action: str) -> RetrieveError:
        """An operator-facing reason for a failed S3 call (never the key: it holds UIDs)."""
        bucket = self._bucket
        where = self._endpoint or "AWS S3"
        if isinstance(exc, NoCredentialsError):
            text = ("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                    "(or AWS_PROFILE, or an instance role) in the worker's environment")
        elif isinstance(exc, BotoConnectionError):
            text = f"cannot reach the S3 endpoint {where} ({type(exc).__name__}): is it up?"
        elif isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "unknown"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (action == "check the bucket" and status == 404):
                text = (f"bucket {bucket!r} does not exist at {where}: create it or fix "
                        f"stores.{self._store_name}.bucket")
            elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                          "InvalidToken", "ExpiredToken") or status == 403:
                text = (f"S3 refused access to bucket {bucket!r} ({code}): check the worker's "
                        "AWS credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and the "
                        "bucket policy")
            else:
                text = f"bucket {bucket!r}: {code}: {error.get('Message', '')}".rstrip(": ")
        else:
            text = f"bucket {bucket!r}: {type(exc).__name__}: {exc}"
        return RetrieveError(ErrorKind.STORE, f"could not {action}: {text}")


class S3Backend:
    name = "s3"
    settings_model = S3Settings

    def open(self, store_name: str, settings: BaseModel, job_id: str) -> S3Session:
        assert isinstance(settings, S3Settings)
        return S3Session(settings, store_name, job_id)

    def study_inventory(self, store_name: str, settings: BaseModel,
                        study_uid: str) -> frozenset[str] | None:
        """The study's instances as the bucket lists them now (one LIST per 1000 keys).

        Raises :class:`RetrieveError` (``store``) when the bucket cannot be listed."""
        assert isinstance(settings, S3Settings)
        listing = study_listing(settings.layout, study_uid)
        if listing is None:
            return None
        base = f"{settings.prefix}/" if settings.prefix else ""
        client = _make_client(settings)
        found: set[str] = set()
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=settings.bucket, Prefix=base + listing.prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    if uid := listing.sop_uid(item["Key"][len(base):]):
                        found.add(uid)
        except (ClientError, BotoCoreError) as exc:
            raise RetrieveError(ErrorKind.STORE, f"could not list bucket {settings.bucket!r} "
                                f"(stores.{store_name}): {type(exc).__name__}") from None
        finally:
            client.close()
        return frozenset(found)


@hookimpl
def pacsfetch_store_backends() -> list[StoreBackend]:
    return [S3Backend()]
