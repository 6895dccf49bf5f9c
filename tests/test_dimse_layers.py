"""The DIMSE engine's codecs and upper-layer state machine, fed bytes: no sockets.

pynetdicom's own PDU classes read what our encoder writes (and we read theirs), so the
A-ASSOCIATE codec is checked against a second implementation, not against itself.
"""

from __future__ import annotations

import struct

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC as TheirAC
from pynetdicom.pdu import A_ASSOCIATE_RQ as TheirRQ

from pacsfetch.plugins.dimse import messages as m
from pacsfetch.plugins.dimse import pdu
from pacsfetch.plugins.dimse.ul import Event, ProtocolError, State, UpperLayer

CT = "1.2.840.10008.5.1.4.1.1.2"
GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
# A SOP Class Extended Negotiation sub-item (0x56): relational queries for the GET model.
EXTENDED = bytes([0x56, 0]) + struct.pack(">H", 2 + len(GET_MODEL) + 1) + struct.pack(
    ">H", len(GET_MODEL)) + GET_MODEL.encode() + b"\x01"


def request() -> pdu.AssociateRequest:
    return pdu.AssociateRequest(
        called_ae="ORTHANC", calling_ae="PACSFETCH",
        contexts=[pdu.ProposedContext(1, GET_MODEL, [IMPLICIT, EXPLICIT]),
                  pdu.ProposedContext(3, CT, [EXPLICIT])],
        max_pdu=16384, roles={CT: (False, True)}, extra_user_items=[EXTENDED])


def established(requestor: bool = True) -> UpperLayer:
    ul = UpperLayer(requestor=requestor, max_receive=16384)
    if requestor:
        ul.sent(pdu.ASSOCIATE_RQ)
        ac = pdu.encode_associate(pdu.ASSOCIATE_AC, request())
        assert [e for e, _ in ul.feed(ac)] == [Event.ACCEPTED]
    else:
        rq = pdu.encode_associate(pdu.ASSOCIATE_RQ, request())
        assert [e for e, _ in ul.feed(rq)] == [Event.ASSOCIATE_RQ]
        ul.sent(pdu.ASSOCIATE_AC)
    assert ul.state is State.ESTABLISHED
    return ul


# ---- A-ASSOCIATE -------------------------------------------------------------------------

def test_associate_rq_round_trips_and_pynetdicom_reads_it() -> None:
    raw = pdu.encode_associate(pdu.ASSOCIATE_RQ, request())
    back = pdu.decode_associate(pdu.ASSOCIATE_RQ, raw[6:])
    assert (back.called_ae, back.calling_ae, back.max_pdu) == ("ORTHANC", "PACSFETCH", 16384)
    assert [(c.id, c.abstract_syntax, c.transfer_syntaxes) for c in back.contexts] == [
        (1, GET_MODEL, [IMPLICIT, EXPLICIT]), (3, CT, [EXPLICIT])]
    assert back.roles == {CT: (False, True)}
    assert back.extra_user_items == [EXTENDED]  # passed through whole
    assert back.implementation_class_uid == pdu.IMPLEMENTATION_CLASS_UID
    assert back.implementation_version == pdu.IMPLEMENTATION_VERSION

    theirs = TheirRQ()
    theirs.decode(raw)
    primitive = theirs.to_primitive()
    assert primitive.called_ae_title == "ORTHANC" and primitive.calling_ae_title == "PACSFETCH"
    assert primitive.maximum_length_received == 16384
    contexts = {cx.context_id: cx for cx in primitive.presentation_context_definition_list}
    assert contexts[3].abstract_syntax == CT and contexts[3].transfer_syntax == [EXPLICIT]
    roles = [i for i in primitive.user_information if type(i).__name__ ==
             "SCP_SCU_RoleSelectionNegotiation"]
    assert [(r.sop_class_uid, r.scu_role, r.scp_role) for r in roles] == [(CT, False, True)]
    extended = [i for i in primitive.user_information if type(i).__name__ ==
                "SOPClassExtendedNegotiation"]
    assert extended and extended[0].sop_class_uid == GET_MODEL
    # ... and our decoder reads pynetdicom's encoding of the same request.
    again = pdu.decode_associate(pdu.ASSOCIATE_RQ, theirs.encode()[6:])
    assert again.roles == {CT: (False, True)} and again.max_pdu == 16384
    assert [c.transfer_syntaxes for c in again.contexts] == [[IMPLICIT, EXPLICIT], [EXPLICIT]]


def test_associate_ac_round_trips_with_results_and_roles() -> None:
    ac = request()
    ac.contexts = [pdu.ProposedContext(1, GET_MODEL, [EXPLICIT], result=0),
                   pdu.ProposedContext(3, CT, [], result=4)]
    ac.max_pdu = 4096
    raw = pdu.encode_associate(pdu.ASSOCIATE_AC, ac)
    back = pdu.decode_associate(pdu.ASSOCIATE_AC, raw[6:])
    assert [(c.id, c.result, c.transfer_syntaxes) for c in back.contexts] == [
        (1, 0, [EXPLICIT]), (3, 4, [])]
    assert back.max_pdu == 4096 and back.roles == {CT: (False, True)}
    theirs = TheirAC()
    theirs.decode(raw)
    results = {cx.context_id: cx.result for cx in
               theirs.to_primitive().presentation_context_definition_results_list}
    assert results == {1: 0, 3: 4}


def test_rejection_and_abort_are_described() -> None:
    rj = pdu.reject_pdu(1, 1, 3)
    ul = UpperLayer(requestor=True, max_receive=0)
    ul.sent(pdu.ASSOCIATE_RQ)
    [(event, body)] = ul.feed(rj)
    assert event is Event.REJECTED and ul.state is State.IDLE
    assert pdu.describe_reject(body) == ("rejected permanently by the service user: calling "
                                         "AE title not recognised")

    ul = established()
    [(event, body)] = ul.feed(pdu.abort_pdu())
    assert event is Event.ABORTED and pdu.describe_abort(body) == "A-ABORT by the peer"
    ul = established(requestor=False)
    [(event, body)] = ul.feed(pdu.abort_pdu(pdu.ABORT_SOURCE_PROVIDER, 2))
    assert event is Event.ABORTED
    assert pdu.describe_abort(body) == "A-P-ABORT by the peer's provider (unexpected PDU)"


# ---- P-DATA ------------------------------------------------------------------------------

def test_several_pdvs_in_one_pdu_and_bytes_arriving_one_at_a_time() -> None:
    command = m.c_store_rq(7, CT, "1.2.3.4")
    data = bytes(range(256)) * 4
    body = (pdu.PDV_HEADER.pack(len(command) + 2, 3, 3) + command
            + pdu.PDV_HEADER.pack(len(data) + 2, 3, 2) + data)
    raw = pdu.HEADER.pack(pdu.P_DATA_TF, len(body)) + body
    ul = established()
    events = []
    for i in range(len(raw)):  # the worst a socket can do
        events += ul.feed(raw[i : i + 1])
    [(event, got)] = events
    assert event is Event.DATA
    pdvs = [(cx, flags, bytes(fragment)) for cx, flags, fragment in pdu.split_pdvs(got)]
    assert pdvs == [(3, 3, command), (3, 2, data)]
    assert m.decode_command(pdvs[0][2])[m.AFFECTED_SOP_INSTANCE] == "1.2.3.4"


def test_a_command_split_across_pdus_reassembles() -> None:
    command = m.c_get_rq(5, GET_MODEL)
    pdus = list(pdu.fragments(1, True, command, max_pdu=6 + 16))
    assert len(pdus) > 3
    assert all(len(p) - 6 <= 6 + 16 for p in pdus)  # within the peer's maximum
    ul = established()
    fragments, flags_seen = bytearray(), []
    for event, body in ul.feed(b"".join(pdus)):
        assert event is Event.DATA
        for cx, flags, fragment in pdu.split_pdvs(body):
            assert cx == 1
            flags_seen.append(flags)
            fragments += fragment
    assert flags_seen == [1] * (len(pdus) - 1) + [3]  # command bit on all, last bit at the end
    decoded = m.decode_command(fragments)
    assert decoded[m.COMMAND_FIELD] == m.C_GET_RQ and decoded[m.MESSAGE_ID] == 5


def test_the_store_response_template_matches_the_generic_encoder() -> None:
    sop_class, sop_instance = CT.encode() + b"\0", b"1.2.3.4.5.6\0"  # as the request had them
    assert m.store_rsp(9, 0x0000, sop_class, sop_instance) == m.response(
        m.C_STORE_RSP, 9, 0x0000, sop_class=CT, sop_instance="1.2.3.4.5.6")


# ---- release -----------------------------------------------------------------------------

@pytest.mark.parametrize("syntax", [m.IMPLICIT_LE, m.EXPLICIT_LE])
def test_flat_identifier_decoding_agrees_with_pydicom_or_defers_to_it(syntax: str) -> None:
    from pydicom.dataset import Dataset

    keys = {0x00080018: "SOPInstanceUID", 0x00083002: "AvailableTransferSyntaxUID",
            0x00080060: "Modality"}
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.SOPInstanceUID = "1.2.3.4.5"  # odd length: padded with a NUL on the wire
    ds.AvailableTransferSyntaxUID = [m.EXPLICIT_LE, m.IMPLICIT_LE]
    ds.Modality = ""
    code = Dataset()
    code.CodeValue = "X1"
    ds.ProcedureCodeSequence = [code]  # skipped: not wanted, and of defined length
    data = m.encode_identifier(ds, syntax)
    flat = m.decode_flat(data, syntax, keys)
    full = m.decode_identifier(data, syntax)
    assert flat == {"SOPInstanceUID": full.SOPInstanceUID, "Modality": "",
                    "AvailableTransferSyntaxUID": list(full.AvailableTransferSyntaxUID)}
    assert m.decode_flat(data[:-3], syntax, keys) is None  # truncated
    ds.ProcedureCodeSequence = []
    ds.PatientName = "M\u00fcller"
    ds.SpecificCharacterSet = "ISO_IR 192"
    keys[0x00100010] = "PatientName"
    assert m.decode_flat(m.encode_identifier(ds, syntax), syntax, keys) is None  # not ASCII
    assert m.decode_flat(data, "1.2.840.10008.1.2.2", keys) is None  # big endian: pydicom's


def test_release_and_release_collision_on_both_sides() -> None:
    ul = established()
    ul.sent(pdu.RELEASE_RQ)
    assert [e for e, _ in ul.feed(pdu.RELEASE_RP_PDU)] == [Event.RELEASED]
    assert ul.state is State.IDLE

    ul = established()  # the requestor: answers first (Sta9 -> Sta11), then awaits theirs
    ul.sent(pdu.RELEASE_RQ)
    assert [e for e, _ in ul.feed(pdu.RELEASE_RQ_PDU)] == [Event.COLLISION]
    assert ul.state is State.COLLISION_REQUESTOR
    assert ul.collision_step() == pdu.RELEASE_RP_PDU
    assert ul.state is State.COLLISION_REQUESTOR_RP
    assert [e for e, _ in ul.feed(pdu.RELEASE_RP_PDU)] == [Event.RELEASED]
    assert ul.state is State.IDLE

    ul = established(requestor=False)  # the acceptor: waits for the requestor's answer
    ul.sent(pdu.RELEASE_RQ)
    assert [e for e, _ in ul.feed(pdu.RELEASE_RQ_PDU)] == [Event.COLLISION]
    assert ul.state is State.COLLISION_ACCEPTOR and ul.collision_step() is None
    assert [e for e, _ in ul.feed(pdu.RELEASE_RP_PDU)] == [Event.COLLISION]
    assert ul.collision_step() == pdu.RELEASE_RP_PDU and ul.state is State.AWAIT_CLOSE


def test_the_peer_asking_to_release_is_answered_and_data_after_it_is_refused() -> None:
    ul = established(requestor=False)
    assert [e for e, _ in ul.feed(pdu.RELEASE_RQ_PDU)] == [Event.RELEASE_REQUESTED]
    ul.sent(pdu.RELEASE_RP)
    assert ul.state is State.AWAIT_CLOSE
    with pytest.raises(ProtocolError, match="after the association ended"):
        ul.feed(pdu.pdata(1, 3, b"garbage"))


def test_an_abort_after_our_release_response_is_not_a_violation() -> None:
    ul = established(requestor=False)
    ul.feed(pdu.RELEASE_RQ_PDU)
    ul.sent(pdu.RELEASE_RP)
    assert [e for e, _ in ul.feed(pdu.abort_pdu())] == [Event.ABORTED]


# ---- hostile input -----------------------------------------------------------------------

def abort_reason(exc: pytest.ExceptionInfo[ProtocolError]) -> tuple[int, int]:
    raw = exc.value.abort
    assert raw[0] == pdu.ABORT and len(raw) == 10
    return raw[8], raw[9]  # source, reason


@pytest.mark.parametrize("pdu_type", [pdu.P_DATA_TF, pdu.ASSOCIATE_AC, pdu.RELEASE_RP])
def test_a_pdu_length_of_4_gb_is_refused_before_reading_it(pdu_type: int) -> None:
    ul = established() if pdu_type == pdu.P_DATA_TF else UpperLayer(requestor=True,
                                                                     max_receive=16384)
    with pytest.raises(ProtocolError, match="exceeds|claims") as exc:
        ul.feed(pdu.HEADER.pack(pdu_type, 0xFFFFFFFF))
    assert abort_reason(exc) == (pdu.ABORT_SOURCE_PROVIDER, 6)


def test_an_unknown_pdu_type_is_refused() -> None:
    with pytest.raises(ProtocolError, match="unrecognised PDU type 0x09") as exc:
        established().feed(bytes([0x09, 0]) + struct.pack(">I", 4) + bytes(4))
    assert abort_reason(exc) == (pdu.ABORT_SOURCE_PROVIDER, 1)


def test_a_pdu_the_state_does_not_allow_is_refused() -> None:
    ul = established()
    with pytest.raises(ProtocolError, match="unexpected PDU type 0x02 in state Sta6"):
        ul.feed(pdu.encode_associate(pdu.ASSOCIATE_AC, request()))
    assert ul.state is State.AWAIT_CLOSE


def test_item_lengths_past_their_pdu_are_refused() -> None:
    pdv = pdu.PDV_HEADER.pack(1000, 1, 3) + b"short"
    with pytest.raises(pdu.PduError, match="runs past its P-DATA-TF"):
        list(pdu.split_pdvs(pdv))
    with pytest.raises(pdu.PduError, match="truncated PDV header"):
        list(pdu.split_pdvs(b"\x00\x00"))
    raw = bytearray(pdu.encode_associate(pdu.ASSOCIATE_RQ, request()))
    first_item = 6 + 68
    struct.pack_into(">H", raw, first_item + 2, 0xFFFF)  # the application context item
    with pytest.raises(pdu.PduError, match="runs past its PDU"):
        pdu.decode_associate(pdu.ASSOCIATE_RQ, bytes(raw[6:]))
    with pytest.raises(pdu.PduError, match="shorter than its fixed fields"):
        pdu.decode_associate(pdu.ASSOCIATE_RQ, bytes(20))
    with pytest.raises(m.CommandError, match="runs past"):
        m.decode_command(struct.pack("<HHI", 0, 0x0100, 400) + b"\x01\x00")


def test_garbage_after_the_association_is_refused() -> None:
    ul = established()
    ul.sent(pdu.RELEASE_RQ)
    with pytest.raises(ProtocolError, match="unexpected PDU type 0x04 in state Sta1"):
        ul.feed(pdu.RELEASE_RP_PDU + pdu.pdata(1, 3, b"more"))
    with pytest.raises(ProtocolError, match="inside a PDU header"):
        UpperLayer(requestor=True, max_receive=0).header(b"\x04")
