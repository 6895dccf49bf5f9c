"""Load on ``POST /jobs``: sustained request rate with latency percentiles, and a big batch.

An asyncio client with a fixed number of connections keeps the API busy; latency is
measured per request from send to reply. No worker consumes the jobs: the point is what the
API (validation, one Redis transaction, one Celery send) sustains on its own.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Any

import httpx

CONNECTIONS = 32
BATCH_CHUNK = 1000


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors,
                "seconds": round(self.seconds, 3), "requests_per_s": round(self.per_second, 1),
                "p50_ms": round(self.p50_ms, 2), "p99_ms": round(self.p99_ms, 2)}


def job_body(study_uid: str, n: int) -> dict[str, Any]:
    return {"source": "orthanc", "level": "STUDY", "study_uid": f"{study_uid}.{n}",
            "store": "local", "priority": n % 10}


async def _post_many(url: str, n: int, study_uid: str) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        async def one_connection() -> None:
            nonlocal errors
            while not queue.empty():
                i = queue.get_nowait()
                sent = time.perf_counter()
                reply = await client.post("/jobs", json=job_body(study_uid, i))
                latencies.append((time.perf_counter() - sent) * 1000)
                if reply.status_code != 202:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(one_connection() for _ in range(CONNECTIONS)))
        seconds = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return LoadResult(n, errors, seconds, statistics.median(latencies), p99)


def sustained(url: str, n: int, study_uid: str) -> LoadResult:
    """*n* single-job POSTs over :data:`CONNECTIONS` keep-alive connections."""
    return asyncio.run(_post_many(url, n, study_uid))


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
