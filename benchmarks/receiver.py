"""``pacsfetch receiver`` beside a C-MOVE measurement, as an operator runs it.

C-MOVE instances do not come back on the retriever's association: the PACS opens a new one
to the move destination it knows by AE title, and ``pacsfetch receiver`` (one process for
all workers) stores them through the job's pipeline. The benchmark Orthancs know
:data:`RECEIVER_AE` at one loopback port chosen per run; each C-MOVE measurement starts a
receiver there with the measurement's own configuration file (so it writes into that
measurement's store), before the clock starts, and stops it after. The receiver's memory is
not part of the measurement's peak RSS: it is a separate, shared process.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from benchmarks.procwatch import stop_group

RECEIVER_AE = "PFRECEIVER"
"""The move destination: the receiver's AE title, and the Orthancs' modality for it."""
START_TIMEOUT = 60.0


@contextmanager
def running_receiver(env: Mapping[str, str], log_path: Path) -> Iterator[None]:
    """Run ``pacsfetch receiver`` with *env* (which names the config) until the block ends.

    Ready once it logs that it listens; a receiver that exits or never listens fails the
    measurement with the tail of its log rather than letting the C-MOVE time out.
    """
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pacsfetch", "receiver"],
            env={**env, "PACSFETCH_LOG_LEVEL": "INFO"},  # "receiver listening" is INFO
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_listening(proc, log_path)
            yield
        finally:
            stop_group(proc)


def _wait_listening(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while b"receiver listening" not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pacsfetch receiver did not start: "
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
