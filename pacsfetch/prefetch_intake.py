"""The one way into prefetching: the API, the HL7 listener and the worklist poll all call here.

Keeping the rule match, the order's duplicate suppression and the counting in one place
means an HL7 order and the worklist entry it produced meet in the same Redis key and make
one prefetch, whichever arrives first, and every trigger is counted alike.
"""

from __future__ import annotations

from datetime import timedelta

from pacsfetch.config import Config
from pacsfetch.metrics import PREFETCH_REQUESTS
from pacsfetch.prefetch import FINAL, PrefetchRecord, PrefetchRequest, PrefetchStore
from pacsfetch.prefetch_rules import match_rule


class NoRule(Exception):
    """No prefetch rule applies to the exam (or the named rule does not exist)."""


def trigger_of(created_by: str) -> str:
    """The bounded metric label of a trigger (``worklist:NAME`` counts as ``worklist``)."""
    return created_by.partition(":")[0]


def request_prefetch(store: PrefetchStore, config: Config, request: PrefetchRequest,
                     created_by: str) -> tuple[PrefetchRecord, bool]:
    """Schedule a prefetch for *request*; (record, created). A request for an order that
    already has a live prefetch returns that one with ``created`` False."""
    current = request.current
    match = match_rule(config.prefetch.rules, current.modality, current.study_description,
                       request.rule)
    trigger = trigger_of(created_by)
    if match is None:
        PREFETCH_REQUESTS.labels(trigger, "no-rule").inc()
        if request.rule is not None:
            raise NoRule(f"no rule {request.rule!r} in [prefetch.rules]")
        raise NoRule(f"no [prefetch.rules] entry applies to a {current.modality} exam"
                     + (" with that description" if current.study_description else ""))
    rule = config.prefetch.rules[match.name]
    record, created = store.create(
        request, rule=match, lead=timedelta(minutes=rule.lead_minutes),
        suppress=timedelta(minutes=rule.suppress_minutes), created_by=created_by)
    PREFETCH_REQUESTS.labels(trigger, "accepted" if created else "duplicate").inc()
    return record, created


def cancel_prefetch(store: PrefetchStore, request: PrefetchRequest, created_by: str,
                    reason: str) -> PrefetchRecord | None:
    """Cancel the live prefetch of the order *request* names; None when there is none."""
    record = store.find_order(request)
    if record is None or record.status in FINAL:
        return None
    PREFETCH_REQUESTS.labels(trigger_of(created_by), "cancelled").inc()
    return store.cancel(record.id, reason)
