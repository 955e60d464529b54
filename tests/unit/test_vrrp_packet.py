"""VRRPv2 codec: golden vectors, a keepalived capture, checksum, every receive check."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.vrrp import VRRP

from invictusd.vrrp import packet
from invictusd.vrrp.packet import (
    AUTH_NONE,
    AUTH_PASSWORD,
    Advertisement,
    DropReason,
    Expect,
    PacketError,
    checksum,
    decode,
    decode_ip,
    encode,
    validate,
)

A = IPv4Address

# ---- golden vectors ----------------------------------------------------------------------
# Hand-checked field by field and cross-checked against scapy's VRRP layer (see below); the
# checksum of the first one worked by hand: 0x2101+0x6401+0x0001+0xc0a8+0x0101 = 0x146ac,
# folded 0x46ad, complemented 0xb952.
GOLDEN: list[tuple[str, Advertisement]] = [
    (
        "210164010001b952c0a801010000000000000000",
        Advertisement(1, 100, (A("192.168.1.1"),), 1, AUTH_NONE, b""),
    ),
    (
        "2133640301011f760a0000010a0000020a0000037365637265740000",
        Advertisement(
            51, 100, (A("10.0.0.1"), A("10.0.0.2"), A("10.0.0.3")), 1, AUTH_PASSWORD, b"secret"
        ),
    ),
    (
        "21ffff01010103280a0000013132333435363738",
        Advertisement(255, 255, (A("10.0.0.1"),), 1, AUTH_PASSWORD, b"12345678"),
    ),
    (
        "210700010103c06eac1000fe7077000000000000",
        Advertisement(7, 0, (A("172.16.0.254"),), 3, AUTH_PASSWORD, b"pw"),
    ),
    (
        "21c8fe0300ffb62ec0000201c6336407cb0071c80000000000000000",
        Advertisement(
            200, 254, (A("192.0.2.1"), A("198.51.100.7"), A("203.0.113.200")), 255, AUTH_NONE, b""
        ),
    ),
]


@pytest.mark.parametrize(("hexstr", "adv"), GOLDEN)
def test_golden_encode(hexstr: str, adv: Advertisement) -> None:
    assert encode(adv).hex() == hexstr


@pytest.mark.parametrize(("hexstr", "adv"), GOLDEN)
def test_golden_decode(hexstr: str, adv: Advertisement) -> None:
    assert decode(bytes.fromhex(hexstr)) == adv


def test_golden_lengths_are_16_plus_4n() -> None:
    for hexstr, adv in GOLDEN:
        assert len(bytes.fromhex(hexstr)) == 16 + 4 * len(adv.addresses)


# ---- captured from keepalived 2.2.7 (Debian) ---------------------------------------------
# Made with tests/unit/capture_keepalived_advert.py (run as root: python3 -m
# tests.unit.capture_keepalived_advert): a namespace with veth0 = 10.77.0.2/24, keepalived
# -n -l -D with vrrp_instance virtual_router_id 51, priority 100, advert_int 1,
# authentication { auth_type PASS auth_pass secret }, virtual_ipaddress { 10.77.0.1/24 },
# tcpdump -w on veth0. The IP header said source 10.77.0.2, TTL 255, protocol 112.
KEEPALIVED_ADVERT = "21336401010133300a4d00017365637265740000"
# The last packet of the capture: keepalived's priority-0 advert on SIGTERM.
KEEPALIVED_SHUTDOWN = "21330001010197300a4d00017365637265740000"
KEEPALIVED_SOURCE = A("10.77.0.2")


def _ip_header(source: IPv4Address, payload_len: int, ttl: int = 255, proto: int = 112) -> bytes:
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0xC0, 20 + payload_len, 0, 0, ttl, proto, 0, source.packed, A("224.0.0.18").packed,
    )
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:]


def test_keepalived_capture_decodes() -> None:
    adv = decode(bytes.fromhex(KEEPALIVED_ADVERT))
    assert adv == Advertisement(
        vrid=51,
        priority=100,
        addresses=(A("10.77.0.1"),),
        advert_interval=1,
        auth_type=AUTH_PASSWORD,
        auth_data=b"secret",
    )


def test_keepalived_capture_reencodes_byte_identical() -> None:
    adv = Advertisement(51, 100, (A("10.77.0.1"),), 1, AUTH_PASSWORD, b"secret")
    assert encode(adv) == bytes.fromhex(KEEPALIVED_ADVERT)
    zero = Advertisement(51, 0, (A("10.77.0.1"),), 1, AUTH_PASSWORD, b"secret")
    assert encode(zero) == bytes.fromhex(KEEPALIVED_SHUTDOWN)
    assert decode(bytes.fromhex(KEEPALIVED_SHUTDOWN)) == zero


def test_keepalived_capture_passes_receive_checks() -> None:
    msg = bytes.fromhex(KEEPALIVED_ADVERT)
    source, ttl, adv = decode_ip(_ip_header(KEEPALIVED_SOURCE, len(msg)) + msg)
    assert (source, ttl) == (KEEPALIVED_SOURCE, 255)
    validate(ttl, adv, Expect(51, 1, frozenset({A("10.77.0.1")}), AUTH_PASSWORD, b"secret"))


# ---- checksum ----------------------------------------------------------------------------


def test_checksum_rfc1071_example() -> None:
    # RFC 1071 section 3: the one's complement sum of 0001 f203 f4f5 f6f7 is ddf2.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert checksum(data) == 0xFFFF - 0xDDF2 == 0x220D
    # Appending the checksum makes the whole sum verify to zero.
    assert checksum(data + struct.pack("!H", checksum(data))) == 0


def test_checksum_odd_length_pads_with_zero_byte() -> None:
    assert checksum(b"\x01") == checksum(b"\x01\x00") == 0xFEFF
    assert checksum(bytes.fromhex("0001f203f4f5f6")) == checksum(bytes.fromhex("0001f203f4f5f600"))
    assert checksum(bytes.fromhex("0001f203f4f5f6")) == 0xFFFF - 0xDCFB


def test_checksum_edge_values() -> None:
    assert checksum(b"") == 0xFFFF
    assert checksum(b"\0\0") == 0xFFFF
    assert checksum(b"\xff\xff") == 0x0000
    # carries fold more than once: 0xffff * 3 = 0x2fffd -> 0xffff + 0x2 -> 0x10001 -> 0x0002
    assert checksum(b"\xff\xff" * 3) == 0
    assert checksum(b"\x80\x00\x80\x00") == 0xFFFE


def test_checksum_does_not_mutate_a_bytearray() -> None:
    buf = bytearray(b"\x01\x02\x03")
    # a recv_into buffer is a bytearray, whatever the annotation says
    assert checksum(buf) == checksum(b"\x01\x02\x03\x00")  # type: ignore[arg-type]
    assert buf == bytearray(b"\x01\x02\x03")


# ---- decode: structural checks -----------------------------------------------------------

GOOD = bytes.fromhex(KEEPALIVED_ADVERT)


def _refix(msg: bytes) -> bytes:
    """Recompute the checksum over ``msg`` (so a test reaches the check after it)."""
    body = msg[:6] + b"\0\0" + msg[8:]
    return msg[:6] + struct.pack("!H", checksum(body)) + msg[8:]


def _reason(data: bytes) -> DropReason:
    with pytest.raises(PacketError) as info:
        decode(data)
    return info.value.reason


@pytest.mark.parametrize("n", [0, 1, 8, 15])
def test_truncated(n: int) -> None:
    assert _reason(GOOD[:n]) is DropReason.TRUNCATED


def test_version() -> None:
    for version in (0, 1, 3, 15):
        assert _reason(_refix(bytes([(version << 4) | 1]) + GOOD[1:])) is DropReason.VERSION


def test_type() -> None:
    for kind in (0, 2, 15):
        assert _reason(_refix(bytes([0x20 | kind]) + GOOD[1:])) is DropReason.TYPE


def test_length_count_larger_than_packet() -> None:
    msg = _refix(GOOD[:3] + b"\x02" + GOOD[4:])  # says 2 addresses, carries 1
    with pytest.raises(PacketError) as info:
        decode(msg)
    err = info.value
    assert err.reason is DropReason.LENGTH
    assert "offset 3" in err.detail


def test_length_missing_auth_bytes() -> None:
    # 16 bytes (enough for the minimum) but one address leaves only 4 of the 8 auth bytes.
    assert _reason(GOOD[:16]) is DropReason.LENGTH


def test_checksum_failure() -> None:
    bad = GOOD[:6] + b"\x00\x00" + GOOD[8:]
    with pytest.raises(PacketError) as info:
        decode(bad)
    err = info.value
    assert err.reason is DropReason.CHECKSUM
    assert "offset 6" in err.detail
    flipped = GOOD[:-1] + bytes([GOOD[-1] ^ 0x01])
    assert _reason(flipped) is DropReason.CHECKSUM


def test_trailing_ethernet_padding_ignored() -> None:
    # A 20-byte message in a minimum-size frame: 6 bytes of padding after it, not summed.
    assert decode(GOOD + b"\0" * 6) == decode(GOOD)
    assert decode(GOOD + b"\xaa\xbb\xcc") == decode(GOOD)


def test_zero_address_count_decodes() -> None:
    msg = encode(Advertisement(9, 100, (), 1, AUTH_NONE, b""))
    assert len(msg) == 16
    assert decode(msg) == Advertisement(9, 100, (), 1, AUTH_NONE, b"")


def test_packet_error_message_names_reason() -> None:
    with pytest.raises(PacketError) as info:
        decode(b"\x21")
    err = info.value
    assert str(err).startswith("truncated: ")
    assert isinstance(err, ValueError)


# ---- decode_ip ---------------------------------------------------------------------------


def test_decode_ip_returns_source_ttl_and_advert() -> None:
    src, ttl, adv = decode_ip(_ip_header(A("10.0.0.2"), len(GOOD), ttl=254) + GOOD)
    assert (src, ttl) == (A("10.0.0.2"), 254)
    assert adv == decode(GOOD)


def test_decode_ip_with_options_and_padding() -> None:
    # IHL 6 (4 bytes of options) and Ethernet padding beyond the IP total length.
    head = bytearray(_ip_header(A("10.0.0.9"), len(GOOD) + 4))
    head[0] = 0x46
    pkt = bytes(head) + b"\x01\x01\x01\x00" + GOOD + b"\xee" * 10
    src, ttl, adv = decode_ip(pkt)
    assert (src, ttl, adv) == (A("10.0.0.9"), 255, decode(GOOD))


@pytest.mark.parametrize(
    "pkt",
    [
        b"",
        b"\x45" * 19,
        b"\x65" + b"\0" * 39,  # IPv6 version nibble
        b"\x44" + b"\0" * 39,  # IHL 4 words < 20 bytes
        b"\x4f" + b"\0" * 39,  # IHL 60 bytes > packet
    ],
)
def test_decode_ip_truncated_header(pkt: bytes) -> None:
    with pytest.raises(PacketError) as info:
        decode_ip(pkt)
    assert info.value.reason is DropReason.TRUNCATED


def test_decode_ip_wrong_protocol() -> None:
    with pytest.raises(PacketError) as info:
        decode_ip(_ip_header(A("10.0.0.2"), len(GOOD), proto=17) + GOOD)
    assert info.value.reason is DropReason.TYPE


def test_decode_ip_total_length_cuts_padding_before_vrrp_length_check() -> None:
    # Total length says the VRRP message is 16 bytes: the padding must not fill it up.
    pkt = _ip_header(A("10.0.0.2"), 16) + GOOD
    with pytest.raises(PacketError) as info:
        decode_ip(pkt)
    assert info.value.reason is DropReason.LENGTH


def test_decode_ip_propagates_vrrp_errors() -> None:
    bad = GOOD[:6] + b"\0\0" + GOOD[8:]
    with pytest.raises(PacketError) as info:
        decode_ip(_ip_header(A("10.0.0.2"), len(bad)) + bad)
    assert info.value.reason is DropReason.CHECKSUM


# ---- validate: the checks that need configuration ----------------------------------------

EXPECT = Expect(
    vrid=51,
    advert_interval=1,
    addresses=frozenset({A("10.77.0.1")}),
    auth_type=AUTH_PASSWORD,
    password=b"secret",
)
ADV = Advertisement(51, 100, (A("10.77.0.1"),), 1, AUTH_PASSWORD, b"secret")


def _vreason(ttl: int, adv: Advertisement, expect: Expect = EXPECT) -> DropReason:
    with pytest.raises(PacketError) as info:
        validate(ttl, adv, expect)
    return info.value.reason


def test_validate_accepts_matching_advert() -> None:
    validate(255, ADV, EXPECT)  # no PacketError


@pytest.mark.parametrize("ttl", [0, 1, 64, 254])
def test_validate_ttl(ttl: int) -> None:
    assert _vreason(ttl, ADV) is DropReason.TTL


def test_validate_ttl_checked_first() -> None:
    wrong_everything = Advertisement(52, 100, (A("1.2.3.4"),), 2, AUTH_NONE, b"")
    assert _vreason(64, wrong_everything) is DropReason.TTL


def test_validate_vrid() -> None:
    assert _vreason(255, Advertisement(52, 100, ADV.addresses, 1, AUTH_PASSWORD, b"secret")) is (
        DropReason.VRID
    )


def test_validate_auth_type() -> None:
    assert _vreason(255, Advertisement(51, 100, ADV.addresses, 1, AUTH_NONE, b"")) is (
        DropReason.AUTH_TYPE
    )
    # Type 2 (IP authentication header) is not supported either.
    assert _vreason(255, Advertisement(51, 100, ADV.addresses, 1, 2, b"")) is DropReason.AUTH_TYPE
    none = Expect(51, 1, EXPECT.addresses, AUTH_NONE, b"")
    assert _vreason(255, ADV, none) is DropReason.AUTH_TYPE


@pytest.mark.parametrize(
    "password", [b"", b"secre", b"secret1", b"Secret", b"secre\0t", b"12345678"]
)
def test_validate_auth_fail(password: bytes) -> None:
    adv = Advertisement(51, 100, ADV.addresses, 1, AUTH_PASSWORD, password)
    assert _vreason(255, adv) is DropReason.AUTH_FAIL


def test_validate_auth_fail_on_the_wire() -> None:
    wire = encode(Advertisement(51, 100, ADV.addresses, 1, AUTH_PASSWORD, b"secreT"))
    with pytest.raises(PacketError) as info:
        validate(255, decode(wire), EXPECT)
    assert info.value.reason is DropReason.AUTH_FAIL


def test_validate_auth_none_ignores_auth_data() -> None:
    none = Expect(51, 1, EXPECT.addresses, AUTH_NONE, b"")
    validate(255, Advertisement(51, 100, ADV.addresses, 1, AUTH_NONE, b"junk"), none)


def test_validate_full_eight_byte_password() -> None:
    exp = Expect(51, 1, EXPECT.addresses, AUTH_PASSWORD, b"12345678")
    wire = encode(Advertisement(51, 100, ADV.addresses, 1, AUTH_PASSWORD, b"12345678"))
    validate(255, decode(wire), exp)


@pytest.mark.parametrize("interval", [2, 3, 255])
def test_validate_interval(interval: int) -> None:
    adv = Advertisement(51, 100, ADV.addresses, interval, AUTH_PASSWORD, b"secret")
    assert _vreason(255, adv) is DropReason.INTERVAL


@pytest.mark.parametrize(
    "addresses",
    [
        (),
        (A("10.77.0.2"),),
        (A("10.77.0.1"), A("10.77.0.3")),
    ],
)
def test_validate_addresses(addresses: tuple[IPv4Address, ...]) -> None:
    for priority in (0, 1, 100, 254):
        adv = Advertisement(51, priority, addresses, 1, AUTH_PASSWORD, b"secret")
        assert _vreason(255, adv) is DropReason.ADDRESSES


def test_validate_addresses_order_does_not_matter() -> None:
    exp = Expect(51, 1, frozenset({A("10.0.0.1"), A("10.0.0.2")}), AUTH_PASSWORD, b"secret")
    adv = Advertisement(51, 100, (A("10.0.0.2"), A("10.0.0.1")), 1, AUTH_PASSWORD, b"secret")
    validate(255, adv, exp)


def test_validate_owner_address_mismatch_accepted() -> None:
    adv = Advertisement(51, 255, (A("10.77.0.99"),), 1, AUTH_PASSWORD, b"secret")
    validate(255, adv, EXPECT)  # no PacketError
    # ...but the owner still has to get everything else right.
    adv_bad = Advertisement(51, 255, (A("10.77.0.99"),), 2, AUTH_PASSWORD, b"secret")
    assert _vreason(255, adv_bad) is DropReason.INTERVAL


def test_validate_check_order_after_ttl() -> None:
    # VRID before auth type before password before interval before addresses.
    assert _vreason(255, Advertisement(9, 1, (), 9, AUTH_NONE, b"")) is DropReason.VRID
    assert _vreason(255, Advertisement(51, 1, (), 9, AUTH_NONE, b"")) is DropReason.AUTH_TYPE
    assert _vreason(255, Advertisement(51, 1, (), 9, 1, b"x")) is DropReason.AUTH_FAIL
    assert _vreason(255, Advertisement(51, 1, (), 9, 1, b"secret")) is DropReason.INTERVAL
    assert _vreason(255, Advertisement(51, 1, (), 1, 1, b"secret")) is DropReason.ADDRESSES


# ---- encode refuses what cannot go on the wire -------------------------------------------


@pytest.mark.parametrize(
    "adv",
    [
        Advertisement(0, 100, (A("10.0.0.1"),)),
        Advertisement(256, 100, (A("10.0.0.1"),)),
        Advertisement(1, -1, (A("10.0.0.1"),)),
        Advertisement(1, 256, (A("10.0.0.1"),)),
        Advertisement(1, 100, (A("10.0.0.1"),), advert_interval=0),
        Advertisement(1, 100, (A("10.0.0.1"),), advert_interval=256),
        Advertisement(1, 100, (A("10.0.0.1"),), auth_data=b"123456789"),
        Advertisement(1, 100, tuple(A(i) for i in range(256))),
    ],
)
def test_encode_rejects(adv: Advertisement) -> None:
    with pytest.raises(ValueError):
        encode(adv)


def test_encode_auth_none_sends_zero_auth_data() -> None:
    msg = encode(Advertisement(1, 100, (A("10.0.0.1"),), 1, AUTH_NONE, b"ignored"))
    assert msg[-8:] == b"\0" * 8


def test_encode_255_addresses() -> None:
    addrs = tuple(A(0x0A000000 + i) for i in range(255))
    msg = encode(Advertisement(1, 100, addrs))
    assert len(msg) == 16 + 4 * 255
    assert decode(msg).addresses == addrs


# ---- properties --------------------------------------------------------------------------

addresses = st.builds(A, st.integers(0, 2**32 - 1))
passwords = st.binary(min_size=1, max_size=8).filter(lambda b: not b.endswith(b"\0"))


@st.composite
def adverts(draw: st.DrawFn) -> Advertisement:
    auth_type = draw(st.sampled_from([AUTH_NONE, AUTH_PASSWORD]))
    return Advertisement(
        vrid=draw(st.integers(1, 255)),
        priority=draw(st.integers(0, 255)),
        addresses=tuple(draw(st.lists(addresses, max_size=20))),
        advert_interval=draw(st.integers(1, 255)),
        auth_type=auth_type,
        auth_data=draw(passwords) if auth_type == AUTH_PASSWORD else b"",
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_decode_any_bytes_is_advert_or_packet_error(data: bytes) -> None:
    try:
        adv = decode(data)
    except PacketError as e:
        assert isinstance(e.reason, DropReason)
        return
    n = len(adv.addresses)
    assert (data[0], data[1], data[2], data[3]) == (0x21, adv.vrid, adv.priority, n)
    assert (data[4], data[5]) == (adv.auth_type, adv.advert_interval)
    assert checksum(data[: 16 + 4 * n]) == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=60))
def test_decode_mutated_valid_header_is_advert_or_packet_error(tail: bytes) -> None:
    # Start from a valid version/type byte so the fuzzer reaches the deeper checks too.
    data = b"\x21" + tail
    for candidate in (data, _refix(data)):
        try:
            adv = decode(candidate)
        except PacketError as e:
            assert isinstance(e.reason, DropReason)
        else:
            assert adv.vrid == candidate[1]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF))
def test_decode_ip_any_bytes_is_advert_or_packet_error(
    data: bytes, first: int, proto: int, total: int
) -> None:
    for pkt in (data, bytes([first]) + data, struct.pack("!BBH", 0x45, 0, total) + data):
        for p in (pkt, pkt[:9] + bytes([proto]) + pkt[10:], pkt[:9] + b"\x70" + pkt[10:]):
            try:
                src, ttl, adv = decode_ip(p)
            except PacketError as e:
                assert isinstance(e.reason, DropReason)
                continue
            assert isinstance(src, IPv4Address)
            assert 0 <= ttl <= 255
            assert isinstance(adv, Advertisement)


@settings(max_examples=300, deadline=None)
@given(adverts())
def test_round_trip(adv: Advertisement) -> None:
    wire = encode(adv)
    assert len(wire) == 16 + 4 * len(adv.addresses)
    assert checksum(wire) == 0
    assert decode(wire) == adv
    assert decode(wire + b"\0" * 7) == adv


@settings(max_examples=100, deadline=None)
@given(adverts(), st.integers(0, 2000), st.integers(0, 7))
def test_any_single_bit_flip_is_dropped(adv: Advertisement, byte: int, bit: int) -> None:
    wire = bytearray(encode(adv))
    index = byte % len(wire)
    if index == 3:
        index = 2  # a smaller count shortens the summed range; that is not a one-bit error
    wire[index] ^= 1 << bit
    # One flipped bit changes a 16-bit word by 2**k, never a multiple of 0xffff, so the
    # one's complement sum always catches it (unless version or type catch it first).
    with pytest.raises(PacketError):
        decode(bytes(wire))


# ---- scapy cross-check -------------------------------------------------------------------

def _scapy_bytes(adv: Advertisement) -> bytes:
    auth = packet.pad_password(adv.auth_data) if adv.auth_type == AUTH_PASSWORD else b"\0" * 8
    pkt = VRRP(
        vrid=adv.vrid,
        priority=adv.priority,
        addrlist=[str(a) for a in adv.addresses],
        authtype=adv.auth_type,
        adv=adv.advert_interval,
        auth1=struct.unpack("!I", auth[:4])[0],
        auth2=struct.unpack("!I", auth[4:])[0],
    )
    return bytes(pkt)


SCAPY_CASES = [adv for _, adv in GOLDEN] + [
    Advertisement(51, 100, (A("10.77.0.1"),), 1, AUTH_PASSWORD, b"secret"),
    Advertisement(42, 1, (A("0.0.0.0"), A("255.255.255.255")), 10, AUTH_PASSWORD, b"\xff" * 8),
]


@pytest.mark.parametrize("adv", SCAPY_CASES)
def test_scapy_builds_the_same_bytes(adv: Advertisement) -> None:
    assert encode(adv) == _scapy_bytes(adv)


@pytest.mark.parametrize("adv", SCAPY_CASES)
def test_scapy_parses_ours(adv: Advertisement) -> None:
    wire = encode(adv)
    parsed = VRRP(wire)
    assert parsed.version == 2
    assert parsed.type == 1
    assert parsed.vrid == adv.vrid
    assert parsed.priority == adv.priority
    assert parsed.ipcount == len(adv.addresses)
    assert parsed.addrlist == [str(a) for a in adv.addresses]
    assert parsed.authtype == adv.auth_type
    assert parsed.adv == adv.advert_interval
    assert parsed.chksum == struct.unpack("!H", wire[6:8])[0]
    # scapy's own checksum of our bytes with the field cleared equals what we sent
    rebuilt = VRRP(wire)
    rebuilt.chksum = None
    assert bytes(rebuilt) == wire


def test_scapy_parses_keepalived_capture_like_us() -> None:
    parsed = VRRP(bytes.fromhex(KEEPALIVED_ADVERT))
    ours = decode(bytes.fromhex(KEEPALIVED_ADVERT))
    assert (parsed.vrid, parsed.priority, parsed.adv) == (ours.vrid, ours.priority, 1)
    assert parsed.addrlist == ["10.77.0.1"]
