"""How many associations the fleet holds open to each PACS, when bulk work may run, how fast.

A production archive serves people while it is migrated. Three limits keep pacsfetch kind
to it, each per source and for every worker process at once:

- ``max_associations``: slots are leases in Redis (a sorted set of tokens scored by their
  expiry). Whoever opens an association to the PACS (C-FIND, C-GET, C-MOVE, or a DICOMweb
  request) holds a slot for its whole life; a process renews its leases in the background,
  so the slots of a killed worker come back by themselves within :data:`SLOT_TTL`.
- priorities: *bulk* work (a migration) never takes the last ``reserved_associations``
  slots, and takes none while a prefetch or an interactive job waits; a bulk holder asked
  :meth:`Slot.should_yield` between series hands its slot over.
- ``windows``: bulk work opens no association outside the source's time windows, and a
  bulk holder is told to yield when a window closes (it finishes its current series first).
- ``max_mb_per_second``: a fleet-wide token bucket (GCRA) the receive loops draw from in
  chunks, so the per-PDU cost is a subtraction.

Without a broker (``pacsfetch retrieve`` on a laptop) :meth:`AssociationGate.local` keeps
the same rules within the one process.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import redis

from pacsfetch.config import Config, SourceConfig
from pacsfetch.errors import ErrorKind, RetrieveError
from pacsfetch.metrics import ASSOCIATION_SLOT_WAIT, ASSOCIATION_SLOT_WAITING
from pacsfetch.windows import Schedule

log = logging.getLogger(__name__)

SLOT_TTL = 15.0
"""Seconds a slot lease lives unless its process renews it (every third of that)."""
WAITER_TTL = 3.0
"""Seconds a waiting prefetch or interactive job blocks bulk work without polling again."""
POLL_SECONDS = 0.2
"""How often a waiting caller asks again (with jitter): well inside "a few seconds"."""
YIELD_CHECK_SECONDS = 1.0
"""How often :meth:`Slot.should_yield` asks Redis at most."""
RATE_BURST_SECONDS = 1.0
"""Data the rate cap lets through at once after a pause, in seconds of the rate."""

# KEYS: held, waiting. ARGV: ttl_ms, limit, bulk (0/1), token, waiter_ttl_ms. Server time,
# so hosts with skewed clocks agree. A caller that is not bulk and finds no slot registers
# as a waiter, which keeps bulk callers out. Returns {acquired, held}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local bulk = ARGV[3] == '1'
if bulk and redis.call('ZCARD', KEYS[2]) > 0 then return {0, held} end
if held < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[4])
  redis.call('ZREM', KEYS[2], ARGV[4])
  return {1, held + 1}
end
if not bulk then redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4]) end
return {0, held}
"""

# KEYS: held... ARGV: ttl_ms, then one token per key.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do redis.call('ZADD', KEYS[i], now + tonumber(ARGV[1]), ARGV[i + 1]) end
return #KEYS
"""

# KEYS: waiting. Live non-bulk waiters.
_WAITERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""

# GCRA: KEYS: theoretical arrival time. ARGV: cost_ms, burst_ms. Returns ms to wait.
_RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local after = tat + tonumber(ARGV[1])
redis.call('SET', KEYS[1], tostring(after), 'PX', math.ceil(after - now) + 1000)
local wait = after - now - tonumber(ARGV[2])
if wait < 0 then wait = 0 end
return tostring(wait)
"""


@dataclass(frozen=True, slots=True)
class Waiting:
    """Why a caller waits, for the job record (``waiting_for``) and the logs."""

    reason: str
    """``slot`` (every association the cap allows is open) or ``window`` (bulk work
    outside the source's time windows)."""
    detail: str
    until: datetime | None = None

    def __str__(self) -> str:
        return self.detail


class GateCancelled(Exception):
    """The job was cancelled (or is draining) while it waited for a slot or a window."""


class _Slots(Protocol):
    """Where slot leases live: Redis for the fleet, or this process alone."""

    ttl: float
    """Seconds a lease lives unless renewed."""

    def try_acquire(self, source: str, token: str, limit: int, bulk: bool) -> tuple[bool, int]: ...
    def release(self, source: str, token: str) -> None: ...
    def waiters(self, source: str) -> int: ...
    def renew(self, held: Mapping[str, str]) -> None: ...
    def held(self, source: str) -> int: ...
    def rate_wait(self, source: str, cost_ms: float, burst_ms: float) -> float: ...


class _RedisSlots:
    def __init__(self, client: redis.Redis, prefix: str, ttl: float = SLOT_TTL) -> None:
        self._r = client
        self._p = prefix
        self.ttl = ttl
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._waiters = client.register_script(_WAITERS)
        self._rate = client.register_script(_RATE)

    def _held_key(self, source: str) -> str:
        return f"{self._p}:gate:{source}:held"

    def _waiting_key(self, source: str) -> str:
        return f"{self._p}:gate:{source}:waiting"

    def try_acquire(self, source: str, token: str, limit: int, bulk: bool) -> tuple[bool, int]:
        acquired, held = self._acquire(
            keys=[self._held_key(source), self._waiting_key(source)],
            args=[int(self.ttl * 1000), limit, 1 if bulk else 0, token, int(WAITER_TTL * 1000)])
        return bool(acquired), int(held)

    def release(self, source: str, token: str) -> None:
        pipe = self._r.pipeline(transaction=False)
        pipe.zrem(self._held_key(source), token)
        pipe.zrem(self._waiting_key(source), token)
        pipe.execute()

    def waiters(self, source: str) -> int:
        return int(self._waiters(keys=[self._waiting_key(source)]))

    def renew(self, held: Mapping[str, str]) -> None:
        if held:
            self._renew(keys=[self._held_key(s) for s in held.values()],
                        args=[int(self.ttl * 1000), *held])

    def ping(self) -> None:
        self._r.ping()

    def held(self, source: str) -> int:
        now_ms = int(time.time() * 1000)
        return int(self._r.zcount(self._held_key(source), now_ms, "+inf"))

    def rate_wait(self, source: str, cost_ms: float, burst_ms: float) -> float:
        return float(self._rate(keys=[f"{self._p}:gate:{source}:rate"], args=[cost_ms, burst_ms]))


class _LocalSlots:
    """The same rules for one process, for ``pacsfetch retrieve`` without a broker."""

    ttl = SLOT_TTL

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, set[str]] = {}
        self._waiting: dict[str, dict[str, float]] = {}
        self._tat: dict[str, float] = {}

    def try_acquire(self, source: str, token: str, limit: int, bulk: bool) -> tuple[bool, int]:
        with self._lock:
            held = self._held.setdefault(source, set())
            waiting = self._waiting.setdefault(source, {})
            now = time.monotonic()
            for stale in [t for t, expiry in waiting.items() if expiry < now]:
                del waiting[stale]
            if (not bulk or not waiting) and len(held) < limit:
                held.add(token)
                waiting.pop(token, None)
                return True, len(held)
            if not bulk:
                waiting[token] = now + WAITER_TTL
            return False, len(held)

    def release(self, source: str, token: str) -> None:
        with self._lock:
            self._held.get(source, set()).discard(token)
            self._waiting.get(source, {}).pop(token, None)

    def waiters(self, source: str) -> int:
        now = time.monotonic()
        with self._lock:
            return sum(1 for expiry in self._waiting.get(source, {}).values() if expiry >= now)

    def renew(self, held: Mapping[str, str]) -> None:
        """Local leases never lapse: the process that holds them is this one."""

    def held(self, source: str) -> int:
        with self._lock:
            return len(self._held.get(source, ()))

    def rate_wait(self, source: str, cost_ms: float, burst_ms: float) -> float:
        with self._lock:
            now = time.monotonic() * 1000
            after = max(self._tat.get(source, 0.0), now) + cost_ms
            self._tat[source] = after
            return max(0.0, after - now - burst_ms)


class _Renewer(threading.Thread):
    """Renews every slot this process holds, so only a dead process's slots lapse."""

    def __init__(self, slots: _Slots) -> None:
        super().__init__(daemon=True, name="slot-renewer")
        self._slots = slots
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # token -> source
        self.pid = os.getpid()
        self.finished = False

    def add(self, token: str, source: str) -> bool:
        """Renew *token* from now on; False when this thread has ended (start another)."""
        with self._lock:
            if self.finished:
                return False
            self._held[token] = source
            return True

    def discard(self, token: str) -> None:
        with self._lock:
            self._held.pop(token, None)

    def run(self) -> None:
        while True:
            time.sleep(self._slots.ttl / 3)
            with self._lock:
                held = dict(self._held)
                if not held:  # nothing to renew: end; the next acquire starts a new thread
                    self.finished = True
                    return
            try:
                self._slots.renew(held)
            except redis.RedisError as exc:  # keep trying: the leases outlive a short outage
                log.warning("could not renew association slots", extra={
                    "slots": len(held), "reason": type(exc).__name__})


class Slot:
    """One association's claim on its source; release it when the association closes."""

    def __init__(self, gate: AssociationGate, source_name: str, token: str, bulk: bool) -> None:
        self._gate = gate
        self.source_name = source_name
        self.token = token
        self.bulk = bulk
        self._released = False
        self._next_check = 0.0
        self._verdict: Waiting | None = None

    def should_yield(self) -> Waiting | None:
        """For bulk work: whether to close this association at the next clean point (between
        series) and acquire again, because a window closed or a prefetch or interactive job
        waits for the slot. Cheap enough to call between requests: it asks Redis at most
        once a second. Always None for other work."""
        if not self.bulk or self._released:
            return None
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + YIELD_CHECK_SECONDS
            self._verdict = self._gate.yield_reason(self.source_name)
        return self._verdict

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._gate.release(self)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RateLimiter:
    """The source's data-rate cap, drawn from in chunks: :meth:`consume` per PDU is cheap.

    Use one per association (it is not shared between threads)."""

    def __init__(self, slots: _Slots, source_name: str, mb_per_second: float) -> None:
        self._slots = slots
        self._source = source_name
        rate = mb_per_second * 1_000_000
        self._chunk = int(min(max(rate / 10, 64 * 1024), 4 * 1024 * 1024))
        self._cost_ms = self._chunk / rate * 1000
        self._burst_ms = RATE_BURST_SECONDS * 1000
        self._budget = 0

    def consume(self, nbytes: int) -> None:
        """Account for *nbytes* received; sleeps while the source is over its rate."""
        self._budget -= nbytes
        while self._budget < 0:
            try:
                wait_ms = self._slots.rate_wait(self._source, self._cost_ms, self._burst_ms)
            except redis.RedisError:
                wait_ms = self._cost_ms  # without Redis, hold this process to the rate alone
            self._budget += self._chunk
            if wait_ms > 0:
                time.sleep(wait_ms / 1000)


@dataclass
class AssociationGate:
    """The three limits of every configured source; one per process is enough."""

    slots: _Slots
    sources: Mapping[str, SourceConfig]
    outage_seconds: float = 60.0
    """How long :meth:`acquire` rides out an unreachable Redis before failing the job."""
    _renewer: _Renewer | None = field(default=None, init=False, repr=False)
    _schedules: dict[str, Schedule] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def from_url(cls, url: str, sources: Mapping[str, SourceConfig], prefix: str = "pacsfetch",
                 outage_seconds: float = 60.0, slot_ttl: float = SLOT_TTL) -> AssociationGate:
        return cls(_RedisSlots(_client(url), prefix, slot_ttl), sources, outage_seconds)

    @classmethod
    def local(cls, sources: Mapping[str, SourceConfig]) -> AssociationGate:
        return cls(_LocalSlots(), sources)

    # limits of a source --------------------------------------------------------------
    def schedule(self, source_name: str) -> Schedule:
        if source_name not in self._schedules:
            source = self.sources[source_name]
            self._schedules[source_name] = Schedule(source.windows, source.timezone)
        return self._schedules[source_name]

    def limit(self, source_name: str, bulk: bool) -> int:
        """Slots *bulk* work (or other work) may hold: bulk work leaves the reserve."""
        source = self.sources[source_name]
        if not bulk:
            return source.max_associations
        reserve = min(source.reserved_associations, source.max_associations - 1)
        return source.max_associations - reserve

    def window_wait(self, source_name: str, now: datetime | None = None) -> Waiting | None:
        """Why bulk work must not open an association now (None: it may)."""
        schedule = self.schedule(source_name)
        now = now or datetime.now(UTC)
        if schedule.is_open(now):
            return None
        opening = schedule.next_opening(now)
        when = opening.isoformat(timespec="minutes") if opening else "never"
        return Waiting("window", f"outside the time windows of source {source_name!r}: the "
                       f"next opens at {when}", opening)

    def yield_reason(self, source_name: str) -> Waiting | None:
        """Why a bulk holder should hand its slot back now (None: keep it)."""
        closed = self.window_wait(source_name)
        if closed is not None:
            return closed
        try:
            waiters = self.slots.waiters(source_name)
        except redis.RedisError:
            return None
        if waiters:
            return Waiting("slot", f"{waiters} prefetch or interactive job(s) wait for an "
                           f"association to source {source_name!r}")
        return None

    def in_use(self, source_name: str) -> int:
        return self.slots.held(source_name)

    def rate(self, source_name: str) -> RateLimiter | None:
        """A limiter for one association, or None when the source has no rate cap."""
        mb = self.sources[source_name].max_mb_per_second
        return RateLimiter(self.slots, source_name, mb) if mb else None

    # slots ----------------------------------------------------------------------------
    def acquire(self, source_name: str, *, bulk: bool = False,
                on_wait: Callable[[Waiting | None], None] | None = None,
                cancelled: Callable[[], bool] | None = None) -> Slot:
        """Block until the source has a slot for this caller; returns it.

        *on_wait* hears why the caller waits (once per change of reason) and ``None`` once
        it got the slot after waiting. Raises :class:`GateCancelled` when *cancelled* turns
        true while waiting, and :class:`RetrieveError` (``connection``) when Redis stays
        unreachable for :attr:`outage_seconds`.
        """
        if source_name not in self.sources:
            raise KeyError(source_name)
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        limit = self.limit(source_name, bulk)
        shown: Waiting | None = None
        started = time.monotonic()
        outage_since: float | None = None
        waiting_metric = None
        try:
            while True:
                reason = self.window_wait(source_name) if bulk else None
                if reason is None:
                    try:
                        acquired, held = self.slots.try_acquire(source_name, token, limit, bulk)
                        outage_since = None
                    except redis.RedisError as exc:
                        outage_since = outage_since or time.monotonic()
                        if time.monotonic() - outage_since > self.outage_seconds:
                            raise RetrieveError(
                                ErrorKind.CONNECTION,
                                f"Redis, which holds the association cap of source "
                                f"{source_name!r}, did not answer for "
                                f"{self.outage_seconds:g} s: {type(exc).__name__}") from None
                        acquired, held = False, -1
                    if acquired:
                        break
                    if held >= 0:
                        reason = self._slot_wait(source_name, held, bulk)
                if reason is not None and (shown is None or shown.reason != reason.reason):
                    shown = reason
                    if waiting_metric is None:
                        waiting_metric = ASSOCIATION_SLOT_WAITING.labels(source_name, reason.reason)
                        waiting_metric.inc()
                    if on_wait is not None:
                        on_wait(reason)
                if cancelled is not None and cancelled():
                    self._forget(source_name, token)
                    raise GateCancelled(source_name)
                time.sleep(self._pause(reason))
        finally:
            if waiting_metric is not None:
                waiting_metric.dec()
        if shown is not None:
            ASSOCIATION_SLOT_WAIT.labels(source_name).observe(time.monotonic() - started)
            if on_wait is not None:
                on_wait(None)
        self._renew(token, source_name)
        return Slot(self, source_name, token, bulk)

    def release(self, slot: Slot) -> None:
        with self._lock:
            if self._renewer is not None:
                self._renewer.discard(slot.token)
        self._forget(slot.source_name, slot.token)

    def _forget(self, source_name: str, token: str) -> None:
        try:
            self.slots.release(source_name, token)
        except redis.RedisError as exc:  # the lease lapses by itself within SLOT_TTL
            log.warning("could not release an association slot", extra={
                "source": source_name, "reason": type(exc).__name__})

    def _slot_wait(self, source_name: str, held: int, bulk: bool) -> Waiting:
        source = self.sources[source_name]
        text = (f"an association to source {source_name!r}: {held} of "
                f"{source.max_associations} in use")
        if bulk and self.limit(source_name, True) < source.max_associations:
            text += (f", {source.max_associations - self.limit(source_name, True)} kept for "
                     "prefetch and interactive jobs")
        return Waiting("slot", text)

    @staticmethod
    def _pause(reason: Waiting | None) -> float:
        if reason is not None and reason.until is not None:
            remaining = (reason.until - datetime.now(UTC)).total_seconds()
            return min(max(remaining, POLL_SECONDS), 5.0)
        return POLL_SECONDS * random.uniform(0.75, 1.25)

    def _renew(self, token: str, source_name: str) -> None:
        with self._lock:
            renewer = self._renewer
            if renewer is None or renewer.pid != os.getpid() or not renewer.add(token, source_name):
                renewer = self._renewer = _Renewer(self.slots)  # none yet, ended, or forked
                renewer.add(token, source_name)
                renewer.start()


@dataclass
class JobGate:
    """The gate as one job sees it: its source, its class of work, its waiting and cancel
    hooks bound, so a transport just calls :meth:`acquire` before each association."""

    gate: AssociationGate
    source_name: str
    bulk: bool = False
    on_wait: Callable[[Waiting | None], None] | None = None
    cancelled: Callable[[], bool] | None = None

    def acquire(self) -> Slot:
        return self.gate.acquire(self.source_name, bulk=self.bulk, on_wait=self.on_wait,
                                 cancelled=self.cancelled)

    def rate(self) -> RateLimiter | None:
        return self.gate.rate(self.source_name)


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=10,
                                socket_connect_timeout=5)


def open_gate(broker_url: str, sources: Mapping[str, SourceConfig],
              outage_seconds: float = 60.0) -> AssociationGate:
    """The fleet's gate when the broker answers, else one for this process alone (logged)."""
    slots = _RedisSlots(_client(broker_url), "pacsfetch")
    try:
        slots.ping()
    except redis.RedisError:
        log.warning("no broker: association caps apply to this process only")
        return AssociationGate.local(sources)
    return AssociationGate(slots, sources, outage_seconds)


_process_gates: dict[tuple[int, str], AssociationGate] = {}


def process_gate(config: Config) -> AssociationGate:
    """This process's gate for *config*'s broker: one renewer thread, one Redis client
    (rebuilt after a fork, as prefork children must not share their parent's sockets)."""
    key = (os.getpid(), config.broker.url + config.model_dump_json(include={"sources"}))
    if key not in _process_gates:
        _process_gates.clear()
        _process_gates[key] = open_gate(config.broker.url, config.sources,
                                        config.worker.redis_outage_seconds)
    return _process_gates[key]
