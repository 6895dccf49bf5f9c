"""Planning a migration: enumerate a source's studies by study-level C-FIND, window by window.

A PACS caps C-FIND answers (Orthanc's ``LimitFindResults``, vendor defaults of 500 or
1000), so an archive is enumerated in StudyDate windows that are split in halves until each
answer is under the cap, as the study search does (:mod:`pacsfetch.plugins.find`, whose
identifier and match parsing are reused here). A single day still capped is split further by
StudyTime, down to one minute; a minute still capped is reported as incomplete.

Unlike the study search, nothing is kept: each window's studies are handed to the caller
with a :class:`PlanCursor` saying where to resume, so a plan of millions of studies runs in
flat memory and a planner killed at any point resumes from its last window. The filter's
lists (patient IDs, accession numbers, study UIDs) and modalities multiply into *items*,
each planned the same way; an item is computed from its index, never listed in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date

from pydicom.dataset import Dataset

from pacsfetch.migrations import MigrationFilter
from pacsfetch.plugins.find import _identifier as study_identifier
from pacsfetch.plugins.find import _summary as study_summary
from pacsfetch.studyquery import StudyQuery, StudySummary, date_bounds, split_range

Find = Callable[[Dataset], tuple[list[Dataset], bool]]
"""One C-FIND on the planner's association: the matches and whether the PACS capped them."""

Window = tuple[int | None, int | None, int | None, int | None]
"""(first day, last day) as ordinals (None: open) and (first, last minute of the day) for a
single day split by StudyTime (None: the whole day)."""

LAST_MINUTE = 24 * 60 - 1


@dataclass
class PlanCursor:
    """Where planning resumes: the item, and the windows of it still to ask for."""

    item: int = 0
    stack: list[Window] | None = None
    """None: the item is not started; empty: it is done."""
    incomplete: int = field(default=0)
    """Windows the PACS still capped at one minute: some of their studies may be missing."""

    def dumps(self) -> str:
        return json.dumps({"item": self.item, "stack": self.stack, "incomplete": self.incomplete})

    @classmethod
    def loads(cls, text: str | None) -> PlanCursor:
        if not text:
            return cls()
        data = json.loads(text)
        stack = [tuple(w) for w in data["stack"]] if data["stack"] is not None else None
        return cls(data["item"], stack, data.get("incomplete", 0))  # type: ignore[arg-type]


def item_count(flt: MigrationFilter) -> int:
    keys = len(flt.patient_ids or flt.accession_numbers or flt.study_uids) or 1
    return keys * (len(flt.modalities) or 1)


def item_query(flt: MigrationFilter, index: int) -> StudyQuery:
    """The matching keys of item *index* (a key of the filter's list times a modality)."""
    modalities = flt.modalities or [None]
    key_index, modality = divmod(index, len(modalities))
    query: dict[str, str | None] = {"ModalitiesInStudy": modalities[modality]}
    if flt.patient_ids:
        query["PatientID"] = flt.patient_ids[key_index]
    elif flt.accession_numbers:
        query["AccessionNumber"] = flt.accession_numbers[key_index]
    elif flt.study_uids:
        query["StudyInstanceUID"] = flt.study_uids[key_index]
    return StudyQuery(**query)  # type: ignore[arg-type]


def _first_window(flt: MigrationFilter) -> Window:
    if flt.date_range is None:
        return (None, None, None, None)
    first, last = date_bounds(flt.date_range)
    return (first.toordinal() if first else None, last.toordinal() if last else None,
            None, None)


def _split(window: Window, today: date) -> list[Window] | None:
    first, last, t_lo, t_hi = window
    if t_lo is None:
        halves = split_range(date.fromordinal(first) if first else None,
                             date.fromordinal(last) if last else None, today)
        if halves is not None:
            return [(a.toordinal(), b.toordinal(), None, None) for a, b in halves]
        return _split((first, last, 0, LAST_MINUTE), today)
    assert t_hi is not None
    if t_lo >= t_hi:
        return None
    middle = (t_lo + t_hi) // 2
    return [(first, last, t_lo, middle), (first, last, middle + 1, t_hi)]


def _identifier(query: StudyQuery, window: Window) -> Dataset:
    first, last, t_lo, t_hi = window
    study_date = None
    if first is not None or last is not None:
        start = f"{date.fromordinal(first):%Y%m%d}" if first else ""
        end = f"{date.fromordinal(last):%Y%m%d}" if last else ""
        study_date = start if first == last else f"{start}-{end}"
    ds = study_identifier(query, study_date)
    if t_lo is not None and t_hi is not None:
        ds.StudyTime = f"{t_lo // 60:02d}{t_lo % 60:02d}00-{t_hi // 60:02d}{t_hi % 60:02d}59"
    return ds


def count_by_series(find: Find, study_uid: str) -> int | None:
    """The study's instance count from its series (for a PACS that leaves
    NumberOfStudyRelatedInstances out); None when the series do not say either."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ""
    ds.NumberOfSeriesRelatedInstances = ""
    matches, capped = find(ds)
    total = 0
    for match in matches:
        try:
            total += int(match.get("NumberOfSeriesRelatedInstances"))
        except (TypeError, ValueError):
            return None
    return None if capped else total


def plan(find: Find, flt: MigrationFilter, cursor: PlanCursor,
         today: date | None = None) -> Iterator[tuple[list[StudySummary], PlanCursor]]:
    """Each answered window's studies with the cursor to resume *after* it; the caller
    records both together. Windows the PACS capped are split and asked again."""
    today = today or date.today()
    items = item_count(flt)
    while cursor.item < items:
        query = item_query(flt, cursor.item)
        if cursor.stack is None:
            cursor.stack = [_first_window(flt)]
        while cursor.stack:
            window = cursor.stack.pop()
            matches, capped = find(_identifier(query, window))
            if capped and not query.StudyInstanceUID:
                halves = _split(window, today)
                if halves is not None:
                    cursor.stack.extend(reversed(halves))
                    continue
                cursor.incomplete += 1
            found = [s for m in matches if (s := study_summary(m)) is not None]
            for summary in found:
                if summary.instance_count is None:
                    summary.instance_count = count_by_series(find, summary.study_uid)
            yield found, cursor
        cursor.item += 1
        cursor.stack = None
        yield [], cursor
