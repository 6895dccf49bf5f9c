"""Reading just enough of a spooled Part-10 file to know what it is.

Only the leading elements up to (0020,0013) Instance Number are parsed: everything a layout
or a scope check needs lies before it, and stopping there keeps the per-instance cost flat
whatever the size of the pixel data.
"""

from __future__ import annotations

from pathlib import Path

from pacsfetch.plugins.contracts import InstanceIdentity
from pydicom.filereader import read_partial
from pydicom.tag import Tag

from pacsfetch.uids import check_uid

LAYOUT_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "AccessionNumber",
    "Modality",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "InstanceNumber",
)
_TAGS = [Tag(keyword) for keyword in LAYOUT_ATTRIBUTES]
_LAST = max(_TAGS)


def _past_last(tag: int, vr: str | None, length: int) -> bool:
    return tag > _LAST


class UnreadableInstance(ValueError):
    """The file's header is not DICOM, or its UIDs are missing or malformed."""


def read_identity(path: Path) -> InstanceIdentity:
    """Identity of the Part-10 file at *path*; raises :class:`UnreadableInstance`."""
    try:
        with path.open("rb") as fp:
            ds = read_partial(fp, stop_when=_past_last, specific_tags=list(_TAGS))
    except Exception as exc:  # pydicom raises many types for garbage input
        raise UnreadableInstance(f"not a readable DICOM file: {exc}") from None
    try:
        transfer_syntax = check_uid(ds.file_meta.get("TransferSyntaxUID"), "TransferSyntaxUID")
        identity = InstanceIdentity(
            sop_class_uid=check_uid(ds.get("SOPClassUID"), "SOPClassUID"),
            sop_instance_uid=check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
            study_uid=check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
            series_uid=check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
            transfer_syntax_uid=transfer_syntax,
            attributes={
                keyword: str(ds[keyword].value)
                for keyword in LAYOUT_ATTRIBUTES
                if keyword in ds and ds[keyword].value not in (None, "")
            },
        )
    except (ValueError, TypeError) as exc:
        raise UnreadableInstance(str(exc)) from None
    return identity
