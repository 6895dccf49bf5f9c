"""The worklist trigger against Orthanc's ModalityWorklists plugin as the worklist SCP: each
scheduled procedure makes exactly one prefetch, however often it is polled, an HL7
order that came first for the same accession number is joined, not repeated, and a
cancelled order stays cancelled however often the worklist still lists it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import make_config

from pacsfetch.config import Config, parse_config
from pacsfetch.prefetch import CurrentExam, PrefetchRequest, PrefetchStatus, PrefetchStore
from pacsfetch.prefetch_intake import cancel_prefetch, request_prefetch
from pacsfetch.sandbox.peers import Orthanc
from pacsfetch.sandbox.priors import ORTHANC_WORKLIST_PLUGIN, write_worklist_entry
from pacsfetch.workers.prefetch import poll_worklist

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def worklist_scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    folder = tmp_path_factory.mktemp("worklists")
    entries = [("PF-WL-1", "WL1", "MR", NOW + timedelta(hours=3)),
               ("PF-WL-1", "WL2", "MR", NOW + timedelta(days=3)),  # beyond the horizon
               ("PF-WL-2", "WL3", "CT", NOW + timedelta(hours=2)),  # another modality
               ("PF-WL-3", "WL4", "MR", NOW + timedelta(hours=5))]
    for patient, accession, modality, when in entries:
        write_worklist_entry(folder, patient_id=patient, accession=accession,
                             modality=modality, description=f"{modality} BRAIN", when=when)
    with Orthanc(tmp_path_factory.mktemp("ris"), aet="RIS", dicomweb=False, extra_config={
            "Plugins": [ORTHANC_WORKLIST_PLUGIN], "DicomAlwaysAllowFindWorklist": True,
            "Worklists": {"Enable": True, "Database": str(folder)}}) as server:
        yield server


@pytest.fixture
def config(redis_url: str, tmp_path: Path, worklist_scp: Orthanc) -> Config:
    data = make_config(redis_url=redis_url, store_root=tmp_path / "store", extra_sources={
        "archive": {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 104},
        "ris": {"ae_title": worklist_scp.aet, "host": "127.0.0.1",
                "port": worklist_scp.dicom_port, "timeout": 10}})
    data["prefetch"] = {
        "rules": {"any": {"sources": ["archive"], "stores": ["local"], "lead_minutes": 60}},
        "worklists": {"ris": {"source": "ris", "interval": 30, "horizon_hours": 24,
                              "modality": "MR"}}}
    return parse_config(data)


def test_each_worklist_entry_makes_exactly_one_prefetch(config: Config, redis_url: str) -> None:
    store = PrefetchStore.from_url(redis_url)
    worklist = config.prefetch.worklists["ris"]
    # An HL7 order for WL4 came first; its worklist entry must join it.
    hl7_record, _ = request_prefetch(store, config, PrefetchRequest(
        patient_id="PF-WL-3", current=CurrentExam(
            modality="MR", accession_number="WL4",
            scheduled_at=NOW + timedelta(hours=5))), "hl7", "hl7-listener")

    new = [poll_worklist(config, store, "ris", worklist) for _ in range(10)]

    assert new == [1] + [0] * 9
    (record,) = store.for_patient("PF-WL-1")
    assert (record.trigger, record.created_by) == ("worklist:ris", "scheduler")
    assert record.request.current.accession_number == "WL1"
    assert record.request.current.scheduled_at == NOW + timedelta(hours=3)
    assert record.request.current.study_description == "MR BRAIN"
    assert record.start_at == NOW + timedelta(hours=2)
    assert store.for_patient("PF-WL-2") == []  # CT: filtered by the worklist's modality
    assert [r.id for r in store.for_patient("PF-WL-3")] == [hl7_record.id]
    assert store.waiting() == 2

    # The RIS cancels WL1 by HL7; the worklist still lists it for a while: it stays cancelled.
    cancelled = cancel_prefetch(store, config, record.request, "hl7", "hl7-listener",
                                "cancelled by ORM^O01")
    assert cancelled is not None and cancelled.status is PrefetchStatus.CANCELLED
    assert [poll_worklist(config, store, "ris", worklist) for _ in range(3)] == [0, 0, 0]
    (still,) = store.for_patient("PF-WL-1")
    assert still.id == record.id and still.status is PrefetchStatus.CANCELLED
    assert store.waiting() == 1
