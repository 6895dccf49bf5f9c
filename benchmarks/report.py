"""Ratios against the targets of the DIMSE engine (#10) and API (#5) issues, a printed table, and the JSON results file.

Ratios are throughput ratios from one run (higher is better for pacsfetch), except the
Nagle ratio, which is time against the Nagle-on Orthanc over time against the Nagle-off
one (lower is better).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from benchmarks.tools import Measurement


def _find(rows: list[Measurement], **match: Any) -> Measurement | None:
    for row in rows:
        if all(getattr(row, k) == v for k, v in match.items()):
            return row
    return None


def _ratio(a: Measurement | None, b: Measurement | None) -> float | None:
    if a is None or b is None or not b.instances_per_s:
        return None
    return round(a.instances_per_s / b.instances_per_s, 2)


def ratios(rows: list[Measurement], transport: str = "c-get") -> list[dict[str, Any]]:
    """Each target of the DIMSE engine issue with the measured value and whether it holds.

    Targets compare like with like in one run: pacsfetch over *transport* (C-GET, as
    ``getscu`` uses) against DCMTK ``getscu``; pacsfetch's C-MOVE job against ``movescu``
    into ``storescp``; its forward store against ``storescu`` sending the same files;
    pacsfetch striped over four associations against ``getscu`` through the same WAN proxy.
    pynetdicom's ``getscu`` is reported beside them, without a goal.
    """
    out: list[dict[str, Any]] = []

    def target(name: str, value: float | None, goal: float | None, sign: str = ">=") -> None:
        met = None if value is None or goal is None else (
            value >= goal if sign == ">=" else value <= goal)
        out.append({"target": name, "value": value,
                    "goal": f"{sign} {goal:g}" if goal is not None else "(reported)", "met": met})

    for study in ("small", "large"):
        pynetdicom = _find(rows, tool="pynetdicom-getscu", study=study, peer="nodelay")
        dcmtk = _find(rows, tool="dcmtk-getscu", study=study, peer="nodelay")
        inline = _find(rows, tool="pacsfetch-inline", study=study, peer="nodelay",
                       transport=transport)
        worker = _find(rows, tool="pacsfetch-queued", study=study, workers=1,
                       transport=transport)
        target(f"{study}: pacsfetch inline / DCMTK getscu (moonshot >= 1)",
               _ratio(inline, dcmtk), 0.7)
        target(f"{study}: pacsfetch one worker / DCMTK getscu", _ratio(worker, dcmtk), 0.6)
        target(f"{study}: pacsfetch inline / pynetdicom getscu", _ratio(inline, pynetdicom), None)
        move = _find(rows, tool="pacsfetch-queued", study=study, workers=1, transport="c-move")
        target(f"{study}: pacsfetch C-MOVE one worker / DCMTK movescu into storescp",
               _ratio(move, _find(rows, tool="dcmtk-movescu", study=study)), 0.5)
        target(f"{study}: pacsfetch forward store / DCMTK storescu",
               _ratio(_find(rows, tool="pacsfetch-forward", study=study),
                      _find(rows, tool="dcmtk-storescu", study=study)), 0.5)
        for rtt, goal in (("2", None), ("10", 3.0)):
            peer = f"wan{rtt}ms"
            target(f"{study}: {rtt} ms round trip, pacsfetch 4 associations / DCMTK getscu",
                   _ratio(_find(rows, tool="pacsfetch-inline", study=study, peer=peer),
                          _find(rows, tool="dcmtk-getscu", study=study, peer=peer)), goal)
        on = _find(rows, tool="pacsfetch-inline", study=study, peer="nagle", transport=transport)
        nagle = None if on is None or inline is None else round(on.seconds / inline.seconds, 2)
        target(f"{study}: time Nagle-on / Nagle-off (pacsfetch)", nagle, 1.5, "<=")
    large = _find(rows, tool="pacsfetch-queued", study="large", workers=1, transport=transport)
    small = _find(rows, tool="pacsfetch-queued", study="small", workers=1, transport=transport)
    if large and large.peak_rss_mb is not None:
        target("worker peak RSS, large study (MB)", round(large.peak_rss_mb, 1), 250, "<=")
    if large and small and large.peak_rss_mb and small.peak_rss_mb:
        target("worker peak RSS large / small study", round(large.peak_rss_mb / small.peak_rss_mb, 2),
               1.25, "<=")
    dcmtk_small = _find(rows, tool="dcmtk-getscu", study="small", peer="nodelay")
    for row in rows:
        if (row.tool == "pacsfetch-queued" and row.study == "scaling"
                and row.transport == transport and dcmtk_small):
            target(f"scaling, {row.workers} worker(s) / DCMTK getscu small",
                   _ratio(row, dcmtk_small), None)
    return out


def api_targets(api: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    if "sustained" in api:
        s = api["sustained"]
        kept_up = s["requests_per_s"] >= 0.95 * s["offered_per_s"] and not s["errors"]
        out.append({"target": f"POST /jobs requests/s (offered {s['offered_per_s']:g}/s)",
                    "value": s["requests_per_s"], "goal": ">= 500, no errors",
                    "met": kept_up and s["offered_per_s"] >= 500})
        out.append({"target": "POST /jobs p99 (ms)", "value": s["p99_ms"], "goal": "< 50",
                    "met": s["p99_ms"] < 50})
    if "batch" in api:
        b = api["batch"]
        out.append({"target": f"batch of {b['jobs']} jobs enqueued (s)", "value": b["seconds"],
                    "goal": "< 30", "met": b["seconds"] < 30 and b["accepted"] == b["jobs"]})
    return out


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}", "machine": platform.machine()}


def table(rows: list[Measurement]) -> str:
    header = (f"{'tool':<20} {'transport':<9} {'study':<8} {'peer':<8} {'wk':>2} "
              f"{'inst':>10} {'s':>8} {'inst/s':>8} {'MB/s':>7} {'RSS MB':>7} {'1st s':>6}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.tool:<20} {r.transport or '-':<9} {r.study:<8} {r.peer:<8} {r.workers:>2} "
            f"{f'{r.instances}/{r.expected}':>10} {r.seconds:>8.2f} {r.instances_per_s:>8.1f} "
            f"{r.mb_per_s:>7.1f} {(r.peak_rss_mb or 0):>7.1f} "
            f"{'' if r.first_instance_s is None else f'{r.first_instance_s:.2f}':>6}"
            + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = []
    for t in targets:
        mark = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        lines.append(f"{t['target']:<58} {str(t['value']):>8}  goal {t['goal']:<12} {mark}")
    return "\n".join(lines)


def write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


_TOOL_NAMES = {"dcmtk-getscu": "DCMTK getscu", "pynetdicom-getscu": "pynetdicom getscu",
               "pacsfetch-inline": "pacsfetch retrieve", "pacsfetch-queued": "pacsfetch job",
               "dcmtk-movescu": "DCMTK movescu → storescp", "dcmtk-storescu": "DCMTK storescu",
               "pacsfetch-forward": "pacsfetch forward store"}
_PEER_NAMES = {"nodelay": "Nagle off", "nagle": "Nagle on", "wan2ms": "Nagle off, 2 ms away",
               "wan10ms": "Nagle off, 10 ms away"}
_STUDY_NAMES = {"scaling": "4 studies at once"}


def markdown(results: dict[str, Any]) -> str:
    """The README's tables, from a results file: the measurements, then the targets."""
    lines = ["| tool | transport | study | Orthanc | workers | time | instances/s | MB/s "
             "| peak RSS | first instance |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["measurements"]:
        first = "" if r["first_instance_s"] is None else f"{r['first_instance_s']:.2f} s"
        workers = r["workers"] if r["tool"] == "pacsfetch-queued" else ""
        lines.append(
            f"| {_TOOL_NAMES.get(r['tool'], r['tool'])} | {r['transport'] or ''} "
            f"| {_STUDY_NAMES.get(r['study'], r['study'])} "
            f"| {_PEER_NAMES.get(r['peer'], r['peer'])} | {workers} "
            f"| {r['seconds']:.2f} s | {r['instances_per_s']:,.0f} | {r['mb_per_s']:.1f} "
            f"| {r['peak_rss_mb']:.0f} MB | {first} |")
    lines += ["", "| target | measured | goal | |", "|---|---|---|---|"]
    for t in results["targets"]:
        mark = {True: "met", False: "not met", None: ""}[t["met"]]
        lines.append(f"| {t['target']} | {t['value']} | {t['goal']} | {mark} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(markdown(json.loads(Path(sys.argv[1] if len(sys.argv) > 1
                                   else ".bench/results.json").read_text())))
