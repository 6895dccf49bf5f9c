"""The one way into prefetching: the API, the HL7 listener and the worklist poll all call here.

Keeping the rule match, the order's duplicate suppression and the counting in one place
means an HL7 order and the worklist entry it produced meet in the same Redis key and make
one prefetch, whichever arrives first, and every trigger is counted and audited alike.

*trigger* (``api``, ``hl7``, ``worklist:NAME``) is what asked, a bounded metric label;
*created_by* is who: the API token's name, or pacsfetch's own service names.
"""

from __future__ import annotations

from datetime import timedelta

from pacsfetch import audit
from pacsfetch.config import Config
from pacsfetch.metrics import PREFETCH_REQUESTS
from pacsfetch.prefetch import FINAL, PrefetchRecord, PrefetchRequest, PrefetchStore
from pacsfetch.prefetch_rules import match_rule


class NoRule(Exception):
    """No prefetch rule applies to the exam (or the named rule does not exist)."""


def trigger_of(trigger: str) -> str:
    """The bounded metric label of a trigger (``worklist:NAME`` counts as ``worklist``)."""
    return trigger.partition(":")[0]


def audit_prefetch(config: Config, event: str, record: PrefetchRecord, caller: str) -> None:
    """One audit line; the rule, sources and stores say what may be fetched (no patient ID,
    as everywhere outside the records themselves)."""
    rule = config.prefetch.rules.get(record.rule.name) if record.rule else None
    audit.write(config, [{
        "event": event, "caller": caller, "created_by": record.created_by,
        "prefetch_id": record.id, "trigger": record.trigger,
        "rule": record.rule.name if record.rule else None,
        "sources": list(rule.sources) if rule else [], "stores": list(rule.stores) if rule else [],
        "status": record.status.value}])


def request_prefetch(store: PrefetchStore, config: Config, request: PrefetchRequest,
                     trigger: str, created_by: str,
                     renew: bool = True) -> tuple[PrefetchRecord, bool]:
    """Schedule a prefetch for *request*; (record, created). A request for an order that
    already has a live prefetch returns that one with ``created`` False; so does one for a
    cancelled order unless *renew* (an explicit new order, not a repeat or a poll)."""
    current = request.current
    match = match_rule(config.prefetch.rules, current.modality, current.study_description,
                       request.rule)
    label = trigger_of(trigger)
    if match is None:
        PREFETCH_REQUESTS.labels(label, "no-rule").inc()
        if request.rule is not None:
            raise NoRule(f"no rule {request.rule!r} in [prefetch.rules]")
        raise NoRule(f"no [prefetch.rules] entry applies to a {current.modality} exam"
                     + (" with that description" if current.study_description else ""))
    rule = config.prefetch.rules[match.name]
    record, created = store.create(
        request, rule=match, lead=timedelta(minutes=rule.lead_minutes),
        suppress=timedelta(minutes=rule.suppress_minutes), trigger=trigger,
        created_by=created_by, renew=renew)
    PREFETCH_REQUESTS.labels(label, "accepted" if created else "duplicate").inc()
    if created:
        audit_prefetch(config, "prefetch.create", record, created_by)
    return record, created


def cancel_prefetch(store: PrefetchStore, config: Config, request: PrefetchRequest,
                    trigger: str, caller: str, reason: str) -> PrefetchRecord | None:
    """Cancel the live prefetch of the order *request* names; None when there is none."""
    record = store.find_order(request)
    if record is None or record.status in FINAL:
        return None
    PREFETCH_REQUESTS.labels(trigger_of(trigger), "cancelled").inc()
    cancelled = store.cancel(record.id, reason)
    audit_prefetch(config, "prefetch.cancel", cancelled, caller)
    return cancelled
