"""DIMSE services on :mod:`.association`: what the transports call.

:func:`associate` opens an association for a source and explains a failure in operator
terms (an :class:`~pacsfetch.errors.RetrieveError` of the right kind). :func:`c_get` is the
per-instance hot path: C-STORE sub-operation data sets go fragment by fragment from the
socket into a spool file behind a file meta header built from the command, the sink is
called with the path, and the C-STORE-RSP is assembled from a template; no Dataset, no
thread hand-off, no logging per instance. C-FIND, C-MOVE, C-ECHO and C-STORE (SCU) are
request/response loops over :meth:`Association.receive_message`.
"""

from __future__ import annotations

import itertools
import os
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsfetch.config import SourceConfig
from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.metrics import ASSOCIATION_THROUGHPUT, ASSOCIATIONS_OPEN, ASSOCIATIONS_OPENED
from pacsfetch.plugins.contracts import Verdict
from pacsfetch.plugins.dimse import messages as m
from pacsfetch.plugins.dimse import pdu
from pacsfetch.plugins.dimse.association import (
    Association,
    AssociationRejected,
    ConnectFailed,
    Context,
    DimseError,
    PeerClosed,
    PeerTimeout,
    PeerViolation,
    TlsFailed,
)
from pacsfetch.pushback import association_pushback

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

MAX_PRESENTATION_CONTEXTS = 128
"""PS3.8 §9.3.2.2: presentation context IDs are odd numbers 1-255."""

IMPLICIT_LE = m.IMPLICIT_LE
EXPLICIT_LE = m.EXPLICIT_LE
QUERY_SYNTAXES = (IMPLICIT_LE, EXPLICIT_LE)
"""Transfer syntaxes proposed for C-ECHO/C-FIND/C-GET/C-MOVE contexts (identifiers only)."""
VERIFICATION = "1.2.840.10008.1.1"

STORE_STATUS = {
    Verdict.STORED: 0x0000,
    Verdict.DUPLICATE: 0x0000,
    Verdict.OUT_OF_SCOPE: 0x0124,  # Refused: Not Authorised (not part of this job)
    Verdict.INVALID: 0xC000,  # Error: Cannot Understand
    Verdict.STORE_FAILED: 0xA700,  # Refused: Out of Resources
}
"""The C-STORE status a storage SCP of ours (C-GET or the move receiver) answers a verdict with."""
SOP_CLASS_NOT_SUPPORTED = 0x0122

PENDING = m.PENDING
Proposal = tuple[str, Sequence[str]]
"""(abstract syntax, transfer syntaxes) of one proposed presentation context."""


def where(source: SourceConfig) -> str:
    return f"{source.ae_title}@{source.host}:{source.port}"


def uid_name(uid: str) -> str:
    """A UID's keyword-ish name for messages (the UID itself when pydicom does not know it)."""
    from pydicom.uid import UID

    return UID(uid).name


def describe_contexts(contexts: Sequence[Proposal], limit: int = 6) -> str:
    """Short human list of SOP classes (and transfer syntaxes) of some contexts."""
    names = [f"{uid_name(a)} in {', '.join(uid_name(t) for t in ts)}" for a, ts in contexts]
    shown = "; ".join(names[:limit])
    return shown + (f"; and {len(names) - limit} more" if len(names) > limit else "")


def associate(source: SourceConfig, contexts: Sequence[Proposal], *,
              roles: dict[str, tuple[bool, bool]] | None = None, purpose: str = "retrieve",
              source_name: str = "unnamed", extra_user_items: Sequence[bytes] = ()
              ) -> Association:
    """Open an association or raise a :class:`RetrieveError` an operator can act on.

    *source_name* (the ``[sources.NAME]`` of *source*) and *purpose* (a DICOM service name
    such as ``C-GET``) label the association metrics, so both come from the config or the
    code, never from the network. *roles* are SCP/SCU role selections per SOP class.
    """
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts exceed the limit of 128")
    rq = pdu.AssociateRequest(
        called_ae=source.ae_title, calling_ae=source.calling_ae_title,
        contexts=[pdu.ProposedContext(2 * i + 1, a, list(ts)) for i, (a, ts) in
                  enumerate(contexts)],
        max_pdu=source.max_pdu or pdu.RECEIVE_UNLIMITED, roles=dict(roles or {}),
        extra_user_items=list(extra_user_items),
    )
    at = where(source)
    tls = None
    if source.tls is not None:
        from pacsfetch.plugins.dimse.tls import client_context

        try:
            tls = client_context(source.tls)
        except (OSError, ValueError) as exc:
            raise RetrieveError(ErrorKind.TLS, f"cannot load the TLS files of the source "
                                f"for {at}: {exc}") from None
    try:
        assoc = Association.request(source.host, source.port, rq, timeout=source.timeout,
                                    tls=tls)
    except ConnectFailed:
        raise RetrieveError(
            ErrorKind.CONNECTION,
            f"cannot connect to {source.host}:{source.port} (refused or timed out after "
            f"{source.timeout:g} s): is the PACS running and are host and port right?",
        ) from None
    except TlsFailed as exc:
        raise RetrieveError(
            ErrorKind.TLS,
            f"{exc}. Check the source's tls ca_file (does it sign the PACS's certificate?), "
            "cert_file/key_file (does the PACS trust our certificate?) and that the PACS "
            "port speaks TLS.",
        ) from None
    except AssociationRejected as exc:
        if (busy := association_pushback(at, exc.result, purpose)) is not None:
            raise busy from None
        raise RetrieveError(
            ErrorKind.ASSOCIATION_REJECTED,
            f"{at} rejected the association for {purpose} ({exc}). "
            f"Check that the PACS knows calling AE title {source.calling_ae_title!r} "
            f"(and its host) and that its own AE title is {source.ae_title!r}.",
        ) from None
    except PeerTimeout:
        raise RetrieveError(
            ErrorKind.TIMEOUT,
            f"{at} accepted the TCP connection but did not answer the association request "
            f"within {source.timeout:g} s: is this port a DICOM port?",
        ) from None
    except PeerClosed:
        raise RetrieveError(
            ErrorKind.ASSOCIATION_ABORTED,
            f"{at} closed the connection without answering the association request for "
            f"{purpose}: is this port a DICOM port, and does the PACS accept this host?",
        ) from None
    except DimseError as exc:
        raise RetrieveError(
            ErrorKind.ASSOCIATION_ABORTED,
            f"{at} aborted the association during negotiation for {purpose} ({exc}).",
        ) from None
    if not assoc.contexts:
        assoc.release()
        raise RetrieveError(
            ErrorKind.NEGOTIATION,
            f"{at} accepted none of the {len(contexts)} presentation contexts proposed for "
            f"{purpose} ({describe_contexts(contexts)}). "
            "The PACS does not offer this service or these SOP classes to "
            f"{source.calling_ae_title!r}; enable them on the PACS or use another transport.",
        )
    _meter(assoc, source_name, purpose)
    return assoc


def _meter(assoc: Association, source_name: str, service: str) -> None:
    """Count the association: opened, open until it closes, and its receive throughput."""
    opened = time.monotonic()
    ASSOCIATIONS_OPENED.labels(source_name, service).inc()
    ASSOCIATIONS_OPEN.labels(source_name).inc()

    def closed(a: Association) -> None:
        ASSOCIATIONS_OPEN.labels(source_name).dec()
        elapsed = time.monotonic() - opened
        if elapsed > 0:
            ASSOCIATION_THROUGHPUT.labels(source_name, service).observe(
                a.received_bytes / elapsed)

    assoc.on_close = closed


def dimse_failure(exc: DimseError, at: str, what: str) -> RetrieveError:
    """A failure in the middle of a service, as the job's error."""
    if isinstance(exc, PeerTimeout):
        return RetrieveError(ErrorKind.TIMEOUT, f"{at} stopped answering {what} ({exc})")
    if isinstance(exc, PeerViolation):
        return RetrieveError(ErrorKind.ASSOCIATION_ABORTED,
                             f"{at} broke the DICOM protocol during {what}: {exc}; we aborted")
    return RetrieveError(ErrorKind.ASSOCIATION_ABORTED,
                         f"{at} aborted the association during {what} ({exc})")


# ---- C-ECHO ------------------------------------------------------------------------------

@dataclass(frozen=True)
class EchoResult:
    ok: bool
    message: str
    elapsed_ms: float


def echo(source: SourceConfig, source_name: str = "unnamed") -> EchoResult:
    """C-ECHO the source; never raises for network trouble, it reports it."""
    started = time.perf_counter()
    try:
        assoc = associate(source, [(VERIFICATION, QUERY_SYNTAXES)], purpose="C-ECHO",
                          source_name=source_name)
    except RetrieveError as exc:
        return EchoResult(False, str(exc), (time.perf_counter() - started) * 1000)
    code: int | None = None
    try:
        cx = assoc.context(VERIFICATION)
        assert cx is not None
        assoc.send_message(cx.id, m.c_echo_rq(1))
        _, command, _ = assoc.receive_message()
        code = command.get(m.STATUS)
    except DimseError:
        code = None
    finally:
        assoc.release()
    elapsed = (time.perf_counter() - started) * 1000
    if code == 0x0000:
        return EchoResult(True, f"C-ECHO to {source.ae_title} succeeded", elapsed)
    if code is None:
        return EchoResult(False, "no C-ECHO response (timeout or association aborted)", elapsed)
    return EchoResult(False, f"C-ECHO answered with status 0x{code:04X}", elapsed)


# ---- C-FIND ------------------------------------------------------------------------------

def c_find(assoc: Association, model: str, identifier: Dataset, msg_id: int = 1, *,
           keys: Mapping[int, str] | None = None
           ) -> Iterator[tuple[int, Dataset | dict[str, Any] | None]]:
    """(status, match or None) of each response to one C-FIND, the final one last.

    With *keys* (tag -> keyword), a match is a dict of those elements as text where
    :func:`~.messages.decode_flat` can read it, a Dataset otherwise: both answer
    ``get(keyword, default)``."""
    cx = assoc.context(model)
    if cx is None:
        raise PeerViolation(f"no accepted context for {model}")
    assoc.send_message(cx.id, m.c_find_rq(msg_id, model),
                       m.encode_identifier(identifier, cx.transfer_syntax))
    while True:
        _, command, data = assoc.receive_message()
        if command[m.COMMAND_FIELD] != m.C_FIND_RSP or command.get(m.RESPONDED_TO) != msg_id:
            assoc.abort(provider_reason=2)
            raise PeerViolation(f"unexpected command 0x{command[m.COMMAND_FIELD]:04X} "
                                "in answer to a C-FIND")
        status = command.get(m.STATUS, 0xC000)
        found: Dataset | dict[str, Any] | None = None
        if data:
            flat = m.decode_flat(data, cx.transfer_syntax, keys) if keys else None
            found = flat if flat is not None else m.decode_identifier(data, cx.transfer_syntax)
        yield status, found
        if status not in PENDING:
            return


# ---- C-GET -------------------------------------------------------------------------------

StoreHandler = Callable[[Path, str, str], int]
"""(spool path, SOP class UID, SOP instance UID) -> C-STORE status; takes the file."""

_SPOOL_NAMES = itertools.count()
_META_VERSION = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"


def _meta_ui(element: int, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\0"
    return struct.pack("<HH2sH", 2, element, b"UI", len(raw)) + raw


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, 'DICM' and the file meta group of a Part-10 file, from the C-STORE command."""
    version = pdu.IMPLEMENTATION_VERSION.encode("ascii")
    if len(version) % 2:
        version += b" "
    body = b"".join((
        _META_VERSION, _meta_ui(0x0002, sop_class), _meta_ui(0x0003, sop_instance),
        _meta_ui(0x0010, transfer_syntax), _meta_ui(0x0012, pdu.IMPLEMENTATION_CLASS_UID),
        struct.pack("<HH2sH", 2, 0x0013, b"SH", len(version)), version,
    ))
    return (bytes(128) + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body)


def _even(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


class Spool:
    """Spool files for incoming data sets, one opened ahead: creating a file can wait on the
    filesystem's journal (a store fsyncing beside us), so the next one is created right
    after a C-STORE-RSP leaves, while the peer prepares its next instance."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._next: tuple[Path, Any] | None = None

    def take(self) -> tuple[Path, Any]:
        ready, self._next = self._next, None
        return ready or self._create()

    def prepare(self) -> None:
        if self._next is None:
            self._next = self._create()

    def _create(self) -> tuple[Path, Any]:
        path = self.directory / f"dimse-{os.getpid()}-{next(_SPOOL_NAMES)}.part"
        return path, open(path, "xb")  # the caller closes it

    def close(self) -> None:
        """Remove the file opened ahead, if any."""
        ready, self._next = self._next, None
        if ready is not None:
            ready[1].close()
            ready[0].unlink(missing_ok=True)


def receive_store(assoc: Association, pcid: int, command: dict[int, Any], spool: Spool,
                  store: StoreHandler) -> None:
    """One C-STORE sub-operation: its data set into a spool file, the sink, the response.

    The data set is refused (status 0x0122, its bytes discarded) when it comes on a context
    we did not accept as the storage SCP for its class.
    """
    sop_class = command.get(m.AFFECTED_SOP_CLASS, "")
    sop_instance = command.get(m.AFFECTED_SOP_INSTANCE, "")
    cx = assoc.contexts.get(pcid)
    if cx is None or not cx.scp or cx.abstract_syntax != sop_class or not m.has_data_set(
            command):
        if m.has_data_set(command):
            assoc.read_data_set(pcid, discard)
        status = SOP_CLASS_NOT_SUPPORTED
    else:
        path, fp = spool.take()
        try:
            fp.write(file_meta(sop_class, sop_instance, cx.transfer_syntax))
            assoc.read_data_set(pcid, fp.write)
            fp.close()
        except BaseException:
            fp.close()
            path.unlink(missing_ok=True)
            raise
        try:
            status = store(path, sop_class, sop_instance)
        finally:
            path.unlink(missing_ok=True)  # a sink normally took or removed it already
    assoc.send_message(pcid, m.store_rsp(command.get(m.MESSAGE_ID, 0), status,
                                         _even(sop_class), _even(sop_instance)))
    spool.prepare()


def discard(fragment: memoryview) -> None:
    """A data-set sink that drops the bytes: a data set we refuse must still be read off
    the association before the next message."""
    return None


@dataclass
class GetOutcome:
    """How one C-GET (or C-MOVE) request ended."""

    status: int
    command: dict[int, Any]
    failed_uids: list[str] = field(default_factory=list)
    cancel_sent: bool = False


def _failed_uids(command: dict[int, Any], data: bytes | None, transfer_syntax: str
                 ) -> list[str]:
    if not data:
        raw = command.get(m.FAILED_UID_LIST)
        if not raw:
            return []
        text = raw.decode("ascii", "replace").strip(" \0")
        return [v.strip(" \0") for v in text.split("\\") if v.strip(" \0")]
    try:
        listed = m.decode_identifier(data, transfer_syntax).get("FailedSOPInstanceUIDList")
    except Exception:  # pydicom raises many kinds for a malformed list: it is informative only
        return []
    if listed in (None, ""):
        return []
    return [str(listed)] if isinstance(listed, str) else [str(v) for v in listed]


def c_get(assoc: Association, model: Context, identifier: Dataset, msg_id: int, *,
          spool_dir: Path, store: StoreHandler, pending: Callable[[dict[int, Any]], None],
          cancelled: Callable[[], bool]) -> GetOutcome:
    """One C-GET: C-STORE sub-operations are stored as they come, pending responses go to
    *pending*, a C-CANCEL is sent (once) when *cancelled* turns true."""
    assoc.send_message(model.id, m.c_get_rq(msg_id, model.abstract_syntax),
                       m.encode_identifier(identifier, model.transfer_syntax))
    spool = Spool(spool_dir)
    try:
        return _get_responses(assoc, model, msg_id, spool, store, pending, cancelled)
    finally:
        spool.close()


def _get_responses(assoc: Association, model: Context, msg_id: int, spool: Spool,
                   store: StoreHandler, pending: Callable[[dict[int, Any]], None],
                   cancelled: Callable[[], bool]) -> GetOutcome:
    cancel_sent = False
    read_command = assoc.read_command
    while True:
        pcid, command = read_command()
        field_ = command[m.COMMAND_FIELD]
        if field_ == m.C_STORE_RQ:
            receive_store(assoc, pcid, command, spool, store)
            continue
        if field_ != m.C_GET_RSP or command.get(m.RESPONDED_TO) != msg_id:
            assoc.abort(provider_reason=2)
            raise PeerViolation(f"unexpected command 0x{field_:04X} during a C-GET")
        data = None
        if m.has_data_set(command):
            buffer = bytearray()
            assoc.read_data_set(pcid, buffer.extend)
            data = bytes(buffer)
        outcome, cancel_sent = _response(assoc, model, msg_id, command, data, pending,
                                         cancelled, cancel_sent)
        if outcome is not None:
            return outcome


def _response(assoc: Association, model: Context, msg_id: int, command: dict[int, Any],
              data: bytes | None, pending: Callable[[dict[int, Any]], None],
              cancelled: Callable[[], bool], cancel_sent: bool
              ) -> tuple[GetOutcome | None, bool]:
    """A C-GET or C-MOVE response: a pending one goes to *pending* and is the moment to send
    the C-CANCEL (once) if *cancelled* turned true; the final one is the outcome."""
    status = command.get(m.STATUS, 0xC000)
    if status not in PENDING:
        return GetOutcome(status, command, _failed_uids(command, data, model.transfer_syntax),
                          cancel_sent), cancel_sent
    pending(command)
    if not cancel_sent and cancelled():
        assoc.send_message(model.id, m.c_cancel_rq(msg_id))
        cancel_sent = True
    return None, cancel_sent


# ---- C-MOVE ------------------------------------------------------------------------------

def c_move(assoc: Association, model: Context, identifier: Dataset, msg_id: int,
           destination: str, *, pending: Callable[[dict[int, Any]], None],
           cancelled: Callable[[], bool]) -> GetOutcome:
    """One C-MOVE to *destination*: pending responses go to *pending* (sub-operation counts
    for progress), a C-CANCEL is sent (once) when *cancelled* turns true; the final response
    is returned.

    The instances travel on another association, opened by the PACS, so nothing arrives
    here but responses. A PACS that stays silent for the association's timeout raises
    :class:`PeerTimeout` (the association is aborted): the caller decides what silence
    means (see the C-MOVE transport).
    """
    assoc.send_message(model.id, m.c_move_rq(msg_id, model.abstract_syntax, destination),
                       m.encode_identifier(identifier, model.transfer_syntax))
    cancel_sent = False
    while True:
        _, command, data = assoc.receive_message()
        field_ = command[m.COMMAND_FIELD]
        if field_ != m.C_MOVE_RSP or command.get(m.RESPONDED_TO) != msg_id:
            assoc.abort(provider_reason=2)
            raise PeerViolation(f"unexpected command 0x{field_:04X} during a C-MOVE")
        outcome, cancel_sent = _response(assoc, model, msg_id, command, data, pending,
                                         cancelled, cancel_sent)
        if outcome is not None:
            return outcome


def sub_operation_counts(command: dict[int, Any]) -> tuple[int | None, int, int, int]:
    """(remaining, completed, failed, warning) of a C-GET or C-MOVE response.

    A final response may omit the remaining count: nothing is left of that request then.
    """
    remaining = command.get(m.REMAINING)
    if remaining is None and command.get(m.STATUS) not in PENDING:
        remaining = 0
    return (remaining, command.get(m.COMPLETED) or 0, command.get(m.FAILED) or 0,
            command.get(m.WARNING) or 0)


def status_hint(code: int | None) -> str:
    """What a C-GET or C-MOVE failure status means, for an operator (empty if nothing useful)."""
    if code is None:
        return ""
    if code == 0xA801:
        return " (refused: move destination unknown)"
    if 0xA700 <= code <= 0xA7FF:
        return " (refused: out of resources; the PACS could not start the sub-operations)"
    if 0xA900 <= code <= 0xA9FF:
        return " (identifier does not match SOP class)"
    if 0xC000 <= code <= 0xCFFF:
        return " (the PACS was unable to process the request)"
    return ""


@dataclass
class SubOperations:
    """Sub-operation counters summed over the C-GETs or C-MOVEs of one attempt, and what
    the transport found wrong, for the job's error."""

    completed: int = 0
    failed: int = 0
    warning: int = 0
    problems: list[str] = field(default_factory=list)
    problem_kind: ErrorKind | None = None
    cancelled: bool = False

    def problem(self, kind: ErrorKind, text: str) -> None:
        self.problem_kind = self.problem_kind or kind
        self.problems.append(text)



# ---- C-STORE (SCU) -----------------------------------------------------------------------

SEND_CHUNK = 1024 * 1024
"""Bytes read from a file per P-DATA PDU when the peer sets no maximum PDU length."""


def data_set_offset(head: bytes) -> int:
    """Where the data set of a Part-10 file starts: after preamble, 'DICM' and the file meta
    group, whose first element (0002,0000) gives its length."""
    if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a Part-10 file with a file meta group length")
    return 144 + struct.unpack_from("<I", head, 140)[0]


def c_store(assoc: Association, cx: Context, sop_instance: str, path: Path, msg_id: int
            ) -> dict[int, Any]:
    """Send the data set of the Part-10 file at *path* as it is stored (no decoding, no
    transcoding), in PDU-sized pieces read from the file; returns the C-STORE-RSP command."""
    limit = assoc.peer_max_pdu
    room = (limit - 6) if limit else SEND_CHUNK
    with open(path, "rb") as fp:
        start = data_set_offset(fp.read(1024))
        size = os.fstat(fp.fileno()).st_size - start
        fp.seek(start)
        assoc.send_message(cx.id, m.c_store_rq(msg_id, cx.abstract_syntax, sop_instance))
        sent = 0
        while True:
            piece = fp.read(min(room, size - sent))
            sent += len(piece)
            last = sent >= size or not piece
            assoc.send(pdu.pdata(cx.id, 2 if last else 0, piece), pdu.P_DATA_TF)
            if last:
                break
    while True:
        _, command, _ = assoc.receive_message()
        if command[m.COMMAND_FIELD] == m.C_STORE_RSP and command.get(m.RESPONDED_TO) == msg_id:
            return command
        assoc.abort(provider_reason=2)
        raise PeerViolation(f"unexpected command 0x{command[m.COMMAND_FIELD]:04X} in answer "
                            "to a C-STORE")


_STORE_STATUS_TEXT = {
    0x0110: "Processing Failure", 0x0111: "Duplicate SOP Instance",
    0x0117: "Invalid Object Instance", 0x0122: "Refused: SOP Class Not Supported",
    0x0124: "Refused: Not Authorised", 0x0211: "Unrecognised Operation",
    0x0212: "Mistyped Argument", 0x0213: "Resource Limitation",
    0xB000: "Coercion of Data Elements", 0xB006: "Elements Discarded",
    0xB007: "Data Set Does Not Match SOP Class",
}


def store_status_text(code: int) -> tuple[str, str]:
    """(category, meaning) of a C-STORE status (PS3.4 Annex B, PS3.7 Annex C), to explain
    a refusal: ``(Failure, Refused: Out of Resources)`` for 0xA7xx."""
    if code == 0x0000:
        return "Success", ""
    if code in _STORE_STATUS_TEXT:
        return ("Warning" if code >> 12 == 0xB else "Failure"), _STORE_STATUS_TEXT[code]
    if code >> 8 == 0xA7:
        return "Failure", "Refused: Out of Resources"
    if code >> 8 == 0xA9:
        return "Failure", "Error: Data Set Does Not Match SOP Class"
    if code >> 12 == 0xC:
        return "Failure", "Error: Cannot Understand"
    return "Failure", "unknown"
