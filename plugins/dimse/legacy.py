"""Opening associations with a PACS and explaining, in operator terms, why one failed.

Shared by every DIMSE transport and the C-ECHO check. Failures are classified into
:class:`~pacsfetch.errors.ErrorKind` values: could not connect, association rejected (and
by whom, for what reason), no presentation context accepted, or the peer went silent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification

from pacsfetch.config import SourceConfig
from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.metrics import ASSOCIATION_THROUGHPUT, ASSOCIATIONS_OPEN, ASSOCIATIONS_OPENED
from pacsfetch.plugins.contracts import Verdict
from pacsfetch.plugins.dulpace import pace

# Identifiers can carry patient data: keep them out of pynetdicom's own logs.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

MAX_PRESENTATION_CONTEXTS = 128
"""PS3.8 §9.3.2.2: presentation context IDs are odd numbers 1-255."""

Handler = tuple[Any, Callable[..., Any]]

STORE_STATUS = {
    Verdict.STORED: 0x0000,
    Verdict.DUPLICATE: 0x0000,
    Verdict.OUT_OF_SCOPE: 0x0124,  # Refused: Not Authorised (not part of this job)
    Verdict.INVALID: 0xC000,  # Error: Cannot Understand
    Verdict.STORE_FAILED: 0xA700,  # Refused: Out of Resources
}
"""The C-STORE status a storage SCP of ours (C-GET or the move receiver) answers a verdict with."""

PENDING = (0xFF00, 0xFF01)


@dataclass
class _Watch:
    """What the ACSE layer told us while the association was being negotiated."""

    connected: bool = False
    answered: bool = False
    rejection: str | None = None

    def handlers(self) -> list[Handler]:
        return [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_ACSE_RECV, self._on_acse),
        ]

    def _on_open(self, event: evt.Event) -> None:
        self.connected = True

    def _on_pdu(self, event: evt.Event) -> None:
        self.answered = True

    def _on_acse(self, event: evt.Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]
        result = getattr(primitive, "result", None)
        if result in (0x01, 0x02):
            self.rejection = (
                f"{primitive.result_str} by the {primitive.source_str}: {primitive.reason_str}"
            )


class _AssociationMeter:
    """Counts one association: established, open until its connection closes, and the
    bytes received meanwhile. Its handlers run on the association's own thread, in order."""

    def __init__(self, source_name: str, service: str) -> None:
        self._source = source_name
        self._service = service
        self._received = 0
        self._opened_at: float | None = None

    def handlers(self) -> list[Handler]:
        return [
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]

    def _on_established(self, event: evt.Event) -> None:
        self._opened_at = time.monotonic()
        ASSOCIATIONS_OPENED.labels(self._source, self._service).inc()
        ASSOCIATIONS_OPEN.labels(self._source).inc()

    def _on_data(self, event: evt.Event) -> None:
        self._received += len(event.data)  # type: ignore[attr-defined]

    def _on_close(self, event: evt.Event) -> None:
        if self._opened_at is None:
            return
        elapsed = time.monotonic() - self._opened_at
        self._opened_at = None
        ASSOCIATIONS_OPEN.labels(self._source).dec()
        if elapsed > 0:
            throughput = self._received / elapsed
            ASSOCIATION_THROUGHPUT.labels(self._source, self._service).observe(throughput)


def make_ae(source: SourceConfig) -> AE:
    """An AE set up with the source's calling AE title, timeouts and PDU size."""
    ae = AE(ae_title=source.calling_ae_title)
    ae.connection_timeout = source.timeout
    ae.acse_timeout = source.timeout
    ae.dimse_timeout = source.timeout
    ae.network_timeout = source.timeout
    ae.maximum_pdu_size = source.max_pdu
    return ae


def associate(
    source: SourceConfig,
    contexts: Sequence[PresentationContext],
    *,
    ext_neg: Iterable[Any] = (),
    handlers: Iterable[Handler] = (),
    purpose: str = "retrieve",
    source_name: str = "unnamed",
) -> Association:
    """Open an association or raise a :class:`RetrieveError` an operator can act on.

    *source_name* (the ``[sources.NAME]`` of *source*) and *purpose* (a DICOM service name
    such as ``C-GET``) label the association metrics, so both must come from the config or
    the code, never from the network.

    The association's DUL thread is switched from polling to blocking waits
    (:func:`~pacsfetch.plugins.dulpace.pace`): per-message latency, not bandwidth, limits
    C-FIND and C-GET of many small instances.
    """
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts exceed the limit of 128")
    ae = make_ae(source)
    ae.requested_contexts = list(contexts)
    watch = _Watch()
    meter = _AssociationMeter(source_name, purpose)
    where = f"{source.ae_title}@{source.host}:{source.port}"
    started = time.monotonic()
    assoc = ae.associate(
        source.host,
        source.port,
        ae_title=source.ae_title,
        ext_neg=list(ext_neg) or None,
        evt_handlers=[*watch.handlers(), *meter.handlers(), *handlers],
    )
    if assoc.is_established:
        pace(assoc)  # block on the socket instead of polling it: see plugins/dulpace.py
        return assoc
    if assoc.is_rejected:
        raise RetrieveError(
            ErrorKind.ASSOCIATION_REJECTED,
            f"{where} rejected the association for {purpose} ({watch.rejection or 'no reason given'}). "
            f"Check that the PACS knows calling AE title {source.calling_ae_title!r} "
            f"(and its host) and that its own AE title is {source.ae_title!r}.",
        )
    # pynetdicom reports a failed connect and a silent peer as "aborted" too, so what the
    # transport layer saw decides the kind: connection, silence, or a real abort.
    if not watch.connected:
        raise RetrieveError(
            ErrorKind.CONNECTION,
            f"cannot connect to {source.host}:{source.port} (refused or timed out after "
            f"{source.timeout:g} s): is the PACS running and are host and port right?",
        )
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        raise RetrieveError(
            ErrorKind.NEGOTIATION,
            f"{where} accepted none of the {len(contexts)} presentation contexts proposed for "
            f"{purpose} ({describe_contexts(assoc.rejected_contexts)}). "
            "The PACS does not offer this service or these SOP classes to "
            f"{source.calling_ae_title!r}; enable them on the PACS or use another transport.",
        )
    if not watch.answered and time.monotonic() - started >= source.timeout * 0.9:
        raise RetrieveError(
            ErrorKind.TIMEOUT,
            f"{where} accepted the TCP connection but did not answer the association request "
            f"within {source.timeout:g} s: is this port a DICOM port?",
        )
    if not watch.answered:
        raise RetrieveError(
            ErrorKind.ASSOCIATION_ABORTED,
            f"{where} closed the connection without answering the association request for "
            f"{purpose}: is this port a DICOM port, and does the PACS accept this host?",
        )
    raise RetrieveError(
        ErrorKind.ASSOCIATION_ABORTED,
        f"{where} aborted the association during negotiation for {purpose}.",
    )


REACTOR_SETTLE_LIMIT = 0.5
"""Seconds :func:`quiet_reactor` waits for the reactor at most (normally ~1 ms)."""


def quiet_reactor(assoc: Association) -> None:
    """Call before every ``send_c_find``/``send_c_get``/``send_c_move``/``send_c_store``.

    pynetdicom pauses an association's reactor thread while a request waits for its
    responses, and judges it paused by a flag the reactor sets just *before* it waits on
    the pause checkpoint, including the wait that returns at once because the checkpoint
    is still set. A request sent in that window can have a response taken off the queue
    by the reactor, which logs "Received unexpected C-FIND service message" and drops it:
    a C-FIND silently loses a match, or waits for a final status that never comes (seen
    here 23 times in 13,345 back-to-back C-FINDs on a busy machine). Clearing the
    checkpoint first and watching the flag go false and then true again proves the
    reactor has come round to a wait that blocks; the request then pauses it as usual.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not hasattr(assoc, "_is_paused"):
        return  # a pynetdicom without this reactor: nothing to settle
    checkpoint.clear()
    deadline = time.monotonic() + REACTOR_SETTLE_LIMIT
    seen_running = False
    while assoc.is_alive() and time.monotonic() < deadline:
        if not assoc._is_paused:
            seen_running = True
        elif seen_running:
            return
        time.sleep(0.0001)


def describe_contexts(contexts: Iterable[PresentationContext], limit: int = 6) -> str:
    """Short human list of SOP classes (and transfer syntaxes) of some contexts."""
    names = []
    for cx in contexts:
        syntaxes = ", ".join(UID(ts).name for ts in cx.transfer_syntax)
        names.append(f"{UID(cx.abstract_syntax).name} in {syntaxes}")
    shown = "; ".join(names[:limit])
    return shown + (f"; and {len(names) - limit} more" if len(names) > limit else "")


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    message: str
    elapsed_ms: float


def echo(source: SourceConfig, source_name: str = "unnamed") -> EchoResult:
    """C-ECHO the source; never raises for network trouble, it reports it."""
    started = time.perf_counter()
    try:
        assoc = associate(source, [build_context(Verification)], purpose="C-ECHO",
                          source_name=source_name)
    except RetrieveError as exc:
        return EchoResult(False, str(exc), (time.perf_counter() - started) * 1000)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    elapsed = (time.perf_counter() - started) * 1000
    code = getattr(status, "Status", None)
    if code == 0x0000:
        return EchoResult(True, f"C-ECHO to {source.ae_title} succeeded", elapsed)
    if code is None:
        return EchoResult(False, "no C-ECHO response (timeout or association aborted)", elapsed)
    return EchoResult(False, f"C-ECHO answered with status 0x{code:04X}", elapsed)


def sub_operation_counts(status: Dataset) -> tuple[int | None, int, int, int]:
    """(remaining, completed, failed, warning) of a C-GET or C-MOVE response.

    A final response may omit the remaining count: nothing is left of that request then.
    """
    remaining = status.get("NumberOfRemainingSuboperations")
    if remaining is None and status.get("Status") not in PENDING:
        remaining = 0
    return (
        remaining,
        status.get("NumberOfCompletedSuboperations") or 0,
        status.get("NumberOfFailedSuboperations") or 0,
        status.get("NumberOfWarningSuboperations") or 0,
    )


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
