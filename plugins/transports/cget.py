"""C-GET: the PACS sends instances back as C-STORE sub-operations on our own association.

No inbound connection is needed, so C-GET works from behind NAT, a firewall or a
Kubernetes pod. The price is negotiation: we must propose a storage presentation context
for every SOP class and transfer syntax the PACS may send, with SCP/SCU role selection
saying that *we* are the storage SCP, inside the 128-context limit of one association.

So a retrieve is planned first: a C-FIND lists the instances (and their SOP classes); the
contexts they need are packed into as few associations as fit; each association asks for
its share at the coarsest level that is exact (the whole request, whole series, or lists
of instances). Instances arrive through the project's own DIMSE engine
(:func:`pacsfetch.plugins.dimse.services.c_get`), written fragment by fragment into spool
files and handed straight to the sink, so memory does not grow with study or instance size. After the transfer, whatever did
not arrive is explained: refused contexts, transfer syntaxes, or the PACS's own failures.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from pacsfetch import hookimpl
from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.gate import GateCancelled, Slot, Waiting
from pacsfetch.models import Level
from pacsfetch.plugins.contracts import RetrieveContext, RetrieveResult, Transport, Verdict
from pacsfetch.plugins.dimse.association import Association, DimseError
from pacsfetch.plugins.dimse.services import (
    MAX_PRESENTATION_CONTEXTS,
    QUERY_SYNTAXES,
    STORE_STATUS,
    StoreHandler,
    SubOperations,
    associate,
    c_get,
    dimse_failure,
    status_hint,
    sub_operation_counts,
    uid_name,
)
from pacsfetch.plugins.transports.query import (
    UIDS_PER_QUERY,
    InstanceRef,
    chunks,
    find_instances,
    retrieve_identifier,
)
from pacsfetch.plugins.transports.sopclasses import candidate_classes
from pacsfetch.pushback import retrieve_pushback

log = logging.getLogger(__name__)

GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"
"""Study Root Query/Retrieve Information Model - GET."""
STORAGE_CONTEXTS_PER_ASSOCIATION = MAX_PRESENTATION_CONTEXTS - 1  # one is the GET model

DEFAULT_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
"""Proposed, one context each, when the PACS does not say what a study holds: a context
per syntax lets the PACS send every instance exactly as stored, without transcoding."""

Context = tuple[str, str]  # (SOP class UID, transfer syntax UID)


@dataclass
class AssociationPlan:
    """The storage contexts of one association and the C-GET identifiers it sends."""

    contexts: list[Context]
    identifiers: list[Dataset]
    instances: list[InstanceRef]
    sizes: list[int]
    """Instances each identifier asks for (as listed by the C-FIND), for progress."""


def _contexts_for(ref: InstanceRef, fallback: Iterable[str]) -> set[Context]:
    return {(ref.sop_class_uid, ts) for ts in (ref.transfer_syntaxes or fallback)}


def plan_associations(
    ctx: RetrieveContext, inventory: list[InstanceRef], syntaxes: Iterable[str],
    capped_series: frozenset[str] = frozenset(), stripes: int = 1,
) -> list[AssociationPlan]:
    """Pack what is still missing into associations of at most 127 storage contexts.

    Instances of unknown SOP class are left out (see :func:`_guess_classes`); their
    presence only stops the plan from asking for whole series or the whole request. A
    series in *capped_series* is asked for whole, however much of it is stored: the PACS
    listed only part of it, so "missing" cannot be known instance by instance.

    With *stripes* > 1 (``associations_per_job``) the identifiers are the units the job's
    associations share out: whole series, or, when there are fewer series than stripes,
    lists of about ``missing / stripes`` instances, so a single large series spreads too.
    """
    syntaxes = tuple(syntaxes)
    request = ctx.request
    missing = [
        r for r in inventory if r.sop_class_uid and (
            r.sop_instance_uid not in ctx.already_stored or r.series_uid in capped_series)
    ]
    by_series: dict[str, list[InstanceRef]] = defaultdict(list)
    for ref in missing:
        by_series[ref.series_uid].append(ref)

    # Units that must share an association: whole series, or per-class slices of a series
    # that alone needs more contexts than fit.
    units: list[tuple[str, list[InstanceRef], set[Context], bool]] = []
    for series_uid, refs in by_series.items():
        needed = set().union(*(_contexts_for(r, syntaxes) for r in refs))
        whole = series_uid in capped_series or len(refs) == sum(
            1 for r in inventory if r.series_uid == series_uid)
        if len(needed) <= STORAGE_CONTEXTS_PER_ASSOCIATION:
            units.append((series_uid, refs, needed, whole))
            continue
        by_class: dict[str, list[InstanceRef]] = defaultdict(list)
        for ref in refs:
            by_class[ref.sop_class_uid].append(ref)
        for class_refs in by_class.values():
            units.append((series_uid, class_refs,
                          set().union(*(_contexts_for(r, syntaxes) for r in class_refs)), False))

    plans: list[tuple[set[Context], list[tuple[str, list[InstanceRef], bool]]]] = []
    for series_uid, refs, needed, whole in units:
        for contexts, members in plans:
            if len(contexts | needed) <= STORAGE_CONTEXTS_PER_ASSOCIATION:
                contexts |= needed
                members.append((series_uid, refs, whole))
                break
        else:
            plans.append((set(needed), [(series_uid, refs, whole)]))

    resumed = len(missing) != len(inventory)
    by_instances = stripes > 1 and sum(len(members) for _, members in plans) < stripes
    per_list = (min(UIDS_PER_QUERY, max(1, -(-len(missing) // stripes))) if by_instances
                else UIDS_PER_QUERY)
    result = []
    for contexts, members in plans:
        instances = [r for _, refs, _ in members for r in refs]
        if len(plans) == 1 and stripes == 1 and not resumed and request.level is not Level.IMAGE:
            # One association covers everything: ask exactly as the job asked.
            identifiers = [retrieve_identifier(request.level, request.study_uid, request.series_uid)]
            sizes = [len(instances)]
        else:
            identifiers, sizes = [], []
            for series_uid, refs, whole in members:
                if whole and request.level is not Level.IMAGE and (
                        not by_instances or series_uid in capped_series):
                    identifiers.append(retrieve_identifier(Level.SERIES, request.study_uid, series_uid))
                    sizes.append(len(refs))
                else:
                    uids = [r.sop_instance_uid for r in refs]
                    for part in chunks(uids, per_list):
                        identifiers.append(
                            retrieve_identifier(Level.IMAGE, request.study_uid, series_uid, part))
                        sizes.append(len(part))
        result.append(AssociationPlan(sorted(contexts), identifiers, instances, sizes))
    return result


@dataclass
class _Counters(SubOperations):
    failed_uids: list[str] = field(default_factory=list)
    received: set[str] = field(default_factory=set)
    """SOP Instance UIDs the sink stored or already had, this attempt."""


def _on_c_store(ctx: RetrieveContext, counters: _Counters) -> StoreHandler:
    accept = ctx.sink.accept
    received = counters.received
    kept = (Verdict.STORED, Verdict.DUPLICATE)

    def handler(path: Path, sop_class_uid: str, sop_instance_uid: str) -> int:
        verdict = accept(path, sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid)
        if verdict in kept:
            received.add(sop_instance_uid)
        return STORE_STATUS[verdict]

    return handler


def _open(ctx: RetrieveContext, contexts: Iterable[Context]) -> Association:
    """An association proposing the C-GET model and *contexts*, with the storage SCP role
    for each of their SOP classes."""
    contexts = list(contexts)
    classes = sorted({c for c, _ in contexts})
    return associate(
        ctx.source, [(GET_MODEL, QUERY_SYNTAXES)] + [(c, (t,)) for c, t in contexts],
        roles={c: (False, True) for c in classes}, purpose="C-GET",
        source_name=ctx.source_name,
    )


def _check_negotiation(
    assoc: Association, plan: AssociationPlan, counters: _Counters, where: str, source_ae: str
) -> None:
    """Explain refused contexts now; fail at once when the PACS refuses C-GET itself."""
    accepted = {(cx.abstract_syntax, cx.transfer_syntax) for cx in assoc.contexts.values()
                if cx.scp}
    _require_get_model(assoc, where, source_ae)
    usable_classes = {cls for cls, _ in accepted}
    refused_classes = sorted({cls for cls, _ in plan.contexts} - usable_classes)
    if refused_classes:
        count = sum(1 for r in plan.instances if r.sop_class_uid in refused_classes)
        names = ", ".join(uid_name(c) for c in refused_classes)
        counters.problem(
            ErrorKind.NEGOTIATION,
            f"{where} refused every storage presentation context (with SCP role selection) "
            f"for {names}: the {count} instance(s) of these SOP classes cannot come by C-GET. "
            "Allow these SOP classes and SCP/SCU role selection for this AE on the PACS, "
            "or use C-MOVE.",
        )
    exact = [
        r for r in plan.instances
        if r.transfer_syntaxes and r.sop_class_uid in usable_classes
        and not any((r.sop_class_uid, ts) in accepted for ts in r.transfer_syntaxes)
    ]
    if exact:
        syntaxes = ", ".join(sorted({uid_name(ts) for r in exact for ts in r.transfer_syntaxes}))
        counters.problem(
            ErrorKind.TRANSFER_SYNTAX,
            f"{where} accepted none of the transfer syntaxes {len(exact)} instance(s) are "
            f"stored in ({syntaxes}); they arrive only if the PACS transcodes them.",
        )


def _require_get_model(assoc: Association, where: str, source_ae: str) -> None:
    if assoc.context(GET_MODEL) is None:
        assoc.release()
        raise RetrieveError(
            ErrorKind.NEGOTIATION,
            f"{where} refused the Study Root C-GET presentation context: it does not offer "
            f"C-GET to {source_ae!r}. Enable C-GET for this AE on the PACS, or retrieve with "
            "C-MOVE or DICOMweb.",
        )


@dataclass
class _Unit:
    """One C-GET identifier and the association plan whose contexts it needs."""

    plan: AssociationPlan
    identifier: Dataset
    size: int
    """Instances it asks for, as the C-FIND listed them (progress only)."""


def _units(plans: list[AssociationPlan]) -> list[_Unit]:
    return [_Unit(plan, identifier, size) for plan in plans
            for identifier, size in zip(plan.identifiers, plan.sizes, strict=True)]


class _Stripes:
    """One job's C-GETs shared out over up to ``associations_per_job`` associations.

    Each stripe is a thread (the first is the caller's) with its own association and its
    own slot from the gate, so the fleet-wide cap counts every association; it takes the
    next unit (a series, or a list of instances) until none is left. All stripes feed the
    same sink, which is not thread-safe: calls into the sink and the progress reporter go
    through one lock, held for one instance's store (or the progress it flushes), never while
    reading from the PACS.

    A failure in the middle of a C-GET stops the other stripes after their current unit
    and is the job's error. A stripe that cannot open its association while another works
    just ends, its unit left to the others (a PACS may allow this AE fewer associations
    than configured); only when no stripe could finish the work is that failure the job's.
    A *tentative* run guesses SOP classes (see :func:`_guess_classes`): sub-operations it
    fails are expected and are neither reported nor counted.
    """

    def __init__(self, ctx: RetrieveContext, counters: _Counters, handler: StoreHandler,
                 where: str, units: list[_Unit], *, width: int = 1, later: int = 0,
                 tentative: bool = False) -> None:
        assert ctx.gate is not None  # RetrieveContext builds one when none is given
        self.ctx = ctx
        self.gate = ctx.gate
        self.counters = counters
        self.where = where
        self.tentative = tentative
        self.lock = threading.Lock()
        self.units = deque(units)
        self.queued = sum(u.size for u in units) + later
        self.live: dict[int, tuple[int | None, int, int, int]] = {}
        """Sub-operation counts of each stripe's C-GET in progress."""
        self.width = max(1, min(width, len(units)))
        self.working = 0
        """Stripes holding an association: the job waits for a slot only while none does."""
        self.failures: list[BaseException] = []
        self.open_failures: list[RetrieveError] = []
        self.negotiated: set[int] = set()
        self._waiting_shown = False
        self._cancelled = ctx.progress.cancelled
        self._peer_counts = ctx.progress.peer_counts
        self.handler = self._locked_handler(handler)

    def _locked_handler(self, handler: StoreHandler) -> StoreHandler:
        lock = self.lock

        def locked(path: Path, sop_class_uid: str, sop_instance_uid: str) -> int:
            with lock:
                return handler(path, sop_class_uid, sop_instance_uid)

        return locked

    def cancelled(self) -> bool:
        with self.lock:
            if not self.counters.cancelled and self._cancelled():
                self.counters.cancelled = True
            return self.counters.cancelled

    # -- running -------------------------------------------------------------------------
    def run(self) -> None:
        """Run every unit; raises the job's error (see the class)."""
        threads = [threading.Thread(target=self._stripe, args=(n,), daemon=True,
                                    name=f"c-get-stripe-{n}") for n in range(1, self.width)]
        for thread in threads:
            thread.start()
        try:
            self._stripe(0)
        finally:
            for thread in threads:
                thread.join()
        if self.failures:
            raise self.failures[0]
        if self.units and self.open_failures and not self.counters.cancelled:
            raise self.open_failures[0]

    def _stop(self) -> bool:
        """Whether stripes should take no further unit."""
        return bool(self.failures) or self.cancelled() or not self.units

    def _stripe(self, n: int) -> None:
        slot: Slot | None = None
        assoc: Association | None = None
        plan: AssociationPlan | None = None
        msg_ids = itertools.count(1)
        store = self.handler
        try:
            while True:
                if slot is None:
                    slot = self._acquire()
                    if slot is None:
                        return
                with self.lock:
                    unit = self.units.popleft() if self.units and not self.failures else None
                if unit is None or self.cancelled():
                    return
                if assoc is not None and unit.plan is not plan:
                    assoc.release()
                    assoc = None
                if assoc is None:
                    assoc = self._open(unit)
                    if assoc is None:
                        return
                    plan, msg_ids = unit.plan, itertools.count(1)
                    store = self._rated(assoc)
                self._get(n, assoc, unit, next(msg_ids), store)
                if slot.should_yield() is not None:  # bulk work: a window closed, or a job waits
                    assoc.release()
                    assoc = None
                    slot.release()
                    slot = None
                    self._holding(-1)
        except BaseException as exc:
            with self.lock:
                self.failures.append(exc)
            if assoc is not None and assoc.is_established:
                assoc.abort()
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()
            if slot is not None:
                slot.release()
                self._holding(-1)

    def _acquire(self) -> Slot | None:
        """A slot for one more association, or None when the work is done or cancelled
        before one came free."""
        try:
            slot = self.gate.gate.acquire(self.gate.source_name, bulk=self.gate.bulk,
                                          on_wait=self._on_wait, cancelled=self._stop)
        except GateCancelled:
            return None
        self._holding(+1)
        return slot

    def _on_wait(self, reason: Waiting | None) -> None:
        on_wait = self.gate.on_wait
        with self.lock:
            if reason is not None and not self.working and not self._waiting_shown:
                self._waiting_shown = True
                if on_wait is not None:
                    on_wait(reason)

    def _holding(self, change: int) -> None:
        on_wait = self.gate.on_wait
        with self.lock:
            self.working += change
            if change > 0 and self._waiting_shown:
                self._waiting_shown = False
                if on_wait is not None:
                    on_wait(None)

    def _open(self, unit: _Unit) -> Association | None:
        """The association for *unit*'s plan; None when this stripe should end instead."""
        source = self.ctx.source
        try:
            assoc = _open(self.ctx, unit.plan.contexts)
        except RetrieveError as exc:
            if exc.kind in (ErrorKind.NEGOTIATION, ErrorKind.CONFIG, ErrorKind.TLS):
                raise  # every association would meet it
            with self.lock:
                self.units.appendleft(unit)
                self.open_failures.append(exc)
                others = self.working - 1
            if others:
                log.info("an extra C-GET association failed; the job goes on with the "
                         "others", extra={"job_id": self.ctx.job_id, "error_kind": exc.kind.value,
                                          "associations": others})
            return None
        with self.lock:
            first = id(unit.plan) not in self.negotiated
            self.negotiated.add(id(unit.plan))
        if self.tentative or not first:
            _require_get_model(assoc, self.where, source.calling_ae_title)
        else:
            with self.lock:
                _check_negotiation(assoc, unit.plan, self.counters, self.where,
                                   source.calling_ae_title)
        return assoc

    def _rated(self, assoc: Association) -> StoreHandler:
        """The store handler for *assoc*, held to the source's ``max_mb_per_second``: after
        each instance it draws what the association received from the fleet's budget,
        sleeping (before the C-STORE-RSP, so the PACS waits) while the source is over it."""
        limiter = self.gate.rate()
        if limiter is None:
            return self.handler
        handler, consume = self.handler, limiter.consume
        counted = 0

        def rated(path: Path, sop_class_uid: str, sop_instance_uid: str) -> int:
            nonlocal counted
            status = handler(path, sop_class_uid, sop_instance_uid)
            consume(assoc.received_bytes - counted)
            counted = assoc.received_bytes
            return status

        return rated

    def _get(self, n: int, assoc: Association, unit: _Unit, msg_id: int,
             store: StoreHandler) -> None:
        """One C-GET on stripe *n*'s association, its progress merged with the others'."""
        model = assoc.context(GET_MODEL)
        assert model is not None  # checked by _require_get_model
        counters, live, lock = self.counters, self.live, self.lock
        with lock:
            self.queued -= unit.size
            live[n] = (unit.size, 0, 0, 0)

        def pending(command: dict[int, Any]) -> None:
            counts = sub_operation_counts(command)
            with lock:
                live[n] = counts
                self._report()

        try:
            outcome = c_get(assoc, model, unit.identifier, msg_id,
                            spool_dir=self.ctx.sink.spool_dir, store=store,
                            pending=pending, cancelled=self.cancelled)
        except DimseError as exc:
            raise dimse_failure(exc, self.where, f"C-GET (after {len(counters.received)} "
                                "instance(s) this attempt; a retry resumes the job)") from None
        final_code = outcome.status
        _, completed, failed, warning = sub_operation_counts(outcome.command)
        with lock:
            del live[n]
            counters.completed += completed
            counters.failed += 0 if self.tentative else failed
            counters.warning += warning
            counters.failed_uids += outcome.failed_uids
            if final_code == 0xFE00 or outcome.cancel_sent:
                counters.cancelled = True
            elif final_code not in (0x0000, 0xB000) and not self.tentative:
                counters.problem(
                    ErrorKind.PEER_STATUS,
                    f"{self.where} ended a C-GET with status 0x{final_code:04X}"
                    f"{status_hint(final_code)}.",
                )
            self._report()
        # Sub-operations that failed were attempted (often refused by our own store): only a
        # PACS that attempted none was out of resources before it began.
        attempted = completed + warning + failed
        busy = retrieve_pushback(self.where, "C-GET", final_code, attempted, 0)
        if busy is not None and not self.tentative and not outcome.cancel_sent:
            raise busy  # out of resources before sending any: retry later, more slowly

    def _report(self) -> None:
        """Progress over every stripe (the lock held)."""
        counters = self.counters
        remaining: int | None = self.queued
        completed, failed, warning = counters.completed, counters.failed, counters.warning
        for left, done, bad, warned in self.live.values():
            remaining = None if remaining is None or left is None else remaining + left
            completed += done
            failed += 0 if self.tentative else bad
            warning += warned
        self._peer_counts(remaining=remaining, completed=completed, failed=failed,
                          warning=warning)


def _guess_classes(
    ctx: RetrieveContext, unknown: list[InstanceRef], syntaxes: tuple[str, ...] | list[str],
    counters: _Counters, handler: StoreHandler, where: str,
) -> None:
    """Fetch instances whose SOP class the PACS did not say, in rounds of guesses.

    First, per Modality, the classes usual for it, each with every transfer syntax: a PACS
    that picks the context matching how it stores an instance sends it unchanged. Then one
    association per transfer syntax with every common storage class in that syntax only,
    for PACS (dcmqrscp among them) that use the first context accepted for a class whatever
    its syntax. Each round asks, at IMAGE level, only for what has not arrived; the PACS
    fails the rest, which the next round asks for again.
    """
    syntaxes = tuple(syntaxes)
    per_association = max(1, STORAGE_CONTEXTS_PER_ASSOCIATION // len(syntaxes))
    rounds: list[tuple[list[InstanceRef], list[Context]]] = []
    by_modality: dict[str | None, list[InstanceRef]] = defaultdict(list)
    for ref in unknown:
        by_modality[ref.modality].append(ref)
    for modality, refs in by_modality.items():
        likely = candidate_classes(modality)[:per_association]
        rounds.append((refs, [(c, t) for c in likely for t in syntaxes]))
    every_class = candidate_classes(None)[:STORAGE_CONTEXTS_PER_ASSOCIATION]
    rounds += [(unknown, [(c, t) for c in every_class]) for t in syntaxes]

    tried = 0
    for refs, contexts in rounds:
        missing = [r for r in refs if r.sop_instance_uid not in counters.received]
        if not missing or counters.cancelled:
            continue
        tried += 1
        _tentative_round(ctx, missing, contexts, counters, handler, where)
    never = [r for r in unknown if r.sop_instance_uid not in counters.received]
    if never and not counters.cancelled:
        modalities = ", ".join(sorted({r.modality or "unknown" for r in never}))
        counters.failed += len(never)
        counters.problem(
            ErrorKind.NEGOTIATION,
            f"{where} does not return SOP Class UID in C-FIND, and sent none of {len(never)} "
            f"instance(s) (modality {modalities}) under any of the common storage SOP classes "
            f"and transfer syntaxes proposed in {tried} association(s): they are of a class "
            "pacsfetch does not guess. Retrieve them with C-MOVE or DICOMweb.",
        )


def _tentative_round(
    ctx: RetrieveContext, missing: list[InstanceRef], contexts: list[Context],
    counters: _Counters, handler: StoreHandler, where: str,
) -> None:
    by_series: dict[str, list[str]] = defaultdict(list)
    for ref in missing:
        by_series[ref.series_uid].append(ref.sop_instance_uid)
    identifiers, sizes = [], []
    for series_uid, uids in by_series.items():
        for part in chunks(uids, UIDS_PER_QUERY):
            identifiers.append(retrieve_identifier(Level.IMAGE, ctx.request.study_uid,
                                                   series_uid, part))
            sizes.append(len(part))
    plan = AssociationPlan(contexts, identifiers, missing, sizes)
    _Stripes(ctx, counters, handler, where, _units([plan]), tentative=True).run()


class CGetTransport:
    """C-GET with storage contexts and SCP role selection proposed per study content."""

    name = "c-get"

    def retrieve(self, ctx: RetrieveContext) -> RetrieveResult:
        source = ctx.source
        where = f"{source.ae_title}@{source.host}:{source.port}"
        assert ctx.gate is not None  # RetrieveContext builds one when none is given
        try:
            with ctx.gate.acquire():
                found = find_instances(source, ctx.request)
        except GateCancelled:
            return RetrieveResult(expected=None, cancelled=True)
        inventory = found.refs
        expected = frozenset(r.sop_instance_uid for r in inventory)
        syntaxes = source.transfer_syntaxes or DEFAULT_TRANSFER_SYNTAXES
        width = min(source.associations_per_job, ctx.gate.gate.limit(ctx.source_name,
                                                                      ctx.gate.bulk))
        plans = plan_associations(ctx, inventory, syntaxes, found.capped_series, width)
        counters = _Counters()
        handler = _on_c_store(ctx, counters)
        unknown = [r for r in inventory
                   if not r.sop_class_uid and r.sop_instance_uid not in ctx.already_stored]
        _Stripes(ctx, counters, handler, where, _units(plans), width=width,
                 later=len(unknown)).run()
        if unknown and not counters.cancelled:
            _guess_classes(ctx, unknown, syntaxes, counters, handler, where)
        if counters.failed and not counters.problems:
            counters.problem(
                ErrorKind.PEER_STATUS,
                f"{where} reported {counters.failed} failed C-STORE sub-operation(s)"
                + (f" (e.g. SOP Instance {counters.failed_uids[0]})" if counters.failed_uids else ""),
            )
        return RetrieveResult(
            expected=expected,
            problems=counters.problems,
            problem_kind=counters.problem_kind.value if counters.problem_kind else None,
            peer_failed=counters.failed,
            cancelled=counters.cancelled,
        )


@hookimpl
def pacsfetch_transports() -> list[Transport]:
    return [CGetTransport()]
