"""A TCP proxy that delays every byte by half a round trip each way: a WAN on loopback.

Real PACS sit across networks, and a C-GET/C-MOVE SCP that waits for each C-STORE response
before sending the next instance carries at most 1 / (round trip + service time) instances
per second on one association. To measure that here, where the kernel's netem is not
available, this proxy stands between pacsfetch (or DCMTK) and the PACS: everything read
from one side is written to the other ``rtt / 2`` seconds later, in order, with no
bandwidth limit. Each connection gets two threads per direction (a reader that stamps what
it reads, a writer that sends it when due), so a slow side never stalls the other.

It also counts connections as the PACS sees them (:attr:`LatencyProxy.opened`,
:attr:`LatencyProxy.peak`): a connection is open from its accept until either side ends
it, which is when the PACS's association ends (after its A-RELEASE-RP, or an abort).
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

from pacsfetch.sandbox.peers import LOOPBACK

CHUNK = 256 * 1024


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the proxy adds no Nagle delay


def _at_eof(sock: socket.socket) -> bool:
    """Whether the other side has closed *sock* (or it is gone), without consuming data."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class _Direction:
    """Bytes from *src* to *dst*, each chunk sent *delay* seconds after it was read."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float,
                 on_end: Callable[[], None]) -> None:
        self._src, self._dst, self._delay = src, dst, delay
        self._on_end = on_end
        self._queue: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._write, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self._src.recv(CHUNK)
            except OSError:
                data = b""
            self._queue.put((time.monotonic() + self._delay, data))
            if not data:
                self._on_end()
                return

    def _write(self) -> None:
        while True:
            due, data = self._queue.get()
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                if not data:
                    self._dst.shutdown(socket.SHUT_WR)
                    return
                self._dst.sendall(data)
            except OSError:
                return


class LatencyProxy:
    """Listens on a free loopback port and forwards to *target* with *rtt_ms* added.

    Use as a context manager; :attr:`port` is where clients connect instead of the target.
    """

    def __init__(self, target_host: str, target_port: int, rtt_ms: float) -> None:
        self.target = (target_host, target_port)
        self.rtt_ms = rtt_ms
        self._server = socket.create_server((LOOPBACK, 0))
        self.port = int(self._server.getsockname()[1])
        self._connections: list[socket.socket] = []
        self._closed = threading.Event()
        self._count_lock = threading.RLock()  # an ender runs under it in _reap_ended
        self._live: list[tuple[tuple[socket.socket, socket.socket], Callable[[], None]]] = []
        self.opened = 0
        """Connections accepted so far."""
        self.open = 0
        """Connections open now (neither side has ended them)."""
        self.peak = 0
        """Most connections open at once."""
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name="latency-proxy")

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                _tune(sock)
                self._connections.append(sock)
            delay = self.rtt_ms / 2000
            on_end = self._ender()
            with self._count_lock:
                self._reap_ended()
                self.opened += 1
                self.open += 1
                self.peak = max(self.peak, self.open)
                self._live.append(((client, upstream), on_end))
            _Direction(client, upstream, delay, on_end)
            _Direction(upstream, client, delay, on_end)

    def _reap_ended(self) -> None:
        """Count as ended every connection a side has already closed, before counting a new
        one: the end is in the kernel (EOF waiting to be read) the moment the side closes,
        while the reader thread that would notice may not run for a while on a busy
        machine; the count follows the sockets, not thread scheduling."""
        live = []
        for pair, end in self._live:
            if any(_at_eof(sock) for sock in pair):
                end()
            else:
                live.append((pair, end))
        self._live = live

    def _ender(self) -> Callable[[], None]:
        """Called by both directions of one connection; counts it closed at the first."""
        ended = False

        def end() -> None:
            nonlocal ended
            with self._count_lock:
                if not ended:
                    ended = True
                    self.open -= 1

        return end

    def __enter__(self) -> Self:
        self._acceptor.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._closed.set()
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._server.close()
        for sock in self._connections:
            try:
                sock.close()
            except OSError:
                pass
