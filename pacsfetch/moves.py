"""Move expectations: how a worker's C-MOVE and the separate move receiver meet in Redis.

C-MOVE makes the PACS deliver to ``pacsfetch receiver``, a process of its own that every
worker shares. Before it sends a C-MOVE, a worker registers an *expectation* for its job
(the request, its calling AE title and the C-MOVE message IDs); the receiver matches each
incoming C-STORE to one by Move Originator AE Title and Message ID, or by UIDs when the
PACS does not send them, and refuses instances no expectation claims. What the receiver
stores is appended to the expectation's list, which the worker reads to count it.

Layout (``P`` is the key prefix, ``pacsfetch`` by default):

- ``P:move:JOB`` hash: ``request`` (JSON), ``originator``, ``persisted`` (the job lives in
  the job store, so the receiver records instances there too), ``bytes``, ``m:ID`` fields
  for the C-MOVE message IDs; expires unless the worker keeps refreshing it;
- ``P:move:JOB:received`` list of ``SOP Instance UID <TAB> locations`` the receiver stored;
- ``P:move:JOB:plan`` set of what the job may receive: ``i:UID`` planned instances, ``s:UID``
  series moved whole (the PACS listed them only in part); absent: the request's scope;
- ``r:REASON`` fields of ``P:move:JOB``: how many instances the receiver refused, and why;
- ``P:moves:active`` set of job ids with an expectation (pruned of expired ones on read);
- ``P:moves:msgid`` counter that makes message IDs unique across workers sharing an AE title.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis

from pacsfetch.jobstore import JobStore
from pacsfetch.models import JobRequest

MESSAGE_ID_FIELD = "m:"

# Append received instances and add their bytes only while the expectation exists, so a
# late delivery for a job that stopped waiting leaves no key without an expiry behind.
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'bytes', ARGV[1])
if #ARGV > 2 then redis.call('RPUSH', KEYS[2], unpack(ARGV, 3)) end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# Count a refusal only while the expectation exists (no key without expiry is left behind).
_REFUSE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
"""
REFUSAL_FIELD = "r:"
PLAN_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class Plan:
    """What a job's C-MOVEs may bring: the instances its C-FIND listed, and the series the
    PACS listed only in part (capped answers), which are moved whole."""

    instances: frozenset[str]
    whole_series: frozenset[str] = frozenset()

    def allows(self, sop_instance_uid: str, series_uid: str) -> bool:
        return sop_instance_uid in self.instances or series_uid in self.whole_series


@dataclass(frozen=True, slots=True)
class MoveExpectation:
    """What one job's C-MOVEs will bring to the receiver."""

    job_id: str
    request: JobRequest
    originator_ae: str
    message_ids: frozenset[int]
    persisted: bool


class MoveBook:
    """All reads and writes of move expectations go through here (worker and receiver)."""

    def __init__(self, client: redis.Redis, prefix: str = "pacsfetch") -> None:
        self._r = client
        self._p = prefix
        self._record = client.register_script(_RECORD)
        self._refuse = client.register_script(_REFUSE)
        self.jobs = JobStore(client, prefix)

    @classmethod
    def from_url(cls, url: str, prefix: str = "pacsfetch") -> MoveBook:
        return cls(redis.Redis.from_url(url, decode_responses=True), prefix)

    def _move(self, job_id: str) -> str:
        return f"{self._p}:move:{job_id}"

    def _received(self, job_id: str) -> str:
        return f"{self._p}:move:{job_id}:received"

    def _plan(self, job_id: str) -> str:
        return f"{self._p}:move:{job_id}:plan"

    @property
    def _active(self) -> str:
        return f"{self._p}:moves:active"

    # worker side ------------------------------------------------------------
    def next_message_id(self) -> int:
        """A C-MOVE Message ID (1-65535) no other worker is using right now."""
        return int(self._r.incr(f"{self._p}:moves:msgid")) % 65535 + 1

    def expect(self, job_id: str, request: JobRequest, originator_ae: str, ttl: float,
               plan: Plan | None = None) -> None:
        """Register (or refresh) the job's expectation; it lapses after *ttl* seconds.

        With a *plan*, the receiver accepts only the instances it allows."""
        persisted = self.jobs.exists(job_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self._received(job_id), self._plan(job_id))
        if plan is not None:
            members = [f"i:{uid}" for uid in plan.instances] + [
                f"s:{uid}" for uid in plan.whole_series]
            for start in range(0, len(members), PLAN_CHUNK):
                pipe.sadd(self._plan(job_id), *members[start:start + PLAN_CHUNK])
            pipe.pexpire(self._plan(job_id), int(ttl * 1000))
        pipe.hset(self._move(job_id), mapping={
            "request": request.model_dump_json(), "originator": originator_ae,
            "persisted": "1" if persisted else "0", "bytes": 0,
        })
        pipe.pexpire(self._move(job_id), int(ttl * 1000))
        pipe.sadd(self._active, job_id)
        pipe.execute()

    def add_message_id(self, job_id: str, message_id: int, ttl: float) -> None:
        """Claim instances the PACS sends for the C-MOVE with *message_id*; refresh the expiry."""
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self._move(job_id), f"{MESSAGE_ID_FIELD}{message_id}", 1)
        pipe.pexpire(self._move(job_id), int(ttl * 1000))
        pipe.pexpire(self._plan(job_id), int(ttl * 1000))
        pipe.execute()

    def touch(self, job_id: str, ttl: float) -> None:
        pipe = self._r.pipeline(transaction=False)
        pipe.pexpire(self._move(job_id), int(ttl * 1000))
        pipe.pexpire(self._plan(job_id), int(ttl * 1000))
        pipe.execute()

    def refusals(self, job_id: str) -> dict[str, int]:
        """How many instances the receiver refused for the job, by reason."""
        return {key[len(REFUSAL_FIELD):]: int(value)
                for key, value in self._r.hgetall(self._move(job_id)).items()
                if key.startswith(REFUSAL_FIELD)}

    def received_since(self, job_id: str, offset: int) -> tuple[list[tuple[str, str]], int]:
        """Instances the receiver stored for the job from position *offset* on, and its byte total."""
        pipe = self._r.pipeline(transaction=False)
        pipe.lrange(self._received(job_id), offset, -1)
        pipe.hget(self._move(job_id), "bytes")
        rows, total = pipe.execute()
        pairs = [row.split("\t", 1) for row in rows]
        return [(sop, where) for sop, where in pairs], int(total or 0)

    def withdraw(self, job_id: str) -> None:
        """The job no longer waits: the receiver refuses whatever still comes for it."""
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self._move(job_id), self._received(job_id), self._plan(job_id))
        pipe.srem(self._active, job_id)
        pipe.execute()

    # receiver side ------------------------------------------------------------
    def active(self) -> list[MoveExpectation]:
        """Every live expectation; forgets ids whose expectation lapsed."""
        ids = sorted(self._r.smembers(self._active))
        pipe = self._r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._move(job_id))
        found, lapsed = [], []
        for job_id, data in zip(ids, pipe.execute(), strict=True):
            if not data.get("request"):
                lapsed.append(job_id)
                continue
            found.append(MoveExpectation(
                job_id=job_id,
                request=JobRequest.model_validate_json(data["request"]),
                originator_ae=data.get("originator", ""),
                message_ids=frozenset(int(k[len(MESSAGE_ID_FIELD):]) for k in data
                                      if k.startswith(MESSAGE_ID_FIELD)),
                persisted=data.get("persisted") == "1",
            ))
        if lapsed:
            self._r.srem(self._active, *lapsed)
        return found

    def plan_of(self, job_id: str) -> Plan | None:
        """The job's plan, or None when it registered none (its request's scope applies)."""
        members = self._r.smembers(self._plan(job_id))
        if not members:
            return None
        return Plan(frozenset(m[2:] for m in members if m.startswith("i:")),
                    frozenset(m[2:] for m in members if m.startswith("s:")))

    def refuse(self, job_id: str, reason: str) -> None:
        """Count an instance refused for the job (the worker reports it with the job)."""
        self._refuse(keys=[self._move(job_id)], args=[f"{REFUSAL_FIELD}{reason}"])

    def record_received(self, expectation: MoveExpectation, locations: Mapping[str, str],
                        nbytes: int, ttl: float) -> bool:
        """Record stored instances for the job; False when the job stopped waiting meanwhile."""
        job_id = expectation.job_id
        rows = [f"{sop}\t{where}" for sop, where in locations.items()]
        waiting = bool(self._record(keys=[self._move(job_id), self._received(job_id)],
                                    args=[nbytes, int(ttl * 1000), *rows]))
        if expectation.persisted:
            self.jobs.record_instances(job_id, locations)
        return waiting
