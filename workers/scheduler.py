"""``pacsfetch scheduler``: the one process that does time-driven work for the fleet.

Some work is not a reaction to a request but to the clock: feeding a migration's next
studies to the queue as slots and windows allow, starting a prefetch ``lead_minutes``
before its exam, polling a modality worklist. Celery ETA tasks are no place for long waits
(on Redis they are redelivered after the visibility timeout, so a wait of hours runs
twice), so the waiting lives in Redis and this process acts when it is due.

Exactly one scheduler acts at a time, however many run: each tick it must hold the leader
lease (a Redis key with a TTL, renewed by compare-and-expire). A second replica, or the
old pod of a rolling update, stands by until the lease lapses. Duties must still be
idempotent (a lease can lapse between a check and an action when Redis stalls), which
their Redis scripts make them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import redis

from pacsfetch import retention
from pacsfetch.config import Config

log = logging.getLogger(__name__)

LEADER_TTL = 15.0
"""Seconds the leader lease lives without renewal; a dead leader is replaced after it."""

# KEYS: leader. ARGV: holder, ttl_ms. Take the lease if free, renew it if ours.
_LEAD = """
local holder = redis.call('GET', KEYS[1])
if (not holder) or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class Duty:
    """Something the scheduler does every *interval* seconds while it leads."""

    name: str
    interval: float
    run: Callable[[], None]
    """Does one round of the work; exceptions are logged and the duty runs again later."""
    next_run: float = field(default=0.0, init=False)


class Scheduler:
    """Runs duties while this process holds the leader lease."""

    def __init__(self, client: redis.Redis, duties: Sequence[Duty], prefix: str = "pacsfetch",
                 lease_ttl: float = LEADER_TTL) -> None:
        self._r = client
        self._key = f"{prefix}:scheduler:leader"
        self._lead = client.register_script(_LEAD)
        self._resign = client.register_script(_RESIGN)
        self.duties = list(duties)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._ttl = lease_ttl
        self.leading = False
        self._stop = threading.Event()

    def _hold_lease(self) -> bool:
        try:
            leading = bool(self._lead(keys=[self._key], args=[self.holder, int(self._ttl * 1000)]))
        except redis.RedisError as exc:
            log.warning("scheduler: Redis unreachable", extra={"reason": type(exc).__name__})
            leading = False
        if leading != self.leading:
            log.info("scheduler leads" if leading else "scheduler stands by",
                     extra={"holder": self.holder})
            self.leading = leading
        return leading

    def tick(self) -> None:
        """Renew (or try to take) the lease; run the duties that are due if leading."""
        if not self._hold_lease():
            return
        for duty in self.duties:
            now = time.monotonic()
            if now < duty.next_run:
                continue
            duty.next_run = now + duty.interval
            try:
                duty.run()
            except Exception:  # one duty's trouble must not stop the others
                log.exception("scheduler duty failed", extra={"duty": duty.name})
            if not self._hold_lease():  # a long duty may have outlived the lease
                return

    def run_forever(self) -> None:
        """Tick until :meth:`stop`; hand the lease back on the way out."""
        try:
            while not self._stop.is_set():
                self.tick()
                self._stop.wait(self._pause())
        finally:
            self.resign()

    def _pause(self) -> float:
        if not self.leading:
            return self._ttl / 3
        due = min((d.next_run for d in self.duties), default=time.monotonic() + 1.0)
        return min(max(due - time.monotonic(), 0.05), self._ttl / 3)

    def stop(self) -> None:
        self._stop.set()

    def resign(self) -> None:
        """Give up the lease at once, so a standby takes over without waiting for the TTL."""
        try:
            self._resign(keys=[self._key], args=[self.holder])
        except redis.RedisError:
            pass
        self.leading = False


def build_duties(config: Config) -> list[Duty]:
    """Every duty of the fleet; features add theirs here (migrations, prefetch, worklists)."""
    from pacsfetch.workers.migrate import migration_duty  # imports the plugins: only here
    from pacsfetch.workers.prefetch import duties as prefetch_duties

    duties: list[Duty] = []
    duties.append(migration_duty(config))
    duties += prefetch_duties(config)
    duties.append(Duty("retention", retention.SWEEP_INTERVAL, partial(retention.sweep, config)))
    return duties
