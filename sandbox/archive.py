"""A small generated archive: many studies over days and modalities, for migration tests
and benchmarks. Each study is one series of tiny uncompressed images, derived from one
generated template instance (so writing thousands of files takes seconds), with name-based
UIDs from a seed, a StudyDate spread over *days* and a modality taken in turn.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from pydicom import dcmread

from pacsfetch.sandbox.samples import generate_uniform_study

_NAMESPACE = uuid.UUID("0d2b1f9e-5f0c-4d8e-9a51-7c2f4e3b9a10")


@dataclass(frozen=True)
class ArchiveStudy:
    study_uid: str
    study_date: str
    modality: str
    sop_uids: tuple[str, ...]
    paths: tuple[Path, ...]


def _uid(*parts: object) -> str:
    return f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(map(str, parts))).int}"


def generate_archive(out_dir: Path, *, studies: int, instances_per_study: int = 2,
                     first_day: date = date(2023, 3, 1), days: int = 10,
                     modalities: tuple[str, ...] = ("CT", "MR"), rows: int = 16,
                     seed: int = 0) -> list[ArchiveStudy]:
    """Write *studies* studies under *out_dir*; study *i* is dated ``first_day + i % days``."""
    out_dir = Path(out_dir)
    templates = {}
    for modality in modalities:
        sample = generate_uniform_study(out_dir / f"template-{modality}", n_instances=1,
                                        rows=rows, columns=rows, modality=modality,
                                        patient_id="PF-ARCHIVE", seed=seed)
        templates[modality] = dcmread(sample.instances[0].path)
    result = []
    for index in range(studies):
        modality = modalities[index % len(modalities)]
        ds = templates[modality]
        day = (first_day + timedelta(days=index % days)).strftime("%Y%m%d")
        study_uid = _uid(seed, index, "study")
        series_uid = _uid(seed, index, "series")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = day
        ds.PatientID = f"PF-ARCHIVE-{index % 97:03d}"
        ds.AccessionNumber = f"ACC{seed}-{index}"[:16]
        study_dir = out_dir / f"study-{index:06d}"
        study_dir.mkdir(parents=True, exist_ok=True)
        sops, paths = [], []
        for number in range(1, instances_per_study + 1):
            sop_uid = _uid(seed, index, "instance", number)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.InstanceNumber = number
            path = study_dir / f"{number:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            sops.append(sop_uid)
            paths.append(path)
        result.append(ArchiveStudy(study_uid, day, modality, tuple(sops), tuple(paths)))
    return result
