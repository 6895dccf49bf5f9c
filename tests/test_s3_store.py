"""The S3 store against a real S3 API over HTTP (moto's server, signatures enforced).

Everything goes through boto3 speaking HTTP to a server the suite starts on loopback:
upload with checksums, multipart uploads of a large instance with bounded memory,
invisibility until commit, idempotent re-delivery, and the failures an operator must be able
to tell apart (bucket missing, credentials wrong, endpoint down, bad config keys).
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from pacsfetch.config import ConfigError, parse_config
from pacsfetch.errors import RetrieveError
from pacsfetch.plugins.contracts import IncomingInstance
from pacsfetch.plugins.dicomfile import read_identity
from pacsfetch.plugins.registry import get_registry
from pacsfetch.plugins.stores.s3 import MIB, S3Backend, S3Session, S3Settings
from pacsfetch.sandbox.peers import S3Server, free_port
from pacsfetch.sandbox.samples import SampleInstance, SampleStudy, generate_uniform_study


@pytest.fixture(scope="module")
def large_instance(tmp_path_factory: pytest.TempPathFactory) -> SampleInstance:
    """One 3200x3200 16-bit CT image: about 20 MiB, four 5 MiB parts and a remainder."""
    study = generate_uniform_study(tmp_path_factory.mktemp("large"), n_instances=1, rows=3200,
                                   columns=3200, patient_id="PF-TEST-LARGE", seed=3)
    return study.instances[0]


@pytest.fixture
def bucket(aws_credentials: S3Server) -> str:
    name = f"pf-{uuid.uuid4().hex[:12]}"
    aws_credentials.client().create_bucket(Bucket=name)
    return name


def spooled(sample: SampleInstance, spool: Path) -> IncomingInstance:
    """A sample file as the sink hands it to stores: a spooled copy and its identity."""
    spool.mkdir(exist_ok=True)
    path = spool / f"{uuid.uuid4().hex}.dcm"
    shutil.copyfile(sample.path, path)
    return IncomingInstance(read_identity(path), path, path.stat().st_size)


def open_session(server: S3Server, bucket: str, **settings: Any) -> S3Session:
    model = S3Settings(bucket=bucket, endpoint_url=server.url, region=server.region,
                       max_attempts=1, timeout=5, **settings)
    return S3Backend().open("archive", model, "job-" + uuid.uuid4().hex[:8])


def head(server: S3Server, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return server.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as exc:
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        return None


def test_instances_are_uploaded_under_the_prefix_with_a_verified_checksum(
    aws_credentials: S3Server, bucket: str, mixed_study: SampleStudy, tmp_path: Path
) -> None:
    session = open_session(aws_credentials, bucket, prefix="/migration/2026/")
    for sample in mixed_study.instances:
        instance = spooled(sample, tmp_path / "spool")
        key = (f"migration/2026/{sample.study_uid}/{sample.series_uid}/"
               f"{sample.sop_instance_uid}.dcm")
        staged = session.write(instance)
        assert head(aws_credentials, bucket, key) is None, "visible before commit"
        assert session.commit(staged) == f"s3://{bucket}/{key}"
        body = sample.path.read_bytes()
        stored = aws_credentials.client().get_object(Bucket=bucket, Key=key)
        assert stored["Body"].read() == body
        digest = hashlib.sha256(body)
        assert stored["Metadata"]["sha256"] == digest.hexdigest()
        meta = head(aws_credentials, bucket, key)
        assert meta is not None
        assert meta["ChecksumSHA256"] == base64.b64encode(digest.digest()).decode()
        assert meta["ContentType"] == "application/dicom"
    session.close()
    listed = aws_credentials.client().list_objects_v2(Bucket=bucket)
    assert listed["KeyCount"] == len(mixed_study.instances)
    assert all(o["Key"].startswith("migration/2026/") for o in listed["Contents"])


def test_large_instance_goes_up_in_parts_invisibly_and_with_bounded_memory(
    aws_credentials: S3Server, bucket: str, large_instance: SampleInstance, tmp_path: Path
) -> None:
    chunk = 5 * MIB
    session = open_session(aws_credentials, bucket, multipart_threshold=chunk,
                           multipart_chunksize=chunk, storage_class="STANDARD_IA", sse="AES256")
    instance = spooled(large_instance, tmp_path)
    assert instance.size > 3 * chunk
    sample = large_instance
    key = f"{sample.study_uid}/{sample.series_uid}/{sample.sop_instance_uid}.dcm"
    tracemalloc.start()
    try:
        staged = session.write(instance)
        uploads = aws_credentials.client().list_multipart_uploads(Bucket=bucket)
        assert [u["Key"] for u in uploads["Uploads"]] == [key]
        assert head(aws_credentials, bucket, key) is None, "visible before commit"
        session.commit(staged)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One part in memory (plus its copy in the HTTP layer), never the whole instance.
    assert peak < 2.5 * chunk < instance.size
    session.close()
    meta = head(aws_credentials, bucket, key)
    assert meta is not None
    parts = -(-instance.size // chunk)
    assert meta["ETag"].strip('"').endswith(f"-{parts}")
    assert meta["ContentLength"] == instance.size
    assert meta["StorageClass"] == "STANDARD_IA" and meta["ServerSideEncryption"] == "AES256"
    body = aws_credentials.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(sample.path.read_bytes()).digest()
    assert "Uploads" not in aws_credentials.client().list_multipart_uploads(Bucket=bucket)


def test_abort_and_close_leave_no_object_and_no_upload(
    aws_credentials: S3Server, bucket: str, large_instance: SampleInstance, tmp_path: Path
) -> None:
    session = open_session(aws_credentials, bucket, multipart_threshold=5 * MIB,
                           multipart_chunksize=5 * MIB)
    session.abort(session.write(spooled(large_instance, tmp_path)))
    session.write(spooled(large_instance, tmp_path))  # neither committed nor aborted
    session.close()
    client = aws_credentials.client()
    assert "Uploads" not in client.list_multipart_uploads(Bucket=bucket)
    assert client.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_redelivered_instance_is_not_uploaded_again(
    aws_credentials: S3Server, bucket: str, mixed_study: SampleStudy, tmp_path: Path
) -> None:
    client = aws_credentials.client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    sample = mixed_study.instances[0]
    first = open_session(aws_credentials, bucket)
    location = first.commit(first.write(spooled(sample, tmp_path)))
    first.close()
    again = open_session(aws_credentials, bucket)  # e.g. a retried job, or another job
    assert again.commit(again.write(spooled(sample, tmp_path))) == location
    again.close()
    versions = client.list_object_versions(Bucket=bucket)["Versions"]
    assert len(versions) == 1, "the identical re-delivery was uploaded a second time"


def test_changed_content_under_the_same_uid_replaces_the_object(
    aws_credentials: S3Server, bucket: str, mixed_study: SampleStudy, tmp_path: Path
) -> None:
    sample = mixed_study.instances[0]
    session = open_session(aws_credentials, bucket)
    location = session.commit(session.write(spooled(sample, tmp_path)))
    changed = spooled(sample, tmp_path)
    with changed.path.open("ab") as fh:
        fh.write(b"\0\0")  # a PACS re-sending the instance with a trailing padding change
    changed = IncomingInstance(changed.identity, changed.path, changed.size + 2)
    assert session.commit(session.write(changed)) == location
    session.close()
    key = location.removeprefix(f"s3://{bucket}/")
    body = aws_credentials.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == changed.path.read_bytes()


def test_missing_bucket_is_named(aws_credentials: S3Server) -> None:
    with pytest.raises(RetrieveError) as info:
        open_session(aws_credentials, "pf-no-such-bucket")
    assert info.value.kind == "store"
    assert "bucket 'pf-no-such-bucket' does not exist" in info.value.message
    assert "stores.archive.bucket" in info.value.message


def test_wrong_credentials_are_refused(
    aws_credentials: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(RetrieveError) as info:
        open_session(aws_credentials, bucket)
    assert info.value.kind == "store"
    assert f"S3 refused access to bucket {bucket!r}" in info.value.message
    assert "AWS_ACCESS_KEY_ID" in info.value.message
    assert "not-the-secret" not in info.value.message


def test_unreachable_endpoint_is_explained(aws_credentials: S3Server) -> None:
    port = free_port()  # nobody listens there
    model = S3Settings(bucket="pf-bucket", endpoint_url=f"http://127.0.0.1:{port}",
                       region="us-east-1", max_attempts=1, timeout=2)
    with pytest.raises(RetrieveError) as info:
        S3Backend().open("archive", model, "job")
    assert info.value.kind == "store"
    assert f"cannot reach the S3 endpoint http://127.0.0.1:{port}" in info.value.message


def test_endpoint_going_down_mid_job_fails_the_instance(
    tmp_path: Path, mixed_study: SampleStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    with S3Server(tmp_path / "s3") as server:
        for name, value in (("AWS_ACCESS_KEY_ID", server.access_key_id),
                            ("AWS_SECRET_ACCESS_KEY", server.secret_access_key)):
            monkeypatch.setenv(name, value)
        server.client().create_bucket(Bucket="pf-bucket")
        session = open_session(server, "pf-bucket")
        staged = session.write(spooled(mixed_study.instances[0], tmp_path / "spool"))
    with pytest.raises(RetrieveError) as info:
        session.commit(staged)
    session.close()
    assert "cannot reach the S3 endpoint" in info.value.message


@pytest.mark.parametrize(("settings", "message"), [
    ({"bucket": "pf-bucket", "buckt": "x"}, "stores.archive.buckt: unknown key"),
    ({}, "stores.archive.bucket: Field required"),
    ({"bucket": "Bad_Bucket"}, "stores.archive.bucket: Value error, not a valid S3 bucket"),
    ({"bucket": "pf-bucket", "prefix": "a/../b"}, "stores.archive.prefix: Value error"),
    ({"bucket": "pf-bucket", "layout": "/{SOPInstanceUID}"}, "stores.archive.layout: Value error"),
    ({"bucket": "pf-bucket", "multipart_chunksize": 1024}, "stores.archive.multipart_chunksize"),
    ({"bucket": "pf-bucket", "sse": "rot13"}, "stores.archive.sse"),
    ({"bucket": "pf-bucket", "aws_secret_access_key": "x"},
     "stores.archive.aws_secret_access_key: unknown key"),
])
def test_bad_keys_refuse_start_up(settings: dict[str, Any], message: str) -> None:
    config = parse_config({"stores": {"archive": {"plugin": "s3", **settings}}})
    with pytest.raises(ConfigError) as info:
        get_registry().check_config(config)
    assert message in str(info.value)
