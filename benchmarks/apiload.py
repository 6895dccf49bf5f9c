"""Load on ``POST /jobs``: sustained request rate with latency percentiles, and a big batch.

An asyncio client offers requests at a fixed rate (the target, 500/s) over a pool of
keep-alive connections; latency is measured per request from when it was due to its reply. No worker consumes the jobs: the point is what the
API (validation, one Redis transaction, one Celery send) sustains on its own.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

import httpx

CONNECTIONS = 64
TARGET_RATE = 500.0
BATCH_CHUNK = 1000
SCHEDULE_LEAD_S = 0.5


@dataclass
class LoadResult:
    offered_per_s: float
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict[str, Any]:
        return {"offered_per_s": self.offered_per_s, "requests": self.requests, "errors": self.errors,
                "seconds": round(self.seconds, 3), "requests_per_s": round(self.per_second, 1),
                "p50_ms": round(self.p50_ms, 2), "p99_ms": round(self.p99_ms, 2)}


def job_body(study_uid: str, n: int) -> dict[str, Any]:
    return {"source": "orthanc", "level": "STUDY", "study_uid": f"{study_uid}.{n}",
            "store": "local", "priority": n % 10}


class _Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol to POST JSON.

    A full HTTP client costs about as much CPU per request as the API itself; on a small
    machine the load generator would then measure itself.
    """

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> int:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        self._writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self._host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self._reader.readexactly(length)
        return status

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


async def _post_at_rate(url: str, n: int, rate: float, study_uid: str) -> LoadResult:
    """Open loop: request *i* is due at ``i / rate`` s; latency counts from when it was due,
    so a server falling behind shows up in the percentiles instead of slowing the client."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        idle.put_nowait(_Connection(host, int(port)))
    latencies: list[float] = []
    errors = 0

    async def one(i: int, due: float) -> None:
        nonlocal errors
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        connection = await idle.get()
        try:
            ok = await connection.post("/jobs", json.dumps(job_body(study_uid, i)).encode()) == 202
        except (OSError, asyncio.IncompleteReadError, ValueError):
            connection.close()
            connection = _Connection(host, int(port))
            ok = False
        idle.put_nowait(connection)
        latencies.append((time.perf_counter() - due) * 1000)
        errors += not ok

    # The schedule starts after a lead time: creating thousands of tasks takes a while, and
    # without it the first requests would count that client-side setup as server latency.
    started = time.perf_counter() + SCHEDULE_LEAD_S
    await asyncio.gather(*(one(i, started + i / rate) for i in range(n)))
    seconds = time.perf_counter() - started
    while not idle.empty():
        idle.get_nowait().close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return LoadResult(rate, n, errors, seconds, statistics.median(latencies), p99)


def sustained(url: str, n: int, study_uid: str, rate: float = TARGET_RATE) -> LoadResult:
    """*n* single-job POSTs offered at *rate* per second over keep-alive connections.

    The client's garbage collector is off meanwhile: a full collection over thousands of
    pending tasks pauses the client, and the pause would be counted as server latency."""
    gc.disable()
    try:
        return asyncio.run(_post_at_rate(url, n, rate, study_uid))
    finally:
        gc.enable()


def batch(url: str, n: int, study_uid: str) -> dict[str, Any]:
    """Enqueue *n* jobs through ``POST /jobs/batch`` in chunks; the total wall time."""
    started = time.perf_counter()
    accepted = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for offset in range(0, n, BATCH_CHUNK):
            size = min(BATCH_CHUNK, n - offset)
            reply = client.post("/jobs/batch", json={
                "jobs": [job_body(study_uid, offset + i) for i in range(size)]})
            reply.raise_for_status()
            accepted += len(reply.json()["jobs"])
    return {"jobs": n, "accepted": accepted, "chunk": BATCH_CHUNK,
            "seconds": round(time.perf_counter() - started, 3)}
