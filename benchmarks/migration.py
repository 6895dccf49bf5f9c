"""Migration planning: how fast a whole archive is enumerated, in how much memory.

The source is a study-level C-FIND SCP of the benchmark's own (pynetdicom, in a child
process so its memory is not counted) that answers from a generator: ``studies`` studies
spread evenly over ``days`` days from 2015-01-01, each at its own minute of its day, and
at most ``cap`` matches per answer, as a PACS with a result limit. Nothing is stored at the
source, so a plan of 100,000 studies costs no disk and no seeding time. The planner
(:func:`pacsfetch.workers.planner.run_planning`, as the scheduler's feeder runs it) plans
the whole archive (no filter: the empty years since 1900 are split away too) into a
Redis of its own. Measured: studies planned per second, C-FINDs sent, the planner's peak
RSS growth, and Redis memory per planned study.
"""

from __future__ import annotations

import multiprocessing
import resource
import threading
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import redis

from pacsfetch.config import parse_config
from pacsfetch.gate import process_gate
from pacsfetch.migrations import MigrationRequest, MigrationStore
from pacsfetch.sandbox.peers import RedisServer, free_port
from pacsfetch.workers.planner import run_planning

FIRST_DAY = date(2015, 1, 1)
AE_TITLE = "GENPACS"


def _serve(port: int, studies: int, days: int, cap: int, ready: Any) -> None:
    """The generator C-FIND SCP (runs in a child process until killed)."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    per_day = studies // days

    def day_range(text: str) -> tuple[int, int]:
        text = text or "-"
        low, _, high = text.partition("-") if "-" in text else (text, "", text)
        first = date(int(low[:4]), int(low[4:6]), int(low[6:8])) if low else FIRST_DAY
        last = date(int(high[:4]), int(high[4:6]), int(high[6:8])) if high else \
            FIRST_DAY + timedelta(days=days - 1)
        return max((first - FIRST_DAY).days, 0), min((last - FIRST_DAY).days, days - 1)

    def minute_range(text: str) -> tuple[int, int]:
        if not text:
            return 0, 24 * 60 - 1
        low, _, high = text.partition("-")
        return int(low[:2]) * 60 + int(low[2:4]), int(high[:2]) * 60 + int(high[2:4])

    def on_find(event: Any) -> Any:
        query = event.identifier
        first, last = day_range(str(query.get("StudyDate", "") or ""))
        lo, hi = minute_range(str(query.get("StudyTime", "") or ""))
        sent = 0
        for day in range(first, last + 1):
            when = FIRST_DAY + timedelta(days=day)
            for k in range(per_day):
                minute = k * 1440 // per_day
                if not lo <= minute <= hi:
                    continue
                if sent == cap:
                    return
                ds = Dataset()
                ds.QueryRetrieveLevel = "STUDY"
                ds.StudyInstanceUID = f"2.25.{day * per_day + k + 1}"
                ds.StudyDate = f"{when:%Y%m%d}"
                ds.StudyTime = f"{minute // 60:02d}{minute % 60:02d}00"
                ds.PatientID = f"GEN{(day * per_day + k) % 50_000}"
                ds.AccessionNumber = f"G{day * per_day + k}"
                ds.ModalitiesInStudy = "CT"
                ds.NumberOfStudyRelatedInstances = "4"
                sent += 1
                yield 0xFF00, ds

    ae = AE(AE_TITLE)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.maximum_associations = 4
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, on_find)])
    ready.set()
    threading.Event().wait()
    server.shutdown()


def run(runs: Path, quick: bool) -> dict[str, Any]:
    studies, days, cap = (2_000, 200, 100) if quick else (100_000, 2_000, 1_000)
    port = free_port()
    ready = multiprocessing.Event()
    scp = multiprocessing.Process(target=_serve, args=(port, studies, days, cap, ready),
                                  daemon=True)
    scp.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the generator C-FIND SCP did not start")
        with RedisServer(runs / "migration-redis") as server:
            config = parse_config({
                "broker": {"url": server.url},
                "sources": {"gen": {"ae_title": AE_TITLE, "host": "127.0.0.1", "port": port,
                                    "max_results": cap, "timeout": 30}},
                "stores": {"local": {"plugin": "filesystem", "root": str(runs / "unused")}}})
            store = MigrationStore.from_url(server.url)
            mig = store.create(MigrationRequest(source="gen", stores=["local"]))
            client = redis.Redis.from_url(server.url)
            redis_before = int(client.info("memory")["used_memory"])
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            started = time.perf_counter()
            run_planning(config, store, process_gate(config), mig.id, threading.Event())
            seconds = time.perf_counter() - started
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            record = store.get(mig.id)
            redis_after = int(client.info("memory")["used_memory"])
    finally:
        scp.kill()
        scp.join()
    planned = record.studies.planned
    result = {
        "studies": studies, "days": days, "cap": cap, "planned": planned,
        "complete": record.plan_complete and record.error is None,
        "seconds": round(seconds, 2), "studies_per_second": round(planned / seconds),
        "planner_peak_rss_growth_mb": round((rss_after - rss_before) / 1024, 1),
        "redis_bytes_per_study": round((redis_after - redis_before) / max(planned, 1)),
    }
    print(f"migration planning: {result}", flush=True)
    return result
