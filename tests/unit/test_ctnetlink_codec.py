"""ctnetlink codec: golden vectors from the kernel, round trips, and fuzzing.

The event/dump/ack vectors were captured on Linux 6.18 in a fresh network namespace: entries
created with the conntrack CLI (``conntrack -I/-U/-D``), events read from a raw
NETLINK_NETFILTER socket bound to groups 1-3, the dump requested with
``build_dump_request(7, AF_UNSPEC, 1 << 30, 1 << 30)``, acks from sending ``create_tcp``
twice with NETLINK_CAP_ACK. The build vectors (``create_snat`` ...) are our encoder's output
pinned; ``tests/netns/test_conntrack_kernel.py`` sends the same flows to the kernel and
checks the result (SRC_NAT, reply tuple).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from invictusd import flows as F
from invictusd.flows import EventKind, Flow, FlowEvent, FlowKey
from invictusd.io import ctnetlink as ct

V4 = socket.inet_aton


def V6(s: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, s)


VECTORS_HEX: dict[str, str] = {
    "tcp_new": (
        "e8000000000100060000000026290000020000003400018014000180080001000a000001080002000a000002"
        "1c0002800500010006000000060002009c40000006000300005000003400028014000180080001000a000002"
        "080002000a0000011c00028005000100060000000600020000500000060003009c40000008000c0015bed24a"
        "080003000000000e0800070000000078300004802c0001800500010003000000050002000000000005000300"
        "00000000060004000a000000060005000a0000001c0018800800010000000000080002000000000008000300"
        "000000000800080040000001"
    ),
    "tcp_update": (
        "e80000000001000000000000098718bd020000003400018014000180080001000a000001080002000a000002"
        "1c0002800500010006000000060002009c40000006000300005000003400028014000180080001000a000002"
        "080002000a0000011c00028005000100060000000600020000500000060003009c40000008000c0015bed24a"
        "080003000000000e0800070000000077300004802c0001800500010003000000050002000000000005000300"
        "00000000060004000a000000060005000a0000001c0018800800010000000000080002000000000008000300"
        "000000000800080040000002"
    ),
    "tcp_destroy": (
        "ac0000000201000000000000017046fa020000003400018014000180080001000a000001080002000a000002"
        "1c0002800500010006000000060002009c40000006000300005000003400028014000180080001000a000002"
        "080002000a0000011c00028005000100060000000600020000500000060003009c40000008000c0015bed24a"
        "080003000000020e0800070000000077100004800c00018005000100030000000800080040000002"
    ),
    "udp_new_nomark": (
        "b8000000000100060000000029290000020000003400018014000180080001000a000003080002000a000004"
        "1c00028005000100110000000600020014e9000006000300003500003400028014000180080001000a000004"
        "080002000a0000031c000280050001001100000006000200003500000600030014e9000008000c00de0cad9c"
        "0800030000000008080007000000001e1c001880080001000000000008000200000000000800030000000000"
        "0800080000000000"
    ),
    "icmp_new": (
        "c800000000010006000000002a290000020000003c00018014000180080001000a000003080002000a000004"
        "2400028005000100010000000600040012340000050005000800000005000600000000003c00028014000180"
        "080001000a000004080002000a00000324000280050001000100000006000400123400000500050000000000"
        "050006000000000008000c0076ffc1830800030000000008080007000000001e1c0018800800010000000000"
        "080002000000000008000300000000000800080040000000"
    ),
    "tcp6_zone_new": (
        "2001000000010006000000002b2900000a0000004c0001802c00018014000300fd0000000000000000000000"
        "0000000114000400fd0000000000000000000000000000021c00028005000100060000000600020004d20000"
        "0600030001bb00004c0002802c00018014000300fd00000000000000000000000000000214000400fd000000"
        "0000000000000000000000011c00028005000100060000000600020001bb00000600030004d2000006001200"
        "0007000008000c00b16706df0800030000000008080007000000003c300004802c0001800500010001000000"
        "05000200000000000500030000000000060004000a000000060005000a0000001c0018800800010000000000"
        "080002000000000008000300000000000800080040000000"
    ),
    "icmp6_new": (
        "f800000000010006000000002c2900000a000000540001802c00018014000300fd0000000000000000000000"
        "0000000114000400fd00000000000000000000000000000224000280050001003a0000000600070000630000"
        "05000800800000000500090000000000540002802c00018014000300fd000000000000000000000000000002"
        "14000400fd00000000000000000000000000000124000280050001003a000000060007000063000005000800"
        "81000000050009000000000008000c004f4d20de0800030000000008080007000000001e1c00188008000100"
        "00000000080002000000000008000300000000000800080040000000"
    ),
    "tcp_snat_new": (
        "e800000000010006000000002d29000002000000340001801400018008000100c0a8010a080002000a000002"
        "1c0002800500010006000000060002008235000006000300005000003400028014000180080001000a000002"
        "080002000a0909091c00028005000100060000000600020000500000060003009c41000008000c00ed3ed42d"
        "080003000000019e0800070000000078300004802c0001800500010003000000050002000000000005000300"
        "00000000060004000a000000060005000a0000001c0018800800010000000000080002000000000008000300"
        "000000000800080040000000"
    ),
    "dump_mark30": (
        "f000000000012200070000001588d5fd02000000340001801400018008000100c0a8010a080002000a000002"
        "1c0002800500010006000000060002008235000006000300005000003400028014000180080001000a000002"
        "080002000a0909091c00028005000100060000000600020000500000060003009c410000080003000000019e"
        "080008004000000008000c00ed3ed42d08000b00000000010800070000000077300004802c00018005000100"
        "0300000005000200000000000500030000000000060004000a000000060005000a0000001c00188008000100"
        "00000000080002000000000008000300000000000001000000012200070000001588d5fd0a00000054000180"
        "2c00018014000300fd00000000000000000000000000000114000400fd000000000000000000000000000002"
        "24000280050001003a000000060007000063000005000800800000000500090000000000540002802c000180"
        "14000300fd00000000000000000000000000000214000400fd00000000000000000000000000000124000280"
        "050001003a000000060007000063000005000800810000000500090000000000080003000000000808000800"
        "4000000008000c004f4d20de08000b0000000001080007000000001d1c001880080001000000000008000200"
        "000000000800030000000000d000000000012200070000001588d5fd020000003c0001801400018008000100"
        "0a000003080002000a0000042400028005000100010000000600040012340000050005000800000005000600"
        "000000003c00028014000180080001000a000004080002000a00000324000280050001000100000006000400"
        "12340000050005000000000005000600000000000800030000000008080008004000000008000c0076ffc183"
        "08000b0000000001080007000000001d1c001880080001000000000008000200000000000800030000000000"
        "2801000000012200070000001588d5fd0a0000004c0001802c00018014000300fd0000000000000000000000"
        "0000000114000400fd0000000000000000000000000000021c00028005000100060000000600020004d20000"
        "0600030001bb00004c0002802c00018014000300fd00000000000000000000000000000214000400fd000000"
        "0000000000000000000000011c00028005000100060000000600020001bb00000600030004d2000006001200"
        "000700000800030000000008080008004000000008000c00b16706df08000b0000000001080007000000003b"
        "300004802c000180050001000100000005000200000000000500030000000000060004000a00000006000500"
        "0a0000001c001880080001000000000008000200000000000800030000000000"
    ),
    "dump_done": ("1400000003000200070000001588d5fd00000000"),
    "ack_ok": ("240000000200000134120000bb36000000000000b4000000000105063412000000000000"),
    "ack_eexist": ("240000000200000135120000bb360000efffffffb4000000000105063512000000000000"),
    "create_tcp": (
        "b4000000000105063412000000000000020000003400018014000180080001000a000001080002000a000002"
        "1c0002800500010006000000060002009c40000006000300005000003400028014000180080001000a000002"
        "080002000a0000011c00028005000100060000000600020000500000060003009c400000080003000000000e"
        "08000700000000780800080040000000200004801c00018005000100030000000600040008ff000006000500"
        "08ff0000"
    ),
    "create_snat": (
        "dc00000000010506070000000000000002000000340001801400018008000100c0a8010a080002000a000002"
        "1c0002800500010006000000060002008235000006000300005000003400028014000180080001000a000002"
        "08000200c0a8010a1c000280050001000600000006000200005000000600030082350000080003000000000e"
        "08000700000000780800080040000000200004801c00018005000100030000000600040008ff000006000500"
        "08ff000028000680080001000a090909080002000a09090914000380060001009c410000060002009c410000"
    ),
    "update_tcp": (
        "8000000000010500080000000000000002000000340001801400018008000100c0a8010a080002000a000002"
        "1c000280050001000600000006000200823500000600030000500000080003000000000e0800070000000078"
        "0800080040000000200004801c00018005000100030000000600040008ff00000600050008ff0000"
    ),
    "delete_tcp": (
        "4800000002010500090000000000000002000000340001801400018008000100c0a8010a080002000a000002"
        "1c000280050001000600000006000200823500000600030000500000"
    ),
    "dump_request": ("24000000010101030a000000000000000000000008000800400000000800150040000000"),
}
VEC = {name: bytes.fromhex(h) for name, h in VECTORS_HEX.items()}

MARK30 = 1 << 30


def tcp_key(src: str, dst: str, sport: int, dport: int, zone: int = 0) -> FlowKey:
    return FlowKey(4, F.IPPROTO_TCP, V4(src), V4(dst), sport, dport, zone)


# --- a minimal independent attribute walker, to look inside built messages ----------------
def attrs(buf: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    out = []
    a = start
    while a + 4 <= end:
        alen, atype = struct.unpack_from("=HH", buf, a)
        out.append((atype & 0x3FFF, buf[a + 4 : a + alen]))
        a += (alen + 3) & ~3
    return out


def top_attrs(msg: bytes) -> dict[int, bytes]:
    return dict(attrs(msg, 20, len(msg)))


def nested(payload: bytes) -> dict[int, bytes]:
    return dict(attrs(payload, 0, len(payload)))


# --- golden decoding ------------------------------------------------------------------------
EXPECTED_EVENTS: dict[str, FlowEvent] = {
    "tcp_new": FlowEvent(
        EventKind.NEW,
        Flow(
            tcp_key("10.0.0.1", "10.0.0.2", 40000, 80),
            tcp_key("10.0.0.2", "10.0.0.1", 80, 40000),
            ct_id=0x15BED24A,
            status=F.IPS_CONFIRMED | F.IPS_ASSURED | F.IPS_SEEN_REPLY,
            timeout=120,
            mark=MARK30 | 1,
            tcp_state=F.TCP_ESTABLISHED,
        ),
    ),
    "tcp_update": FlowEvent(
        EventKind.UPDATE,
        Flow(
            tcp_key("10.0.0.1", "10.0.0.2", 40000, 80),
            tcp_key("10.0.0.2", "10.0.0.1", 80, 40000),
            ct_id=0x15BED24A,
            status=F.IPS_CONFIRMED | F.IPS_ASSURED | F.IPS_SEEN_REPLY,
            timeout=119,
            mark=MARK30 | 2,
            tcp_state=F.TCP_ESTABLISHED,
        ),
    ),
    "tcp_destroy": FlowEvent(
        EventKind.DESTROY,
        Flow(
            tcp_key("10.0.0.1", "10.0.0.2", 40000, 80),
            tcp_key("10.0.0.2", "10.0.0.1", 80, 40000),
            ct_id=0x15BED24A,
            status=F.IPS_CONFIRMED | F.IPS_ASSURED | F.IPS_SEEN_REPLY | F.IPS_DYING,
            timeout=119,
            mark=MARK30 | 2,
            tcp_state=F.TCP_ESTABLISHED,
        ),
    ),
    "udp_new_nomark": FlowEvent(
        EventKind.NEW,
        Flow(
            FlowKey(4, F.IPPROTO_UDP, V4("10.0.0.3"), V4("10.0.0.4"), 5353, 53),
            FlowKey(4, F.IPPROTO_UDP, V4("10.0.0.4"), V4("10.0.0.3"), 53, 5353),
            ct_id=0xDE0CAD9C,
            status=F.IPS_CONFIRMED,
            timeout=30,
            mark=0,
        ),
    ),
    "icmp_new": FlowEvent(
        EventKind.NEW,
        Flow(
            FlowKey(4, F.IPPROTO_ICMP, V4("10.0.0.3"), V4("10.0.0.4"), 4660, 8 << 8),
            FlowKey(4, F.IPPROTO_ICMP, V4("10.0.0.4"), V4("10.0.0.3"), 4660, 0),
            ct_id=0x76FFC183,
            status=F.IPS_CONFIRMED,
            timeout=30,
            mark=MARK30,
        ),
    ),
    "tcp6_zone_new": FlowEvent(
        EventKind.NEW,
        Flow(
            FlowKey(6, F.IPPROTO_TCP, V6("fd00::1"), V6("fd00::2"), 1234, 443, 7),
            FlowKey(6, F.IPPROTO_TCP, V6("fd00::2"), V6("fd00::1"), 443, 1234, 7),
            ct_id=0xB16706DF,
            status=F.IPS_CONFIRMED,
            timeout=60,
            mark=MARK30,
            tcp_state=F.TCP_SYN_SENT,
        ),
    ),
    "icmp6_new": FlowEvent(
        EventKind.NEW,
        Flow(
            FlowKey(6, F.IPPROTO_ICMPV6, V6("fd00::1"), V6("fd00::2"), 99, 128 << 8),
            FlowKey(6, F.IPPROTO_ICMPV6, V6("fd00::2"), V6("fd00::1"), 99, 129 << 8),
            ct_id=0x4F4D20DE,
            status=F.IPS_CONFIRMED,
            timeout=30,
            mark=MARK30,
        ),
    ),
    "tcp_snat_new": FlowEvent(
        EventKind.NEW,
        Flow(
            tcp_key("192.168.1.10", "10.0.0.2", 33333, 80),
            tcp_key("10.0.0.2", "10.9.9.9", 80, 40001),
            ct_id=0xED3ED42D,
            status=F.IPS_CONFIRMED
            | F.IPS_ASSURED
            | F.IPS_SEEN_REPLY
            | F.IPS_SRC_NAT
            | F.IPS_SRC_NAT_DONE
            | F.IPS_DST_NAT_DONE,
            timeout=120,
            mark=MARK30,
            tcp_state=F.TCP_ESTABLISHED,
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_EVENTS))
def test_golden_event_decodes(name: str) -> None:
    assert ct.parse_messages(VEC[name]) == [EXPECTED_EVENTS[name]]


@pytest.mark.parametrize("name", sorted(EXPECTED_EVENTS))
def test_golden_event_from_bytearray_and_memoryview(name: str) -> None:
    buf = bytearray(VEC[name]) + bytearray(100)  # trailing garbage beyond nbytes is ignored
    n = len(VEC[name])
    assert ct.parse_messages(buf, n) == [EXPECTED_EVENTS[name]]
    assert ct.parse_messages(memoryview(buf), n) == [EXPECTED_EVENTS[name]]


def test_is_nat_matches_kernel_view() -> None:
    assert EXPECTED_EVENTS["tcp_snat_new"].flow.is_nat
    for name in ("tcp_new", "udp_new_nomark", "icmp_new", "tcp6_zone_new", "icmp6_new"):
        assert not EXPECTED_EVENTS[name].flow.is_nat, name


def test_concatenated_events_decode_in_order() -> None:
    names = sorted(EXPECTED_EVENTS)
    buf = b"".join(VEC[n] for n in names)
    assert ct.parse_messages(buf) == [EXPECTED_EVENTS[n] for n in names]


def test_mark_filter() -> None:
    names = sorted(EXPECTED_EVENTS)
    buf = b"".join(VEC[n] for n in names)
    got = ct.parse_messages(buf, mark_mask=MARK30)
    assert got == [EXPECTED_EVENTS[n] for n in names if EXPECTED_EVENTS[n].flow.mark & MARK30]
    assert "udp_new_nomark" not in [n for n in names if EXPECTED_EVENTS[n] in got]
    # The DESTROY carries the mark, so it passes the filter too.
    assert EXPECTED_EVENTS["tcp_destroy"] in got
    assert ct.parse_messages(buf, mark_mask=1 << 1) == [
        EXPECTED_EVENTS["tcp_destroy"],
        EXPECTED_EVENTS["tcp_update"],
    ]


def test_dump_chunks() -> None:
    flows, done = ct.parse_dump(VEC["dump_mark30"])
    assert not done
    assert [f.orig for f in flows] == [
        EXPECTED_EVENTS["tcp_snat_new"].flow.orig,
        EXPECTED_EVENTS["icmp6_new"].flow.orig,
        EXPECTED_EVENTS["icmp_new"].flow.orig,
        EXPECTED_EVENTS["tcp6_zone_new"].flow.orig,
    ]
    snat = flows[0]
    assert snat.reply == EXPECTED_EVENTS["tcp_snat_new"].flow.reply
    assert snat.status & F.IPS_SRC_NAT
    assert flows[3].orig.zone == 7 and flows[3].reply.zone == 7
    assert ct.parse_dump(VEC["dump_done"]) == ([], True)
    # Dump replies decode as UPDATE events (NLM_F_MULTI, no CREATE|EXCL).
    assert {ev.kind for ev in ct.parse_messages(VEC["dump_mark30"])} == {EventKind.UPDATE}
    # NLMSG_DONE ends the walk: what follows is not decoded.
    assert ct.parse_dump(VEC["dump_done"] + VEC["tcp_new"]) == ([], True)


def test_acks() -> None:
    assert ct.parse_acks(VEC["ack_ok"]) == [(0x1234, 0)]
    assert ct.parse_acks(VEC["ack_eexist"]) == [(0x1235, errno.EEXIST)]
    assert ct.parse_acks(VEC["ack_ok"] + VEC["ack_eexist"]) == [
        (0x1234, 0),
        (0x1235, errno.EEXIST),
    ]
    assert ct.parse_acks(VEC["tcp_new"]) == []
    # A positive ack among events is skipped; an error reply raises, naming errno and seq.
    assert ct.parse_messages(VEC["ack_ok"] + VEC["tcp_new"]) == [EXPECTED_EVENTS["tcp_new"]]
    with pytest.raises(ct.KernelError) as info:
        ct.parse_messages(VEC["tcp_new"] + VEC["ack_eexist"])
    assert info.value.errno == errno.EEXIST and info.value.seq == 0x1235
    assert info.value.offset == len(VEC["tcp_new"])
    assert isinstance(info.value, ct.NetlinkError)


def _strip_nested_flags(msg: bytes) -> bytes:
    """Same message with NLA_F_NESTED cleared everywhere (older kernels, other encoders)."""
    out = bytearray(msg)

    def walk(start: int, end: int, depth: int) -> None:
        a = start
        while a + 4 <= end:
            alen, atype = struct.unpack_from("=HH", out, a)
            if atype & ct.NLA_F_NESTED:
                struct.pack_into("=H", out, a + 2, atype & ~ct.NLA_F_NESTED)
                walk(a + 4, a + alen, depth + 1)
            a += (alen + 3) & ~3

    walk(20, len(out), 0)
    return bytes(out)


@pytest.mark.parametrize("name", sorted(EXPECTED_EVENTS))
def test_generic_walk_agrees_with_fast_path(name: str) -> None:
    plain = _strip_nested_flags(VEC[name])
    assert plain != VEC[name]
    assert ct.parse_messages(plain) == [EXPECTED_EVENTS[name]]


def test_unknown_attributes_and_message_types_are_skipped() -> None:
    msg = VEC["tcp_new"]
    # Append an unknown top-level attribute (type 200, 7 bytes + pad) and fix nlmsg_len.
    extra = struct.pack("=HH", 7, 200) + b"abc" + b"\0"
    grown = bytearray(msg + extra)
    struct.pack_into("=I", grown, 0, len(grown))
    assert ct.parse_messages(bytes(grown)) == [EXPECTED_EVENTS["tcp_new"]]
    # An expectation message (subsystem 2) and a NOOP are not ours.
    other = bytearray(msg)
    struct.pack_into("=H", other, 4, 2 << 8)
    noop = struct.pack("=IHHII", 16, ct.NLMSG_NOOP, 0, 0, 0)
    assert ct.parse_messages(bytes(other) + noop + msg) == [EXPECTED_EVENTS["tcp_new"]]


# --- malformed input -----------------------------------------------------------------------
def test_truncated_header_names_field_and_offset() -> None:
    with pytest.raises(ct.NetlinkError) as info:
        ct.parse_messages(VEC["tcp_new"] + b"\x10\x00")
    assert info.value.field == "nlmsghdr" and info.value.offset == len(VEC["tcp_new"])


def test_nlmsg_len_beyond_buffer() -> None:
    with pytest.raises(ct.NetlinkError) as info:
        ct.parse_messages(VEC["tcp_new"][:-4])
    assert info.value.field == "nlmsg_len" and info.value.offset == 0


def test_attribute_overrunning_message() -> None:
    bad = bytearray(VEC["tcp_new"])
    struct.pack_into("=H", bad, 20, 0x400)  # CTA_TUPLE_ORIG claims 1 KiB
    with pytest.raises(ct.NetlinkError) as info:
        ct.parse_messages(bytes(bad))
    assert info.value.field == "attribute length" and info.value.offset == 20


def test_short_scalar_and_missing_tuple() -> None:
    msg = VEC["udp_new_nomark"]
    top = attrs(msg, 20, len(msg))
    # Rebuild with CTA_MARK shortened to 2 bytes.
    body = b""
    for t, payload in top:
        if t == ct.CTA_MARK:
            payload = payload[:2]
        body += struct.pack("=HH", 4 + len(payload), t) + payload + b"\0" * (-len(payload) % 4)
    bad = bytearray(msg[:20] + body)
    struct.pack_into("=I", bad, 0, len(bad))
    with pytest.raises(ct.NetlinkError, match="CTA_MARK"):
        ct.parse_messages(bytes(bad))
    no_reply = b"".join(
        struct.pack("=HH", 4 + len(p), t) + p + b"\0" * (-len(p) % 4)
        for t, p in top
        if t != ct.CTA_TUPLE_REPLY
    )
    bad = bytearray(msg[:20] + no_reply)
    struct.pack_into("=I", bad, 0, len(bad))
    with pytest.raises(ct.NetlinkError) as info:
        ct.parse_messages(bytes(bad))
    assert info.value.field == "CTA_TUPLE_REPLY"


def test_nbytes_outside_buffer() -> None:
    with pytest.raises(ct.NetlinkError):
        ct.parse_messages(b"", 5)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        result = ct.parse_messages(data)
    except ct.NetlinkError:
        return
    assert isinstance(result, list)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(sorted(VEC)),
    st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 255)), max_size=6),
    st.integers(0, 1100),
)
def test_fuzz_mutated_vectors(name: str, flips: list[tuple[int, int]], cut: int) -> None:
    buf = bytearray(VEC[name])
    for pos, value in flips:
        if buf:
            buf[pos % len(buf)] = value
    buf = buf[: max(cut, 0)] if cut < len(buf) else buf
    for fn in (ct.parse_messages, ct.parse_acks):
        with contextlib.suppress(ct.NetlinkError):
            fn(bytes(buf))
    with contextlib.suppress(ct.NetlinkError):
        ct.parse_dump(bytes(buf), mark_mask=MARK30)


# --- building ------------------------------------------------------------------------------
SNAT_FLOW = Flow(
    tcp_key("192.168.1.10", "10.0.0.2", 33333, 80),
    tcp_key("10.0.0.2", "10.9.9.9", 80, 40001),
    status=F.IPS_ASSURED | F.IPS_SEEN_REPLY,
    timeout=120,
    mark=MARK30,
    tcp_state=F.TCP_ESTABLISHED,
)
TCP_FLOW = Flow(
    tcp_key("10.0.0.1", "10.0.0.2", 40000, 80),
    tcp_key("10.0.0.2", "10.0.0.1", 80, 40000),
    status=F.IPS_SEEN_REPLY | F.IPS_ASSURED,
    timeout=120,
    mark=MARK30,
    tcp_state=F.TCP_ESTABLISHED,
)


def test_build_create_golden_accepted_by_kernel() -> None:
    # create_tcp is the message the kernel acked (ack_ok) in the capture.
    assert ct.build_create(TCP_FLOW, 0x1234) == VEC["create_tcp"]


def test_build_golden_vectors() -> None:
    assert ct.build_create(SNAT_FLOW, 7) == VEC["create_snat"]
    assert ct.build_create(SNAT_FLOW, 8, create=False) == VEC["update_tcp"]
    assert ct.build_delete(SNAT_FLOW, 9) == VEC["delete_tcp"]
    assert ct.build_delete(SNAT_FLOW.orig, 9) == VEC["delete_tcp"]
    assert ct.build_dump_request(10, ct.AF_UNSPEC, MARK30, MARK30) == VEC["dump_request"]


def test_create_header_and_flags() -> None:
    msg = ct.build_create(TCP_FLOW, 42)
    mlen, mtype, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (mlen, mtype, seq, pid) == (len(msg), ct.CT_NEW, 42, 0)
    assert flags == ct.NLM_F_REQUEST | ct.NLM_F_ACK | ct.NLM_F_CREATE | ct.NLM_F_EXCL
    assert msg[16] == socket.AF_INET
    upd = ct.build_create(TCP_FLOW, 43, create=False)
    assert struct.unpack_from("=H", upd, 6)[0] == ct.NLM_F_REQUEST | ct.NLM_F_ACK
    assert ct.CTA_TUPLE_REPLY not in top_attrs(upd)


def test_snat_encoding() -> None:
    msg = ct.build_create(SNAT_FLOW, 1)
    top = top_attrs(msg)
    # The reply sent is the inverse of the original; NAT says where the real reply goes.
    (ev,) = ct.parse_messages(msg)
    assert ev.flow.reply == F.inverse(SNAT_FLOW.orig)
    nat = nested(top[ct.CTA_NAT_SRC])
    assert nat[ct.CTA_NAT_V4_MINIP] == nat[ct.CTA_NAT_V4_MAXIP] == V4("10.9.9.9")
    proto = nested(nat[ct.CTA_NAT_PROTO])
    assert proto[ct.CTA_PROTONAT_PORT_MIN] == proto[ct.CTA_PROTONAT_PORT_MAX] == b"\x9c\x41"
    assert ct.CTA_NAT_DST not in top
    # Updates never carry NAT (the kernel refuses it).
    assert ct.CTA_NAT_SRC not in top_attrs(ct.build_create(SNAT_FLOW, 1, create=False))


def test_dnat_v6_encoding_address_only() -> None:
    o = FlowKey(6, F.IPPROTO_TCP, V6("fd00::5"), V6("fd00::100"), 44444, 80)
    r = FlowKey(6, F.IPPROTO_TCP, V6("fd01::20"), V6("fd00::5"), 80, 44444)
    top = top_attrs(ct.build_create(Flow(o, r, timeout=10), 1))
    assert ct.CTA_NAT_SRC not in top
    nat = nested(top[ct.CTA_NAT_DST])
    assert nat[ct.CTA_NAT_V6_MINIP] == nat[ct.CTA_NAT_V6_MAXIP] == V6("fd01::20")
    assert ct.CTA_NAT_PROTO not in nat  # same port: no port mapping


def test_no_nat_attrs_without_nat() -> None:
    top = top_attrs(ct.build_create(TCP_FLOW, 1))
    assert ct.CTA_NAT_SRC not in top and ct.CTA_NAT_DST not in top


def test_status_timeout_mark_and_tcp_flags() -> None:
    flow = TCP_FLOW._replace(
        status=F.IPS_SEEN_REPLY | F.IPS_ASSURED | F.IPS_SRC_NAT | F.IPS_EXPECTED | F.IPS_DYING,
        timeout=0,
        mark=0xDEADBEEF,
    )
    top = top_attrs(ct.build_create(flow, 1, default_timeout=77))
    # Only settable bits, never EXPECTED, always CONFIRMED (the kernel answers EBUSY otherwise).
    assert struct.unpack(">I", top[ct.CTA_STATUS])[0] == (F.IPS_SEEN_REPLY | F.IPS_ASSURED | F.IPS_CONFIRMED)
    assert struct.unpack(">I", top[ct.CTA_TIMEOUT])[0] == 77
    assert struct.unpack(">I", top[ct.CTA_MARK])[0] == 0xDEADBEEF
    tcp = nested(nested(top[ct.CTA_PROTOINFO])[ct.CTA_PROTOINFO_TCP])
    assert tcp[ct.CTA_PROTOINFO_TCP_STATE] == bytes([F.TCP_ESTABLISHED])
    assert tcp[ct.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL] == b"\x08\xff"
    assert tcp[ct.CTA_PROTOINFO_TCP_FLAGS_REPLY] == b"\x08\xff"
    strict = top_attrs(ct.build_create(flow, 1, be_liberal=False))
    tcp = nested(nested(strict[ct.CTA_PROTOINFO])[ct.CTA_PROTOINFO_TCP])
    assert set(tcp) == {ct.CTA_PROTOINFO_TCP_STATE}
    no_status = top_attrs(ct.build_create(flow, 1, create=False, with_status=False))
    assert ct.CTA_STATUS not in no_status and ct.CTA_MARK in no_status
    udp = FlowKey(4, F.IPPROTO_UDP, V4("10.0.0.1"), V4("10.0.0.2"), 1, 2)
    assert ct.CTA_PROTOINFO not in top_attrs(ct.build_create(Flow(udp, F.inverse(udp)), 1))


def test_zone_encoding() -> None:
    o = tcp_key("10.0.0.1", "10.0.0.2", 1, 2, zone=7)
    top = top_attrs(ct.build_create(Flow(o, F.inverse(o), timeout=5), 1))
    assert top[ct.CTA_ZONE] == b"\x00\x07"
    assert ct.CTA_TUPLE_ZONE not in nested(top[ct.CTA_TUPLE_ORIG])
    assert top_attrs(ct.build_delete(o, 1))[ct.CTA_ZONE] == b"\x00\x07"
    # Directional zone (original direction only): carried inside the tuple.
    r = F.inverse(o)._replace(zone=0)
    top = top_attrs(ct.build_create(Flow(o, r, timeout=5), 1))
    assert ct.CTA_ZONE not in top
    assert nested(top[ct.CTA_TUPLE_ORIG])[ct.CTA_TUPLE_ZONE] == b"\x00\x07"
    assert ct.CTA_TUPLE_ZONE not in nested(top[ct.CTA_TUPLE_REPLY])


def test_bad_key_rejected() -> None:
    with pytest.raises(ValueError):
        ct.build_create(Flow(FlowKey(4, 6, b"\0" * 16, b"\0" * 4, 1, 2), TCP_FLOW.reply), 1)
    with pytest.raises(ValueError):
        ct.build_delete(FlowKey(5, 6, b"\0" * 4, b"\0" * 4, 1, 2), 1)


# --- round trips ---------------------------------------------------------------------------
def _keys() -> st.SearchStrategy[FlowKey]:
    def make(fam: int, proto: int, src: bytes, dst: bytes, sport: int, dport: int, zone: int) -> FlowKey:
        if proto in (F.IPPROTO_ICMP, F.IPPROTO_ICMPV6):
            proto = F.IPPROTO_ICMP if fam == 4 else F.IPPROTO_ICMPV6
        return FlowKey(
            fam, proto, src[: 4 if fam == 4 else 16], dst[: 4 if fam == 4 else 16], sport, dport, zone
        )

    return st.builds(
        make,
        st.sampled_from([4, 6]),
        st.sampled_from([F.IPPROTO_TCP, F.IPPROTO_UDP, F.IPPROTO_ICMP, F.IPPROTO_SCTP]),
        st.binary(min_size=16, max_size=16),
        st.binary(min_size=16, max_size=16),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.sampled_from([0, 0, 1, 0xFFFF]),
    )


@settings(max_examples=300, deadline=None)
@given(
    _keys(),
    st.integers(0, 0xFFFF),
    st.integers(1, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 9),
    st.integers(0, 0xFFFFFFFF),
)
def test_roundtrip_create(
    orig: FlowKey, status: int, timeout: int, mark: int, tcp_state: int, seq: int
) -> None:
    flow = Flow(orig, F.inverse(orig), 0, status, timeout, mark, tcp_state)
    msg = ct.build_create(flow, seq)
    assert struct.unpack_from("=I", msg)[0] == len(msg) and len(msg) % 4 == 0
    (ev,) = ct.parse_messages(msg)
    assert ev.kind == EventKind.NEW
    got = ev.flow
    assert got.orig == orig and got.reply == F.inverse(orig)
    assert got.status == (status & F.IPS_SETTABLE & ~F.IPS_EXPECTED) | F.IPS_CONFIRMED
    assert (got.timeout, got.mark) == (timeout, mark)
    assert got.tcp_state == (tcp_state if orig.proto == F.IPPROTO_TCP else 0)
    assert ct.parse_acks(msg) == []


@settings(max_examples=200, deadline=None)
@given(_keys(), _keys())
def test_nat_attrs_describe_the_reply(orig: FlowKey, other: FlowKey) -> None:
    # Any reply of the same family/proto: the NAT attributes carry exactly its addresses.
    reply = other._replace(family=orig.family, proto=orig.proto, zone=orig.zone)
    if len(reply.src) != len(orig.src):
        return
    flow = Flow(orig, reply, timeout=1)
    top = top_attrs(ct.build_create(flow, 1))
    inv = F.inverse(orig)
    icmp = orig.proto in (F.IPPROTO_ICMP, F.IPPROTO_ICMPV6)
    minip = ct.CTA_NAT_V4_MINIP if orig.family == 4 else ct.CTA_NAT_V6_MINIP
    snat = reply.dst != inv.dst or (reply.sport != inv.sport if icmp else reply.dport != inv.dport)
    assert (ct.CTA_NAT_SRC in top) == snat
    if snat:
        assert nested(top[ct.CTA_NAT_SRC])[minip] == reply.dst
    dnat = reply.src != inv.src or (not icmp and reply.sport != inv.sport)
    assert (ct.CTA_NAT_DST in top) == dnat
    if dnat:
        assert nested(top[ct.CTA_NAT_DST])[minip] == reply.src


def test_parse_ack1_and_with_ack() -> None:
    assert ct.parse_ack1(VEC["ack_ok"], len(VEC["ack_ok"])) == (0x1234, 0)
    assert ct.parse_ack1(VEC["ack_eexist"], len(VEC["ack_eexist"])) == (0x1235, errno.EEXIST)
    both = VEC["ack_ok"] + VEC["ack_eexist"]
    assert ct.parse_ack1(both, len(both)) is None  # more than one message: use parse_acks
    assert ct.parse_ack1(VEC["tcp_new"], len(VEC["tcp_new"])) is None
    assert ct.parse_ack1(b"\0" * 8, 8) is None
    quiet = ct.build_create(TCP_FLOW, 0x1234, ack=False)
    assert struct.unpack_from("=H", quiet, 6)[0] & ct.NLM_F_ACK == 0
    assert ct.with_ack(quiet) == VEC["create_tcp"]
    quiet_del = ct.build_delete(SNAT_FLOW, 9, ack=False)
    assert ct.with_ack(quiet_del) == VEC["delete_tcp"]
    assert ct.with_ack(ct.build_create(SNAT_FLOW, 8, create=False, ack=False)) == VEC["update_tcp"]
