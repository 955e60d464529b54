"""The replication datagram codec: golden vectors, round trips, hostile input, sizes."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invictusd.flows import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT,
    TCP_ESTABLISHED,
    Flow,
    FlowKey,
    inverse,
)
from invictusd.sync import wire
from invictusd.sync.wire import (
    FLAG_SYNC_POINT,
    AuthError,
    DatagramBuilder,
    DatagramType,
    Delete,
    DeleteKey,
    Digest,
    FlowEncodeError,
    Header,
    NackRange,
    Record,
    ResyncBegin,
    ResyncEnd,
    ResyncRequest,
    Update,
    WireError,
    decode_datagram,
    encode_datagram,
    encode_delete,
    encode_delete_key,
    encode_full,
    encode_update,
    key_hash,
    seal,
)

KEY = b"invictusd-test-key-0123456789abc"

ORIG = FlowKey(4, IPPROTO_TCP, bytes([10, 0, 0, 1]), bytes([192, 0, 2, 80]), 40000, 443)
FLOW = Flow(
    ORIG, inverse(ORIG), 0x12345678, IPS_ASSURED | IPS_SEEN_REPLY | IPS_CONFIRMED, 432000,
    0x40000000, TCP_ESTABLISHED,
)  # fmt: skip
NAT_FLOW = FLOW._replace(
    reply=FlowKey(4, IPPROTO_TCP, bytes([192, 0, 2, 80]), bytes([203, 0, 113, 1]), 443, 61000),
    status=FLOW.status | IPS_SRC_NAT,
)
ORIG6 = FlowKey(
    6, IPPROTO_UDP, bytes.fromhex("20010db8000000000000000000000001"),
    bytes.fromhex("20010db8000000000000000000000035"), 5353, 53, 7,
)  # fmt: skip
FLOW6 = Flow(ORIG6, inverse(ORIG6), 1, IPS_CONFIRMED, 30, 0x40000000, 0)

# ---- golden vectors (pinned: a change here is a wire-format change) ---------------------

GOLDEN_RECORDS: list[tuple[str, Record, str]] = [
    (
        "FULL v4 TCP, no NAT (29 bytes)",
        FLOW,
        "18 06 0a000001 c0000250 9c40 01bb 12345678 000e 00069780 40000000 03",
    ),
    (
        "FULL v4 TCP with SNAT (41 bytes)",
        NAT_FLOW,
        "1a 06 0a000001 c0000250 9c40 01bb c0000250 cb007101 01bb ee48"
        " 12345678 001e 00069780 40000000 03",
    ),
    (
        "FULL v6 UDP in zone 7 (54 bytes)",
        FLOW6,
        "15 11 20010db8000000000000000000000001 20010db8000000000000000000000035 14e9 0035"
        " 0007 00000001 0008 0000001e 40000000",
    ),
    (
        "UPDATE",
        Update(0x12345678, 0xBEEF, 0xE, 431999, 0x40000000, 4),
        "28 12345678 beef 000e 0006977f 40000000 04",
    ),
    ("UPDATE without tcp_state", Update(9, 1, 8, 30, 0, 0), "20 00000009 0001 0008 0000001e 00000000"),
    ("DELETE (7 bytes)", Delete(0x12345678, 0xBEEF), "30 12345678 beef"),
    ("DELETE_KEY v4", DeleteKey(ORIG), "40 06 0a000001 c0000250 9c40 01bb"),
    ("RESYNC_BEGIN", ResyncBegin(1), "50 00000001"),
    ("RESYNC_END", ResyncEnd(1, 1, 0x49576BA623023ACE), "60 00000001 00000001 49576ba623023ace"),
    ("DIGEST", Digest(2, 3), "70 00000002 0000000000000003"),
    ("NACK_RANGE", NackRange(5, 9), "80 00000005 00000009"),
    ("RESYNC_REQUEST", ResyncRequest(3, 1), "90 00000003 01"),
]  # fmt: skip

GOLDEN_DATA_HEADER = Header(
    DatagramType.DATA, 1, 0x1111111111111111, 0x2222222222222222, 7, 3, FLAG_SYNC_POINT
)
GOLDEN_DATA_RECORDS: list[Record] = [
    ResyncBegin(1),
    FLOW,
    Delete(0x12345678, 0xBEEF),
    ResyncEnd(1, 1, key_hash(ORIG)),
]
GOLDEN_DATA = bytes.fromhex(
    "4956 01 01 01 00 0001 1111111111111111 2222222222222222 00000007 00000003"
    " 5000000001"
    " 18060a000001c00002509c4001bb12345678000e000697804000000003"
    " 3012345678beef"
    " 60000000010000000149576ba623023ace"
    " 06378c5243aa4313270b88aa315fc7be"
)
GOLDEN_HELLO = bytes.fromhex(
    "4956 01 04 00 00 0002 2222222222222222 0000000000000000 00000000 00000000"
    " e2f5a827f4a335dfd68fdcc8170ccf82"
)


@pytest.mark.parametrize(("name", "record", "hexstr"), GOLDEN_RECORDS, ids=[g[0] for g in GOLDEN_RECORDS])
def test_golden_records(name: str, record: Record, hexstr: str) -> None:
    expected = bytes.fromhex(hexstr)
    assert wire.encode_record(record) == expected
    dtype = DatagramType.DATA
    if isinstance(record, NackRange):
        dtype = DatagramType.NACK
    elif isinstance(record, ResyncRequest):
        dtype = DatagramType.RESYNC_REQUEST
    dg = decode_datagram(encode_datagram(Header(dtype, 1, 5, 6), [record], KEY), KEY)
    assert dg.records == (record,)
    assert type(dg.records[0]) is type(record)


def test_golden_datagram() -> None:
    assert encode_datagram(GOLDEN_DATA_HEADER, GOLDEN_DATA_RECORDS, KEY) == GOLDEN_DATA
    dg = decode_datagram(GOLDEN_DATA, KEY)
    assert dg.header == GOLDEN_DATA_HEADER
    assert list(dg.records) == GOLDEN_DATA_RECORDS


def test_golden_hello() -> None:
    h = Header(DatagramType.HELLO, 2, 0x2222222222222222, 0)
    assert encode_datagram(h, [], KEY) == GOLDEN_HELLO
    assert decode_datagram(GOLDEN_HELLO, KEY).header == h


def test_key_hash_is_pinned() -> None:
    # the digest compares hashes computed on two machines: they must never depend on the run
    assert key_hash(ORIG) == 0x49576BA623023ACE
    assert key_hash(ORIG._replace(zone=1)) != key_hash(ORIG)


# ---- sizes ------------------------------------------------------------------------------


def test_record_sizes() -> None:
    assert len(encode_full(FLOW)) == 29  # conntrackd: about 68
    assert len(encode_full(FLOW._replace(tcp_state=0, reply=inverse(ORIG)))) == 28
    assert len(encode_full(NAT_FLOW)) == 41
    assert len(encode_update(1, 2, 3, 4, 5, 6)) == 18
    assert len(encode_delete(1, 2)) == 7  # conntrackd: the whole entry again
    assert len(encode_delete_key(ORIG)) == 14
    assert wire.HEADER_LEN + wire.MAC_LEN == 48


def test_builder_fills_to_the_mtu() -> None:
    rec = encode_full(FLOW)
    for mtu in (200, 576, 1400, 9000):
        b = DatagramBuilder(mtu)
        while b.add(rec):
            pass
        assert b.count == (mtu - 48) // len(rec)
        data = b.finish(Header(DatagramType.DATA, 1, 2, 3, 4), KEY)
        assert len(data) <= mtu
        assert len(decode_datagram(data, KEY).records) == (mtu - 48) // len(rec)
        assert not b  # emptied by finish
    groups = wire.pack_records([rec] * 100, 1400)
    assert [len(g) for g in groups] == [46, 46, 8]
    with pytest.raises(FlowEncodeError) as e:
        encode_datagram(Header(DatagramType.DATA, 1, 2, 3), [FLOW] * 100, KEY)
    assert e.value.field == "records"


# ---- round trips ------------------------------------------------------------------------


def _addr(family: int) -> st.SearchStrategy[bytes]:
    n = 4 if family == 4 else 16
    return st.binary(min_size=n, max_size=n)


@st.composite
def flows(draw: st.DrawFn) -> Flow:
    family = draw(st.sampled_from([4, 6]))
    proto = draw(
        st.sampled_from([IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP])
        | st.integers(0, 255)
    )
    port = st.integers(0, 0xFFFF)
    zone = draw(st.sampled_from([0, 0, 1, 0xFFFF]))
    src, dst = draw(_addr(family)), draw(_addr(family))
    orig = FlowKey(family, proto, src, dst, draw(port), draw(port), zone)
    if draw(st.booleans()):
        reply = FlowKey(
            family, proto, draw(_addr(family)), draw(_addr(family)), draw(port), draw(port),
            draw(st.sampled_from([0, zone, 3])),
        )  # fmt: skip
    else:
        reply = inverse(orig)
    return Flow(
        orig,
        reply,
        draw(st.integers(0, 0xFFFFFFFF)),
        draw(st.integers(0, 0xFFFF)),
        draw(st.integers(0, 0xFFFFFFFF)),
        draw(st.integers(0, 0xFFFFFFFF)),
        draw(st.integers(0, 255)),
    )


@st.composite
def data_records(draw: st.DrawFn) -> Record:
    u32 = st.integers(0, 0xFFFFFFFF)
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return draw(flows())
    if kind == 1:
        return Update(draw(u32), draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF)),
                      draw(u32), draw(u32), draw(st.integers(0, 255)))  # fmt: skip
    if kind == 2:
        return Delete(draw(u32), draw(st.integers(0, 0xFFFF)))
    if kind == 3:
        return DeleteKey(draw(flows()).orig)
    if kind == 4:
        return ResyncBegin(draw(u32))
    if kind == 5:
        return ResyncEnd(draw(u32), draw(u32), draw(st.integers(0, 2**64 - 1)))
    return Digest(draw(u32), draw(st.integers(0, 2**64 - 1)))


@settings(max_examples=200)
@given(flows())
def test_any_flow_round_trips(flow: Flow) -> None:
    data = encode_datagram(Header(DatagramType.DATA, 1, 2, 3), [flow], KEY)
    (back,) = decode_datagram(data, KEY).records
    assert back == flow
    assert back.is_nat == flow.is_nat


@settings(max_examples=100)
@given(
    st.lists(data_records(), max_size=20),
    st.integers(0, 0xFFFF),
    st.integers(1, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.sampled_from([0, FLAG_SYNC_POINT]),
)
def test_any_data_datagram_round_trips(
    records: list[Record], node: int, se: int, re_: int, seq: int, ack: int, flags: int
) -> None:
    h = Header(DatagramType.DATA, node, se, re_, seq, ack, flags)
    data = encode_datagram(h, records, KEY, mtu=None)
    dg = decode_datagram(data, KEY)
    assert dg.header == h
    assert list(dg.records) == records
    assert [type(r) for r in dg.records] == [type(r) for r in records]


# ---- hostile input ----------------------------------------------------------------------


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_cleanly(data: bytes) -> None:
    with contextlib.suppress(WireError):  # and nothing else
        decode_datagram(data, KEY)


@settings(max_examples=200)
@given(st.binary(max_size=200), st.sampled_from(list(DatagramType)), st.integers(0, 255))
def test_authentic_garbage_decodes_cleanly_and_canonically(
    payload: bytes, dtype: DatagramType, flags: int
) -> None:
    """Past the MAC (a peer's bug, or a leaked key) the parser must still fail cleanly."""
    header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, dtype, flags, 0, 1, 2, 3, 4, 5)
    data = seal(header + payload, KEY)
    try:
        dg = decode_datagram(data, KEY)
    except AuthError:
        pytest.fail("a correctly sealed datagram failed authentication")
    except WireError as e:
        assert e.field and 0 <= e.offset <= len(data)
        return
    # accepted input has exactly one encoding
    assert encode_datagram(dg.header, dg.records, KEY, mtu=None) == data


def test_every_bit_flip_is_rejected() -> None:
    for i in range(len(GOLDEN_DATA) * 8):
        flipped = bytearray(GOLDEN_DATA)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(WireError):
            decode_datagram(bytes(flipped), KEY)


def test_every_truncation_is_rejected() -> None:
    for n in range(len(GOLDEN_DATA)):
        with pytest.raises(WireError):
            decode_datagram(GOLDEN_DATA[:n], KEY)


def test_errors_name_field_and_offset() -> None:
    def err(data: bytes, key: bytes = KEY) -> WireError:
        with pytest.raises(WireError) as e:
            decode_datagram(data, key)
        return e.value

    e = err(b"XX" + GOLDEN_DATA[2:])
    assert (e.field, e.offset) == ("magic", 0)
    e = err(GOLDEN_DATA[:2] + b"\x02" + GOLDEN_DATA[3:])
    assert (e.field, e.offset) == ("version", 2)
    e = err(GOLDEN_DATA[:10])
    assert e.field == "length"
    e = err(GOLDEN_DATA, b"another key")
    assert isinstance(e, AuthError) and e.field == "mac" and e.offset == len(GOLDEN_DATA) - 16

    def sealed(dtype: int, flags: int, payload: bytes, se: int = 2) -> bytes:
        return seal(wire.HEADER.pack(b"IV", 1, dtype, flags, 0, 1, se, 3, 4, 5) + payload, KEY)

    e = err(sealed(1, 0, bytes.fromhex("f0")))
    assert (e.field, e.offset) == ("record_type", 32)
    e = err(sealed(1, 0, bytes.fromhex("3012345678")))
    assert (e.field, e.offset) == ("record", 32)
    e = err(sealed(1, 0, encode_delete(1, 2) + bytes.fromhex("31") + bytes(6)))
    assert (e.field, e.offset) == ("record_flags", 39)
    e = err(sealed(4, 0, encode_delete(1, 2)))
    assert e.field == "record_type"  # HELLO carries no records
    e = err(sealed(9, 0, b""))
    assert (e.field, e.offset) == ("type", 3)
    e = err(sealed(1, 0x80, b""))
    assert (e.field, e.offset) == ("flags", 4)
    e = err(sealed(2, FLAG_SYNC_POINT, b""))
    assert e.field == "flags"
    e = err(sealed(1, 0, b"", se=0))
    assert e.field == "sender_epoch"
    # non-canonical: a NAT flag with a reply that is the inverse after all
    nat_but_not = bytes.fromhex("1a06") + bytes(12) + bytes(12) + bytes(15)
    e = err(sealed(1, 0, nat_but_not))
    assert e.field == "reply"


def test_encode_errors_name_the_field() -> None:
    cases = [
        (FLOW._replace(orig=ORIG._replace(src=b"\x01\x02\x03")), "orig.src"),
        (FLOW._replace(orig=ORIG._replace(family=5)), "orig.family"),
        (FLOW._replace(status=0x10000), "status"),
        (FLOW._replace(ct_id=-1), "ct_id"),
        (FLOW._replace(orig=ORIG._replace(sport=70000)), "orig.sport"),
        (NAT_FLOW._replace(reply=NAT_FLOW.reply._replace(family=6)), "reply.src"),
        (FLOW._replace(tcp_state=256), "tcp_state"),
    ]
    for flow, field in cases:
        with pytest.raises(FlowEncodeError) as e:
            encode_full(flow)
        assert e.value.field == field, flow
    with pytest.raises(FlowEncodeError) as e:
        encode_update(1, 2, 0x10000, 4, 5, 6)
    assert e.value.field == "status"
    with pytest.raises(FlowEncodeError) as e:
        encode_datagram(Header(DatagramType.ACK, 1, 2, 3), [Delete(1, 2)], KEY)
    assert e.value.field == "records"
    with pytest.raises(FlowEncodeError) as e:
        encode_datagram(Header(DatagramType.ACK, 1, 2**64, 3), [], KEY)
    assert e.value.field == "header"


@settings(max_examples=200)
@given(st.lists(data_records(), min_size=1, max_size=8), st.data())
def test_authentic_mutated_records_decode_cleanly(records: list[Record], data: st.DataObject) -> None:
    """Valid records with one byte changed (then resealed): a datagram or a clean WireError."""
    body = bytearray(encode_datagram(Header(DatagramType.DATA, 1, 2, 3), records, KEY, None)[:-16])
    i = data.draw(st.integers(wire.HEADER_LEN, len(body) - 1))
    body[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(wire.HEADER_LEN, len(body)))
    sealed = seal(bytes(body[:cut]), KEY)
    try:
        dg = decode_datagram(sealed, KEY)
    except AuthError:
        pytest.fail("a correctly sealed datagram failed authentication")
    except WireError as e:
        assert 0 <= e.offset <= len(sealed)
        return
    assert encode_datagram(dg.header, dg.records, KEY, mtu=None) == sealed
