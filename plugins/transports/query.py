"""C-FIND at series and image level: what a retrieve will bring, before asking for it.

The C-GET transport needs the SOP classes (and, where the PACS says, transfer syntaxes)
of the instances up front to propose just the storage presentation contexts it needs; a
resumed job needs the instance list to ask only for what is still missing. Queries walk
the hierarchy (series, then instances per series), which every Q/R SCP supports.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from pacsfetch.config import SourceConfig
from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.models import JobRequest, Level
from pacsfetch.plugins.dimse.association import Association, DimseError
from pacsfetch.plugins.dimse.services import QUERY_SYNTAXES, associate, c_find, dimse_failure
from pacsfetch.uids import is_valid_uid

log = logging.getLogger(__name__)

FIND_MODEL = "1.2.840.10008.5.1.4.1.2.2.1"
"""Study Root Query/Retrieve Information Model - FIND."""
UIDS_PER_QUERY = 100
"""SOP Instance UIDs per list-matching identifier: some PACS limit identifier size."""


@dataclass(frozen=True, slots=True)
class InstanceRef:
    """One instance the PACS says matches the job."""

    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    """Empty when the PACS does not return SOP Class UID at IMAGE level (dcmqrscp does not)."""
    transfer_syntaxes: tuple[str, ...] = ()
    """Available Transfer Syntax UID (0008,3002), when the PACS returns it."""
    modality: str | None = None
    """The series' Modality: narrows the storage classes to propose when the class is unknown."""


def chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def retrieve_identifier(level: Level, study_uid: str, series_uid: str | None = None,
                        sop_uids: list[str] | None = None) -> Dataset:
    """The identifier of a C-GET or C-MOVE at *level*."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level.value
    ds.StudyInstanceUID = study_uid
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    if sop_uids is not None:
        ds.SOPInstanceUID = sop_uids
    return ds


@dataclass(frozen=True)
class Inventory:
    """What the PACS listed for a job, and where its list was cut short."""

    refs: list[InstanceRef]
    capped_series: frozenset[str] = frozenset()
    """Series whose IMAGE-level answer the PACS capped (Orthanc's ``LimitFindInstances``
    ends it with 0xFE00, vendors with 0xA700 or a silent success at their limit). There is
    no key to split such a query by, so these series are asked for whole, never by
    instance list, and the PACS's own sub-operation counts say whether all arrived."""


def find_matches(assoc: Association, identifier: Dataset, where: str,
                 max_results: int, model: str = FIND_MODEL,
                 keys: Mapping[int, str] | None = None) -> tuple[list[Any], bool]:
    """The matches, and whether the PACS cut the answer short.

    A failure status after at least one match is a cap, as is exactly *max_results*
    matches (the source's known limit); a failure with no match is an error. The study
    search (:mod:`pacsfetch.plugins.find`), the retrieve planning below and the worklist
    query (*model*: Modality Worklist) share it. With *keys* (tag -> keyword) a match may
    be a dict of just those elements rather than a Dataset (see :func:`c_find`).
    """
    matches: list[Any] = []
    try:
        responses = list(c_find(assoc, model, identifier, keys=keys))
    except DimseError as exc:
        raise dimse_failure(exc, where, "a C-FIND") from None
    for code, found in responses:
        if code in (0xFF00, 0xFF01):
            if found is not None:
                matches.append(found)
        elif code == 0x0000:
            return matches, 0 < max_results <= len(matches)
        elif matches:
            return matches, True
        else:
            raise RetrieveError(
                ErrorKind.QUERY, f"{where} answered a {identifier.get('QueryRetrieveLevel', 'worklist')}-level "
                f"C-FIND with failure status 0x{code:04X}"
            )
    return matches, False


def find_instances(source: SourceConfig, request: JobRequest) -> Inventory:
    """Every instance of the job's scope the PACS lists (invalid UIDs from the wire dropped);
    none at all is an error, whichever transport asked.

    Some PACS (dcmqrscp) do not return SOP Class UID at image level: ``sop_class_uid`` is
    then empty, and ``modality`` says what the C-GET transport should guess.
    """
    where = f"{source.ae_title}@{source.host}:{source.port}"
    assoc = associate(source, [(FIND_MODEL, QUERY_SYNTAXES)], purpose="C-FIND",
                      source_name=request.source)
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = request.study_uid
        query.SeriesInstanceUID = request.series_uid or ""
        query.Modality = ""
        found_series, capped = find_matches(assoc, query, where, source.max_results)
        if capped:
            raise RetrieveError(
                ErrorKind.QUERY,
                f"{where} cut its series-level C-FIND answer short after "
                f"{len(found_series)} series, so the job cannot know what the study holds: "
                "raise the PACS's C-FIND result limit for this AE (Orthanc: LimitFindResults)"
                + (f" or sources.{request.source}.max_results (now {source.max_results})"
                   if source.max_results else "") + ".",
            )
        modalities: dict[str, str | None] = {}
        invalid = {"series": 0, "instance": 0}
        for found in found_series:
            uid = str(found.get("SeriesInstanceUID", ""))
            if is_valid_uid(uid):
                modalities[uid] = str(found.get("Modality", "")) or None
            else:
                invalid["series"] += 1
        if request.series_uid and not modalities:
            modalities[request.series_uid] = None  # the PACS may not list it; ask anyway
        wanted = set(request.sop_uids)
        refs: dict[str, InstanceRef] = {}
        capped_series: set[str] = set()
        for series_uid in sorted(modalities):
            uid_lists = list(chunks(request.sop_uids, UIDS_PER_QUERY)) if wanted else [[]]
            for uid_list in uid_lists:
                query = Dataset()
                query.QueryRetrieveLevel = "IMAGE"
                query.StudyInstanceUID = request.study_uid
                query.SeriesInstanceUID = series_uid
                query.SOPInstanceUID = uid_list or ""
                query.SOPClassUID = ""
                query.AvailableTransferSyntaxUID = ""
                matches, capped = find_matches(assoc, query, where, source.max_results,
                                               keys=_INSTANCE_KEYS)
                if capped:
                    capped_series.add(series_uid)
                for found in matches:
                    ref = _instance_ref(found, series_uid, modalities[series_uid])
                    if ref is None:
                        invalid["instance"] += 1
                    elif not wanted or ref.sop_instance_uid in wanted:
                        refs[ref.sop_instance_uid] = ref
        if any(invalid.values()):
            log.warning("the PACS listed malformed UIDs; those entries are ignored",
                        extra={"source": request.source, "invalid_series": invalid["series"],
                               "invalid_instances": invalid["instance"]})
        if not refs:
            raise RetrieveError(ErrorKind.QUERY, _nothing_found(where, invalid))
        if capped_series:
            log.warning("the PACS capped image-level C-FIND answers; those series are "
                        "retrieved whole", extra={"source": request.source,
                                                  "capped_series": len(capped_series)})
        return Inventory(list(refs.values()), frozenset(capped_series))
    finally:
        assoc.release()


_LEVELS = {"series": ("series", "SERIES"), "instance": ("instance(s)", "IMAGE")}
"""How the error names each kind of entry, and the C-FIND level the PACS lists it at."""


def _nothing_found(where: str, invalid: dict[str, int]) -> str:
    """Why the plan is empty: nothing matched, or only entries with malformed UIDs did."""
    listed = [f"{invalid[what]} {noun} with invalid UIDs at {level} level"
              for what, (noun, level) in _LEVELS.items() if invalid[what]]
    if listed:
        return (f"{where} listed {' and '.join(listed)} in its C-FIND answers (not DICOM "
                "UIDs: digits and dots, no leading zeros, at most 64 characters), and no "
                "valid one: the PACS's data or its C-FIND is broken; nothing can be retrieved "
                "by such UIDs.")
    return (f"{where} holds no instances matching the job (C-FIND found none): check the "
            "UIDs, or whether the PACS lets this AE see the study.")


_INSTANCE_KEYS = {0x00080018: "SOPInstanceUID", 0x00080016: "SOPClassUID",
                  0x00083002: "AvailableTransferSyntaxUID"}
"""What planning reads of each instance-level match (one per instance, so read without
pydicom: see :func:`~pacsfetch.plugins.dimse.messages.decode_flat`)."""


def _instance_ref(found: Dataset | dict[str, Any], series_uid: str, modality: str | None) -> InstanceRef | None:
    sop_uid = str(found.get("SOPInstanceUID", ""))
    sop_class = str(found.get("SOPClassUID", ""))
    if not is_valid_uid(sop_uid):
        return None
    if not is_valid_uid(sop_class):
        sop_class = ""
    raw = found.get("AvailableTransferSyntaxUID")
    values = [] if raw in (None, "") else ([raw] if isinstance(raw, str) else list(raw))
    syntaxes = tuple(str(v) for v in values if is_valid_uid(str(v)))
    return InstanceRef(series_uid, sop_uid, sop_class, syntaxes, modality)
