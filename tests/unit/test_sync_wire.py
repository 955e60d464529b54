"""The replication datagram codec (version 2): golden vectors, round trips, hostile input."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invictusd.flows import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP
from invictusd.sync import wire
from invictusd.sync.wire import (
    FLAG_SYNC_POINT,
    AuthError,
    DatagramBuilder,
    DatagramType,
    Delete,
    Digest,
    EncodeError,
    Entry,
    Header,
    NackRange,
    Record,
    ResyncBegin,
    ResyncEnd,
    ResyncRequest,
    WireError,
    decode_datagram,
    encode_datagram,
    encode_delete,
    encode_entry,
    key_hash,
    reply_of,
    seal,
)

KEY = b"invictusd-test-key-0123456789abc"
SRC, DST = bytes([10, 0, 0, 1]), bytes([192, 0, 2, 80])
ENTRY = Entry(True, 4, IPPROTO_TCP, SRC, DST, 40000, 443, 0, DST, SRC, 443, 40000, 0,
              0xE, 432000, 0x40000000, 3)
NAT = ENTRY._replace(new=False, rdst=bytes([203, 0, 113, 1]), rdport=61000, status=0x1E)
S6 = bytes.fromhex("20010db8000000000000000000000001")
D6 = bytes.fromhex("20010db8000000000000000000000035")
ENTRY6 = Entry(True, 6, IPPROTO_UDP, S6, D6, 5353, 53, 7, D6, S6, 53, 5353, 7, 8, 30, 0x40000000, 0)
DELETE = Delete(4, IPPROTO_TCP, SRC, DST, 40000, 443, 0)

# ---- golden vectors (pinned: a change here is a wire-format change) ---------------------

GOLDEN_RECORDS: list[tuple[str, Record, str]] = [
    ("UPSERT_NEW v4 TCP, no NAT (25 bytes)", ENTRY,
     "18 06 0a000001 c0000250 9c40 01bb 000e 00069780 40000000 03"),
    ("UPSERT v4 TCP with SNAT (37 bytes)", NAT,
     "2a 06 0a000001 c0000250 9c40 01bb c0000250 cb007101 01bb ee48 001e 00069780 40000000 03"),
    ("UPSERT_NEW v6 UDP in zone 7 (50 bytes)", ENTRY6,
     "15 11 20010db8000000000000000000000001 20010db8000000000000000000000035 14e9 0035 0007"
     " 0008 0000001e 40000000"),
    ("DELETE v4 (14 bytes)", DELETE, "30 06 0a000001 c0000250 9c40 01bb"),
    ("DELETE v4 in zone 9", DELETE._replace(zone=9), "34 06 0a000001 c0000250 9c40 01bb 0009"),
    ("RESYNC_BEGIN", ResyncBegin(1), "40 00000001"),
    ("RESYNC_END", ResyncEnd(1, 5), "50 00000001 00000005"),
    ("DIGEST", Digest(2, 3), "60 00000002 0000000000000003"),
    ("NACK_RANGE", NackRange(5, 9), "70 00000005 00000009"),
    ("RESYNC_REQUEST", ResyncRequest(3, 1), "80 00000003 01"),
]  # fmt: skip

GOLDEN_DATA_HEADER = Header(DatagramType.DATA, 1, 0x1111111111111111, 0x2222222222222222, 7, 3,
                            FLAG_SYNC_POINT)
GOLDEN_DATA_RECORDS: list[Record] = [ResyncBegin(1), ENTRY, DELETE, ResyncEnd(1, 1)]
GOLDEN_DATA = bytes.fromhex(
    "4956 02 01 01 00 0001 1111111111111111 2222222222222222 00000007 00000003"
    " 4000000001"
    " 18060a000001c00002509c4001bb000e000697804000000003"
    " 30060a000001c00002509c4001bb"
    " 500000000100000001"
    " 36cf14e3ae7c5308ee3c77498365b4c5"
)
GOLDEN_HELLO = bytes.fromhex(
    "4956 02 04 00 00 0002 2222222222222222 0000000000000000 00000000 00000000"
    " fe391d2ee162d1b06eaff03e822df17f"
)


def _dtype(record: Record) -> DatagramType:
    if isinstance(record, NackRange):
        return DatagramType.NACK
    if isinstance(record, ResyncRequest):
        return DatagramType.RESYNC_REQUEST
    return DatagramType.DATA


@pytest.mark.parametrize(("name", "record", "hexstr"), GOLDEN_RECORDS, ids=[g[0] for g in GOLDEN_RECORDS])
def test_golden_records(name: str, record: Record, hexstr: str) -> None:
    expected = bytes.fromhex(hexstr)
    assert wire.encode_record(record) == expected
    dg = decode_datagram(encode_datagram(Header(_dtype(record), 1, 5, 6), [record], KEY), KEY)
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
    # digests compare hashes computed on two machines: they must never depend on the run
    assert key_hash(4, IPPROTO_TCP, SRC, DST, 40000, 443, 0) == 0x49576BA623023ACE
    assert key_hash(4, IPPROTO_TCP, SRC, DST, 40000, 443, 1) != 0x49576BA623023ACE
    assert wire.entry_key(ENTRY) == wire.entry_key(DELETE)


def test_the_reply_of_icmp_is_the_echo_reply() -> None:
    assert reply_of(IPPROTO_ICMP, SRC, DST, 77, 8 << 8) == (DST, SRC, 77, 0)
    assert reply_of(IPPROTO_ICMP, SRC, DST, 77, 0) == (DST, SRC, 77, 8 << 8)  # both ways, as the kernel
    assert reply_of(IPPROTO_ICMP, SRC, DST, 77, 3 << 8 | 1) == (DST, SRC, 77, 3 << 8 | 1)
    assert reply_of(IPPROTO_ICMPV6, S6, D6, 77, 128 << 8 | 0) == (D6, S6, 77, 129 << 8)
    assert reply_of(IPPROTO_ICMPV6, S6, D6, 77, 139 << 8) == (D6, S6, 77, 140 << 8)


# ---- sizes ------------------------------------------------------------------------------


def test_record_sizes() -> None:
    assert len(encode_entry(ENTRY)) == 25  # conntrackd: about 68
    assert len(encode_entry(ENTRY._replace(tcp_state=0))) == 24
    assert len(encode_entry(NAT)) == 37
    assert len(encode_delete(DELETE)) == 14  # conntrackd: the whole entry again
    assert wire.HEADER_LEN + wire.MAC_LEN == 48


def test_builder_fills_to_the_mtu() -> None:
    rec = encode_entry(ENTRY)
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
    assert [len(g) for g in groups] == [54, 46]
    with pytest.raises(EncodeError) as e:
        encode_datagram(Header(DatagramType.DATA, 1, 2, 3), [ENTRY] * 100, KEY)
    assert e.value.field == "records"


# ---- round trips ------------------------------------------------------------------------


def _addr(family: int) -> st.SearchStrategy[bytes]:
    n = 4 if family == 4 else 16
    return st.binary(min_size=n, max_size=n)


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    family = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from([IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP])
                 | st.integers(0, 255))
    port = st.integers(0, 0xFFFF)
    zone = draw(st.sampled_from([0, 0, 1, 0xFFFF]))
    src, dst, sp, dp = draw(_addr(family)), draw(_addr(family)), draw(port), draw(port)
    if draw(st.booleans()):
        rs, rd, rsp, rdp = draw(_addr(family)), draw(_addr(family)), draw(port), draw(port)
        rzone = draw(st.sampled_from([0, zone, 3]))
    else:
        (rs, rd, rsp, rdp), rzone = reply_of(proto, src, dst, sp, dp), zone
    return Entry(draw(st.booleans()), family, proto, src, dst, sp, dp, zone, rs, rd, rsp, rdp, rzone,
                 draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFFFFFF)),
                 draw(st.integers(0, 0xFFFFFFFF)), draw(st.integers(0, 255)))


@st.composite
def data_records(draw: st.DrawFn) -> Record:
    u32 = st.integers(0, 0xFFFFFFFF)
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(entries())
    if kind == 1:
        e = draw(entries())
        return Delete(e.family, e.proto, e.src, e.dst, e.sport, e.dport, e.zone)
    if kind == 2:
        return ResyncBegin(draw(u32))
    if kind == 3:
        return ResyncEnd(draw(u32), draw(u32))
    return Digest(draw(u32), draw(st.integers(0, 2**64 - 1)))


def test_a_directional_zone_takes_the_nat_form() -> None:
    """nft ``ct original zone set`` makes entries whose reply zone differs while the reply
    tuple is the inverse: the reply (and its zone) travel in the NAT form."""
    e = ENTRY._replace(zone=5, rzone=0)
    assert not e.is_nat and e.needs_reply
    rec = encode_entry(e)
    assert rec[0] & wire.RF_NAT and rec[0] & wire.RF_ZONE
    (back,) = decode_datagram(encode_datagram(Header(DatagramType.DATA, 1, 2, 3), [e], KEY), KEY).records
    assert back == e


@settings(max_examples=300)
@given(entries())
def test_any_entry_round_trips(e: Entry) -> None:
    data = encode_datagram(Header(DatagramType.DATA, 1, 2, 3), [e], KEY)
    (back,) = decode_datagram(data, KEY).records
    assert back == e
    assert isinstance(back, Entry) and back.is_nat == e.is_nat


@settings(max_examples=100)
@given(st.lists(data_records(), max_size=20), st.integers(0, 0xFFFF), st.integers(1, 2**64 - 1),
       st.integers(0, 2**64 - 1), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
       st.sampled_from([0, FLAG_SYNC_POINT]))
def test_any_data_datagram_round_trips(records: list[Record], node: int, se: int, re_: int, seq: int,
                                       ack: int, flags: int) -> None:
    h = Header(DatagramType.DATA, node, se, re_, seq, ack, flags)
    data = encode_datagram(h, records, KEY, mtu=None)
    dg = decode_datagram(data, KEY)
    assert dg.header == h
    assert list(dg.records) == records


# ---- hostile input ----------------------------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_cleanly(data: bytes) -> None:
    with contextlib.suppress(WireError):  # and nothing else
        decode_datagram(data, KEY)


@settings(max_examples=300)
@given(st.binary(max_size=200), st.sampled_from(list(DatagramType)), st.integers(0, 255))
def test_authentic_garbage_decodes_cleanly_and_canonically(payload: bytes, dtype: DatagramType,
                                                           flags: int) -> None:
    """Past the MAC (a peer's bug, or a stolen key) the parser must still fail cleanly."""
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


def test_a_version_1_datagram_is_refused_by_version() -> None:
    old = GOLDEN_DATA[:2] + b"\x01" + GOLDEN_DATA[3:]
    with pytest.raises(WireError) as e:
        decode_datagram(old, KEY)
    assert (e.value.field, e.value.offset) == ("version", 2)


def test_errors_name_field_and_offset() -> None:
    def err(data: bytes, key: bytes = KEY) -> WireError:
        with pytest.raises(WireError) as e:
            decode_datagram(data, key)
        return e.value

    e = err(b"XX" + GOLDEN_DATA[2:])
    assert (e.field, e.offset) == ("magic", 0)
    e = err(GOLDEN_DATA[:10])
    assert e.field == "length"
    e = err(GOLDEN_DATA, b"another key-----")
    assert isinstance(e, AuthError) and e.field == "mac" and e.offset == len(GOLDEN_DATA) - 16

    def sealed(dtype: int, flags: int, payload: bytes, se: int = 2) -> bytes:
        return seal(wire.HEADER.pack(b"IV", 2, dtype, flags, 0, 1, se, 3, 4, 5) + payload, KEY)

    e = err(sealed(1, 0, bytes.fromhex("f0")))
    assert (e.field, e.offset) == ("record_type", 32)
    e = err(sealed(1, 0, bytes.fromhex("3006")))
    assert (e.field, e.offset) == ("record", 32)
    e = err(sealed(1, 0, encode_delete(DELETE) + bytes.fromhex("32") + bytes(13)))
    assert (e.field, e.offset) == ("record_flags", 46)
    e = err(sealed(4, 0, encode_delete(DELETE)))
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
    nat_but_not = bytes.fromhex("1206") + SRC + DST + bytes.fromhex("9c4001bb") + DST + SRC + \
        bytes.fromhex("01bb9c40") + bytes(10)
    e = err(sealed(1, 0, nat_but_not))
    assert e.field == "reply"


def test_encode_errors_name_the_field() -> None:
    for entry, field in ((ENTRY._replace(src=b"\x01\x02\x03"), "addresses"),
                         (ENTRY._replace(family=5), "family"),
                         (ENTRY._replace(status=0x10000), "entry")):
        with pytest.raises(EncodeError) as e:
            encode_entry(entry)
        assert e.value.field == field, entry
    with pytest.raises(EncodeError) as e:
        encode_datagram(Header(DatagramType.ACK, 1, 2, 3), [DELETE], KEY)
    assert e.value.field == "records"
    with pytest.raises(EncodeError) as e:
        encode_datagram(Header(DatagramType.ACK, 1, 2**64, 3), [], KEY)
    assert e.value.field == "header"


@settings(max_examples=300)
@given(st.lists(data_records(), min_size=1, max_size=8), st.data())
def test_authentic_mutated_records_decode_cleanly(records: list[Record], data: st.DataObject) -> None:
    """Valid records with one byte changed (then resealed): a datagram or a clean WireError."""
    body = bytearray(encode_datagram(Header(DatagramType.DATA, 1, 2, 3), records, KEY, None)[:-16])
    i = data.draw(st.integers(wire.HEADER_LEN, len(body) - 1))
    body[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(wire.HEADER_LEN, len(body)))
    sealed_data = seal(bytes(body[:cut]), KEY)
    try:
        dg = decode_datagram(sealed_data, KEY)
    except AuthError:
        pytest.fail("a correctly sealed datagram failed authentication")
    except WireError as e:
        assert 0 <= e.offset <= len(sealed_data)
        return
    assert encode_datagram(dg.header, dg.records, KEY, mtu=None) == sealed_data


# --- validate_records: the decoder's verdict without building records --------------------------
def _verdict(fn: Any) -> tuple[str, int, str] | Any:
    try:
        return fn()
    except WireError as e:
        return ("error", e.offset, str(e))


@settings(max_examples=600, deadline=None)
@given(st.lists(data_records(), max_size=12), st.data(), st.sampled_from(list(DatagramType)))
def test_validate_records_agrees_with_the_decoder(records: list[Record], data: st.DataObject,
                                                  dtype: DatagramType) -> None:
    payload = bytearray(b"".join(wire.encode_record(r) for r in records))
    for _ in range(data.draw(st.integers(0, 3))):  # flip, cut or extend: any bytes
        if payload and data.draw(st.booleans()):
            payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
        elif payload and data.draw(st.booleans()):
            del payload[data.draw(st.integers(0, len(payload) - 1)):]
        else:
            payload += data.draw(st.binary(max_size=8))
    raw = bytes(payload)
    want = _verdict(lambda: len(wire.decode_payload(raw, 0, len(raw), dtype)))
    assert _verdict(lambda: wire.validate_records(raw, 0, len(raw), dtype)) == want


@given(st.binary(max_size=300), st.sampled_from(list(DatagramType)))
def test_validate_records_of_arbitrary_bytes(raw: bytes, dtype: DatagramType) -> None:
    want = _verdict(lambda: len(wire.decode_payload(raw, 0, len(raw), dtype)))
    assert _verdict(lambda: wire.validate_records(raw, 0, len(raw), dtype)) == want


def test_decode_record_at_walks_a_payload() -> None:
    recs: list[Record] = [ResyncBegin(3), wire.Delete(4, IPPROTO_TCP, bytes(4), bytes(4), 1, 2, 0)]
    payload = b"".join(wire.encode_record(r) for r in recs)
    first, nxt = wire.decode_record_at(payload, 0)
    assert first == recs[0] and wire.decode_record_at(payload, nxt) == (recs[1], len(payload))
    with pytest.raises(WireError, match="record"):
        wire.decode_record_at(payload, len(payload))


@settings(max_examples=400, deadline=None)
@given(st.lists(data_records(), min_size=2, max_size=6))
def test_record_ident_names_the_entry_whatever_the_record_kind(records: list[Record]) -> None:
    named = [r for r in records if isinstance(r, Entry | wire.Delete)]
    payload = b"".join(wire.encode_record(r) for r in named)
    offs, off = [], 0
    for r in named:
        offs.append(off)
        off += len(wire.encode_record(r))
    for a, oa in zip(named, offs, strict=True):
        for b, ob in zip(named, offs, strict=True):
            same = wire.entry_key(a) == wire.entry_key(b)
            assert (wire.record_ident(payload, oa) == wire.record_ident(payload, ob)) == same
    # the same entry as an UPSERT, an UPSERT_NEW and a DELETE (a zone of its own or not)
    for r in named:
        if isinstance(r, Entry):
            d = wire.Delete(r.family, r.proto, r.src, r.dst, r.sport, r.dport, r.zone)
            both = wire.encode_record(r) + wire.encode_record(d)
            assert wire.record_ident(both, 0) == wire.record_ident(both, len(wire.encode_record(r)))
