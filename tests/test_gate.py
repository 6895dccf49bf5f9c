"""The per-source association cap, priorities, windows and rate cap, against a real Redis.

Two :class:`AssociationGate` objects on one Redis stand for two worker processes; one test
kills a real subprocess holding a slot to show that its slot comes back by itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pacsfetch.config import SourceConfig
from pacsfetch.errors import RetrieveError
from pacsfetch.gate import AssociationGate, GateCancelled, Slot, Waiting
from pacsfetch.jobstore import JobStore
from pacsfetch.models import JobRequest, JobStatus


def source(**settings: object) -> SourceConfig:
    return SourceConfig(ae_title="PACS", host="127.0.0.1", port=104, **settings)


def gate(redis_url: str, **settings: object) -> AssociationGate:
    return AssociationGate.from_url(redis_url, {"pacs": source(**settings)}, slot_ttl=2.0)


def acquire_in_thread(g: AssociationGate, **kwargs: object) -> tuple[threading.Thread, list[Slot]]:
    got: list[Slot] = []
    thread = threading.Thread(target=lambda: got.append(g.acquire("pacs", **kwargs)), daemon=True)
    thread.start()
    return thread, got


def wait_for(condition, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_the_cap_holds_across_processes_and_a_release_lets_the_next_in(redis_url: str) -> None:
    one, two = gate(redis_url, max_associations=2), gate(redis_url, max_associations=2)
    first, second = one.acquire("pacs"), two.acquire("pacs")
    heard: list[Waiting | None] = []
    thread, got = acquire_in_thread(one, on_wait=heard.append)
    wait_for(lambda: heard)
    assert not got and one.in_use("pacs") == 2
    assert heard[0].reason == "slot" and "2 of 2 in use" in str(heard[0])
    second.release()
    thread.join(10)
    assert got and heard[-1] is None  # told it no longer waits
    assert one.in_use("pacs") == 2
    first.release()
    got[0].release()
    assert one.in_use("pacs") == 0


def test_bulk_work_leaves_the_reserve_and_yields_to_a_waiting_job(redis_url: str) -> None:
    fleet = gate(redis_url, max_associations=3, reserved_associations=1)
    bulk = [fleet.acquire("pacs", bulk=True) for _ in range(2)]
    thread, got = acquire_in_thread(fleet, bulk=True)
    time.sleep(0.6)
    assert not got, "bulk work took a reserved slot"
    interactive = fleet.acquire("pacs")  # the reserve: at once
    assert bulk[0].should_yield() is None  # nobody waits yet
    waiter, waiter_got = acquire_in_thread(fleet)
    bulk_holder = bulk[0]
    wait_for(lambda: bulk_holder.should_yield() is not None)  # it asks Redis once a second
    reason = bulk_holder.should_yield()
    assert reason is not None and reason.reason == "slot"
    bulk_holder.release()  # the bulk worker hands its slot over between series
    waiter.join(10)
    assert waiter_got, "the interactive job did not get the slot the bulk holder yielded"
    assert not got, "the waiting bulk caller overtook the interactive one"
    interactive.release()
    waiter_got[0].release()  # one holder left: below the bulk limit of 3 - 1 reserved
    thread.join(10)
    assert got, "bulk work did not get the slot once nobody else waited"
    for slot in (bulk[1], got[0]):
        slot.release()


def test_bulk_work_waits_outside_its_window_and_can_be_cancelled(redis_url: str) -> None:
    now = datetime.now(UTC)
    start = now + timedelta(hours=2)
    window = f"daily {start:%H}:00-{(start + timedelta(hours=1)):%H}:00"
    fleet = gate(redis_url, windows=[window], timezone="UTC")
    heard: list[Waiting | None] = []
    stop = threading.Event()
    with pytest.raises(GateCancelled):
        threading.Timer(0.5, stop.set).start()
        fleet.acquire("pacs", bulk=True, on_wait=heard.append, cancelled=stop.is_set)
    assert heard[0].reason == "window" and heard[0].until is not None
    assert heard[0].until > now and f"{start:%H}:00" in str(heard[0])
    assert fleet.in_use("pacs") == 0
    with fleet.acquire("pacs") as interactive:  # windows hold bulk work only
        assert interactive.should_yield() is None


def test_a_bulk_holder_is_told_to_yield_when_its_window_closes(redis_url: str) -> None:
    soon = datetime.now(UTC) + timedelta(hours=3)
    closed = gate(redis_url, windows=[f"daily {soon:%H}:00-{(soon + timedelta(hours=1)):%H}:00"])
    reason = closed.yield_reason("pacs")  # what Slot.should_yield asks between series
    assert reason is not None and reason.reason == "window"
    assert gate(redis_url, windows=["daily 00:00-24:00"]).yield_reason("pacs") is None


def test_a_killed_holders_slot_comes_back_by_itself(redis_url: str, tmp_path: Path) -> None:
    script = tmp_path / "hold.py"
    script.write_text(
        "import sys, time\n"
        "from pacsfetch.config import SourceConfig\n"
        "from pacsfetch.gate import AssociationGate\n"
        "g = AssociationGate.from_url(sys.argv[1], {'pacs': SourceConfig(ae_title='PACS', "
        "host='h', port=104, max_associations=1, reserved_associations=0)}, slot_ttl=2.0)\n"
        "g.acquire('pacs'); print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, str(script), redis_url], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        fleet = gate(redis_url, max_associations=1, reserved_associations=0)
        time.sleep(3)  # longer than the lease: the live holder keeps renewing it
        assert fleet.in_use("pacs") == 1
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        started = time.monotonic()
        with fleet.acquire("pacs"):
            assert time.monotonic() - started < 15
    finally:
        holder.kill()
        holder.wait()


def test_an_unreachable_redis_fails_the_wait_as_a_connection_error() -> None:
    dead = AssociationGate.from_url("redis://127.0.0.1:9/0", {"pacs": source()},
                                    outage_seconds=0.5)
    with pytest.raises(RetrieveError, match="did not answer for 0.5 s") as caught:
        dead.acquire("pacs")
    assert caught.value.kind == "connection" and caught.value.retryable


def test_the_rate_cap_spreads_data_over_time(redis_url: str) -> None:
    one = gate(redis_url, max_mb_per_second=1.0).rate("pacs")
    two = gate(redis_url, max_mb_per_second=1.0).rate("pacs")
    assert one is not None and two is not None
    started = time.monotonic()
    for _ in range(25):  # 2.5 MB over two "processes" at 1 MB/s, 1 s of burst
        one.consume(50_000)
        two.consume(50_000)
    assert time.monotonic() - started >= 1.2
    assert gate(redis_url).rate("pacs") is None  # no cap configured


def test_a_running_job_shows_what_it_waits_for(redis_url: str) -> None:
    store = JobStore.from_url(redis_url)
    job = store.create(JobRequest(source="pacs", study_uid="1.2.3", store="local"),
                       origin="migration")
    assert store.get(job.id).origin == "migration"
    store.transition(job.id, JobStatus.RUNNING)
    store.set_waiting(job.id, "an association to source 'pacs': 4 of 4 in use")
    assert store.get(job.id).waiting_for == "an association to source 'pacs': 4 of 4 in use"
    store.transition(job.id, JobStatus.SUCCEEDED)
    assert store.get(job.id).waiting_for is None
