"""PS3.7 DIMSE command sets, coded directly (Implicit VR Little Endian, group 0000).

A command set is a few fixed elements, so it is built from bytes and read back into a
``{element: value}`` dict without pydicom. The C-STORE response, sent once per received
instance, is assembled from a template around the UIDs exactly as the request carried
them. Identifiers (the data sets of C-FIND, C-GET and C-MOVE) are coded with pydicom in
:func:`encode_identifier` / :func:`decode_identifier`: they are not on the per-instance path.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from io import BytesIO
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pydicom is imported lazily: the C-GET hot path does not need it
    from pydicom.dataset import Dataset

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF

# Element numbers of group 0000.
GROUP_LENGTH = 0x0000
AFFECTED_SOP_CLASS = 0x0002
REQUESTED_SOP_CLASS = 0x0003
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
RESPONDED_TO = 0x0120
MOVE_DESTINATION = 0x0600
PRIORITY = 0x0700
DATA_SET_TYPE = 0x0800
STATUS = 0x0900
OFFENDING_ELEMENT = 0x0901
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE = 0x1000
REMAINING = 0x1020
COMPLETED = 0x1021
FAILED = 0x1022
WARNING = 0x1023
MOVE_ORIGINATOR_AE = 0x1030
MOVE_ORIGINATOR_ID = 0x1031
FAILED_UID_LIST = 0x00080058
"""(0008,0058), found in some SCPs' command sets although it belongs to the data set."""

NO_DATA_SET = 0x0101
HAS_DATA_SET = 0x0000
PENDING = (0xFF00, 0xFF01)

_US = frozenset({COMMAND_FIELD, MESSAGE_ID, RESPONDED_TO, PRIORITY, DATA_SET_TYPE, STATUS,
                 0x0903, REMAINING, COMPLETED, FAILED, WARNING, MOVE_ORIGINATOR_ID})
_TEXT = frozenset({AFFECTED_SOP_CLASS, REQUESTED_SOP_CLASS, MOVE_DESTINATION, ERROR_COMMENT,
                   AFFECTED_SOP_INSTANCE, 0x1001, MOVE_ORIGINATOR_AE})
_AE = frozenset({MOVE_DESTINATION, MOVE_ORIGINATOR_AE})
_ELEMENT = struct.Struct("<HHI")
_US_ELEMENT = struct.Struct("<HHIH")


class CommandError(ValueError):
    """A command set we cannot read."""


def _value(element: int, value: Any) -> bytes:
    if element in _US:
        return struct.pack("<H", value)
    raw = value.encode("ascii") if isinstance(value, str) else bytes(value)
    if len(raw) % 2:
        raw += b" " if element in _AE or element == ERROR_COMMENT else b"\0"
    return raw


def encode_command(elements: dict[int, Any]) -> bytes:
    """A command set from ``{element: value}`` (US as int, UI/AE/LO as str or raw bytes)."""
    body = b"".join(
        _ELEMENT.pack(0, element, len(raw)) + raw
        for element, raw in ((e, _value(e, elements[e])) for e in sorted(elements))
        if element != GROUP_LENGTH
    )
    return _ELEMENT.pack(0, GROUP_LENGTH, 4) + struct.pack("<I", len(body)) + body


def decode_command(data: bytes | memoryview) -> dict[int, Any]:
    """``{element: value}`` of a command set: US as int, text stripped, others raw bytes."""
    view = memoryview(data)
    end = len(view)
    pos = 0
    found: dict[int, Any] = {}
    unpack = _ELEMENT.unpack_from
    while pos < end:
        if pos + 8 > end:
            raise CommandError("truncated command element")
        group, element, length = unpack(view, pos)
        pos += 8
        if pos + length > end:
            raise CommandError(f"command element ({group:04X},{element:04X}) runs past "
                               "the command set")
        raw = view[pos : pos + length]
        pos += length
        if group:
            # Some SCPs (DCMTK-based Orthanc) put status details such as (0008,0058)
            # Failed SOP Instance UID List into the command set: kept by full tag.
            found[group << 16 | element] = bytes(raw)
        elif element in _US:
            if length != 2:
                raise CommandError(f"command element (0000,{element:04X}) is not US")
            found[element] = raw[0] | raw[1] << 8
        elif element in _TEXT:
            found[element] = bytes(raw).decode("ascii", "replace").rstrip(" \0")
        else:
            found[element] = bytes(raw)
    if COMMAND_FIELD not in found:
        raise CommandError("command set without Command Field")
    return found


def has_data_set(command: dict[int, Any]) -> bool:
    return command.get(DATA_SET_TYPE, NO_DATA_SET) != NO_DATA_SET


# ---- requests ----------------------------------------------------------------------------

def c_echo_rq(msg_id: int) -> bytes:
    return encode_command({AFFECTED_SOP_CLASS: "1.2.840.10008.1.1", COMMAND_FIELD: C_ECHO_RQ,
                           MESSAGE_ID: msg_id, DATA_SET_TYPE: NO_DATA_SET})


def c_find_rq(msg_id: int, sop_class: str) -> bytes:
    return encode_command({AFFECTED_SOP_CLASS: sop_class, COMMAND_FIELD: C_FIND_RQ,
                           MESSAGE_ID: msg_id, PRIORITY: 0, DATA_SET_TYPE: HAS_DATA_SET})


def c_get_rq(msg_id: int, sop_class: str) -> bytes:
    return encode_command({AFFECTED_SOP_CLASS: sop_class, COMMAND_FIELD: C_GET_RQ,
                           MESSAGE_ID: msg_id, PRIORITY: 0, DATA_SET_TYPE: HAS_DATA_SET})


def c_move_rq(msg_id: int, sop_class: str, destination: str) -> bytes:
    return encode_command({AFFECTED_SOP_CLASS: sop_class, COMMAND_FIELD: C_MOVE_RQ,
                           MESSAGE_ID: msg_id, MOVE_DESTINATION: destination.ljust(16),
                           PRIORITY: 0, DATA_SET_TYPE: HAS_DATA_SET})


def c_store_rq(msg_id: int, sop_class: str, sop_instance: str, *, originator: str = "",
               originator_id: int | None = None) -> bytes:
    elements: dict[int, Any] = {AFFECTED_SOP_CLASS: sop_class, COMMAND_FIELD: C_STORE_RQ,
                                MESSAGE_ID: msg_id, PRIORITY: 0, DATA_SET_TYPE: HAS_DATA_SET,
                                AFFECTED_SOP_INSTANCE: sop_instance}
    if originator:
        elements[MOVE_ORIGINATOR_AE] = originator.ljust(16)
    if originator_id is not None:
        elements[MOVE_ORIGINATOR_ID] = originator_id
    return encode_command(elements)


def c_cancel_rq(responding_to: int) -> bytes:
    return encode_command({COMMAND_FIELD: C_CANCEL_RQ, RESPONDED_TO: responding_to,
                           DATA_SET_TYPE: NO_DATA_SET})


# ---- responses ---------------------------------------------------------------------------

def response(command_field: int, responding_to: int, status: int, *, sop_class: str = "",
             sop_instance: str = "", has_data: bool = False, **counts: int) -> bytes:
    """Any response command (C-ECHO/C-FIND/C-GET/C-MOVE/C-STORE-RSP); *counts* are
    remaining/completed/failed/warning sub-operations."""
    elements: dict[int, Any] = {COMMAND_FIELD: command_field, RESPONDED_TO: responding_to,
                                DATA_SET_TYPE: HAS_DATA_SET if has_data else NO_DATA_SET,
                                STATUS: status}
    if sop_class:
        elements[AFFECTED_SOP_CLASS] = sop_class
    if sop_instance:
        elements[AFFECTED_SOP_INSTANCE] = sop_instance
    for name, element in (("remaining", REMAINING), ("completed", COMPLETED),
                          ("failed", FAILED), ("warning", WARNING)):
        if name in counts:
            elements[element] = counts[name]
    return encode_command(elements)


_RSP_MIDDLE = (_US_ELEMENT.pack(0, COMMAND_FIELD, 2, C_STORE_RSP))
_RSP_AFTER_ID = _US_ELEMENT.pack(0, DATA_SET_TYPE, 2, NO_DATA_SET)


def store_rsp(responding_to: int, status: int, sop_class: bytes, sop_instance: bytes) -> bytes:
    """A C-STORE-RSP from its template. *sop_class* and *sop_instance* are the UIDs as the
    request carried them (even length, NUL padded)."""
    body = b"".join((
        _ELEMENT.pack(0, AFFECTED_SOP_CLASS, len(sop_class)), sop_class,
        _RSP_MIDDLE,
        _US_ELEMENT.pack(0, RESPONDED_TO, 2, responding_to),
        _RSP_AFTER_ID,
        _US_ELEMENT.pack(0, STATUS, 2, status),
        _ELEMENT.pack(0, AFFECTED_SOP_INSTANCE, len(sop_instance)), sop_instance,
    ))
    return _ELEMENT.pack(0, GROUP_LENGTH, 4) + struct.pack("<I", len(body)) + body


# ---- identifiers -------------------------------------------------------------------------

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def encode_identifier(ds: Dataset, transfer_syntax: str) -> bytes:
    """The identifier in the context's transfer syntax (Implicit or Explicit VR LE)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = transfer_syntax == IMPLICIT_LE
    write_dataset(fp, ds)
    return fp.getvalue()


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_ELEMENT = struct.Struct("<HHI")
"""Implicit VR little endian: group, element, length."""
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
"""Explicit VR little endian with a 2-byte length: group, element, VR, length."""


def decode_flat(data: bytes, transfer_syntax: str, wanted: Mapping[int, str]
                ) -> dict[str, str | list[str]] | None:
    """The *wanted* elements (tag -> keyword) of an identifier as text, or None when it
    needs pydicom (:func:`decode_identifier`).

    Planning a retrieve decodes one C-FIND match per instance; pydicom spends most of the
    planning time building Datasets for that. Here the top-level elements are walked
    without decoding: a wanted value must be ASCII (else its decoding depends on Specific
    Character Set), and an element of undefined length (a sequence) sends the whole
    identifier to pydicom. Multiple values come back as a list, as pydicom gives them.
    """
    if transfer_syntax not in (IMPLICIT_LE, EXPLICIT_LE):
        return None
    explicit = transfer_syntax == EXPLICIT_LE
    found: dict[str, str | list[str]] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            return None
        if explicit:
            group, element, vr, length = _EXPLICIT_SHORT.unpack_from(data, pos)
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    return None
                length = int.from_bytes(data[pos + 8:pos + 12], "little")
                pos += 12
            else:
                pos += 8
        else:
            group, element, length = _ELEMENT.unpack_from(data, pos)
            pos += 8
        if length == 0xFFFFFFFF or pos + length > end:
            return None
        keyword = wanted.get(group << 16 | element)
        if keyword is not None:
            raw = data[pos:pos + length]
            if not raw.isascii():
                return None
            values = [v.strip(" \0") for v in raw.decode("ascii").split("\\")]
            found[keyword] = values if len(values) > 1 else values[0]
        pos += length
    return found


def decode_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    """A received identifier (C-FIND match, C-GET/C-MOVE failure list) as a Dataset."""
    from pydicom.filereader import read_dataset

    return read_dataset(BytesIO(data), transfer_syntax == IMPLICIT_LE, True)
