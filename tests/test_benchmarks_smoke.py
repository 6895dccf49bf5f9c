"""The benchmark harness end to end in ``--quick`` mode: correctness, not speed.

It starts its own Redis and two Orthancs (Nagle off and on), runs every tool — pacsfetch
over C-GET, C-MOVE (through a ``pacsfetch receiver`` it starts) and DICOMweb, its forward
store, DCMTK's getscu, movescu and storescu, and both through the WAN proxy — on tiny
studies and must bring every instance back with every tool; no timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRANSPORTS = {"c-get", "c-move", "dicomweb"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("bench")
    out = work / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--workdir", str(work),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=360,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "pacsfetch one worker / DCMTK getscu" in run.stdout  # the ratio table was printed
    return json.loads(out.read_text())


def _rows(results: dict, **match: object) -> list[dict]:
    return [r for r in results["measurements"]
            if all(r[k] == v for k, v in match.items())]


def test_every_tool_measured_on_both_studies_and_peers(results: dict) -> None:
    assert results["mode"] == "quick"
    for study in ("small", "large"):
        for tool in ("dcmtk-getscu", "pynetdicom-getscu", "pacsfetch-inline"):
            assert _rows(results, tool=tool, study=study, peer="nodelay"), (tool, study)
        for tool in ("dcmtk-getscu", "pacsfetch-inline"):
            assert _rows(results, tool=tool, study=study, peer="nagle"), (tool, study)
        assert _rows(results, tool="pacsfetch-queued", study=study, workers=1)
    assert {r["workers"] for r in _rows(results, tool="pacsfetch-queued", study="scaling")} == {1, 2}
    for study in ("small", "large"):  # the DIMSE paths beside DCMTK doing the same work
        for tool in ("dcmtk-movescu", "dcmtk-storescu", "pacsfetch-forward"):
            assert _rows(results, tool=tool, study=study), (tool, study)
        for peer in ("wan2ms", "wan10ms"):
            for tool in ("dcmtk-getscu", "pacsfetch-inline"):
                assert _rows(results, tool=tool, study=study, peer=peer), (tool, study, peer)
    assert TRANSPORTS <= set(results["transports"]), results["notes"]
    for transport in results["transports"]:  # every installed transport the harness knows
        for study in ("small", "large"):
            for peer in ("nodelay", "nagle"):
                assert _rows(results, tool="pacsfetch-inline", transport=transport, study=study,
                             peer=peer), (transport, study, peer)
            assert _rows(results, tool="pacsfetch-queued", transport=transport, study=study,
                         workers=1), (transport, study)
        assert {r["workers"] for r in _rows(results, tool="pacsfetch-queued", study="scaling",
                                            transport=transport)} == {1, 2}, transport


def test_every_tool_retrieved_every_instance(results: dict) -> None:
    sizes = {name: spec["instances"] for name, spec in results["studies"].items()}
    scaling = sum(n for name, n in sizes.items() if name.startswith("scale"))
    for row in results["measurements"]:
        expected = scaling if row["study"] == "scaling" else sizes[row["study"]]
        assert row["expected"] == expected
        assert row["instances"] == expected, row
        assert row["megabytes"] > 0 and row["seconds"] > 0 and not row["note"], row


def test_queued_rows_carry_memory_and_latency(results: dict) -> None:
    for row in _rows(results, tool="pacsfetch-queued"):
        assert row["peak_rss_mb"] > 20  # a worker process was sampled, not the launcher
        assert 0 < row["first_instance_s"] <= row["seconds"]


def test_api_load_and_batch_completed_without_errors(results: dict) -> None:
    api = results["api"]
    assert api["sustained"]["errors"] == 0 and api["sustained"]["requests"] > 0
    assert api["batch"]["accepted"] == api["batch"]["jobs"]


def test_targets_are_evaluated(results: dict) -> None:
    targets = [t["target"] for t in results["targets"]]
    assert len(targets) == len(set(targets)), targets  # one per target, not per transport
    names = " | ".join(targets)
    for expected in ("small: pacsfetch one worker / DCMTK getscu",
                     "large: pacsfetch inline / DCMTK getscu", "DCMTK movescu into storescp",
                     "forward store / DCMTK storescu", "10 ms round trip, pacsfetch 4 associations",
                     "Nagle-on / Nagle-off", "worker peak RSS", "POST /jobs", "batch of"):
        assert expected in names
    measured = [t for t in results["targets"] if "pynetdicom" not in t["target"]
                and "scaling" not in t["target"]]
    assert all(t["value"] is not None for t in measured), measured  # every part ran
    # Transports known to the harness but not installed are skipped with a note, not lost.
    assert all(note.startswith("transport ") for note in results["notes"])


def test_migration_planning_enumerated_the_whole_generated_archive(results: dict) -> None:
    migration = results["migration"]
    assert migration["complete"] and migration["planned"] == migration["studies"], migration
