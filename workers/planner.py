"""Planning one migration: C-FIND the source window by window into the durable plan.

Runs on a thread of the scheduler's leader (see :mod:`pacsfetch.workers.migrate`). It holds
one bulk association slot of the source (so it keeps to ``max_associations``, leaves the
reserved slots to prefetch and interactive work, and opens nothing outside the source's
time windows), hands the slot back when told to yield, and records each answered window's
studies together with the cursor, so a planner stopped at any point resumes where it was.
"""

from __future__ import annotations

import logging
import threading

from pynetdicom.presentation import build_context

from pacsfetch.config import Config
from pacsfetch.errors import RetrieveError
from pacsfetch.gate import AssociationGate, GateCancelled, Slot
from pacsfetch.migrations import MigrationRequest, MigrationStore, StudyRow, StudyState
from pacsfetch.plugins.dimse.legacy import associate
from pacsfetch.plugins.plan import PlanCursor, plan
from pacsfetch.plugins.transports.query import FIND_MODEL, find_matches

log = logging.getLogger(__name__)


class PlanStopped(Exception):
    """The migration was paused or cancelled, or the planner told to stop."""


def run_planning(config: Config, store: MigrationStore, gate: AssociationGate, mig_id: str,
                 stop: threading.Event) -> None:
    """Plan *mig_id* to the end (or until stopped); raises :class:`RetrieveError` when the
    source cannot be asked (the caller retries later: the cursor keeps the progress)."""
    fields = store.fields(mig_id)
    request = MigrationRequest.model_validate_json(fields["request"])
    source = config.sources[request.source]
    where = f"{source.ae_title}@{source.host}:{source.port}"
    cursor = PlanCursor.loads(fields.get("plan_cursor"))

    def halted() -> bool:
        if stop.is_set():
            return True
        flags = store.client.hmget(store.key(mig_id), "paused", "cancel")
        return "1" in flags

    slot: Slot | None = None
    assoc = None
    try:
        def find(identifier):  # type: ignore[no-untyped-def]
            nonlocal slot, assoc
            if slot is not None and slot.should_yield() is not None:
                _close(assoc)
                assoc = None
                slot.release()
                slot = None
            if halted():
                raise PlanStopped(mig_id)
            if slot is None:
                slot = gate.acquire(request.source, bulk=True, cancelled=halted)
            if assoc is None or not assoc.is_established:
                assoc = associate(source, [build_context(FIND_MODEL)], purpose="C-FIND",
                                  source_name=request.source)
            return find_matches(assoc, identifier, where, source.max_results)

        for found, position in plan(find, request.filter, cursor):
            rows = [StudyRow(s.study_uid, StudyState.PLANNED, s.study_date or "",
                             s.instance_count) for s in found]
            store.add_studies(mig_id, rows, position.dumps())
    except (PlanStopped, GateCancelled):
        return
    finally:
        _close(assoc)
        if slot is not None:
            slot.release()
    note = None
    if cursor.incomplete:
        note = (f"planning: {cursor.incomplete} one-minute window(s) still capped by the "
                "PACS; studies in them may be missing from the plan (raise its C-FIND limit)")
    store.finish_planning(mig_id, note)
    log.info("migration planned", extra={"migration": mig_id,
                                         "studies": store.get(mig_id).studies.planned})


def _close(assoc) -> None:  # type: ignore[no-untyped-def]
    if assoc is not None and assoc.is_established:
        try:
            assoc.release()
        except RetrieveError:
            pass
