"""Study-level C-FIND with paging around PACS that cap their result counts.

The query service that transports and later features (migration, prefetch) share. Many PACS
stop after a fixed number of matches (Orthanc's ``LimitFindResults``, vendor defaults of 500
or 1000), sometimes with a success status, so a capped answer looks complete. A query is
therefore treated as capped when the PACS says so (a non-success final status after
matches) or when it returns the source's ``max_results`` matches; a capped query is split
into two StudyDate ranges, recursively, and the answers are merged. A single day that is
still capped cannot be split further: the list is then marked incomplete. Studies without a
StudyDate are found only when the unsplit query is not capped (a range never matches them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

from pacsfetch.config import SourceConfig
from pacsfetch.plugins.dimse.legacy import associate
from pacsfetch.plugins.transports.query import FIND_MODEL, find_matches
from pacsfetch.studyquery import (
    StudyList,
    StudyQuery,
    StudySummary,
    date_bounds,
    dicom_range,
    split_range,
)
from pacsfetch.uids import is_valid_uid

MAX_QUERIES = 256
"""C-FINDs one search may send while splitting; beyond it the list is marked incomplete."""


@dataclass
class _Search:
    assoc: Association
    source: SourceConfig
    query: StudyQuery
    where: str
    found: dict[str, StudySummary] = field(default_factory=dict)
    queries: int = 0
    complete: bool = True

    def run(self, first: date | None, last: date | None, *, split: bool) -> None:
        if self.queries >= MAX_QUERIES:
            self.complete = False
            return
        study_date = dicom_range(first, last) if (first or last) else None
        capped = self._find(study_date)
        if not capped:
            return
        halves = split_range(first, last, date.today()) if split else None
        if halves is None:
            self.complete = False
            return
        for low, high in halves:
            self.run(low, high, split=True)

    def _find(self, study_date: str | None) -> bool:
        """One C-FIND; True when the PACS capped its answer."""
        self.queries += 1
        matches, capped = find_matches(self.assoc, _identifier(self.query, study_date),
                                       self.where, self.source.max_results)
        for found in matches:
            if (summary := _summary(found)) is not None:
                self.found[summary.study_uid] = summary
        return capped


def _identifier(query: StudyQuery, study_date: str | None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = query.StudyInstanceUID or ""
    ds.PatientID = query.PatientID or ""
    ds.StudyDate = study_date or ""
    ds.AccessionNumber = query.AccessionNumber or ""
    ds.ModalitiesInStudy = query.ModalitiesInStudy or ""
    ds.NumberOfStudyRelatedSeries = ""
    ds.NumberOfStudyRelatedInstances = ""
    return ds


def _text(found: Dataset, keyword: str) -> str | None:
    value = found.get(keyword)
    return str(value) if value not in (None, "") else None


def _count(found: Dataset, keyword: str) -> int | None:
    try:
        return int(found.get(keyword))
    except (TypeError, ValueError):
        return None


def _summary(found: Dataset) -> StudySummary | None:
    study_uid = str(found.get("StudyInstanceUID", ""))
    if not is_valid_uid(study_uid):
        return None
    modalities = found.get("ModalitiesInStudy")
    if modalities in (None, ""):
        modalities = []
    elif isinstance(modalities, str):
        modalities = [modalities]
    return StudySummary(
        study_uid=study_uid,
        patient_id=_text(found, "PatientID"),
        study_date=_text(found, "StudyDate"),
        accession_number=_text(found, "AccessionNumber"),
        modalities=sorted(str(m) for m in modalities),
        series_count=_count(found, "NumberOfStudyRelatedSeries"),
        instance_count=_count(found, "NumberOfStudyRelatedInstances"),
    )


def find_studies(source: SourceConfig, query: StudyQuery, source_name: str = "unnamed") -> StudyList:
    """Every study matching *query* (up to ``query.limit``, newest first)."""
    where = f"{source.ae_title}@{source.host}:{source.port}"
    assoc = associate(source, [build_context(FIND_MODEL)], purpose="C-FIND",
                      source_name=source_name)
    try:
        search = _Search(assoc, source, query, where)
        first, last = date_bounds(query.StudyDate) if query.StudyDate else (None, None)
        search.run(first, last, split=not query.StudyInstanceUID)
    finally:
        if assoc.is_established:
            assoc.release()
    items = sorted(search.found.values(), key=lambda s: (s.study_date or "", s.study_uid),
                   reverse=True)
    complete = search.complete and len(items) <= query.limit
    return StudyList(items=items[: query.limit], complete=complete, queries=search.queries)
