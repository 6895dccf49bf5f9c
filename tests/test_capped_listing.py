"""Retrieves from PACS that cap their C-FIND answers, against real Orthancs: one capping
image-level answers (``LimitFindInstances``: it ends with 0xFE00 after the first matches),
one capping series-level answers (``LimitFindResults``).

The image-level list only plans a retrieve; a capped one must not cost instances. The
series-level list says which series exist; a capped one is an error that names the knob.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import CALLING_AE, make_config, run_job

from pacsfetch.config import Config, parse_config
from pacsfetch.models import JobRequest, JobStatus
from pacsfetch.plugins.transports.query import find_instances
from pacsfetch.sandbox.peers import Orthanc, RedisServer
from pacsfetch.sandbox.samples import SampleStudy, generate_uniform_study
from pacsfetch.workers.state import LocalJobState

CAP = 8


@pytest.fixture(scope="module")
def series_study(tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    return generate_uniform_study(tmp_path_factory.mktemp("capped-study"), n_instances=30,
                                  rows=16, columns=16, patient_id="PF-CAPPED", seed=808)


@pytest.fixture(scope="module")
def image_capped(tmp_path_factory: pytest.TempPathFactory,
                 series_study: SampleStudy) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc-image-capped"), aet="IMGCAP", dicomweb=False,
                 extra_config={"LimitFindInstances": CAP}) as server:
        server.upload_study(series_study)
        yield server


@pytest.fixture(scope="module")
def series_capped(tmp_path_factory: pytest.TempPathFactory,
                  mixed_study: SampleStudy) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc-series-capped"), aet="SERCAP",
                 dicomweb=False, extra_config={"LimitFindResults": 1}) as server:
        server.upload_study(mixed_study)
        yield server


@pytest.fixture
def config(tmp_path: Path, redis_server: RedisServer, image_capped: Orthanc,
           series_capped: Orthanc) -> Config:
    def source(server: Orthanc) -> dict[str, object]:
        return {"ae_title": server.aet, "host": "127.0.0.1", "port": server.dicom_port,
                "calling_ae_title": CALLING_AE, "transports": ["c-get"], "timeout": 10}
    return parse_config(make_config(
        redis_url=redis_server.url, store_root=tmp_path / "store",
        extra_sources={"image-capped": source(image_capped),
                       "series-capped": source(series_capped)}))


def stored(config: Config, study: SampleStudy) -> set[str]:
    root = Path(config.stores["local"].settings["root"]) / study.study_uid
    return {p.stem for p in root.rglob("*.dcm")}


def test_a_capped_image_listing_is_kept_and_its_series_marked(
        config: Config, series_study: SampleStudy) -> None:
    found = find_instances(config.sources["image-capped"], JobRequest(
        source="image-capped", study_uid=series_study.study_uid, store="local"))
    assert len(found.refs) == CAP
    assert found.capped_series == {series_study.series_uids[0]}


def test_c_get_brings_the_whole_study_past_the_cap(
        config: Config, series_study: SampleStudy) -> None:
    outcome = run_job(config, JobRequest(source="image-capped", study_uid=series_study.study_uid,
                                         store="local"))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert stored(config, series_study) == {i.sop_instance_uid for i in series_study.instances}
    assert outcome.progress.completed == len(series_study.instances)


def test_resumed_c_get_asks_for_a_capped_series_whole(
        config: Config, series_study: SampleStudy) -> None:
    # Every listed instance already stored: asking only for the "missing" listed ones would
    # ask for nothing and lose the 22 instances the PACS never listed.
    state = LocalJobState()
    listed = find_instances(config.sources["image-capped"], JobRequest(
        source="image-capped", study_uid=series_study.study_uid, store="local")).refs
    state.instances = {r.sop_instance_uid: '{"local":"earlier"}' for r in listed}
    outcome = run_job(config, JobRequest(source="image-capped", study_uid=series_study.study_uid,
                                         store="local"), state)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert set(state.instances) == {i.sop_instance_uid for i in series_study.instances}
    unlisted = {i.sop_instance_uid for i in series_study.instances} - set(
        r.sop_instance_uid for r in listed)
    assert len(unlisted) == len(series_study.instances) - CAP
    assert unlisted <= stored(config, series_study)


def test_a_capped_series_listing_fails_the_job_naming_the_limit(
        config: Config, mixed_study: SampleStudy) -> None:
    assert len(mixed_study.series_uids) > 1
    outcome = run_job(config, JobRequest(source="series-capped", study_uid=mixed_study.study_uid,
                                         store="local"))
    assert outcome.status is JobStatus.FAILED
    assert outcome.error_kind == "query"
    assert "series-level C-FIND" in outcome.error and "LimitFindResults" in outcome.error
    assert stored(config, mixed_study) == set()
