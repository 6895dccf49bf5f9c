"""The retrievers compared, each run as its own process into a fresh folder.

- DCMTK ``getscu`` (C++) and pynetdicom's bundled ``getscu`` app, with their default PDU
  sizes, as an operator would run them;
- ``pacsfetch retrieve`` (inline, no broker) per transport: C-GET, C-MOVE (with
  ``pacsfetch receiver`` running as the move destination) and DICOMweb;
- pacsfetch queued: jobs through the API, Celery on Redis and ``pacsfetch worker -c N``.

Every measurement counts what actually landed on disk, so a fast tool that dropped
instances shows up as wrong, not as fast.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from benchmarks.procwatch import PeakRss, stop_group
from benchmarks.receiver import RECEIVER_AE, running_receiver
from pacsfetch.sandbox.peers import Orthanc, free_port
from pacsfetch.sandbox.samples import SampleStudy

DCMTK_GETSCU = "/usr/bin/getscu"
CALLING_AE = "PFBENCH"
STORE_NAME = "local"
TOOL_TIMEOUT = 900.0

#: Transports the harness knows how to point at an Orthanc: name -> extra source keys.
#: Adding a transport is one line here; a transport listed but not installed in this build
#: is skipped with a note, and one installed but not listed is reported as such.
TRANSPORT_SOURCE_KEYS: dict[str, Callable[[Orthanc], dict[str, Any]]] = {
    "c-get": lambda peer: {},
    "c-move": lambda peer: {"move_destination": RECEIVER_AE},
    "dicomweb": lambda peer: {"dicomweb_url": peer.dicomweb_url},
}
#: Transports whose instances arrive through ``pacsfetch receiver``: one is started beside
#: each of their measurements, on the port the Orthancs know as :data:`RECEIVER_AE`.
RECEIVER_TRANSPORTS = frozenset({"c-move"})


@dataclass
class Measurement:
    """One timed retrieval (or a set of concurrent ones) and what it brought back."""

    tool: str
    study: str
    peer: str  # "nodelay" or "nagle"
    seconds: float
    instances: int
    expected: int
    megabytes: float
    workers: int = 1
    transport: str | None = None
    peak_rss_mb: float | None = None
    peak_tree_rss_mb: float | None = None
    first_instance_s: float | None = None
    note: str = ""

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["instances_per_s"] = round(self.instances_per_s, 1)
        row["mb_per_s"] = round(self.mb_per_s, 2)
        row["seconds"] = round(self.seconds, 3)
        return row


def _dicom_files(folder: Path) -> list[Path]:
    """Received files, leaving out pacsfetch's control directory."""
    return [p for p in folder.rglob("*") if p.is_file() and ".pacsfetch" not in p.parts]


def _measure_process(argv: Sequence[str], out_dir: Path, *, env: Mapping[str, str] | None = None
                     ) -> tuple[float, float, float, list[Path], str]:
    """Run *argv* to completion; (seconds, peak RSS MB, tree MB, files, output tail)."""
    log = out_dir.parent / f"{out_dir.name}.log"
    with log.open("wb") as sink:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                cwd=out_dir)
        with PeakRss(proc.pid) as rss:
            code = proc.wait(TOOL_TIMEOUT)
        seconds = time.perf_counter() - started
    tail = log.read_text(errors="replace")[-2000:]
    if code != 0:
        raise RuntimeError(f"{argv[0]} exited with {code}: {tail}")
    return seconds, rss.peak_mb, rss.peak_tree_mb, _dicom_files(out_dir), tail


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _result(tool: str, study_name: str, study: SampleStudy, nagle: bool, seconds: float,
            files: list[Path], **kwargs: Any) -> Measurement:
    size = sum(p.stat().st_size for p in files)
    return Measurement(tool=tool, study=study_name, peer="nagle" if nagle else "nodelay",
                       seconds=seconds, instances=len(files), expected=len(study.instances),
                       megabytes=size / 1e6, **kwargs)


def _study_keys(study: SampleStudy) -> list[str]:
    return ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}"]


def dcmtk_getscu(peer: Orthanc, study_name: str, study: SampleStudy, nagle: bool,
                 work: Path) -> Measurement:
    out = _fresh(work / f"dcmtk-{study_name}-{'nagle' if nagle else 'nodelay'}")
    argv = [DCMTK_GETSCU, "-S", "-aet", CALLING_AE, "-aec", peer.aet, *_study_keys(study),
            "-od", str(out), "127.0.0.1", str(peer.dicom_port)]
    # Debian's DCMTK leaves Nagle's algorithm on unless told: compare against its best.
    env = {**os.environ, "TCP_NODELAY": "1"}
    seconds, rss, tree_rss, files, _ = _measure_process(argv, out, env=env)
    return _result("dcmtk-getscu", study_name, study, nagle, seconds, files,
                   peak_rss_mb=rss, peak_tree_rss_mb=tree_rss)


def pynetdicom_getscu(peer: Orthanc, study_name: str, study: SampleStudy, nagle: bool,
                      work: Path) -> Measurement:
    out = _fresh(work / f"pynetdicom-{study_name}-{'nagle' if nagle else 'nodelay'}")
    argv = [sys.executable, "-m", "pynetdicom", "getscu", "127.0.0.1", str(peer.dicom_port),
            "-aet", CALLING_AE, "-aec", peer.aet, "-S", *_study_keys(study), "-od", str(out)]
    seconds, rss, tree_rss, files, _ = _measure_process(argv, out)
    return _result("pynetdicom-getscu", study_name, study, nagle, seconds, files,
                   peak_rss_mb=rss, peak_tree_rss_mb=tree_rss)


def pacsfetch_config(peer: Orthanc, transport: str, redis_url: str, store_root: Path, *,
                     receiver_port: int, progress_interval: float = 0.5,
                     source_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A pacsfetch config for one Orthanc, one transport and a filesystem store with fsync.

    Workers and the receiver share it, as in production. Metrics ports are free ones, so a
    benchmark never collides with another pacsfetch (or test run) on the default ports.
    """
    source = {"ae_title": peer.aet, "host": "127.0.0.1", "port": peer.dicom_port,
              "calling_ae_title": CALLING_AE, "transports": [transport], "timeout": 60,
              **TRANSPORT_SOURCE_KEYS[transport](peer), **(source_extra or {})}
    return {
        "broker": {"url": redis_url},
        "sources": {"orthanc": source},
        "stores": {STORE_NAME: {"plugin": "filesystem", "root": str(store_root), "fsync": True}},
        "worker": {"progress_interval": progress_interval, "max_retries": 0},
        "receiver": {"ae_title": RECEIVER_AE, "port": receiver_port, "bind": "127.0.0.1"},
        "metrics": {"bind": "127.0.0.1", "worker_port": free_port(),
                    "receiver_port": free_port()},
    }


def _receiver_for(transport: str, env: Mapping[str, str], log_path: Path
                  ) -> AbstractContextManager[None]:
    """The move receiver when *transport* needs one, else nothing; started before timing."""
    if transport in RECEIVER_TRANSPORTS:
        return running_receiver(env, log_path)
    return nullcontext()


def _env_with_config(config: dict[str, Any], path: Path) -> dict[str, str]:
    path.write_text(tomli_w.dumps(config))
    return {**os.environ, "PACSFETCH_CONFIG": str(path), "PACSFETCH_LOG_LEVEL": "WARNING"}


def pacsfetch_inline(peer: Orthanc, study_name: str, study: SampleStudy, nagle: bool,
                     work: Path, *, transport: str, redis_url: str, receiver_port: int,
                     source_extra: Mapping[str, Any] | None = None) -> Measurement:
    label = f"pacsfetch-inline-{transport}-{study_name}-{'nagle' if nagle else 'nodelay'}"
    out = _fresh(work / label)
    env = _env_with_config(pacsfetch_config(peer, transport, redis_url, out,
                                            receiver_port=receiver_port,
                                            source_extra=source_extra),
                           work / f"{label}.toml")
    argv = [sys.executable, "-m", "pacsfetch", "retrieve", "--source", "orthanc",
            "--study", study.study_uid, "--store", STORE_NAME, "--transport", transport]
    with _receiver_for(transport, env, work / f"{label}-receiver.log"):
        seconds, rss, tree_rss, files, _ = _measure_process(argv, out, env=env)
    return _result("pacsfetch-inline", study_name, study, nagle, seconds, files,
                   transport=transport, peak_rss_mb=rss, peak_tree_rss_mb=tree_rss)


class _FirstFile(threading.Thread):
    """Notes when the first instance file appears under a store root."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True, name="first-file")
        self._root = root
        self.seen_at: float | None = None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            if any(".pacsfetch" not in p.parts for p in self._root.rglob("*.dcm")):
                self.seen_at = time.perf_counter()
                return
            self._done.wait(0.005)

    def stop(self) -> None:
        self._done.set()
        self.join()


class QueuedService:
    """``pacsfetch api`` and ``pacsfetch worker -c N`` as an operator runs them."""

    def __init__(self, config: dict[str, Any], work: Path, label: str, workers: int,
                 api_workers: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = _env_with_config(config, work / f"{label}.toml")
        self._work = work
        self._label = label
        self._workers = workers
        self._api_workers = api_workers
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: list[str], name: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        log = (self._work / f"{self._label}-{name}.log").open("wb")
        return subprocess.Popen([sys.executable, "-m", "pacsfetch", *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, *, with_worker: bool = True) -> None:
        self.api = self._spawn(["api", "--port", str(self.port), "--workers",
                                str(self._api_workers)], "api", self.env)
        if with_worker:
            self.worker = self._spawn(["worker", "-c", str(self._workers), "--loglevel", "INFO"],
                                      "worker", {**self.env, "PACSFETCH_LOG_LEVEL": "INFO"})
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not come up")
            time.sleep(0.1)
        log = self._work / f"{self._label}-worker.log"
        while with_worker and b"ready." not in log.read_bytes():
            if time.monotonic() > deadline or (self.worker and self.worker.poll() is not None):
                raise RuntimeError(f"the worker did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in (self.worker, self.api):
            if proc is not None:
                stop_group(proc)


def pacsfetch_queued(peer: Orthanc, studies: Mapping[str, SampleStudy], nagle: bool, work: Path,
                     *, transport: str, redis_url: str, receiver_port: int, workers: int,
                     label: str) -> Measurement:
    """Submit one job per study at once; time from the first POST until all are final."""
    run_label = f"{transport}-{label}-{workers}"
    out = _fresh(work / f"pacsfetch-queued-{run_label}")
    config = pacsfetch_config(peer, transport, redis_url, out, receiver_port=receiver_port)
    service = QueuedService(config, work, f"queued-{run_label}", workers)
    with _receiver_for(transport, service.env, work / f"queued-{run_label}-receiver.log"):
        return _queued_run(service, out, studies, nagle, transport=transport, workers=workers,
                           label=label)


def _queued_run(service: QueuedService, out: Path, studies: Mapping[str, SampleStudy],
                nagle: bool, *, transport: str, workers: int, label: str) -> Measurement:
    service.start()
    try:
        assert service.worker is not None
        first = _FirstFile(out)
        first.start()
        with PeakRss(service.worker.pid) as rss, httpx.Client(base_url=service.url,
                                                            timeout=30) as client:
            started = time.perf_counter()
            ids = []
            for study in studies.values():
                reply = client.post("/jobs", json={"source": "orthanc", "level": "STUDY",
                                                   "study_uid": study.study_uid,
                                                   "store": STORE_NAME, "transport": transport})
                reply.raise_for_status()
                ids.append(reply.json()["id"])
            statuses = _wait_final(client, ids)
            seconds = time.perf_counter() - started
        first.stop()
    finally:
        service.stop()
    files = _dicom_files(out)
    expected = sum(len(s.instances) for s in studies.values())
    size = sum(p.stat().st_size for p in files)
    note = "" if all(s == "succeeded" for s in statuses) else f"job statuses: {statuses}"
    return Measurement(
        tool="pacsfetch-queued", study=label, peer="nagle" if nagle else "nodelay",
        seconds=seconds, instances=len(files), expected=expected, megabytes=size / 1e6,
        workers=workers, transport=transport, peak_rss_mb=rss.peak_mb,
        peak_tree_rss_mb=rss.peak_tree_mb,
        first_instance_s=None if first.seen_at is None else first.seen_at - started, note=note)


def _wait_final(client: httpx.Client, ids: list[str]) -> list[str]:
    deadline = time.monotonic() + TOOL_TIMEOUT
    statuses: dict[str, str] = {}
    while time.monotonic() < deadline:
        for job_id in ids:
            if job_id not in statuses or statuses[job_id] in ("queued", "running"):
                statuses[job_id] = client.get(f"/jobs/{job_id}").json()["status"]
        if all(s not in ("queued", "running") for s in statuses.values()):
            return [statuses[i] for i in ids]
        time.sleep(0.02)
    raise TimeoutError(f"jobs not final after {TOOL_TIMEOUT:.0f} s: {statuses}")
