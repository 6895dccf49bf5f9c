"""Prefetch on the worker and in the scheduler: search, choose, submit, watch.

The worker task ``pacsfetch.prefetch`` runs one due request: it claims it (a repeated
delivery does nothing), asks each of the rule's sources for the patient's studies with the
shared study search (:func:`pacsfetch.plugins.find.find_studies`), lets the rule decide on
every candidate, skips a chosen prior that every destination store already holds in full,
and submits the rest as ordinary retrieve jobs (origin ``prefetch``, the rule's priority)
through :meth:`JobStore.create_or_join`, so a study a migration is already moving is
fetched once and its job becomes as urgent as the prefetch.

The scheduler's duties move due requests from the schedule to the queue (each exactly
once: a Redis script pops it) and finish requests whose jobs have all ended, recording
how long before the exam the priors were in place.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

from celery import Celery
from pydantic import ValidationError
from pydicom.dataset import Dataset

from pacsfetch.config import Config
from pacsfetch.errors import RetrieveError
from pacsfetch.jobstore import JobNotFound, JobStore
from pacsfetch.metrics import PREFETCH_LEAD_TIME, PREFETCH_PRIORS, PREFETCH_REQUESTS
from pacsfetch.models import JobRequest, JobStatus, Level
from pacsfetch.plugins.dimse.services import QUERY_SYNTAXES, associate
from pacsfetch.plugins.find import find_studies
from pacsfetch.plugins.transports.query import FIND_MODEL, find_matches
from pacsfetch.plugins.worklist import find_worklist
from pacsfetch.prefetch import (
    CurrentExam,
    PrefetchRecord,
    PrefetchRequest,
    PrefetchStatus,
    PrefetchStore,
)
from pacsfetch.prefetch_intake import NoRule, request_prefetch, trigger_of
from pacsfetch.prefetch_rules import (
    Candidate,
    Decision,
    PrefetchRule,
    WorklistConfig,
    choose_priors,
)
from pacsfetch.queue import PREFETCH_TASK, enqueue_prefetches, enqueue_retrieves, make_celery
from pacsfetch.retention import retention_seconds
from pacsfetch.studyquery import StudyQuery
from pacsfetch.tokens import SCHEDULER
from pacsfetch.workers.inventory import held_by_all
from pacsfetch.workers.scheduler import Duty

log = logging.getLogger(__name__)

MAX_STUDIES_PER_PATIENT = 1000


def _now() -> datetime:
    return datetime.now(UTC)


def _body_parts(config: Config, source_name: str, study_uids: list[str]) -> dict[str, list[str]]:
    """BodyPartExamined of each study's series (a series-level attribute), where returned."""
    source = config.sources[source_name]
    where = f"{source.ae_title}@{source.host}:{source.port}"
    found: dict[str, list[str]] = {}
    assoc = associate(source, [(FIND_MODEL, QUERY_SYNTAXES)], purpose="C-FIND",
                      source_name=source_name)
    try:
        for study_uid in study_uids:
            query = Dataset()
            query.QueryRetrieveLevel = "SERIES"
            query.StudyInstanceUID = study_uid
            query.SeriesInstanceUID = ""
            query.BodyPartExamined = ""
            matches, _ = find_matches(assoc, query, where, source.max_results)
            parts = sorted({str(m.get("BodyPartExamined", "")).upper() for m in matches} - {""})
            if parts:
                found[study_uid] = parts
    finally:
        if assoc.is_established:
            assoc.release()
    return found


def search_candidates(config: Config, rule: PrefetchRule, record: PrefetchRecord) -> tuple[
        list[Candidate], list[str]]:
    """Every study of the patient the rule's sources list, in source order, and the
    problems of sources that could not be searched."""
    request = record.request
    candidates: list[Candidate] = []
    problems: list[str] = []
    for name in rule.sources:
        try:
            found = find_studies(config.sources[name],
                                 StudyQuery(PatientID=request.patient_id,
                                            limit=MAX_STUDIES_PER_PATIENT), name)
            parts = (_body_parts(config, name, [s.study_uid for s in found.items])
                     if rule.prior_body_parts else {})
        except RetrieveError as exc:
            problems.append(f"source {name}: {exc.message}")
            continue
        for study in found.items:
            if (request.issuer_of_patient_id and study.issuer_of_patient_id
                    and study.issuer_of_patient_id != request.issuer_of_patient_id):
                continue  # another patient with the same ID from another issuer
            candidates.append(Candidate(
                study_uid=study.study_uid, source=name, study_date=study.study_date,
                modalities=study.modalities, description=study.study_description,
                body_parts=parts.get(study.study_uid) if rule.prior_body_parts else None,
                accession_number=study.accession_number, instance_count=study.instance_count))
    return candidates, problems


def already_held(config: Config, rule: PrefetchRule, candidate: Candidate) -> bool:
    """Whether every destination store holds the whole prior already (never fetch twice)."""
    return held_by_all(config, rule.stores, candidate.study_uid, candidate.instance_count or 0)


def run_prefetch(config: Config, store: PrefetchStore, jobs: JobStore, celery: Celery,
                 prefetch_id: str, holder: str, today: date | None = None) -> None:
    """Search, choose and submit one due request (see the module docstring)."""
    if not store.claim(prefetch_id, holder):
        log.info("prefetch already claimed or not due", extra={"prefetch_id": prefetch_id})
        return
    record = store.get(prefetch_id)
    rule = config.prefetch.rules.get(record.rule.name) if record.rule else None
    if rule is None:
        _fail(store, record, "its rule is no longer in the configuration")
        return
    candidates, problems = search_candidates(config, rule, record)
    if problems and len(problems) == len(rule.sources):
        _fail(store, record, "; ".join(problems))
        return
    decided = choose_priors(rule, candidates, today or _now().date(),
                            record.request.current.accession_number)
    for index, cand in enumerate(decided):
        if cand.decision is Decision.CHOSEN and already_held(config, rule, cand):
            decided[index] = cand.model_copy(update={
                "decision": Decision.IN_PLACE,
                "reason": cand.reason + "; every store already holds it: not fetched again"})
    for cand in decided:
        PREFETCH_PRIORS.labels(cand.decision.value).inc()
    store.set_candidates(prefetch_id, decided)
    chosen = [c for c in decided if c.decision is Decision.CHOSEN]
    note = "; ".join(problems) or None
    if not chosen:
        _done(store, store.get(prefetch_id), _now(), from_status=PrefetchStatus.SEARCHING,
              error=note)
        return
    if not store.transition(prefetch_id, PrefetchStatus.FETCHING, [PrefetchStatus.SEARCHING],
                            error=note):
        log.info("prefetch cancelled while searching", extra={"prefetch_id": prefetch_id})
        return
    to_queue: list[tuple[str, int]] = []
    for index, cand in enumerate(decided):
        if cand.decision is not Decision.CHOSEN:
            continue
        joined = jobs.create_or_join(JobRequest(
            source=cand.source, level=Level.STUDY, study_uid=cand.study_uid,
            stores=list(rule.stores), priority=rule.priority), origin="prefetch",
            created_by=record.created_by)
        if not joined.joined or joined.requeue:
            to_queue.append((joined.record.id, joined.record.request.priority))
        decided[index] = cand.model_copy(update={"job_id": joined.record.id,
                                                 "job_status": joined.record.status.value})
    store.set_candidates(prefetch_id, decided)
    if to_queue:
        enqueue_retrieves(celery, to_queue)
    log.info("prefetch submitted", extra={"prefetch_id": prefetch_id, "jobs": len(to_queue),
                                          "chosen": len(chosen)})


def _fail(store: PrefetchStore, record: PrefetchRecord, reason: str) -> None:
    if store.transition(record.id, PrefetchStatus.FAILED,
                        [PrefetchStatus.SEARCHING, PrefetchStatus.FETCHING], error=reason,
                        finished_at=_now().isoformat()):
        PREFETCH_REQUESTS.labels(trigger_of(record.trigger), "failed").inc()


def _done(store: PrefetchStore, record: PrefetchRecord, in_place: datetime,
          from_status: PrefetchStatus, error: str | None = None,
          status: PrefetchStatus = PrefetchStatus.DONE) -> None:
    scheduled = record.request.current.scheduled_at
    lead = (scheduled - in_place).total_seconds() if scheduled else None
    if store.transition(record.id, status, [from_status], error=error,
                        finished_at=_now().isoformat(), in_place_at=in_place.isoformat(),
                        lead_seconds=repr(lead) if lead is not None else None):
        PREFETCH_REQUESTS.labels(trigger_of(record.trigger), status.value).inc()
        if lead is not None and status is PrefetchStatus.DONE:
            PREFETCH_LEAD_TIME.observe(lead)


def watch_fetching(store: PrefetchStore, jobs: JobStore) -> None:
    """Finish requests whose retrieve jobs have all ended: done when each succeeded."""
    for prefetch_id in store.fetching():
        record = store.get(prefetch_id)
        chosen = [c for c in record.candidates if c.decision is Decision.CHOSEN]
        if not chosen or any(c.job_id is None for c in chosen):
            continue  # still being submitted
        try:
            finished = {c.job_id: jobs.get(c.job_id) for c in chosen if c.job_id}
        except JobNotFound as exc:
            _fail(store, record, f"retrieve job {exc} vanished")
            continue
        if not all(job.status.is_final for job in finished.values()):
            continue
        updated = [c.model_copy(update={"job_status": finished[c.job_id].status.value})
                   if c.job_id in finished else c for c in record.candidates]
        store.set_candidates(prefetch_id, updated)
        failed = [job for job in finished.values() if job.status is not JobStatus.SUCCEEDED]
        for job in finished.values():
            PREFETCH_PRIORS.labels("fetched" if job.status is JobStatus.SUCCEEDED
                                   else "failed").inc()
        in_place = max((job.finished_at or _now()) for job in finished.values())
        if failed:
            reasons = "; ".join(f"job {job.id}: {job.status.value} ({job.error or 'no reason'})"
                                for job in failed)
            _done(store, record, in_place, PrefetchStatus.FETCHING, error=reasons,
                  status=PrefetchStatus.FAILED)
        else:
            _done(store, record, in_place, PrefetchStatus.FETCHING)


def move_due(store: PrefetchStore, send: Callable[[list[str]], None]) -> int:
    """Hand due requests to the queue (each leaves the schedule exactly once), and send
    again the searches whose worker died (their claim lapsed)."""
    due = store.pop_due()
    if due:
        send(due)
        store.handed_off(due)
    lapsed = store.lapsed_claims()
    if lapsed:
        log.warning("prefetch searches whose worker vanished sent again",
                    extra={"prefetches": len(lapsed)})
        send(lapsed)
    return len(due) + len(lapsed)


def poll_worklist(config: Config, store: PrefetchStore, name: str, worklist: WorklistConfig,
                  now: datetime | None = None) -> int:
    """Request a prefetch for each procedure the worklist lists that has none yet; how many
    were new. An entry seen before finds its order's request and is left alone, however
    often it is polled."""
    items = find_worklist(config.sources[worklist.source], worklist.source, now=now or _now(),
                          horizon=timedelta(hours=worklist.horizon_hours),
                          station_ae_title=worklist.station_ae_title, modality=worklist.modality)
    created = 0
    for item in items:
        if item.modality is None:
            continue
        try:
            request = PrefetchRequest(
                patient_id=item.patient_id, issuer_of_patient_id=item.issuer_of_patient_id,
                current=CurrentExam(modality=item.modality,
                                    study_description=(item.description or "")[:64] or None,
                                    accession_number=item.accession_number,
                                    scheduled_at=item.scheduled_at))
        except ValidationError:
            log.warning("worklist entry unusable; skipped", extra={"worklist": name})
            continue
        if store.find_order(request) is not None:
            continue
        try:
            _, new = request_prefetch(store, config, request, f"worklist:{name}",
                                      SCHEDULER.name, renew=False)
        except NoRule:
            continue
        created += new
    if created:
        log.info("worklist polled", extra={"worklist": name, "new": created})
    return created


def _poller(config: Config, store: PrefetchStore, name: str,
            worklist: WorklistConfig) -> Callable[[], None]:
    def poll() -> None:
        poll_worklist(config, store, name, worklist)

    return poll


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def register(app: Celery, config: Config) -> None:
    """Register the ``pacsfetch.prefetch`` task on the workers' Celery app."""
    stores: dict[int, tuple[PrefetchStore, JobStore]] = {}

    def clients() -> tuple[PrefetchStore, JobStore]:
        pid = os.getpid()  # prefork children must not share their parent's sockets
        if pid not in stores:
            stores.clear()
            stores[pid] = (PrefetchStore.from_url(
                config.broker.url, retention_seconds=retention_seconds(config)),
                           JobStore.from_url(config.broker.url))
        return stores[pid]

    @app.task(name=PREFETCH_TASK, acks_late=True, reject_on_worker_lost=True)
    def prefetch(prefetch_id: str) -> None:
        store, jobs = clients()
        try:
            run_prefetch(config, store, jobs, app, prefetch_id, _holder())
        except Exception as exc:  # a bug or a broken source: fail the request, keep the worker
            log.exception("prefetch crashed", extra={"prefetch_id": prefetch_id})
            _fail(store, store.get(prefetch_id), f"internal error: {type(exc).__name__}: {exc}")


def duties(config: Config) -> list[Duty]:
    """The scheduler's prefetch duties: start due requests, finish fetched ones, and poll
    each configured worklist."""
    store = PrefetchStore.from_url(config.broker.url,
                                   retention_seconds=retention_seconds(config))
    jobs = JobStore.from_url(config.broker.url)
    celery = make_celery(config)
    return [
        Duty("prefetch-due", 0.5, lambda: move_due(store, lambda ids: enqueue_prefetches(
            celery, ids))),
        Duty("prefetch-watch", 1.0, lambda: watch_fetching(store, jobs)),
        *(Duty(f"worklist-{name}", worklist.interval,
               _poller(config, store, name, worklist))
          for name, worklist in config.prefetch.worklists.items()),
    ]
