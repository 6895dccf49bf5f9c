"""A NAT lab in network namespaces: a pod behind a masquerading router, a PACS beyond it.

The founding claim of pacsfetch -- C-MOVE breaks behind NAT, C-GET does not -- shown on a
real kernel network path instead of loopback::

    "pod" 10.244.1.2 --veth-- 10.244.1.1 "router" 10.99.0.1 --veth-- 10.99.0.2 "pacs"
     worker, receiver,          MASQUERADE of the pod subnet,            Orthanc; no route
     Redis (default route       optional DNAT port forwards and          to the pod subnet
     via the router)            DROP rules (a firewall)

Only the three namespaces change (their links, addresses, routes and iptables rules); the
root namespace's routing and firewall stay untouched, and deleting the namespaces removes
everything. Needs root (CAP_NET_ADMIN), ``ip`` (iproute2) and Debian's ``iptables``;
:func:`unavailable` says plainly why the lab cannot run where it cannot.

``python -m pacsfetch.sandbox.netlab job ...``, run inside the pod namespace, runs one job
inline (``JobRunner``, as ``pacsfetch retrieve``) or through the queue and a ``pacsfetch
worker`` (``--queued``), and prints the outcome as one JSON line for the test to read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pacsfetch.sandbox.peers import Orthanc, RedisServer

POD_IP = "10.244.1.2"
POD_NET = "10.244.1.0/24"
ROUTER_POD_IP = "10.244.1.1"
ROUTER_SITE_IP = "10.99.0.1"
PACS_IP = "10.99.0.2"
SITE_PREFIX = 24


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def unavailable() -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); run the suite as root"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package {package}; scripts/bootstrap.sh)"
    probe = f"pf-probe-{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace here: {exc.stderr.strip()}"
    try:
        subprocess.run(["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n"],
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        return f"iptables NAT does not work inside a namespace here: {exc.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NetLab:
    """The three namespaces and their wiring; a context manager that removes them again."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.names = {role: f"pf-{role}-{tag}" for role in ("pod", "router", "pacs")}

    # wiring ------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _build(self) -> None:
        pod, router, pacs = (self.names[r] for r in ("pod", "router", "pacs"))
        for ns in (pod, router, pacs):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # veth pairs are created inside the namespaces: nothing appears in the root one.
        _ip("-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "pod0",
            "netns", router)
        _ip("-n", router, "link", "add", "site0", "type", "veth", "peer", "name", "eth0",
            "netns", pacs)
        for ns, dev, address in ((pod, "eth0", f"{POD_IP}/24"),
                                 (router, "pod0", f"{ROUTER_POD_IP}/24"),
                                 (router, "site0", f"{ROUTER_SITE_IP}/{SITE_PREFIX}"),
                                 (pacs, "eth0", f"{PACS_IP}/{SITE_PREFIX}")):
            _ip("-n", ns, "addr", "add", address, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", pod, "route", "add", "default", "via", ROUTER_POD_IP)
        # The pacs namespace gets no route to the pod subnet: as a PACS on a hospital LAN.
        self.run("router", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.iptables("router", "-t", "nat", "-A", "POSTROUTING", "-s", POD_NET, "-o", "site0",
                      "-j", "MASQUERADE")

    def close(self) -> None:
        for ns in self.names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    # commands ----------------------------------------------------------------------------
    def argv(self, role: str, command: Sequence[str]) -> list[str]:
        """*command* as run inside the namespace of *role*."""
        return ["ip", "netns", "exec", self.names[role], *command]

    def run(self, role: str, command: Sequence[str], *, check: bool = True,
            env: Mapping[str, str] | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(role, command), check=check, capture_output=True,
                              text=True, env=dict(env) if env is not None else None,
                              timeout=timeout)

    def iptables(self, role: str, *rule: str) -> None:
        self.run(role, ["iptables", "-w", *rule])

    def listening(self, role: str, port: int) -> bool:
        """Whether something accepts TCP on *port* of the namespace's loopback."""
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"
        return self.run(role, [sys.executable, "-c", probe], check=False).returncode == 0

    # the router's rules ------------------------------------------------------------------
    def forward(self, port: int, to_port: int) -> None:
        """A port forward on the router to the pod (what a NodePort or LoadBalancer is)."""
        self.iptables("router", "-t", "nat", "-A", "PREROUTING", "-i", "site0", "-p", "tcp",
                      "--dport", str(port), "-j", "DNAT", "--to-destination",
                      f"{POD_IP}:{to_port}")

    def drop(self, port: int) -> None:
        """A firewall on the router that silently drops connections to *port*."""
        self.iptables("router", "-A", "INPUT", "-i", "site0", "-p", "tcp", "--dport", str(port),
                      "-j", "DROP")

    # what the PACS sees ------------------------------------------------------------------
    def watch_pacs_port(self, port: int) -> None:
        """Count, in the PACS's own firewall, connections to *port* by source address."""
        for source in (POD_NET, f"{ROUTER_SITE_IP}/32"):
            self.iptables("pacs", "-A", "INPUT", "-p", "tcp", "--dport", str(port), "--syn",
                          "-s", source)

    def pacs_connections_from(self) -> dict[str, int]:
        """Source network -> connections the PACS accepted on watched ports."""
        listing = self.run("pacs", ["iptables", "-w", "-L", "INPUT", "-v", "-n", "-x"]).stdout
        counts: dict[str, int] = {}
        for line in listing.splitlines():
            fields = line.split()
            if len(fields) >= 8 and fields[0].isdigit() and re.match(r"\d", fields[6]):
                counts[fields[6]] = counts.get(fields[6], 0) + int(fields[0])
        return counts


class NamespacedOrthanc(Orthanc):
    """Debian's Orthanc inside the lab's pacs namespace, listening on its address.

    Its storage comes from an Orthanc run of the same *workdir* in the root namespace (upload
    there, stop, start this one): its HTTP API only answers loopback, which is the
    namespace's own here. *destinations* are its C-MOVE destinations (name -> AE title,
    host, port), addresses in the lab.
    """

    def __init__(self, lab: NetLab, workdir: Path, *, aet: str, dicom_port: int,
                 destinations: Mapping[str, tuple[str, str, int]],
                 scu_timeout: int = 60) -> None:
        self._lab = lab
        super().__init__(workdir, aet=aet, dicom_port=dicom_port, dicomweb=False, extra_config={
            "DicomModalities": {name: list(v) for name, v in destinations.items()},
            # Its own connect timeout towards a destination: longer than ours, as many are.
            "DicomScuTimeout": scu_timeout,
        })

    def _command(self) -> list[str]:
        return self._lab.argv("pacs", super()._command())

    def _answers(self) -> bool:
        return self._lab.listening("pacs", self.dicom_port)


class NamespacedRedis(RedisServer):
    """``redis-server`` inside the pod namespace, on its loopback."""

    def __init__(self, lab: NetLab, workdir: Path, port: int = 6379) -> None:
        self._lab = lab
        super().__init__(workdir, port)

    def _command(self) -> list[str]:
        return self._lab.argv("pod", super()._command())

    def _answers(self) -> bool:
        return self._lab.listening("pod", self.port)


# the job driver (runs inside the pod namespace) -------------------------------------------
def _outcome_json(status: str, error_kind: str | None, error: str | None, transport: str | None,
                  notes: Sequence[Any], completed: int) -> str:
    return json.dumps({
        "status": status, "error_kind": error_kind, "error": error, "transport": transport,
        "transport_notes": [n.model_dump(mode="json") for n in notes], "completed": completed,
    })


def _job(args: argparse.Namespace) -> int:
    from pacsfetch.config import load_config
    from pacsfetch.errors import RetrieveError
    from pacsfetch.jobstore import JobStore
    from pacsfetch.models import FINAL_STATUSES, JobRequest
    from pacsfetch.queue import enqueue_retrieves, make_celery

    config = load_config()
    request = JobRequest(source=args.source, study_uid=args.study, store=args.store,
                         transport=args.transport)
    if args.queued:
        store = JobStore.from_url(config.broker.url)
        job = store.create(request)
        enqueue_retrieves(make_celery(config), [(job.id, request.priority)])
        deadline = time.monotonic() + args.timeout
        while (job := store.get(job.id)).status not in FINAL_STATUSES:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        print(_outcome_json(job.status.value, job.error_kind, job.error, job.transport,
                            job.transport_notes, job.progress.completed))
        return 0
    from pacsfetch.plugins.registry import get_registry
    from pacsfetch.workers.runner import JobRunner
    from pacsfetch.workers.state import LocalJobState

    registry = get_registry()
    runner = JobRunner(config, registry, registry.check_config(config))
    try:
        outcome = runner.run(uuid.uuid4().hex, request, LocalJobState())
    except RetrieveError as exc:  # retryable: what a worker would retry
        print(_outcome_json("retry", exc.kind.value, exc.message, None, [], 0))
        return 0
    print(_outcome_json(outcome.status.value, outcome.error_kind, outcome.error,
                        outcome.transport, outcome.transport_notes, outcome.progress.completed))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pacsfetch.sandbox.netlab")
    commands = parser.add_subparsers(dest="command", required=True)
    job = commands.add_parser("job", help="run one job, print its outcome as JSON")
    job.add_argument("--source", required=True)
    job.add_argument("--study", required=True)
    job.add_argument("--store", default="local")
    job.add_argument("--transport", default="auto")
    job.add_argument("--queued", action="store_true", help="through the queue and a worker")
    job.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args(argv)
    return _job(args)


if __name__ == "__main__":
    sys.exit(main())
