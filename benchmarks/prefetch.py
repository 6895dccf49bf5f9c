"""Prefetch lead times: are the priors in place before the exam, for a batch of exams?

The fleet runs as operators run it (``pacsfetch api``, ``worker -c 2``, ``scheduler``)
against an archive Orthanc holding a small history per patient (two CT priors of four
instances each) and a reading Orthanc behind a DICOM forward store. Two batches of exams
are requested through ``POST /prefetch``:

- *scheduled*: exams spread over a minute, each starting ``lead_minutes`` (2) before its
  time: the lead time (how long before the exam the priors were in place) should be the
  lead less the seconds a prefetch takes, for every exam, and ``due -> in place`` is how
  long after its start a prefetch had its priors in place;
- *at once*: every exam due at the same moment, one minute ahead: a burst the workers must
  absorb; ``late`` counts exams whose priors were not in place by their time.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from benchmarks.procwatch import stop_group
from benchmarks.tools import QueuedService
from pacsfetch.sandbox.peers import Orthanc, RedisServer, free_port
from pacsfetch.sandbox.priors import generate_history_study

PRIORS_PER_PATIENT = 2


def _history(folder: Path, patients: list[str]) -> list[Any]:
    studies = []
    for n, patient in enumerate(patients):
        for k in range(PRIORS_PER_PATIENT):
            studies.append(generate_history_study(
                folder, patient_id=patient, study_date=date(2024 - k, 1 + n % 12, 1),
                modality="CT", description="CT CHEST", body_part="CHEST",
                accession=f"{patient[-6:]}{k}", n_instances=4))
    return studies


def _config(redis_url: str, archive: Orthanc, reading: Orthanc, work: Path) -> dict[str, Any]:
    rule = {"when_modalities": ["CT"], "max_priors": PRIORS_PER_PATIENT, "lookback_years": 10,
            "sources": ["archive"], "stores": ["reading"], "priority": 8}
    return {
        "broker": {"url": redis_url},
        "sources": {"archive": {"ae_title": archive.aet, "host": "127.0.0.1",
                                "port": archive.dicom_port, "transports": ["c-get"],
                                "timeout": 60}},
        "stores": {"reading": {"plugin": "dicom", "ae_title": reading.aet,
                               "host": "127.0.0.1", "port": reading.dicom_port},
                   "local": {"plugin": "filesystem", "root": str(work / "store")}},
        "worker": {"progress_interval": 0.5, "max_retries": 1},
        "metrics": {"bind": "127.0.0.1", "worker_port": free_port(),
                    "receiver_port": free_port(), "scheduler_port": free_port()},
        "prefetch": {"rules": {"scheduled": {**rule, "lead_minutes": 2},
                               "at-once": {**rule, "lead_minutes": 1}}},
    }


def _batch(client: httpx.Client, patients: list[str], rule: str,
           times: list[datetime]) -> list[str]:
    ids = []
    for patient, at in zip(patients, times, strict=True):
        reply = client.post("/prefetch", json={
            "patient_id": patient, "rule": rule,
            "current": {"modality": "CT", "accession_number": f"X{patient[-6:]}",
                        "scheduled_at": at.isoformat()}})
        reply.raise_for_status()
        ids.append(reply.json()["id"])
    return ids


def _wait(client: httpx.Client, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        records = [client.get(f"/prefetch/{i}").json() for i in ids]
        if all(r["status"] in ("done", "failed", "cancelled") for r in records):
            return records
        if time.monotonic() > deadline:
            raise RuntimeError(f"prefetches unfinished after {timeout:.0f} s")
        time.sleep(1)


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    leads = [r["lead_seconds"] for r in records if r["lead_seconds"] is not None]
    due = [(datetime.fromisoformat(r["in_place_at"]) - datetime.fromisoformat(r["start_at"]))
           .total_seconds() for r in records if r["in_place_at"]]
    fetched = sum(1 for r in records for c in r["candidates"] if c["job_status"] == "succeeded")
    return {
        "exams": len(records),
        "done": sum(1 for r in records if r["status"] == "done"),
        "priors_fetched": fetched,
        "lead_p50_s": round(statistics.median(leads), 2) if leads else None,
        "lead_min_s": round(min(leads), 2) if leads else None,
        "late": sum(1 for lead in leads if lead < 0),
        "due_to_in_place_p50_s": round(statistics.median(due), 2) if due else None,
        "due_to_in_place_max_s": round(max(due), 2) if due else None,
    }


def _scheduler(env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "pacsfetch", "scheduler"],
                                env={**env, "PACSFETCH_LOG_LEVEL": "INFO"}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def run(work: Path, quick: bool) -> dict[str, Any]:
    """Both batches; a summary of each (seconds)."""
    exams = 10 if quick else 100
    spread = 10.0 if quick else 60.0
    patients = [f"PF-BP-{n:06d}" for n in range(2 * exams)]
    studies = _history(work / "prefetch-history", patients)
    with RedisServer(work / "prefetch-redis") as broker, \
            Orthanc(work / "prefetch-archive", aet="ARCHIVE", dicomweb=False) as archive, \
            Orthanc(work / "prefetch-reading", aet="READING", dicomweb=False) as reading:
        redis_url = broker.url
        for item in studies:
            archive.upload_study(item.study)
        config = _config(redis_url, archive, reading, work)
        service = QueuedService(config, work, "prefetch", workers=2)
        service.start()
        scheduler = _scheduler(service.env, work / "prefetch-scheduler.log")
        try:
            with httpx.Client(base_url=service.url, timeout=30) as client:
                now = datetime.now(UTC)
                first = now + timedelta(minutes=2, seconds=5)
                times = [first + timedelta(seconds=spread * i / exams) for i in range(exams)]
                scheduled = _batch(client, patients[:exams], "scheduled", times)
                spread_result = _summary(_wait(client, scheduled, spread + 240))
                at = datetime.now(UTC) + timedelta(minutes=1)
                burst = _batch(client, patients[exams:], "at-once", [at] * exams)
                burst_result = _summary(_wait(client, burst, 300))
        finally:
            stop_group(scheduler)
            service.stop()
    result = {"workers": 2, "scheduled": spread_result, "at_once": burst_result}
    print(f"prefetch: {result}", flush=True)
    return result
