"""Store chaining: one job writing to several stores, succeeding only when all have each
instance. Inline runs (no broker) retrieve by C-GET from a real Orthanc into the filesystem,
S3 (moto's server over HTTP) and a DCMTK storescp standing in for the new archive."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from helpers import make_config, run_job, write_toml

from pacsfetch.api.app import create_app
from pacsfetch.cli import main
from pacsfetch.config import Config, StoreConfig
from pacsfetch.models import JobRequest, JobStatus
from pacsfetch.sandbox.peers import Orthanc, S3Server, StoreScp, free_port
from pacsfetch.sandbox.samples import SampleStudy
from pacsfetch.workers.state import LocalJobState


@pytest.fixture(scope="module")
def new_archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreScp]:
    with StoreScp(tmp_path_factory.mktemp("new-archive"), aet="NEWPACS") as server:
        yield server


@pytest.fixture
def bucket(aws_credentials: S3Server) -> str:
    name = f"pf-{uuid.uuid4().hex[:12]}"
    aws_credentials.client().create_bucket(Bucket=name)
    return name


def dataset_bytes(part10: bytes) -> bytes:
    """The data set of a Part-10 file, without the file meta its writer chose."""
    group_length = int.from_bytes(part10[140:144], "little")
    return part10[144 + group_length :]


def with_stores(config: Config, **stores: dict[str, Any]) -> Config:
    added = {name: StoreConfig(**settings) for name, settings in stores.items()}
    return config.model_copy(update={"stores": {**config.stores, **added}})


def s3_store(server: S3Server, bucket: str) -> dict[str, Any]:
    return {"plugin": "s3", "bucket": bucket, "endpoint_url": server.url,
            "region": server.region, "prefix": "migrated", "max_attempts": 1, "timeout": 5}


def test_one_job_writes_filesystem_s3_and_forwards(
    config_factory: Callable[..., Config], orthanc: Orthanc, mixed_study: SampleStudy,
    aws_credentials: S3Server, bucket: str, new_archive: StoreScp, tmp_path: Path,
) -> None:
    config = with_stores(
        config_factory(orthanc=orthanc, store_root=tmp_path / "fs"),
        archive=s3_store(aws_credentials, bucket),
        newpacs={"plugin": "dicom", "ae_title": new_archive.aet, "host": "127.0.0.1",
                 "port": new_archive.port, "timeout": 10},
    )
    state = LocalJobState()
    request = JobRequest(source="orthanc", study_uid=mixed_study.study_uid,
                         stores=["local", "archive", "newpacs"])
    outcome = run_job(config, request, state)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.progress.completed == len(mixed_study.instances)
    assert set(state.instances) == {i.sop_instance_uid for i in mixed_study.instances}
    s3 = aws_credentials.client()
    for sample in mixed_study.instances:
        locations = json.loads(state.instances[sample.sop_instance_uid])
        relative = f"{sample.study_uid}/{sample.series_uid}/{sample.sop_instance_uid}.dcm"
        assert locations == {"local": relative,
                             "archive": f"s3://{bucket}/migrated/{relative}",
                             "newpacs": f"NEWPACS@127.0.0.1:{new_archive.port}"}
        on_disk = (tmp_path / "fs" / relative).read_bytes()
        in_s3 = s3.get_object(Bucket=bucket, Key=f"migrated/{relative}")["Body"].read()
        [forwarded] = new_archive.received_dir.glob(f"*.{sample.sop_instance_uid}.dcm")
        assert in_s3 == on_disk
        assert dataset_bytes(forwarded.read_bytes()) == dataset_bytes(on_disk)


def test_a_failing_store_fails_the_job_by_name_and_leaves_the_others_empty(
    config_factory: Callable[..., Config], orthanc: Orthanc, mixed_study: SampleStudy,
    tmp_path: Path,
) -> None:
    config = with_stores(
        config_factory(orthanc=orthanc, store_root=tmp_path / "fs"),
        newpacs={"plugin": "dicom", "ae_title": "NEWPACS", "host": "127.0.0.1",
                 "port": free_port(), "timeout": 2},
    )
    request = JobRequest(source="orthanc", study_uid=mixed_study.study_uid,
                         stores=["newpacs", "local"])
    outcome = run_job(config, request, LocalJobState())
    assert outcome.status is JobStatus.FAILED
    assert outcome.error_kind == "store"
    assert "failing store(s): 'newpacs'" in (outcome.error or "")
    assert "cannot connect to 127.0.0.1" in (outcome.error or "")
    assert outcome.progress.completed == 0
    assert [p for p in (tmp_path / "fs").rglob("*.dcm") if ".pacsfetch" not in p.parts] == []


def test_a_store_that_cannot_open_fails_before_the_pacs_is_asked(
    config_factory: Callable[..., Config], orthanc: Orthanc, mixed_study: SampleStudy,
    aws_credentials: S3Server,
) -> None:
    config = with_stores(config_factory(orthanc=orthanc),
                         archive=s3_store(aws_credentials, "pf-missing-bucket"))
    request = JobRequest(source="orthanc", study_uid=mixed_study.study_uid,
                         stores=["local", "archive"])
    outcome = run_job(config, request, LocalJobState())
    assert outcome.status is JobStatus.FAILED and outcome.error_kind == "store"
    assert outcome.error is not None and outcome.error.startswith("store 'archive': ")
    assert "bucket 'pf-missing-bucket' does not exist" in outcome.error
    assert outcome.transport is None


@pytest.fixture
def api(config_factory: Callable[..., Config], tmp_path: Path) -> TestClient:
    config = with_stores(config_factory(), second={"plugin": "filesystem",
                                                   "root": str(tmp_path / "second")})
    return TestClient(create_app(config))


STUDY = "1.2.826.0.1.3680043.8.498.77"
SOURCE = {"ae_title": "PACS2", "host": "127.0.0.1", "port": 11112}


@pytest.fixture
def api_with_source(config_factory: Callable[..., Config], tmp_path: Path) -> TestClient:
    config = with_stores(config_factory(extra_sources={"pacs2": SOURCE}),
                         second={"plugin": "filesystem", "root": str(tmp_path / "second")})
    return TestClient(create_app(config))


def test_api_accepts_several_stores_and_shows_them(api_with_source: TestClient) -> None:
    response = api_with_source.post("/jobs", json={"source": "pacs2", "study_uid": STUDY,
                                                   "stores": ["local", "second"]})
    assert response.status_code == 202, response.text
    job = api_with_source.get(response.headers["Location"]).json()
    assert job["request"]["stores"] == ["local", "second"]
    assert job["request"]["store"] is None


@pytest.mark.parametrize(("body", "loc", "text"), [
    ({"store": "local", "stores": ["second"]}, ["body", "stores"], "not both"),
    ({}, ["body", "stores"], "give store or stores"),
    ({"stores": []}, ["body", "stores"], "at least 1"),
    ({"stores": ["local", "local"]}, ["body", "stores"], "lists a store twice"),
    ({"stores": ["local", "nope"]}, ["body", "stores", 1], "unknown store 'nope'"),
    ({"store": "nope"}, ["body", "store"], "unknown store 'nope'"),
])
def test_api_names_the_field(api_with_source: TestClient, body: dict[str, Any],
                             loc: list[Any], text: str) -> None:
    response = api_with_source.post("/jobs", json={"source": "pacs2", "study_uid": STUDY, **body})
    assert response.status_code == 422
    [detail] = response.json()["detail"]
    assert detail["loc"] == loc
    assert text in detail["msg"]


def test_cli_retrieve_takes_store_several_times(
    redis_url: str, orthanc: Orthanc, mixed_study: SampleStudy, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = make_config(redis_url=redis_url, store_root=tmp_path / "one", orthanc=orthanc)
    data["stores"]["second"] = {"plugin": "filesystem", "root": str(tmp_path / "two")}
    monkeypatch.setenv("PACSFETCH_CONFIG", str(write_toml(data, tmp_path / "pacsfetch.toml")))
    series = mixed_study.series_uids[0]
    result = CliRunner().invoke(main, [
        "retrieve", "--source", "orthanc", "--study", mixed_study.study_uid, "--series", series,
        "--store", "local", "--store", "second"])
    assert result.exit_code == 0, result.output
    expected = {i.sop_instance_uid for i in mixed_study.instances_of_series(series)}
    for root in ("one", "two"):
        stored = {p.stem for p in (tmp_path / root).rglob("*.dcm") if ".pacsfetch" not in p.parts}
        assert stored == expected
