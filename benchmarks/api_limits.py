"""What the API's bounds cost, and what a job costs in Redis: the numbers the README's
"The API" section states. ``python -m benchmarks.api_limits`` (not part of ``bench.sh``).

- a 200 MB body without a token: how soon the 401 comes, with none of the body sent;
- a full ``POST /jobs/batch`` (1,000 jobs, 100,000 SOP UIDs in all): its size, the time to
  its 202, the API process's peak RSS while it is answered, and the slowest ``/healthz``
  meanwhile (the event loop parses and validates the body);
- Redis memory per finished job and per recorded instance (``used_memory`` deltas).

It starts its own Redis and ``pacsfetch api`` on private loopback ports.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis
import tomli_w

from benchmarks.procwatch import PeakRss, stop_group
from pacsfetch.jobstore import JobStore
from pacsfetch.models import JobRequest, JobStatus, Level, Progress
from pacsfetch.sandbox.peers import RedisServer, free_port

TOKEN = "bench-token"
STUDY = "1.2.826.0.1.3680043.8.498.1234567890"
JOBS, UIDS_PER_JOB = 1000, 100
MEMORY_JOBS, INSTANCES = 2000, 100


def _start_api(workdir: Path, redis_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = {"broker": {"url": redis_url},
              "sources": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
              "stores": {"local": {"plugin": "filesystem", "root": str(workdir / "store")}}}
    path = workdir / "pacsfetch.toml"
    path.write_text(tomli_w.dumps(config))
    env = {**os.environ, "PACSFETCH_CONFIG": str(path), "PACSFETCH_API_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "pacsfetch", "api", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the API did not start")


def unauthenticated_huge_body(port: int) -> float:
    """Seconds from sending the headers of a 200 MB POST to its 401 (no body byte sent)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.perf_counter()
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 209715200\r\n\r\n")
        answer = sock.recv(4096)
        elapsed = time.perf_counter() - started
    assert answer.startswith(b"HTTP/1.1 401"), answer[:80]
    return elapsed


def full_batch(proc: subprocess.Popen[bytes], url: str) -> dict[str, float]:
    jobs = [{"source": "pacs", "level": "IMAGE", "study_uid": f"{STUDY}.{n}",
             "series_uid": f"{STUDY}.{n}.1", "store": "local",
             "sop_uids": [f"{STUDY}.{n}.1.{k}" for k in range(UIDS_PER_JOB)]}
            for n in range(JOBS)]
    body = json.dumps({"jobs": jobs}).encode()
    with PeakRss(proc.pid) as idle:
        time.sleep(0.3)
    probes: list[float] = []
    done = threading.Event()

    def probe_health() -> None:  # what a liveness probe sees meanwhile
        with httpx.Client(base_url=url, timeout=60) as client:
            while not done.is_set():
                started = time.perf_counter()
                client.get("/healthz")
                probes.append(time.perf_counter() - started)
                time.sleep(0.01)

    prober = threading.Thread(target=probe_health)
    with PeakRss(proc.pid) as rss:
        prober.start()
        started = time.perf_counter()
        response = httpx.post(url + "/jobs/batch", content=body, timeout=120, headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        elapsed = time.perf_counter() - started
        time.sleep(0.2)
        done.set()
        prober.join()
    assert response.status_code == 202, response.text[:300]
    return {"body_mb": len(body) / 1e6, "seconds": elapsed, "api_idle_rss_mb": idle.peak_mb,
            "api_peak_rss_mb": rss.peak_mb, "slowest_healthz_seconds": max(probes)}


def redis_memory(redis_url: str) -> dict[str, float]:
    """Bytes per finished job (no instances) and per recorded instance."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    store = JobStore.from_url(redis_url)
    base = client.info("memory")["used_memory"]
    ids = []
    for n in range(MEMORY_JOBS):
        request = JobRequest(source="pacs", level=Level.STUDY, study_uid=f"{STUDY}.{n}",
                             store="local")
        job = store.create(request, created_by="ris-gateway")
        store.transition(job.id, JobStatus.RUNNING, transport="c-get")
        store.set_progress(job.id, Progress(completed=INSTANCES, remaining=0, bytes=52_428_800))
        store.transition(job.id, JobStatus.SUCCEEDED, error=None, error_kind=None)
        ids.append(job.id)
    jobs = client.info("memory")["used_memory"]
    for n, job_id in enumerate(ids):
        series = f"{STUDY}.{n}.1"
        store.record_instances(job_id, {
            f"{series}.{k}": json.dumps({"local": f"{STUDY}.{n}/{series}/{series}.{k}.dcm"})
            for k in range(INSTANCES)})
    instances = client.info("memory")["used_memory"]
    return {"bytes_per_job": (jobs - base) / MEMORY_JOBS,
            "bytes_per_instance": (instances - jobs) / (MEMORY_JOBS * INSTANCES)}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        proc, url = _start_api(Path(tmp), server.url)
        try:
            port = int(url.rsplit(":", 1)[1])
            results = {"unauthenticated_200mb_401_seconds": unauthenticated_huge_body(port),
                       "full_batch": full_batch(proc, url)}
        finally:
            stop_group(proc)
        results["redis"] = redis_memory(server.url)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
