"""The founding claim on a real network path: C-GET works from a pod behind NAT, C-MOVE does
not, and ``auto`` says why it moved on.

:mod:`pacsfetch.sandbox.netlab` builds three network namespaces: Orthanc as the "pacs" (no
route to the pod subnet), a "router" that masquerades the pod subnet, and the "pod" where
Redis, ``pacsfetch receiver``, a ``pacsfetch worker`` and the jobs run. Orthanc knows four
move destinations for the receiver (by AE title, as Orthanc looks them up), one per way
a move back goes:

* ``POD``: the pod's own address, which the PACS has no route to (fails at once);
* ``REFUSED``: the router, on a port nothing forwards (the router's kernel refuses it);
* ``DROPPED``: the router, on a port its firewall silently drops (the PACS hangs connecting
  until its own timeout, 30 s here, while ours is 3 s);
* ``FORWARDED``: the router, on a port forwarded (DNAT) to the receiver: a Service at the
  cluster's edge, which makes C-MOVE work.

Skipped, with the reason, where network namespaces cannot be made (not root, no iptables).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import CALLING_AE, write_toml

from pacsfetch.sandbox import netlab
from pacsfetch.sandbox.netlab import (
    PACS_IP,
    POD_IP,
    ROUTER_SITE_IP,
    NamespacedOrthanc,
    NamespacedRedis,
    NetLab,
)
from pacsfetch.sandbox.peers import Orthanc
from pacsfetch.sandbox.samples import SampleStudy, generate_uniform_study

_why_not = netlab.unavailable()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_why_not is not None, reason=f"NAT lab: {_why_not}")]

DICOM_PORT = 4242
RECEIVER_PORT = 11112
REFUSED_PORT = 11113
DROPPED_PORT = 11114
FORWARDED_PORT = 11115
RECEIVER_AE = "PACSFETCH"
OUR_TIMEOUT = 3
N = 12

WAYS_BACK_FAIL = {
    # source -> words the explanation must hold
    "unroutable": "moved nothing to 'POD'",
    "refused": "moved nothing to 'REFUSED'",
    "dropped": "went silent",
}


@pytest.fixture(scope="module")
def lab() -> Iterator[NetLab]:
    with NetLab() as built:
        yield built


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    return generate_uniform_study(tmp_path_factory.mktemp("nat-study"), n_instances=N, rows=32,
                                  columns=32, patient_id="PF-NAT", seed=4242)


@pytest.fixture(scope="module")
def pacs(lab: NetLab, study: SampleStudy,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NamespacedOrthanc]:
    workdir = tmp_path_factory.mktemp("nat-orthanc")
    with Orthanc(workdir, aet="NATPACS", dicomweb=False) as loader:  # root namespace, loopback
        loader.upload_study(study)
    server = NamespacedOrthanc(lab, workdir, aet="NATPACS", dicom_port=DICOM_PORT, destinations={
        "POD": ("POD", POD_IP, RECEIVER_PORT),
        "REFUSED": ("REFUSED", ROUTER_SITE_IP, REFUSED_PORT),
        "DROPPED": ("DROPPED", ROUTER_SITE_IP, DROPPED_PORT),
        "FORWARDED": ("FORWARDED", ROUTER_SITE_IP, FORWARDED_PORT),
    }, scu_timeout=30)
    lab.drop(DROPPED_PORT)
    lab.forward(FORWARDED_PORT, RECEIVER_PORT)
    lab.watch_pacs_port(DICOM_PORT)
    with server:
        yield server


@pytest.fixture(scope="module")
def config_path(lab: NetLab, pacs: NamespacedOrthanc,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("nat-pod")
    redis = NamespacedRedis(lab, workdir / "redis")
    source = {"ae_title": pacs.aet, "host": PACS_IP, "port": DICOM_PORT,
              "calling_ae_title": CALLING_AE, "timeout": OUR_TIMEOUT,
              "transports": ["c-move", "c-get"]}
    destinations = {"unroutable": "POD", "refused": "REFUSED", "dropped": "DROPPED",
                    "forwarded": "FORWARDED"}
    data = {
        "broker": {"url": redis.url},
        "sources": {name: {**source, "move_destination": ae}
                    for name, ae in destinations.items()},
        "stores": {"local": {"plugin": "filesystem", "root": str(workdir / "store")}},
        "worker": {"max_retries": 0, "lease_seconds": 5, "progress_interval": 0.1},
        "receiver": {"ae_title": RECEIVER_AE, "port": RECEIVER_PORT, "bind": "0.0.0.0"},
        # Each namespace has ports of its own: the defaults are free in the pod.
        "metrics": {"bind": "127.0.0.1"},
    }
    path = write_toml(data, workdir / "pacsfetch.toml")
    return path


@pytest.fixture(scope="module")
def pod(lab: NetLab, config_path: Path) -> Iterator[dict[str, Any]]:
    """Redis, the receiver and a worker, all in the pod namespace."""
    redis = NamespacedRedis(lab, config_path.parent / "redis")
    env = {**os.environ, "PACSFETCH_CONFIG": str(config_path), "PACSFETCH_LOG_LEVEL": "INFO"}
    processes: list[subprocess.Popen[bytes]] = []
    with redis:
        try:
            for name, args, marker in (("receiver", ["receiver"], b"receiver listening"),
                                       ("worker", ["worker", "-c", "1"], b"ready.")):
                log = config_path.parent / f"{name}.log"
                with log.open("wb") as out:
                    processes.append(subprocess.Popen(
                        lab.argv("pod", [sys.executable, "-m", "pacsfetch", *args]), env=env,
                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
                _wait_for_line(log, marker, processes[-1])
            yield {"env": env, "store": config_path.parent / "store"}
        finally:
            for process in processes:
                os.killpg(process.pid, 15)
            for process in processes:
                process.wait(30)


def _wait_for_line(log: Path, marker: bytes, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while marker not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{log.name}: {log.read_text()[-3000:]}")
        time.sleep(0.05)


def _job(lab: NetLab, pod: dict[str, Any], study: SampleStudy, source: str, transport: str,
         *, queued: bool = False) -> dict[str, Any]:
    """One job in the pod namespace; its outcome as the job record shows it."""
    shutil.rmtree(pod["store"], ignore_errors=True)
    command = [sys.executable, "-m", "pacsfetch.sandbox.netlab", "job", "--source", source,
               "--study", study.study_uid, "--transport", transport]
    done = lab.run("pod", command + (["--queued"] if queued else []), env=pod["env"],
                   timeout=180)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stored(pod: dict[str, Any]) -> int:
    return sum(1 for p in pod["store"].rglob("*.dcm"))


def test_c_get_from_the_pod_works_and_the_pacs_sees_only_the_router(
    lab: NetLab, pod: dict[str, Any], study: SampleStudy,
) -> None:
    before = lab.pacs_connections_from()
    outcome = _job(lab, pod, study, "unroutable", "c-get", queued=True)  # through the worker
    assert outcome["status"] == "succeeded", outcome
    assert outcome["transport"] == "c-get" and outcome["completed"] == N
    assert _stored(pod) == N
    seen = lab.pacs_connections_from()
    assert seen.get(ROUTER_SITE_IP, 0) > before.get(ROUTER_SITE_IP, 0)  # the router's address
    assert seen.get("10.244.1.0/24", 0) == 0  # never the pod's


@pytest.mark.parametrize("source", sorted(WAYS_BACK_FAIL))
def test_c_move_from_the_pod_fails_as_move_destination_saying_why(
    lab: NetLab, pod: dict[str, Any], study: SampleStudy, source: str,
) -> None:
    outcome = _job(lab, pod, study, source, "c-move")
    assert outcome["status"] == "failed", outcome
    assert outcome["error_kind"] == "move-destination", outcome  # not a retried timeout
    assert WAYS_BACK_FAIL[source] in outcome["error"]
    assert "NAT" in outcome["error"] and "C-GET" in outcome["error"]
    assert _stored(pod) == 0


@pytest.mark.parametrize("source", sorted(WAYS_BACK_FAIL))
def test_auto_falls_back_to_c_get_in_every_way_and_says_why(
    lab: NetLab, pod: dict[str, Any], study: SampleStudy, source: str,
) -> None:
    outcome = _job(lab, pod, study, source, "auto")
    assert outcome["status"] == "succeeded", outcome
    assert outcome["transport"] == "c-get" and outcome["completed"] == N
    (note,) = outcome["transport_notes"]
    assert note["transport"] == "c-move" and note["error_kind"] == "move-destination"
    assert WAYS_BACK_FAIL[source] in note["error"]
    assert _stored(pod) == N


def test_pacsfetch_retrieve_prints_why_c_move_gave_way(
    lab: NetLab, pod: dict[str, Any], study: SampleStudy,
) -> None:
    shutil.rmtree(pod["store"], ignore_errors=True)
    done = lab.run("pod", [sys.executable, "-m", "pacsfetch", "retrieve", "--source", "dropped",
                           "--study", study.study_uid, "--store", "local"],
                   env={**pod["env"], "COLUMNS": "400"}, check=False, timeout=180)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 0, output
    assert "c-move gave way (move-destination): " in output
    assert "went silent" in output
    assert f"succeeded: {N} instance(s)" in output and "via c-get" in output


def test_a_port_forward_on_the_router_makes_c_move_work(
    lab: NetLab, pod: dict[str, Any], study: SampleStudy,
) -> None:
    outcome = _job(lab, pod, study, "forwarded", "c-move", queued=True)
    assert outcome["status"] == "succeeded", outcome
    assert outcome["transport"] == "c-move" and outcome["completed"] == N
    assert _stored(pod) == N
