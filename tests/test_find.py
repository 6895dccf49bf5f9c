"""Study C-FIND with paging around capped PACS, directly and as ``GET /sources/{name}/studies``,
against real Orthanc peers (one capping its answers with ``LimitFindResults``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import CALLING_AE, make_config
from pydicom import dcmread

from pacsfetch.api.app import create_app
from pacsfetch.config import Config, parse_config
from pacsfetch.plugins.find import find_studies
from pacsfetch.sandbox.peers import Orthanc
from pacsfetch.sandbox.samples import generate_uniform_study
from pacsfetch.studyquery import StudyQuery

DATES = ["20200115", "20200315", "20200515", "20200715", "20200915", "20201115"]
CAP = 2


@pytest.fixture(scope="module")
def dated_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One single-image study per date, each of its own patient: StudyDate -> file."""
    files = {}
    for n, study_date in enumerate(DATES):
        study = generate_uniform_study(tmp_path_factory.mktemp(f"dated{n}"), n_instances=1,
                                       rows=8, columns=8, patient_id=f"PF-FIND-{n}", seed=n)
        path = study.instances[0].path
        ds = dcmread(path)
        ds.StudyDate = study_date
        ds.save_as(path)
        files[study_date] = path
    return files


@pytest.fixture(scope="module")
def capped_orthanc(tmp_path_factory: pytest.TempPathFactory,
                   dated_files: dict[str, Path]) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc-capped"), dicomweb=False,
                 extra_config={"LimitFindResults": CAP}) as server:
        server.upload(dated_files.values())
        yield server


def source(orthanc: Orthanc, **extra: Any) -> dict[str, Any]:
    return {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
            "calling_ae_title": CALLING_AE, "timeout": 10, **extra}


@pytest.fixture
def capped_config(config_factory: Callable[..., Config], capped_orthanc: Orthanc) -> Config:
    return config_factory(extra_sources={"capped": source(capped_orthanc, max_results=CAP)})


def test_capped_pacs_is_paged_by_study_date(capped_config: Config) -> None:
    found = find_studies(capped_config.sources["capped"], StudyQuery())
    assert sorted(s.study_date for s in found.items) == DATES
    assert found.complete and found.queries > 1
    assert [s.study_date for s in found.items] == sorted(DATES, reverse=True)  # newest first
    first = found.items[-1]
    assert first.patient_id == "PF-FIND-0" and first.instance_count == 1
    assert first.series_count == 1 and first.modalities == ["CT"]


def test_cap_signalled_by_status_is_detected_without_max_results(
    config_factory: Callable[..., Config], capped_orthanc: Orthanc
) -> None:
    # Orthanc ends a capped C-FIND with a non-success status after its matches.
    config = config_factory(extra_sources={"capped": source(capped_orthanc)})
    found = find_studies(config.sources["capped"], StudyQuery())
    assert sorted(s.study_date for s in found.items) == DATES
    assert found.complete and found.queries > 1


def test_cap_detected_by_result_count(config_factory: Callable[..., Config], orthanc: Orthanc,
                                      mixed_study: Any, big_study: Any) -> None:
    # This Orthanc does not cap; max_results = 1 makes every answer of 1+ matches look capped.
    config = config_factory(extra_sources={"pacs": source(orthanc, max_results=1)})
    found = find_studies(config.sources["pacs"], StudyQuery())
    assert {mixed_study.study_uid, big_study.study_uid} <= {s.study_uid for s in found.items}
    assert found.queries > 1


def test_date_range_patient_and_limit(capped_config: Config) -> None:
    found = find_studies(capped_config.sources["capped"],
                         StudyQuery(StudyDate="20200301-20200930"))
    assert sorted(s.study_date for s in found.items) == DATES[1:5] and found.complete
    found = find_studies(capped_config.sources["capped"], StudyQuery(PatientID="PF-FIND-3"))
    assert [s.study_date for s in found.items] == [DATES[3]]
    found = find_studies(capped_config.sources["capped"], StudyQuery(StudyDate="-20200601", limit=2))
    assert [s.study_date for s in found.items] == [DATES[2], DATES[1]]
    assert not found.complete  # a third match was cut by the limit


@pytest.fixture
def api_config(redis_url: str, tmp_path: Path, capped_orthanc: Orthanc) -> dict[str, Any]:
    config = make_config(redis_url=redis_url, store_root=tmp_path / "store",
                         extra_sources={"capped": source(capped_orthanc, max_results=CAP)})
    config["api"] = {"query_timeout": 20}
    return config


def test_studies_endpoint_asks_a_worker(api_config: dict[str, Any],
                                        start_worker: Callable[..., Any]) -> None:
    start_worker(api_config)
    client = TestClient(create_app(parse_config(api_config)))
    response = client.get("/sources/capped/studies", params={"StudyDate": "20200501-"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert sorted(s["study_date"] for s in body["items"]) == DATES[2:]
    assert body["complete"] is True
    assert client.get("/sources/nope/studies").status_code == 404


@pytest.mark.parametrize(("params", "field"), [
    ({"StudyDate": "20201340"}, "StudyDate"),
    ({"StudyDate": "2020-01-01"}, "StudyDate"),
    ({"StudyDate": "20200201-20200101"}, "StudyDate"),
    ({"StudyInstanceUID": "1.2.abc"}, "StudyInstanceUID"),
    ({"PatientID": "a\\b"}, "PatientID"),
    ({"limit": "0"}, "limit"),
])
def test_bad_query_is_422_naming_the_field(api_config: dict[str, Any], params: dict[str, str],
                                           field: str) -> None:
    client = TestClient(create_app(parse_config(api_config)))
    response = client.get("/sources/capped/studies", params=params)
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [["query", field]]


def test_no_worker_is_504(api_config: dict[str, Any]) -> None:
    api_config["api"] = {"query_timeout": 0.5}
    client = TestClient(create_app(parse_config(api_config)))
    response = client.get("/sources/capped/studies")
    assert response.status_code == 504 and "no worker answered" in response.text
