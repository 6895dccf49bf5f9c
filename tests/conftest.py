"""Shared fixtures: real peers (Redis, Orthanc, DCMTK) on private loopback ports.

Nothing here is mocked: each peer is the real server from Debian's packages, started once per
test session by :mod:`pacsfetch.sandbox.peers` and stopped at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import WorkerProcess, make_config, write_toml

from pacsfetch.config import Config, parse_config
from pacsfetch.sandbox.peers import Orthanc, RedisServer, S3Server, free_port
from pacsfetch.sandbox.samples import SampleStudy, generate_mixed_study, generate_uniform_study


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean Redis database for each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield redis_server.url
    client.close()


@pytest.fixture(scope="session")
def mixed_study(tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    return generate_mixed_study(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="session")
def big_study(tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    """Enough instances that a job is still running while a test cancels or kills it."""
    return generate_uniform_study(tmp_path_factory.mktemp("big"), n_instances=400, rows=128,
                                  columns=128, patient_id="PF-TEST-BIG", seed=7)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory, mixed_study: SampleStudy,
            big_study: SampleStudy) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        server.upload_study(mixed_study)
        server.upload_study(big_study)
        yield server


@pytest.fixture
def config_factory(redis_url: str, tmp_path: Path) -> Callable[..., Config]:
    def build(**kwargs: Any) -> Config:
        kwargs.setdefault("store_root", tmp_path / "store")
        return parse_config(make_config(redis_url=redis_url, **kwargs))

    return build


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(config: dict[str, Any], concurrency: int = 1) -> WorkerProcess:
        if started and "metrics" in config:
            # Workers on one host each need a metrics port of their own, as in production.
            config = {**config, "metrics": {**config["metrics"], "worker_port": free_port()}}
        path = write_toml(config, tmp_path / f"worker{len(started)}.toml")
        worker = WorkerProcess(path, tmp_path / f"worker{len(started)}.log", concurrency)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def aws_credentials(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 server's key pair in the environment, where boto3's credential chain finds it."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_access_key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_server


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word: not a DICOM port, or a
    destination behind a firewall that lets the SYN through and drops the rest."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def _our_pacsfetch_processes() -> list[tuple[int, str]]:
    """``pacsfetch`` processes this test session started (its direct children) still alive."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == os.getpid() and state != "Z" and "-m pacsfetch" in cmdline:
            found.append((int(entry), cmdline.strip()))
    return found


@pytest.fixture(scope="module", autouse=True)
def no_process_outlives_its_module() -> Iterator[None]:
    """A worker, API or scheduler a module forgot to stop would keep serving the session's
    Redis and take the next module's jobs with its own config: stop it, and fail loudly here
    rather than as a puzzling failure elsewhere."""
    yield
    leaked = _our_pacsfetch_processes()
    for pid, _ in leaked:
        try:
            os.killpg(pid, signal.SIGKILL)  # its Celery children with it
        except OSError:
            os.kill(pid, signal.SIGKILL)
    for pid, _ in leaked:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    assert not leaked, "processes left running by this module: " + "; ".join(c for _, c in leaked)
