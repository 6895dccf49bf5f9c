"""The move receiver trusts no one: real Orthanc moves to a real ``pacsfetch receiver``
subprocess while forgers and idle peers (pynetdicom SCUs on other loopback addresses) try
to get in.

Loopback addresses stand for hosts: Orthanc, the source, delivers from 127.0.0.1; the
source ``other`` names 127.0.0.2 (``move_from``), so a peer there passes admission but is
not Orthanc; 127.0.0.3 is named by no source.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import CALLING_AE, ReceiverProcess, make_config, run_job, wait_for, write_toml
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification

from pacsfetch.config import Config, parse_config
from pacsfetch.models import JobRequest, JobStatus, Level
from pacsfetch.moves import MoveBook, Plan
from pacsfetch.sandbox.peers import Orthanc, RedisServer, free_port
from pacsfetch.sandbox.samples import SampleStudy, generate_uniform_study
from pacsfetch.workers.receiver_policy import ReceiverPolicy, Refusal
from pacsfetch.workers.state import LocalJobState

RECEIVER_AE = "PACSFETCH"
OTHER_HOST = "127.0.0.2"
NOBODY = "127.0.0.3"
PER_ADDRESS = 8
IDLE_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def receiver_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    return generate_uniform_study(tmp_path_factory.mktemp("trust-big"), n_instances=1000,
                                  rows=8, columns=8, patient_id="PF-TRUST-BIG", seed=140)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    return generate_uniform_study(tmp_path_factory.mktemp("trust-small"), n_instances=20,
                                  rows=8, columns=8, patient_id="PF-TRUST-SMALL", seed=141)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, receiver_port: int, big: SampleStudy,
         small: SampleStudy) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("trust-orthanc"), aet="TRUSTPACS", dicomweb=False,
                 modalities={"PACSFETCH": (RECEIVER_AE, "127.0.0.1", receiver_port)}) as server:
        server.upload_study(big)
        server.upload_study(small)
        yield server


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
             receiver_port: int, pacs: Orthanc) -> dict[str, Any]:
    source = {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port,
              "calling_ae_title": CALLING_AE, "transports": ["c-move"],
              "move_destination": RECEIVER_AE, "timeout": 20}
    data = make_config(redis_url=redis_server.url,
                       store_root=tmp_path_factory.mktemp("trust-store"),
                       extra_sources={"orthanc": source,
                                      "other": {**source, "ae_title": "OTHERPACS",
                                                "host": "pacs-two.invalid",
                                                "move_from": [f"{OTHER_HOST}/32"]}})
    data["stores"]["second"] = {"plugin": "filesystem",
                                "root": str(tmp_path_factory.mktemp("trust-second"))}
    data["receiver"] = {"ae_title": RECEIVER_AE, "port": receiver_port, "bind": "0.0.0.0",
                        "idle_timeout": IDLE_TIMEOUT, "max_associations": 32,
                        "max_associations_per_address": PER_ADDRESS}
    return data


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory,
             settings: dict[str, Any]) -> Iterator[ReceiverProcess]:
    workdir = tmp_path_factory.mktemp("trust-receiver")
    process = ReceiverProcess(write_toml(settings, workdir / "receiver.toml"),
                              workdir / "receiver.log", settings["receiver"]["port"])
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture
def config(settings: dict[str, Any], receiver: ReceiverProcess) -> Config:
    return parse_config(settings)


def refusals(settings: dict[str, Any]) -> dict[str, float]:
    """``pacsfetch_receiver_refusals_total`` by reason, scraped from the receiver."""
    metrics = settings["metrics"]
    text = httpx.get(f"http://127.0.0.1:{metrics['receiver_port']}/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^pacsfetch_receiver_refusals_total\{reason="([^"]+)"\} (\S+)$', text, re.M)}


def stored_file(config: Config, store: str, study_uid: str, sop_uid: str) -> Path:
    root = Path(config.stores[store].settings["root"])
    return next((root / study_uid).rglob(f"{sop_uid}.dcm"))


def connect(port: int, calling_ae: str, address: str) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=RECEIVER_AE, bind_address=(address, 0))


def send(port: int, paths: list[Path], calling_ae: str, address: str = "127.0.0.1") -> list[int]:
    """C-STORE each file from *address* as *calling_ae*; [] when not even associated."""
    assoc = connect(port, calling_ae, address)
    if not assoc.is_established:
        return []
    try:
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        assoc.release()


def forge(source: Path, out: Path, new_uid: bool) -> Path:
    """A copy of *source* with other pixels: a new instance, or a fake of the same one."""
    ds = dcmread(source)
    if new_uid:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PixelData = bytes(len(ds.PixelData))
    ds.save_as(out, enforce_file_format=True)
    return out


def test_policy_decisions() -> None:
    config = parse_config({
        "sources": {"pacs": {"ae_title": "PACS", "host": "pacs.example", "port": 104},
                    "lab": {"ae_title": "LAB", "host": "h", "port": 104,
                            "move_from": ["10.9.0.0/16"]}},
        "receiver": {"max_associations": 4, "max_associations_per_address": 2,
                     "idle_timeout": 10}})
    policy = ReceiverPolicy(config, resolve=lambda host: {"pacs.example": ["10.1.1.1"]}[host])
    assert policy.admit("10.1.1.1", 0, 0) is None
    assert policy.admit("::ffff:10.9.3.4", 0, 0) is None
    assert policy.admit("10.1.1.2", 0, 0) is Refusal.UNKNOWN_ADDRESS
    assert policy.admit("10.1.1.1", 2, 2) is Refusal.BUSY
    assert policy.admit("10.1.1.1", 1, 4) is Refusal.BUSY
    assert policy.sender_refusal("pacs", "10.1.1.1", "PACS") is None
    assert policy.sender_refusal("pacs", "10.1.1.1", "LAB") is Refusal.WRONG_PEER
    assert policy.sender_refusal("pacs", "10.9.3.4", "PACS") is Refusal.WRONG_PEER
    assert policy.idle(last_data=0.0, now=10.5) and not policy.idle(0.0, 9.5)


def test_forgers_during_a_real_move_are_refused_and_the_genuine_copies_kept(
        config: Config, settings: dict[str, Any], receiver: ReceiverProcess, big: SampleStudy,
        tmp_path: Path) -> None:
    job_id = uuid.uuid4().hex
    book = MoveBook.from_url(config.broker.url)
    request = JobRequest(source="orthanc", study_uid=big.study_uid, store="local")
    victims = big.instances[-5:]
    new = [forge(i.path, tmp_path / f"new{n}.dcm", True) for n, i in enumerate(victims)]
    fakes = [forge(i.path, tmp_path / f"fake{n}.dcm", False) for n, i in enumerate(victims)]
    before = refusals(settings)
    outcome: list[Any] = []
    job = threading.Thread(target=lambda: outcome.append(
        run_job(config, request, LocalJobState(), job_id)))
    job.start()
    try:
        wait_for(lambda: any(e.job_id == job_id for e in book.active()), 60, 0.01,
                 "the job to register its move expectation")
        # Another host calling itself by the PACS's AE title; the PACS's host under another
        # AE title: neither is the job's source.
        assert send(receiver.port, new + fakes, pacs_ae(config), OTHER_HOST) == [0x0124] * 10
        assert send(receiver.port, new + fakes, "FORGER") == [0x0124] * 10
        # A host no source names is not even associated.
        assert send(receiver.port, new, pacs_ae(config), NOBODY) == []
    finally:
        job.join()
    result = outcome[0]
    assert result.status is JobStatus.SUCCEEDED, result.error
    assert result.progress.completed == 1000
    for victim in victims:
        kept = dcmread(stored_file(config, "local", big.study_uid, victim.sop_instance_uid))
        assert kept.PixelData == dcmread(victim.path).PixelData
    root = Path(config.stores["local"].settings["root"]) / big.study_uid
    assert len(list(root.rglob("*.dcm"))) == 1000
    after = refusals(settings)
    assert after.get("wrong-peer", 0) - before.get("wrong-peer", 0) == 20
    assert after.get("unknown-address", 0) - before.get("unknown-address", 0) >= 1
    log = receiver.log_path.read_text()
    assert "PF-TRUST-BIG" not in log  # refusals are logged without patient data


def pacs_ae(config: Config) -> str:
    return config.sources["orthanc"].ae_title


def test_only_planned_instances_and_one_content_per_instance_are_accepted(
        config: Config, settings: dict[str, Any], receiver: ReceiverProcess, small: SampleStudy,
        tmp_path: Path) -> None:
    book = MoveBook.from_url(config.broker.url)
    job_id = uuid.uuid4().hex
    planned, unplanned = small.instances[0], small.instances[1]
    book.expect(job_id, JobRequest(source="orthanc", study_uid=small.study_uid, store="local"),
                CALLING_AE, ttl=30, plan=Plan(frozenset({planned.sop_instance_uid})))
    fake = forge(planned.path, tmp_path / "fake.dcm", False)
    before = refusals(settings)
    try:
        # The PACS's own address and AE title, without Move Originator attributes.
        first, second, again, third = send(
            receiver.port, [planned.path, unplanned.path, planned.path, fake], pacs_ae(config))
        assert (first, second, again) == (0x0000, 0x0124, 0x0000)
        assert third not in (0x0000, 0xB000, 0xB007, 0xB006)
        assert book.refusals(job_id) == {"not-planned": 1, "conflicting-copy": 1}
    finally:
        book.withdraw(job_id)
    kept = dcmread(stored_file(config, "local", small.study_uid, planned.sop_instance_uid))
    assert kept.PixelData == dcmread(planned.path).PixelData
    after = refusals(settings)
    for reason in ("not-planned", "conflicting-copy"):
        assert after.get(reason, 0) - before.get(reason, 0) == 1


def test_a_move_job_writes_every_store_it_names(config: Config, small: SampleStudy) -> None:
    outcome = run_job(config, JobRequest(source="orthanc", study_uid=small.study_uid,
                                         stores=["local", "second"], transport="c-move"))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.progress.completed == len(small.instances)
    for store in ("local", "second"):
        for instance in small.instances:
            assert stored_file(config, store, small.study_uid, instance.sop_instance_uid)


def test_idle_and_abusive_peers_leave_room_for_the_pacs(
        config: Config, settings: dict[str, Any], receiver: ReceiverProcess,
        small: SampleStudy) -> None:
    before = refusals(settings)
    # 64 associations from an address no source names: refused at once.
    nobody = [connect(receiver.port, "IDLER", NOBODY) for _ in range(64)]
    assert not any(a.is_established for a in nobody)
    # 64 from an address a source names: only its share gets in; C-ECHO keeps them busy.
    held = [connect(receiver.port, "IDLER", OTHER_HOST) for _ in range(64)]
    established = [a for a in held if a.is_established]
    assert len(established) == PER_ADDRESS
    stop = threading.Event()

    def keep_alive() -> None:
        while not stop.wait(0.5):
            for assoc in established:
                if assoc.is_established:
                    assoc.send_c_echo()

    pinger = threading.Thread(target=keep_alive)
    pinger.start()
    try:
        outcome = run_job(config, JobRequest(source="orthanc", level=Level.SERIES,
                                             study_uid=small.study_uid,
                                             series_uid=small.series_uids[0], store="local",
                                             transport="c-move"))
        assert outcome.status is JobStatus.SUCCEEDED, outcome.error
        # Echoes are not data: the idle associations are aborted all the same.
        wait_for(lambda: not any(a.is_established for a in established), 30, 0.2,
                 "the receiver to abort the idle associations")
    finally:
        stop.set()
        pinger.join()
        for assoc in held:
            if assoc.is_established:
                assoc.release()
    after = refusals(settings)
    assert after.get("unknown-address", 0) - before.get("unknown-address", 0) == 64
    assert after.get("busy", 0) - before.get("busy", 0) == 64 - PER_ADDRESS
    assert after.get("idle", 0) - before.get("idle", 0) == PER_ADDRESS
