"""Graceful stop: what a worker and the receiver do between SIGTERM and exit.

Kubernetes sends SIGTERM on scale-down and on every rolling update, then SIGKILL after the
pod's ``terminationGracePeriodSeconds``. Within ``[worker] drain_seconds`` of the SIGTERM:

* a **worker** takes no new job (Celery's warm shutdown stops consuming) and either finishes
  the job it runs or *hands it back*: the transport is stopped like a cancel (the C-GET or
  C-MOVE is cancelled, what arrived is committed and recorded), the job goes back to
  ``queued`` and a fresh message goes on the queue, so another worker resumes it from what is
  already stored. Nothing half-written is visible either way: stores commit by rename.
* the **receiver** refuses new associations (its listening socket closes) and lets the
  associations it has finish their C-STOREs; at the deadline it aborts what is left, which
  the PACS counts as failed sub-operations and the job's next attempt fetches again.

The SIGTERM reaches the worker's main process only (as in a pod, where it is PID 1); the
jobs run in Celery's pool children. The main process tells them through one page of shared
memory mapped before the pool forks: the moment by which a running job must be handed back.
"""

from __future__ import annotations

import logging
import mmap
import signal
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from celery import Celery, bootsteps
from celery.signals import worker_shutting_down

from pacsfetch import health
from pacsfetch.config import Config
from pacsfetch.gate import Waiting
from pacsfetch.models import Progress
from pacsfetch.workers.state import JobState

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
"""How often a worker's consumer loop and the receiver's serve loop say they still run."""
RECEIVER_POLL = 0.2
"""Seconds between the receiver's looks at its associations while it drains."""

_NOT_DRAINING = 0.0
_shared = mmap.mmap(-1, struct.calcsize("d"))  # MAP_SHARED: the pool's children see writes
_stop = threading.Event()


def _deadline() -> float:
    return float(struct.unpack_from("d", _shared)[0])


def start_draining(drain_seconds: float) -> None:
    """Begin the drain: jobs still running in *drain_seconds* are handed back."""
    if _deadline() == _NOT_DRAINING:
        struct.pack_into("d", _shared, 0, time.time() + drain_seconds)
    _stop.set()


def draining() -> bool:
    """Whether this process (or the worker whose pool it belongs to) is stopping."""
    return _deadline() != _NOT_DRAINING


def hand_back_due() -> bool:
    """Whether a running job must now stop and go back on the queue."""
    deadline = _deadline()
    return deadline != _NOT_DRAINING and time.time() >= deadline


class HandBackState:
    """A job's state whose cancel flag also rises when the job must be handed back.

    The transports already stop cleanly on a cancel (C-CANCEL, commit what arrived, record
    it), so a hand-back reuses that path; :func:`handed_back` then tells the task apart from
    a cancel the user asked for.
    """

    def __init__(self, state: JobState) -> None:
        self._state = state

    def stored_instances(self) -> dict[str, str]:
        return self._state.stored_instances()

    def previous_progress(self) -> Progress:
        return self._state.previous_progress()

    def record(self, locations: Mapping[str, str], progress: Progress) -> None:
        self._state.record(locations, progress)

    def cancel_requested(self) -> bool:
        return hand_back_due() or self._state.cancel_requested()

    def transport_started(self, name: str) -> None:
        self._state.transport_started(name)

    def waiting(self, reason: Waiting | None) -> None:
        self._state.waiting(reason)


def handed_back(cancelled: bool, user_cancelled: Callable[[], bool]) -> bool:
    """A job that stopped as cancelled was handed back, unless the user cancelled it."""
    return cancelled and hand_back_due() and not user_cancelled()


# The worker -----------------------------------------------------------------------------------
class _Heartbeat(bootsteps.StartStopStep):
    """Beats from the consumer's own event loop: a stuck loop goes stale, and /healthz says so."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, consumer: Any) -> None:
        health.beat("worker")
        consumer.timer.call_repeatedly(HEARTBEAT_SECONDS, health.beat, ("worker",))


def connect_worker(app: Celery, config: Config) -> None:
    """Drain on Celery's warm shutdown (SIGTERM) and beat from the consumer loop."""
    app.steps["consumer"].add(_Heartbeat)

    def on_shutting_down(**_: object) -> None:
        start_draining(config.worker.drain_seconds)
        log.info("worker draining: no new jobs; a running job is handed back if not done "
                 "in time", extra={"drain_seconds": config.worker.drain_seconds})

    worker_shutting_down.connect(on_shutting_down, weak=False)


# The receiver ---------------------------------------------------------------------------------
def install_sigterm() -> None:
    """SIGTERM starts a drain instead of ending the process at once (receiver, scheduler...)."""
    signal.signal(signal.SIGTERM, lambda *_: _stop.set())


def serve_until_drained(*, stop_accepting: Callable[[], None], busy: Callable[[], int],
                        abort_all: Callable[[], None], alive: Callable[[], bool],
                        drain_seconds: float) -> None:
    """Run a server until SIGTERM (or Ctrl-C), then drain it within *drain_seconds*.

    While serving, beats for /healthz as long as *alive* (the accept loop runs). On the stop:
    *stop_accepting* (new associations are refused), wait while *busy* counts open
    associations, and *abort_all* those still open at the deadline.
    """
    health.expect("receiver")
    try:
        while not _stop.wait(HEARTBEAT_SECONDS / 5):
            if alive():
                health.beat("receiver")
    except KeyboardInterrupt:
        pass
    stop_accepting()
    start_draining(drain_seconds)  # /readyz turns 503 once new associations are refused
    deadline = time.monotonic() + drain_seconds
    log.info("receiver draining: new associations refused", extra={
        "associations": busy(), "drain_seconds": drain_seconds})
    while busy() and time.monotonic() < deadline:
        time.sleep(RECEIVER_POLL)
    left = busy()
    if left:
        log.warning("drain time is up: aborting the associations still open",
                    extra={"associations": left})
        abort_all()
    log.info("receiver drained")
