"""Which instances of a study a DICOM archive holds, by C-FIND: the inventory of the DICOM
forward store (a migration's destination), kept apart from the store's C-STORE code.

Series level first, then image level per series, as every Q/R SCP supports (hierarchical
queries). An answer the archive cut short makes the whole inventory unknown (None): a
partial list would make a complete study look partial, or hide a missing instance.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom.presentation import build_context

from pacsfetch.config import SourceConfig
from pacsfetch.plugins.dimse.legacy import associate
from pacsfetch.plugins.transports.query import FIND_MODEL, find_matches
from pacsfetch.uids import is_valid_uid


def find_study_instances(peer: SourceConfig, study_uid: str,
                         name: str = "unnamed") -> frozenset[str] | None:
    """SOP Instance UIDs of *study_uid* held by *peer*; None when an answer was capped.

    Raises :class:`~pacsfetch.errors.RetrieveError` when the archive cannot be asked."""
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    assoc = associate(peer, [build_context(FIND_MODEL)], purpose="C-FIND", source_name=name)
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        series, capped = find_matches(assoc, query, where, peer.max_results)
        if capped:
            return None
        found: set[str] = set()
        for match in series:
            series_uid = str(match.get("SeriesInstanceUID", ""))
            if not is_valid_uid(series_uid):
                continue
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = study_uid
            query.SeriesInstanceUID = series_uid
            query.SOPInstanceUID = ""
            instances, capped = find_matches(assoc, query, where, peer.max_results)
            if capped:
                return None
            found.update(uid for m in instances
                         if is_valid_uid(uid := str(m.get("SOPInstanceUID", ""))))
        return frozenset(found)
    finally:
        if assoc.is_established:
            assoc.release()
