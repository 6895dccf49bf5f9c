"""The move receiver as a storage SCP on the DIMSE engine, against real peers.

In-process (the same code ``pacsfetch receiver`` runs) so the test can watch its spool and
count its open connections: DCMTK ``storescu`` sending in 4 KB PDUs, pynetdicom for C-ECHO
and release, a peer that connects and says nothing (ARTIM), and one that aborts in the
middle of a data set. Each ends cleanly and the receiver goes on serving.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import CALLING_AE, make_config, run_job, wait_for
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pacsfetch.config import Config, parse_config
from pacsfetch.models import JobRequest, JobStatus
from pacsfetch.moves import MoveBook
from pacsfetch.plugins.dimse import messages, pdu
from pacsfetch.plugins.dimse.association import Association
from pacsfetch.plugins.registry import get_registry
from pacsfetch.sandbox.peers import RedisServer, free_port
from pacsfetch.sandbox.samples import SampleStudy, generate_uniform_study
from pacsfetch.workers import receiver as receiver_module
from pacsfetch.workers.receiver import MoveReceiver
from pacsfetch.workers.receiver_policy import content_digest
from pacsfetch.workers.state import LocalJobState

PACS_AE = "ENGINEPACS"
RECEIVER_AE = "PACSFETCH"
ARTIM = 0.5


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    return generate_uniform_study(tmp_path_factory.mktemp("engine-study"), n_instances=12,
                                  rows=64, columns=64, patient_id="PF-ENGINE", seed=220)


@pytest.fixture
def config(tmp_path: Path, redis_server: RedisServer) -> Config:
    # The "PACS" is whoever sends from 127.0.0.1 as PACS_AE: storescu and the peers here.
    source = {"ae_title": PACS_AE, "host": "127.0.0.1", "port": free_port(),
              "calling_ae_title": CALLING_AE, "transports": ["c-move"],
              "move_destination": RECEIVER_AE}
    data = make_config(redis_url=redis_server.url, store_root=tmp_path / "store",
                       extra_sources={"pacs": source})
    data["receiver"] = {"ae_title": RECEIVER_AE, "port": free_port(), "bind": "127.0.0.1",
                        "idle_timeout": 20}
    return parse_config(data)


@pytest.fixture
def receiver(config: Config, monkeypatch: pytest.MonkeyPatch) -> Iterator[MoveReceiver]:
    monkeypatch.setattr(receiver_module, "ARTIM_SECONDS", ARTIM)
    registry = get_registry()
    server = MoveReceiver(config, registry, registry.check_config(config),
                          MoveBook.from_url(config.broker.url))
    server.start()
    yield server
    server.stop()


def spooled(server: MoveReceiver) -> list[Path]:
    return list(Path(server._spool.name).iterdir())


def expect(config: Config, study: SampleStudy) -> tuple[MoveBook, str]:
    book = MoveBook.from_url(config.broker.url)
    job_id = uuid.uuid4().hex
    book.expect(job_id, JobRequest(source="pacs", study_uid=study.study_uid, store="local"),
                CALLING_AE, ttl=60)
    return book, job_id


def echo(port: int) -> int:
    ae = AE(ae_title=PACS_AE)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=RECEIVER_AE)
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def test_storescu_in_4_kb_pdus_is_stored_byte_for_byte(
        config: Config, receiver: MoveReceiver, study: SampleStudy) -> None:
    book, job_id = expect(config, study)
    try:
        done = subprocess.run(
            ["/usr/bin/storescu", "-aet", PACS_AE, "-aec", RECEIVER_AE, "--max-send-pdu",
             "4096", "-xs", "127.0.0.1", str(config.receiver.port),
             *(str(i.path) for i in study.instances)],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        wait_for(lambda: receiver._busy() == 0, 10, 0.05, "the association to end")
    finally:
        book.withdraw(job_id)
    root = Path(config.stores["local"].settings["root"]) / study.study_uid
    for instance in study.instances:
        kept = next(root.rglob(f"{instance.sop_instance_uid}.dcm"))
        assert content_digest(kept) == content_digest(instance.path)
    assert receiver.stats.verdicts.get("stored") == len(study.instances)
    assert not spooled(receiver)


def _send(config: Config, receiver: MoveReceiver, study: SampleStudy, nodelay: str) -> float:
    """Seconds storescu takes to send *study* to the receiver, Nagle per *nodelay*."""
    book, job_id = expect(config, study)
    stored_before = receiver.stats.verdicts.get("stored", 0)
    try:
        started = time.monotonic()
        done = subprocess.run(
            ["/usr/bin/storescu", "-aet", PACS_AE, "-aec", RECEIVER_AE, "127.0.0.1",
             str(config.receiver.port), *(str(i.path) for i in study.instances)],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "TCP_NODELAY": nodelay})
        elapsed = time.monotonic() - started
        assert done.returncode == 0, done.stderr
    finally:
        book.withdraw(job_id)
    assert receiver.stats.verdicts.get("stored", 0) - stored_before == len(study.instances)
    return elapsed


def test_a_nagle_on_sender_is_not_held_by_delayed_acks(
        config: Config, receiver: MoveReceiver, tmp_path: Path) -> None:
    """DCMTK writes a PDU's headers and its body in two writes; with Nagle's algorithm on (its
    default) the body waits for our ACK of the headers, which Linux delays up to 40 ms
    unless the receiver acknowledges at once: 100 instances then took over 4 s (21/s
    measured) against a fraction of a second with Nagle off. Compared with the same sender
    with Nagle off in the same run, so the check holds on a slow or busy machine."""
    studies = [generate_uniform_study(tmp_path / name, n_instances=100, rows=8, columns=8,
                                      patient_id="PF-NAGLE", seed=seed)
               for name, seed in (("off", 220), ("on", 221))]
    nagle_off = _send(config, receiver, studies[0], "1")
    nagle_on = _send(config, receiver, studies[1], "0")
    assert nagle_on < 3 * nagle_off + 1.0, \
        f"Nagle on {nagle_on:.2f} s against Nagle off {nagle_off:.2f} s for 100 instances"


def test_echo_and_release(receiver: MoveReceiver, config: Config) -> None:
    assert echo(config.receiver.port) == 0x0000
    wait_for(lambda: receiver._busy() == 0, 10, 0.05, "the released association to end")


def test_a_silent_peer_is_dropped_after_artim(receiver: MoveReceiver, config: Config) -> None:
    with socket.create_connection(("127.0.0.1", config.receiver.port), timeout=10) as silent:
        started = time.monotonic()
        assert silent.recv(64) in (b"", pdu.abort_pdu(pdu.ABORT_SOURCE_PROVIDER, 0),
                                   pdu.abort_pdu())
        assert ARTIM * 0.8 < time.monotonic() - started < ARTIM + 5
    wait_for(lambda: receiver._busy() == 0, 10, 0.05, "the silent connection to be dropped")
    assert echo(config.receiver.port) == 0x0000


def test_abort_in_the_middle_of_a_data_set_leaves_nothing(
        config: Config, receiver: MoveReceiver, study: SampleStudy) -> None:
    book, job_id = expect(config, study)
    instance = study.instances[0]
    rq = pdu.AssociateRequest(
        called_ae=RECEIVER_AE, calling_ae=PACS_AE,
        contexts=[pdu.ProposedContext(1, CTImageStorage, [ExplicitVRLittleEndian])],
        max_pdu=16384)
    try:
        assoc = Association.request("127.0.0.1", config.receiver.port, rq, timeout=10)
        cx = assoc.context(CTImageStorage)
        assert cx is not None and cx.transfer_syntax == ExplicitVRLittleEndian
        assoc.send_message(cx.id, messages.c_store_rq(1, CTImageStorage,
                                                      instance.sop_instance_uid))
        data = instance.path.read_bytes()
        assoc.send(pdu.pdata(cx.id, 0, data[400:8000]), pdu.P_DATA_TF)  # not the last one
        wait_for(lambda: spooled(receiver), 10, 0.01, "the data set to reach the spool")
        assoc.abort()
        wait_for(lambda: receiver._busy() == 0, 10, 0.05, "the aborted association to end")
    finally:
        book.withdraw(job_id)
    assert not spooled(receiver)
    assert not (Path(config.stores["local"].settings["root"]) / study.study_uid).exists()
    assert echo(config.receiver.port) == 0x0000


def test_garbage_after_the_association_is_refused_and_the_receiver_serves_on(
        config: Config, receiver: MoveReceiver) -> None:
    rq = pdu.AssociateRequest(called_ae=RECEIVER_AE, calling_ae=PACS_AE,
                              contexts=[pdu.ProposedContext(1, Verification,
                                                            [ExplicitVRLittleEndian])])
    assoc = Association.request("127.0.0.1", config.receiver.port, rq, timeout=10)
    # A P-DATA-TF claiming 4 GB: the receiver aborts (A-P-ABORT) and closes.
    assoc.sock.sendall(bytes([pdu.P_DATA_TF, 0]) + (0xFFFFFFFF).to_bytes(4, "big"))
    answer: Any = assoc.sock.recv(64)
    assert answer[:1] in (bytes([pdu.ABORT]), b"")
    assoc.close()
    wait_for(lambda: receiver._busy() == 0, 10, 0.05, "the hostile association to end")
    assert echo(config.receiver.port) == 0x0000


class _SlowMoveScp:
    """A pynetdicom Q/R SCP for one study: C-FIND at SERIES and IMAGE level, and a C-MOVE
    that sends one instance every 20 ms and honours C-CANCEL (answers 0xFE00)."""

    def __init__(self, study: SampleStudy, destination: tuple[str, int], port: int) -> None:
        self.study = study
        self.destination = destination
        self.cancel_seen = False
        self.datasets = [dcmread(i.path) for i in study.instances]
        ae = AE(ae_title=PACS_AE)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
            (evt.EVT_C_FIND, self._find), (evt.EVT_C_MOVE, self._move)])

    def _find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        seen: set[str] = set()
        for ds in self.datasets:
            key = ds.SeriesInstanceUID if query.QueryRetrieveLevel == "SERIES" else \
                ds.SOPInstanceUID
            if key in seen or query.get("SeriesInstanceUID") not in ("", None,
                                                                     ds.SeriesInstanceUID):
                continue
            seen.add(key)
            match = Dataset()
            for element in query:
                match.add_new(element.tag, element.VR, ds.get(element.keyword, ""))
            match.QueryRetrieveLevel = query.QueryRetrieveLevel
            yield 0xFF00, match
        yield 0x0000, None

    def _move(self, event: evt.Event) -> Iterator[Any]:
        yield self.destination
        yield len(self.datasets)
        for ds in self.datasets:
            if event.is_cancelled:
                self.cancel_seen = True
                yield 0xFE00, None
                return
            time.sleep(0.02)
            yield 0xFF00, ds

    def close(self) -> None:
        self.server.shutdown()


def test_cancel_sends_c_cancel_and_ends_the_move_job_cancelled(
        config: Config, receiver: MoveReceiver, tmp_path: Path) -> None:
    slow = generate_uniform_study(tmp_path / "slow", n_instances=200, rows=8, columns=8,
                                  patient_id="PF-CANCEL", seed=222)
    scp = _SlowMoveScp(slow, ("127.0.0.1", config.receiver.port), config.sources["pacs"].port)
    # pynetdicom names itself, not the C-MOVE's requestor, as Move Originator AE Title: the
    # job calls with the PACS's AE title so the receiver still matches it by originator.
    source = config.sources["pacs"].model_copy(update={"calling_ae_title": PACS_AE})
    mover = config.model_copy(update={"sources": {"pacs": source}})
    state = LocalJobState()
    outcome: list[Any] = []
    job = threading.Thread(target=lambda: outcome.append(run_job(
        mover, JobRequest(source="pacs", study_uid=slow.study_uid, store="local",
                           transport="c-move"), state)))
    job.start()
    try:
        wait_for(lambda: state.progress.completed >= 10, 30, 0.01, "the move to start")
        state.cancel = True
        job.join(30)
    finally:
        scp.close()
    assert outcome and outcome[0].status is JobStatus.CANCELLED, outcome
    assert scp.cancel_seen  # the PACS received our C-CANCEL
    stored = list((Path(config.stores["local"].settings["root"]) / slow.study_uid).rglob("*"))
    assert 10 <= len([p for p in stored if p.is_file()]) < len(slow.instances)
