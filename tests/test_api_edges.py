"""Input edge cases answer 4xx, never 500; Redis down answers 503 on every endpoint."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from test_api import EXTRA_SOURCE, STUDY

from pacsfetch.api.app import create_app
from pacsfetch.config import Config
from pacsfetch.studyquery import StudyQuery
from pacsfetch.uids import check_ae_title, is_valid_uid


@pytest.fixture
def client(config_factory: Callable[..., Config]) -> TestClient:
    return TestClient(create_app(config_factory(extra_sources=EXTRA_SOURCE)))


def _job(**kw: object) -> dict:
    return {"source": "pacs2", "study_uid": STUDY, "store": "local", **kw}


@pytest.mark.parametrize("uid", [STUDY + "\n", "1.2.3\n", "\n1.2.3", "1.2\r\n"])
def test_a_uid_with_a_newline_is_not_a_uid(uid: str) -> None:
    assert not is_valid_uid(uid)


def test_wire_and_query_values_with_a_final_newline_are_refused() -> None:
    with pytest.raises(ValueError):
        check_ae_title("PACS\n")
    with pytest.raises(ValueError):
        StudyQuery(StudyDate="20240101\n")
    with pytest.raises(ValueError):
        StudyQuery(StudyInstanceUID=STUDY + "\n")
    with pytest.raises(ValueError):  # digits of another script are not a DICOM date
        StudyQuery(StudyDate="\u0662\u0660\u0662\u0664\u0660\u0661\u0660\u0661")


@pytest.mark.parametrize("body", [
    _job(study_uid=STUDY + "\n"),
    _job(level="SERIES", series_uid="1.2.3\n"),
    _job(level="IMAGE", series_uid="1.2.3", sop_uids=["1.2.3.4\n"]),
])
def test_api_refuses_uids_with_a_final_newline(client: TestClient, body: dict) -> None:
    response = client.post("/jobs", json=body)
    assert response.status_code == 422, response.text
    assert client.get("/jobs").json()["total"] == 0


@pytest.mark.parametrize("params", [
    {"offset": 2**64}, {"offset": 2**63}, {"offset": 10**30}, {"offset": -1},
])
def test_list_offsets_past_64_bits_are_422(client: TestClient, params: dict) -> None:
    assert client.get("/jobs", params=params).status_code == 422


def test_the_largest_offset_allowed_is_answered(client: TestClient) -> None:
    client.post("/jobs", json=_job())
    page = client.get("/jobs", params={"offset": 2**62, "limit": 500})
    assert page.status_code == 200 and page.json()["items"] == []


@pytest.mark.parametrize("path", ["/jobs", "/migrations"])
def test_offsets_past_64_bits_are_422_on_every_list(client: TestClient, path: str) -> None:
    assert client.get(path, params={"offset": 2**64}).status_code == 422
    assert client.get(path, params={"offset": 2**62}).status_code == 200


@pytest.mark.parametrize("cursor", [2**64, 10**30, -1])
def test_instance_cursors_past_64_bits_are_422(client: TestClient, cursor: int) -> None:
    job_id = client.post("/jobs", json=_job()).json()["id"]
    assert client.get(f"/jobs/{job_id}/instances",
                      params={"cursor": cursor}).status_code == 422


def test_largest_cursor_is_answered(client: TestClient) -> None:
    job_id = client.post("/jobs", json=_job()).json()["id"]
    response = client.get(f"/jobs/{job_id}/instances", params={"cursor": 2**64 - 1})
    assert response.status_code == 200


@pytest.mark.parametrize("raw", [
    '{"source": "pacs2", "study_uid": "1.2.3", "store": "local", "priority": NaN}',
    '{"source": "pacs2", "study_uid": "1.2.3", "store": "local", "priority": Infinity}',
    '{"source": NaN, "study_uid": "1.2.3", "store": "local"}',
    '{"jobs": NaN}',
    '{"jobs": [{"source": "pacs2", "study_uid": -Infinity, "store": "local"}]}',
])
def test_nan_and_infinity_in_a_body_are_422(client: TestClient, raw: str) -> None:
    path = "/jobs/batch" if raw.startswith('{"jobs"') else "/jobs"
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"]  # valid JSON, naming the field


def test_every_endpoint_answers_503_while_redis_is_down(
        config_factory: Callable[..., Config]) -> None:
    config = config_factory(extra_sources=EXTRA_SOURCE)
    dead = config.model_copy(update={"broker": config.broker.model_copy(
        update={"url": "redis://127.0.0.1:1/0"})})
    client = TestClient(create_app(dead), raise_server_exceptions=False)
    job = "0" * 32
    for method, path in [("GET", "/jobs"), ("GET", f"/jobs/{job}"),
                         ("GET", f"/jobs/{job}/instances"), ("DELETE", f"/jobs/{job}"),
                         ("GET", "/jobs?status=queued")]:
        response = client.request(method, path)
        assert response.status_code == 503, (method, path, response.status_code)
        assert "Redis" in response.json()["detail"]
    assert client.post("/jobs", json=_job()).status_code == 503
    assert client.post("/jobs/batch", json={"jobs": [_job()]}).status_code == 503
