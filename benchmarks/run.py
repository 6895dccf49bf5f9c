"""The benchmark harness of issue #5: pacsfetch against DCMTK and pynetdicom ``getscu``.

Run it with ``./scripts/bench.sh`` (or ``.venv/bin/python -m benchmarks.run``). It starts
Redis and two Orthancs (Nagle off / on) seeded with the same generated studies, measures
every tool on the same data in one run, prints a table and the ratios against the targets,
and writes everything to ``.bench/results.json``. ``--quick`` uses tiny studies: the CI smoke
run, for correctness only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import apiload, dimse_paths, report, tools
from benchmarks import migration as migration_bench
from benchmarks import prefetch as prefetch_bench
from benchmarks.environment import FULL, QUICK, Environment, Plan
from pacsfetch.plugins.registry import get_registry

PARTS = ("tools", "nagle", "queued", "move", "forward", "wan", "scaling", "api", "prefetch",
         "migration")
API_WORKERS = 2
"""``pacsfetch api --workers``: one process per core of the 2-core reference machine."""


def _transports(notes: list[str]) -> list[str]:
    """The transports both installed in this build and known to the harness."""
    installed = set(get_registry().transports)
    chosen = [name for name in tools.TRANSPORT_SOURCE_KEYS if name in installed]
    for name in tools.TRANSPORT_SOURCE_KEYS:
        if name not in installed:
            notes.append(f"transport {name!r} is not installed in this build: skipped")
    for name in sorted(installed - set(tools.TRANSPORT_SOURCE_KEYS)):
        notes.append(f"transport {name!r} is installed but the harness has no setup for it")
    return chosen


def run(workdir: Path, quick: bool, only: set[str]) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    notes: list[str] = []
    transports = _transports(notes)
    rows: list[tools.Measurement] = []
    api: dict[str, Any] = {}
    prefetch: dict[str, Any] = {}
    migration: dict[str, Any] = {}
    shutil.rmtree(workdir / "peers", ignore_errors=True)
    shutil.rmtree(workdir / "runs", ignore_errors=True)
    runs = workdir / "runs"
    runs.mkdir(parents=True)
    started = time.perf_counter()

    def measured(row: tools.Measurement) -> None:
        rows.append(row)
        print(report.table([row]).splitlines()[-1], flush=True)

    if "prefetch" in only:  # its own Redis and Orthancs: none of the studies below
        prefetch = prefetch_bench.run(runs, quick)
    if "migration" in only:  # its own Redis and generator C-FIND SCP
        migration = migration_bench.run(runs, quick)
    if only <= {"prefetch", "migration"}:
        return {"taken": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": report.machine(), "mode": "quick" if quick else "full",
                "notes": notes, "measurements": [], "prefetch": prefetch,
                "migration": migration, "targets": [],
                "seconds": round(time.perf_counter() - started, 1), "_rows": rows}
    with Environment(workdir, plan) as env:
        assert env.redis is not None
        print(f"peers ready in {time.perf_counter() - started:.0f} s", flush=True)
        comparison = {"small": env.studies["small"], "large": env.studies["large"]}
        for nagle in (False, True):
            if ("tools" if not nagle else "nagle") not in only:
                continue
            peer = env.peer(nagle)
            for name, study in comparison.items():
                measured(tools.dcmtk_getscu(peer, name, study, nagle, runs))
                if not nagle:
                    measured(tools.pynetdicom_getscu(peer, name, study, nagle, runs))
                for transport in transports:
                    measured(tools.pacsfetch_inline(peer, name, study, nagle, runs,
                                                    transport=transport, redis_url=env.redis.url,
                                                    receiver_port=env.receiver_port))
        if "queued" in only:
            for name, study in comparison.items():
                for transport in transports:
                    measured(tools.pacsfetch_queued(
                        env.peer(False), {name: study}, False, runs, transport=transport,
                        redis_url=env.redis.url, receiver_port=env.receiver_port, workers=1,
                        label=name))
        if "move" in only:  # beside the one-worker C-MOVE rows of "queued"
            for name, study in comparison.items():
                measured(dimse_paths.dcmtk_movescu(env.peer(False), name, study,
                                                   env.storescp_port, runs))
        if "forward" in only:
            for name, study in comparison.items():
                measured(dimse_paths.dcmtk_storescu(name, study, runs))
                measured(dimse_paths.pacsfetch_forward(name, study, runs))
        if "wan" in only:
            for name, study in comparison.items():
                for row in dimse_paths.wan_rows(env.peer(False), name, study, runs,
                                                env.redis.url, env.receiver_port):
                    measured(row)
        if "scaling" in only:
            scaling = {s.name: env.studies[s.name] for s in plan.scaling}
            for workers in plan.worker_counts:
                for transport in transports:
                    row = tools.pacsfetch_queued(
                        env.peer(False), scaling, False, runs, transport=transport,
                        redis_url=env.redis.url, receiver_port=env.receiver_port,
                        workers=workers, label="scaling")
                    measured(row)
        if "api" in only:
            api = _api(env, plan, runs)
    return {
        "taken": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": report.machine(),
        "mode": "quick" if quick else "full",
        "studies": {s.name: {"instances": s.n_instances, "rows": s.rows, "columns": s.columns,
                             "bits": 16} for s in plan.studies},
        "transports": transports,
        "notes": notes,
        "measurements": [r.as_json() for r in rows],
        "api": api,
        "prefetch": prefetch,
        "migration": migration,
        "targets": report.ratios(rows) + report.api_targets(api),
        "seconds": round(time.perf_counter() - started, 1),
        "_rows": rows,
    }


def _api(env: Environment, plan: Plan, runs: Path) -> dict[str, Any]:
    """API load on its own Redis database, without workers; the queue is emptied after.

    The API runs as :data:`API_WORKERS` processes: one spends about 2 ms of CPU per
    ``POST /jobs``, so a single process tops out below the 500/s target on this machine.
    """
    import redis

    assert env.redis is not None
    url = env.redis.url.rsplit("/", 1)[0] + "/1"
    config = tools.pacsfetch_config(env.peer(False), "c-get", url, runs / "api-store",
                                    receiver_port=env.receiver_port)
    service = tools.QueuedService(config, runs, "api", workers=0, api_workers=API_WORKERS)
    service.start(with_worker=False)
    study_uid = env.studies["small"].study_uid
    try:
        # Warm-up: every API process answers some requests before the measured ones.
        apiload.sustained(service.url, min(1000, plan.api_requests), study_uid)
        result: dict[str, Any] = {
            "api_workers": API_WORKERS,
            "sustained": apiload.sustained(service.url, plan.api_requests, study_uid).as_json(),
            "batch": apiload.batch(service.url, plan.api_batch, study_uid),
        }
    finally:
        service.stop()
        redis.Redis.from_url(url).flushdb()
    print(f"api: {result}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny studies: the CI smoke run")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default all): {', '.join(PARTS)}")
    parser.add_argument("--workdir", type=Path, default=Path(".bench"),
                        help="studies, peers and received files (default .bench)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default WORKDIR/results.json)")
    args = parser.parse_args(argv)
    only = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = only - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    workdir = args.workdir.absolute()
    # A terminated run still stops the peers it started (the with-blocks unwind).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results = run(workdir, args.quick, only)
    rows = results.pop("_rows")
    print()
    print(report.table(rows))
    print()
    print(report.targets_table(results["targets"]))
    for note in results["notes"]:
        print(f"note: {note}")
    out = args.out or workdir / "results.json"
    report.write(out, results)
    print(f"\nresults: {out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
