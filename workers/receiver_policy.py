"""Whom the move receiver trusts: pure decisions, kept apart from the DIMSE server.

The receiver listens where any host of the network can reach it, and whatever it accepts
is stored as part of a patient's study. So each association and each instance passes:

- **admission** (:meth:`ReceiverPolicy.admit`): the peer's address must be one a source
  names (``[sources.X] move_from``, default the addresses the source's ``host`` resolves
  to), and neither the receiver (``[receiver] max_associations``) nor that address
  (``max_associations_per_address``) may be full: a peer that opens many idle associations
  cannot crowd out the PACS. Refused at once, before a byte of DICOM is read;
- **idleness** (:meth:`ReceiverPolicy.idle`): an association that received no data-set
  bytes for ``[receiver] idle_timeout`` seconds is aborted (C-ECHO keep-alives do not count);
- **the sender** (:meth:`ReceiverPolicy.sender_refusal`): an instance for a job must come
  from that job's source: an address in its ``move_from`` and the source's AE title as
  calling AE title;
- **the plan** (:class:`pacsfetch.moves.Plan`): only instances the job's C-FIND planned (or any instance of
  a series the PACS listed only in part, which is moved whole) are accepted;
- **one copy** (:func:`content_digest`): a second copy of an instance with different
  content is refused and reported, never swapped for the first.

Addresses and AE titles can be spoofed on a network that does not prevent it; receiver TLS
with client certificates (``[receiver.tls] ca_file``) is the stronger check.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path

from pacsfetch.config import Config
from pacsfetch.metrics import RECEIVER_REFUSALS

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RESOLVE_AGAIN_SECONDS = 300.0
"""How long a source host's resolved addresses are trusted before they are looked up again
(a PACS moved to a new address is accepted within this time, without a restart)."""


class Refusal(StrEnum):
    """Why the receiver refused an association or an instance: the metric's bounded label."""

    UNKNOWN_ADDRESS = "unknown-address"
    """An association from an address no source names."""
    BUSY = "busy"
    """The receiver, or the peer's address, holds as many associations as allowed."""
    IDLE = "idle"
    """An association that received no data for ``idle_timeout`` seconds was aborted."""
    WRONG_PEER = "wrong-peer"
    """An instance for a job from an address or calling AE title other than its source's."""
    NOT_PLANNED = "not-planned"
    """An instance the job's plan (its C-FIND inventory) does not list."""
    CONFLICTING_COPY = "conflicting-copy"
    """A second copy of an instance already received, with different content."""
    TLS = "tls"
    """A connection whose TLS handshake failed (no or an untrusted client certificate,
    a peer not speaking TLS, a silent peer)."""


def count_refusal(reason: Refusal, **context: object) -> None:
    """Count and log a refusal; *context* holds job ids, addresses, AE titles, never UIDs."""
    RECEIVER_REFUSALS.labels(reason.value).inc()
    log.warning("receiver refused", extra={"reason": reason.value, **context})


def resolve_host(host: str) -> list[str]:
    """Every address *host* resolves to (an IP address resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.error("cannot resolve a source's host; its deliveries are refused until it "
                  "resolves (or set move_from)", extra={"host": host, "reason": str(exc)})
        return []
    return sorted({str(info[4][0]) for info in infos})


def _networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class ReceiverPolicy:
    """The receiver's trust decisions for one configuration (thread-safe)."""

    def __init__(self, config: Config,
                 resolve: Callable[[str], list[str]] = resolve_host) -> None:
        self._sources = config.sources
        self._settings = config.receiver
        self._resolve = resolve
        self._lock = threading.Lock()
        self._resolved: dict[str, tuple[float, tuple[IPNetwork, ...]]] = {}

    def networks(self, source_name: str) -> tuple[IPNetwork, ...]:
        """Where *source_name* delivers from: its ``move_from``, else its host's addresses."""
        source = self._sources[source_name]
        if source.move_from is not None:
            return _networks(source.move_from)
        now = time.monotonic()
        with self._lock:
            cached = self._resolved.get(source_name)
            if cached is not None and now - cached[0] < RESOLVE_AGAIN_SECONDS:
                return cached[1]
        found = _networks(self._resolve(source.host))
        with self._lock:
            self._resolved[source_name] = (now, found)
        return found

    def _from(self, source_name: str, address: str) -> bool:
        peer = _address(address)
        return peer is not None and any(peer in net for net in self.networks(source_name))

    def admit(self, address: str, open_from_address: int, open_total: int) -> Refusal | None:
        """May a new connection from *address* be served, with so many already open?"""
        if not any(self._from(name, address) for name in self._sources):
            return Refusal.UNKNOWN_ADDRESS
        if (open_total >= self._settings.max_associations
                or open_from_address >= self._settings.max_associations_per_address):
            return Refusal.BUSY
        return None

    def sender_refusal(self, source_name: str, address: str, calling_ae: str) -> Refusal | None:
        """Is the peer that delivers an instance for a job of *source_name* that source?"""
        source = self._sources.get(source_name)
        if source is None or calling_ae.strip() != source.ae_title:
            return Refusal.WRONG_PEER
        return None if self._from(source_name, address) else Refusal.WRONG_PEER

    def idle(self, last_data: float, now: float) -> bool:
        """Has an association that last received data-set bytes at *last_data* idled too long?"""
        return now - last_data > self._settings.idle_timeout


_META_LENGTH = struct.Struct("<I")


def content_digest(path: Path) -> str:
    """SHA-256 of a Part-10 file's data set, without its file meta information.

    The meta group is written by whoever received the file (it may name the sender), so two
    deliveries of the same data set compare equal only on what follows it.
    """
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        head = fh.read(144)
        start = 0
        # Preamble, "DICM", then (0002,0000) UL group length in explicit VR little endian.
        if len(head) == 144 and head[128:132] == b"DICM" and head[132:138] == b"\x02\x00\x00\x00UL":
            start = 144 + _META_LENGTH.unpack(head[140:144])[0]
        fh.seek(start)
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
