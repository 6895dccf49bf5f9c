"""Prefetch: rules against a real archive (Orthanc), the reading PACS behind a forward store
(a second Orthanc), the durable schedule, the API, and the whole fleet as processes.

The search runs inline here (``run_prefetch``) where the test is about what was chosen and
why; the end-to-end tests run ``pacsfetch scheduler`` and ``pacsfetch worker`` for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from helpers import CliProcess, WorkerProcess, make_config, wait_for, write_toml
from test_migration_faults import ApiProcess

from pacsfetch.api.app import create_app
from pacsfetch.config import parse_config
from pacsfetch.jobstore import JobStore
from pacsfetch.models import JobRequest
from pacsfetch.prefetch import (
    FINAL,
    HANDOFF_GRACE,
    CurrentExam,
    PrefetchRequest,
    PrefetchStatus,
    PrefetchStore,
)
from pacsfetch.prefetch_intake import request_prefetch
from pacsfetch.queue import enqueue_retrieves, make_celery, priority_queue_keys
from pacsfetch.sandbox.peers import Orthanc, RedisServer, free_port
from pacsfetch.sandbox.priors import HistoryStudy, generate_history_study
from pacsfetch.workers.prefetch import move_due, run_prefetch

TODAY = date(2026, 6, 1)
"""The day the inline searches run on, so look-back decisions do not drift with the clock."""

# (patient, date, modality, description, body part, accession)
HISTORY = [
    ("PF-PRI-1", date(2026, 3, 10), "CR", "XR CHEST", "CHEST", "A1"),
    ("PF-PRI-1", date(2025, 9, 1), "MR", "MR BRAIN", "HEAD", "A2"),
    ("PF-PRI-1", date(2024, 5, 1), "CT", "CT CHEST", "CHEST", "A3"),
    ("PF-PRI-1", date(2023, 2, 1), "MR", "MR BRAIN", "HEAD", "A4"),
    ("PF-PRI-1", date(2019, 1, 1), "MR", "MR KNEE", "KNEE", "A5"),
    ("PF-PRI-2", date(2025, 1, 1), "CT", "CT CHEST", "CHEST", "B1"),
    ("PF-PRI-2", date(2024, 1, 1), "CT", "CT ABDOMEN", "ABDOMEN", "B2"),
    ("PF-PRI-2", date(2023, 1, 1), "CR", "XR CHEST", "SKULL", "B3"),
]


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HistoryStudy]:
    folder = tmp_path_factory.mktemp("history")
    return {acc: generate_history_study(folder, patient_id=pid, study_date=day, modality=mod,
                                        description=desc, body_part=part, accession=acc)
            for pid, day, mod, desc, part, acc in HISTORY}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory,
            history: dict[str, HistoryStudy]) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("archive"), aet="ARCHIVE", dicomweb=False) as server:
        for item in history.values():
            server.upload_study(item.study)
        yield server


@pytest.fixture
def reading(tmp_path: Path) -> Iterator[Orthanc]:
    """The reading PACS: empty at the start of each test."""
    with Orthanc(tmp_path / "reading", aet="READING", dicomweb=False) as server:
        yield server


def prefetch_config(redis_url: str, tmp_path: Path, archive: Orthanc, reading: Orthanc,
                    **extra: Any) -> dict[str, Any]:
    data = make_config(redis_url=redis_url, store_root=tmp_path / "store", extra_sources={
        "archive": {"ae_title": archive.aet, "host": "127.0.0.1", "port": archive.dicom_port,
                    "transports": ["c-get"], "timeout": 10}})
    data["stores"]["reading"] = {"plugin": "dicom", "ae_title": reading.aet,
                                 "host": "127.0.0.1", "port": reading.dicom_port}
    data["prefetch"] = {"rules": {
        "mr": {"when_modalities": ["MR"], "prior_modalities": ["MR", "CT"],
               "lookback_years": 5, "max_priors": 2, "include_last_of_any_modality": True,
               "sources": ["archive"], "stores": ["reading"], "priority": 8,
               "lead_minutes": 60},
        "chest": {"when_modalities": ["CT", "CR"], "when_description_words": ["CHEST"],
                  "prior_description_words": ["CHEST"], "prior_body_parts": ["CHEST"],
                  "sources": ["archive"], "stores": ["reading"], "priority": 7},
    }}
    data.update(extra)
    return data


def _request(patient: str, modality: str, description: str | None = None,
             accession: str | None = None, at: datetime | None = None) -> PrefetchRequest:
    return PrefetchRequest(patient_id=patient, current=CurrentExam(
        modality=modality, study_description=description, accession_number=accession,
        scheduled_at=at))


def _decisions(record: Any, history: dict[str, HistoryStudy]) -> dict[str, tuple[str, str]]:
    by_uid = {item.study_uid: acc for acc, item in history.items()}
    return {by_uid[c.study_uid]: (c.decision.value, c.reason) for c in record.candidates}


def test_rule_picks_the_right_priors_and_says_why(
        redis_url: str, tmp_path: Path, archive: Orthanc, reading: Orthanc,
        history: dict[str, HistoryStudy]) -> None:
    config = parse_config(prefetch_config(redis_url, tmp_path, archive, reading))
    store, jobs = PrefetchStore.from_url(redis_url), JobStore.from_url(redis_url)
    record, created = request_prefetch(store, config, _request("PF-PRI-1", "MR", "MR BRAIN"),
                                       "api", "alice")
    assert created and record.rule is not None and record.rule.name == "mr"
    assert "MR is in when_modalities" in record.rule.reason

    run_prefetch(config, store, jobs, make_celery(config), record.id, "test", today=TODAY)

    done = store.get(record.id)
    assert done.status is PrefetchStatus.FETCHING
    decisions = _decisions(done, history)
    assert {acc for acc, (d, _) in decisions.items() if d == "chosen"} == {"A1", "A2", "A3"}
    assert "recent prior 1 of max_priors=2" in decisions["A2"][1]
    assert "recent prior 2 of max_priors=2" in decisions["A3"][1]
    assert "include_last_of_any_modality" in decisions["A1"][1]
    assert "not in prior_modalities" in decisions["A1"][1]
    assert decisions["A4"] == ("left-out", "matches, but max_priors=2 more recent ones were chosen")
    assert "older than lookback_years=5" in decisions["A5"][1]
    # Another patient's studies are never candidates.
    assert not {"B1", "B2", "B3"} & decisions.keys()
    # Each chosen prior became a queued retrieve job: origin prefetch, the rule's priority.
    chosen = [c for c in done.candidates if c.decision.value == "chosen"]
    for cand in chosen:
        job = jobs.get(cand.job_id)
        assert job.origin == "prefetch" and job.request.priority == 8
        assert job.request.store_names == ["reading"] and job.request.study_uid == cand.study_uid
    queued = redis.Redis.from_url(redis_url).llen(priority_queue_keys()[8])
    assert queued == len(chosen)


def test_description_and_body_part_filters(redis_url: str, tmp_path: Path, archive: Orthanc,
                                           reading: Orthanc,
                                           history: dict[str, HistoryStudy]) -> None:
    config = parse_config(prefetch_config(redis_url, tmp_path, archive, reading))
    store, jobs = PrefetchStore.from_url(redis_url), JobStore.from_url(redis_url)
    record, _ = request_prefetch(store, config, _request("PF-PRI-2", "CT", "CT THORAX CHEST"),
                                 "api", "alice")
    assert record.rule is not None and record.rule.name == "chest"
    assert "the description holds CHEST" in record.rule.reason

    run_prefetch(config, store, jobs, make_celery(config), record.id, "test", today=TODAY)

    decisions = _decisions(store.get(record.id), history)
    assert decisions["B1"][0] == "chosen"
    assert decisions["B2"] == ("left-out", "the description holds none of prior_description_words")
    assert decisions["B3"] == ("left-out", "body parts (SKULL) not in prior_body_parts")


def test_no_rule_and_a_second_trigger_for_the_same_order(
        redis_url: str, tmp_path: Path, archive: Orthanc, reading: Orthanc) -> None:
    config = parse_config(prefetch_config(redis_url, tmp_path, archive, reading))
    client = TestClient(create_app(config))
    at = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    body = {"patient_id": "PF-PRI-1",
            "current": {"modality": "MR", "accession_number": "NEW1", "scheduled_at": at}}

    first = client.post("/prefetch", json=body)
    assert first.status_code == 202, first.text
    assert first.headers["Location"] == f"/prefetch/{first.json()['id']}"
    assert first.json()["status"] == "scheduled"
    # Same order again (as the worklist entry an HL7 order produced): the same request.
    again = client.post("/prefetch", json={**body, "current": {**body["current"],
                                                               "study_description": "MR"}})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    listed = client.get("/prefetch", params={"patient_id": "PF-PRI-1"}).json()
    assert [r["id"] for r in listed] == [first.json()["id"]]
    shown = client.get(first.headers["Location"]).json()
    assert shown["rule"]["name"] == "mr"
    assert (shown["trigger"], shown["created_by"]) == ("api", "anonymous")
    start = datetime.fromisoformat(shown["start_at"])
    assert start == datetime.fromisoformat(at) - timedelta(minutes=60)

    no_rule = client.post("/prefetch", json={"patient_id": "P", "current": {"modality": "US"}})
    assert no_rule.status_code == 422
    assert no_rule.json()["detail"][0]["loc"] == ["body", "current"]
    assert "US exam" in no_rule.json()["detail"][0]["msg"]
    bad = client.post("/prefetch", json={"patient_id": "P", "current": {"modality": "C T"}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "modality"
    assert client.get("/prefetch/nope").status_code == 404
    assert PrefetchStore.from_url(config.broker.url).waiting() == 1
    # A wildcard would make the search match other patients' studies: refused, by name.
    for field, value in (("patient_id", "PF-PRI-*"), ("issuer_of_patient_id", "HOSP?")):
        wild = client.post("/prefetch", json={**body, field: value})
        assert wild.status_code == 422, wild.text
        assert wild.json()["detail"][0]["loc"] == ["body", field]
        assert "wildcard" in wild.json()["detail"][0]["msg"]

    # Cancelled, it stays cancelled; a new request through the API schedules the order anew.
    cancelled = client.delete(first.headers["Location"])
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.delete(first.headers["Location"]).status_code == 409
    renewed = client.post("/prefetch", json=body)
    assert renewed.status_code == 202 and renewed.json()["id"] != first.json()["id"]
    assert PrefetchStore.from_url(config.broker.url).waiting() == 1


def test_a_scheduler_or_worker_killed_mid_hand_off_strands_nothing(
        redis_url: str, tmp_path: Path, archive: Orthanc, reading: Orthanc) -> None:
    """A scheduler that popped a due request and died before sending it: the next leader
    sends it after the grace. A worker that claimed a search and died: once its claim
    lapses, the scheduler sends it again, once per lapse, and a new delivery takes over."""
    config = parse_config(prefetch_config(redis_url, tmp_path, archive, reading))
    store = PrefetchStore.from_url(redis_url, claim_ttl=timedelta(seconds=1))
    record, _ = request_prefetch(store, config, _request("PF-PRI-1", "MR"), "api", "alice")
    now = datetime.now(UTC) + timedelta(seconds=1)

    assert store.pop_due(now) == [record.id]  # ... and the scheduler dies here
    assert store.pop_due(now) == []  # within the grace: not twice
    assert store.pop_due(now + timedelta(seconds=HANDOFF_GRACE + 1)) == [record.id]
    store.handed_off([record.id])

    assert store.claim(record.id, "worker-a")  # ... and the worker dies mid-search
    assert not store.claim(record.id, "worker-b")  # a repeat delivery while it may live
    sent: list[list[str]] = []
    assert move_due(store, sent.append) == 0 and sent == []  # the claim holds yet
    wait_for(lambda: move_due(store, sent.append) == 1, 10, 0.2, "the claim to lapse")
    assert sent == [[record.id]]
    assert move_due(store, sent.append) == 0  # once per lapse
    assert store.claim(record.id, "worker-b")  # the new delivery takes the search over
    assert store.get(record.id).status is PrefetchStatus.SEARCHING
    store.cancel(record.id, "test over")
    time.sleep(1.2)
    assert move_due(store, sent.append) == 0 and len(sent) == 1  # finished: never again


def test_a_prior_the_reading_pacs_holds_is_not_fetched_again(
        redis_url: str, tmp_path: Path, archive: Orthanc, reading: Orthanc,
        history: dict[str, HistoryStudy]) -> None:
    reading.upload_study(history["A2"].study)
    config = parse_config(prefetch_config(redis_url, tmp_path, archive, reading))
    store, jobs = PrefetchStore.from_url(redis_url), JobStore.from_url(redis_url)
    record, _ = request_prefetch(store, config, _request("PF-PRI-1", "MR"), "api", "alice")

    run_prefetch(config, store, jobs, make_celery(config), record.id, "test", today=TODAY)

    done = store.get(record.id)
    decisions = _decisions(done, history)
    assert decisions["A2"][0] == "in-place"
    assert "every store already holds it: not fetched again" in decisions["A2"][1]
    assert {acc for acc, (d, _) in decisions.items() if d == "chosen"} == {"A1", "A3"}
    fetched = {jobs.get(c.job_id).request.study_uid for c in done.candidates if c.job_id}
    assert history["A2"].study_uid not in fetched and len(fetched) == 2


class DurableRedis(RedisServer):
    """Redis with an append-only file, as production runs it: state survives its restart."""

    def _command(self) -> list[str]:
        return [*super()._command()[:-6], "--appendonly", "yes", "--appendfsync", "always",
                "--dir", str(self.workdir)]


class SchedulerProcess(CliProcess):
    name = "scheduler"
    ready_marker = b"scheduler leads"

    def __init__(self, config_path: Path, log_path: Path) -> None:
        super().__init__(["scheduler"], config_path, log_path)


def test_a_far_future_request_survives_a_restart_of_everything_and_runs_once_at_its_time(
        tmp_path: Path, archive: Orthanc, reading: Orthanc,
        history: dict[str, HistoryStudy]) -> None:
    with DurableRedis(tmp_path / "redis") as durable:
        data = prefetch_config(durable.url, tmp_path, archive, reading)
        data["prefetch"]["rules"]["mr"]["lead_minutes"] = 0
        data["metrics"]["scheduler_port"] = free_port()
        path = write_toml(data, tmp_path / "fleet.toml")
        data["metrics"]["scheduler_port"] = free_port()  # a standby on the same host
        standby_path = write_toml(data, tmp_path / "standby.toml")
        config = parse_config(data)
        store, jobs = PrefetchStore.from_url(durable.url), JobStore.from_url(durable.url)
        at = datetime.now(UTC) + timedelta(seconds=25)
        soon, _ = request_prefetch(store, config, _request("PF-PRI-1", "MR", at=at), "api",
                                      "alice")
        later, _ = request_prefetch(store, config, _request(
            "PF-PRI-2", "MR", at=at + timedelta(days=1)), "api", "alice")

        def fleet(round_: int) -> list[CliProcess]:
            worker = WorkerProcess(path, tmp_path / f"worker{round_}.log")
            leader = SchedulerProcess(path, tmp_path / f"scheduler{round_}.log")
            leader.wait_ready()
            standby = SchedulerProcess(standby_path, tmp_path / f"standby{round_}.log")
            worker.wait_ready()
            return [worker, leader, standby]

        for process in fleet(0):  # every process stops before the request is due ...
            process.stop()
        durable.stop()
        durable.start()  # ... Redis too
        assert store.waiting() == 2
        running = fleet(1)
        try:
            done = wait_for(lambda: (r := store.get(soon.id)).status in FINAL and r,
                            timeout=120, what="the prefetch to finish")
        finally:
            for process in running:
                process.stop()

        assert done.status is PrefetchStatus.DONE, done.error
        assert done.in_place_at is not None and done.in_place_at >= at  # not before its time
        assert done.lead_seconds is not None and done.lead_seconds <= 0
        chosen = {history[a].study_uid for a in ("A1", "A2", "A3")}
        assert {c.study_uid for c in done.candidates if c.decision.value == "chosen"} == chosen
        for uid in chosen:  # in the reading PACS, whole
            assert len(reading.list_study_instances(uid)) == len(history_study(history, uid))
        # Ran once: one search, one job per prior, whatever restarted or stood by.
        logs = b"".join((tmp_path / f"worker{n}.log").read_bytes() for n in (0, 1))
        assert logs.count(b"prefetch submitted") == 1
        prefetch_jobs = [j for j in jobs.list(limit=100)[0] if j.origin == "prefetch"]
        assert sorted(j.request.study_uid for j in prefetch_jobs) == sorted(chosen)
        assert store.get(later.id).status is PrefetchStatus.SCHEDULED
        assert store.waiting() == 1


def history_study(history: dict[str, HistoryStudy], study_uid: str) -> list[str]:
    (item,) = [h for h in history.values() if h.study_uid == study_uid]
    return [instance.sop_instance_uid for instance in item.study.instances]


def test_prefetch_jobs_overtake_queued_migration_jobs_of_the_same_source(
        redis_url: str, tmp_path: Path, archive: Orthanc, reading: Orthanc,
        history: dict[str, HistoryStudy],
        start_worker: Callable[..., WorkerProcess]) -> None:
    data = prefetch_config(redis_url, tmp_path, archive, reading)
    config = parse_config(data)
    store, jobs = PrefetchStore.from_url(redis_url), JobStore.from_url(redis_url)
    celery = make_celery(config)
    migration = [jobs.create(JobRequest(source="archive", study_uid=item.study_uid,
                                        store="local", priority=0), origin="migration")
                 for acc, item in history.items() if acc.startswith("B")]
    enqueue_retrieves(celery, [(job.id, 0) for job in migration])  # queued first
    record, _ = request_prefetch(store, config, _request("PF-PRI-1", "MR"), "api", "alice")
    run_prefetch(config, store, jobs, celery, record.id, "test", today=TODAY)
    prefetched = [c.job_id for c in store.get(record.id).candidates if c.job_id]
    assert len(prefetched) == 3

    start_worker(data, concurrency=1)  # one job at a time: the queue order decides

    def finished() -> list[Any]:
        every = [jobs.get(job_id) for job_id in [*prefetched, *(j.id for j in migration)]]
        return every if all(job.status.is_final for job in every) else []

    every = wait_for(finished, timeout=120, what="every job to finish")
    started = {job.id: job.started_at for job in every}
    assert max(started[j] for j in prefetched) < min(started[j.id] for j in migration)


def test_the_cli_waits_until_the_priors_are_in_place_and_says_why(
        redis_url: str, tmp_path: Path, archive: Orthanc, reading: Orthanc,
        history: dict[str, HistoryStudy]) -> None:
    """``pacsfetch prefetch --wait`` against the fleet as processes (API, worker, scheduler):
    it prints the request id, then (on stderr) each candidate's decision and reason, and
    exits 0 once
    every chosen prior is in the reading PACS."""
    path = write_toml(prefetch_config(redis_url, tmp_path, archive, reading),
                      tmp_path / "fleet.toml")
    api = ApiProcess(path, tmp_path / "api.log", free_port())
    worker = WorkerProcess(path, tmp_path / "worker.log")
    scheduler = SchedulerProcess(path, tmp_path / "scheduler.log")
    try:
        api.wait_ready()
        worker.wait_ready()
        scheduler.wait_ready()
        result = subprocess.run(
            [sys.executable, "-m", "pacsfetch", "prefetch", "--api", api.url,
             "--patient-id", "PF-PRI-1", "--modality", "MR", "--accession", "CLI1", "--wait"],
            capture_output=True, text=True, timeout=180,
            env={**os.environ, "COLUMNS": "200"})
    finally:
        for process in (scheduler, worker, api):
            process.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    (prefetch_id,) = result.stdout.split()  # the id alone on stdout, for scripts
    record = PrefetchStore.from_url(redis_url).get(prefetch_id)
    lines = result.stderr.splitlines()  # what an operator reads
    assert record.status is PrefetchStatus.DONE and lines[-1] == "done", result.stderr
    chosen = [c.study_uid for c in record.candidates if c.decision.value == "chosen"]
    printed = [line.split()[0] for line in lines[:-1]]
    assert printed.count("chosen") == len(chosen) > 0
    assert len(printed) == len(record.candidates)
    for uid in chosen:
        assert len(reading.list_study_instances(uid)) == len(history_study(history, uid))
