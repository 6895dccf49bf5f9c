"""Migrations: what a caller asks for, and the durable plan in Redis that API and workers share.

A migration moves a whole archive (or the part a filter names) from one source into one or
more stores, study by study, through the normal job machinery. The API only records it
here; the scheduler's leader plans it (study-level C-FIND), feeds its studies to the queue
a few at a time, checks what the destination already holds and verifies each study after
its job (see :mod:`pacsfetch.workers.migrate`).

Layout (``P`` is the key prefix, ``pacsfetch`` by default), all of it plain Redis so that a
migration survives the restart of any process and, with AOF, of Redis itself:

- ``P:mig:ID`` hash: ``request`` (JSON), ``status``, ``created_by``, ``created_at``, ``finished_at``,
  ``plan_done``, ``plan_cursor`` (where planning resumes), counters ``n:STATE`` (studies in
  each state), ``instances_planned``, ``instances_done``, ``instances_moved``,
  ``bytes_moved``, rate and ETA fields, ``paused``, ``cancel``, ``error``, ``waiting_until``;
- ``P:migs`` sorted set of ids by creation; ``P:migs:active`` set of ids the feeder works on;
- ``P:mig:ID:studies`` hash Study Instance UID -> ``state|date|source count|destination
  count|job id|error`` (a few dozen bytes per study: a million studies plan into ~150 MB);
- ``P:mig:ID:queue`` list of studies not fed yet, in plan order;
- ``P:mig:ID:inflight`` hash study -> ``check``, ``verify``, or the id of its job;
- ``P:mig:ID:missing:STUDY`` list of the SOP Instance UIDs a verification found missing.

Every change of a study's state is one Lua script that moves the study between counters,
so the counts always add up to the plan, whatever crashed in between. A finished migration's
keys expire after ``[jobs] retention_days``, like a job's; the retention sweep then drops
its id from ``P:migs``.
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Self

import redis
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from pacsfetch.models import UID
from pacsfetch.studyquery import date_bounds

MAX_LIST_FILTER = 100_000
"""Patient IDs, accession numbers or study UIDs one migration may list."""
CSV_KEYS = {"patient_id": "patient_ids", "accession_number": "accession_numbers",
            "study_uid": "study_uids"}
"""A CSV column header -> the filter list it fills."""
MAX_MISSING_RECORDED = 1000
"""Missing SOP Instance UIDs kept per mismatched study (the count is always exact)."""

_Text = r"^[^\\\x00-\x1f*?]+$"


def _day(value: str) -> str:
    if not re.fullmatch(r"\d{8}", value):
        raise ValueError("must be a date YYYYMMDD")
    date_bounds(value)
    return value


Day = Annotated[str, AfterValidator(_day)]


class MigrationFilter(BaseModel):
    """Which studies to move; empty means the whole archive. The keys combine (AND)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    date_from: Day | None = Field(None, alias="from", description="First study date, YYYYMMDD.")
    date_to: Day | None = Field(None, alias="to", description="Last study date, YYYYMMDD.")
    modalities: list[Annotated[str, Field(pattern=r"^[A-Z0-9]{1,16}$")]] = Field(
        default_factory=list, max_length=32, description="Modalities in study (any of).")
    patient_ids: list[Annotated[str, Field(min_length=1, max_length=64, pattern=_Text)]] = Field(
        default_factory=list, max_length=MAX_LIST_FILTER)
    accession_numbers: list[Annotated[str, Field(min_length=1, max_length=16,
                                                 pattern=_Text)]] = Field(
        default_factory=list, max_length=MAX_LIST_FILTER)
    study_uids: list[UID] = Field(default_factory=list, max_length=MAX_LIST_FILTER)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ValueError("'to' is before 'from'")
        lists = [n for n in ("patient_ids", "accession_numbers", "study_uids") if getattr(self, n)]
        if len(lists) > 1:
            raise ValueError(f"give one list of keys, not {' and '.join(lists)}")
        return self

    @property
    def date_range(self) -> str | None:
        """The StudyDate range matching value, or None for all dates."""
        if not (self.date_from or self.date_to):
            return None
        return f"{self.date_from or ''}-{self.date_to or ''}"


_CSV_ITEM = {name: TypeAdapter(MigrationFilter.model_fields[name].annotation.__args__[0])
             for name in CSV_KEYS.values()}
"""One entry of each list filter, validated alone (for :func:`read_key_csv`)."""


class MigrationRequest(BaseModel):
    """``POST /migrations``: from which source, into which stores, which studies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, description="Name of a `[sources.NAME]` section.")
    stores: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, max_length=8, description="`[stores.NAME]` sections written together.")
    filter: MigrationFilter = MigrationFilter()
    transport: str = Field("auto", min_length=1)
    priority: int = Field(0, ge=0, le=9, description="Of its study jobs; migrations are bulk "
                          "work whatever their priority (they never take the reserved slots).")
    max_in_flight: int = Field(4, ge=1, le=64, description="Study jobs queued or running at "
                               "once; lowered by itself while the source answers 'busy'.")

    @model_validator(mode="after")
    def _distinct_stores(self) -> Self:
        if len(set(self.stores)) != len(self.stores):
            raise ValueError("stores lists a store twice")
        return self


class CsvProblem(ValueError):
    """A CSV list of studies that cannot be used; says where (1-based line, column)."""

    def __init__(self, line: int, column: str | None, message: str) -> None:
        where = f"line {line}" + (f", column {column}" if column else "")
        super().__init__(f"{where}: {message}")
        self.line, self.column, self.message = line, column, message


def read_key_csv(text: str, key: str | None = None) -> tuple[str, list[str], list[int]]:
    """The studies a CSV lists: (filter list name, values, the line of each value).

    The first row names the column (``patient_id``, ``accession_number`` or ``study_uid``;
    other columns are ignored); a file of one column without a header needs *key*. Blank
    cells are skipped; each value is checked as the filter checks it, so a problem is
    reported at its line and column rather than as an index into a list.
    """
    if key is not None and key not in CSV_KEYS:
        raise CsvProblem(1, None, f"key must be one of {', '.join(CSV_KEYS)}")
    try:
        rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"), newline="")))
    except csv.Error as exc:
        raise CsvProblem(1, None, f"not CSV: {exc}") from None
    if not rows:
        raise CsvProblem(1, None, "the CSV is empty")
    header = [cell.strip().lower() for cell in rows[0]]
    known = [name for name in header if name in CSV_KEYS]
    if known:
        column = key or known[0]
        if column not in header:
            raise CsvProblem(1, None, f"no column {column!r} (columns: {', '.join(header)})")
        index, first = header.index(column), 2
    elif len(header) == 1 and key is not None:
        column, index, first = key, 0, 1
    else:
        raise CsvProblem(1, None, "the first row must name the column: patient_id, "
                         "accession_number or study_uid (or give key for a file of one "
                         "column without a header)")
    list_name = CSV_KEYS[column]
    check = _CSV_ITEM[list_name]
    values: list[str] = []
    lines: list[int] = []
    for line, row in enumerate(rows[first - 1:], first):
        value = row[index].strip() if len(row) > index else ""
        if not value:
            continue
        if "*" in value or "?" in value:
            raise CsvProblem(line, column, f"{value[:80]!r} holds a C-FIND wildcard (* or ?): "
                             "list exact values")
        try:
            check.validate_python(value)
        except ValidationError as exc:
            raise CsvProblem(line, column, f"{value[:80]!r}: {exc.errors()[0]['msg']}") from None
        if len(values) == MAX_LIST_FILTER:
            raise CsvProblem(line, column, f"more than {MAX_LIST_FILTER} entries")
        values.append(value)
        lines.append(line)
    if not values:
        raise CsvProblem(first, column, "no values in the column")
    return list_name, values, lines


class MigrationStatus(StrEnum):
    PLANNING = "planning"
    RUNNING = "running"
    WAITING_WINDOW = "waiting-window"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (MigrationStatus.SUCCEEDED, MigrationStatus.PARTIAL,
                        MigrationStatus.FAILED, MigrationStatus.CANCELLED)


class StudyState(StrEnum):
    PLANNED = "planned"
    RUNNING = "running"
    SKIPPED = "skipped"
    """The destination already held the whole study: nothing was fetched."""
    VERIFIED = "verified"
    MISMATCH = "mismatch"
    FAILED = "failed"

    @property
    def is_done(self) -> bool:
        return self in (StudyState.SKIPPED, StudyState.VERIFIED, StudyState.MISMATCH,
                        StudyState.FAILED)


class StudyCounts(BaseModel):
    planned: int = Field(0, description="Studies in the plan so far (all states).")
    waiting: int = Field(0, description="Not started yet.")
    running: int = 0
    skipped: int = 0
    verified: int = 0
    mismatched: int = 0
    failed: int = 0
    done: int = Field(0, description="skipped + verified + mismatched + failed.")


class MigrationRecord(BaseModel):
    """A migration as the API shows it."""

    id: str
    status: MigrationStatus
    request: MigrationRequest
    created_by: str | None = Field(None, description="The API token's name (or `anonymous`).")
    created_at: datetime
    finished_at: datetime | None = None
    plan_complete: bool = Field(False, description="Planning has enumerated every study.")
    studies: StudyCounts = StudyCounts()
    instances_planned: int = Field(0, description="Instances the source reported for the plan.")
    instances_done: int = Field(0, description="Of those, in studies that are done.")
    instances_moved: int = 0
    bytes_moved: int = 0
    instances_per_second: float | None = None
    bytes_per_second: float | None = None
    eta_seconds: float | None = None
    in_flight_limit: int = Field(0, description="Study jobs allowed at once right now.")
    waiting_until: datetime | None = Field(None, description="While waiting-window: the next "
                                           "opening of the source's time windows.")
    error: str | None = None


@dataclass(frozen=True)
class StudyRow:
    """One study of a migration's plan."""

    study_uid: str
    state: StudyState
    study_date: str = ""
    instances_source: int | None = None
    instances_destination: int | None = None
    job_id: str = ""
    error: str = ""

    def pack(self) -> str:
        return "|".join([self.state.value, self.study_date, _num(self.instances_source),
                         _num(self.instances_destination), self.job_id,
                         self.error.replace("\n", " ")])

    @classmethod
    def unpack(cls, study_uid: str, packed: str) -> StudyRow:
        state, date, src, dst, job, error = packed.split("|", 5)
        return cls(study_uid, StudyState(state), date, _int(src), _int(dst), job, error)

    def as_dict(self) -> dict[str, Any]:
        return {"study_uid": self.study_uid, "status": self.state.value,
                "study_date": self.study_date or None,
                "instances_source": self.instances_source,
                "instances_destination": self.instances_destination,
                "job_id": self.job_id or None, "error": self.error or None}


def _num(value: int | None) -> str:
    return "" if value is None else str(value)


def _int(text: str) -> int | None:
    return int(text) if text else None


class MigrationNotFound(KeyError):
    """No migration with that id."""


# KEYS: migration hash, studies hash, queue. ARGV: cursor JSON, then (uid, packed, count)*.
# Adds studies not in the plan yet, and moves the planning cursor, atomically: a planner
# killed mid-window redoes the window and adds nothing twice.
_ADD = """
local added = 0
for i = 2, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('RPUSH', KEYS[3], ARGV[i])
    redis.call('HINCRBY', KEYS[1], 'instances_planned', tonumber(ARGV[i + 2]))
    added = added + 1
  end
end
redis.call('HINCRBY', KEYS[1], 'n:planned', added)
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'plan_cursor', ARGV[1]) end
return added
"""

# KEYS: migration hash, queue, inflight. ARGV: limit. Moves studies from the queue to the
# in-flight set (marked 'check') until *limit* are in flight; returns them.
_TAKE = """
local taken = {}
while redis.call('HLEN', KEYS[3]) < tonumber(ARGV[1]) do
  local uid = redis.call('LPOP', KEYS[2])
  if not uid then break end
  redis.call('HSET', KEYS[3], uid, 'check')
  taken[#taken + 1] = uid
end
return taken
"""

# KEYS: migration hash, studies hash, inflight, queue. ARGV: uid, packed row, inflight value
# ('' removes it), instances moved, bytes moved, requeue (0/1: front of the queue, 2: back),
# instances done (counted towards the ETA). Moves the study between state counters.
_SET = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if not old then return 0 end
local old_state = string.match(old, '^[^|]*')
local new_state = string.match(ARGV[2], '^[^|]*')
if old_state ~= new_state then
  redis.call('HINCRBY', KEYS[1], 'n:' .. old_state, -1)
  redis.call('HINCRBY', KEYS[1], 'n:' .. new_state, 1)
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if ARGV[3] == '' then redis.call('HDEL', KEYS[3], ARGV[1])
else redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) end
if tonumber(ARGV[4]) ~= 0 then redis.call('HINCRBY', KEYS[1], 'instances_moved', ARGV[4]) end
if tonumber(ARGV[5]) ~= 0 then redis.call('HINCRBY', KEYS[1], 'bytes_moved', ARGV[5]) end
if tonumber(ARGV[7]) ~= 0 then redis.call('HINCRBY', KEYS[1], 'instances_done', ARGV[7]) end
if ARGV[6] == '1' then redis.call('LPUSH', KEYS[4], ARGV[1])
elseif ARGV[6] == '2' then redis.call('RPUSH', KEYS[4], ARGV[1]) end
return 1
"""


def _now() -> datetime:
    return datetime.now(UTC)


class MigrationStore:
    """All reads and writes of migration state go through here (API and workers alike)."""

    def __init__(self, client: redis.Redis, prefix: str = "pacsfetch", *,
                 retention_seconds: int | None = None) -> None:
        """*retention_seconds*: how long a finished migration stays (``[jobs]
        retention_days``); None keeps it (tools that only read)."""
        self._r = client
        self._p = prefix
        self._retention = retention_seconds
        self._add = client.register_script(_ADD)
        self._take = client.register_script(_TAKE)
        self._set = client.register_script(_SET)

    @classmethod
    def from_url(cls, url: str, prefix: str = "pacsfetch", *,
                 retention_seconds: int | None = None) -> MigrationStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), prefix,
                   retention_seconds=retention_seconds)

    @property
    def client(self) -> redis.Redis:
        return self._r

    # keys -------------------------------------------------------------------------------
    def key(self, mig_id: str, part: str = "") -> str:
        return f"{self._p}:mig:{mig_id}" + (f":{part}" if part else "")

    @property
    def _all(self) -> str:
        return f"{self._p}:migs"

    @property
    def _active(self) -> str:
        return f"{self._p}:migs:active"

    # creation and reading ---------------------------------------------------------------
    def create(self, request: MigrationRequest, created_by: str | None = None) -> MigrationRecord:
        mig_id = uuid.uuid4().hex
        created = _now()
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self.key(mig_id), mapping={
            "request": request.model_dump_json(by_alias=True), "created_by": created_by or "",
            "status": MigrationStatus.PLANNING.value, "created_at": created.isoformat(),
            "plan_done": "0", "limit": str(request.max_in_flight)})
        pipe.zadd(self._all, {mig_id: created.timestamp()})
        pipe.sadd(self._active, mig_id)
        pipe.execute()
        return self.get(mig_id)

    def exists(self, mig_id: str) -> bool:
        return mig_id.isalnum() and bool(self._r.exists(self.key(mig_id)))

    def fields(self, mig_id: str) -> dict[str, str]:
        data = self._r.hgetall(self.key(mig_id)) if mig_id.isalnum() else {}
        if not data:
            raise MigrationNotFound(mig_id)
        return data

    def get(self, mig_id: str) -> MigrationRecord:
        return self._record(mig_id, self.fields(mig_id))

    def list(self, offset: int = 0, limit: int = 50) -> tuple[list[MigrationRecord], int]:
        """Newest first; one page and the total."""
        total = int(self._r.zcard(self._all))
        ids = self._r.zrevrange(self._all, offset, offset + limit - 1)
        pipe = self._r.pipeline(transaction=False)
        for mig_id in ids:
            pipe.hgetall(self.key(mig_id))
        rows = pipe.execute()
        return [self._record(i, d) for i, d in zip(ids, rows, strict=True) if d], total

    def active(self) -> list[str]:
        return sorted(self._r.smembers(self._active))

    def _record(self, mig_id: str, data: dict[str, str]) -> MigrationRecord:
        n = {state: int(data.get(f"n:{state.value}", 0)) for state in StudyState}
        done = sum(v for s, v in n.items() if s.is_done)
        counts = StudyCounts(planned=sum(n.values()), waiting=n[StudyState.PLANNED],
                             running=n[StudyState.RUNNING], skipped=n[StudyState.SKIPPED],
                             verified=n[StudyState.VERIFIED],
                             mismatched=n[StudyState.MISMATCH], failed=n[StudyState.FAILED],
                             done=done)
        status = MigrationStatus(data["status"])
        if data.get("cancel") == "1":
            status = MigrationStatus.CANCELLED
        elif data.get("paused") == "1" and not status.is_final:
            status = MigrationStatus.PAUSED
        return MigrationRecord(
            id=mig_id, status=status,
            request=MigrationRequest.model_validate_json(data["request"]),
            created_by=data.get("created_by") or None,
            created_at=datetime.fromisoformat(data["created_at"]),
            finished_at=_time(data.get("finished_at")),
            plan_complete=data.get("plan_done") == "1", studies=counts,
            instances_planned=int(data.get("instances_planned", 0)),
            instances_done=int(data.get("instances_done", 0)),
            instances_moved=int(data.get("instances_moved", 0)),
            bytes_moved=int(data.get("bytes_moved", 0)),
            instances_per_second=_float(data.get("rate_ips")),
            bytes_per_second=_float(data.get("rate_bps")),
            eta_seconds=_float(data.get("eta")),
            in_flight_limit=int(data.get("limit", 0)),
            waiting_until=_time(data.get("waiting_until")),
            error=data.get("error") or None,
        )

    # planning ---------------------------------------------------------------------------
    def add_studies(self, mig_id: str, rows: list[StudyRow], cursor: str = "") -> int:
        """Add planned studies (those already planned are left alone) and move the cursor."""
        args: list[str] = [cursor]
        for row in rows:
            args += [row.study_uid, row.pack(), str(row.instances_source or 0)]
        return int(self._add(keys=[self.key(mig_id), self.key(mig_id, "studies"),
                                   self.key(mig_id, "queue")], args=args))

    def finish_planning(self, mig_id: str, error: str | None = None) -> None:
        fields = {"plan_done": "1"}
        if error:
            fields["error"] = error
        self._r.hset(self.key(mig_id), mapping=fields)

    # feeding ----------------------------------------------------------------------------
    def take(self, mig_id: str, limit: int) -> list[str]:
        """Studies moved from the queue into flight, up to *limit* in flight."""
        return list(self._take(keys=[self.key(mig_id), self.key(mig_id, "queue"),
                                     self.key(mig_id, "inflight")], args=[limit]))

    def inflight(self, mig_id: str) -> dict[str, str]:
        return self._r.hgetall(self.key(mig_id, "inflight"))

    def queued(self, mig_id: str) -> int:
        return int(self._r.llen(self.key(mig_id, "queue")))

    def study(self, mig_id: str, study_uid: str) -> StudyRow | None:
        packed = self._r.hget(self.key(mig_id, "studies"), study_uid)
        return StudyRow.unpack(study_uid, packed) if packed else None

    def set_study(self, mig_id: str, row: StudyRow, *, inflight: str = "", moved: int = 0,
                  moved_bytes: int = 0, requeue: int = 0, done_instances: int = 0) -> None:
        """Change a study's row and state counters in one step (see :data:`_SET`)."""
        self._set(keys=[self.key(mig_id), self.key(mig_id, "studies"),
                        self.key(mig_id, "inflight"), self.key(mig_id, "queue")],
                  args=[row.study_uid, row.pack(), inflight, moved, moved_bytes, requeue,
                        done_instances])

    def record_missing(self, mig_id: str, study_uid: str, missing: list[str]) -> None:
        key = self.key(mig_id, f"missing:{study_uid}")
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(key)
        if missing:
            pipe.rpush(key, *sorted(missing)[:MAX_MISSING_RECORDED])
        pipe.execute()

    def missing(self, mig_id: str, study_uid: str) -> list[str]:
        return list(self._r.lrange(self.key(mig_id, f"missing:{study_uid}"), 0, -1))

    def set_fields(self, mig_id: str, **fields: str | int | float | None) -> None:
        """Set fields; None removes one."""
        pipe = self._r.pipeline(transaction=False)
        present = {k: str(v) for k, v in fields.items() if v is not None}
        if present:
            pipe.hset(self.key(mig_id), mapping=present)
        absent = [k for k, v in fields.items() if v is None]
        if absent:
            pipe.hdel(self.key(mig_id), *absent)
        pipe.execute()

    def finish(self, mig_id: str, status: MigrationStatus) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self.key(mig_id), mapping={"status": status.value,
                                             "finished_at": _now().isoformat(), "eta": "0"})
        pipe.hdel(self.key(mig_id), "waiting_until")
        pipe.srem(self._active, mig_id)
        pipe.execute()
        if self._retention is not None:
            self._expire(mig_id, self._retention)

    def _keys(self, mig_id: str) -> Iterator[str]:
        """Every key of a migration (the missing-UID lists of failed and mismatched studies
        found by reading the plan once)."""
        yield from (self.key(mig_id), self.key(mig_id, "studies"), self.key(mig_id, "queue"),
                    self.key(mig_id, "inflight"))
        for row in self.scan_studies(mig_id):
            if row.state in (StudyState.MISMATCH, StudyState.FAILED):
                yield self.key(mig_id, f"missing:{row.study_uid}")

    def _expire(self, mig_id: str, seconds: int | None) -> None:
        """Let every key of the migration expire after *seconds*; None keeps them again."""
        pipe = self._r.pipeline(transaction=False)
        for n, key in enumerate(self._keys(mig_id), 1):
            pipe.expire(key, seconds) if seconds is not None else pipe.persist(key)
            if n % 1000 == 0:
                pipe.execute()
        pipe.execute()

    def prune_index(self) -> int:
        """Drop the ids of expired migrations from the index; how many (retention sweep)."""
        ids = self._r.zrange(self._all, 0, -1)
        pipe = self._r.pipeline(transaction=False)
        for mig_id in ids:
            pipe.exists(self.key(mig_id))
        gone = [i for i, present in zip(ids, pipe.execute(), strict=True) if not present]
        if gone:
            self._r.zrem(self._all, *gone)
            self._r.srem(self._active, *gone)
        return len(gone)

    # control ----------------------------------------------------------------------------
    def pause(self, mig_id: str, paused: bool) -> MigrationRecord:
        self.fields(mig_id)
        self._r.hset(self.key(mig_id), "paused", "1" if paused else "0")
        return self.get(mig_id)

    def cancel(self, mig_id: str) -> MigrationRecord:
        """Cancel: the feeder stops feeding and cancels the study jobs in flight."""
        self.fields(mig_id)
        self._r.hset(self.key(mig_id), mapping={"cancel": "1", "error": "cancelled by request"})
        return self.get(mig_id)

    def retry_failed(self, mig_id: str) -> int:
        """Put every failed or mismatched study back into the queue; reopens a finished
        migration. Returns how many."""
        self.fields(mig_id)
        again = 0
        for row in self.scan_studies(mig_id):
            if row.state in (StudyState.FAILED, StudyState.MISMATCH):
                fresh = StudyRow(row.study_uid, StudyState.PLANNED, row.study_date,
                                 row.instances_source)
                self.set_study(mig_id, fresh, requeue=2,
                               done_instances=-(row.instances_source or 0))
                again += 1
        if again:
            self._expire(mig_id, None)  # running again: kept until it finishes again
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(self.key(mig_id), "status", MigrationStatus.RUNNING.value)
            pipe.hdel(self.key(mig_id), "finished_at", "error")
            pipe.sadd(self._active, mig_id)
            pipe.execute()
        return again

    # reading the plan -------------------------------------------------------------------
    def studies_page(self, mig_id: str, cursor: int, limit: int,
                     state: StudyState | None = None) -> tuple[int, list[StudyRow]]:
        """One page of the plan (HSCAN order); the next cursor is 0 when done. With *state*,
        a page may hold fewer than *limit* rows (keep following the cursor)."""
        next_cursor, raw = self._r.hscan(self.key(mig_id, "studies"), cursor, count=limit)
        rows = [StudyRow.unpack(uid, packed) for uid, packed in raw.items()]
        if state is not None:
            rows = [row for row in rows if row.state is state]
        return int(next_cursor), rows

    def scan_studies(self, mig_id: str) -> Iterator[StudyRow]:
        for uid, packed in self._r.hscan_iter(self.key(mig_id, "studies"), count=1000):
            yield StudyRow.unpack(uid, packed)

    def report_csv(self, mig_id: str) -> Iterator[str]:
        """The report, one CSV row per study, produced as it is read (flat memory)."""
        self.fields(mig_id)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["study_uid", "study_date", "status", "instances_source",
                         "instances_destination", "job_id", "missing", "error"])
        for row in self.scan_studies(mig_id):
            missing = self.missing(mig_id, row.study_uid) if row.state is StudyState.MISMATCH \
                else []
            writer.writerow([row.study_uid, row.study_date, row.state.value,
                             _num(row.instances_source), _num(row.instances_destination),
                             row.job_id, " ".join(missing), row.error])
            if out.tell() > 65536:
                yield out.getvalue()
                out.seek(0)
                out.truncate()
        yield out.getvalue()

    def totals(self) -> MigrationTotals:
        """Sums over the migrations Redis still holds (finished ones until they expire), per
        source, for the metrics. One pipelined read of each migration's hash: a scrape
        costs one round trip whatever the number of migrations."""
        totals = MigrationTotals()
        ids = self._r.zrange(self._all, 0, -1)
        pipe = self._r.pipeline(transaction=False)
        for mig_id in ids:
            pipe.hgetall(self.key(mig_id))
        for data in pipe.execute():
            if not data:
                continue
            record = self._record("", data)
            totals.add(record)
        return totals


@dataclass
class MigrationTotals:
    """What the metrics show of migrations; keys are configured source names (bounded)."""

    by_status: dict[str, int] = field(default_factory=dict)
    """Migrations by status."""
    studies: dict[tuple[str, str], int] = field(default_factory=dict)
    """(source, study state) -> studies."""
    instances_planned: dict[str, int] = field(default_factory=dict)
    instances_moved: dict[str, int] = field(default_factory=dict)
    bytes_moved: dict[str, int] = field(default_factory=dict)
    eta: dict[str, float] = field(default_factory=dict)
    """The longest ETA of an unfinished migration per source."""

    def add(self, record: MigrationRecord) -> None:
        source = record.request.source
        self.by_status[record.status.value] = self.by_status.get(record.status.value, 0) + 1
        counts = record.studies
        for state, n in (("planned", counts.waiting), ("running", counts.running),
                         ("skipped", counts.skipped), ("verified", counts.verified),
                         ("mismatch", counts.mismatched), ("failed", counts.failed)):
            self.studies[source, state] = self.studies.get((source, state), 0) + n
        for into, value in ((self.instances_planned, record.instances_planned),
                            (self.instances_moved, record.instances_moved),
                            (self.bytes_moved, record.bytes_moved)):
            into[source] = into.get(source, 0) + value
        if not record.status.is_final and record.eta_seconds is not None:
            self.eta[source] = max(self.eta.get(source, 0.0), record.eta_seconds)


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None
