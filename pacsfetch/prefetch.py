"""A prefetch request, its record in Redis, and its durable schedule.

Why Redis and not Celery ETA tasks: an ETA task on Redis is redelivered after the broker's
visibility timeout, so a wait of hours would run twice. A request waits instead in a sorted
set scored by its start time (``scheduled_at - lead``); the scheduler (one leader at a
time) pops what is due with a script, so each request leaves the set exactly once, and
hands it to the queue. The worker claims it with a status change, so a repeated delivery
does nothing.

Layout (``P`` is the key prefix):

- ``P:prefetch:ID`` hash: ``request`` (JSON), ``status``, ``trigger``, ``created_by``,
  ``created_at``, ``start_at``, ``rule`` (JSON), ``candidates`` (JSON), ``error``,
  ``finished_at``, ``in_place_at``, ``lead_seconds``, ``order``; once final it expires after
  ``[jobs] retention_days``, like a job;
- ``P:prefetch:schedule`` sorted set id -> start time (epoch seconds): waiting requests;
- ``P:prefetch:handoff`` sorted set id -> when it was popped, until the task is sent;
- ``P:prefetch:claims`` sorted set id -> when the search's claim lapses: a worker killed
  mid-search leaves its request here, and the scheduler sends it again once the claim lapsed
  (without it the request would wait for the broker's visibility timeout, an hour);
- ``P:prefetch:fetching`` set: requests whose retrieve jobs are under way;
- ``P:prefetch:patient:H`` sorted set id -> creation time, ``H`` a hash of the patient ID
  (identifiers never appear in key names);
- ``P:prefetch:order:H`` the id of the request for one order (patient + accession number,
  or patient + modality + time without one): a second trigger for the same order (the HL7
  order and the worklist entry it produced) joins it instead of making another. It lives
  until ``suppress_minutes`` after the exam's time. A cancel leaves it in place, so the
  order stays cancelled when the worklist lists it again or the RIS repeats it; only an
  explicit new order (``renew``: the API, HL7 ORC-1 = NW, SIU^S12) schedules it anew.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated

import redis
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from pacsfetch.prefetch_rules import Candidate, Modality, RuleMatch

_Text = r"^[^\\\x00-\x1f]*$"
WILDCARDS = frozenset("*?")
"""C-FIND wildcards: in a patient ID they would match other patients' studies."""


class PrefetchStatus(StrEnum):
    SCHEDULED = "scheduled"
    SEARCHING = "searching"
    FETCHING = "fetching"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({PrefetchStatus.DONE, PrefetchStatus.FAILED, PrefetchStatus.CANCELLED})


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class CurrentExam(BaseModel):
    """The coming exam whose priors are wanted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: Modality
    study_description: str | None = Field(None, max_length=64, pattern=_Text)
    accession_number: str | None = Field(None, min_length=1, max_length=16, pattern=_Text)
    scheduled_at: Annotated[datetime, AfterValidator(_aware)] | None = Field(
        None, description="When the exam takes place (no zone: UTC); absent: now.")


class PrefetchRequest(BaseModel):
    """What a trigger (API, HL7 order, worklist entry) asks for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patient_id: str = Field(min_length=1, max_length=64, pattern=_Text,
                            description="Matched exactly: `*` and `?` are refused.")
    issuer_of_patient_id: str | None = Field(None, min_length=1, max_length=64, pattern=_Text)
    current: CurrentExam
    rule: str | None = Field(None, min_length=1, description="A [prefetch.rules.NAME]; "
                             "absent: the first rule that applies.")

    @field_validator("patient_id")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is blank")
        return value

    @field_validator("patient_id", "issuer_of_patient_id")
    @classmethod
    def _no_wildcards(cls, value: str | None) -> str | None:
        if value is not None and WILDCARDS & set(value):
            raise ValueError("contains a C-FIND wildcard (* or ?): it would match other "
                             "patients' studies")
        return value


class PrefetchRecord(BaseModel):
    """A prefetch as the API shows it: what was asked, which rule, each candidate's fate."""

    id: str
    status: PrefetchStatus
    request: PrefetchRequest
    trigger: str = Field(description="What asked: `api`, `hl7`, `worklist:NAME`.")
    created_by: str = Field(description="Who asked: the API token's name, or `hl7-listener` "
                            "and `scheduler` (worklists) for pacsfetch's own services.")
    created_at: datetime
    start_at: datetime = Field(description="When the search starts (scheduled_at - lead).")
    rule: RuleMatch | None = None
    candidates: list[Candidate] = Field(default_factory=list)
    error: str | None = None
    finished_at: datetime | None = None
    in_place_at: datetime | None = Field(None, description="When every chosen prior was in place.")
    lead_seconds: float | None = Field(
        None, description="How long before scheduled_at the priors were in place (negative: late).")


_CANDIDATES = TypeAdapter(list[Candidate])

# KEYS: order key, record, schedule, patient index.
# ARGV: id, order ttl ms, start score, created score, record prefix, renew (1: a cancelled
# order is scheduled anew), then field/value pairs.
_CREATE = """
local current = redis.call('GET', KEYS[1])
if current then
  local status = redis.call('HGET', ARGV[5] .. current, 'status')
  if status and (status ~= 'cancelled' or ARGV[6] ~= '1') then return current end
end
redis.call('HSET', KEYS[2], unpack(ARGV, 7))
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""

# KEYS: schedule, handoff. ARGV: now, limit. Pop what is due, each exactly once.
_POP_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], ARGV[1], id)
end
return ids
"""

# KEYS: record. ARGV: new status, allowed (comma list), then field/value pairs ('\\0' deletes).
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return false end
if not string.find(',' .. ARGV[2] .. ',', ',' .. cur .. ',', 1, true) then return cur end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 3, #ARGV, 2 do
  if ARGV[i + 1] == '\\0' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 'ok'
"""

# KEYS: record, claim, claims index. ARGV: holder, ttl ms, id, lapse time (epoch s).
# scheduled -> searching, or take over a search whose worker died (its claim lapsed).
# Returns 1 when the caller now owns the search.
_CLAIM = """
local cur = redis.call('HGET', KEYS[1], 'status')
if cur == 'scheduled' or (cur == 'searching' and not redis.call('GET', KEYS[2])) then
  redis.call('HSET', KEYS[1], 'status', 'searching')
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
  return 1
end
return 0
"""

# KEYS: claims index. ARGV: now, retry at (epoch s), record prefix. Searches whose claim
# lapsed while they are still searching: each is returned once per lapse (its score moves
# to *retry at*); entries of requests that moved on are dropped.
_LAPSED = """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 500)) do
  local record = ARGV[3] .. id
  if redis.call('HGET', record, 'status') ~= 'searching' then
    redis.call('ZREM', KEYS[1], id)
  elseif redis.call('EXISTS', record .. ':claim') == 0 then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    out[#out + 1] = id
  end
end
return out
"""

_DELETE = "\0"
CLAIM_TTL = timedelta(minutes=2)
"""A search takes seconds; a claim older than this belongs to a worker that died."""
HANDOFF_GRACE = 60.0
"""Seconds a popped request may wait for its task to be sent before it is sent again."""


def _digest(*parts: str | None) -> str:
    return hashlib.sha256("\x1f".join(p or "" for p in parts).encode()).hexdigest()[:32]


def order_digest(request: PrefetchRequest) -> str:
    """One order's identity: patient and accession number, else modality and exam time."""
    current = request.current
    if current.accession_number:
        return _digest(request.issuer_of_patient_id, request.patient_id, current.accession_number)
    when = current.scheduled_at.isoformat() if current.scheduled_at else ""
    return _digest(request.issuer_of_patient_id, request.patient_id, current.modality, when)


def _now() -> datetime:
    return datetime.now(UTC)


class PrefetchNotFound(KeyError):
    """No prefetch with that id."""


class PrefetchStore:
    """Every read and write of prefetch state."""

    def __init__(self, client: redis.Redis, prefix: str = "pacsfetch", *,
                 retention_seconds: int | None = None,
                 claim_ttl: timedelta = CLAIM_TTL) -> None:
        """*retention_seconds*: how long a finished record stays (``[jobs] retention_days``;
        None keeps it, for tools reading a store). *claim_ttl*: see :data:`CLAIM_TTL`."""
        self._r = client
        self._p = prefix
        self._retention = retention_seconds
        self._claim_ttl = claim_ttl
        self._create = client.register_script(_CREATE)
        self._pop_due = client.register_script(_POP_DUE)
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._lapsed = client.register_script(_LAPSED)

    @classmethod
    def from_url(cls, url: str, prefix: str = "pacsfetch", *,
                 retention_seconds: int | None = None,
                 claim_ttl: timedelta = CLAIM_TTL) -> PrefetchStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), prefix,
                   retention_seconds=retention_seconds, claim_ttl=claim_ttl)

    def _key(self, prefetch_id: str) -> str:
        return f"{self._p}:prefetch:{prefetch_id}"

    @property
    def _schedule(self) -> str:
        return f"{self._p}:prefetch:schedule"

    @property
    def _handoff(self) -> str:
        return f"{self._p}:prefetch:handoff"

    @property
    def _fetching(self) -> str:
        return f"{self._p}:prefetch:fetching"

    @property
    def _claims(self) -> str:
        return f"{self._p}:prefetch:claims"

    def _patient(self, patient_id: str) -> str:
        return f"{self._p}:prefetch:patient:{_digest(patient_id)}"

    def _order(self, digest: str) -> str:
        return f"{self._p}:prefetch:order:{digest}"

    # creating -------------------------------------------------------------------------
    def create(self, request: PrefetchRequest, *, rule: RuleMatch, lead: timedelta,
               suppress: timedelta, trigger: str, created_by: str,
               renew: bool = True) -> tuple[PrefetchRecord, bool]:
        """Record a request and schedule it; returns (record, created). ``created`` is False
        when the same order already has a live request, which is returned instead, or a
        cancelled one and *renew* is False (a repeat of the order, not a new one)."""
        created = _now()
        scheduled = request.current.scheduled_at or created
        start = max(scheduled - lead, created)
        ttl = max((scheduled + suppress - created).total_seconds(), 1.0)
        prefetch_id = uuid.uuid4().hex
        digest = order_digest(request)
        fields = {"request": request.model_dump_json(), "status": PrefetchStatus.SCHEDULED.value,
                  "trigger": trigger, "created_by": created_by, "created_at": created.isoformat(),
                  "start_at": start.isoformat(), "rule": rule.model_dump_json(),
                  "candidates": "[]", "order": digest}
        found = self._create(
            keys=[self._order(digest), self._key(prefetch_id), self._schedule,
                  self._patient(request.patient_id)],
            args=[prefetch_id, int(ttl * 1000), repr(start.timestamp()),
                  repr(created.timestamp()), f"{self._p}:prefetch:", "1" if renew else "0",
                  *(item for pair in fields.items() for item in pair)])
        return self.get(found), found == prefetch_id

    # reading --------------------------------------------------------------------------
    def get(self, prefetch_id: str) -> PrefetchRecord:
        data = self._r.hgetall(self._key(prefetch_id)) if prefetch_id.isalnum() else {}
        if not data:
            raise PrefetchNotFound(prefetch_id)
        return _record(prefetch_id, data)

    def for_patient(self, patient_id: str, limit: int = 100) -> list[PrefetchRecord]:
        """The patient's requests, newest first."""
        ids = self._r.zrevrange(self._patient(patient_id), 0, limit - 1)
        records = []
        for prefetch_id in ids:
            try:
                record = self.get(prefetch_id)
            except PrefetchNotFound:  # expired after the retention: forget it here too
                self._r.zrem(self._patient(patient_id), prefetch_id)
                continue
            if record.request.patient_id == patient_id:  # a digest collision is not a match
                records.append(record)
        return records

    def find_order(self, request: PrefetchRequest) -> PrefetchRecord | None:
        """The live request for the same order, if any."""
        found = self._r.get(self._order(order_digest(request)))
        try:
            return self.get(found) if found else None
        except PrefetchNotFound:
            return None

    def waiting(self) -> int:
        return int(self._r.zcard(self._schedule))

    # the schedule ---------------------------------------------------------------------
    def pop_due(self, now: datetime | None = None, limit: int = 500) -> list[str]:
        """Requests whose start time has come, each returned by exactly one call; they stay
        in the hand-off set until :meth:`handed_off` (a scheduler dying in between sends
        them again after :data:`HANDOFF_GRACE`, and the worker's claim drops the repeat)."""
        when = (now or _now()).timestamp()
        stale = self._r.zrangebyscore(self._handoff, "-inf", when - HANDOFF_GRACE)
        return list(stale) + list(self._pop_due(keys=[self._schedule, self._handoff],
                                                args=[repr(when), limit]))

    def handed_off(self, prefetch_ids: list[str]) -> None:
        if prefetch_ids:
            self._r.zrem(self._handoff, *prefetch_ids)

    def lapsed_claims(self, now: datetime | None = None) -> list[str]:
        """Searches whose worker died (the claim lapsed, the status is still searching), each
        returned once per lapse, to be sent again: the next delivery's claim takes over."""
        when = (now or _now()).timestamp()
        retry = when + self._claim_ttl.total_seconds()
        return list(self._lapsed(keys=[self._claims],
                                 args=[repr(when), repr(retry), f"{self._p}:prefetch:"]))

    # changing -------------------------------------------------------------------------
    def transition(self, prefetch_id: str, status: PrefetchStatus,
                   allowed_from: list[PrefetchStatus], **fields: str | None) -> bool:
        """Change the status if it is one of *allowed_from*; None deletes a field."""
        args: list[str] = [status.value, ",".join(s.value for s in allowed_from)]
        for name, value in fields.items():
            args += [name, _DELETE if value is None else value]
        done = self._transition(keys=[self._key(prefetch_id)], args=args) == "ok"
        if done and status is not PrefetchStatus.SEARCHING:
            self._r.zrem(self._claims, prefetch_id)
        if done and status is PrefetchStatus.FETCHING:
            self._r.sadd(self._fetching, prefetch_id)
        elif done and status in FINAL:
            pipe = self._r.pipeline(transaction=False)
            pipe.srem(self._fetching, prefetch_id)
            pipe.zrem(self._schedule, prefetch_id)
            if self._retention is not None:
                pipe.expire(self._key(prefetch_id), self._retention)
            pipe.execute()
        return done

    def claim(self, prefetch_id: str, holder: str) -> bool:
        """Take the search of a due request; False when another delivery has it or had it."""
        ttl = self._claim_ttl.total_seconds()
        return bool(self._claim(
            keys=[self._key(prefetch_id), self._key(prefetch_id) + ":claim", self._claims],
            args=[holder, int(ttl * 1000), prefetch_id, repr(_now().timestamp() + ttl)]))

    def set_candidates(self, prefetch_id: str, candidates: list[Candidate]) -> None:
        self._r.hset(self._key(prefetch_id), "candidates",
                     _CANDIDATES.dump_json(candidates).decode())

    def fetching(self) -> list[str]:
        return sorted(self._r.smembers(self._fetching))

    def cancel(self, prefetch_id: str, reason: str) -> PrefetchRecord:
        """Cancel a request that has not finished. Its order stays cancelled against repeats
        (see the module docstring); only a new order schedules it again. Retrieve jobs
        already submitted go on (another request may share them)."""
        live = [PrefetchStatus.SCHEDULED, PrefetchStatus.SEARCHING, PrefetchStatus.FETCHING]
        self.transition(prefetch_id, PrefetchStatus.CANCELLED, live, error=reason,
                        finished_at=_now().isoformat())
        return self.get(prefetch_id)


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _record(prefetch_id: str, data: dict[str, str]) -> PrefetchRecord:
    return PrefetchRecord(
        id=prefetch_id, status=PrefetchStatus(data["status"]),
        request=PrefetchRequest.model_validate_json(data["request"]),
        trigger=data.get("trigger") or data.get("created_by", "api"),
        created_by=data.get("created_by", "api"), created_at=datetime.fromisoformat(data["created_at"]),
        start_at=datetime.fromisoformat(data["start_at"]),
        rule=RuleMatch.model_validate_json(data["rule"]) if data.get("rule") else None,
        candidates=_CANDIDATES.validate_json(data.get("candidates") or "[]"),
        error=data.get("error"), finished_at=_time(data.get("finished_at")),
        in_place_at=_time(data.get("in_place_at")),
        lead_seconds=float(data["lead_seconds"]) if data.get("lead_seconds") else None,
    )

