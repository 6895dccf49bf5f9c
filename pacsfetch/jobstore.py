"""Job state in Redis, readable by the API after any worker or API restart.

Why Redis: the broker already is Redis, so the state store adds no moving part; hashes give
atomic per-field updates for progress counters, and a small Lua script makes each status
change atomic with its index. Run Redis with AOF persistence in production so job history
survives a Redis restart too.

Layout (``P`` is the key prefix, ``pacsfetch`` by default):

- ``P:job:ID`` hash: ``request`` (JSON), ``status``, timestamps, ``p_*`` progress counters,
  ``transport``, ``transport_notes`` (JSON), ``attempts``, ``error``, ``error_kind``, ``cancel``,
  ``waiting_for`` (while a running job waits for an association slot or a window), ``origin``,
  ``created_by`` (the caller's token name, or the service's);
- ``P:jobs:all`` and ``P:jobs:status:S`` sorted sets of job ids scored by creation time;
- ``P:job:ID:instances`` hash SOP Instance UID -> where the stores put it (the record of what
  a job wrote, also what a retried job skips);
- ``P:job:ID:lease`` the worker currently running the job, with a TTL;
- ``P:jobs:active:SOURCE:STUDY:STORES`` the id of the queued or running study-level job
  for that work (``dedupe`` in its hash names the key; a final status removes it).

A final status gives the job's hash and instance list a TTL of the retention
(``[jobs] retention_days``): Redis drops them itself; :mod:`pacsfetch.retention` then removes
their ids from the indexes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from pydantic import TypeAdapter

from pacsfetch.models import (
    BULK_ORIGINS,
    FINAL_STATUSES,
    JobRecord,
    JobRequest,
    JobStatus,
    Level,
    Progress,
    TransportNote,
)

DEFAULT_RETENTION_DAYS = 30.0
"""Days a finished job is kept (``[jobs] retention_days``)."""

PROGRESS_FIELDS = ("completed", "failed", "warning", "remaining", "skipped", "bytes")

# Atomically change a job's status if its current status is one of the allowed ones, keep
# the per-status index in step, and set extra fields. A final status sets the job and its
# instance list to expire after the retention (ARGV[5] seconds); any other status keeps them.
# KEYS: the job's hash, its instance list. Returns {changed, previous_status}.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, false} end
if ARGV[2] ~= '' and not string.find(',' .. ARGV[2] .. ',', ',' .. cur .. ',', 1, true) then
  return {0, cur}
end
local score = redis.call('HGET', KEYS[1], 'created_ts')
if cur ~= ARGV[1] then
  redis.call('ZREM', ARGV[3] .. cur, ARGV[4])
  redis.call('ZADD', ARGV[3] .. ARGV[1], score, ARGV[4])
end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 6, #ARGV, 2 do
  if ARGV[i + 1] == '\\0' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
if string.find(',%s,', ',' .. ARGV[1] .. ',', 1, true) then
  local dedupe = redis.call('HGET', KEYS[1], 'dedupe')
  if dedupe and redis.call('GET', dedupe) == ARGV[4] then redis.call('DEL', dedupe) end
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
else
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
end
return {1, cur}
""" % ",".join(sorted(s.value for s in FINAL_STATUSES))

# KEYS: dedupe key, the new job's hash, index of all jobs, index of queued jobs.
# ARGV: new job id, job key prefix, creation score, then the new hash's field/value pairs.
# Returns the id of the queued or running job for the same work, or of the one created.
_CREATE_OR_JOIN = """
local current = redis.call('GET', KEYS[1])
if current then
  local status = redis.call('HGET', ARGV[2] .. current, 'status')
  if status == 'queued' or status == 'running' then return current end
end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

# Take the lease if it is free or ours; returns the holder after the call.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if (not holder) or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return holder
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_DELETE_FIELD = "\0"
_NOTES = TypeAdapter(list[TransportNote])


def encode_notes(notes: Iterable[TransportNote]) -> str:
    """The ``transport_notes`` field as the job hash stores it (JSON)."""
    return _NOTES.dump_json(list(notes)).decode()


@dataclass(frozen=True)
class JoinedJob:
    """What :meth:`JobStore.create_or_join` did."""

    record: JobRecord
    joined: bool
    """True when an existing job does the work (``record`` is that job)."""
    requeue: bool
    """True when the caller must enqueue ``record`` again: it became more urgent."""


def _now() -> datetime:
    return datetime.now(UTC)


class JobNotFound(KeyError):
    """No job with that id."""


class JobStore:
    """All reads and writes of job state go through here."""

    def __init__(self, client: redis.Redis, prefix: str = "pacsfetch",
                 retention_days: float = DEFAULT_RETENTION_DAYS) -> None:
        self._r = client
        self._p = prefix
        self.retention_seconds = max(1, round(retention_days * 86400))
        self._transition = client.register_script(_TRANSITION)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._create_or_join = client.register_script(_CREATE_OR_JOIN)

    @classmethod
    def from_url(cls, url: str, prefix: str = "pacsfetch",
                 retention_days: float = DEFAULT_RETENTION_DAYS) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), prefix, retention_days)

    # keys ---------------------------------------------------------------
    def _job(self, job_id: str) -> str:
        return f"{self._p}:job:{job_id}"

    def _instances(self, job_id: str) -> str:
        return f"{self._p}:job:{job_id}:instances"

    def _lease(self, job_id: str) -> str:
        return f"{self._p}:job:{job_id}:lease"

    @property
    def _status_prefix(self) -> str:
        return f"{self._p}:jobs:status:"

    @property
    def _all(self) -> str:
        return f"{self._p}:jobs:all"

    # health ---------------------------------------------------------------
    def ping(self) -> bool:
        return bool(self._r.ping())

    # creation and reading ---------------------------------------------------
    def create_many(self, requests: Sequence[JobRequest], origin: str = "api",
                    created_by: str | Sequence[str | None] | None = None) -> list[JobRecord]:
        """Record new queued jobs in one round trip.

        *created_by* names who asked (a token's name, a service's): one name for all, or
        one per request."""
        creators = ([created_by] * len(requests) if created_by is None or
                    isinstance(created_by, str) else list(created_by))
        records = []
        pipe = self._r.pipeline(transaction=False)
        for request, creator in zip(requests, creators, strict=True):
            created = _now()
            record = JobRecord(
                id=uuid.uuid4().hex, status=JobStatus.QUEUED, request=request, created_at=created,
                origin=origin, created_by=creator,
            )
            score = created.timestamp()
            pipe.hset(
                self._job(record.id),
                mapping={
                    "request": request.model_dump_json(),
                    "status": JobStatus.QUEUED.value,
                    "created_at": created.isoformat(),
                    "created_ts": repr(score),
                    "attempts": 0,
                    "origin": origin,
                    **({"created_by": creator} if creator else {}),
                },
            )
            pipe.zadd(self._all, {record.id: score})
            pipe.zadd(self._status_prefix + JobStatus.QUEUED.value, {record.id: score})
            records.append(record)
        pipe.execute()
        return records

    def create(self, request: JobRequest, origin: str = "api",
               created_by: str | None = None) -> JobRecord:
        return self.create_many([request], origin, created_by)[0]

    def create_batch(self, requests: Sequence[JobRequest], origin: str = "api",
                     created_by: str | Sequence[str | None] | None = None) -> list[JobRecord]:
        """:meth:`create_many` under the name the other features call it by."""
        return self.create_many(requests, origin, created_by)

    def _dedupe_key(self, request: JobRequest) -> str | None:
        if request.level is not Level.STUDY:
            return None
        stores = ",".join(sorted(request.store_names))
        return f"{self._p}:jobs:active:{request.source}:{request.study_uid}:{stores}"

    def create_or_join(self, request: JobRequest, origin: str = "api",
                       created_by: str | None = None) -> JoinedJob:
        """A new queued job, or the queued or running job that already retrieves the same
        study from the same source into the same stores (a second migration, a prefetch of
        a study a migration is moving, a repeated request): the work is done once.

        Joining more urgent work makes the shared job more urgent: its priority rises to the
        newcomer's and a bulk origin becomes the newcomer's. Then ``requeue`` is true and the
        caller enqueues the job again at its new priority (a delivery of a job that is
        already running or final does nothing, so the older message is harmless).
        """
        key = self._dedupe_key(request)
        if key is None:
            return JoinedJob(self.create(request, origin, created_by), joined=False,
                             requeue=False)
        created = _now()
        job_id = uuid.uuid4().hex
        fields = {"request": request.model_dump_json(), "status": JobStatus.QUEUED.value,
                  "created_at": created.isoformat(), "created_ts": repr(created.timestamp()),
                  "attempts": "0", "origin": origin, "dedupe": key,
                  **({"created_by": created_by} if created_by else {})}
        found = self._create_or_join(
            keys=[key, self._job(job_id), self._all, self._status_prefix + JobStatus.QUEUED.value],
            args=[job_id, f"{self._p}:job:", repr(created.timestamp()),
                  *(item for pair in fields.items() for item in pair)])
        if found == job_id:
            return JoinedJob(self.get(job_id), joined=False, requeue=False)
        existing = self.get(found)
        urgent = request.priority > existing.request.priority
        unbulk = existing.origin in BULK_ORIGINS and origin not in BULK_ORIGINS
        if not (urgent or unbulk):
            return JoinedJob(existing, joined=True, requeue=False)
        priority = max(request.priority, existing.request.priority)
        self._r.hset(self._job(found), mapping={
            "request": existing.request.model_copy(update={"priority": priority}).model_dump_json(),
            "origin": origin if unbulk else existing.origin})
        return JoinedJob(self.get(found), joined=True, requeue=True)

    def get(self, job_id: str) -> JobRecord:
        data = self._r.hgetall(self._job(job_id)) if job_id.isalnum() else {}
        if not data:
            raise JobNotFound(job_id)
        return self._to_record(job_id, data)

    def exists(self, job_id: str) -> bool:
        return job_id.isalnum() and bool(self._r.exists(self._job(job_id)))

    def list(
        self, status: JobStatus | None = None, offset: int = 0, limit: int = 50
    ) -> tuple[list[JobRecord], int]:
        """Newest first; returns one page and the total count."""
        index = self._status_prefix + status.value if status else self._all
        pipe = self._r.pipeline(transaction=False)
        pipe.zcard(index)
        pipe.zrevrange(index, offset, offset + limit - 1)
        total, ids = pipe.execute()
        pipe = self._r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._job(job_id))
        rows = pipe.execute()
        return [self._to_record(i, d) for i, d in zip(ids, rows, strict=True) if d], total

    def count_by_status(self) -> dict[JobStatus, int]:
        """How many jobs have each status (the per-status indexes' sizes)."""
        pipe = self._r.pipeline(transaction=False)
        for status in JobStatus:
            pipe.zcard(self._status_prefix + status.value)
        return dict(zip(JobStatus, map(int, pipe.execute()), strict=True))

    def _to_record(self, job_id: str, data: Mapping[str, str]) -> JobRecord:
        progress = Progress(
            **{
                name: int(data[f"p_{name}"])
                for name in PROGRESS_FIELDS
                if data.get(f"p_{name}") not in (None, "")
            }
        )
        return JobRecord(
            id=job_id,
            status=JobStatus(data["status"]),
            request=JobRequest.model_validate_json(data["request"]),
            progress=progress,
            created_at=datetime.fromisoformat(data["created_at"]),
            started_at=_opt_time(data.get("started_at")),
            finished_at=_opt_time(data.get("finished_at")),
            transport=data.get("transport") or None,
            transport_notes=_NOTES.validate_json(data.get("transport_notes") or "[]"),
            attempts=int(data.get("attempts", 0)),
            error=data.get("error") or None,
            error_kind=data.get("error_kind") or None,
            cancel_requested=data.get("cancel") == "1",
            waiting_for=data.get("waiting_for") or None,
            origin=data.get("origin") or "api",
            created_by=data.get("created_by") or None,
        )

    # status changes ---------------------------------------------------------
    def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        allowed_from: Iterable[JobStatus] = (),
        **fields: str | int | None,
    ) -> tuple[bool, JobStatus | None]:
        """Set *to* if the job's status is in *allowed_from* (any, when empty).

        Returns whether it changed and the status before. A field given as ``None`` is
        removed. Timestamps ``started_at``/``finished_at`` are set here, not by callers.
        """
        if to is JobStatus.RUNNING:
            fields.setdefault("started_at", _now().isoformat())
        else:
            fields.setdefault("waiting_for", None)
        if to in FINAL_STATUSES:
            fields.setdefault("finished_at", _now().isoformat())
        args: list[str] = [
            to.value,
            ",".join(s.value for s in allowed_from),
            self._status_prefix,
            job_id,
            str(self.retention_seconds),
        ]
        for name, value in fields.items():
            args += [name, _DELETE_FIELD if value is None else str(value)]
        changed, previous = self._transition(keys=[self._job(job_id), self._instances(job_id)],
                                             args=args)
        return bool(changed), JobStatus(previous) if previous else None

    def set_fields(self, job_id: str, **fields: str | int) -> None:
        self._r.hset(self._job(job_id), mapping={k: str(v) for k, v in fields.items()})

    def set_waiting(self, job_id: str, what: str | None) -> None:
        """What a running job waits for (None: nothing any more)."""
        if what is None:
            self._r.hdel(self._job(job_id), "waiting_for")
        else:
            self._r.hset(self._job(job_id), "waiting_for", what)

    def incr_attempts(self, job_id: str) -> int:
        return int(self._r.hincrby(self._job(job_id), "attempts", 1))

    def set_progress(self, job_id: str, progress: Progress) -> None:
        mapping = {
            f"p_{name}": "" if value is None else str(value)
            for name, value in progress.model_dump().items()
        }
        self._r.hset(self._job(job_id), mapping=mapping)

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job at once; ask a running one's worker to stop (C-CANCEL)."""
        changed, previous = self.transition(
            job_id, JobStatus.CANCELLED, allowed_from=[JobStatus.QUEUED], cancel=1,
            error="cancelled by request", error_kind="cancelled",
        )
        if previous is None:
            raise JobNotFound(job_id)
        if not changed and previous is JobStatus.RUNNING:
            self._r.hset(self._job(job_id), "cancel", "1")
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return self._r.hget(self._job(job_id), "cancel") == "1"

    # what a job wrote -------------------------------------------------------
    def record_instances(self, job_id: str, locations: Mapping[str, str]) -> None:
        if locations:
            self._r.hset(self._instances(job_id), mapping=dict(locations))

    def stored_instances(self, job_id: str) -> dict[str, str]:
        return self._r.hgetall(self._instances(job_id))

    def scan_instances(self, job_id: str, cursor: int, count: int) -> tuple[int, list[tuple[str, str]]]:
        """One page of the record; returns the next cursor (0 when done) and the rows."""
        next_cursor, rows = self._r.hscan(self._instances(job_id), cursor, count=count)
        return int(next_cursor), sorted(rows.items())

    def count_instances(self, job_id: str) -> int:
        return int(self._r.hlen(self._instances(job_id)))

    # retention --------------------------------------------------------------
    def prune_indexes(self, created_before: float, batch: int = 1000) -> int:
        """Drop from the indexes the ids of jobs created before *created_before* (a Unix
        time) whose records Redis has expired; returns how many. Only such old jobs can have
        expired: a record outlives its creation by at least the retention."""
        removed = 0
        indexes = [self._all, *(self._status_prefix + s.value for s in FINAL_STATUSES)]
        for index in indexes:
            start = 0
            while True:
                ids = self._r.zrangebyscore(index, "-inf", created_before, start=start, num=batch)
                if not ids:
                    break
                pipe = self._r.pipeline(transaction=False)
                for job_id in ids:
                    pipe.exists(self._job(job_id))
                gone = [i for i, alive in zip(ids, pipe.execute(), strict=True) if not alive]
                if gone:
                    self._r.zrem(index, *gone)
                    removed += len(gone)
                start += len(ids) - len(gone)
                if len(ids) < batch:
                    break
        return removed

    # leases -----------------------------------------------------------------
    def acquire_lease(self, job_id: str, owner: str, ttl_seconds: float) -> str:
        """Take or renew the lease; returns the holder (``owner`` when we hold it)."""
        return str(self._acquire(keys=[self._lease(job_id)], args=[owner, int(ttl_seconds * 1000)]))

    def release_lease(self, job_id: str, owner: str) -> None:
        self._release(keys=[self._lease(job_id)], args=[owner])

    def lease_holder(self, job_id: str) -> str | None:
        """Who runs the job now (None: nobody renews its lease)."""
        return self._r.get(self._lease(job_id))

    def break_lease(self, job_id: str, holder: str) -> bool:
        """Drop a lease whose holder is known dead; only if it is still that holder's."""
        return bool(self._release(keys=[self._lease(job_id)], args=[holder]))


def _opt_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None

