"""Modality Worklist C-FIND: the procedures a worklist SCP (the RIS's, or a broker's) lists.

A site without an HL7 feed to spare still has a worklist: every modality polls it for its
coming procedures, so pacsfetch can too, and learns the patient, the accession number, the
modality and the time of each exam before it happens. The query goes through the shared
C-FIND loop (:func:`find_matches`) with the Modality Worklist information model.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydicom.dataset import Dataset

from pacsfetch.config import SourceConfig
from pacsfetch.plugins.dimse.services import QUERY_SYNTAXES, associate
from pacsfetch.plugins.transports.query import find_matches

MWL_FIND_MODEL = "1.2.840.10008.5.1.4.31"
"""Modality Worklist Information Model - FIND."""


@dataclass(frozen=True)
class WorklistItem:
    """One scheduled procedure step, as much as a prefetch needs of it."""

    patient_id: str
    issuer_of_patient_id: str | None
    accession_number: str | None
    modality: str | None
    description: str | None
    scheduled_at: datetime | None
    step_id: str | None


def _identifier(first: datetime, last: datetime, station_ae_title: str | None,
                modality: str | None) -> Dataset:
    step = Dataset()
    step.Modality = modality or ""
    step.ScheduledStationAETitle = station_ae_title or ""
    step.ScheduledProcedureStepStartDate = f"{first:%Y%m%d}-{last:%Y%m%d}"
    step.ScheduledProcedureStepStartTime = ""
    step.ScheduledProcedureStepDescription = ""
    step.ScheduledProcedureStepID = ""
    ds = Dataset()
    ds.PatientID = ""
    ds.IssuerOfPatientID = ""
    ds.AccessionNumber = ""
    ds.RequestedProcedureDescription = ""
    ds.RequestedProcedureID = ""
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() or None if value is not None else None


def _when(step: Dataset) -> datetime | None:
    day = _text(step, "ScheduledProcedureStepStartDate") or ""
    time = (_text(step, "ScheduledProcedureStepStartTime") or "000000").split(".")[0]
    try:
        return datetime.strptime(day + time.ljust(6, "0")[:6], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def _item(found: Dataset) -> WorklistItem | None:
    patient_id = _text(found, "PatientID")
    if patient_id is None:
        return None
    steps = found.get("ScheduledProcedureStepSequence") or [Dataset()]
    step = steps[0]
    return WorklistItem(
        patient_id=patient_id, issuer_of_patient_id=_text(found, "IssuerOfPatientID"),
        accession_number=_text(found, "AccessionNumber"), modality=_text(step, "Modality"),
        description=(_text(found, "RequestedProcedureDescription")
                     or _text(step, "ScheduledProcedureStepDescription")),
        scheduled_at=_when(step), step_id=_text(step, "ScheduledProcedureStepID"),
    )


def find_worklist(source: SourceConfig, source_name: str, *, now: datetime,
                  horizon: timedelta, station_ae_title: str | None = None,
                  modality: str | None = None) -> list[WorklistItem]:
    """Procedures scheduled from *now* to *now + horizon* (times are read as UTC). The SCP
    matches whole days, so steps outside the window are dropped here."""
    where = f"{source.ae_title}@{source.host}:{source.port}"
    assoc = associate(source, [(MWL_FIND_MODEL, QUERY_SYNTAXES)],
                      purpose="MWL C-FIND", source_name=source_name)
    try:
        matches, _ = find_matches(assoc, _identifier(now, now + horizon, station_ae_title,
                                                     modality),
                                  where, source.max_results, model=MWL_FIND_MODEL)
    finally:
        if assoc.is_established:
            assoc.release()
    items = [item for found in matches if (item := _item(found)) is not None]
    return [item for item in items
            if item.scheduled_at is None or now <= item.scheduled_at <= now + horizon]
