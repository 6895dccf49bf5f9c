"""Migrations end to end against real peers: a source Orthanc holding studies over days and
modalities that caps its C-FIND answers (``LimitFindResults``, so planning must split), a
destination Orthanc fed by the DICOM forward store, a filesystem store and an S3 bucket (moto's
server). A real Celery worker runs the study jobs; the feeder runs here, as the scheduler's
duty would. What arrived is checked from the destination's own REST API."""

from __future__ import annotations

import csv
import io
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import CALLING_AE, WorkerProcess, make_config, wait_for
from prometheus_client.parser import text_string_to_metric_families

from pacsfetch.api.app import create_app
from pacsfetch.config import Config, parse_config
from pacsfetch.jobstore import JobStore
from pacsfetch.migrations import (
    MigrationRequest,
    MigrationStatus,
    MigrationStore,
    StudyRow,
    StudyState,
)
from pacsfetch.models import Level
from pacsfetch.sandbox.archive import ArchiveStudy, generate_archive
from pacsfetch.sandbox.peers import Orthanc, S3Server
from pacsfetch.tokens import add_token
from pacsfetch.workers.migrate import MigrationFeeder, next_feed_at

CAP = 5
STUDIES = 24


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> list[ArchiveStudy]:
    return generate_archive(tmp_path_factory.mktemp("archive"), studies=STUDIES, days=10,
                            seed=11)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory,
           archive: list[ArchiveStudy]) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("mig-source"), aet="OLDPACS", dicomweb=False,
                 extra_config={"LimitFindResults": CAP}) as server:
        server.upload(path for study in archive for path in study.paths)
        yield server


@pytest.fixture(scope="module")
def destination(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("mig-dest"), aet="NEWPACS", dicomweb=False) as server:
        yield server


@pytest.fixture
def config_data(redis_url: str, tmp_path: Path, source: Orthanc, destination: Orthanc,
                aws_credentials: S3Server) -> dict[str, Any]:
    bucket = f"mig-{uuid.uuid4().hex[:10]}"
    aws_credentials.client().create_bucket(Bucket=bucket)
    data = make_config(redis_url=redis_url, store_root=tmp_path / "store", fsync=False,
                       extra_sources={"old": {
                           "ae_title": source.aet, "host": "127.0.0.1",
                           "port": source.dicom_port, "calling_ae_title": CALLING_AE,
                           "transports": ["c-get"], "timeout": 10, "max_results": CAP}})
    data["stores"].update({
        "new": {"plugin": "dicom", "ae_title": destination.aet, "host": "127.0.0.1",
                "port": destination.dicom_port},
        "bucket": {"plugin": "s3", "bucket": bucket, "endpoint_url": aws_credentials.url,
                   "region": aws_credentials.region},
    })
    return data


@pytest.fixture
def config(config_data: dict[str, Any]) -> Config:
    return parse_config(config_data)


@pytest.fixture
def feeder(config: Config) -> Iterator[Callable[[], MigrationFeeder]]:
    """The feeder ticking on a thread, as the scheduler's leader runs it."""
    stop = threading.Event()
    made: list[tuple[MigrationFeeder, threading.Thread]] = []

    def start() -> MigrationFeeder:
        feeder = MigrationFeeder(config)

        def loop() -> None:
            while not stop.wait(0.2):
                feeder.tick()
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        made.append((feeder, thread))
        return feeder

    yield start
    stop.set()
    for feeder, thread in made:
        thread.join()
        feeder.close()


def finished(client: TestClient, mig_id: str) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        record = client.get(f"/migrations/{mig_id}").json()
        return record if MigrationStatus(record["status"]).is_final else None
    return wait_for(final, timeout=180, interval=0.3, what="the migration to finish")


def orthanc_sop_uids(server: Orthanc) -> list[str]:
    found = httpx.post(f"{server.http_url}/tools/find", json={
        "Level": "Instance", "Query": {}, "Expand": True}, timeout=30).json()
    return [item["MainDicomTags"]["SOPInstanceUID"] for item in found]


def test_an_archive_migrates_whole_and_verified_then_a_rerun_skips_it(
        config: Config, config_data: dict[str, Any], archive: list[ArchiveStudy],
        destination: Orthanc, start_worker: Callable[..., WorkerProcess],
        feeder: Callable[[], MigrationFeeder], tmp_path: Path) -> None:
    start_worker(config_data, concurrency=2)
    feeder()
    client = TestClient(create_app(config))
    response = client.post("/migrations", json={
        "source": "old", "stores": ["new", "local", "bucket"], "max_in_flight": 3})
    assert response.status_code == 202, response.text
    mig_id = response.json()["id"]
    assert response.headers["Location"] == f"/migrations/{mig_id}"

    record = finished(client, mig_id)
    assert record["status"] == "succeeded", record
    assert record["plan_complete"] is True
    counts = record["studies"]
    assert counts["planned"] == STUDIES == counts["verified"] == counts["done"]
    expected = sorted(uid for study in archive for uid in study.sop_uids)
    assert record["instances_planned"] == len(expected)
    assert record["instances_moved"] == len(expected)

    assert sorted(orthanc_sop_uids(destination)) == expected  # each arrived, once
    files = sorted(p.stem for p in (tmp_path / "store").rglob("*.dcm"))
    assert files == expected
    bucket = config.stores["bucket"].settings
    import boto3
    s3 = boto3.client("s3", endpoint_url=bucket["endpoint_url"], region_name=bucket["region"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket["bucket"])["Contents"]]
    assert sorted(k.rsplit("/", 1)[1].removesuffix(".dcm") for k in keys) == expected

    report = list(csv.DictReader(io.StringIO(client.get(f"/migrations/{mig_id}/report").text)))
    assert sorted(r["study_uid"] for r in report) == sorted(s.study_uid for s in archive)
    assert {r["status"] for r in report} == {"verified"}
    by_uid = {s.study_uid: s for s in archive}
    for row in report:
        assert row["study_date"] == by_uid[row["study_uid"]].study_date
        assert row["instances_source"] == row["instances_destination"] == "2"

    pages, cursor = [], 0
    while True:
        page = client.get(f"/migrations/{mig_id}/studies",
                          params={"cursor": cursor, "limit": 7, "status": "verified"}).json()
        pages += page["items"]
        cursor = page["cursor"]
        if cursor == 0:
            break
    assert len({item["study_uid"] for item in pages}) == STUDIES

    # Again into the destination alone: everything is there, nothing is fetched.
    jobs_before = JobStore.from_url(config.broker.url).count_by_status()
    again = client.post("/migrations", json={"source": "old", "stores": ["new"]}).json()["id"]
    record = finished(client, again)
    assert record["status"] == "succeeded"
    assert record["studies"]["skipped"] == STUDIES and record["instances_moved"] == 0
    assert JobStore.from_url(config.broker.url).count_by_status() == jobs_before

    # A partial study at the destination: only what is missing moves.
    study = archive[5]
    lookup = httpx.post(f"{destination.http_url}/tools/lookup",
                        content=study.sop_uids[1]).json()
    httpx.delete(f"{destination.http_url}/instances/{lookup[0]['ID']}").raise_for_status()
    partial = client.post("/migrations", json={
        "source": "old", "stores": ["new"],
        "filter": {"study_uids": [study.study_uid]}}).json()["id"]
    record = finished(client, partial)
    assert record["status"] == "succeeded" and record["studies"]["verified"] == 1
    [row] = client.get(f"/migrations/{partial}/studies").json()["items"]
    job = JobStore.from_url(config.broker.url).get(row["job_id"])
    assert job.request.level is Level.IMAGE and job.request.sop_uids == [study.sop_uids[1]]
    assert sorted(orthanc_sop_uids(destination)) == expected


def test_planning_splits_capped_windows_and_honours_the_filter(
        config: Config, archive: list[ArchiveStudy]) -> None:
    from pacsfetch.gate import process_gate
    from pacsfetch.workers.planner import run_planning

    store = MigrationStore.from_url(config.broker.url)
    wanted = [s for s in archive if s.modality == "CT" and "20230302" <= s.study_date <= "20230308"]
    record = store.create(MigrationRequest.model_validate({
        "source": "old", "stores": ["local"],
        "filter": {"from": "20230302", "to": "20230308", "modalities": ["CT"]}}))
    run_planning(config, store, process_gate(config), record.id, threading.Event())
    planned = {row.study_uid: row for row in store.scan_studies(record.id)}
    assert sorted(planned) == sorted(s.study_uid for s in wanted)
    assert all(row.instances_source == 2 for row in planned.values())

    everything = store.create(MigrationRequest(source="old", stores=["local"]))
    run_planning(config, store, process_gate(config), everything.id, threading.Event())
    result = store.get(everything.id)
    assert result.plan_complete and result.studies.planned == STUDIES
    assert result.instances_planned == 2 * STUDIES


def test_bad_input_names_the_field(config: Config) -> None:
    client = TestClient(create_app(config))
    for body, loc in [({"source": "nope", "stores": ["local"]}, ["body", "source"]),
                      ({"source": "old", "stores": ["local", "x"]}, ["body", "stores", 1]),
                      ({"source": "old", "stores": ["local"], "filter": {"from": "2023"}},
                       ["body", "filter", "from"])]:
        response = client.post("/migrations", json=body)
        assert response.status_code == 422, body
        assert response.json()["detail"][0]["loc"] == loc
    assert client.get("/migrations/nope").status_code == 404


def test_csv_upload_admin_scope_creator_and_audit(config_data: dict[str, Any],
                                                  tmp_path: Path) -> None:
    """Creating and steering a migration takes `admin`; the record names the token; a CSV
    body lists the studies and a bad cell is answered naming its line and column; creating
    and cancelling are audited without the listed patient IDs."""
    tokens = tmp_path / "tokens"
    ris, ops = add_token(tokens, "ris", "submit,read"), add_token(tokens, "ops", "admin")
    config_data["api"] = {"tokens_file": str(tokens)}
    config_data["audit"] = {"path": str(tmp_path / "audit.jsonl")}
    app = create_app(parse_config(config_data))
    as_ris = TestClient(app, headers={"Authorization": f"Bearer {ris}"})
    as_ops = TestClient(app, headers={"Authorization": f"Bearer {ops}"})
    body = {"source": "old", "stores": ["local"], "filter": {"from": "20200101"}}

    refused = as_ris.post("/migrations", json=body)
    assert refused.status_code == 403 and "'admin'" in refused.json()["detail"]
    created = as_ops.post("/migrations", json=body)
    assert created.status_code == 202, created.text
    assert as_ris.get(created.headers["Location"]).json()["created_by"] == "ops"
    assert as_ris.delete(created.headers["Location"]).status_code == 403
    assert as_ops.delete(created.headers["Location"]).json()["status"] == "cancelled"

    params = {"source": "old", "store": ["local", "new"], "modality": ["CT"]}
    csv_text = "patient_id,note\nP-MIG-SECRET-1,first\n\nP-MIG-SECRET-2,second\n"
    upload = as_ops.post("/migrations/csv", params=params, content=csv_text,
                         headers={"Content-Type": "text/csv"})
    assert upload.status_code == 202, upload.text
    shown = as_ops.get(upload.headers["Location"]).json()
    assert shown["request"]["stores"] == ["local", "new"]
    assert shown["request"]["filter"]["patient_ids"] == ["P-MIG-SECRET-1", "P-MIG-SECRET-2"]
    assert shown["request"]["filter"]["modalities"] == ["CT"]
    assert as_ris.post("/migrations/csv", params=params, content=csv_text).status_code == 403

    for text, key, loc, says in [
            ("study_uid\n1.2.3\n1.2.x4\n", None, ["body", 3, "study_uid"], "line 3, column "
             "study_uid: '1.2.x4': Value error, UID must be a DICOM UID"),
            ("accession_number\nA1\nA*\n", None, ["body", 3, "accession_number"],
             "line 3, column accession_number: 'A*' holds a C-FIND wildcard"),
            ("1.2.3\n", None, ["body", 1], "line 1: the first row must name the column"),
            ("study_uid\n\n", None, ["body", 2, "study_uid"], "line 2, column study_uid: no "
             "values"),
            ("1.2.3\n", "study_uid", ["query", "store"], "")]:
        query = {**params, **({"key": key} if key else {})}
        if loc[0] == "query":
            query["store"] = ["local", "nowhere"]
        answer = as_ops.post("/migrations/csv", params=query, content=text)
        assert answer.status_code == 422, (text, answer.text)
        detail = answer.json()["detail"][0]
        assert detail["loc"][:len(loc)] == loc and detail["msg"].startswith(says), detail
    one_column = as_ops.post("/migrations/csv", params={**params, "key": "study_uid"},
                             content="1.2.3\n1.2.4\n")
    assert one_column.status_code == 202, one_column.text

    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["caller"]) for e in events] == [
        ("migration.create", "ops"), ("migration.cancel", "ops"), ("migration.create", "ops"),
        ("migration.create", "ops")]
    assert events[2]["filter"]["patient_ids"] == 2 and events[2]["stores"] == ["local", "new"]
    assert "SECRET" not in (tmp_path / "audit.jsonl").read_text()


def test_metrics_show_studies_by_state_instances_bytes_and_eta_per_source(
        config: Config) -> None:
    """Read at scrape time from the records, labelled by configured source and state only."""
    store = MigrationStore.from_url(config.broker.url)
    running = store.create(MigrationRequest(source="old", stores=["local"]), "ops")
    uids = [f"1.2.826.0.1.3680043.8.498.77{n}" for n in range(3)]
    store.add_studies(running.id, [StudyRow(uid, StudyState.PLANNED, "20200101", 4)
                                   for uid in uids])
    store.take(running.id, 2)
    store.set_study(running.id, StudyRow(uids[0], StudyState.VERIFIED, "20200101", 4, 4),
                    moved=4, moved_bytes=4_000_000, done_instances=4)
    store.set_study(running.id, StudyRow(uids[1], StudyState.RUNNING, "20200101", 4))
    store.set_fields(running.id, eta=120.0)
    done = store.create(MigrationRequest(source="old", stores=["local"]), "ops")
    store.finish(done.id, MigrationStatus.SUCCEEDED)

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(
                   TestClient(create_app(config)).get("/metrics").text)
               for s in family.samples if "migration" in s.name}
    src = (("source", "old"),)
    assert samples[("pacsfetch_migration_studies", (*src, ("state", "verified")))] == 1
    assert samples[("pacsfetch_migration_studies", (*src, ("state", "running")))] == 1
    assert samples[("pacsfetch_migration_studies", (*src, ("state", "planned")))] == 1
    assert samples[("pacsfetch_migration_instances_planned", src)] == 12
    assert samples[("pacsfetch_migration_instances_moved", src)] == 4
    assert samples[("pacsfetch_migration_bytes_moved", src)] == 4_000_000
    assert samples[("pacsfetch_migration_eta_seconds", src)] == 120
    assert samples[("pacsfetch_migrations", (("status", "succeeded"),))] == 1
    assert samples[("pacsfetch_migrations", (("status", "planning"),))] == 1
    assert not any(uid in str(key) for key in samples for uid in uids)


def test_feeding_stops_before_a_window_closes_and_keeps_under_the_rate_cap(
        config_data: dict[str, Any]) -> None:
    """No study is fed in the last seconds of a window; closed, the migration waits showing
    the next opening; with max_mb_per_second, the bytes moved hold the next study back."""
    config_data["sources"]["old"].update(windows=["Mon-Fri 07:00-19:00"], max_mb_per_second=1)
    config = parse_config(config_data)
    store = MigrationStore.from_url(config.broker.url)
    mig = store.create(MigrationRequest(source="old", stores=["local"], max_in_flight=1), "ops")
    uids = [f"1.2.826.0.1.3680043.8.498.88{n}" for n in range(3)]
    store.add_studies(mig.id, [StudyRow(uid, StudyState.PLANNED, "20200101", 2) for uid in uids])
    store.finish_planning(mig.id)
    monday = datetime(2026, 6, 1, tzinfo=UTC)
    feeder = MigrationFeeder(config)
    try:
        feeder.tick(monday.replace(hour=18, minute=59, second=55))  # closes in 5 s
        assert store.queued(mig.id) == 3 and store.inflight(mig.id) == {}
        assert store.get(mig.id).status is MigrationStatus.RUNNING

        feeder.tick(monday.replace(hour=19, minute=0, second=30))
        waiting = store.get(mig.id)
        assert waiting.status is MigrationStatus.WAITING_WINDOW
        assert waiting.waiting_until == datetime(2026, 6, 2, 7, tzinfo=UTC)
        assert store.queued(mig.id) == 3

        feeder.tick(monday.replace(hour=18))  # an hour before closing: one study goes
        wait_for(lambda: not feeder.busy(), 30, 0.1, "the study check")
        assert store.queued(mig.id) == 2
        (first,) = store.inflight(mig.id)
        job_id = store.inflight(mig.id)[first]
        # Two studies of 4 MB ended together: at 1 MB/s the second one's 4 s are still to
        # come (the first took its own time already), so the next study waits 4 s.
        at = monday.replace(hour=18, second=10)
        for _ in range(2):
            feeder.moved(mig.id, store.get(mig.id).request, 4_000_000, now=at.timestamp())
        store.set_study(mig.id, StudyRow(first, StudyState.VERIFIED, "20200101", 2, 2, job_id))
        feeder.tick(at + timedelta(seconds=2))
        assert store.queued(mig.id) == 2 and store.inflight(mig.id) == {}
        feeder.tick(at + timedelta(seconds=4.5))
        wait_for(lambda: not feeder.busy(), 30, 0.1, "the study check")
        assert store.queued(mig.id) == 1
    finally:
        feeder.close()


def test_next_feed_at_keeps_the_average_under_the_cap() -> None:
    assert next_feed_at(0, 100, 5_000_000, 1) == 100  # idle before: it took its own time
    assert next_feed_at(100, 100, 5_000_000, 1) == 105  # a second at once: it adds its 5 s
    assert next_feed_at(105, 101, 5_000_000, 1) == 110  # in parallel: they add up
    assert next_feed_at(100, 100, 5_000_000, 10) == 100.5
