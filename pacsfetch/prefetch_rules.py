"""Prefetch rules: which current exams they apply to and which prior studies they choose.

The vocabulary follows dcm4chee-arc's HL7 prefetch rules (a count of priors, a study age,
attributes from the order, a priority, a duplicate-suppression interval, a destination
check) so that sites moving over recognise it. Unlike it, every decision is explained: a
prefetch request keeps the rule that matched and why, and for each candidate prior whether
it was chosen or left out and the reason, so "why is this prior missing?" has an answer.

Everything here is pure (configuration models and functions of their inputs): the worker
feeds it what C-FIND found, and the tests can check a choice without a network.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pacsfetch.uids import check_ae_title

_MODALITY = re.compile(r"^[A-Z0-9]{1,16}$")


def _modality(value: str) -> str:
    value = value.strip().upper()
    if not _MODALITY.match(value):
        raise ValueError(f"{value!r} is not a modality code such as CT or MR")
    return value


def _word(value: str) -> str:
    value = value.strip().upper()
    if not value:
        raise ValueError("an empty word matches nothing")
    return value


Modality = Annotated[str, AfterValidator(_modality)]
Word = Annotated[str, AfterValidator(_word)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrefetchRule(_Section):
    """``[prefetch.rules.NAME]``: when it applies, which priors it picks, where they go."""

    when_modalities: list[Modality] = Field(
        default_factory=list, description="Current exams' modalities it applies to; empty: any.")
    when_description_words: list[Word] = Field(
        default_factory=list, description="Applies only if the current exam's description holds "
        "one of these words (case-insensitive); empty: any description.")
    prior_modalities: list[Modality] = Field(
        default_factory=list, description="Priors must hold one of these; empty: any modality.")
    prior_description_words: list[Word] = Field(
        default_factory=list, description="Priors' StudyDescription must hold one of these words.")
    prior_body_parts: list[Word] = Field(
        default_factory=list, description="Priors' BodyPartExamined (series level) must be one "
        "of these where the PACS returns it; a prior whose PACS does not say is kept.")
    lookback_years: float = Field(5, gt=0, le=100, description="Priors at most this old.")
    max_priors: int = Field(3, ge=1, le=50, description="The most recent N matching priors.")
    include_last_of_any_modality: bool = Field(
        False, description="Also the newest prior of any modality or description.")
    sources: list[str] = Field(min_length=1, description="Sources searched, in this order.")
    stores: list[str] = Field(min_length=1, max_length=8, description="Where priors go.")
    priority: int = Field(8, ge=0, le=9, description="Retrieve job priority (9 most urgent).")
    lead_minutes: float = Field(60, ge=0, description="Start this long before scheduled_at.")
    suppress_minutes: float = Field(
        1440, ge=0, description="A second request for the same order within this long after "
        "its scheduled time joins the first (an HL7 order and its worklist entry).")


class WorklistConfig(_Section):
    """``[prefetch.worklists.NAME]``: poll a modality worklist SCP for upcoming procedures."""

    source: str = Field(min_length=1, description="A [sources.NAME] that serves MWL C-FIND.")
    interval: float = Field(60, ge=1, description="Seconds between polls.")
    horizon_hours: float = Field(24, gt=0, le=24 * 14,
                                 description="Procedures scheduled within this many hours.")
    station_ae_title: Annotated[str, AfterValidator(check_ae_title)] | None = Field(
        None, description="Only procedures for this Scheduled Station AE Title.")
    modality: Modality | None = Field(None, description="Only procedures of this modality.")


class PrefetchConfig(_Section):
    """``[prefetch]``: rules (tried in file order) and worklists to poll."""

    rules: dict[str, PrefetchRule] = Field(default_factory=dict)
    worklists: dict[str, WorklistConfig] = Field(default_factory=dict)


class RuleMatch(BaseModel):
    """The rule a request uses and why."""

    name: str
    reason: str


def _words_in(text: str | None, words: list[str]) -> list[str]:
    found = set(re.findall(r"[A-Z0-9]+", (text or "").upper()))
    return [word for word in words if word in found]


def match_rule(rules: dict[str, PrefetchRule], modality: str, description: str | None,
               wanted: str | None = None) -> RuleMatch | None:
    """The first rule (in file order) for this current exam; *wanted* names one explicitly."""
    if wanted is not None:
        return RuleMatch(name=wanted, reason="named by the request") if wanted in rules else None
    for name, rule in rules.items():
        if rule.when_modalities and modality not in rule.when_modalities:
            continue
        hits = _words_in(description, rule.when_description_words)
        if rule.when_description_words and not hits:
            continue
        reason = (f"modality {modality} is in when_modalities" if rule.when_modalities
                  else "applies to any modality")
        if hits:
            reason += f"; the description holds {', '.join(hits)}"
        return RuleMatch(name=name, reason=reason)
    return None


class Decision(StrEnum):
    CHOSEN = "chosen"
    LEFT_OUT = "left-out"
    IN_PLACE = "in-place"
    """Chosen, but every store already holds it completely: not fetched again."""


class Candidate(BaseModel):
    """A study of the patient that a source listed, and what the rule decided about it."""

    study_uid: str
    source: str
    study_date: str | None = None
    modalities: list[str] = Field(default_factory=list)
    description: str | None = None
    body_parts: list[str] | None = Field(None, description="None: not asked or not returned.")
    accession_number: str | None = None
    instance_count: int | None = None
    decision: Decision = Decision.LEFT_OUT
    reason: str = ""
    job_id: str | None = None
    job_status: str | None = None


def _day(text: str | None) -> date | None:
    try:
        return datetime.strptime(text or "", "%Y%m%d").date()
    except ValueError:
        return None


def _filter_reason(rule: PrefetchRule, cand: Candidate, cutoff: date, current_accession: str | None,
                   seen: dict[str, str]) -> str | None:
    """Why *cand* fails the rule's filters, or None when it passes them all."""
    if cand.study_uid in seen:
        return f"also listed by source {seen[cand.study_uid]}, searched first"
    if current_accession and cand.accession_number == current_accession:
        return "the current exam itself (same accession number)"
    day = _day(cand.study_date)
    if day is None:
        return "no StudyDate: the look-back cannot be checked"
    if day < cutoff:
        return f"{day.isoformat()} is older than lookback_years={rule.lookback_years:g}"
    if rule.prior_modalities and not set(cand.modalities) & set(rule.prior_modalities):
        held = ", ".join(cand.modalities) or "none listed"
        return f"modalities ({held}) not in prior_modalities"
    if rule.prior_description_words and not _words_in(cand.description,
                                                      rule.prior_description_words):
        return "the description holds none of prior_description_words"
    if rule.prior_body_parts and cand.body_parts is not None and not (
            set(part.upper() for part in cand.body_parts) & set(rule.prior_body_parts)):
        return f"body parts ({', '.join(cand.body_parts) or 'none'}) not in prior_body_parts"
    return None


def choose_priors(rule: PrefetchRule, candidates: list[Candidate], today: date,
                  current_accession: str | None = None) -> list[Candidate]:
    """Decide on every candidate (newest first in the answer), each with its reason.

    Candidates come in source order (the rule's ``sources``); a study two sources list is
    considered once, from the first.
    """
    cutoff = today - timedelta(days=round(rule.lookback_years * 365.25))
    seen: dict[str, str] = {}
    decided: list[Candidate] = []
    for cand in candidates:
        reason = _filter_reason(rule, cand, cutoff, current_accession, seen)
        seen.setdefault(cand.study_uid, cand.source)
        decided.append(cand.model_copy(update={"reason": reason or "",
                                               "decision": Decision.LEFT_OUT}))
    decided.sort(key=lambda c: (c.study_date or "", c.study_uid), reverse=True)
    chosen = 0
    for index, cand in enumerate(decided):
        if cand.reason:
            continue
        if chosen < rule.max_priors:
            chosen += 1
            decided[index] = cand.model_copy(update={
                "decision": Decision.CHOSEN,
                "reason": f"matches the rule; recent prior {chosen} of max_priors="
                          f"{rule.max_priors}"})
        else:
            decided[index] = cand.model_copy(update={
                "reason": f"matches, but max_priors={rule.max_priors} more recent ones were chosen"})
    if rule.include_last_of_any_modality:
        _include_last(decided, cutoff, current_accession)
    return decided


def _include_last(decided: list[Candidate], cutoff: date, current_accession: str | None) -> None:
    """Choose the newest prior within the look-back whatever its modality or description."""
    for index, cand in enumerate(decided):
        day = _day(cand.study_date)
        if day is None or day < cutoff or (current_accession
                                           and cand.accession_number == current_accession):
            continue
        if cand.reason.startswith("also listed by source"):
            continue
        if cand.decision is not Decision.CHOSEN:
            decided[index] = cand.model_copy(update={
                "decision": Decision.CHOSEN,
                "reason": f"the last study of any modality (include_last_of_any_modality); "
                          f"otherwise: {cand.reason}"})
        return


def check_references(prefetch: PrefetchConfig, sources: set[str], stores: set[str]) -> list[str]:
    """Problems of rules and worklists naming sources or stores the config lacks, by key."""
    problems = []
    for name, rule in prefetch.rules.items():
        problems += [f"prefetch.rules.{name}.sources: unknown source {s!r}"
                     for s in rule.sources if s not in sources]
        problems += [f"prefetch.rules.{name}.stores: unknown store {s!r}"
                     for s in rule.stores if s not in stores]
    problems += [f"prefetch.worklists.{name}.source: unknown source {wl.source!r}"
                 for name, wl in prefetch.worklists.items() if wl.source not in sources]
    return problems

