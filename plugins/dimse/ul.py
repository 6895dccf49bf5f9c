"""The PS3.8 §9.2 upper-layer state machine of one association, without I/O.

The driver (:mod:`.association`) owns the socket; this module decides what a PDU means in
the association's current state. It is fed PDU headers and bodies (or raw bytes, through
:meth:`UpperLayer.feed`, which is how the unit tests drive it) and told about the PDUs the
driver sends; anything the standard does not allow in a state is a :class:`ProtocolError`
carrying the A-P-ABORT to send. States keep the standard's numbers (Sta1 ... Sta13) so the
code can be read beside the state table.
"""

from __future__ import annotations

from enum import IntEnum

from pacsfetch.plugins.dimse import pdu


class State(IntEnum):
    IDLE = 1                      # Sta1: no association, no connection
    AWAIT_RQ = 2                  # Sta2: acceptor, connection open, awaiting A-ASSOCIATE-RQ
    AWAIT_LOCAL_RESPONSE = 3      # Sta3: acceptor, awaiting our AC or RJ
    AWAIT_AC = 5                  # Sta5: requestor, RQ sent, awaiting AC or RJ
    ESTABLISHED = 6               # Sta6: data transfer
    AWAIT_RELEASE_RP = 7          # Sta7: we sent A-RELEASE-RQ
    AWAIT_LOCAL_RELEASE_RP = 8    # Sta8: the peer asked to release; we answer
    COLLISION_REQUESTOR = 9       # Sta9: release collision, we requested the association
    COLLISION_ACCEPTOR = 10       # Sta10: release collision, we accepted it
    COLLISION_REQUESTOR_RP = 11   # Sta11: collision, our RP sent, awaiting theirs
    COLLISION_ACCEPTOR_RP = 12    # Sta12: collision, their RP received, ours to send
    AWAIT_CLOSE = 13              # Sta13: awaiting the transport connection to close


class ProtocolError(Exception):
    """The peer broke PS3.8; send :attr:`abort` and close."""

    def __init__(self, message: str, reason: int = 2) -> None:
        super().__init__(message)
        self.abort = pdu.abort_pdu(pdu.ABORT_SOURCE_PROVIDER, reason)


class Event(IntEnum):
    """What a received PDU means to the driver."""

    DATA = 1                 # P-DATA-TF: hand the body to the DIMSE layer
    ASSOCIATE_RQ = 2         # acceptor: decide AC or RJ
    ACCEPTED = 3             # requestor: A-ASSOCIATE-AC
    REJECTED = 4             # requestor: A-ASSOCIATE-RJ; closed
    RELEASE_REQUESTED = 5    # the peer asks to release: answer with A-RELEASE-RP
    RELEASED = 6             # release complete: close
    COLLISION = 7            # release collision: see :meth:`UpperLayer.collision_step`
    ABORTED = 8              # A-ABORT or A-P-ABORT from the peer; closed


# PDU types allowed in each state, and the event each one becomes there.
_ALLOWED: dict[State, dict[int, Event]] = {
    State.AWAIT_RQ: {pdu.ASSOCIATE_RQ: Event.ASSOCIATE_RQ},
    State.AWAIT_AC: {pdu.ASSOCIATE_AC: Event.ACCEPTED, pdu.ASSOCIATE_RJ: Event.REJECTED},
    State.ESTABLISHED: {pdu.P_DATA_TF: Event.DATA, pdu.RELEASE_RQ: Event.RELEASE_REQUESTED},
    State.AWAIT_RELEASE_RP: {pdu.P_DATA_TF: Event.DATA, pdu.RELEASE_RP: Event.RELEASED,
                             pdu.RELEASE_RQ: Event.COLLISION},
    State.COLLISION_REQUESTOR_RP: {pdu.RELEASE_RP: Event.RELEASED},
    State.COLLISION_ACCEPTOR: {pdu.RELEASE_RP: Event.COLLISION},
}


class UpperLayer:
    """One association's state; :meth:`header`/:meth:`received` judge incoming PDUs,
    :meth:`sent` records outgoing ones."""

    def __init__(self, *, requestor: bool, max_receive: int) -> None:
        self.requestor = requestor
        self.state = State.IDLE if requestor else State.AWAIT_RQ
        self.max_receive = max_receive or pdu.RECEIVE_UNLIMITED
        """Our announced maximum PDU length: P-DATA PDUs past it are refused."""
        self._buffer = bytearray()

    # -- receiving -----------------------------------------------------------------------
    def header(self, raw: bytes) -> tuple[int, int]:
        """(PDU type, length) of a 6-byte PDU header, if acceptable here; else ProtocolError."""
        if len(raw) < 6:
            raise ProtocolError("connection closed inside a PDU header")
        pdu_type, length = pdu.HEADER.unpack(raw)
        if pdu_type not in pdu.PDU_TYPES:
            raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}", reason=1)
        if pdu_type == pdu.P_DATA_TF:
            # Our announced limit, plus slack for peers that count the header in it.
            if length > self.max_receive + 6:
                raise ProtocolError(f"P-DATA-TF of {length} bytes exceeds our maximum PDU "
                                    f"length of {self.max_receive}", reason=6)
        elif length > pdu.ASSOCIATE_LIMIT:
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} claims {length} bytes", reason=6)
        if self.state == State.AWAIT_CLOSE and pdu_type != pdu.ABORT:
            # Sta13 awaits the close; only an A-ABORT may still come (PS3.8 AA-6/AA-7).
            raise ProtocolError("PDU after the association ended (garbage on the connection)")
        return pdu_type, length

    def received(self, pdu_type: int, body: bytes | memoryview) -> Event:
        """The event a whole PDU raises, advancing the state."""
        if pdu_type == pdu.ABORT:
            self.state = State.IDLE
            return Event.ABORTED
        event = _ALLOWED.get(self.state, {}).get(pdu_type)
        if event is None:
            state, self.state = self.state, State.AWAIT_CLOSE
            raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} in state Sta{int(state)}")
        if event is Event.DATA:
            return event
        if event is Event.ASSOCIATE_RQ:
            self.state = State.AWAIT_LOCAL_RESPONSE
        elif event is Event.ACCEPTED:
            self.state = State.ESTABLISHED
        elif event is Event.REJECTED:
            self.state = State.IDLE
        elif event is Event.RELEASE_REQUESTED:
            self.state = State.AWAIT_LOCAL_RELEASE_RP
        elif event is Event.RELEASED:
            self.state = State.IDLE
        elif event is Event.COLLISION:
            if self.state == State.AWAIT_RELEASE_RP:
                self.state = (State.COLLISION_REQUESTOR if self.requestor
                              else State.COLLISION_ACCEPTOR)
            else:  # Sta10 got the requestor's A-RELEASE-RP: ours is now due
                self.state = State.COLLISION_ACCEPTOR_RP
        return event

    def collision_step(self) -> bytes | None:
        """In a release collision, the A-RELEASE-RP to send now (None: wait for the peer's).

        PS3.8: the requestor answers first (Sta9 -> Sta11), the acceptor waits for that
        answer and then answers (Sta10 -> Sta12 -> closed).
        """
        if self.state == State.COLLISION_REQUESTOR:
            self.state = State.COLLISION_REQUESTOR_RP
            return pdu.RELEASE_RP_PDU
        if self.state == State.COLLISION_ACCEPTOR_RP:
            self.state = State.AWAIT_CLOSE
            return pdu.RELEASE_RP_PDU
        return None

    # -- sending -------------------------------------------------------------------------
    def sent(self, pdu_type: int) -> None:
        """Record that the driver sent a PDU of *pdu_type*; ProtocolError when not allowed."""
        state = self.state
        if pdu_type == pdu.P_DATA_TF:
            if state not in (State.ESTABLISHED, State.AWAIT_LOCAL_RELEASE_RP):
                raise ProtocolError(f"cannot send P-DATA in state Sta{int(state)}")
        elif pdu_type == pdu.ASSOCIATE_RQ and state == State.IDLE:
            self.state = State.AWAIT_AC
        elif pdu_type == pdu.ASSOCIATE_AC and state == State.AWAIT_LOCAL_RESPONSE:
            self.state = State.ESTABLISHED
        elif pdu_type == pdu.ASSOCIATE_RJ and state == State.AWAIT_LOCAL_RESPONSE:
            self.state = State.AWAIT_CLOSE
        elif pdu_type == pdu.RELEASE_RQ and state == State.ESTABLISHED:
            self.state = State.AWAIT_RELEASE_RP
        elif pdu_type == pdu.RELEASE_RP and state == State.AWAIT_LOCAL_RELEASE_RP:
            self.state = State.AWAIT_CLOSE
        elif pdu_type == pdu.ABORT:
            self.state = State.AWAIT_CLOSE
        else:
            raise ProtocolError(f"cannot send PDU type 0x{pdu_type:02X} in state "
                                f"Sta{int(state)}")

    @property
    def established(self) -> bool:
        return self.state in (State.ESTABLISHED, State.AWAIT_LOCAL_RELEASE_RP)

    # -- byte feeding (tests, and any driver without a buffered reader) ------------------
    def feed(self, data: bytes) -> list[tuple[Event, bytes]]:
        """Take raw bytes off the wire; the events of the PDUs they complete, in order."""
        self._buffer += data
        events = []
        while len(self._buffer) >= 6:
            pdu_type, length = self.header(bytes(self._buffer[:6]))
            if len(self._buffer) < 6 + length:
                break
            body = bytes(self._buffer[6 : 6 + length])
            del self._buffer[: 6 + length]
            events.append((self.received(pdu_type, body), body))
        return events
