"""C-MOVE through a real ``pacsfetch receiver`` subprocess, from real Orthanc and dcmqrscp.

Orthanc knows the receiver as modality ``PACSFETCH`` and a dead port as ``NOWHERE``;
dcmqrscp knows the receiver as ``PACSFETCH``. Both PACS connect back to the receiver over
loopback, as a PACS in the same network would.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import (
    CALLING_AE,
    ReceiverProcess,
    WorkerProcess,
    make_config,
    run_job,
    wait_for,
    write_toml,
)
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from pacsfetch.api.app import create_app
from pacsfetch.config import Config, ConfigError, parse_config
from pacsfetch.jobstore import JobStore
from pacsfetch.models import JobRequest, JobStatus, Level
from pacsfetch.moves import MoveBook
from pacsfetch.plugins.registry import get_registry
from pacsfetch.plugins.transports.query import find_instances
from pacsfetch.sandbox.peers import DcmQrScp, Orthanc, RedisServer, free_port
from pacsfetch.sandbox.samples import SampleStudy, generate_uniform_study
from pacsfetch.workers.receiver import MoveReceiver
from pacsfetch.workers.state import LocalJobState

RECEIVER_AE = "PACSFETCH"


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"receiver": free_port(), "dead": free_port()}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[SampleStudy]:
    """Three small uncompressed studies (dcmqrscp's C-MOVE sends uncompressed only)."""
    return [generate_uniform_study(tmp_path_factory.mktemp(f"move{n}"), n_instances=30, rows=32,
                                   columns=32, patient_id=f"PF-MOVE-{n}", seed=100 + n)
            for n in range(3)]


@pytest.fixture(scope="module")
def stray(tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    """A study no PACS holds and no test retrieves: only sent straight to the receiver."""
    return generate_uniform_study(tmp_path_factory.mktemp("stray"), n_instances=3, rows=16,
                                  columns=16, patient_id="PF-STRAY", seed=999)


@pytest.fixture(scope="module")
def move_orthanc(tmp_path_factory: pytest.TempPathFactory, ports: dict[str, int],
                 silent_port: int, mixed_study: SampleStudy,
                 studies: list[SampleStudy]) -> Iterator[Orthanc]:
    modalities = {"PACSFETCH": (RECEIVER_AE, "127.0.0.1", ports["receiver"]),
                  "NOWHERE": ("NOWHERE", "127.0.0.1", ports["dead"]),
                  "SILENT": ("SILENT", "127.0.0.1", silent_port)}
    with Orthanc(tmp_path_factory.mktemp("move-orthanc"), aet="MOVESCP", modalities=modalities,
                 dicomweb=False) as server:
        server.upload_study(mixed_study)
        for study in studies:
            server.upload_study(study)
        yield server


@pytest.fixture(scope="module")
def capped_study(tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    return generate_uniform_study(tmp_path_factory.mktemp("capped-move"), n_instances=30,
                                  rows=16, columns=16, patient_id="PF-MOVE-CAPPED", seed=130)


@pytest.fixture(scope="module")
def capped_move_orthanc(tmp_path_factory: pytest.TempPathFactory, ports: dict[str, int],
                        capped_study: SampleStudy) -> Iterator[Orthanc]:
    """Caps image-level C-FIND answers at 8 (it ends them with 0xFE00 after the matches)."""
    with Orthanc(tmp_path_factory.mktemp("capped-move-orthanc"), aet="CAPMOVE",
                 modalities={"PACSFETCH": (RECEIVER_AE, "127.0.0.1", ports["receiver"])},
                 dicomweb=False, extra_config={"LimitFindInstances": 8}) as server:
        server.upload_study(capped_study)
        yield server


@pytest.fixture(scope="module")
def dcmqrscp(tmp_path_factory: pytest.TempPathFactory, ports: dict[str, int],
             studies: list[SampleStudy]) -> Iterator[DcmQrScp]:
    with DcmQrScp(tmp_path_factory.mktemp("move-dcmqrscp"),
                  move_destinations={RECEIVER_AE: ("127.0.0.1", ports["receiver"])},
                  files=[i.path for i in studies[0].instances]) as server:
        yield server


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
             ports: dict[str, int], move_orthanc: Orthanc, capped_move_orthanc: Orthanc,
             dcmqrscp: DcmQrScp) -> dict[str, Any]:
    """One configuration for the receiver, the workers and inline runs alike."""
    orthanc = {"ae_title": move_orthanc.aet, "host": "127.0.0.1",
               "port": move_orthanc.dicom_port, "calling_ae_title": CALLING_AE,
               "transports": ["c-move", "c-get"], "move_destination": "PACSFETCH", "timeout": 10}
    data = make_config(
        redis_url=redis_server.url, store_root=tmp_path_factory.mktemp("move-store"),
        extra_sources={
            "orthanc": orthanc,
            "unknown-dest": {**orthanc, "move_destination": "UNKNOWN"},
            "receiver-down": {**orthanc, "move_destination": "NOWHERE"},
            "silent-dest": {**orthanc, "move_destination": "SILENT", "timeout": 2},
            "capped": {**orthanc, "ae_title": capped_move_orthanc.aet,
                       "port": capped_move_orthanc.dicom_port},
            "dcmqrscp": {"ae_title": dcmqrscp.aet, "host": "127.0.0.1", "port": dcmqrscp.port,
                         "calling_ae_title": CALLING_AE, "transports": ["c-move"],
                         "move_destination": RECEIVER_AE, "timeout": 10},
        },
    )
    data["sources"]["dcmqrscp-unknown"] = {**data["sources"]["dcmqrscp"],
                                           "move_destination": "UNKNOWN"}
    data["receiver"] = {"ae_title": RECEIVER_AE, "port": ports["receiver"], "bind": "127.0.0.1"}
    return data


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory,
             settings: dict[str, Any]) -> Iterator[ReceiverProcess]:
    workdir = tmp_path_factory.mktemp("receiver")
    process = ReceiverProcess(write_toml(settings, workdir / "receiver.toml"),
                              workdir / "receiver.log", settings["receiver"]["port"])
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture
def config(settings: dict[str, Any], receiver: ReceiverProcess) -> Config:
    return parse_config(settings)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"receiver": {"prot": 104}}, "receiver.prot: unknown key"),
        ({"receiver": {"port": 0}}, "receiver.port:"),
        ({"receiver": {"ae_title": "A" * 17}}, "receiver.ae_title:"),
        ({"receiver": {"accept_from": ["OK", "BAD\\AE"]}}, "receiver.accept_from[1]:"),
        ({"sources": {"o": {"ae_title": "O", "host": "h", "port": 1,
                            "move_destination": "A" * 17}}}, "sources.o.move_destination:"),
    ],
)
def test_bad_receiver_or_move_settings_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert key in str(info.value)


def root(config: Config) -> Path:
    return Path(config.stores["local"].settings["root"])


def stored(config: Config, study_uid: str) -> set[str]:
    return {p.stem for p in (root(config) / study_uid).rglob("*.dcm")}


def test_orthanc_moves_a_study_with_several_sop_classes_to_the_receiver(
    config: Config, move_orthanc: Orthanc, mixed_study: SampleStudy
) -> None:
    # Orthanc sends the originator AE title and message ID: matched by those.
    outcome = run_job(config, JobRequest(source="orthanc", study_uid=mixed_study.study_uid,
                                         store="local", transport="c-move"))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.transport == "c-move"
    assert outcome.progress.completed == len(mixed_study.instances)
    assert stored(config, mixed_study.study_uid) == {
        i.sop_instance_uid for i in mixed_study.instances}
    files = list((root(config) / mixed_study.study_uid).rglob("*.dcm"))
    assert outcome.progress.bytes == sum(p.stat().st_size for p in files)
    sample = mixed_study.instances[0]
    path = root(config) / sample.study_uid / sample.series_uid / f"{sample.sop_instance_uid}.dcm"
    assert dcmread(path, stop_before_pixels=True).SOPInstanceUID == sample.sop_instance_uid


def test_resumed_job_moves_only_what_is_missing(config: Config, studies: list[SampleStudy]) -> None:
    study = studies[1]
    done = study.instances[:10]
    state = LocalJobState()
    state.instances = {i.sop_instance_uid: '{"local":"earlier"}' for i in done}
    job_id = uuid.uuid4().hex
    outcome = run_job(config, JobRequest(
        source="orthanc", study_uid=study.study_uid, store="local", transport="c-move"), state,
        job_id)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.progress.skipped == 10
    assert outcome.progress.completed == len(study.instances)
    # Only the 20 missing ones were moved: the receiver's store session for this job (its
    # manifest) committed exactly those.
    manifest = root(config) / ".pacsfetch" / "jobs" / f"{job_id}.jsonl"
    committed = {json.loads(line)["sop_instance_uid"] for line in manifest.read_text().splitlines()}
    assert committed == {i.sop_instance_uid for i in study.instances[10:]}
    assert len(state.instances) == len(study.instances)
    assert all(state.instances[i.sop_instance_uid] == '{"local":"earlier"}' for i in done)


def test_resumed_move_from_a_capped_pacs_asks_for_the_series_whole(
        config: Config, capped_study: SampleStudy) -> None:
    # The PACS lists 8 of 30; all 8 are stored already. Moving only the "missing" listed
    # ones would move nothing and lose the 22 it never listed.
    study = capped_study
    listed = find_instances(config.sources["capped"], JobRequest(
        source="capped", study_uid=study.study_uid, store="local"))
    assert len(listed.refs) == 8 and listed.capped_series == {study.series_uids[0]}
    state = LocalJobState()
    state.instances = {r.sop_instance_uid: '{"local":"earlier"}' for r in listed.refs}
    outcome = run_job(config, JobRequest(
        source="capped", study_uid=study.study_uid, store="local", transport="c-move"), state)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert set(state.instances) == {i.sop_instance_uid for i in study.instances}
    unlisted = set(state.instances) - {r.sop_instance_uid for r in listed.refs}
    assert len(unlisted) == 22 and unlisted <= stored(config, study.study_uid)


def test_dcmqrscp_moves_a_series(config: Config, studies: list[SampleStudy]) -> None:
    study = studies[0]
    series = study.series_uids[0]
    outcome = run_job(config, JobRequest(source="dcmqrscp", level=Level.SERIES,
                                         study_uid=study.study_uid, series_uid=series,
                                         store="local"))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert stored(config, study.study_uid) == {i.sop_instance_uid for i in study.instances}


def test_single_instances_by_c_move(config: Config, studies: list[SampleStudy]) -> None:
    study = studies[1]
    chosen = [i.sop_instance_uid for i in study.instances[:3]]
    outcome = run_job(config, JobRequest(source="orthanc", level=Level.IMAGE,
                                         study_uid=study.study_uid, sop_uids=chosen, store="local",
                                         transport="c-move"))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.progress.completed == 3
    assert set(chosen) <= stored(config, study.study_uid)


def test_unknown_move_destination_says_what_to_configure_on_the_pacs(
    config: Config, studies: list[SampleStudy]
) -> None:
    outcome = run_job(config, JobRequest(source="unknown-dest", study_uid=studies[2].study_uid,
                                         store="local", transport="c-move"))
    assert outcome.status is JobStatus.FAILED
    assert outcome.error_kind == "move-destination"
    # Orthanc 1.10 answers 0xC000 (not 0xA801) for an unknown destination: both causes named.
    assert "does not know move destination 'UNKNOWN': add it to the PACS" in (outcome.error or "")
    assert stored(config, studies[2].study_uid) == set()


def test_dcmqrscp_answers_an_unknown_destination_with_a801(
    config: Config, studies: list[SampleStudy]
) -> None:
    outcome = run_job(config, JobRequest(source="dcmqrscp-unknown", study_uid=studies[0].study_uid,
                                         store="local"))
    assert outcome.status is JobStatus.FAILED
    assert outcome.error_kind == "move-destination"
    assert "does not know move destination 'UNKNOWN' (status 0xA801)" in (outcome.error or "")


def test_receiver_unreachable_from_the_pacs_is_explained(
    config: Config, studies: list[SampleStudy]
) -> None:
    # NOWHERE is a destination Orthanc knows, at a port where no receiver listens.
    outcome = run_job(config, JobRequest(source="receiver-down", study_uid=studies[2].study_uid,
                                         store="local", transport="c-move"))
    assert outcome.status is JobStatus.FAILED
    assert outcome.error_kind == "move-destination"
    assert "is `pacsfetch receiver` running and reachable from the PACS" in (outcome.error or "")
    assert stored(config, studies[2].study_uid) == set()


def test_pacs_stuck_connecting_to_the_destination_is_a_move_destination_failure(
    config: Config, studies: list[SampleStudy]
) -> None:
    # Silent and nothing delivered: the connection back, not a slow PACS; retrying C-MOVE
    # would hang the same way, so it is not a retryable timeout.
    outcome = run_job(config, JobRequest(source="silent-dest", study_uid=studies[2].study_uid,
                                         store="local", transport="c-move"))
    assert outcome.status is JobStatus.FAILED
    assert outcome.error_kind == "move-destination"
    assert "stuck connecting to move destination 'SILENT'" in (outcome.error or "")
    assert "firewall or NAT" in (outcome.error or "")


def test_auto_falls_back_to_c_get_when_the_destination_is_unknown(
    config: Config, studies: list[SampleStudy]
) -> None:
    outcome = run_job(config, JobRequest(source="unknown-dest", study_uid=studies[2].study_uid,
                                         store="local"))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.transport == "c-get"


def _send(port: int, path: Path, calling_ae: str = "MOVESCP",
          originator: tuple[str, int] | None = None) -> int | None:
    """C-STORE one file to the receiver as a PACS without Move Originator attributes would;
    None when the receiver rejects the association."""
    ae = AE(ae_title=calling_ae)
    # One context per syntax, as a PACS proposes: the file goes as stored, never converted.
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=RECEIVER_AE)
    if assoc.is_rejected:
        return None
    assert assoc.is_established
    try:
        if originator is None:
            return int(assoc.send_c_store(path).Status)
        return int(assoc.send_c_store(path, originator_aet=originator[0],
                                      originator_id=originator[1]).Status)
    finally:
        assoc.release()


def test_receiver_refuses_instances_of_no_running_job(
    config: Config, receiver: ReceiverProcess, stray: SampleStudy
) -> None:
    instance = stray.instances[0]
    assert _send(receiver.port, instance.path) == 0x0124
    assert instance.sop_instance_uid not in stored(config, instance.study_uid)


def test_receiver_matches_by_uids_when_the_pacs_sends_no_originator(
    config: Config, receiver: ReceiverProcess, stray: SampleStudy
) -> None:
    instance = stray.instances[1]
    book = MoveBook.from_url(config.broker.url)
    job_id = uuid.uuid4().hex
    request = JobRequest(source="orthanc", level=Level.IMAGE, study_uid=instance.study_uid,
                         sop_uids=[instance.sop_instance_uid], store="local")
    book.expect(job_id, request, CALLING_AE, ttl=30)
    try:
        assert _send(receiver.port, instance.path) == 0x0000
        rows, nbytes = wait_for(lambda: (r := book.received_since(job_id, 0))[0] and r, 10,
                                what="the receiver to record the instance")
        assert [sop for sop, _ in rows] == [instance.sop_instance_uid]
        assert nbytes > 0
        # Another instance of the same study is outside the job's scope: refused.
        assert _send(receiver.port, stray.instances[2].path) == 0x0124
    finally:
        book.withdraw(job_id)
    assert stored(config, instance.study_uid) == {instance.sop_instance_uid}
    # Withdrawn (the job stopped waiting): refused at once, though the receiver caches.
    assert _send(receiver.port, instance.path) == 0x0124


def test_receiver_tells_two_jobs_of_one_study_apart_by_move_originator(
    config: Config, receiver: ReceiverProcess, stray: SampleStudy
) -> None:
    book = MoveBook.from_url(config.broker.url)
    request = JobRequest(source="orthanc", study_uid=stray.study_uid, store="local")
    jobs = {uuid.uuid4().hex: book.next_message_id() for _ in range(2)}
    for job_id, message_id in jobs.items():
        book.expect(job_id, request, CALLING_AE, ttl=30)
        book.add_message_id(job_id, message_id, ttl=30)
    second, second_message = list(jobs.items())[1]
    try:
        assert _send(receiver.port, stray.instances[2].path,
                     originator=(CALLING_AE, second_message)) == 0x0000
        rows = wait_for(lambda: book.received_since(second, 0)[0], 10,
                        what="the receiver to record the instance for the second job")
        assert [sop for sop, _ in rows] == [stray.instances[2].sop_instance_uid]
        first = next(iter(jobs))
        assert book.received_since(first, 0)[0] == []
        # Another originator AE title: no job of ours asked, whatever the UIDs.
        assert _send(receiver.port, stray.instances[0].path,
                     originator=("SOMEONE", second_message)) == 0x0124
    finally:
        for job_id in jobs:
            book.withdraw(job_id)


def test_concurrent_jobs_of_several_workers_share_one_receiver(
    settings: dict[str, Any], receiver: ReceiverProcess, studies: list[SampleStudy],
    mixed_study: SampleStudy, start_worker: Callable[..., WorkerProcess],
) -> None:
    for _ in range(2):
        start_worker(settings, concurrency=2)
    client = TestClient(create_app(parse_config(settings)))
    wanted = [mixed_study, studies[1], studies[2]]
    ids = []
    for study in wanted:
        response = client.post("/jobs", json={"source": "orthanc", "study_uid": study.study_uid,
                                              "store": "local", "transport": "c-move"})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])

    def finished() -> list[dict[str, Any]] | None:
        jobs = [client.get(f"/jobs/{i}").json() for i in ids]
        return jobs if all(j["status"] not in ("queued", "running") for j in jobs) else None

    jobs = wait_for(finished, 120, 0.2, "the C-MOVE jobs to finish")
    store = JobStore.from_url(settings["broker"]["url"])
    for job, study in zip(jobs, wanted, strict=True):
        assert job["status"] == "succeeded", job["error"]
        assert job["transport"] == "c-move"
        assert job["progress"]["completed"] == len(study.instances)
        assert store.count_instances(job["id"]) == len(study.instances)


def test_receiver_accepts_associations_only_from_listed_calling_ae_titles(
    settings: dict[str, Any], stray: SampleStudy
) -> None:
    # In-process this time (same code as the subprocess), to vary its configuration.
    port = free_port()
    config = parse_config({**settings, "receiver": {"port": port, "bind": "127.0.0.1",
                                                    "accept_from": ["TRUSTED"]}})
    registry = get_registry()
    receiver = MoveReceiver(config, registry, registry.check_config(config),
                            MoveBook.from_url(config.broker.url))
    receiver.start()
    try:
        assert _send(port, stray.instances[0].path, calling_ae="MOVESCP") is None
        assert _send(port, stray.instances[0].path, calling_ae="TRUSTED") == 0x0124
    finally:
        receiver.stop()
    assert receiver.stats.no_job == 1
