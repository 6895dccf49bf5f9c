"""Patient histories and worklist entries for prefetch tests, the demo and the benchmark.

A prefetch needs an archive holding several studies per patient over years and
modalities, with the attributes rules look at (StudyDate, StudyDescription,
AccessionNumber, BodyPartExamined). Each study is a small generated one
(:func:`generate_uniform_study`) whose files are then given those attributes. Worklist
entries are the DICOM files Orthanc's ModalityWorklists plugin serves (``*.wl``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacsfetch.sandbox.samples import SampleStudy, generate_uniform_study

ORTHANC_WORKLIST_PLUGIN = "/usr/share/orthanc/plugins/libModalityWorklists.so"


@dataclass(frozen=True)
class HistoryStudy:
    """One study of a patient's history and the attributes written into it."""

    study: SampleStudy
    patient_id: str
    study_date: date
    modality: str
    description: str
    body_part: str
    accession: str

    @property
    def study_uid(self) -> str:
        return self.study.study_uid


def generate_history_study(out_dir: Path, *, patient_id: str, study_date: date, modality: str,
                           description: str, body_part: str, accession: str,
                           n_instances: int = 2) -> HistoryStudy:
    """A small study of *patient_id* with the given attributes (same inputs, same UIDs)."""
    seed = sum(accession.encode())  # distinct studies per accession, stable across runs
    folder = Path(out_dir) / accession
    study = generate_uniform_study(folder, n_instances=n_instances, rows=16, columns=16,
                                   modality=modality, patient_id=patient_id, seed=seed * 7919)
    for instance in study.instances:
        ds = dcmread(instance.path)
        ds.StudyDate = f"{study_date:%Y%m%d}"
        ds.SeriesDate = ds.StudyDate
        ds.StudyDescription = description
        ds.AccessionNumber = accession
        ds.BodyPartExamined = body_part
        ds.save_as(instance.path)
    return HistoryStudy(study, patient_id, study_date, modality, description, body_part,
                        accession)


def write_worklist_entry(folder: Path, *, patient_id: str, accession: str, modality: str,
                         description: str, when: datetime, station_ae_title: str = "CT01") -> Path:
    """One scheduled procedure step as a ``.wl`` file for Orthanc's worklist plugin."""
    step = Dataset()
    step.Modality = modality
    step.ScheduledStationAETitle = station_ae_title
    step.ScheduledProcedureStepStartDate = f"{when:%Y%m%d}"
    step.ScheduledProcedureStepStartTime = f"{when:%H%M%S}"
    step.ScheduledProcedureStepDescription = description
    step.ScheduledProcedureStepID = f"SPS{accession}"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "SANDBOX^WORKLIST"
    ds.PatientID = patient_id
    ds.AccessionNumber = accession
    ds.RequestedProcedureDescription = description
    ds.RequestedProcedureID = f"RP{accession}"
    ds.StudyInstanceUID = generate_uid()
    ds.ScheduledProcedureStepSequence = [step]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.276.0.7230010.3.1.0.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{accession}.wl"
    ds.save_as(path, enforce_file_format=True)
    return path
