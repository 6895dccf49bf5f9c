"""The API bounds what it reads: who calls is known before the body is read, a body over
``[api] max_body_bytes`` is answered 413 unread, batches are bounded in all, and a 422 does
not echo a huge input back.

The first three tests drive the ASGI application directly with a ``receive`` that counts
what the server pulled of the body: a socket cannot tell how much the server read.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from test_api import EXTRA_SOURCE, STUDY

from pacsfetch.api.app import create_app
from pacsfetch.api.schemas import MAX_BATCH, MAX_BATCH_SOP_UIDS
from pacsfetch.config import Config

MiB = 1024 * 1024


@pytest.fixture
def app(config_factory: Callable[..., Config], monkeypatch: pytest.MonkeyPatch) -> FastAPI:
    monkeypatch.setenv("PACSFETCH_API_TOKEN", "s3cret")
    return create_app(config_factory(extra_sources=EXTRA_SOURCE))


def _call(app: FastAPI, headers: dict[str, str], chunks: int, chunk: bytes = b" " * MiB,
          method: str = "POST", path: str = "/jobs") -> tuple[int, int]:
    """(status, body chunks the app pulled) for a request whose body is *chunks* chunks."""
    pulled = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        more = pulled < chunks
        return {"type": "http.request", "body": chunk, "more_body": more}

    answer: dict[str, Any] = {}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80), "state": {},
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    return answer["status"], pulled


def test_401_comes_before_any_of_the_body_is_read(app: FastAPI) -> None:
    status, pulled = _call(app, {"content-length": str(200 * MiB)}, 200)
    assert status == 401 and pulled == 0
    status, pulled = _call(app, {"content-length": str(200 * MiB),
                                 "authorization": "Bearer wrong"}, 200)
    assert status == 401 and pulled == 0


def test_413_from_content_length_without_reading(app: FastAPI) -> None:
    status, pulled = _call(app, {"content-length": str(200 * MiB),
                                 "authorization": "Bearer s3cret"}, 200)
    assert status == 413 and pulled == 0


def test_413_for_a_chunked_body_reads_no_more_than_the_limit(app: FastAPI) -> None:
    limit = app.state.config.api.max_body_bytes
    status, pulled = _call(app, {"transfer-encoding": "chunked",
                                 "authorization": "Bearer s3cret"}, 200)
    assert status == 413
    assert pulled <= limit // MiB + 1


def test_body_limit_is_configurable(config_factory: Callable[..., Config]) -> None:
    config = config_factory(extra_sources=EXTRA_SOURCE)
    small = config.model_copy(update={"api": config.api.model_copy(
        update={"max_body_bytes": 2048})})
    client = TestClient(create_app(small))
    job = {"source": "pacs2", "study_uid": STUDY, "store": "local"}
    assert client.post("/jobs", json=job).status_code == 202
    big = {**job, "level": "IMAGE", "series_uid": STUDY + ".1",
           "sop_uids": [f"{STUDY}.1.{n}" for n in range(100)]}
    response = client.post("/jobs", json=big)
    assert response.status_code == 413 and "max_body_bytes" in response.json()["detail"]
    assert client.get("/jobs").json()["total"] == 1


def _image_job(n: int, uids: int) -> dict[str, Any]:
    return {"source": "pacs2", "level": "IMAGE", "study_uid": f"{STUDY}.{n}",
            "series_uid": f"{STUDY}.{n}.1", "store": "local",
            "sop_uids": [f"2.25.{n}.{k}" for k in range(uids)]}


def test_a_batch_over_the_total_uid_limit_is_refused_naming_it(app: FastAPI) -> None:
    client = TestClient(app, headers={"Authorization": "Bearer s3cret"})
    per_job = MAX_BATCH_SOP_UIDS // MAX_BATCH
    jobs = [_image_job(n, per_job) for n in range(MAX_BATCH)]
    jobs[0]["sop_uids"].append("2.25.999999.1")
    response = client.post("/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 422, response.text[:300]
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "jobs"] and f"at most {MAX_BATCH_SOP_UIDS}" in error["msg"]
    assert client.get("/jobs").json()["total"] == 0
    jobs[0]["sop_uids"].pop()
    full = json.dumps({"jobs": jobs})
    assert len(full) <= app.state.config.api.max_body_bytes  # the full batch fits the default
    response = client.post("/jobs/batch", content=full,
                           headers={"content-type": "application/json"})
    assert response.status_code == 202
    assert client.get("/jobs").json()["total"] == MAX_BATCH


@pytest.mark.parametrize("body", [
    {"source": "pacs2", "store": "local", "study_uid": "9" * (4 * MiB)},
    {**_image_job(1, 0), "sop_uids": ["1.2.3." + str(n) for n in range(12_000)]},
    {**_image_job(1, 0), "sop_uids": ["not a uid"] * 50_000},
])
def test_a_422_does_not_echo_a_huge_input(app: FastAPI, body: dict[str, Any]) -> None:
    client = TestClient(app, headers={"Authorization": "Bearer s3cret"})
    response = client.post("/jobs", json=body)
    assert response.status_code == 422
    assert len(response.content) < 10_000, len(response.content)
    assert response.json()["detail"][0]["loc"][:2] in (["body", "study_uid"],
                                                       ["body", "sop_uids"])
