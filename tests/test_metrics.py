"""Prometheus metrics of the API and the workers, read as a scraper reads them.

A real ``pacsfetch worker`` (prefork pool of two processes, so multiprocess mode is in play)
and a real ``pacsfetch api`` run retrieves from the session's Orthanc; the tests scrape
their ports, and once let Debian's Prometheus server scrape them too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from helpers import CALLING_AE, WorkerProcess, make_config, wait_for, write_toml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pacsfetch.api.app import create_app
from pacsfetch.config import ConfigError, MetricsConfig, parse_config
from pacsfetch.metrics import metric_names, serve_receiver_metrics
from pacsfetch.metrics_dir import prepare_multiprocess_dir
from pacsfetch.sandbox.latency import LatencyProxy
from pacsfetch.sandbox.peers import Orthanc, Prometheus, RedisServer, free_port
from pacsfetch.sandbox.samples import SampleStudy

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "helm" / "pacsfetch" / "dashboards" / "pacsfetch.json"
UNKNOWN_STUDY = "1.2.826.0.1.3680043.8.498.999999999"
METRICS_DB = 5
"""A Redis database of its own: the per-test ``redis_url`` fixture empties database 0."""


def scrape(url: str) -> list[Sample]:
    reply = httpx.get(url, timeout=10)
    reply.raise_for_status()
    return [s for family in text_string_to_metric_families(reply.text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called *name* whose labels include *labels*."""
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@dataclass
class Deployment:
    api_url: str
    worker_port: int
    api_port: int
    study: SampleStudy
    succeeded: dict[str, Any]
    failed: dict[str, Any]

    @property
    def worker_url(self) -> str:
        return f"http://127.0.0.1:{self.worker_port}/metrics"


def _final(client: httpx.Client, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] in {"succeeded", "partial", "failed", "cancelled"} else None

    return wait_for(done, 120, 0.2, f"job {job_id} to finish")


@pytest.fixture(scope="module")
def deployment(redis_server: RedisServer, orthanc: Orthanc, mixed_study: SampleStudy,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A worker and an API, after one successful and one failed retrieve through them."""
    workdir = tmp_path_factory.mktemp("metrics")
    redis_url = f"{redis_server.url.rsplit('/', 1)[0]}/{METRICS_DB}"
    redis.Redis.from_url(redis_url).flushdb()
    config = make_config(redis_url=redis_url, store_root=workdir / "store", orthanc=orthanc)
    path = write_toml(config, workdir / "pacsfetch.toml")
    worker = WorkerProcess(path, workdir / "worker.log", concurrency=2)
    api_port = free_port()
    with (workdir / "api.log").open("wb") as api_log:
        api = subprocess.Popen(
            [sys.executable, "-m", "pacsfetch", "api", "--host", "127.0.0.1",
             "--port", str(api_port)],
            env={**os.environ, "PACSFETCH_CONFIG": str(path)}, stdout=api_log,
            stderr=subprocess.STDOUT, start_new_session=True)
    api_url = f"http://127.0.0.1:{api_port}"
    try:
        worker.wait_ready()
        wait_for(lambda: _answers(f"{api_url}/healthz"), 30, 0.1, "the API to answer")
        with httpx.Client(base_url=api_url, timeout=10) as client:
            ids = [client.post("/jobs", json={"source": "orthanc", "study_uid": uid,
                                              "store": "local"}).json()["id"]
                   for uid in (mixed_study.study_uid, UNKNOWN_STUDY)]
            succeeded, failed = (_final(client, job_id) for job_id in ids)
        yield Deployment(api_url, config["metrics"]["worker_port"], api_port, mixed_study,
                         succeeded, failed)
    finally:
        api.terminate()
        api.wait(15)
        worker.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_worker_counts_instances_bytes_and_job_outcomes(deployment: Deployment) -> None:
    assert deployment.succeeded["status"] == "succeeded", deployment.succeeded["error"]
    assert deployment.failed["status"] == "failed" and deployment.failed["error_kind"] == "query"
    samples = scrape(deployment.worker_url)
    n = len(deployment.study.instances)
    where = {"source": "orthanc", "transport": "c-get"}
    assert value(samples, "pacsfetch_instances_received_total", **where) == n
    assert value(samples, "pacsfetch_instances_stored_total", store="local", **where) == n
    stored_bytes = value(samples, "pacsfetch_stored_bytes_total", store="local", **where)
    assert stored_bytes == deployment.succeeded["progress"]["bytes"] > 0
    assert value(samples, "pacsfetch_received_bytes_total", **where) == stored_bytes
    assert value(samples, "pacsfetch_instance_failures_total") == 0
    assert value(samples, "pacsfetch_jobs_finished_total", status="succeeded", **where) == 1
    # The failed job's C-GET found nothing to retrieve: still C-GET's failure.
    assert value(samples, "pacsfetch_jobs_finished_total", status="failed", **where) == 1
    assert value(samples, "pacsfetch_job_failures_total", error_kind="query", source="orthanc") == 1
    assert value(samples, "pacsfetch_job_attempts_total", source="orthanc") == 2
    assert value(samples, "pacsfetch_job_retries_total") == 0
    assert value(samples, "pacsfetch_job_queued_seconds_count", source="orthanc") == 2
    assert value(samples, "pacsfetch_job_duration_seconds_count", status="succeeded") == 1
    assert value(samples, "pacsfetch_jobs_in_flight", source="orthanc") == 0


def test_worker_counts_associations_and_their_throughput(deployment: Deployment) -> None:
    samples = scrape(deployment.worker_url)
    opened_get = value(samples, "pacsfetch_associations_opened_total", source="orthanc",
                       service="C-GET")
    assert opened_get >= 1
    assert value(samples, "pacsfetch_associations_opened_total", source="orthanc",
                 service="C-FIND") == 2  # one planning query per job
    assert value(samples, "pacsfetch_associations_open", source="orthanc") == 0
    assert value(samples, "pacsfetch_association_throughput_bytes_per_second_count",
                 source="orthanc", service="C-GET") == opened_get
    assert value(samples, "pacsfetch_association_throughput_bytes_per_second_sum",
                 source="orthanc", service="C-GET") > 0


def test_worker_serves_the_sum_over_its_pool_processes(deployment: Deployment) -> None:
    """Multiprocess mode: the main process serves values its children wrote to files.

    The main worker process runs no job, so any job counter it serves came from a child;
    the in-process default collectors (gc, platform) are absent from a multiprocess registry.
    """
    samples = scrape(deployment.worker_url)
    assert value(samples, "pacsfetch_job_attempts_total") == 2
    assert not [s for s in samples if s.name.startswith("python_gc_")]


def test_api_counts_submissions_and_reads_job_counts_from_redis(deployment: Deployment) -> None:
    samples = scrape(f"{deployment.api_url}/metrics")
    assert value(samples, "pacsfetch_jobs_submitted_total", source="orthanc", transport="auto",
                 store="local") == 2
    assert value(samples, "pacsfetch_jobs", status="succeeded") == 1
    assert value(samples, "pacsfetch_jobs", status="failed") == 1
    assert value(samples, "pacsfetch_jobs", status="queued") == 0
    depth = [s for s in samples if s.name == "pacsfetch_queue_messages"]
    assert sorted(int(s.labels["priority"]) for s in depth) == list(range(10))
    assert sum(s.value for s in depth) == 0


def test_no_identifier_ever_becomes_a_label(deployment: Deployment, orthanc: Orthanc) -> None:
    study = deployment.study
    identifiers = {study.study_uid, study.patient_id, UNKNOWN_STUDY, orthanc.aet, CALLING_AE,
                   *study.series_uids, *(i.sop_instance_uid for i in study.instances),
                   deployment.succeeded["id"], deployment.failed["id"]}
    labels = {
        value
        for url in (deployment.worker_url, f"{deployment.api_url}/metrics")
        for sample in scrape(url)
        for value in sample.labels.values()
    }
    assert "orthanc" in labels and "local" in labels  # the scrape did see labelled series
    assert not labels & identifiers
    assert not [v for v in labels if re.fullmatch(r"\d+(\.\d+){3,}", v)], "a UID-like label"


def test_prometheus_server_scrapes_worker_and_api(deployment: Deployment,
                                                   tmp_path: Path) -> None:
    targets = {"pacsfetch-worker": [f"127.0.0.1:{deployment.worker_port}"],
               "pacsfetch-api": [f"127.0.0.1:{deployment.api_port}"]}
    n = len(deployment.study.instances)
    with Prometheus(tmp_path / "prometheus", targets, scrape_interval="1s") as prometheus:
        stored = wait_for(lambda: prometheus.query(
            'pacsfetch_instances_stored_total{source="orthanc",store="local"}'), 60, 0.5,
            "Prometheus to scrape the worker")
        assert float(stored[0]["value"][1]) == n
        submitted = wait_for(lambda: prometheus.query("pacsfetch_jobs_submitted_total"), 60, 0.5,
                             "Prometheus to scrape the API")
        assert submitted[0]["metric"]["job"] == "pacsfetch-api"
        assert float(submitted[0]["value"][1]) == 2
        up = {r["metric"]["job"]: r["value"][1] for r in prometheus.query("up")}
        assert up == {"pacsfetch-worker": "1", "pacsfetch-api": "1"}
        quantile = prometheus.query(
            "histogram_quantile(0.5, sum by (le) (pacsfetch_job_duration_seconds_bucket))")
        assert float(quantile[0]["value"][1]) > 0


def test_a_killed_pool_process_stops_counting_as_in_flight(
    redis_url: str, tmp_path: Path, orthanc: Orthanc, big_study: SampleStudy,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """SIGKILL skips Celery's shutdown signal; the worker still drops the dead child's gauges."""
    config = make_config(redis_url=redis_url, store_root=tmp_path / "store", orthanc=orthanc)
    # One association, and a PACS 20 ms away: the job is still running when the child dies.
    config["sources"]["orthanc"]["associations_per_job"] = 1
    with LatencyProxy("127.0.0.1", orthanc.dicom_port, rtt_ms=20) as proxy:
        config["sources"]["orthanc"]["port"] = proxy.port
        worker = start_worker(config)
        url = f"http://127.0.0.1:{config['metrics']['worker_port']}/metrics"
        client = TestClient(create_app(parse_config(config)))
        job_id = client.post("/jobs", json={"source": "orthanc", "study_uid": big_study.study_uid,
                                            "store": "local"}).json()["id"]
        wait_for(lambda: value(scrape(url), "pacsfetch_instances_stored_total") >= 20, 60, 0.05,
                 "the job to be under way")
        samples = scrape(url)
        assert value(samples, "pacsfetch_jobs_in_flight", source="orthanc") == 1
        assert value(samples, "pacsfetch_associations_open", source="orthanc") == 1
        (child,) = worker.children()
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: client.get(f"/jobs/{job_id}").json()["status"] == "succeeded", 120,
                 0.2, "the redelivered job to succeed")
        samples = scrape(url)
        assert value(samples, "pacsfetch_jobs_in_flight", source="orthanc") == 0
        assert value(samples, "pacsfetch_associations_open", source="orthanc") == 0
        assert value(samples, "pacsfetch_jobs_finished_total", status="succeeded") == 1
        # Counters of the dead child are kept: instances it stored stay counted.
        assert value(samples, "pacsfetch_instances_stored_total") >= len(big_study.instances)
        worker.stop()  # before the proxy it talks through goes


def test_retries_and_the_final_failure_are_counted_by_reason(
    redis_url: str, tmp_path: Path, start_worker: Callable[..., WorkerProcess],
) -> None:
    config = make_config(redis_url=redis_url, store_root=tmp_path / "store", extra_sources={
        "down": {"ae_title": "DOWN", "host": "127.0.0.1", "port": free_port(), "timeout": 2}})
    start_worker(config)
    client = TestClient(create_app(parse_config(config)))
    job_id = client.post("/jobs", json={"source": "down", "study_uid": "1.2.3",
                                        "store": "local"}).json()["id"]
    wait_for(lambda: client.get(f"/jobs/{job_id}").json()["status"] == "failed", 60, 0.2,
             "the job to give up")
    samples = scrape(f"http://127.0.0.1:{config['metrics']['worker_port']}/metrics")
    assert value(samples, "pacsfetch_job_retries_total", source="down",
                 error_kind="connection") == 2  # worker.max_retries
    assert value(samples, "pacsfetch_job_attempts_total", source="down") == 3
    assert value(samples, "pacsfetch_job_failures_total", source="down",
                 error_kind="connection") == 1
    assert value(samples, "pacsfetch_associations_opened_total") == 0


def test_receiver_metrics_start_with_one_call() -> None:
    """In this test process (no multiprocess mode), as a single-process receiver runs it."""
    settings = MetricsConfig(bind="127.0.0.1", receiver_port=free_port())
    serve_receiver_metrics(settings)  # a daemon thread; it ends with the test session
    text = httpx.get(f"http://127.0.0.1:{settings.receiver_port}/metrics", timeout=10).text
    assert "# TYPE pacsfetch_instances_received_total counter" in text
    with pytest.raises(ConfigError, match=r"^metrics\.receiver_port: cannot serve metrics"):
        serve_receiver_metrics(settings)


def test_queue_depth_per_priority_list(redis_url: str, tmp_path: Path,
                                       orthanc: Orthanc, mixed_study: SampleStudy) -> None:
    """With no worker running, submitted jobs wait in kombu's per-priority Redis lists."""
    client = TestClient(create_app(parse_config(make_config(
        redis_url=redis_url, store_root=tmp_path / "store", orthanc=orthanc))))
    for priority in (9, 9, 2):
        reply = client.post("/jobs", json={"source": "orthanc", "study_uid": mixed_study.study_uid,
                                           "store": "local", "priority": priority})
        assert reply.status_code == 202
    samples = [s for family in text_string_to_metric_families(client.get("/metrics").text)
               for s in family.samples]
    assert value(samples, "pacsfetch_queue_messages", queue="pacsfetch", priority="9") == 2
    assert value(samples, "pacsfetch_queue_messages", queue="pacsfetch", priority="2") == 1
    assert value(samples, "pacsfetch_queue_messages") == 3
    assert value(samples, "pacsfetch_jobs", status="queued") == 3


def test_metrics_need_no_token(redis_url: str, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSFETCH_API_TOKEN", "s3cret")
    client = TestClient(create_app(parse_config(make_config(
        redis_url=redis_url, store_root=tmp_path / "store"))))
    assert client.get("/jobs").status_code == 401
    reply = client.get("/metrics")
    assert reply.status_code == 200 and "pacsfetch_jobs{" in reply.text


def test_a_taken_worker_port_refuses_start_naming_the_key(redis_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(redis_url=redis_url, store_root=tmp_path / "store",
                             metrics={"worker_port": port})
        worker = WorkerProcess(write_toml(config, tmp_path / "w.toml"), tmp_path / "w.log")
        try:
            assert worker.proc.wait(30) == 2
        finally:
            worker.stop()
    said = " ".join((tmp_path / "w.log").read_text().split())  # the console wraps lines
    assert f"metrics.worker_port: cannot serve metrics on 127.0.0.1:{port}" in said


def test_metrics_config_defaults_and_unknown_keys(redis_url: str, tmp_path: Path) -> None:
    config = make_config(redis_url=redis_url, store_root=tmp_path)
    del config["metrics"]
    defaults = parse_config(config).metrics
    assert (defaults.worker_port, defaults.receiver_port, defaults.enabled) == (9808, 9809, True)
    config["metrics"] = {"worker_prot": 9999}
    with pytest.raises(ConfigError, match=r"metrics\.worker_prot: unknown key"):
        parse_config(config)
    config["metrics"] = {"receiver_port": 70000}
    with pytest.raises(ConfigError, match=r"metrics\.receiver_port"):
        parse_config(config)


def test_multiprocess_dir_must_be_prepared_before_prometheus_client() -> None:
    with pytest.raises(RuntimeError, match="before prometheus_client is imported"):
        prepare_multiprocess_dir()


def test_dashboard_uses_only_defined_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    expressions.append(dashboard["templating"]["list"][1]["query"]["query"])
    used = {re.sub(r"_(total|bucket|sum|count)$", "", name)
            for expr in expressions for name in re.findall(r"\bpacsfetch_\w+", expr)}
    assert used, "the dashboard queries no pacsfetch metric"
    assert used <= metric_names(), sorted(used - metric_names())
    # Every metric is on the dashboard, so a new one cannot be forgotten there either.
    assert metric_names() <= used, sorted(metric_names() - used)
