"""``POST /jobs/batch`` against a real Redis: all recorded and enqueued, or nothing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from test_api import EXTRA_SOURCE, STUDY, queued_messages

from pacsfetch.api.app import create_app
from pacsfetch.api.schemas import MAX_BATCH
from pacsfetch.config import Config
from pacsfetch.queue import RETRIEVE_TASK


@pytest.fixture
def client(config_factory: Callable[..., Config]) -> TestClient:
    return TestClient(create_app(config_factory(extra_sources=EXTRA_SOURCE)))


def _job(n: int, **kw: object) -> dict:
    return {"source": "pacs2", "study_uid": f"{STUDY}.{n}", "store": "local", **kw}


def test_batch_records_and_enqueues_every_job_in_order(client: TestClient, redis_url: str) -> None:
    response = client.post("/jobs/batch", json={"jobs": [_job(n, priority=n % 10)
                                                         for n in range(1, 26)]})
    assert response.status_code == 202
    accepted = response.json()["jobs"]
    assert len(accepted) == 25 and all(j["status"] == "queued" for j in accepted)
    for n, job in enumerate(accepted, start=1):
        record = client.get(f"/jobs/{job['id']}").json()
        assert record["request"]["study_uid"] == f"{STUDY}.{n}"
        assert record["request"]["priority"] == n % 10
    messages = queued_messages(redis_url)
    assert sorted(m["headers"]["argsrepr"] for m in messages) == sorted(
        repr([j["id"]]) for j in accepted)
    assert {m["headers"]["task"] for m in messages} == {RETRIEVE_TASK}


@pytest.mark.parametrize(
    ("bad", "field", "text"),
    [
        ({"study_uid": "1.2.abc"}, "study_uid", "DICOM UID"),
        ({"source": "nope"}, "source", "unknown source 'nope'"),
        ({"store": "nope"}, "store", "unknown store 'nope'"),
        ({"transport": "c-move"}, "transport", "does not offer transport"),
    ],
)
def test_one_bad_entry_names_index_and_field_and_nothing_is_recorded(
    client: TestClient, redis_url: str, bad: dict, field: str, text: str
) -> None:
    jobs = [_job(1), _job(2), _job(3, **bad), _job(4)]
    response = client.post("/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail[0]["loc"] == ["body", "jobs", 2, field]
    assert text in detail[0]["msg"]
    assert client.get("/jobs").json()["total"] == 0
    assert queued_messages(redis_url) == []


def test_empty_and_oversized_batches_are_refused(client: TestClient) -> None:
    assert client.post("/jobs/batch", json={"jobs": []}).status_code == 422
    too_many = {"jobs": [_job(n) for n in range(1, MAX_BATCH + 2)]}
    response = client.post("/jobs/batch", json=too_many)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "jobs"]
    assert client.get("/jobs").json()["total"] == 0
