"""One C-GET job over several associations, and the fleet-wide cap, counted by the PACS.

Orthanc sits behind the sandbox's latency proxy, which counts the TCP connections it
forwards: what the PACS sees, not what pacsfetch believes it opened. The round trip the
proxy adds keeps each association busy long enough for stripes to overlap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import CALLING_AE, WorkerProcess, make_config, run_job, wait_for

from pacsfetch.api.app import create_app
from pacsfetch.config import Config, parse_config
from pacsfetch.models import JobRequest, JobStatus, Level, Progress
from pacsfetch.sandbox.latency import LatencyProxy
from pacsfetch.sandbox.peers import Orthanc
from pacsfetch.sandbox.samples import SampleStudy, generate_uniform_study
from pacsfetch.workers.state import LocalJobState

RTT_MS = 10


@pytest.fixture
def proxy(orthanc: Orthanc) -> Iterator[LatencyProxy]:
    with LatencyProxy("127.0.0.1", orthanc.dicom_port, rtt_ms=RTT_MS) as running:
        yield running


def proxied(redis_url: str, store_root: Path, orthanc: Orthanc, proxy: LatencyProxy,
            **source: Any) -> dict[str, Any]:
    return make_config(redis_url=redis_url, store_root=store_root, extra_sources={"pacs": {
        "ae_title": orthanc.aet, "host": "127.0.0.1", "port": proxy.port,
        "calling_ae_title": CALLING_AE, "transports": ["c-get"], "timeout": 20, **source}})


def stored(root: Path) -> set[str]:
    return {p.stem for p in root.rglob("*.dcm") if ".pacsfetch" not in p.parts}


def test_a_multi_series_study_spreads_over_three_associations(
        redis_url: str, tmp_path: Path, orthanc: Orthanc, proxy: LatencyProxy,
        mixed_study: SampleStudy) -> None:
    assert len(mixed_study.series_uids) >= 3
    config = parse_config(proxied(redis_url, tmp_path / "store", orthanc, proxy,
                                  associations_per_job=3))
    outcome = run_job(config, JobRequest(source="pacs", study_uid=mixed_study.study_uid,
                                         store="local"))
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert stored(tmp_path / "store") == {i.sop_instance_uid for i in mixed_study.instances}
    assert outcome.progress.completed == len(mixed_study.instances)
    assert outcome.progress.remaining == 0
    # One C-FIND association, then the C-GET stripes; several of them at once.
    assert proxy.opened >= 3 and proxy.peak >= 2, (proxy.opened, proxy.peak)
    assert proxy.peak <= 3
    wait_for(lambda: proxy.open == 0, 10, what="every association to end")


def test_a_single_large_series_spreads_by_lists_of_instances_and_resumes(
        redis_url: str, tmp_path: Path, orthanc: Orthanc, proxy: LatencyProxy,
        big_study: SampleStudy) -> None:
    config = parse_config(proxied(redis_url, tmp_path / "store", orthanc, proxy,
                                  associations_per_job=3))
    done = big_study.instances[:100]
    state = LocalJobState()
    state.instances = {i.sop_instance_uid: '{"local":"earlier"}' for i in done}
    request = JobRequest(source="pacs", level=Level.SERIES, study_uid=big_study.study_uid,
                         series_uid=big_study.series_uids[0], store="local")
    outcome = run_job(config, request, state)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.progress.skipped == 100
    assert outcome.progress.completed == len(big_study.instances)
    # Only what was missing came, over several associations at once.
    assert stored(tmp_path / "store") == {i.sop_instance_uid for i in big_study.instances[100:]}
    assert proxy.peak >= 2, proxy.peak


def test_cancel_stops_every_stripe(redis_url: str, tmp_path: Path, orthanc: Orthanc,
                                   proxy: LatencyProxy, big_study: SampleStudy) -> None:
    config: Config = parse_config(proxied(redis_url, tmp_path / "store", orthanc, proxy,
                                          associations_per_job=3))
    peaks: list[int] = []

    def on_progress(progress: Progress) -> None:
        if progress.completed >= 30:
            peaks.append(proxy.open)
            state.cancel = True

    state = LocalJobState(on_progress)
    outcome = run_job(config, JobRequest(source="pacs", study_uid=big_study.study_uid,
                                         store="local"), state)
    assert outcome.status is JobStatus.CANCELLED, outcome.error
    assert peaks and max(peaks) >= 2  # cancelled while several stripes ran
    assert len(stored(tmp_path / "store")) < len(big_study.instances)
    wait_for(lambda: proxy.open == 0, 10, what="every association to end")
    assert not list((tmp_path / "store").rglob("*.part"))


def test_the_rate_cap_holds_a_striped_job_back(
        redis_url: str, tmp_path: Path, orthanc: Orthanc, big_study: SampleStudy) -> None:
    config = parse_config(make_config(
        redis_url=redis_url, store_root=tmp_path / "store", orthanc=orthanc))
    source = config.sources["orthanc"].model_copy(update={"max_mb_per_second": 2.0,
                                                           "associations_per_job": 3})
    config = config.model_copy(update={"sources": {"orthanc": source}})
    started = time.monotonic()
    outcome = run_job(config, JobRequest(source="orthanc", study_uid=big_study.study_uid,
                                         store="local"))
    elapsed = time.monotonic() - started
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    megabytes = outcome.progress.bytes / 1_000_000
    assert megabytes > 8
    # At most one second of burst, then 2 MB/s, whatever the number of associations.
    assert elapsed >= (megabytes - 2 - 1) / 2, (elapsed, megabytes)


@pytest.mark.parametrize("width", [1, 3])
def test_dicomweb_runs_associations_per_job_requests_at_once(
        redis_url: str, tmp_path: Path, orthanc: Orthanc, mixed_study: SampleStudy,
        width: int) -> None:
    with LatencyProxy("127.0.0.1", orthanc.http_port, rtt_ms=RTT_MS) as web:
        config = parse_config(make_config(
            redis_url=redis_url, store_root=tmp_path / "store", extra_sources={"web": {
                "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
                "dicomweb_url": f"http://127.0.0.1:{web.port}/dicom-web",
                "transports": ["dicomweb"], "associations_per_job": width}}))
        outcome = run_job(config, JobRequest(source="web", study_uid=mixed_study.study_uid,
                                             store="local"))
        assert outcome.status is JobStatus.SUCCEEDED, outcome.error
        assert stored(tmp_path / "store") == {i.sop_instance_uid for i in mixed_study.instances}
        # Requests one after another never overlap at the server; striped ones do.
        assert (web.peak == 1) if width == 1 else (2 <= web.peak <= width), web.peak


@pytest.fixture(scope="module")
def ten_studies(tmp_path_factory: pytest.TempPathFactory) -> list[SampleStudy]:
    root = tmp_path_factory.mktemp("ten")
    return [generate_uniform_study(root / str(n), n_instances=12, rows=32, columns=32,
                                   patient_id=f"PF-TEN-{n}", seed=100 + n) for n in range(10)]


@pytest.fixture(scope="module")
def ten_orthanc(tmp_path_factory: pytest.TempPathFactory,
                ten_studies: list[SampleStudy]) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc-ten"), dicomweb=False) as server:
        for study in ten_studies:
            server.upload_study(study)
        yield server


def test_ten_jobs_in_two_workers_never_hold_more_than_the_cap(
        redis_url: str, tmp_path: Path, ten_orthanc: Orthanc, ten_studies: list[SampleStudy],
        start_worker: Callable[..., WorkerProcess]) -> None:
    with LatencyProxy("127.0.0.1", ten_orthanc.dicom_port, rtt_ms=RTT_MS) as proxy:
        setup = proxied(redis_url, tmp_path / "store", ten_orthanc, proxy, max_associations=2)
        for _ in range(2):
            start_worker(setup, concurrency=5)
        client = TestClient(create_app(parse_config(setup)))
        ids = [client.post("/jobs", json={"source": "pacs", "study_uid": s.study_uid,
                                          "store": "local"}).json()["id"] for s in ten_studies]
        waits: set[str] = set()
        stop = threading.Event()

        def watch() -> None:  # what GET /jobs/{id} shows while jobs queue for the cap
            while not stop.is_set():
                for job_id in ids:
                    job = client.get(f"/jobs/{job_id}").json()
                    if job["status"] == "running" and job["waiting_for"]:
                        waits.add(job["waiting_for"])
                stop.wait(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            finished = wait_for(
                lambda: (jobs := [client.get(f"/jobs/{i}").json() for i in ids])
                and all(j["status"] in {"succeeded", "failed", "partial", "cancelled"}
                        for j in jobs) and jobs, 240, 0.2, "ten jobs to finish")
        finally:
            stop.set()
            watcher.join()
        assert [j["status"] for j in finished] == ["succeeded"] * 10, \
            [j["error"] for j in finished]
        assert proxy.peak <= 2, proxy.peak
        assert proxy.opened >= 20  # a C-FIND and at least one C-GET association per job
        assert any("of 2 in use" in text for text in waits), waits
        expected = {i.sop_instance_uid for s in ten_studies for i in s.instances}
        assert stored(tmp_path / "store") == expected
