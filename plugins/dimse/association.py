"""The blocking-socket driver of one association: the only module here that does I/O.

One thread owns an association from connect to close: it sends with ``sendall`` and reads
PDUs through one buffered reader (a 6-byte header, then the body in one read), so there
is no reactor thread, no queue between threads and no polling. TCP_NODELAY is set, so a
small command (a C-STORE-RSP) leaves at once. Messages are fragmented to the peer's
maximum PDU length on send; on receive any fragmentation is accepted (several PDVs per
PDU, a command split over PDUs). Every failure becomes a :class:`DimseError` subclass
saying what the peer did; the services turn those into operator-facing errors.
"""

from __future__ import annotations

import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pacsfetch.plugins.dimse import messages, pdu
from pacsfetch.plugins.dimse.ul import Event, ProtocolError, State, UpperLayer

READ_BUFFER = 256 * 1024
SOCKET_BUFFER = 4 * 1024 * 1024
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class DimseError(Exception):
    """The association failed; the text says how, in the peer's terms."""


class ConnectFailed(DimseError):
    """No TCP connection (refused, unreachable, timed out)."""


class TlsFailed(DimseError):
    """The TLS handshake failed (certificate, protocol, or a peer not speaking TLS)."""


class AssociationRejected(DimseError):
    """The peer answered A-ASSOCIATE-RJ; ``result`` 1 is permanent, 2 transient ("busy")."""

    def __init__(self, message: str, result: int | None = None) -> None:
        super().__init__(message)
        self.result = result


class PeerAborted(DimseError):
    """A-ABORT or A-P-ABORT from the peer, or the connection closed under us."""


class PeerClosed(PeerAborted):
    """The connection closed without an A-ABORT (before any answer, or mid-PDU)."""


class PeerReleased(PeerAborted):
    """The peer released the association (answered with A-RELEASE-RP) where we waited for a
    message: the normal end for an SCP between messages, a broken operation inside one."""


class PeerTimeout(DimseError):
    """The peer sent nothing within the timeout (ARTIM or DIMSE)."""


class PeerViolation(DimseError):
    """The peer broke PS3.8 or PS3.7 (hostile or broken); we aborted."""


@dataclass(frozen=True, slots=True)
class Context:
    """An accepted presentation context, and the roles we play on it."""

    id: int
    abstract_syntax: str
    transfer_syntax: str
    scu: bool = True
    scp: bool = False


class Association:
    """One open association, requested by us (:meth:`request`) or accepted (:meth:`accept`)."""

    def __init__(self, sock: socket.socket, *, requestor: bool, max_receive: int,
                 timeout: float) -> None:
        self.sock = sock
        self.ul = UpperLayer(requestor=requestor, max_receive=max_receive)
        self.reader = sock.makefile("rb", buffering=READ_BUFFER)
        self.timeout = timeout
        self.peer_max_pdu = 0
        self.contexts: dict[int, Context] = {}
        self.peer: pdu.AssociateRequest | None = None
        self.received_bytes = 0
        self.leftover: deque[tuple[int, int, memoryview]] = deque()
        """PDVs read off the wire but not yet handed out (a PDU may carry several)."""
        self.on_close: Callable[[Association], None] | None = None
        """Called once when the connection closes (the services' metrics)."""
        sock.settimeout(timeout)

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def request(cls, host: str, port: int, rq: pdu.AssociateRequest, *, timeout: float,
                tls: ssl.SSLContext | None = None, server_hostname: str | None = None
                ) -> Association:
        """Connect, negotiate, and return the established association."""
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from None
        _tune(sock)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)
            except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
                sock.close()
                raise TlsFailed(f"TLS handshake with {host}:{port} failed: {exc}") from None
        assoc = cls(sock, requestor=True, max_receive=rq.max_pdu, timeout=timeout)
        try:
            assoc.send(pdu.encode_associate(pdu.ASSOCIATE_RQ, rq), pdu.ASSOCIATE_RQ)
            event, body = assoc.read_pdu()
        except PeerClosed:
            raise PeerClosed("the peer closed the connection without answering the "
                             "association request") from None
        if event is Event.REJECTED:
            assoc.close()
            raise AssociationRejected(pdu.describe_reject(body),
                                      bytes(body[1:2])[0] if len(body) > 1 else None)
        if event is Event.ABORTED:
            assoc.close()
            raise PeerAborted(pdu.describe_abort(body) + " during negotiation")
        try:
            ac = pdu.decode_associate(pdu.ASSOCIATE_AC, body)
        except pdu.PduError as exc:
            assoc.abort(provider_reason=6)
            raise PeerViolation(f"malformed A-ASSOCIATE-AC: {exc}") from None
        assoc.peer = ac
        assoc.peer_max_pdu = ac.max_pdu
        proposed = {cx.id: cx for cx in rq.contexts}
        for cx in ac.contexts:
            asked = proposed.get(cx.id)
            if cx.result != 0 or asked is None or not cx.transfer_syntaxes:
                continue
            scu, scp = True, False
            if asked.abstract_syntax in rq.roles:
                want_scu, want_scp = rq.roles[asked.abstract_syntax]
                got_scu, got_scp = ac.roles.get(asked.abstract_syntax, (True, False))
                scu, scp = want_scu and got_scu, want_scp and got_scp
            assoc.contexts[cx.id] = Context(cx.id, asked.abstract_syntax,
                                            cx.transfer_syntaxes[0], scu, scp)
        return assoc

    @classmethod
    def accept(cls, sock: socket.socket, decide: Callable[[pdu.AssociateRequest],
                                                          pdu.AssociateRequest | bytes],
               *, max_receive: int, timeout: float, artim: float | None = None
               ) -> Association | None:
        """Read an A-ASSOCIATE-RQ from an accepted connection and answer it: *decide*
        returns the A-ASSOCIATE-AC content, or the A-ASSOCIATE-RJ PDU bytes. None when the
        association was not established (rejected, aborted, or not DICOM).

        *artim* (default *timeout*) bounds the wait for the request (PS3.8's ARTIM timer):
        a peer that connects and says nothing is dropped then.
        """
        _tune(sock)
        assoc = cls(sock, requestor=False, max_receive=max_receive, timeout=timeout)
        if artim is not None:
            sock.settimeout(artim)
        try:
            event, body = assoc.read_pdu()
            sock.settimeout(timeout)
            if event is not Event.ASSOCIATE_RQ:
                assoc.close()
                return None
            rq = pdu.decode_associate(pdu.ASSOCIATE_RQ, body)
        except pdu.PduError:
            assoc.abort(provider_reason=6)
            return None
        except DimseError:
            assoc.close()
            return None
        assoc.peer = rq
        assoc.peer_max_pdu = rq.max_pdu
        answer = decide(rq)
        if isinstance(answer, bytes):
            try:
                assoc.send(answer, pdu.ASSOCIATE_RJ)
            except DimseError:
                pass
            assoc.close()
            return None
        for cx in answer.contexts:
            if cx.result == 0 and cx.transfer_syntaxes:
                # answer.roles are the requestor's roles as accepted; ours are the converse.
                their_scu, their_scp = answer.roles.get(cx.abstract_syntax, (True, False))
                assoc.contexts[cx.id] = Context(cx.id, cx.abstract_syntax,
                                                cx.transfer_syntaxes[0], scu=their_scp,
                                                scp=their_scu)
        assoc.send(pdu.encode_associate(pdu.ASSOCIATE_AC, answer), pdu.ASSOCIATE_AC)
        return assoc

    # -- PDUs ----------------------------------------------------------------------------
    def send(self, data: bytes, pdu_type: int) -> None:
        """Send whole PDU bytes of *pdu_type* (several P-DATA PDUs may go at once)."""
        try:
            self.ul.sent(pdu_type)
            self.sock.sendall(data)
        except ProtocolError as exc:
            raise PeerViolation(str(exc)) from None
        except TimeoutError:
            self.close()
            raise PeerTimeout(f"the peer took no data for {self.timeout:g} s") from None
        except OSError as exc:
            self.close()
            raise PeerClosed(f"the connection broke while sending: {exc}") from None

    def read_pdu(self) -> tuple[Event, bytes]:
        """The next PDU's event and body; raises on timeout, closure or a protocol breach."""
        try:
            header = self.reader.read(6)
            if not header:
                self.close()
                raise PeerClosed("the peer closed the connection")
            pdu_type, length = self.ul.header(header)
            body = self.reader.read(length) if length else b""
            if len(body) < length:
                self.close()
                raise PeerClosed("the peer closed the connection in the middle of a PDU")
            self.received_bytes += length + 6
            return self.ul.received(pdu_type, body), body
        except ProtocolError as exc:
            self._send_quietly(exc.abort)
            self.close()
            raise PeerViolation(str(exc)) from None
        except TimeoutError:
            self.abort()
            raise PeerTimeout(f"the peer sent nothing for {self.timeout:g} s") from None
        except (ssl.SSLError, OSError) as exc:
            self.close()
            raise PeerClosed(f"the connection broke: {exc}") from None

    def data_pdu(self) -> bytes:
        """The body of the next P-DATA-TF; any other PDU ends the association here."""
        event, body = self.read_pdu()
        if event is Event.DATA:
            return body
        if event is Event.ABORTED:
            self.close()
            raise PeerAborted(pdu.describe_abort(body))
        if event is Event.RELEASE_REQUESTED:
            self.answer_release()
            raise PeerReleased("the peer released the association in the middle of an "
                               "operation")
        self.abort(provider_reason=2)
        raise PeerViolation(f"unexpected {event.name} while waiting for data")

    def next_pdv(self) -> tuple[int, int, memoryview]:
        """(context ID, flags, fragment) of the next incoming PDV, reading PDUs as needed."""
        leftover = self.leftover
        while not leftover:
            body = self.data_pdu()
            try:
                leftover.extend(pdu.split_pdvs(body))
            except pdu.PduError as exc:
                self.abort(provider_reason=6)
                raise PeerViolation(str(exc)) from None
        return leftover.popleft()

    def quick_ack(self) -> None:
        """Acknowledge at once: a Nagle-on sender holds its next small segment (the data set
        after a command) until it sees our ACK, which Linux would delay by up to 40 ms."""
        if _QUICKACK is not None and self.sock.fileno() != -1:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass

    # -- messages ------------------------------------------------------------------------
    def send_message(self, pcid: int, command: bytes, data: bytes | None = None) -> None:
        """A command (and its data set) fragmented to the peer's maximum PDU length."""
        limit = self.peer_max_pdu
        pdus = list(pdu.fragments(pcid, True, command, limit))
        if data is not None:
            pdus += pdu.fragments(pcid, False, data, limit)
        self.send(b"".join(pdus), pdu.P_DATA_TF)

    def read_command(self) -> tuple[int, dict[int, Any]]:
        """(context ID, command) of the next message; its data set, if any, follows."""
        command = bytearray()
        while True:
            pcid, flags, fragment = self.next_pdv()
            if not flags & 1:
                self.abort(provider_reason=2)
                raise PeerViolation("a data set fragment arrived where a command was due")
            command += fragment
            if flags & 2:
                break
        self.quick_ack()
        try:
            return pcid, messages.decode_command(command)
        except messages.CommandError as exc:
            self.abort(provider_reason=6)
            raise PeerViolation(str(exc)) from None

    def read_data_set(self, pcid: int, write: Callable[[memoryview], Any]) -> None:
        """Hand each fragment of the data set that follows a command to *write*."""
        while True:
            got, flags, fragment = self.next_pdv()
            if flags & 1 or got != pcid:
                self.abort(provider_reason=2)
                raise PeerViolation("a data set was interrupted by another message")
            write(fragment)
            if flags & 2:
                return

    def receive_message(self) -> tuple[int, dict[int, Any], bytes | None]:
        """(context ID, command, data set bytes or None) of the next whole message."""
        pcid, command = self.read_command()
        if not messages.has_data_set(command):
            return pcid, command, None
        data = bytearray()
        self.read_data_set(pcid, data.extend)
        return pcid, command, bytes(data)

    # -- ending --------------------------------------------------------------------------
    def release(self) -> None:
        """A-RELEASE, collision included; closes the connection whatever the peer does."""
        if not self.ul.established:
            self.close()
            return
        try:
            self.send(pdu.RELEASE_RQ_PDU, pdu.RELEASE_RQ)
            while self.ul.state not in (State.IDLE, State.AWAIT_CLOSE):
                event, _ = self.read_pdu()
                if event is Event.COLLISION:
                    answer = self.ul.collision_step()
                    if answer is not None:
                        self.sock.sendall(answer)
                elif event in (Event.RELEASED, Event.ABORTED):
                    break
        except (DimseError, OSError):
            pass
        finally:
            self.close()

    def answer_release(self) -> None:
        """The peer asked to release: A-RELEASE-RP, then close."""
        self._send_quietly(pdu.RELEASE_RP_PDU, pdu.RELEASE_RP)
        self.close()

    def abort(self, provider_reason: int | None = None) -> None:
        """A-ABORT (ours as the service user, or a provider's with *provider_reason*)."""
        if provider_reason is None:
            self._send_quietly(pdu.abort_pdu())
        else:
            self._send_quietly(pdu.abort_pdu(pdu.ABORT_SOURCE_PROVIDER, provider_reason))
        self.close()

    def _send_quietly(self, data: bytes, pdu_type: int = pdu.ABORT) -> None:
        try:
            self.ul.sent(pdu_type)
            self.sock.settimeout(1.0)
            self.sock.sendall(data)
        except (ProtocolError, OSError):
            pass

    def close(self) -> None:
        if self.ul.state != State.AWAIT_CLOSE:
            self.ul.state = State.IDLE
        try:
            self.reader.close()
            self.sock.close()
        except OSError:
            pass
        hook, self.on_close = self.on_close, None
        if hook is not None:
            hook(self)

    @property
    def is_established(self) -> bool:
        return self.ul.established and self.sock.fileno() != -1

    def context(self, abstract_syntax: str) -> Context | None:
        """The first accepted context for *abstract_syntax*."""
        for cx in self.contexts.values():
            if cx.abstract_syntax == abstract_syntax:
                return cx
        return None


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass
