"""Make pynetdicom's DUL thread react to the network at once instead of polling it.

pynetdicom's DUL reactor polls: each idle round it sleeps ``_run_loop_delay`` (1 ms) and
then asks ``select`` with a zero timeout whether the socket has data. For a C-GET this
pacing dominates: every C-STORE sub-operation waits for the poll twice (the request coming
in, our response going out), so a retrieve of small instances runs at a few hundred per
second whatever else we make faster. And each PDU is read 4 KiB per ``recv`` call.

:func:`pace` changes one established association so that its DUL thread *blocks* in
``select`` on the socket and on a wake-up pipe written whenever a primitive is queued for
sending; it wakes the moment the PACS sends or we answer, and otherwise every
:data:`IDLE_WAIT` seconds to run its timers. PDUs are read with ``recv_into`` into one
buffer of their full length. TCP_NODELAY is set so our small C-STORE responses go out at
once, and the receive buffer is enlarged so the PACS can keep streaming while we store.

Many PACS leave Nagle's algorithm on (DCMTK does unless ``TCP_NODELAY=1`` is in its
environment): such a sender holds the second small segment of a C-STORE request until the
first is acknowledged, and Linux delays that ACK by up to 40 ms. So after every read we
re-arm ``TCP_QUICKACK`` (the kernel drops it again by itself), which acknowledges at once.

This reaches into pynetdicom internals (checked against 3.x, pinned in pyproject): the
socket object's class is swapped for a subclass overriding ``ready`` and ``recv``, and
the provider queue's ``put`` is wrapped. Nothing else of the state machine changes.
"""

from __future__ import annotations

import select
import socket
import weakref
from typing import Any

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

IDLE_WAIT = 0.01
"""Longest the DUL thread blocks without news: its ARTIM/idle timers and stop flag run then."""

RECEIVE_BUFFER = 4 * 1024 * 1024
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class _PromptSocket(AssociationSocket):
    """An :class:`AssociationSocket` whose ``ready`` blocks until there is something to do."""

    _wake_reader: socket.socket

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        try:
            readable, _, _ = select.select([sock, self._wake_reader], [], [], IDLE_WAIT)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed, as pynetdicom does
            return False
        if self._wake_reader in readable:
            try:
                self._wake_reader.recv(4096)
            except OSError:
                pass
        return sock in readable

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly *nr_bytes* (fewer only if the peer closed), in as few calls as the
        kernel allows."""
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        while read < nr_bytes:
            count = sock.recv_into(view[read:], nr_bytes - read)
            _quick_ack(sock)
            if not count:
                del view
                return buffer[:read]
            read += count
        return buffer


def _quick_ack(sock: socket.socket) -> None:
    if _QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass


def _wrap_put(queue: Any, wake: socket.socket) -> None:
    original = queue.put

    def put(item: Any, block: bool = True, timeout: float | None = None) -> None:
        original(item, block, timeout)
        try:
            wake.send(b"\0")
        except (BlockingIOError, OSError):  # full (a wake-up is pending anyway) or closed
            pass

    queue.put = put


def pace(assoc: Association) -> None:
    """Switch an established association's DUL thread from polling to blocking waits."""
    dul = assoc.dul
    sock = dul.socket
    if sock is None or sock.socket is None or type(sock) is not AssociationSocket:
        return
    raw = sock.socket
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    _quick_ack(raw)
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    sock._wake_reader = reader  # type: ignore[attr-defined]
    _wrap_put(dul.to_provider_queue, writer)
    sock.__class__ = _PromptSocket
    dul._run_loop_delay = 0
    weakref.finalize(assoc, _close, reader, writer)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        sock.close()
