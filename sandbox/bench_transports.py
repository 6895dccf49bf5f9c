"""C-GET against C-MOVE on the same study, inline, from a local Orthanc into the filesystem.

``python -m pacsfetch.sandbox.bench_transports [--instances 500] [--rounds 2]``. Starts
Redis, Orthanc (which knows ``pacsfetch receiver`` as move destination ``PACSFETCH``) and
the receiver as a subprocess, then times each transport's retrieve with the same job
runner ``pacsfetch retrieve`` uses, into a fresh store each round (fsync on). Prints one
JSON line per round and a summary; everything lives in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import tomli_w

from pacsfetch.config import parse_config
from pacsfetch.models import JobRequest, JobStatus
from pacsfetch.plugins.registry import get_registry
from pacsfetch.sandbox.peers import Orthanc, RedisServer, free_port
from pacsfetch.sandbox.samples import generate_uniform_study
from pacsfetch.workers.runner import JobRunner
from pacsfetch.workers.state import LocalJobState


def _config(redis_url: str, orthanc: Orthanc, receiver_port: int, store: Path) -> dict[str, Any]:
    return {
        "broker": {"url": redis_url},
        "sources": {"orthanc": {
            "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
            "calling_ae_title": "PACSFETCH", "transports": ["c-get", "c-move"],
            "move_destination": "PACSFETCH"}},
        "stores": {"local": {"plugin": "filesystem", "root": str(store), "fsync": True}},
        "receiver": {"ae_title": "PACSFETCH", "port": receiver_port, "bind": "127.0.0.1"},
    }


def _wait_listening(log: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while b"receiver listening" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"receiver did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacsfetch-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        study = generate_uniform_study(work / "study", n_instances=args.instances, rows=64,
                                       columns=64, patient_id="PF-BENCH-MOVE", seed=3)
        receiver_port = free_port()
        redis = stack.enter_context(RedisServer(work / "redis"))
        orthanc = stack.enter_context(Orthanc(
            work / "orthanc", modalities={"PACSFETCH": ("PACSFETCH", "127.0.0.1", receiver_port)},
            dicomweb=False))
        orthanc.upload_study(study)
        data = _config(redis.url, orthanc, receiver_port, work / "store")
        config_path = work / "pacsfetch.toml"
        config_path.write_text(tomli_w.dumps(data))
        log = work / "receiver.log"
        with log.open("wb") as handle:
            receiver = subprocess.Popen(
                [sys.executable, "-m", "pacsfetch", "receiver"], stdout=handle,
                stderr=subprocess.STDOUT, env={**os.environ, "PACSFETCH_CONFIG": str(config_path)})
        stack.callback(receiver.wait)
        stack.callback(receiver.terminate)
        _wait_listening(log, receiver)
        registry = get_registry()
        results: dict[str, list[float]] = {"c-get": [], "c-move": []}
        for round_number in range(args.rounds):
            for transport in results:
                store = work / f"store-{transport}-{round_number}"
                config = parse_config({**data, "stores": {"local": {
                    **data["stores"]["local"], "root": str(store)}}})
                runner = JobRunner(config, registry, registry.check_config(config))
                request = JobRequest(source="orthanc", study_uid=study.study_uid, store="local",
                                     transport=transport)
                started = time.perf_counter()
                outcome = runner.run(uuid.uuid4().hex, request, LocalJobState())
                elapsed = time.perf_counter() - started
                if outcome.status is not JobStatus.SUCCEEDED:
                    raise SystemExit(f"{transport} did not succeed: {outcome.error}")
                rate = outcome.progress.completed / elapsed
                results[transport].append(rate)
                print(json.dumps({"transport": transport, "round": round_number,
                                  "instances": outcome.progress.completed,
                                  "seconds": round(elapsed, 2), "instances_per_s": round(rate)}))
        print(json.dumps({t: {"best_instances_per_s": round(max(r))} for t, r in results.items()}))


if __name__ == "__main__":
    main()
