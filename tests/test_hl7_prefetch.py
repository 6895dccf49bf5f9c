"""``pacsfetch hl7``: orders over a real MLLP connection (the ``hl7`` library's client) to the
listener running as a process, acknowledged with AA/AE/AR and the reason in MSA-3."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import hl7
import pytest
import redis
from helpers import CliProcess, make_config, write_toml
from hl7.mllp import open_hl7_connection

from pacsfetch.prefetch import PrefetchStatus, PrefetchStore
from pacsfetch.sandbox.peers import free_port


class Hl7Process(CliProcess):
    name = "hl7"
    ready_marker = b"hl7 listening"

    def __init__(self, config_path: Path, log_path: Path) -> None:
        super().__init__(["hl7"], config_path, log_path)


@pytest.fixture
def listener(redis_url: str, tmp_path: Path) -> Iterator[int]:
    data = make_config(redis_url=redis_url, store_root=tmp_path / "store", extra_sources={
        "archive": {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 104}})
    data["prefetch"] = {"rules": {"mr": {"when_modalities": ["MR"], "sources": ["archive"],
                                         "stores": ["local"], "lead_minutes": 30}}}
    port = free_port()
    # The mapping is the default plus where this (SIU-sending) RIS puts the modality and the
    # appointment's accession number: configurable, as sites differ.
    data["hl7"] = {"bind": "127.0.0.1", "port": port, "accept_from": ["HOSP"],
                   "fields": {"modality": ["OBR-24", "AIG-4"],
                              "accession_number": ["OBR-18", "ORC-2", "SCH-1"]}}
    data["metrics"]["hl7_port"] = free_port()
    process = Hl7Process(write_toml(data, tmp_path / "hl7.toml"), tmp_path / "hl7.log")
    process.wait_ready()
    yield port
    process.stop()


def orm(control: str = "NW", *, patient: str = "PF-PRI-1", accession: str = "ACC100",
        modality: str = "MR", when: str = "20301201101500", facility: str = "HOSP",
        message_type: str = "ORM^O01", msg_id: str = "MSG0001") -> str:
    obr = [""] * 37
    obr[1], obr[4], obr[18], obr[24], obr[36] = "1", "^MR BRAIN", accession, modality, when
    return "\r".join([
        f"MSH|^~\\&|RIS|{facility}|PACSFETCH|HOSP|20261128120000||{message_type}|{msg_id}|P|2.3",
        f"PID|1||{patient}^^^HOSP^MR||SANDBOX^PATIENT",
        f"ORC|{control}|PLC{accession}",
        "OBR|" + "|".join(obr[1:]),
    ])


def siu(event: str = "S12", *, patient: str = "PF-SIU-1", appointment: str = "APT7",
        modality: str = "MR", when: str = "20301202083000", msg_id: str = "SIU0001") -> str:
    """An appointment as a scheduling system sends it: no OBR; the time in SCH-11.4, the
    procedure in AIS-3, the modality as the resource type in AIG-4."""
    return "\r".join([
        f"MSH|^~\\&|RIS|HOSP|PACSFETCH|HOSP|20261128120000||SIU^{event}|{msg_id}|P|2.5",
        f"SCH|{appointment}||||||||||^^^{when}",
        f"PID|1||{patient}^^^HOSP^MR||SANDBOX^PATIENT",
        "RGS|1",
        f"AIS|1||MRKNEE^{modality} KNEE",
        f"AIG|1||ROOM1^Room 1|{modality}",
    ])


def send(port: int, *messages: str | bytes) -> list[hl7.Message]:
    """Send each message over one MLLP connection; the acknowledgements, in order."""
    async def exchange() -> list[hl7.Message]:
        reader, writer = await open_hl7_connection("127.0.0.1", port)
        acks = []
        try:
            for message in messages:
                writer.writeblock(message if isinstance(message, bytes) else message.encode())
                await writer.drain()
                acks.append(hl7.parse((await reader.readblock()).decode()))
        finally:
            writer.close()
        return acks
    return asyncio.run(asyncio.wait_for(exchange(), 30))


def msa(ack: hl7.Message) -> tuple[str, str, str]:
    segment = ack.segment("MSA")
    return str(segment(1)), str(segment(2)), ack.unescape(str(segment(3)))


def test_an_order_starts_a_prefetch_a_repeat_joins_it_and_a_cancel_cancels_it(
        listener: int, redis_url: str) -> None:
    store = PrefetchStore.from_url(redis_url)
    (new,) = send(listener, orm())

    code, control_id, text = msa(new)
    assert (code, control_id) == ("AA", "MSG0001") and text.endswith("scheduled"), text
    prefetch_id = text.split()[1]
    record = store.get(prefetch_id)
    assert record.status is PrefetchStatus.SCHEDULED
    assert (record.trigger, record.created_by) == ("hl7", "hl7-listener")
    assert record.request.patient_id == "PF-PRI-1"
    assert record.request.current.accession_number == "ACC100"
    assert record.request.current.modality == "MR"
    assert record.request.current.study_description == "MR BRAIN"
    assert record.request.current.scheduled_at.isoformat() == "2030-12-01T10:15:00+00:00"
    assert record.start_at.isoformat() == "2030-12-01T09:45:00+00:00"

    repeat, cancel = send(listener, orm(msg_id="MSG0002"), orm("CA", msg_id="MSG0003"))
    assert msa(repeat) == ("AA", "MSG0002", f"same order as prefetch {prefetch_id}")
    assert msa(cancel) == ("AA", "MSG0003", f"prefetch {prefetch_id} cancelled")
    cancelled = store.get(prefetch_id)
    assert cancelled.status is PrefetchStatus.CANCELLED
    assert cancelled.error == "cancelled by ORM^O01"
    assert store.waiting() == 0

    # The order stays cancelled against a change or status message for it (and the RIS
    # sending the order once more under XO); only a new order (NW) schedules it again.
    change, status_change = send(listener, orm("XO", msg_id="MSG0004"),
                                 orm("SC", msg_id="MSG0005"))
    for ack, msg_id in ((change, "MSG0004"), (status_change, "MSG0005")):
        assert msa(ack) == ("AA", msg_id, f"order cancelled before (prefetch {prefetch_id}); "
                                          "not scheduled again")
    assert store.get(prefetch_id).status is PrefetchStatus.CANCELLED and store.waiting() == 0
    (renewed,) = send(listener, orm(msg_id="MSG0006"))
    code, _, text = msa(renewed)
    assert code == "AA" and text.endswith("scheduled") and prefetch_id not in text, text
    assert store.waiting() == 1


def test_an_appointment_siu_s12_starts_a_prefetch_and_s15_cancels_it(
        listener: int, redis_url: str) -> None:
    store = PrefetchStore.from_url(redis_url)
    (new,) = send(listener, siu())
    code, control_id, text = msa(new)
    assert (code, control_id) == ("AA", "SIU0001") and text.endswith("scheduled"), text
    record = store.get(text.split()[1])
    assert record.request.patient_id == "PF-SIU-1"
    assert record.request.current.modality == "MR"
    assert record.request.current.study_description == "MR KNEE"
    assert record.request.current.accession_number == "APT7"
    assert record.request.current.scheduled_at.isoformat() == "2030-12-02T08:30:00+00:00"
    assert record.rule is not None and record.rule.name == "mr"

    (cancel,) = send(listener, siu("S15", msg_id="SIU0002"))
    assert msa(cancel) == ("AA", "SIU0002", f"prefetch {record.id} cancelled")
    assert store.get(record.id).status is PrefetchStatus.CANCELLED


@pytest.mark.parametrize(("message", "code", "reason"), [
    (b"this is not HL7", "AR", "not an HL7 v2 message"),
    (orm(message_type="ADT^A01"), "AR", "message type ADT^A01 is not taken here"),
    (orm(facility="ELSEWHERE"), "AR", "sending facility (MSH-4) 'ELSEWHERE' is not in "
                                      "hl7.accept_from"),
    (orm("XX"), "AR", "ORC-1 order control 'XX' is not one pacsfetch acts on"),
    (orm(patient=""), "AE", "no patient ID in PID-3.1"),
    (orm(patient="PF*"), "AE", "the order's values are not usable: patient_id: Value error, "
                               "contains a C-FIND wildcard"),
    (siu(modality=""), "AE", "no modality in OBR-24 or AIG-4"),
    (orm(modality=""), "AE", "no modality in OBR-24"),
    (orm(when="tomorrow"), "AE", "OBR-36 'tomorrow' is not an HL7 date/time"),
    (orm(modality="US"), "AE", "no [prefetch.rules] entry applies to a US exam"),
])
def test_a_message_pacsfetch_cannot_act_on_gets_ae_or_ar_saying_why_and_nothing_else(
        listener: int, redis_url: str, message: str | bytes, code: str, reason: str) -> None:
    (ack,) = send(listener, message)
    got_code, _, text = msa(ack)
    assert got_code == code and text.startswith(reason), text
    # Nothing was recorded or scheduled.
    assert list(redis.Redis.from_url(redis_url).scan_iter("pacsfetch:prefetch*")) == []
