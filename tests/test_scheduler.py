"""The scheduler runs its duties in exactly one process at a time (real Redis, real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from pacsfetch.workers.scheduler import Duty, Scheduler


def test_only_the_leader_runs_duties_and_a_standby_takes_over(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    ran: list[str] = []
    first = Scheduler(client, [Duty("count", 0.0, lambda: ran.append("first"))], lease_ttl=2)
    second = Scheduler(client, [Duty("count", 0.0, lambda: ran.append("second"))], lease_ttl=2)
    for _ in range(5):
        first.tick()
        second.tick()
    assert ran == ["first"] * 5 and first.leading and not second.leading
    first.resign()  # a clean stop hands the lease over at once
    second.tick()
    assert ran[-1] == "second" and second.leading


def test_a_killed_leader_is_replaced_after_its_lease(redis_url: str, tmp_path: Path) -> None:
    marker = tmp_path / "leader-ran"
    script = tmp_path / "lead.py"
    script.write_text(
        "import sys, pathlib, redis\n"
        "from pacsfetch.workers.scheduler import Duty, Scheduler\n"
        "mark = pathlib.Path(sys.argv[2])\n"
        "s = Scheduler(redis.Redis.from_url(sys.argv[1]), "
        "[Duty('touch', 0.1, mark.touch)], lease_ttl=2)\n"
        "s.run_forever()\n")
    leader = subprocess.Popen([sys.executable, str(script), redis_url, str(marker)])
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline and leader.poll() is None
            time.sleep(0.05)
        ran: list[float] = []
        standby = Scheduler(redis.Redis.from_url(redis_url), [Duty("t", 0.0, lambda: ran.append(1))],
                            lease_ttl=2)
        standby.tick()
        assert not ran, "a standby acted while the leader was alive"
        os.kill(leader.pid, signal.SIGKILL)
        leader.wait()
        deadline = time.monotonic() + 20
        while not ran:
            assert time.monotonic() < deadline, "the standby never took over"
            standby.tick()
            time.sleep(0.1)
    finally:
        leader.kill()
        leader.wait()
