"""The HTTP API against a real Redis: validation, enqueueing, listing, cancel, auth."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from pacsfetch.api.app import create_app
from pacsfetch.api.submit import GroupCommit
from pacsfetch.config import Config, ConfigError
from pacsfetch.queue import QUEUE, RETRIEVE_TASK, make_celery

STUDY = "1.2.826.0.1.3680043.8.498.77"
EXTRA_SOURCE = {"pacs2": {"ae_title": "PACS2", "host": "127.0.0.1", "port": 11112}}


@pytest.fixture
def config(config_factory: Callable[..., Config]) -> Config:
    return config_factory(extra_sources=EXTRA_SOURCE)


@pytest.fixture
def client(config: Config) -> TestClient:
    return TestClient(create_app(config))


def queued_messages(url: str) -> list[dict]:
    """Celery messages waiting in the broker (kombu keeps one Redis list per priority)."""
    r = redis.Redis.from_url(url)
    messages = []
    for key in r.scan_iter(f"{QUEUE}*"):
        if r.type(key) == b"list":
            messages += [json.loads(raw) for raw in r.lrange(key, 0, -1)]
    return messages


def _job(**kw: object) -> dict:
    return {"source": "pacs2", "study_uid": STUDY, "store": "local", **kw}


def test_submit_records_and_enqueues(client: TestClient, redis_url: str) -> None:
    response = client.post("/jobs", json=_job(priority=8))
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert response.headers["Location"] == f"/jobs/{body['id']}"
    messages = queued_messages(redis_url)
    assert [m["headers"]["task"] for m in messages] == [RETRIEVE_TASK]
    assert messages[0]["headers"]["argsrepr"] == repr([body["id"]])
    assert messages[0]["properties"]["priority"] == 1  # API 8 -> Redis 1 (0 is served first)
    job = client.get(response.headers["Location"]).json()
    assert job["status"] == "queued" and job["request"]["study_uid"] == STUDY
    assert job["progress"] == {"completed": 0, "failed": 0, "warning": 0, "remaining": None,
                               "skipped": 0, "bytes": 0}


@pytest.mark.parametrize(
    ("body", "field", "text"),
    [
        (_job(source="nope"), "source", "unknown source 'nope'"),
        (_job(store="nope"), "store", "unknown store 'nope'"),
        (_job(transport="c-move"), "transport", "does not offer transport 'c-move'"),
        (_job(study_uid="1.2.abc"), "study_uid", "DICOM UID"),
        (_job(study_uid="../../etc"), "study_uid", "DICOM UID"),
        (_job(level="SERIES"), None, "series_uid is required when level is SERIES"),
        (_job(level="IMAGE", series_uid="1.2.3"), None, "sop_uids is required when level is IMAGE"),
        (_job(level="IMAGE", sop_uids=["1.2.3", "bad uid"]), "sop_uids", "DICOM UID"),
        (_job(level="STUDY", sop_uids=["1.2.3"]), None, "sop_uids is only allowed"),
        (_job(level="PATIENT"), "level", "STUDY"),
        (_job(priority=10), "priority", "less than or equal to 9"),
        (_job(unexpected=1), "unexpected", "Extra inputs"),
        ({"source": "pacs2", "store": "local"}, "study_uid", "Field required"),
    ],
)
def test_bad_input_is_422_naming_the_field_and_enqueues_nothing(
    client: TestClient, redis_url: str, body: dict, field: str | None, text: str
) -> None:
    response = client.post("/jobs", json=body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    if field is not None:
        assert any(err["loc"][-1] == field or field in map(str, err["loc"]) for err in detail), detail
    assert any(text in err["msg"] for err in detail), detail
    assert queued_messages(redis_url) == []
    assert client.get("/jobs").json()["total"] == 0


def test_list_filters_by_status_and_pages(client: TestClient) -> None:
    ids = [client.post("/jobs", json=_job()).json()["id"] for _ in range(3)]
    assert client.delete(f"/jobs/{ids[0]}").json()["status"] == "cancelled"
    page = client.get("/jobs", params={"status": "queued", "limit": 1}).json()
    assert page["total"] == 2 and [j["id"] for j in page["items"]] == [ids[2]]
    assert client.get("/jobs", params={"status": "cancelled"}).json()["items"][0]["id"] == ids[0]
    assert client.get("/jobs", params={"status": "sideways"}).status_code == 422
    assert client.get("/jobs", params={"limit": 0}).status_code == 422


def test_cancel_unknown_and_finished(client: TestClient) -> None:
    assert client.delete("/jobs/" + "0" * 32).status_code == 404
    job_id = client.post("/jobs", json=_job()).json()["id"]
    client.delete(f"/jobs/{job_id}")
    assert client.delete(f"/jobs/{job_id}").status_code == 409


def test_sources_and_health(client: TestClient) -> None:
    sources = client.get("/sources").json()
    assert [s["name"] for s in sources] == ["pacs2"]
    assert sources[0]["ae_title"] == "PACS2"
    assert client.get("/healthz").json() == {"status": "ok", "redis": "ok"}
    assert client.post("/sources/nope/echo").status_code == 404


def test_openapi_documents_the_job_model(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/instances", "/sources",
            "/sources/{name}/echo", "/healthz"} <= set(spec["paths"])
    assert "study_uid" in spec["components"]["schemas"]["JobRequest"]["properties"]
    assert client.get("/docs").status_code == 200


def test_health_reports_redis_down(config_factory: Callable[..., Config], tmp_path: Path) -> None:
    config = config_factory()
    dead = config.model_copy(update={"broker": config.broker.model_copy(
        update={"url": "redis://127.0.0.1:1/0"})})
    response = TestClient(create_app(dead)).get("/healthz")
    assert response.status_code == 503 and response.json()["redis"] == "unreachable"


def test_queue_down_answers_503_and_the_record_says_why(config: Config, redis_url: str) -> None:
    """Job store reachable, broker not: nothing may look queued that no worker will ever see."""
    app = create_app(config)
    dead = config.model_copy(update={"broker": config.broker.model_copy(
        update={"url": "redis://127.0.0.1:1/0"})})
    app.state.submitter = GroupCommit(app.state.jobstore, make_celery(dead))
    client = TestClient(app)
    response = client.post("/jobs", json=_job())
    assert response.status_code == 503 and "queue" in response.json()["detail"]
    [job] = client.get("/jobs").json()["items"]
    assert job["status"] == "failed" and job["error_kind"] == "queue"
    assert "could not enqueue" in job["error"]
    assert queued_messages(redis_url) == []


def test_token_required_when_configured(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSFETCH_API_TOKEN", "s3cret")
    client = TestClient(create_app(config))
    assert client.get("/jobs").status_code == 401
    assert client.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.post("/jobs", json=_job()).status_code == 401
    assert client.get("/healthz").status_code == 200


def test_require_token_without_token_refuses_start(config: Config,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PACSFETCH_API_TOKEN", raising=False)
    strict = config.model_copy(update={"api": config.api.model_copy(update={"require_token": True})})
    with pytest.raises(ConfigError, match="api.require_token"):
        create_app(strict)
