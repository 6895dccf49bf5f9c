"""Reading just enough of a spooled Part-10 file to know what it is.

Only the leading elements up to (0020,0013) Instance Number are parsed: everything a layout
or a scope check needs lies before it, and stopping there keeps the per-instance cost flat
whatever the size of the pixel data.

This runs once per received instance, so the common case (little-endian data sets whose
header elements before Instance Number have defined lengths) is read by a small scanner
over the first bytes of the file; anything else (deflated or big-endian data sets,
undefined-length sequences before Instance Number, non-ASCII values, a header beyond the
first :data:`HEAD_BYTES`) falls back to pydicom. Both give the same identity.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pydicom.filereader import read_partial
from pydicom.tag import Tag

from pacsfetch.plugins.contracts import InstanceIdentity
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


HEAD_BYTES = 16384
"""Bytes read for the fast path; headers of ordinary images end well within it."""

_WANTED = {int(tag): keyword for tag, keyword in zip(_TAGS, LAYOUT_ATTRIBUTES, strict=True)}
_TRANSFER_SYNTAX_TAG = 0x00020010
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF


class _Fallback(Exception):
    """The fast scanner cannot read this file; pydicom will."""


def _elements(head: bytes, offset: int, explicit: bool, stop: int
              ) -> tuple[list[tuple[int, bytes]], int]:
    """Little-endian elements from *offset* up to the first tag above *stop*: (tag, value)
    pairs and the offset of that first tag."""
    unpack = struct.unpack_from
    end = len(head)
    found: list[tuple[int, bytes]] = []
    while offset + 8 <= end:
        group, element = unpack("<HH", head, offset)
        tag = group << 16 | element
        if tag > stop:
            return found, offset
        if explicit and group != 0xFFFE:
            if head[offset + 4:offset + 6] in _LONG_VRS:
                if offset + 12 > end:
                    raise _Fallback
                (length,) = unpack("<I", head, offset + 8)
                offset += 12
            else:
                (length,) = unpack("<H", head, offset + 6)
                offset += 8
        else:
            (length,) = unpack("<I", head, offset + 4)
            offset += 8
        if length == _UNDEFINED or offset + length > end:
            raise _Fallback
        found.append((tag, head[offset:offset + length]))
        offset += length
    raise _Fallback


def _text(value: bytes) -> str:
    return value.decode("latin-1").strip(" \0")


def _scan(path: Path) -> tuple[str, dict[str, str]]:
    """(transfer syntax, wanted attributes) by the fast scanner, or :class:`_Fallback`."""
    with path.open("rb") as fp:
        head = fp.read(HEAD_BYTES)
    if head[128:132] != b"DICM":
        raise _Fallback
    meta, offset = _elements(head, 132, True, 0x0002FFFF)
    transfer_syntax = next((_text(v) for t, v in meta if t == _TRANSFER_SYNTAX_TAG), None)
    if transfer_syntax not in (_IMPLICIT_LE, _EXPLICIT_LE):
        raise _Fallback
    elements, _ = _elements(head, offset, transfer_syntax == _EXPLICIT_LE, int(_LAST))
    found: dict[str, str] = {}
    for tag, value in elements:
        keyword = _WANTED.get(tag)
        if keyword is not None:
            if not value.isascii():  # decoding depends on Specific Character Set: pydicom's job
                raise _Fallback
            text = _text(value)
            if text:
                found[keyword] = text
    return transfer_syntax, found


def _identity(transfer_syntax: object, values: dict[str, object]) -> InstanceIdentity:
    try:
        return InstanceIdentity(
            sop_class_uid=check_uid(values.get("SOPClassUID"), "SOPClassUID"),
            sop_instance_uid=check_uid(values.get("SOPInstanceUID"), "SOPInstanceUID"),
            study_uid=check_uid(values.get("StudyInstanceUID"), "StudyInstanceUID"),
            series_uid=check_uid(values.get("SeriesInstanceUID"), "SeriesInstanceUID"),
            transfer_syntax_uid=check_uid(transfer_syntax, "TransferSyntaxUID"),
            attributes={k: str(v) for k, v in values.items() if v not in (None, "")},
        )
    except (ValueError, TypeError) as exc:
        raise UnreadableInstance(str(exc)) from None


class UnreadableInstance(ValueError):
    """The file's header is not DICOM, or its UIDs are missing or malformed."""


def read_identity(path: Path) -> InstanceIdentity:
    """Identity of the Part-10 file at *path*; raises :class:`UnreadableInstance`."""
    try:
        transfer_syntax, values = _scan(path)
    except (_Fallback, struct.error):
        return read_identity_pydicom(path)
    except OSError as exc:
        raise UnreadableInstance(f"not a readable DICOM file: {exc}") from None
    return _identity(transfer_syntax, dict(values))


def read_identity_pydicom(path: Path) -> InstanceIdentity:
    """The same identity, read by pydicom: any transfer syntax, any header shape."""
    try:
        with path.open("rb") as fp:
            ds = read_partial(fp, stop_when=_past_last, specific_tags=list(_TAGS))
    except Exception as exc:  # pydicom raises many types for garbage input
        raise UnreadableInstance(f"not a readable DICOM file: {exc}") from None
    try:
        values: dict[str, object] = {
            keyword: str(ds[keyword].value) for keyword in LAYOUT_ATTRIBUTES
            if keyword in ds and ds[keyword].value not in (None, "")
        }
        transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
    except (ValueError, TypeError) as exc:
        raise UnreadableInstance(str(exc)) from None
    return _identity(transfer_syntax, values)
