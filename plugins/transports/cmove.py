"""C-MOVE: the PACS opens a new association back to a move destination and sends there.

The destination is ``pacsfetch receiver``, one process all workers share, which the PACS
knows under the source's ``move_destination`` AE title. This only works where the PACS can
connect to the receiver; behind NAT, a firewall or in a pod it cannot reach, C-MOVE fails
and the error says so (C-GET and DICOMweb need no connection back).

An attempt plans with the same C-FIND inventory as C-GET (what to expect, what a resumed
job still lacks), registers a move expectation for each C-MOVE message, follows the
pending responses for progress, and after the final one waits (at most the source's
timeout) until the receiver has recorded as many instances as the PACS says it delivered.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydicom.dataset import Dataset

from pacsfetch import hookimpl
from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.gate import GateCancelled
from pacsfetch.models import Level
from pacsfetch.plugins.contracts import (
    MoveTracker,
    RetrieveContext,
    RetrieveResult,
    Transport,
)
from pacsfetch.plugins.dimse import messages as m
from pacsfetch.plugins.dimse.association import Association, Context, DimseError, PeerTimeout
from pacsfetch.plugins.dimse.services import (
    QUERY_SYNTAXES,
    SubOperations,
    associate,
    c_move,
    dimse_failure,
    status_hint,
    sub_operation_counts,
)
from pacsfetch.plugins.transports.query import (
    UIDS_PER_QUERY,
    Inventory,
    chunks,
    find_instances,
    retrieve_identifier,
)

log = logging.getLogger(__name__)

MOVE_MODEL = "1.2.840.10008.5.1.4.1.2.2.2"
"""Study Root Query/Retrieve Information Model - MOVE."""
UNKNOWN_DESTINATION = 0xA801
SETTLE_POLL = 0.05
"""Seconds between looks at the receiver's records while waiting for the last instances."""


def move_identifiers(ctx: RetrieveContext, found: Inventory) -> list[Dataset]:
    """Ask as the job asked when nothing is stored yet; else only for the missing instances,
    and for the whole of any series the PACS listed only in part (see :class:`Inventory`)."""
    request = ctx.request
    inventory = found.refs
    missing = [r for r in inventory if r.sop_instance_uid not in ctx.already_stored]
    if len(missing) == len(inventory) and request.level is not Level.IMAGE:
        return [retrieve_identifier(request.level, request.study_uid, request.series_uid)]
    whole = found.capped_series if request.level is not Level.IMAGE else frozenset()
    by_series: dict[str, list[str]] = {}
    for ref in missing:
        if ref.series_uid not in whole:
            by_series.setdefault(ref.series_uid, []).append(ref.sop_instance_uid)
    return [retrieve_identifier(Level.SERIES, request.study_uid, uid) for uid in sorted(whole)] + [
        retrieve_identifier(Level.IMAGE, request.study_uid, series_uid, part)
        for series_uid, uids in by_series.items()
        for part in chunks(uids, UIDS_PER_QUERY)
    ]


def _silent_pacs(timeout: float, completed: int, received: int, where: str,
                 destination: str) -> RetrieveError:
    """The PACS stopped answering a C-MOVE for *timeout* seconds.

    With nothing delivered in the whole attempt (no completed sub-operation, nothing at the
    receiver), the PACS is almost surely stuck opening the connection back: a firewall that
    drops its SYN leaves it connecting until its own timeout, which may be far longer than
    ours. That is ``move-destination`` (``auto`` falls back to the next transport; a retry of
    C-MOVE would hang the same way). Once instances arrived, the way back works: a
    ``timeout``, retried, resuming the job.
    """
    if completed or received:
        return RetrieveError(
            ErrorKind.TIMEOUT,
            f"{where} stopped answering the C-MOVE (no response within {timeout:g} s, after "
            f"{completed} completed sub-operation(s), {received} received); a retry resumes "
            "the job.",
        )
    return RetrieveError(
        ErrorKind.MOVE_DESTINATION,
        f"{where} went silent for {timeout:g} s after the C-MOVE request and delivered "
        f"nothing: the PACS is likely stuck connecting to move destination {destination!r}, "
        "e.g. a firewall or NAT silently drops its connection back to `pacsfetch receiver`. "
        "Make the receiver reachable from the PACS (a port forward or a NodePort/LoadBalancer "
        "Service), or use C-GET or DICOMweb, which need no connection back.",
    )


def _job_has_any(ctx: RetrieveContext, moves: MoveTracker) -> int:
    """Instances the receiver stored for the job, in earlier attempts and this one.

    The job's own records decide whether the way back to the receiver works, not the
    PACS's sub-operation counts, which a failure answer may lack (Orthanc's does): a C-MOVE
    that fails with any of them stored is a PACS stopping part-way, never "moved nothing".
    """
    return len(ctx.already_stored) + moves.collect_now()


class CMoveTransport:
    """C-MOVE to ``pacsfetch receiver``, correlated with the job through move expectations."""

    name = "c-move"

    def retrieve(self, ctx: RetrieveContext) -> RetrieveResult:
        source = ctx.source
        where = f"{source.ae_title}@{source.host}:{source.port}"
        destination = source.move_destination
        if not destination:
            raise RetrieveError(
                ErrorKind.CONFIG,
                f"source {ctx.source_name!r} has no move_destination: set "
                f"sources.{ctx.source_name}.move_destination to the AE title the PACS knows "
                "`pacsfetch receiver` by, or use C-GET.",
            )
        if ctx.moves is None:
            raise RetrieveError(ErrorKind.CONFIG, "C-MOVE needs the broker (Redis) that "
                                "connects workers with `pacsfetch receiver`")
        assert ctx.gate is not None  # RetrieveContext builds one when none is given
        counters = SubOperations()
        moves = ctx.moves
        try:
            # One slot of the source's max_associations, for the planning C-FIND and then
            # the C-MOVE association (one after the other); not held while settling.
            with ctx.gate.acquire():
                found = find_instances(source, ctx.request)
                expected = frozenset(r.sop_instance_uid for r in found.refs)
                # The receiver accepts only what this plan allows (workers/receiver_policy).
                moves.plan(expected, found.capped_series
                           if ctx.request.level is not Level.IMAGE else frozenset())
                try:
                    interrupted = self._moves(ctx, found, moves, counters, where, destination)
                except BaseException:
                    moves.withdraw()
                    raise
        except GateCancelled:
            return RetrieveResult(expected=None, cancelled=True)
        try:
            received = self._settle(moves, counters, source.timeout)
        finally:
            moves.withdraw()
        self._explain(counters, received, where, destination, len(ctx.already_stored))
        self._report_refusals(counters, moves.refused(), destination)
        return RetrieveResult(
            expected=expected,
            problems=counters.problems,
            problem_kind=counters.problem_kind.value if counters.problem_kind else None,
            peer_failed=counters.failed,
            cancelled=counters.cancelled,
            retry=interrupted,
        )

    def _moves(self, ctx: RetrieveContext, found: Inventory, moves: MoveTracker,
               counters: SubOperations, where: str, destination: str) -> bool:
        """The job's C-MOVEs on one association; True when one failed part-way."""
        interrupted = False
        assoc = associate(ctx.source, [(MOVE_MODEL, QUERY_SYNTAXES)], purpose="C-MOVE",
                          source_name=ctx.source_name)
        try:
            model = assoc.context(MOVE_MODEL)
            assert model is not None  # associate() fails when nothing was accepted
            for identifier in move_identifiers(ctx, found):
                interrupted |= self._move(ctx, assoc, model, identifier, moves, counters,
                                          where, destination)
                if counters.cancelled:
                    break
        finally:
            assoc.release()
        return interrupted

    def _move(self, ctx: RetrieveContext, assoc: Association, model: Context,
              identifier: Dataset, moves: MoveTracker, counters: SubOperations, where: str,
              destination: str) -> bool:
        """One C-MOVE: register it with the receiver, follow its responses; True when the
        PACS failed it after part of it arrived (a retry resumes)."""
        msg_id = moves.next_message_id()
        moves.expect(ctx.source.calling_ae_title, msg_id)
        base = (counters.completed, counters.failed, counters.warning)
        seen = base[0]
        received_before = moves.collect_now()

        def pending(command: dict[int, Any]) -> None:
            nonlocal seen
            remaining, completed, failed, warning = sub_operation_counts(command)
            seen = base[0] + completed
            ctx.progress.peer_counts(remaining=remaining, completed=seen,
                                     failed=base[1] + failed, warning=base[2] + warning)
            moves.collect()

        try:
            outcome = c_move(assoc, model, identifier, msg_id, destination, pending=pending,
                             cancelled=ctx.progress.cancelled)
        except PeerTimeout:
            raise _silent_pacs(ctx.source.timeout, seen, moves.collect_now(), where,
                               destination) from None
        except DimseError as exc:
            raise dimse_failure(exc, where, "the C-MOVE") from None
        status = outcome.command
        final_code = outcome.status
        cancel_sent = outcome.cancel_sent
        pending(status)
        _, completed, failed, warning = sub_operation_counts(status)
        counters.completed = base[0] + completed
        counters.failed = base[1] + failed
        counters.warning = base[2] + warning
        delivered = counters.completed + counters.warning - base[0] - base[2]
        if final_code == UNKNOWN_DESTINATION:
            raise RetrieveError(
                ErrorKind.MOVE_DESTINATION,
                f"{where} does not know move destination {destination!r} (status 0xA801): add "
                f"{destination!r} to the PACS's DICOM nodes with the host and port of "
                "`pacsfetch receiver` ([receiver] port), or use C-GET.",
            )
        if final_code == 0xFE00 or cancel_sent:
            counters.cancelled = True
        elif final_code not in (0x0000, 0xB000) and not delivered and not (
                arrived := moves.collect_now() - received_before) and not _job_has_any(ctx, moves):
            # Many PACS (Orthanc among them) answer an unknown destination and a refused
            # connection back with the same generic failure: name both causes.
            comment = status.get(m.ERROR_COMMENT)
            raise RetrieveError(
                ErrorKind.MOVE_DESTINATION,
                f"{where} moved nothing to {destination!r} (status 0x{final_code:04X}"
                f"{status_hint(final_code)}{f': {comment}' if comment else ''}). Either the PACS "
                f"does not know move destination {destination!r}: add it to the PACS with the "
                "host and port of `pacsfetch receiver`; or the PACS could not deliver to it: is "
                "`pacsfetch receiver` running and reachable from the PACS (NAT/firewall)? C-GET "
                "or DICOMweb avoid the connection back.",
            )
        elif final_code not in (0x0000, 0xB000):
            # The PACS's failure answer may lack sub-operation counts (Orthanc's does): then
            # the receiver's records of this job say that part of the study arrived.
            comment = status.get(m.ERROR_COMMENT)
            arrived = delivered or moves.collect_now() - received_before
            counters.problem(
                ErrorKind.PEER_STATUS,
                f"{where} ended a C-MOVE with status 0x{final_code:04X}{status_hint(final_code)}"
                f"{f' ({comment})' if comment else ''} after {arrived} instance(s) of it "
                f"arrived, {_job_has_any(ctx, moves)} stored for the job so far: the PACS "
                "stopped part-way; a retry resumes.",
            )
            return True
        return False

    @staticmethod
    def _settle(moves: MoveTracker, counters: SubOperations, timeout: float) -> int:
        """Wait (at most *timeout*) until the receiver recorded what the PACS says it sent."""
        delivered = counters.completed + counters.warning
        deadline = time.monotonic() + timeout
        received = moves.collect_now()
        while received < delivered and not counters.cancelled and time.monotonic() < deadline:
            time.sleep(SETTLE_POLL)
            received = moves.collect_now()
        return received

    @staticmethod
    def _report_refusals(counters: SubOperations, refused: dict[str, int],
                         destination: str) -> None:
        """Name what the receiver refused for this job: a peer other than the source
        delivering, unplanned instances, second copies with different content."""
        if refused:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(refused.items()))
            counters.problem(ErrorKind.PEER_STATUS, (
                f"the receiver ({destination!r}) refused {sum(refused.values())} instance(s) "
                f"for this job ({reasons}); see its log and pacsfetch_receiver_refusals_total"))

    @staticmethod
    def _explain(counters: SubOperations, received: int, where: str, destination: str,
                 stored_before: int) -> None:
        """Turn what the PACS and the receiver report into an operator's next step."""
        if counters.cancelled:
            return
        if counters.failed and not received and not stored_before:
            raise RetrieveError(
                ErrorKind.MOVE_DESTINATION,
                f"{where} could not deliver any of {counters.failed} instance(s) to move "
                f"destination {destination!r}: is `pacsfetch receiver` running, and is the "
                f"host and port the PACS has for {destination!r} reachable from the PACS "
                "(NAT/firewall)? C-GET or DICOMweb avoid the connection back.",
            )
        delivered = counters.completed + counters.warning
        if received < delivered:
            counters.problem(
                ErrorKind.MOVE_DESTINATION,
                f"{where} reports {delivered} instance(s) delivered to {destination!r} but the "
                f"receiver recorded {received}: does {destination!r} on the PACS point at "
                "`pacsfetch receiver` (another storage SCP may have received them)?",
            )
        if counters.failed:
            counters.problem(
                ErrorKind.PEER_STATUS,
                f"{where} reported {counters.failed} failed C-STORE sub-operation(s) to "
                f"{destination!r} (the receiver refuses instances the job did not ask for)",
            )


@hookimpl
def pacsfetch_transports() -> list[Transport]:
    return [CMoveTransport()]
