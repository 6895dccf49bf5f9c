"""Faults end with the true reason, and are retried where a retry can help (issue 14, item 4).

Every fault here is real: a Redis restarted under a running job, a store on a file system
that fills up, a forward destination that is down and comes back. Workers are real
``pacsfetch worker`` processes, the PACS a real Orthanc.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import ReceiverProcess, WorkerProcess, make_config, run_job, wait_for, write_toml
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

from pacsfetch.api.app import create_app
from pacsfetch.config import Config, parse_config
from pacsfetch.models import JobRequest, JobStatus
from pacsfetch.sandbox.peers import Orthanc, RedisServer, StoreScp, free_port
from pacsfetch.sandbox.samples import SampleStudy

FINAL = {"succeeded", "partial", "failed", "cancelled"}


def _client(config: dict[str, Any]) -> TestClient:
    return TestClient(create_app(parse_config(config)))


def _job(client: TestClient, job_id: str) -> dict[str, Any]:
    return client.get(f"/jobs/{job_id}").json()


def _final(client: TestClient, job_id: str, timeout: float = 180) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = _job(client, job_id)
        return job if job.get("status") in FINAL else None

    return wait_for(done, timeout, 0.2, f"job {job_id} to finish")


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and ".pacsfetch" not in p.parts]


# Redis restarts under a running job ---------------------------------------------------------
OUTAGE_SECONDS = 3.0
"""How long Redis is down in the test: a restart, well within redis_outage_seconds (60)."""


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, with AOF as production runs it, so it can be restarted."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    with server:
        yield server


def test_redis_restart_during_a_job_is_ridden_out_and_the_job_finishes(
    own_redis: RedisServer, orthanc: Orthanc, big_study: SampleStudy, tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    config = make_config(redis_url=own_redis.url, store_root=tmp_path / "store",
                         orthanc=orthanc)
    worker = start_worker(config)
    client = _client(config)
    job_id = client.post("/jobs", json={"source": "orthanc", "study_uid": big_study.study_uid,
                                        "store": "local"}).json()["id"]
    wait_for(lambda: _job(client, job_id)["progress"]["completed"] >= 40, 60, 0.02,
             "the job to be well under way")
    own_redis.kill()  # as a crash or a lost node would; AOF keeps what was acknowledged
    time.sleep(OUTAGE_SECONDS)
    own_redis.start()
    job = _final(client, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1, "the outage was ridden out, not retried"
    assert job["progress"]["completed"] == len(big_study.instances)
    files = _files(tmp_path / "store")
    assert sorted(p.stem for p in files) == sorted(i.sop_instance_uid for i in big_study.instances)
    log = worker.log_path.read_text()
    assert "Exception in thread lease-" not in log, "the lease heartbeat died"
    assert "Redis did not answer" in log  # the outage is logged, once per call that waited


# A store on a file system that fills up -------------------------------------------------------
SMALL_DISK = "4m"
"""The store's file system: room for about a hundred of big_study's 400 instances (33 KB)."""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of SMALL_DISK as the store root (mounting needs root: skipped without)."""
    root = tmp_path / "small"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs",
                              str(root)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def _assert_nothing_half_written(root: Path, completed: int) -> None:
    """Every visible file is a whole instance; the job recorded no more than are there
    (a batch whose sync failed is not recorded, and is fetched again by a later attempt)."""
    files = _files(root)
    assert 0 < completed <= len(files)
    assert not [p for p in files if p.suffix == ".part"]
    for path in files:
        assert dcmread(path).SOPInstanceUID == path.stem


def test_full_store_disk_ends_partial_naming_the_store_and_is_not_retried(
    orthanc: Orthanc, big_study: SampleStudy, small_disk: Path, redis_url: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    config = make_config(redis_url=redis_url, store_root=small_disk, orthanc=orthanc)
    start_worker(config)
    client = _client(config)
    job_id = client.post("/jobs", json={"source": "orthanc", "study_uid": big_study.study_uid,
                                        "store": "local"}).json()["id"]
    job = _final(client, job_id)
    assert job["status"] == "partial", job["error"]
    assert job["error_kind"] == "store"
    assert "store 'local'" in job["error"] and "no space left" in job["error"].lower()
    assert job["attempts"] == 1, "a full disk is not retried until space returns"
    assert 0 < job["progress"]["completed"] < len(big_study.instances)
    _assert_nothing_half_written(small_disk, job["progress"]["completed"])


def test_full_store_disk_by_dicomweb_names_the_store(
    config_factory: Callable[..., Config], orthanc: Orthanc, big_study: SampleStudy,
    small_disk: Path,
) -> None:
    config = config_factory(store_root=small_disk, extra_sources={"web": {
        "ae_title": "GATEWAY", "host": "127.0.0.1", "port": 104, "transports": ["dicomweb"],
        "dicomweb_url": orthanc.dicomweb_url, "timeout": 10}})
    outcome = run_job(config, JobRequest(source="web", study_uid=big_study.study_uid,
                                         store="local"))
    assert outcome.status is JobStatus.PARTIAL, outcome.error
    assert outcome.error_kind == "store"
    assert "store 'local'" in (outcome.error or "")
    assert "no space left" in (outcome.error or "").lower()
    assert not outcome.retry
    _assert_nothing_half_written(small_disk, outcome.progress.completed)


# A store that fails for another reason: retried like a connection failure ---------------------
def _forwarding(config: dict[str, Any], port: int) -> dict[str, Any]:
    """*config* with a DICOM forward store 'newpacs' at *port* beside the filesystem."""
    config["stores"]["newpacs"] = {"plugin": "dicom", "ae_title": "NEWPACS",
                                   "host": "127.0.0.1", "port": port, "timeout": 5}
    return config


def test_store_down_then_back_is_retried_with_back_off_and_the_job_succeeds(
    orthanc: Orthanc, mixed_study: SampleStudy, redis_url: str, tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    port = free_port()
    config = _forwarding(make_config(redis_url=redis_url, store_root=tmp_path / "store",
                                     orthanc=orthanc,
                                     worker={"max_retries": 3, "retry_backoff": 2.0}), port)
    start_worker(config)
    client = _client(config)
    job_id = client.post("/jobs", json={"source": "orthanc", "study_uid": mixed_study.study_uid,
                                        "stores": ["newpacs", "local"]}).json()["id"]
    waiting = wait_for(lambda: (job := _job(client, job_id))["status"] == "queued"
                       and job["error"] and job, 60, 0.05, "the first attempt to fail")
    assert waiting["error_kind"] == "store"
    assert waiting["error"].startswith("attempt 1 failed, retrying in 2 s")
    assert "'newpacs'" in waiting["error"]
    with StoreScp(tmp_path / "newpacs", aet="NEWPACS", port=port) as archive:
        job = _final(client, job_id)
        forwarded = list(archive.received_dir.glob("*.dcm"))
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] >= 2
    assert len(forwarded) == len(mixed_study.instances)
    assert len(_files(tmp_path / "store")) == len(mixed_study.instances)


def test_store_that_stays_down_fails_naming_it_after_the_retries(
    orthanc: Orthanc, mixed_study: SampleStudy, redis_url: str, tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    config = _forwarding(make_config(redis_url=redis_url, store_root=tmp_path / "store",
                                     orthanc=orthanc), free_port())
    start_worker(config)
    client = _client(config)
    job_id = client.post("/jobs", json={"source": "orthanc", "study_uid": mixed_study.study_uid,
                                        "stores": ["newpacs", "local"]}).json()["id"]
    job = _final(client, job_id)
    assert job["status"] == "failed"
    assert job["error_kind"] == "store"
    assert job["attempts"] == 3  # the first try and worker.max_retries = 2 retries
    assert "failing store(s): 'newpacs'" in job["error"]
    assert "cannot connect to 127.0.0.1" in job["error"]
    assert job["error"].endswith("(gave up after 3 attempts)")
    assert _files(tmp_path / "store") == []  # 'newpacs' commits first and failed each time


# A C-MOVE the PACS fails after part of the study arrived --------------------------------------
RECEIVER_AE = "PACSFETCH"


@pytest.fixture
def move_setup(tmp_path: Path, redis_url: str, big_study: SampleStudy) -> Iterator[dict[str, Any]]:
    """An Orthanc that moves to a receiver port, and the configuration of the receiver and
    the worker (one retry after 3 s, time enough to start the receiver again)."""
    port = free_port()
    with Orthanc(tmp_path / "orthanc", aet="MOVEFAIL", dicomweb=False,
                 modalities={RECEIVER_AE: (RECEIVER_AE, "127.0.0.1", port)}) as pacs:
        pacs.upload_study(big_study)
        config = make_config(redis_url=redis_url, store_root=tmp_path / "store",
                             worker={"max_retries": 1, "retry_backoff": 3.0}, extra_sources={
            "pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port,
                     "calling_ae_title": "PFWORKER", "transports": ["c-move"],
                     "move_destination": RECEIVER_AE, "timeout": 10}})
        config["receiver"] = {"ae_title": RECEIVER_AE, "port": port, "bind": "127.0.0.1"}
        yield config


def _receiver(config: dict[str, Any], tmp_path: Path, name: str) -> ReceiverProcess:
    process = ReceiverProcess(write_toml(config, tmp_path / f"{name}.toml"),
                              tmp_path / f"{name}.log", config["receiver"]["port"])
    process.wait_ready()
    return process


def _kill_receiver_mid_move(config: dict[str, Any], study: SampleStudy, tmp_path: Path,
                            start_worker: Callable[..., WorkerProcess]
                            ) -> tuple[TestClient, str, dict[str, Any]]:
    """Start a C-MOVE job, kill the receiver once 40 instances are stored; returns the job
    as it waits for its retry."""
    receiver = _receiver(config, tmp_path, "receiver1")
    try:
        start_worker(config)
        client = _client(config)
        job_id = client.post("/jobs", json={"source": "pacs", "study_uid": study.study_uid,
                                            "store": "local"}).json()["id"]
        wait_for(lambda: _job(client, job_id)["progress"]["completed"] >= 40, 60, 0.02,
                 "the receiver to store the first instances")
    finally:
        receiver.proc.kill()  # the move destination dies: the PACS's C-STOREs fail
        receiver.stop()
    waiting = wait_for(lambda: (job := _job(client, job_id))["status"] == "queued"
                       and job["error"] and job, 60, 0.05, "the first attempt to fail")
    return client, job_id, waiting


def test_c_move_failing_part_way_is_retried_resuming_from_what_is_stored(
    move_setup: dict[str, Any], big_study: SampleStudy, tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    client, job_id, waiting = _kill_receiver_mid_move(move_setup, big_study, tmp_path,
                                                      start_worker)
    assert waiting["error"].startswith("attempt 1 failed, retrying in 3 s")
    assert waiting["error_kind"] == "peer-status"
    assert "moved nothing" not in waiting["error"]
    assert "stopped part-way; a retry resumes" in waiting["error"]
    stored_first = waiting["progress"]["completed"]
    assert stored_first >= 40
    receiver = _receiver(move_setup, tmp_path, "receiver2")
    try:
        job = _final(client, job_id)
    finally:
        receiver.stop()
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    assert job["progress"]["skipped"] >= stored_first
    assert job["progress"]["completed"] == len(big_study.instances)
    files = _files(tmp_path / "store")
    assert sorted(p.stem for p in files) == sorted(i.sop_instance_uid for i in big_study.instances)


def test_c_move_failing_with_the_receiver_still_down_ends_partial_not_moved_nothing(
    move_setup: dict[str, Any], big_study: SampleStudy, tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    client, job_id, waiting = _kill_receiver_mid_move(move_setup, big_study, tmp_path,
                                                      start_worker)
    stored_first = waiting["progress"]["completed"]
    job = _final(client, job_id)  # the retry finds the receiver still down
    assert job["status"] == "partial", job["error"]
    assert job["attempts"] == 2
    # A receiver killed with -9 may leave its last batch stored but unrecorded: fetched again.
    assert job["progress"]["completed"] == stored_first <= len(_files(tmp_path / "store"))
    assert "moved nothing" not in job["error"]
    assert "does not know move destination" not in job["error"]
    assert f"{stored_first} stored for the job so far" in job["error"]
    assert job["error"].endswith("(gave up after 2 attempts)")


# A PACS whose C-FIND answers carry malformed UIDs ---------------------------------------------
STUDY_UID = "1.2.826.0.1.3680043.8.498.4242"
GOOD_SERIES = "1.2.826.0.1.3680043.8.498.4242.1"


@pytest.fixture
def odd_pacs(request: pytest.FixtureRequest) -> Iterator[int]:
    """A pynetdicom C-FIND SCP (the odd peer: no real archive sends such answers on purpose)
    answering with malformed UIDs at the level the test names: ``series`` or ``image``."""
    bad_level = request.param

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        level = event.identifier.QueryRetrieveLevel
        for n in range(3):
            answer = Dataset()
            answer.QueryRetrieveLevel = level
            answer.StudyInstanceUID = STUDY_UID
            if level == "SERIES":
                answer.SeriesInstanceUID = f"1.2.3.x{n}" if bad_level == "series" else GOOD_SERIES
                answer.Modality = "CT"
            else:
                answer.SeriesInstanceUID = GOOD_SERIES
                answer.SOPInstanceUID = f"1.2.03.{n}"  # a leading zero: not a UID
                answer.SOPClassUID = CTImageStorage
            yield 0xFF00, answer

    ae = AE(ae_title="ODDPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        yield port
    finally:
        server.shutdown()


@pytest.mark.parametrize(("odd_pacs", "level"), [("series", "3 series with invalid UIDs at "
                                                  "SERIES level"),
                                                 ("image", "3 instance(s) with invalid UIDs at "
                                                  "IMAGE level")], indirect=["odd_pacs"])
def test_malformed_uids_in_c_find_answers_are_named_with_their_level(
    config_factory: Callable[..., Config], odd_pacs: int, level: str,
) -> None:
    config = config_factory(extra_sources={"odd": {
        "ae_title": "ODDPACS", "host": "127.0.0.1", "port": odd_pacs, "transports": ["c-get"],
        "timeout": 5}})
    outcome = run_job(config, JobRequest(source="odd", study_uid=STUDY_UID, store="local"))
    assert outcome.status is JobStatus.FAILED
    assert outcome.error_kind == "query"
    assert f"ODDPACS@127.0.0.1:{odd_pacs} listed {level}" in (outcome.error or "")
    assert "C-FIND found none" not in (outcome.error or "")
