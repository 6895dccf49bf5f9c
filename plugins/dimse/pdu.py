"""PS3.8 §9.3 protocol data units: encoding and decoding, no I/O.

A-ASSOCIATE-RQ/AC/RJ carry a handful of items (application context, presentation
contexts, user information with maximum length, implementation class UID and version,
SCP/SCU role selection); other user-information sub-items (extended negotiation) are
kept as raw bytes and passed through. P-DATA-TF is the hot path: :func:`pdata` frames
one PDV per PDU, and :func:`command_pdus`/:func:`data_pdus` fragment a message to the
peer's maximum PDU length.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

ASSOCIATE_RQ = 0x01
ASSOCIATE_AC = 0x02
ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
RELEASE_RQ = 0x05
RELEASE_RP = 0x06
ABORT = 0x07
PDU_TYPES = frozenset(range(1, 8))

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1391.1"
IMPLEMENTATION_VERSION = "PACSFETCH_01"

HEADER = struct.Struct(">BxI")
"""PDU type, reserved, length of what follows."""
PDV_HEADER = struct.Struct(">IBB")
"""PDV item length (counting the two bytes after it), presentation context ID, flags."""

RECEIVE_UNLIMITED = 4 * 1024 * 1024
"""What we announce as our maximum PDU length when the config says 0 (no limit)."""
ASSOCIATE_LIMIT = 1024 * 1024
"""Largest A-ASSOCIATE PDU we read: a 4 GB length is an attack, not a negotiation."""

RELEASE_RQ_PDU = bytes([RELEASE_RQ, 0]) + (4).to_bytes(4, "big") + bytes(4)
RELEASE_RP_PDU = bytes([RELEASE_RP, 0]) + (4).to_bytes(4, "big") + bytes(4)

# A-ABORT source: 0 service user, 2 service provider. Reasons (provider): 0 not specified,
# 1 unrecognised PDU, 2 unexpected PDU, 4 unrecognised PDU parameter, 5 unexpected
# parameter, 6 invalid PDU parameter value.
ABORT_SOURCE_USER = 0
ABORT_SOURCE_PROVIDER = 2


class PduError(ValueError):
    """The bytes are not a PDU we can read: the association must be aborted."""


def abort_pdu(source: int = ABORT_SOURCE_USER, reason: int = 0) -> bytes:
    return bytes([ABORT, 0]) + (4).to_bytes(4, "big") + bytes([0, 0, source, reason])


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return bytes([ASSOCIATE_RJ, 0]) + (4).to_bytes(4, "big") + bytes([0, result, source, reason])


def pdata(pcid: int, flags: int, data: bytes | memoryview) -> bytes:
    """One P-DATA-TF PDU carrying one PDV (flags: bit 0 command, bit 1 last fragment)."""
    n = len(data)
    return HEADER.pack(P_DATA_TF, n + 6) + PDV_HEADER.pack(n + 2, pcid, flags) + data


def fragments(pcid: int, command: bool, data: bytes | memoryview, max_pdu: int
              ) -> Iterator[bytes]:
    """The P-DATA-TF PDUs carrying *data* as one message part, each within *max_pdu*
    (the peer's maximum length; 0 means no limit)."""
    base = 1 if command else 0
    room = (max_pdu - 6) if max_pdu else len(data) or 1
    view = memoryview(data)
    n = len(view)
    if n <= room:
        yield pdata(pcid, base | 2, view)
        return
    for start in range(0, n, room):
        end = min(start + room, n)
        yield pdata(pcid, base | (2 if end == n else 0), view[start:end])


def split_pdvs(body: bytes | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(context ID, flags, fragment) of each PDV in a P-DATA-TF body; PduError when an item
    length runs past the PDU."""
    view = memoryview(body)
    pos, end = 0, len(view)
    while pos < end:
        if pos + 6 > end:
            raise PduError("truncated PDV header in P-DATA-TF")
        length, pcid, flags = PDV_HEADER.unpack_from(view, pos)
        if length < 2 or pos + 4 + length > end:
            raise PduError(f"PDV item length {length} runs past its P-DATA-TF PDU")
        yield pcid, flags, view[pos + 6 : pos + 4 + length]
        pos += 4 + length


# ---- A-ASSOCIATE -------------------------------------------------------------------------

@dataclass
class ProposedContext:
    """A presentation context as proposed (RQ) or answered (AC: one syntax, a result)."""

    id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]
    result: int = 0
    """AC only: 0 acceptance, 1 user rejection, 2 no reason, 3 abstract syntax not supported,
    4 transfer syntaxes not supported."""


@dataclass
class AssociateRequest:
    """The content of an A-ASSOCIATE-RQ or -AC (an AC echoes the RQ's AE titles)."""

    called_ae: str
    calling_ae: str
    contexts: list[ProposedContext]
    max_pdu: int = 0
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID
    implementation_version: str = IMPLEMENTATION_VERSION
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    """SOP class UID -> (SCU role, SCP role) of the proposer (RQ) or as accepted (AC)."""
    extra_user_items: list[bytes] = field(default_factory=list)
    """User-information sub-items we do not interpret, passed through whole."""


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(payload)) + payload


def _ae(title: str) -> bytes:
    return title.encode("ascii")[:16].ljust(16)


def encode_associate(kind: int, assoc: AssociateRequest) -> bytes:
    """An A-ASSOCIATE-RQ (*kind* ASSOCIATE_RQ) or -AC (ASSOCIATE_AC) PDU."""
    parts = [struct.pack(">HH", 1, 0), _ae(assoc.called_ae), _ae(assoc.calling_ae), bytes(32),
             _item(0x10, _uid(APPLICATION_CONTEXT))]
    for cx in assoc.contexts:
        if kind == ASSOCIATE_RQ:
            sub = _item(0x30, _uid(cx.abstract_syntax)) + b"".join(
                _item(0x40, _uid(ts)) for ts in cx.transfer_syntaxes)
            parts.append(_item(0x20, bytes([cx.id, 0, 0, 0]) + sub))
        else:
            ts = cx.transfer_syntaxes[0] if cx.transfer_syntaxes and cx.result == 0 else ""
            parts.append(_item(0x21, bytes([cx.id, 0, cx.result, 0]) + _item(0x40, _uid(ts))))
    user = [_item(0x51, struct.pack(">I", assoc.max_pdu)),
            _item(0x52, _uid(assoc.implementation_class_uid))]
    for sop_class, (scu, scp) in assoc.roles.items():
        uid = _uid(sop_class)
        user.append(_item(0x54, struct.pack(">H", len(uid)) + uid + bytes([scu, scp])))
    if assoc.implementation_version:
        user.append(_item(0x55, assoc.implementation_version.encode("ascii")[:16]))
    user += assoc.extra_user_items
    parts.append(_item(0x50, b"".join(user)))
    body = b"".join(parts)
    return HEADER.pack(kind, len(body)) + body


def _items(data: memoryview | bytes, start: int = 0) -> Iterator[tuple[int, memoryview]]:
    view = memoryview(data)
    pos = start
    while pos < len(view):
        if pos + 4 > len(view):
            raise PduError("truncated item header in A-ASSOCIATE")
        item_type = view[pos]
        (length,) = struct.unpack_from(">H", view, pos + 2)
        if pos + 4 + length > len(view):
            raise PduError(f"item 0x{item_type:02X} length {length} runs past its PDU")
        yield item_type, view[pos + 4 : pos + 4 + length]
        pos += 4 + length


def _text(raw: memoryview) -> str:
    return bytes(raw).decode("ascii", "replace").strip(" \0")


def decode_associate(kind: int, body: bytes | memoryview) -> AssociateRequest:
    """The content of an A-ASSOCIATE-RQ or -AC body (the bytes after the 6-byte header)."""
    view = memoryview(body)
    if len(view) < 68:
        raise PduError("A-ASSOCIATE PDU shorter than its fixed fields")
    result = AssociateRequest(called_ae=_text(view[4:20]), calling_ae=_text(view[20:36]),
                              contexts=[])
    for item_type, value in _items(view, 68):
        if item_type in (0x20, 0x21) and len(value) >= 4:
            cx = ProposedContext(value[0], "", [], result=value[2] if item_type == 0x21 else 0)
            for sub_type, sub in _items(value, 4):
                if sub_type == 0x30:
                    cx.abstract_syntax = _text(sub)
                elif sub_type == 0x40 and len(sub):  # empty in an AC that refuses it
                    cx.transfer_syntaxes.append(_text(sub))
            result.contexts.append(cx)
        elif item_type == 0x50:
            for sub_type, sub in _items(value):
                if sub_type == 0x51 and len(sub) >= 4:
                    (result.max_pdu,) = struct.unpack_from(">I", sub)
                elif sub_type == 0x52:
                    result.implementation_class_uid = _text(sub)
                elif sub_type == 0x55:
                    result.implementation_version = _text(sub)
                elif sub_type == 0x54 and len(sub) >= 2:
                    (n,) = struct.unpack_from(">H", sub)
                    if len(sub) >= 4 + n:
                        result.roles[_text(sub[2 : 2 + n])] = (bool(sub[2 + n]),
                                                               bool(sub[3 + n]))
                else:
                    result.extra_user_items.append(
                        struct.pack(">BxH", sub_type, len(sub)) + bytes(sub))
    if kind == ASSOCIATE_RQ:
        result.implementation_version = result.implementation_version or ""
    return result


REJECT_RESULTS = {1: "rejected permanently", 2: "rejected transiently"}
REJECT_SOURCES = {1: "service user", 2: "service provider (ACSE)",
                  3: "service provider (presentation)"}
REJECT_REASONS = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}


def describe_reject(body: bytes | memoryview) -> str:
    """'rejected permanently by the service user: calling AE title not recognised'."""
    raw = bytes(body)
    if len(raw) < 4:
        return "rejected (malformed A-ASSOCIATE-RJ)"
    result, source, reason = raw[1], raw[2], raw[3]
    return (f"{REJECT_RESULTS.get(result, f'result {result}')} by the "
            f"{REJECT_SOURCES.get(source, f'source {source}')}: "
            f"{REJECT_REASONS.get((source, reason), f'reason {reason}')}")


ABORT_REASONS = {0: "reason not specified", 1: "unrecognised PDU", 2: "unexpected PDU",
                 4: "unrecognised PDU parameter", 5: "unexpected PDU parameter",
                 6: "invalid PDU parameter value"}


def describe_abort(body: bytes | memoryview) -> str:
    raw = bytes(body)
    if len(raw) < 4:
        return "A-ABORT"
    if raw[2] == ABORT_SOURCE_PROVIDER:
        return f"A-P-ABORT by the peer's provider ({ABORT_REASONS.get(raw[3], raw[3])})"
    return "A-ABORT by the peer"
