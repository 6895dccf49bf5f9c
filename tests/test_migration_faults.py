"""Migrations under trouble, with every piece a real process as in production (``pacsfetch
api``, ``worker``, ``scheduler``, Redis with AOF): killed mid-migration, and a source whose
time window closes mid-migration (connections counted from the kernel with ``ss``)."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import CALLING_AE, CliProcess, WorkerProcess, make_config, wait_for, write_toml

from pacsfetch.sandbox.archive import ArchiveStudy, generate_archive
from pacsfetch.sandbox.latency import LatencyProxy
from pacsfetch.sandbox.peers import Orthanc, RedisServer, free_port

STUDIES = 40
WINDOW_RTT_MS = 200
"""Round trip to the source in the closing-window test: long enough that the migration
outlasts the window."""


class SchedulerProcess(CliProcess):
    name = "scheduler"
    ready_marker = b"scheduler leads"

    def __init__(self, config_path: Path, log_path: Path) -> None:
        super().__init__(["scheduler"], config_path, log_path)


class ApiProcess(CliProcess):
    name = "api"

    def __init__(self, config_path: Path, log_path: Path, port: int) -> None:
        super().__init__(["api", "--host", "127.0.0.1", "--port", str(port)], config_path,
                         log_path)
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 30) -> None:
        def up() -> bool:
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(up, timeout, what="the API")


def kill(process: CliProcess) -> None:
    """SIGKILL the whole process group: no clean shutdown, as a lost node."""
    os.killpg(process.proc.pid, signal.SIGKILL)
    process.proc.wait()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> list[ArchiveStudy]:
    return generate_archive(tmp_path_factory.mktemp("archive"), studies=STUDIES,
                            instances_per_study=3, days=14, seed=23)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory,
           archive: list[ArchiveStudy]) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("fault-source"), aet="OLDPACS", dicomweb=False,
                 extra_config={"LimitFindResults": 6}) as server:
        server.upload(path for study in archive for path in study.paths)
        yield server


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[Orthanc]:
    with Orthanc(tmp_path / "dest", aet="NEWPACS", dicomweb=False) as server:
        yield server


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis-aof", appendonly=True) as server:
        yield server


def config_data(redis: RedisServer, tmp_path: Path, source: Orthanc, destination: Orthanc,
                port: int | None = None, **source_keys: Any) -> dict[str, Any]:
    """*port*: where the source is reached, when not directly (a latency proxy)."""
    data = make_config(redis_url=redis.url, store_root=tmp_path / "store", fsync=False,
                       extra_sources={"old": {
                           "ae_title": source.aet, "host": "127.0.0.1",
                           "port": port or source.dicom_port, "calling_ae_title": CALLING_AE,
                           "transports": ["c-get"], "timeout": 10, "max_results": 6,
                           **source_keys}})
    data["stores"]["new"] = {"plugin": "dicom", "ae_title": destination.aet,
                             "host": "127.0.0.1", "port": destination.dicom_port}
    return data


class Fleet:
    """API, worker and scheduler processes of one config, restartable."""

    def __init__(self, config_path: Path, logs: Path) -> None:
        self.config_path, self.logs = config_path, logs
        self.port = free_port()
        self.runs = 0
        self.procs: list[CliProcess] = []

    def start(self) -> None:
        self.runs += 1
        n = self.runs
        api = ApiProcess(self.config_path, self.logs / f"api{n}.log", self.port)
        worker = WorkerProcess(self.config_path, self.logs / f"worker{n}.log", 1)
        scheduler = SchedulerProcess(self.config_path, self.logs / f"scheduler{n}.log")
        self.procs = [api, worker, scheduler]
        try:
            for proc in self.procs:
                proc.wait_ready(60)
        except BaseException:
            self.stop()  # a fleet that did not come up must not live on and take others' jobs
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        for proc in self.procs:
            kill(proc)

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def migrate(fleet: Fleet, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pacsfetch", "migrate", "--source", "old", "--store", "new",
         "--api", fleet.url, *args],
        env={**os.environ, "PACSFETCH_CONFIG": str(fleet.config_path)},
        capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def record(fleet: Fleet, mig_id: str) -> dict[str, Any]:
    return httpx.get(f"{fleet.url}/migrations/{mig_id}", timeout=10).json()


def finished(fleet: Fleet, mig_id: str, timeout: float = 300) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        try:
            current = record(fleet, mig_id)
        except httpx.HTTPError:
            return None
        return current if current["status"] in ("succeeded", "partial", "failed") else None
    return wait_for(final, timeout, interval=0.5, what="the migration to finish")


def report_rows(fleet: Fleet, mig_id: str) -> list[dict[str, str]]:
    text = httpx.get(f"{fleet.url}/migrations/{mig_id}/report", timeout=30).text
    rows = list(csv.DictReader(io.StringIO(text)))
    for row in rows:
        row.pop("job_id")
    return sorted(rows, key=lambda r: r["study_uid"])


def expected_rows(archive: list[ArchiveStudy]) -> list[dict[str, str]]:
    return sorted(({"study_uid": s.study_uid, "study_date": s.study_date, "status": "verified",
                    "instances_source": "3", "instances_destination": "3", "missing": "",
                    "error": ""} for s in archive), key=lambda r: r["study_uid"])


def destination_sop_uids(server: Orthanc) -> list[str]:
    found = httpx.post(f"{server.http_url}/tools/find", json={
        "Level": "Instance", "Query": {}, "Expand": True}, timeout=30).json()
    return sorted(item["MainDicomTags"]["SOPInstanceUID"] for item in found)


def test_killing_worker_api_scheduler_and_redis_mid_migration_changes_nothing(
        tmp_path: Path, aof_redis: RedisServer, source: Orthanc, destination: Orthanc,
        archive: list[ArchiveStudy]) -> None:
    path = write_toml(config_data(aof_redis, tmp_path, source, destination), tmp_path / "c.toml")
    fleet = Fleet(path, tmp_path)
    try:
        fleet.start()
        mig_id = migrate(fleet, "--max-in-flight", "3")
        wait_for(lambda: record(fleet, mig_id)["studies"]["done"] >= 8, 180,
                 what="a few studies done")
        fleet.kill()
        aof_redis.kill()
        aof_redis.start()
        fleet.start()
        result = finished(fleet, mig_id)
        assert result["status"] == "succeeded", result
        assert result["studies"]["planned"] == STUDIES == result["studies"]["verified"]
        assert report_rows(fleet, mig_id) == expected_rows(archive)
        expected = sorted(uid for s in archive for uid in s.sop_uids)
        assert destination_sop_uids(destination) == expected  # every instance, once
    finally:
        fleet.stop()


class ConnectionWatch(threading.Thread):
    """Every TCP connection to a port, from the kernel (``ss``), including those already
    closed (TIME-WAIT keeps them listed for a minute): client port -> first seen."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.seen: dict[int, datetime] = {}
        self._halt = threading.Event()  # not _stop: threading.Thread has a method of that name

    def run(self) -> None:
        while not self._halt.wait(0.1):
            out = subprocess.run(["ss", "-tanH", f"dport = :{self.port}"], capture_output=True,
                                 text=True).stdout
            now = datetime.now(UTC)
            for line in out.splitlines():
                fields = line.split()
                if len(fields) >= 4:
                    local = fields[3].rsplit(":", 1)[-1]
                    if local.isdigit():
                        self.seen.setdefault(int(local), now)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def test_a_closing_window_stops_new_associations_and_the_migration_resumes(
        tmp_path: Path, aof_redis: RedisServer, source: Orthanc, destination: Orthanc,
        archive: list[ArchiveStudy]) -> None:
    now = datetime.now(UTC)
    closes = (now + timedelta(seconds=25)).replace(second=0, microsecond=0) + timedelta(minutes=1)
    opens = closes + timedelta(minutes=1)
    if opens.date() != closes.date() or closes.hour == 0 and closes.minute == 0:
        pytest.skip("the closed minute would cross midnight")
    windows = [f"daily 00:00-{closes:%H:%M}", f"daily {opens:%H:%M}-24:00"]
    # Across a WAN the migration is still running when the window closes (on loopback it
    # would be done before); the watch counts connections at the PACS itself.
    wan = LatencyProxy("127.0.0.1", source.dicom_port, rtt_ms=WINDOW_RTT_MS)
    data = config_data(aof_redis, tmp_path, source, destination, port=wan.port,
                       windows=windows)
    fleet = Fleet(write_toml(data, tmp_path / "c.toml"), tmp_path)
    watch = ConnectionWatch(source.dicom_port)
    watch.start()
    wan.__enter__()
    try:
        fleet.start()
        mig_id = migrate(fleet, "--max-in-flight", "4")
        waiting = wait_for(lambda: (r := record(fleet, mig_id))["status"] == "waiting-window"
                           and r, 150, what="the migration to wait for the window")
        assert datetime.fromisoformat(waiting["waiting_until"]) == opens
        result = finished(fleet, mig_id)
        assert result["status"] == "succeeded", result
        assert result["studies"]["verified"] == STUDIES
        assert datetime.now(UTC) > opens
        grace = closes + timedelta(seconds=2)
        opened_while_closed = [port for port, first in watch.seen.items()
                               if grace < first < opens]
        assert not opened_while_closed, f"{len(opened_while_closed)} association(s) opened " \
            "while the window was closed"
    finally:
        fleet.stop()
        watch.stop()
        wan.__exit__(None, None, None)
