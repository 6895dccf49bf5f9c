"""Processes the benchmark starts: their peak resident memory, sampled from ``/proc``
while they run, and stopping them with everything they forked.

``resource.getrusage(RUSAGE_CHILDREN)`` only reports children that have been waited for,
and a Celery worker's pool processes outlive each job; sampling the tree catches the peak of
the process that actually handled the instances.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

SAMPLE_INTERVAL = 0.05
_PAGE_KB = 4


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _rss_kb(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0
    return int(fields[1]) * _PAGE_KB


def tree(pid: int) -> list[int]:
    """*pid* and all its descendants alive now."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo += _children(current)
    return pids


class PeakRss:
    """Samples the RSS of every process under *pid* until the ``with`` block ends.

    ``peak_mb`` is the largest single process (what one worker needs), ``peak_tree_mb`` the
    largest sum over the tree at one instant.
    """

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.peak_mb = 0.0
        self.peak_tree_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            sizes = [_rss_kb(p) for p in tree(self._pid)]
            if sizes:
                self.peak_mb = max(self.peak_mb, max(sizes) / 1024)
                self.peak_tree_mb = max(self.peak_tree_mb, sum(sizes) / 1024)
            if self._stop.wait(SAMPLE_INTERVAL):
                return


def stop_group(proc: subprocess.Popen[bytes], grace: float = 20) -> None:
    """Stop *proc* and its process group (a Celery worker's pool, say): TERM, then KILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
