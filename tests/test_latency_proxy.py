"""The sandbox's latency proxy adds the round trip it promises and passes data unchanged."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pacsfetch.sandbox.latency import LatencyProxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.shutdown(socket.SHUT_RDWR)
    server.close()


def test_each_exchange_costs_the_round_trip_and_bytes_pass_unchanged(echo_port: int) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    with LatencyProxy("127.0.0.1", echo_port, rtt_ms=20) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port)) as client:
        started = time.monotonic()
        for _ in range(5):
            client.sendall(b"ping")
            assert client.recv(16) == b"ping"
        assert time.monotonic() - started >= 5 * 0.020  # never faster than the added latency
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        echoed = bytearray()
        while chunk := client.recv(1 << 20):
            echoed += chunk
        assert echoed == payload
