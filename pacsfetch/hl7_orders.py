"""HL7 v2 orders and appointments as prefetch triggers: the ``[hl7]`` keys and the mapping.

A RIS says "this patient has a CT on Tuesday" with an ORM^O01 (a new order, ORC-1 = NW) or
an SIU^S12 (a new appointment), and withdraws it with ORC-1 = CA (or SIU^S15). Where a
site's RIS puts the patient ID, modality or time differs, so each value is read from a list
of field locations (``SEG-FIELD[.COMPONENT]``, the first non-empty wins) that the
configuration may change; the defaults are the common ones.

Parsing is the ``hl7`` library's; this module only decides what a message asks for, and
refuses with the HL7 acknowledgement code and a reason an interface engineer can act on:
``AR`` (rejected: not a message we take, or a sender we do not accept) or ``AE`` (an error
in its content: a missing patient ID, an unreadable time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo

import hl7
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pacsfetch.windows import check_timezone

_REF = re.compile(r"^([A-Z][A-Z0-9]{2})-(\d{1,3})(?:\.(\d{1,2}))?$")
NEW_ORDER_CONTROLS = frozenset({"NW", "XO", "SC"})
CANCEL_ORDER_CONTROLS = frozenset({"CA", "OC", "DC"})


def _field_ref(value: str) -> str:
    if not _REF.match(value):
        raise ValueError(f"{value!r} is not a field location such as PID-3.1 or OBR-24")
    return value


FieldRef = Annotated[str, AfterValidator(_field_ref)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hl7Fields(_Section):
    """``[hl7.fields]``: where each value is read from, tried in order."""

    patient_id: list[FieldRef] = Field(default_factory=lambda: ["PID-3.1"], min_length=1)
    issuer_of_patient_id: list[FieldRef] = Field(default_factory=lambda: ["PID-3.4"])
    modality: list[FieldRef] = Field(default_factory=lambda: ["OBR-24"], min_length=1)
    description: list[FieldRef] = Field(default_factory=lambda: ["OBR-4.2", "AIS-3.2"])
    scheduled_at: list[FieldRef] = Field(default_factory=lambda: ["OBR-36", "SCH-11.4"])
    accession_number: list[FieldRef] = Field(default_factory=lambda: ["OBR-18", "ORC-2"])


class Hl7Config(_Section):
    """``[hl7]``: the MLLP listener of ``pacsfetch hl7``."""

    bind: str = Field("0.0.0.0", min_length=1)
    port: int = Field(2575, ge=1, le=65535)
    accept_from: list[str] = Field(
        default_factory=list, description="Sending facilities (MSH-4) accepted; empty: any.")
    timezone: Annotated[str, AfterValidator(check_timezone)] = Field(
        "UTC", description="Zone of HL7 times that carry no offset.")
    fields: Hl7Fields = Hl7Fields()


class OrderRefused(Exception):
    """The message cannot be acted on; ``code`` is the HL7 acknowledgement code."""

    def __init__(self, code: Literal["AE", "AR"], reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Order:
    """What a message asks: a prefetch for a coming exam, or to cancel one."""

    action: Literal["new", "cancel"]
    message_type: str
    renews: bool
    """An explicit new order (ORC-1 = NW, SIU^S12): it schedules a cancelled order again,
    where a change (XO) or status (SC) message for it does not."""
    patient_id: str
    issuer_of_patient_id: str | None
    modality: str | None
    description: str | None
    scheduled_at: datetime | None
    accession_number: str | None


def _value(message: hl7.Message, ref: str) -> str | None:
    match = _REF.match(ref)
    assert match is not None  # validated by the config
    segment, field, component = match.group(1), match.group(2), match.group(3) or "1"
    try:
        value = str(message[f"{segment}.F{field}.R1.C{component}"]).strip()
    except (KeyError, IndexError, ValueError):
        return None
    return value or None


def _first(message: hl7.Message, refs: list[str]) -> tuple[str | None, str]:
    for ref in refs:
        if (value := _value(message, ref)) is not None:
            return value, ref
    return None, " or ".join(refs)


def _kind(message: hl7.Message) -> tuple[str, str]:
    return (_value(message, "MSH-9.1") or "", _value(message, "MSH-9.2") or "")


def _action(message: hl7.Message) -> str:
    kind, event = _kind(message)
    if (kind, event) == ("ORM", "O01"):
        control = (_value(message, "ORC-1") or "").upper()
        if control in NEW_ORDER_CONTROLS:
            return "new"
        if control in CANCEL_ORDER_CONTROLS:
            return "cancel"
        raise OrderRefused("AR", f"ORC-1 order control {control or '(empty)'!r} is not one "
                                 f"pacsfetch acts on (new: {', '.join(sorted(NEW_ORDER_CONTROLS))}; "
                                 f"cancel: {', '.join(sorted(CANCEL_ORDER_CONTROLS))})")
    if (kind, event) == ("SIU", "S12"):
        return "new"
    if (kind, event) == ("SIU", "S15"):
        return "cancel"
    raise OrderRefused("AR", f"message type {kind or '?'}^{event or '?'} is not taken here "
                             "(ORM^O01, SIU^S12, SIU^S15)")


def _time(text: str, ref: str, zone: str) -> datetime:
    try:
        when = hl7.parse_datetime(text)
    except ValueError:
        raise OrderRefused("AE", f"{ref} {text!r} is not an HL7 date/time") from None
    if when is None:
        raise OrderRefused("AE", f"{ref} {text!r} is not an HL7 date/time")
    if when.tzinfo is None:
        when = when.replace(tzinfo=ZoneInfo(zone))
    return when.astimezone(UTC)


def read_order(message: hl7.Message, config: Hl7Config) -> Order:
    """The order a parsed message carries, or :class:`OrderRefused` saying why not."""
    facility = _value(message, "MSH-4") or ""
    if config.accept_from and facility not in config.accept_from:
        raise OrderRefused("AR", f"sending facility (MSH-4) {facility or '(empty)'!r} is not in "
                                 "hl7.accept_from")
    action = _action(message)
    fields = config.fields
    patient_id, where = _first(message, fields.patient_id)
    if patient_id is None:
        raise OrderRefused("AE", f"no patient ID in {where}")
    modality, where_modality = _first(message, fields.modality)
    if action == "new" and modality is None:
        raise OrderRefused("AE", f"no modality in {where_modality}")
    scheduled_text, where_time = _first(message, fields.scheduled_at)
    scheduled_at = (_time(scheduled_text, where_time, config.timezone)
                    if scheduled_text is not None else None)
    accession, where_accession = _first(message, fields.accession_number)
    if action == "cancel" and accession is None:
        raise OrderRefused("AE", f"a cancel needs the order's accession number ({where_accession})")
    kind, event = _kind(message)
    renews = action == "new" and (kind == "SIU" or (_value(message, "ORC-1") or "").upper() == "NW")
    return Order(
        action="new" if action == "new" else "cancel", message_type=f"{kind}^{event}",
        renews=renews,
        patient_id=patient_id,
        issuer_of_patient_id=_first(message, fields.issuer_of_patient_id)[0],
        modality=modality.upper() if modality else None,
        description=_first(message, fields.description)[0],
        scheduled_at=scheduled_at, accession_number=accession,
    )


def parse_message(text: str) -> hl7.Message:
    """Parse one HL7 v2 message, or :class:`OrderRefused` (``AR``) when it is not one."""
    text = text.strip().replace("\r\n", "\r").replace("\n", "\r")
    if not text.startswith("MSH"):
        raise OrderRefused("AR", "not an HL7 v2 message: it does not start with an MSH segment")
    try:
        message = hl7.parse(text)
        message.segment("MSH")
    except (hl7.ParseException, KeyError, IndexError, ValueError) as exc:
        raise OrderRefused("AR", f"not a parseable HL7 v2 message: {exc}") from None
    if not _value(message, "MSH-10"):
        raise OrderRefused("AR", "MSH-10 (message control ID) is empty")
    return message
