"""``pacsfetch hl7``: an MLLP listener that turns RIS orders into prefetch requests.

Each message is answered on the same connection before the next is read, as MLLP senders
expect: ``AA`` once the request is recorded in Redis (so a RIS that got ``AA`` can forget
the message), ``AR`` for a message pacsfetch does not take (not HL7, a type it does not
handle, a sending facility outside ``[hl7] accept_from``) and ``AE`` for one it takes but
cannot act on (a missing patient ID, no rule for the modality, Redis down); MSA-3 says why,
and nothing else happens. The ``hl7`` library's asyncio MLLP server does the framing;
recording runs in a thread so one slow Redis call does not stall other connections.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime

import hl7
import redis
from hl7.mllp import start_hl7_server
from pydantic import ValidationError

from pacsfetch.config import Config, describe_validation_error
from pacsfetch.hl7_orders import Order, OrderRefused, parse_message, read_order
from pacsfetch.prefetch import CurrentExam, PrefetchRequest, PrefetchStore
from pacsfetch.prefetch_intake import NoRule, cancel_prefetch, request_prefetch
from pacsfetch.tokens import HL7_LISTENER

log = logging.getLogger(__name__)

_CONTROL_ID = re.compile(r"^MSH\|[^|]*(?:\|[^|\r]*){7}\|([^|\r]*)")
_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "~": "\\R\\", "&": "\\T\\"}


def _escaped(text: str) -> str:
    """Text safe inside one HL7 field (MSA-3), with the standard escape sequences."""
    text = " ".join(text.split())[:200]
    return "".join(_ESCAPES.get(char, char) for char in text)


def bare_ack(code: str, reason: str, raw: str) -> str:
    """An acknowledgement for a message too broken to build one from: MSA-2 carries its
    control ID when one can be found."""
    match = _CONTROL_ID.match(raw.lstrip())
    control_id = _escaped(match.group(1)) if match else ""
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    return (f"MSH|^~\\&|PACSFETCH||||{stamp}||ACK|{stamp}|P|2.5\r"
            f"MSA|{code}|{control_id}|{_escaped(reason)}")


def _ack(message: hl7.Message, code: str, text: str) -> str:
    ack = message.create_ack(code, application="PACSFETCH")
    ack.segment("MSA").assign_field(_escaped(text), 3)
    return str(ack)


def _request(order: Order) -> PrefetchRequest:
    try:
        return PrefetchRequest(
            patient_id=order.patient_id, issuer_of_patient_id=order.issuer_of_patient_id,
            current=CurrentExam(modality=order.modality or "OT",
                                study_description=(order.description or "")[:64] or None,
                                accession_number=order.accession_number,
                                scheduled_at=order.scheduled_at))
    except ValidationError as exc:
        problems = describe_validation_error(exc).replace("\n", "; ")
        raise OrderRefused("AE", f"the order's values are not usable: {problems}") from None


class Hl7Handler:
    """Turns one HL7 message into an action and its acknowledgement (no I/O but Redis)."""

    def __init__(self, config: Config, store: PrefetchStore) -> None:
        self._config = config
        self._store = store

    def handle(self, raw: str) -> str:
        """The acknowledgement to send back for *raw*."""
        try:
            message = parse_message(raw)
        except OrderRefused as refused:
            log.info("hl7 message refused", extra={"code": refused.code, "reason": refused.reason})
            return bare_ack(refused.code, refused.reason, raw)
        try:
            code, text = self._act(read_order(message, self._config.hl7))
        except OrderRefused as refused:
            code, text = refused.code, refused.reason
        except NoRule as exc:
            code, text = "AE", str(exc)
        except redis.RedisError as exc:
            code, text = "AE", f"cannot record the request now ({type(exc).__name__}); send again"
        log.info("hl7 message answered", extra={"code": code, "reason": text})
        return _ack(message, code, text)

    def _act(self, order: Order) -> tuple[str, str]:
        request = _request(order)
        if order.action == "cancel":
            record = cancel_prefetch(self._store, self._config, request, "hl7",
                                     HL7_LISTENER.name, f"cancelled by {order.message_type}")
            if record is None:
                return "AA", "no pending prefetch for that order"
            return "AA", f"prefetch {record.id} cancelled"
        record, created = request_prefetch(self._store, self._config, request, "hl7",
                                           HL7_LISTENER.name, renew=order.renews)
        if created:
            return "AA", f"prefetch {record.id} scheduled"
        if record.status.value == "cancelled":
            return "AA", f"order cancelled before (prefetch {record.id}); not scheduled again"
        return "AA", f"same order as prefetch {record.id}"


class Hl7Listener:
    """The MLLP server around :class:`Hl7Handler`."""

    def __init__(self, config: Config, store: PrefetchStore) -> None:
        self._config = config
        self._handler = Hl7Handler(config, store)

    async def _connection(self, reader: hl7.mllp.HL7StreamReader,
                          writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while not reader.at_eof():
                block = await reader.readblock()
                ack = await asyncio.to_thread(self._handler.handle,
                                              block.decode("utf-8", errors="replace"))
                writer.writeblock(ack.encode("utf-8"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, hl7.mllp.InvalidBlockError) as exc:
            log.info("hl7 connection ended", extra={"reason": type(exc).__name__})
        finally:
            writer.close()

    async def serve(self) -> None:
        server = await start_hl7_server(self._connection, self._config.hl7.bind,
                                        self._config.hl7.port)
        log.info("hl7 listening", extra={"bind": self._config.hl7.bind,
                                         "port": self._config.hl7.port})
        async with server:
            await server.serve_forever()
