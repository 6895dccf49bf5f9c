"""The audit trail end to end: a named token submits through the API, a real worker
retrieves from Orthanc by C-GET, and the trail names who, which study, from where, into which
stores and what came; neither the trail nor the worker's log holds patient data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from helpers import WorkerProcess, make_config, wait_for

from pacsfetch.api.app import create_app
from pacsfetch.config import parse_config
from pacsfetch.sandbox.peers import Orthanc
from pacsfetch.sandbox.samples import _PATIENT_NAME, SampleStudy
from pacsfetch.tokens import add_token


def test_submit_start_and_finish_are_audited_without_patient_data(
        redis_url: str, tmp_path: Path, orthanc: Orthanc, mixed_study: SampleStudy,
        start_worker: Callable[..., WorkerProcess]) -> None:
    audit = tmp_path / "audit.jsonl"
    tokens = tmp_path / "tokens"
    secret = add_token(tokens, "ris-gateway", "submit,read")
    settings: dict[str, Any] = make_config(redis_url=redis_url, store_root=tmp_path / "store",
                                           orthanc=orthanc)
    settings["audit"] = {"path": str(audit)}
    settings["api"] = {"tokens_file": str(tokens)}
    worker = start_worker(settings)
    client = TestClient(create_app(parse_config(settings)),
                        headers={"Authorization": f"Bearer {secret}"})
    job_id = client.post("/jobs", json={"source": "orthanc", "study_uid": mixed_study.study_uid,
                                        "store": "local"}).json()["id"]

    def finished() -> dict[str, Any] | None:
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] not in ("queued", "running") else None

    job = wait_for(finished, 120, 0.2, "the job to finish")
    assert job["status"] == "succeeded" and job["created_by"] == "ris-gateway"
    events = wait_for(lambda: (lambda lines: lines if len(lines) >= 3 else None)(
        [json.loads(line) for line in audit.read_text().splitlines()]), 10, 0.1, "3 lines")
    assert [e["event"] for e in events] == ["job.submit", "job.start", "job.finish"]
    assert {e["job_id"] for e in events} == {job_id}
    assert {e["caller"] for e in events} == {"ris-gateway"}
    for event in events:
        assert event["source"] == "orthanc" and event["stores"] == ["local"]
        assert event["study_uids"] == [mixed_study.study_uid]
    start, finish = events[1:]
    assert start["atna_event"].startswith("110102") and start["attempt"] == 1
    assert finish["atna_event"].startswith("110104") and finish["atna_outcome"] == 0
    assert finish["counts"]["completed"] == len(mixed_study.instances)
    assert finish["counts"]["bytes"] > 0 and finish["status"] == "succeeded"
    for text in (audit.read_text(), worker.log_path.read_text()):
        assert mixed_study.patient_id not in text
        assert str(_PATIENT_NAME) not in text
