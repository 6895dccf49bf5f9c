"""Where prometheus-client's multiprocess mode keeps its files, prepared before it is imported.

A Celery prefork worker runs jobs in child processes, each with its own counters; with
``PROMETHEUS_MULTIPROC_DIR`` set, every process writes its values to memory-mapped files in
that directory and the main process serves their sum. prometheus-client decides between
in-memory and file-backed values when it is first imported, so this module must not import
it, and :func:`prepare_multiprocess_dir` must run before anything else does.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir() -> Path:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at an empty directory; return it.

    An operator's directory is kept but emptied of the previous run's files (values of dead
    processes would otherwise be added to this run's). Without one, a private temporary
    directory is created and removed when this process exits.
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError(f"{MULTIPROC_ENV} must be set before prometheus_client is imported")
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        return directory
    directory = Path(tempfile.mkdtemp(prefix="pacsfetch-metrics-"))
    os.environ[MULTIPROC_ENV] = str(directory)
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # never from a forked child that happens to run atexit
            shutil.rmtree(directory, ignore_errors=True)

    atexit.register(remove)
    return directory
