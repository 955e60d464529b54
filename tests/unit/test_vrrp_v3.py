"""VRRPv3 codec (RFC 5798): keepalived captures, pseudo-header checksums, scapy's VRRPv3
layer, every decode error, properties; and the receive pipeline (unicast filtering, mixed
versions, TTL/hop limit) that both versions go through."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.vrrp import VRRPv3

from invictusd.vrrp import packet, v3
from invictusd.vrrp.packet import AUTH_PASSWORD, DropReason, PacketError, checksum
from invictusd.vrrp.receive import Heard, Receiver, receive_ip4, receive_ip6
from invictusd.vrrp.v3 import AdvertisementV3, ExpectV3, decode, decode_ip, encode, validate

A4, A6 = IPv4Address, IPv6Address
Address = IPv4Address | IPv6Address

# ---- captured from keepalived 2.2.7 (Debian), version 3 -----------------------------------
# Made with tests/unit/capture_keepalived_v3_advert.py (run as root: python3 -m
# tests.unit.capture_keepalived_v3_advert): keepalived's veth0 has 10.77.0.2/24 and the
# link-local fe80::2, its peer 10.77.0.3 and fe80::3; four `version 3` instances without
# authentication (see the script for the keepalived.conf). One line per instance and
# priority; priority 0 is what keepalived sent on SIGTERM. TTL/hop limit was 255 in all of
# them (the IPv6 unicast instance with `unicast_ttl 255`; without it keepalived sent hop
# limit 64, which RFC 5798 7.1 says to drop).
# (source, destination, VRRP message, the advertisement it holds)
KEEPALIVED: list[tuple[str, str, str, AdvertisementV3]] = [
    ("10.77.0.2", "224.0.0.18", "313364010064753b0a4d0001",
     AdvertisementV3(51, 100, (A4("10.77.0.1"),), 100)),
    ("10.77.0.2", "224.0.0.18", "313300010064d93b0a4d0001",
     AdvertisementV3(51, 0, (A4("10.77.0.1"),), 100)),
    ("fe80::2", "ff02::12", "3134640100326efffd770000000000000000000000000001",
     AdvertisementV3(52, 100, (A6("fd77::1"),), 50)),
    ("fe80::2", "ff02::12", "313400010032d2fffd770000000000000000000000000001",
     AdvertisementV3(52, 0, (A6("fd77::1"),), 50)),
    ("10.77.0.2", "10.77.0.3", "3135c801000ae74b0a4d000b",
     AdvertisementV3(53, 200, (A4("10.77.0.11"),), 10)),
    ("10.77.0.2", "10.77.0.3", "31350001000aaf4c0a4d000b",
     AdvertisementV3(53, 0, (A4("10.77.0.11"),), 10)),
    ("fe80::2", "fe80::3", "3136fe010019d596fd770000000000000000000000000011",
     AdvertisementV3(54, 254, (A6("fd77::11"),), 25)),
    ("fe80::2", "fe80::3", "313600010019d397fd770000000000000000000000000011",
     AdvertisementV3(54, 0, (A6("fd77::11"),), 25)),
]
KA_IDS = [f"{d}-vrid{a.vrid}-prio{a.priority}" for _, d, _, a in KEEPALIVED]


@pytest.mark.parametrize(("src", "dst", "hexstr", "adv"), KEEPALIVED, ids=KA_IDS)
def test_keepalived_capture_decodes(src: str, dst: str, hexstr: str, adv: AdvertisementV3) -> None:
    assert decode(bytes.fromhex(hexstr), ip_address(src), ip_address(dst)) == adv


@pytest.mark.parametrize(("src", "dst", "hexstr", "adv"), KEEPALIVED, ids=KA_IDS)
def test_keepalived_capture_reencodes_byte_identical(
    src: str, dst: str, hexstr: str, adv: AdvertisementV3
) -> None:
    assert encode(adv, ip_address(src), ip_address(dst)).hex() == hexstr


def test_keepalived_unicast_checksum_uses_the_real_destination() -> None:
    """keepalived >= 1.3.6 puts the unicast peer, not 224.0.0.18, in the pseudo-header
    (keepalived issue #642; older ones need `old_unicast_checksum`)."""
    src, dst, hexstr, _ = KEEPALIVED[4]
    msg = bytes.fromhex(hexstr)
    decode(msg, A4(src), A4(dst))
    with pytest.raises(PacketError) as info:
        decode(msg, A4(src), v3.GROUP4)
    assert info.value.reason is DropReason.CHECKSUM


def test_keepalived_ipv4_checksum_covers_the_pseudo_header() -> None:
    """Unlike VRRPv2, the IPv4 checksum of VRRPv3 includes the pseudo-header (keepalived
    2.2.7 and RFC 5798 5.2.8; wireshark's default)."""
    msg = bytes.fromhex(KEEPALIVED[0][2])
    assert checksum(msg) != 0
    assert checksum(v3.pseudo_header(A4("10.77.0.2"), v3.GROUP4, len(msg)) + msg) == 0


def test_keepalived_capture_passes_the_receive_checks() -> None:
    src, dst, hexstr, _ = KEEPALIVED[0]
    msg = bytes.fromhex(hexstr)
    source, destination, ttl, adv = decode_ip(_ip4(A4(src), A4(dst), msg))
    assert (source, destination, ttl) == (A4(src), A4(dst), 255)
    validate(ttl, adv, ExpectV3(51, frozenset({A4("10.77.0.1")})))


# ---- a hand-checked vector ---------------------------------------------------------------
# Pseudo-header 0a00 0002 e000 0012 0070 000c (10.0.0.2 -> 224.0.0.18, protocol 112, length
# 12), message 3101 6401 0064 [0000] 0a00 0001: the words sum to 0x1_89f7, folded 0x89f8,
# complemented 0x7607.


def test_hand_checked_checksum() -> None:
    pseudo = v3.pseudo_header(A4("10.0.0.2"), A4("224.0.0.18"), 12)
    assert pseudo.hex() == "0a000002e00000120070000c"
    msg = encode(AdvertisementV3(1, 100, (A4("10.0.0.1"),), 100), A4("10.0.0.2"), v3.GROUP4)
    words = sum(struct.unpack("!6H", pseudo)) + sum(struct.unpack("!6H", msg[:6] + b"\0\0" + msg[8:]))
    folded = (words & 0xFFFF) + (words >> 16)
    assert msg[6:8] == struct.pack("!H", ~folded & 0xFFFF)
    assert msg.hex() == "31016401006476070a000001"


def test_ipv6_pseudo_header_layout() -> None:
    # RFC 8200 8.1: source, destination, 32-bit length, 3 zero bytes, next header.
    p = v3.pseudo_header(A6("fe80::2"), v3.GROUP6, 24)
    assert len(p) == 40
    assert p[:16] == A6("fe80::2").packed and p[16:32] == v3.GROUP6.packed
    assert p[32:].hex() == "0000001800000070"


def test_pseudo_header_refuses_mixed_families() -> None:
    with pytest.raises(ValueError):
        v3.pseudo_header(A4("10.0.0.1"), v3.GROUP6, 12)


def test_reserved_bits_are_kept_so_reencoding_is_identical() -> None:
    src, dst = A4("10.0.0.2"), v3.GROUP4
    adv = AdvertisementV3(9, 100, (A4("10.0.0.1"),), 5, reserved=0xA)
    msg = encode(adv, src, dst)
    assert msg[4] >> 4 == 0xA and struct.unpack("!H", msg[4:6])[0] & 0xFFF == 5
    assert decode(msg, src, dst) == adv
    assert adv.interval == 0.05


def test_interval_is_centiseconds() -> None:
    for cs, seconds in ((1, 0.01), (5, 0.05), (10, 0.1), (100, 1.0), (4095, 40.95)):
        adv = AdvertisementV3(1, 1, (), cs)
        msg = encode(adv, A4("10.0.0.2"), v3.GROUP4)
        assert struct.unpack("!H", msg[4:6])[0] == cs
        assert decode(msg, A4("10.0.0.2"), v3.GROUP4).interval == seconds


# ---- decode errors ---------------------------------------------------------------------

SRC4, DST4 = A4("10.77.0.2"), v3.GROUP4
SRC6, DST6 = A6("fe80::2"), v3.GROUP6
GOOD4 = bytes.fromhex(KEEPALIVED[0][2])
GOOD6 = bytes.fromhex(KEEPALIVED[2][2])


def _refix(msg: bytes, src: Address = SRC4, dst: Address = DST4) -> bytes:
    """Recompute the checksum (so a test reaches the checks after it)."""
    body = msg[:6] + b"\0\0" + msg[8:]
    return msg[:6] + struct.pack("!H", checksum(v3.pseudo_header(src, dst, len(msg)) + body)) + (
        msg[8:])


def _reason(data: bytes, src: Address = SRC4, dst: Address = DST4) -> PacketError:
    with pytest.raises(PacketError) as info:
        decode(data, src, dst)
    return info.value


def test_empty_is_truncated() -> None:
    assert _reason(b"").reason is DropReason.TRUNCATED


@pytest.mark.parametrize("n", [1, 4, 7])
def test_short_header_is_truncated(n: int) -> None:
    assert _reason(GOOD4[:n]).reason is DropReason.TRUNCATED


def test_vrrpv2_advert_is_a_version_drop_that_says_so() -> None:
    v2 = packet.encode(packet.Advertisement(51, 100, (A4("10.77.0.1"),), 1, AUTH_PASSWORD, b"pw"))
    err = _reason(v2)
    assert err.reason is DropReason.VERSION
    assert "offset 0" in err.detail and "version 2" in err.detail and "`version`" in err.detail


def test_and_the_v2_decoder_refuses_v3_as_version_not_truncated() -> None:
    # A one-address VRRPv3 advert is 12 bytes, shorter than any VRRPv2 one.
    with pytest.raises(PacketError) as info:
        packet.decode(GOOD4)
    assert info.value.reason is DropReason.VERSION
    assert "version 3" in info.value.detail


@pytest.mark.parametrize("version", [0, 1, 2, 4, 15])
def test_version(version: int) -> None:
    assert _reason(_refix(bytes([(version << 4) | 1]) + GOOD4[1:])).reason is DropReason.VERSION


@pytest.mark.parametrize("kind", [0, 2, 15])
def test_type(kind: int) -> None:
    err = _reason(_refix(bytes([0x30 | kind]) + GOOD4[1:]))
    assert err.reason is DropReason.TYPE and "offset 0" in err.detail


def test_length_counts_addresses_of_the_packet_family() -> None:
    two = _refix(GOOD4[:3] + b"\x02" + GOOD4[4:])  # says 2 addresses, carries 1
    err = _reason(two)
    assert err.reason is DropReason.LENGTH and "offset 3" in err.detail
    # The IPv4 message read as IPv6: one address needs 16 bytes, not 4.
    err6 = _reason(GOOD4, SRC6, DST6)
    assert err6.reason is DropReason.LENGTH and "IPv6" in err6.detail


def test_checksum_covers_the_pseudo_header() -> None:
    assert _reason(GOOD4, A4("10.77.0.3"), DST4).reason is DropReason.CHECKSUM
    assert _reason(GOOD4, SRC4, A4("224.0.0.19")).reason is DropReason.CHECKSUM
    assert _reason(GOOD6, A6("fe80::3"), DST6).reason is DropReason.CHECKSUM
    err = _reason(GOOD4[:6] + b"\0\0" + GOOD4[8:])
    assert err.reason is DropReason.CHECKSUM and "offset 6" in err.detail


def test_zero_interval_is_refused() -> None:
    zero = _refix(GOOD4[:4] + b"\x00\x00" + GOOD4[6:])
    err = _reason(zero)
    assert err.reason is DropReason.INTERVAL and "offset 4" in err.detail
    # ...even with reserved bits set around it.
    assert _reason(_refix(GOOD4[:4] + b"\xf0\x00" + GOOD4[6:])).reason is DropReason.INTERVAL


def test_trailing_padding_is_ignored() -> None:
    assert decode(GOOD4 + b"\0" * 34, SRC4, DST4) == decode(GOOD4, SRC4, DST4)
    assert decode(GOOD6 + b"\xaa", SRC6, DST6) == decode(GOOD6, SRC6, DST6)


def test_zero_addresses_decode() -> None:
    msg = encode(AdvertisementV3(9, 100, (), 10), SRC6, DST6)
    assert len(msg) == 8
    assert decode(msg, SRC6, DST6) == AdvertisementV3(9, 100, (), 10)


def test_decode_ip_reads_source_destination_and_ttl() -> None:
    src, dst, ttl, adv = decode_ip(_ip4(SRC4, DST4, GOOD4, ttl=64))
    assert (src, dst, ttl) == (SRC4, DST4, 64)
    assert adv == KEEPALIVED[0][3]
    with pytest.raises(PacketError) as info:
        decode_ip(_ip4(SRC4, DST4, GOOD4, proto=17))
    assert info.value.reason is DropReason.TYPE


# ---- encode refuses what cannot go on the wire -------------------------------------------


@pytest.mark.parametrize(
    "adv",
    [
        AdvertisementV3(0, 100, ()),
        AdvertisementV3(256, 100, ()),
        AdvertisementV3(1, -1, ()),
        AdvertisementV3(1, 256, ()),
        AdvertisementV3(1, 100, (), 0),
        AdvertisementV3(1, 100, (), 4096),
        AdvertisementV3(1, 100, (), 10, reserved=16),
        AdvertisementV3(1, 100, (A6("fd00::1"),)),  # IPv6 address in an IPv4 packet
        AdvertisementV3(1, 100, tuple(A4(i) for i in range(256))),
    ],
)
def test_encode_rejects(adv: AdvertisementV3) -> None:
    with pytest.raises(ValueError):
        encode(adv, SRC4, DST4)


# ---- validate ----------------------------------------------------------------------------

EXPECT = ExpectV3(51, frozenset({A4("10.77.0.1")}))
ADV = AdvertisementV3(51, 100, (A4("10.77.0.1"),), 10)


def _vreason(ttl: int, adv: AdvertisementV3, expect: ExpectV3 = EXPECT) -> DropReason:
    with pytest.raises(PacketError) as info:
        validate(ttl, adv, expect)
    return info.value.reason


def test_validate_accepts_any_interval() -> None:
    for cs in (1, 10, 100, 4095):  # adopted by a backup, never a reason to drop
        validate(255, AdvertisementV3(51, 100, ADV.addresses, cs), EXPECT)


@pytest.mark.parametrize("ttl", [0, 1, 64, 254])
def test_validate_ttl_or_hop_limit(ttl: int) -> None:
    assert _vreason(ttl, ADV) is DropReason.TTL


def test_validate_vrid_then_addresses_and_the_owner_exception() -> None:
    assert _vreason(255, AdvertisementV3(52, 100, ADV.addresses, 10)) is DropReason.VRID
    other = (A4("10.77.0.9"),)
    assert _vreason(255, AdvertisementV3(51, 100, other, 10)) is DropReason.ADDRESSES
    assert _vreason(255, AdvertisementV3(51, 0, other, 10)) is DropReason.ADDRESSES
    validate(255, AdvertisementV3(51, 255, other, 10), EXPECT)
    assert _vreason(64, AdvertisementV3(52, 1, other, 10)) is DropReason.TTL  # TTL first


# ---- scapy's VRRPv3 layer agrees -----------------------------------------------------------


def _scapy(adv: AdvertisementV3, src: Address, dst: Address) -> bytes:
    """scapy's VRRPv3 bytes for ``adv`` (checksum computed by scapy over the pseudo-header)."""
    layer = VRRPv3(vrid=adv.vrid, priority=adv.priority, res=adv.reserved, adv=adv.interval_cs,
                   addrlist=[str(a) for a in adv.addresses])
    under = IP(src=str(src), dst=str(dst)) if src.version == 4 else IPv6(src=str(src), dst=str(dst))
    built = under / layer
    return bytes(built[VRRPv3])


SCAPY_CASES = [(A4(s) if ":" not in s else A6(s), A4(d) if ":" not in d else A6(d), a)
               for s, d, _, a in KEEPALIVED] + [
    (A4("192.0.2.2"), v3.GROUP4, AdvertisementV3(200, 254, (A4("192.0.2.1"), A4("198.51.100.7")), 5)),
    (A6("fe80::1:2"), v3.GROUP6, AdvertisementV3(7, 1, (A6("2001:db8::1"), A6("fd00::7")), 4095)),
]


@pytest.mark.parametrize(("src", "dst", "adv"), SCAPY_CASES)
def test_scapy_builds_the_same_bytes(src: Address, dst: Address, adv: AdvertisementV3) -> None:
    assert encode(adv, src, dst) == _scapy(adv, src, dst)


@pytest.mark.parametrize(("src", "dst", "adv"), SCAPY_CASES)
def test_scapy_parses_ours(src: Address, dst: Address, adv: AdvertisementV3) -> None:
    msg = encode(adv, src, dst)
    if src.version == 4:
        pkt = IP(bytes(IP(src=str(src), dst=str(dst), proto=112, ttl=255) / msg))
    else:
        pkt = IPv6(bytes(IPv6(src=str(src), dst=str(dst), nh=112, hlim=255) / msg))
    parsed = pkt[VRRPv3]
    assert (parsed.version, parsed.type, parsed.vrid, parsed.priority) == (3, 1, adv.vrid, adv.priority)
    assert (parsed.ipcount, parsed.res, parsed.adv) == (len(adv.addresses), adv.reserved,
                                                        adv.interval_cs)
    assert parsed.addrlist == [str(a) for a in adv.addresses]
    assert parsed.chksum == struct.unpack("!H", msg[6:8])[0]
    # scapy recomputes the same checksum over the pseudo-header when told to.
    parsed.chksum = None
    assert bytes(pkt[VRRPv3]) == msg


# ---- properties --------------------------------------------------------------------------

ip4s = st.builds(A4, st.integers(0, 2**32 - 1))
ip6s = st.builds(A6, st.integers(0, 2**128 - 1))
ends = st.one_of(st.tuples(ip4s, ip4s), st.tuples(ip6s, ip6s))


@st.composite
def adverts(draw: st.DrawFn) -> tuple[Address, Address, AdvertisementV3]:
    src, dst = draw(ends)
    addrs = draw(st.lists(ip4s if src.version == 4 else ip6s, max_size=12))
    adv = AdvertisementV3(
        vrid=draw(st.integers(1, 255)),
        priority=draw(st.integers(0, 255)),
        addresses=tuple(addrs),
        interval_cs=draw(st.integers(1, v3.MAX_INTERVAL)),
        reserved=draw(st.integers(0, 15)),
    )
    return src, dst, adv


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), ends)
def test_decode_any_bytes_is_advert_or_packet_error(data: bytes, pair: tuple[Address, Address]) -> None:
    src, dst = pair
    for candidate in (data, b"\x31" + data, _refix(b"\x31" + data.ljust(7, b"\0"), src, dst)):
        try:
            adv = decode(candidate, src, dst)
        except PacketError as e:
            assert isinstance(e.reason, DropReason)
            continue
        assert isinstance(adv, AdvertisementV3)
        assert all(a.version == src.version for a in adv.addresses)
        n = 8 + len(adv.addresses) * (4 if src.version == 4 else 16)
        assert encode(adv, src, dst) == candidate[:n]  # symmetric: re-encodes to the same bytes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 255), st.integers(0, 0xFFFF))
def test_decode_ip_any_bytes_is_advert_or_packet_error(data: bytes, proto: int, total: int) -> None:
    for pkt in (data, struct.pack("!BBH", 0x45, 0, total) + data):
        for p in (pkt, pkt[:9] + bytes([proto]) + pkt[10:], pkt[:9] + b"\x70" + pkt[10:]):
            try:
                src, dst, ttl, adv = decode_ip(p)
            except PacketError as e:
                assert isinstance(e.reason, DropReason)
                continue
            assert isinstance(src, A4) and isinstance(dst, A4) and 0 <= ttl <= 255
            assert isinstance(adv, AdvertisementV3)


@settings(max_examples=300, deadline=None)
@given(adverts())
def test_round_trip(case: tuple[Address, Address, AdvertisementV3]) -> None:
    src, dst, adv = case
    wire = encode(adv, src, dst)
    assert len(wire) == 8 + len(adv.addresses) * (4 if src.version == 4 else 16)
    assert checksum(v3.pseudo_header(src, dst, len(wire)) + wire) == 0
    assert decode(wire, src, dst) == adv
    assert decode(wire + b"\0" * 5, src, dst) == adv


@settings(max_examples=200, deadline=None)
@given(adverts(), st.integers(0, 2000), st.integers(0, 7))
def test_any_single_bit_flip_is_dropped(
    case: tuple[Address, Address, AdvertisementV3], byte: int, bit: int
) -> None:
    src, dst, adv = case
    wire = bytearray(encode(adv, src, dst))
    index = byte % len(wire)
    if index == 3:
        index = 2  # a smaller count shortens the summed range; not a one-bit error
    if index == 4 and bit >= 4:
        bit -= 4  # the reserved bits are ignored on receipt by design (RFC 5798 5.2.5)
    wire[index] ^= 1 << bit
    with pytest.raises(PacketError):
        decode(bytes(wire), src, dst)


# ---- the receive pipeline ------------------------------------------------------------------

OWN4, PEER4, STRANGER4 = A4("10.0.0.2"), A4("10.0.0.3"), A4("10.0.0.100")
OWN6, PEER6, STRANGER6 = A6("fe80::2"), A6("fe80::3"), A6("fe80::100")
VIP4, VIP6 = A4("10.0.0.1"), A6("fd00::1")
R3_4 = Receiver(3, OWN4, frozenset(), expect3=ExpectV3(51, frozenset({VIP4})))
R3_6 = Receiver(3, OWN6, frozenset(), expect3=ExpectV3(51, frozenset({VIP6})))
EXPECT2 = packet.Expect(51, 1, frozenset({VIP4}), AUTH_PASSWORD, b"pw")
R2 = Receiver(2, OWN4, frozenset(), expect2=EXPECT2)


def _ip4(src: A4, dst: A4, payload: bytes, ttl: int = 255, proto: int = 112) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, 20 + len(payload), 0, 0, ttl, proto, 0,
                       src.packed, dst.packed)
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:] + payload


def _v3_4(src: A4 = PEER4, dst: A4 = v3.GROUP4, prio: int = 100, cs: int = 10,
          ttl: int = 255) -> bytes:
    return _ip4(src, dst, encode(AdvertisementV3(51, prio, (VIP4,), cs), src, dst), ttl)


def _v2_4(src: A4 = PEER4, prio: int = 100) -> bytes:
    msg = packet.encode(packet.Advertisement(51, prio, (VIP4,), 1, AUTH_PASSWORD, b"pw"))
    return _ip4(src, v3.GROUP4, msg)


def _drop(fn: object, *args: object) -> DropReason:
    with pytest.raises(PacketError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.reason


def test_v3_ipv4_heard_with_the_masters_interval() -> None:
    assert receive_ip4(R3_4, _v3_4(cs=5)) == Heard(PEER4, 100, 0.05)


def test_v3_ipv6_heard_with_hop_limit_and_destination_from_recvmsg() -> None:
    msg = encode(AdvertisementV3(51, 120, (VIP6,), 10), PEER6, v3.GROUP6)
    assert receive_ip6(R3_6, msg, PEER6, v3.GROUP6, 255) == Heard(PEER6, 120, 0.1)
    assert _drop(receive_ip6, R3_6, msg, PEER6, v3.GROUP6, 64) is DropReason.TTL
    # The destination is part of the checksum: a wrong one from recvmsg fails it.
    assert _drop(receive_ip6, R3_6, msg, PEER6, A6("ff02::1"), 255) is DropReason.CHECKSUM


def test_v2_heard_without_an_interval() -> None:
    assert receive_ip4(R2, _v2_4()) == Heard(PEER4, 100, None)


def test_mixed_versions_are_version_drops_both_ways() -> None:
    assert _drop(receive_ip4, R3_4, _v2_4()) is DropReason.VERSION
    assert _drop(receive_ip4, R2, _v3_4()) is DropReason.VERSION
    # An IPv6 instance exists only under version 3.
    v2_on_6 = Receiver(2, OWN6, frozenset(), expect2=EXPECT2)
    msg = encode(AdvertisementV3(51, 100, (VIP6,), 10), PEER6, v3.GROUP6)
    assert _drop(receive_ip6, v2_on_6, msg, PEER6, v3.GROUP6, 255) is DropReason.VERSION


def test_own_adverts_are_own_packet() -> None:
    assert _drop(receive_ip4, R3_4, _v3_4(src=OWN4)) is DropReason.OWN
    assert _drop(receive_ip4, R2, _v2_4(src=OWN4)) is DropReason.OWN


def test_ttl_checked_under_both_versions() -> None:
    assert _drop(receive_ip4, R3_4, _v3_4(ttl=254)) is DropReason.TTL
    msg = packet.encode(packet.Advertisement(51, 100, (VIP4,), 1, AUTH_PASSWORD, b"pw"))
    assert _drop(receive_ip4, R2, _ip4(PEER4, v3.GROUP4, msg, ttl=1)) is DropReason.TTL


@pytest.mark.parametrize("version", [2, 3])
def test_unicast_peers_filter_the_source_before_anything_else(version: int) -> None:
    peers = frozenset({PEER4})
    r = (Receiver(2, OWN4, peers, expect2=EXPECT2) if version == 2
         else Receiver(3, OWN4, peers, expect3=ExpectV3(51, frozenset({VIP4}))))
    good = _v2_4 if version == 2 else _v3_4
    assert receive_ip4(r, good(src=PEER4)).source == PEER4
    assert _drop(receive_ip4, r, good(src=STRANGER4)) is DropReason.SOURCE
    # A stranger's packet is refused as a stranger's even when it is broken otherwise.
    assert _drop(receive_ip4, r, _ip4(STRANGER4, OWN4, b"\x00garbage", ttl=1)) is DropReason.SOURCE
    # Unicast to us (the peer's destination is our address) is what unicast peers send.
    if version == 3:
        assert receive_ip4(r, _v3_4(src=PEER4, dst=OWN4)).priority == 100
    # The TTL is still checked for a listed peer.
    bad_ttl = (_ip4(PEER4, v3.GROUP4, packet.encode(packet.Advertisement(
        51, 100, (VIP4,), 1, AUTH_PASSWORD, b"pw")), ttl=64) if version == 2
        else _v3_4(src=PEER4, dst=OWN4, ttl=64))
    assert _drop(receive_ip4, r, bad_ttl) is DropReason.TTL


def test_unicast_peers_ipv6() -> None:
    r = Receiver(3, OWN6, frozenset({PEER6}), expect3=ExpectV3(51, frozenset({VIP6})))
    msg = encode(AdvertisementV3(51, 100, (VIP6,), 10), PEER6, OWN6)
    assert receive_ip6(r, msg, PEER6, OWN6, 255).source == PEER6
    stranger = encode(AdvertisementV3(51, 100, (VIP6,), 10), STRANGER6, OWN6)
    assert _drop(receive_ip6, r, stranger, STRANGER6, OWN6, 255) is DropReason.SOURCE


def test_receiver_needs_the_expect_of_its_version() -> None:
    with pytest.raises(ValueError):
        Receiver(3, OWN4, frozenset(), expect2=EXPECT2)
    with pytest.raises(ValueError):
        Receiver(2, OWN4, frozenset())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([R2, R3_4]))
def test_receive_ip4_any_bytes_is_heard_or_packet_error(data: bytes, r: Receiver) -> None:
    for pkt in (data, _ip4(PEER4, v3.GROUP4, data), _ip4(PEER4, OWN4, b"\x31" + data)):
        try:
            heard = receive_ip4(r, pkt)
        except PacketError as e:
            assert isinstance(e.reason, DropReason)
            continue
        assert heard.source == PEER4
