"""Store inventories against real stores: what a study's job wrote into a filesystem store,
an S3 bucket (moto's server), a second Orthanc fed by the DICOM forward store and the same
Orthanc asked by QIDO-RS must read back exactly as the source's SOP Instance UIDs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import make_config, run_job

from pacsfetch.config import Config, parse_config
from pacsfetch.models import JobRequest, JobStatus
from pacsfetch.plugins.stores.listing import study_listing
from pacsfetch.sandbox.peers import Orthanc, S3Server
from pacsfetch.sandbox.samples import SampleStudy
from pacsfetch.workers.inventory import held_by_all, missing_from, study_inventory


@pytest.fixture(scope="module")
def destination(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("destination"), aet="DEST") as server:
        yield server


@pytest.fixture
def config(redis_url: str, tmp_path: Path, orthanc: Orthanc, destination: Orthanc,
           aws_credentials: S3Server) -> Config:
    bucket = f"inv-{uuid.uuid4().hex[:10]}"
    aws_credentials.client().create_bucket(Bucket=bucket)
    data = make_config(redis_url=redis_url, store_root=tmp_path / "store", orthanc=orthanc,
                       fsync=False)
    data["stores"].update({
        "bucket": {"plugin": "s3", "bucket": bucket, "prefix": "archive",
                   "endpoint_url": aws_credentials.url, "region": aws_credentials.region},
        "pacs": {"plugin": "dicom", "ae_title": destination.aet, "host": "127.0.0.1",
                 "port": destination.dicom_port},
        "web": {"plugin": "stow-rs", "url": destination.dicomweb_url},
        "by_patient": {"plugin": "filesystem", "root": str(tmp_path / "by-patient"),
                       "layout": "{PatientID}/{StudyInstanceUID}/{SOPInstanceUID}.dcm"},
    })
    return parse_config(data)


def test_every_store_lists_what_the_job_wrote(config: Config, mixed_study: SampleStudy,
                                              destination: Orthanc) -> None:
    study = mixed_study.study_uid
    expected = frozenset(i.sop_instance_uid for i in mixed_study.instances)
    stores = ["local", "bucket", "pacs"]
    assert not held_by_all(config, stores, study, expected)
    outcome = run_job(config, JobRequest(source="orthanc", study_uid=study, stores=stores))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert set(destination.list_study_instances(study)) == expected

    for store in ("local", "bucket", "pacs", "web"):
        assert study_inventory(config, store, study) == expected, store
    assert held_by_all(config, stores, study, expected)
    assert held_by_all(config, stores, study, len(expected))
    assert not held_by_all(config, stores, study, len(expected) + 1)
    assert missing_from(config, stores, study, expected) == frozenset()
    other = "1.2.826.0.1.3680043.8.498.1"
    assert study_inventory(config, "local", other) == frozenset()
    assert study_inventory(config, "pacs", other) == frozenset()
    assert study_inventory(config, "web", other) == frozenset()


def test_a_deleted_file_or_object_is_missing(config: Config, mixed_study: SampleStudy) -> None:
    study = mixed_study.study_uid
    expected = frozenset(i.sop_instance_uid for i in mixed_study.instances)
    outcome = run_job(config, JobRequest(source="orthanc", study_uid=study,
                                         stores=["local", "bucket"]))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    gone_file, gone_object = sorted(expected)[:2]
    root = Path(config.stores["local"].settings["root"])
    [path] = root.glob(f"{study}/*/{gone_file}.dcm")
    path.unlink()
    settings = config.stores["bucket"].settings
    keys = [o["Key"] for o in _objects(settings)]
    [key] = [k for k in keys if k.endswith(f"/{gone_object}.dcm")]
    _s3(settings).delete_object(Bucket=settings["bucket"], Key=key)

    assert study_inventory(config, "local", study) == expected - {gone_file}
    assert study_inventory(config, "bucket", study) == expected - {gone_object}
    assert missing_from(config, ["local", "bucket"], study, expected) == {gone_file, gone_object}
    assert not held_by_all(config, ["local"], study, expected)
    assert held_by_all(config, ["local"], study, expected - {gone_file})


def test_a_layout_that_cannot_list_one_study_answers_unknown(config: Config,
                                                             mixed_study: SampleStudy) -> None:
    study = mixed_study.study_uid
    outcome = run_job(config, JobRequest(source="orthanc", study_uid=study, store="by_patient"))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert study_inventory(config, "by_patient", study) is None
    assert not held_by_all(config, ["by_patient"], study, 1)
    assert missing_from(config, ["by_patient"], study, {"1.2.3"}) is None


def test_listing_reads_uids_back_from_the_layout() -> None:
    listing = study_listing("{StudyInstanceUID}/{Modality}-{SeriesNumber}/{SOPInstanceUID}.dcm",
                            "1.2.3")
    assert listing is not None and listing.prefix == "1.2.3/"
    assert listing.sop_uid("1.2.3/CT-1/1.2.3.4.dcm") == "1.2.3.4"
    assert listing.sop_uid("1.2.34/CT-1/1.2.3.4.dcm") is None
    assert listing.sop_uid("1.2.3/CT-1/1.2.3.4.dcm.part") is None
    assert study_listing("{PatientID}/{StudyInstanceUID}/{SOPInstanceUID}", "1.2.3") is None


def _s3(settings: dict[str, str]):  # type: ignore[no-untyped-def]
    import boto3

    return boto3.client("s3", endpoint_url=settings["endpoint_url"], region_name=settings["region"])


def _objects(settings: dict[str, str]) -> list[dict[str, str]]:
    return list(_s3(settings).list_objects_v2(Bucket=settings["bucket"]).get("Contents", []))
