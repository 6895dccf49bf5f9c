"""Liveness and readiness on the metrics port of a worker or the receiver.

``GET /healthz`` (liveness) answers 200 while the process's own loop beats: a worker's Celery
consumer loop, the receiver's serve loop. A loop that stops beating for
:data:`STALE_SECONDS` is stuck, and restarting the container is the cure, so that is what
the probe asks for. ``GET /readyz`` (readiness) answers 200 while the broker answers a PING,
the spool directory takes a file, and the process is not draining; it never restarts
anything, it only takes the pod out of its Service while it cannot work. Every other path
serves the Prometheus metrics, as before. The API keeps its own ``/healthz``.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

STALE_SECONDS = 60.0
"""A loop that has not beaten for this long is reported dead (it beats every few seconds)."""
BROKER_TIMEOUT = 2.0

Check = Callable[[], str | None]
"""A readiness check: None when fine, else why not (no patient data, no secrets)."""

_beats: dict[str, float] = {}
_checks: list[tuple[str, Check]] = []
_lock = threading.Lock()


def expect(loop: str) -> None:
    """Start watching *loop*; it counts as fresh until it has had time to beat."""
    with _lock:
        _beats.setdefault(loop, time.monotonic())


def beat(loop: str) -> None:
    """*loop* ran just now."""
    with _lock:
        _beats[loop] = time.monotonic()


def stale_loops(now: float | None = None) -> list[str]:
    """The loops that have not beaten within :data:`STALE_SECONDS`."""
    now = time.monotonic() if now is None else now
    with _lock:
        return sorted(name for name, at in _beats.items() if now - at > STALE_SECONDS)


def add_check(name: str, check: Check) -> None:
    """Make *check* part of readiness."""
    _checks.append((name, check))


def failing_checks() -> dict[str, str]:
    """Readiness checks that fail now, by name, with their reasons."""
    failing = {}
    for name, check in _checks:
        try:
            reason = check()
        except Exception as exc:  # a check that raises is a failing check, not a 500
            reason = f"{type(exc).__name__}: {exc}"
        if reason:
            failing[name] = reason
    return failing


def broker_check(url: str) -> Check:
    """The broker (Redis) answers a PING within :data:`BROKER_TIMEOUT`."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=BROKER_TIMEOUT,
                                  socket_connect_timeout=BROKER_TIMEOUT)

    def check() -> str | None:
        try:
            client.ping()
        except (redis.RedisError, OSError) as exc:
            return f"broker does not answer: {type(exc).__name__}"
        return None

    return check


def writable_check(directory: str | None = None) -> Check:
    """A file can be created in *directory* (default: the temporary directory, where the
    move receiver spools incoming data sets): a full or read-only volume is not ready."""

    def check() -> str | None:
        where = directory or tempfile.gettempdir()
        try:
            with tempfile.NamedTemporaryFile(dir=where, prefix=".pacsfetch-ready-"):
                pass
        except OSError as exc:
            return f"spool {where} not writable: {exc.strerror or exc}"
        return None

    return check


def watch(broker_url: str, draining: Callable[[], bool]) -> None:
    """The readiness of a worker or the receiver: broker, spool, not stopping."""
    add_check("broker", broker_check(broker_url))
    add_check("spool", writable_check())
    add_check("draining", lambda: "stopping: draining before exit" if draining() else None)


def _respond(start_response: Callable[..., Any], ok: bool, body: dict[str, Any]) -> list[bytes]:
    status = "200 OK" if ok else "503 Service Unavailable"
    payload = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(payload)))])
    return [payload]


def make_app(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """/healthz and /readyz; the metrics of *registry* on every other path."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            stale = stale_loops()
            return _respond(start_response, not stale,
                            {"status": "stuck" if stale else "ok", "stale_loops": stale})
        if path == "/readyz":
            failing = failing_checks()
            return _respond(start_response, not failing,
                            {"status": "not ready" if failing else "ok", "failing": failing})
        return metrics(environ, start_response)

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds must not flood the JSON log."""


def serve(port: int, bind: str, registry: CollectorRegistry) -> None:
    """Serve metrics, /healthz and /readyz from a daemon thread; raises OSError if the
    port cannot be used."""
    server_class = type("Server", (_Server,), {
        "address_family": socket.AF_INET6 if ":" in bind else socket.AF_INET})
    server = make_server(bind, port, make_app(registry), server_class, _QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True, name=f"health-{port}").start()
