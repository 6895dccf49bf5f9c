"""The study search the API offers and the workers answer with C-FIND.

Shared vocabulary of both sides, like :mod:`pacsfetch.models`: the API validates a query
with :class:`StudyQuery` (a 422 naming the field for a bad date or UID) and sends it to a
worker as JSON; the worker answers with a :class:`StudyList`. Results hold patient
identifiers (they are what the caller asked for): they are returned, never logged.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pacsfetch.models import UID

# ASCII digits only (``\d`` takes any script's: "٢٠٢٤٠١٠١" parsed as a date), and fullmatch
# only ("$" passes a final newline).
_DATE_RANGE = re.compile(r"([0-9]{8})?(-)?([0-9]{8})?")
DATE_RANGE_PATTERN = r"^([0-9]{8}|[0-9]{8}-|-[0-9]{8}|[0-9]{8}-[0-9]{8})$"
_EARLIEST = date(1900, 1, 1)


def _day(text: str) -> date:
    try:
        return datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise ValueError(f"{text!r} is not a date YYYYMMDD") from None


def date_bounds(value: str) -> tuple[date | None, date | None]:
    """``YYYYMMDD``, ``YYYYMMDD-``, ``-YYYYMMDD`` or ``YYYYMMDD-YYYYMMDD`` as (first, last)."""
    match = _DATE_RANGE.fullmatch(value)
    if not value or not match or value == "-":
        raise ValueError("must be YYYYMMDD, YYYYMMDD-, -YYYYMMDD or YYYYMMDD-YYYYMMDD")
    start, dash, end = match.groups()
    first = _day(start) if start else None
    last = _day(end) if end else (first if not dash else None)
    if first and last and first > last:
        raise ValueError("the range ends before it starts")
    return first, last


def _check_date_range(value: str) -> str:
    date_bounds(value)
    return value


def dicom_range(first: date | None, last: date | None) -> str:
    """The DICOM range matching value for *first* to *last* (open where None)."""
    start = f"{first:%Y%m%d}" if first else ""
    end = f"{last:%Y%m%d}" if last else ""
    return start if first == last and first else f"{start}-{end}"


def split_range(first: date | None, last: date | None, today: date) -> tuple[
        tuple[date, date], tuple[date, date]] | None:
    """Two halves of a date range (open ends closed at 1900 and *today*); None for one day."""
    low, high = first or _EARLIEST, last or today
    if low >= high:
        return None
    middle = low + (high - low) // 2
    return (low, middle), (date.fromordinal(middle.toordinal() + 1), high)


# A DICOM LO/SH value without backslash or control characters; * and ? are wildcards.
_Text = r"^[^\\\x00-\x1f]*$"


class StudyQuery(BaseModel):
    """Matching keys of a study-level C-FIND (DICOM keywords, so callers need no mapping)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    PatientID: str | None = Field(None, min_length=1, max_length=64, pattern=_Text)
    StudyDate: Annotated[str, AfterValidator(_check_date_range)] | None = Field(
        None, description="YYYYMMDD, or a range YYYYMMDD-YYYYMMDD (either end may be open).",
        json_schema_extra={"pattern": DATE_RANGE_PATTERN})
    AccessionNumber: str | None = Field(None, min_length=1, max_length=16, pattern=_Text)
    StudyInstanceUID: UID | None = None
    ModalitiesInStudy: str | None = Field(None, pattern=r"^[A-Z0-9]{1,16}$")
    limit: int = Field(100, ge=1, le=10_000, description="At most this many studies, newest first.")


class StudySummary(BaseModel):
    """One matching study: what a migration or prefetch needs to plan a retrieve."""

    study_uid: str
    patient_id: str | None = None
    study_date: str | None = None
    accession_number: str | None = None
    modalities: list[str] = Field(default_factory=list)
    study_description: str | None = None
    issuer_of_patient_id: str | None = None
    series_count: int | None = None
    instance_count: int | None = None


class StudyList(BaseModel):
    items: list[StudySummary]
    complete: bool = Field(
        description="False when some matches may be missing: `limit` cut the list, or the PACS "
        "capped its answer for a single day (the finest split).")
    queries: int = Field(description="C-FIND requests sent (more than 1 when the PACS capped).")
