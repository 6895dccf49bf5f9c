"""What a store holds of one study, read back from the store itself (not from our records).

A migration skips studies the destination already holds and proves, after each job, that
every instance arrived; a prefetch leaves alone a prior the destination already has. Both
ask the store, because what counts is what is there now: an operator may have deleted files,
another tool may have filled the bucket.

The filesystem and S3 stores find a study's instances by listing below the part of their
layout that the Study Instance UID fixes (the default layout starts with it), and read each
SOP Instance UID back from the path. A layout that does not start with
``{StudyInstanceUID}`` (after fixed text) cannot be listed per study without walking the
whole store; such a store answers "unknown" (None) rather than walk millions of files.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel

from pacsfetch.uids import is_valid_uid

_ANY_SEGMENT_PART = r"[^/]*"


class InventoryBackend(Protocol):
    """A store backend that can tell which instances of a study it holds."""

    def study_inventory(self, store_name: str, settings: BaseModel,
                        study_uid: str) -> frozenset[str] | None:
        """SOP Instance UIDs of *study_uid* the store holds; None when it cannot tell."""
        ...


@dataclass(frozen=True)
class StudyListing:
    """Where one study's instances live under a layout, and how to read their UIDs back."""

    prefix: str
    """Fixed text every path of the study starts with (relative to the store's root)."""
    pattern: re.Pattern[str]
    """Matches a whole relative path of the study; group ``sop`` is its SOP Instance UID."""

    def sop_uid(self, relative: str) -> str | None:
        match = self.pattern.fullmatch(relative)
        if match is None:
            return None
        uid = match.group("sop")
        return uid if is_valid_uid(uid) else None


def study_listing(layout: str, study_uid: str) -> StudyListing | None:
    """The listing of *study_uid* under a validated *layout*; None when the layout does not
    let one study be listed alone (no Study Instance UID before any other field)."""
    prefix_parts: list[str] = []
    regex: list[str] = []
    prefix_done = False
    fixed_by_study = False
    sop_seen = False
    for literal, name, _spec, _conversion in string.Formatter().parse(layout):
        regex.append(re.escape(literal))
        if not prefix_done:
            prefix_parts.append(literal)
        if name is None:
            continue
        if name == "StudyInstanceUID":
            regex.append(re.escape(study_uid))
            if not prefix_done:
                prefix_parts.append(study_uid)
                fixed_by_study = True
            continue
        prefix_done = True
        if name == "SOPInstanceUID":
            regex.append("(?P=sop)" if sop_seen else r"(?P<sop>[0-9.]+)")
            sop_seen = True
        else:
            regex.append(_ANY_SEGMENT_PART)
    if not fixed_by_study or not sop_seen:
        return None
    return StudyListing("".join(prefix_parts), re.compile("".join(regex)))
