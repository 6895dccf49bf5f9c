"""Helpers the tests share: config dicts, a worker subprocess, polling.

Plain functions and classes (not fixtures), importable by test modules as ``helpers``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from pacsfetch.config import Config
from pacsfetch.models import JobRequest
from pacsfetch.plugins.registry import get_registry
from pacsfetch.sandbox.peers import Orthanc, free_port
from pacsfetch.workers.runner import JobRunner, Outcome
from pacsfetch.workers.state import LocalJobState

CALLING_AE = "PACSFETCH"


def make_config(*, redis_url: str, store_root: Path, orthanc: Orthanc | None = None,
                extra_sources: dict[str, dict[str, Any]] | None = None,
                worker: dict[str, Any] | None = None, fsync: bool = True,
                metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config as the TOML file would hold it (a dict), for parse_config or write_toml.

    Metrics listen on loopback ports free at the time, so several workers (and colleagues'
    test runs) never collide on the default ports.
    """
    sources: dict[str, dict[str, Any]] = {}
    if orthanc is not None:
        sources["orthanc"] = {"ae_title": orthanc.aet, "host": "127.0.0.1",
                              "port": orthanc.dicom_port, "calling_ae_title": CALLING_AE,
                              "transports": ["c-get"], "timeout": 10}
    sources.update(extra_sources or {})
    return {
        "broker": {"url": redis_url},
        "sources": sources,
        "stores": {"local": {"plugin": "filesystem", "root": str(store_root), "fsync": fsync}},
        "worker": {"max_retries": 2, "retry_backoff": 0.2, "lease_seconds": 6,
                   "progress_interval": 0.1, **(worker or {})},
        # Every metrics port free: a fixed default collides with another session's process.
        "metrics": {"bind": "127.0.0.1", "worker_port": free_port(), "receiver_port": free_port(),
                    "scheduler_port": free_port(), "hl7_port": free_port(), **(metrics or {})},
    }


def write_toml(data: dict[str, Any], path: Path) -> Path:
    path.write_text(tomli_w.dumps(data))
    return path


class CliProcess:
    """A ``pacsfetch`` command in a subprocess, as an operator runs it; ready on a log line."""

    name = "pacsfetch"
    ready_marker = b""

    def __init__(self, args: list[str], config_path: Path, log_path: Path) -> None:
        env = {**os.environ, "PACSFETCH_CONFIG": str(config_path), "PACSFETCH_LOG_LEVEL": "INFO"}
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacsfetch", *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            if self.ready_marker in self.log_path.read_bytes():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


class WorkerProcess(CliProcess):
    """``pacsfetch worker``: ready once Celery says so."""

    name = "worker"
    ready_marker = b"ready."

    def __init__(self, config_path: Path, log_path: Path, concurrency: int = 1) -> None:
        super().__init__(["worker", "-c", str(concurrency)], config_path, log_path)

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]


class ReceiverProcess(CliProcess):
    """``pacsfetch receiver``: ready once it listens on *port*."""

    name = "receiver"
    ready_marker = b"receiver listening"

    def __init__(self, config_path: Path, log_path: Path, port: int) -> None:
        super().__init__(["receiver"], config_path, log_path)
        self.port = port


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.1,
             what: str = "condition") -> Any:
    """Poll until *predicate* returns something truthy; fail the test after *timeout*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def run_job(config: Config, request: JobRequest, state: LocalJobState | None = None,
            job_id: str | None = None) -> Outcome:
    """Run one job inline, as ``pacsfetch retrieve`` does, with the installed plugins."""
    registry = get_registry()
    runner = JobRunner(config, registry, registry.check_config(config))
    return runner.run(job_id or uuid.uuid4().hex, request, state or LocalJobState())
