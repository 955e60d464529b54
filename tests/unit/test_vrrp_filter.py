"""The kernel-side lanes of VRRP reception (``invictusd.vrrp.filter``), run in a cBPF VM.

Every packet goes to exactly one lane: the fast lane takes exactly the genuine-looking adverts
of the configured router, the slow lane everything else (so every bad packet is still read
and counted by reason). The kernel runs the same programs in ``tests/netns``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invictusd import cbpf
from invictusd.vrrp import packet, receive, v3
from invictusd.vrrp.filter import LaneSpec, fast_lane, slow_lane
from tests.cbpf_vm import run

SPEC = LaneSpec(vrid=51, count=2, auth_type=packet.AUTH_PASSWORD, password=b"s3cret", advert_interval=1)
VIPS = (IPv4Address("10.0.0.1"), IPv4Address("10.0.0.9"))
FAST, SLOW = fast_lane(SPEC), slow_lane(SPEC)


def ip(payload: bytes, ttl: int = 255, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0xC0, 4 * ihl + len(payload), 0, 0, ttl, 112, 0,
                       bytes([10, 0, 0, 2]), bytes([224, 0, 0, 18]))
    return head + options + payload


def advert(**kw: object) -> bytes:
    args: dict[str, object] = {"vrid": 51, "priority": 100, "addresses": VIPS, "auth_data": b"s3cret"}
    args.update(kw)
    return packet.encode(packet.Advertisement(**args))  # type: ignore[arg-type]


def lanes(data: bytes) -> tuple[bool, bool]:
    return run(FAST, data) != 0, run(SLOW, data) != 0


def test_genuine_adverts_take_the_fast_lane_whatever_the_priority() -> None:
    for prio in (0, 1, 100, 254, 255):
        assert lanes(ip(advert(priority=prio))) == (True, False)
    # With IP options it is still read (and accepted by validation), on the slow lane.
    assert lanes(ip(advert(), options=b"\x94\x04\x00\x00")) == (False, True)


@pytest.mark.parametrize("bad", [
    ip(advert(), ttl=254),
    ip(advert(vrid=52)),
    ip(advert(addresses=VIPS[:1])),
    ip(advert(auth_data=b"s3creT")),
    ip(advert(auth_data=b"s3cret!")),
    ip(advert(auth_type=packet.AUTH_NONE)),
    ip(advert(advert_interval=2)),
    ip(b"\x31" + advert()[1:]),  # version 3
    ip(advert()[:-1]),  # one byte short
    ip(advert() + b"\0"),  # one byte long
    ip(advert()[:6] + bytes([advert()[6] ^ 1]) + advert()[7:]),  # checksum
    ip(b""),
])
def test_anything_else_takes_the_slow_lane(bad: bytes) -> None:
    assert lanes(bad) == (False, True)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=0, max_size=80), st.integers(0, 255), st.integers(5, 15))
def test_every_packet_goes_to_exactly_one_lane(payload: bytes, ttl: int, ihl: int) -> None:
    data = ip(payload, ttl=ttl, options=bytes(4 * (ihl - 5)))
    fast, slow = lanes(data)
    assert fast != slow


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 255), st.integers(0, 255), st.binary(max_size=8), st.integers(1, 255))
def test_the_fast_lane_only_takes_what_validation_would_accept(vrid: int, prio: int, pw: bytes,
                                                               interval: int) -> None:
    """Nothing reaches the fast lane that the receive checks would refuse (the address list
    aside, which Python still checks on both lanes)."""
    pw = pw.rstrip(b"\0")
    data = ip(advert(vrid=vrid, priority=prio, auth_data=pw, advert_interval=interval))
    fast, slow = lanes(data)
    _, ttl, adv = packet.decode_ip(data)
    expect = packet.Expect(51, 1, frozenset(VIPS), packet.AUTH_PASSWORD, b"s3cret")
    try:
        packet.validate(ttl, adv, expect)
        valid = True
    except packet.PacketError:
        valid = False
    assert fast == valid and slow == (not valid)


def test_programs_encode_to_kernel_layout() -> None:
    raw = cbpf.encode(FAST)
    assert len(raw) == 8 * len(FAST)
    code, _, _, k = struct.unpack_from("=HBBI", raw)
    assert code == cbpf.LD | cbpf.W | cbpf.LEN  # ld len: the exact length comes first
    code, _, _, k = struct.unpack_from("=HBBI", raw, 8 * 4)
    assert (code, k) == (cbpf.LD | cbpf.B | cbpf.ABS, 8)  # ldb [8]: the TTL


def test_assembler_refuses_bad_programs() -> None:
    with pytest.raises(cbpf.ProgramError, match="undefined"):
        cbpf.assemble([cbpf.jeq(1, "nowhere"), cbpf.ret(0)])
    with pytest.raises(cbpf.ProgramError, match="end with a ret"):
        cbpf.assemble([cbpf.ld_imm(1)])
    with pytest.raises(cbpf.ProgramError, match="twice"):
        cbpf.assemble([cbpf.Label("a"), cbpf.Label("a"), cbpf.ret(0)])


# ---- VRRPv3 (IPv4 and IPv6), unicast peers, our own source ------------------------------------

OWN4, PEER4, STRANGER4 = IPv4Address("10.0.0.3"), IPv4Address("10.0.0.2"), IPv4Address("10.0.0.66")
OWN6, PEER6, STRANGER6 = IPv6Address("fe80::3"), IPv6Address("fe80::2"), IPv6Address("fe80::66")
VIPS6 = (IPv6Address("fd00::1"), IPv6Address("fd00::9"))
GROUP: dict[int, Any] = {4: v3.GROUP4, 6: v3.GROUP6}


def _receiver(version: int, family: int, unicast: bool) -> receive.Receiver:
    own, peer = (OWN4, PEER4) if family == 4 else (OWN6, PEER6)
    peers = frozenset({peer}) if unicast else frozenset()
    if version == 2:
        return receive.Receiver(2, own, peers, expect2=packet.Expect(
            51, 1, frozenset(VIPS), packet.AUTH_PASSWORD, b"s3cret"))
    return receive.Receiver(3, own, peers, expect3=v3.ExpectV3(
        51, frozenset(VIPS if family == 4 else VIPS6)))


def _lane(version: int, family: int, unicast: bool) -> LaneSpec:
    r = _receiver(version, family, unicast)
    if version == 2:
        return LaneSpec(51, 2, packet.AUTH_PASSWORD, b"s3cret", 1, own=r.own, peers=tuple(r.peers))
    return LaneSpec(51, 2, version=3, family=family, own=r.own, peers=tuple(r.peers))


CASES = [(2, 4, False), (2, 4, True), (3, 4, False), (3, 4, True), (3, 6, False), (3, 6, True)]
PROGRAMS = {c: (fast_lane(_lane(*c)), slow_lane(_lane(*c))) for c in CASES}


def ip6(payload: bytes, source: IPv6Address, destination: IPv6Address, hop_limit: int = 255) -> bytes:
    """An IPv6 header: what an IPv6 raw socket's filter reaches at SKF_NET_OFF, not at 0."""
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), 112, hop_limit, source.packed,
                       destination.packed)


@dataclass(frozen=True)
class Wire:
    """One packet as a socket of ``family`` delivers it, and what the receive checks make of it."""

    family: int
    data: bytes  # IPv4: from the header; IPv6: the payload
    network: bytes | None  # IPv6: the header in front of the payload
    source: IPv4Address | IPv6Address
    destination: IPv4Address | IPv6Address
    ttl: int
    plain: bool  # IPv4 without options, total length = packet length

    def lanes(self, case: tuple[int, int, bool]) -> tuple[bool, bool]:
        fast, slow = PROGRAMS[case]
        return run(fast, self.data, self.network) != 0, run(slow, self.data, self.network) != 0

    def accepted_but_for_addresses(self, case: tuple[int, int, bool]) -> bool:
        """What the fast lane must take: the receive pipeline accepts it, or refuses only its
        address list; the configured count, no trailing bytes, a plain IPv4 header."""
        r = _receiver(*case)
        vrrp = self.data[20:] if self.family == 4 else self.data
        size = _lane(*case).size
        if not self.plain or len(vrrp) != size or vrrp[3] != 2:
            return False
        try:
            if self.family == 4:
                receive.receive_ip4(r, self.data)
            else:
                assert isinstance(self.source, IPv6Address)
                assert isinstance(self.destination, IPv6Address)
                receive.receive_ip6(r, self.data, self.source, self.destination, self.ttl)
        except packet.PacketError as e:
            return e.reason is packet.DropReason.ADDRESSES
        return True


def _message(version: int, family: int, vt: int, vrid: int, prio: int, count: int,
             addresses: bytes, word: int, auth: bytes) -> bytes:
    if version == 2:
        return struct.pack("!BBBBBBH", vt, vrid, prio, count, word >> 8, word & 0xFF, 0) + (
            addresses + auth)
    return struct.pack("!BBBBHH", vt, vrid, prio, count, word, 0) + addresses


@st.composite
def wires(draw: st.DrawFn, version: int, family: int) -> Wire:
    """Adverts of every shape around a genuine one: each field right most of the time."""
    def mostly(right: object, *wrong: st.SearchStrategy[Any]) -> Any:
        """``right`` 11 times in 12: about a third of the packets are genuine."""
        return right if draw(st.integers(0, 11)) else draw(st.one_of(*wrong))

    source: Any
    destination: Any
    if family == 4:
        source = draw(st.sampled_from([PEER4, PEER4, OWN4, STRANGER4]))
        destination = draw(st.sampled_from([v3.GROUP4, OWN4, IPv4Address("10.0.0.99")]))
        pool: tuple[Any, ...] = (*VIPS, IPv4Address("10.0.0.5"))
    else:
        source = draw(st.sampled_from([PEER6, PEER6, OWN6, STRANGER6]))
        destination = draw(st.sampled_from([v3.GROUP6, OWN6, IPv6Address("fe80::99")]))
        pool = (*VIPS6, IPv6Address("fd00::5"))
    ttl = mostly(255, st.integers(0, 254))
    vt = mostly(version << 4 | 1, st.integers(0, 255))
    vrid = mostly(51, st.integers(1, 255))
    addresses = mostly(pool[:2], st.lists(st.sampled_from(pool), max_size=3).map(tuple))
    count = mostly(len(addresses), st.integers(0, 4))
    body = b"".join(a.packed for a in addresses)
    if version == 2:
        word = mostly(packet.AUTH_PASSWORD << 8 | 1, st.integers(0, 0xFFFF))
        auth = mostly(b"s3cret\0\0", st.binary(min_size=8, max_size=8))
    else:
        word = draw(st.one_of(st.integers(0, 0xFFFF), st.sampled_from([10, 5, 0, 0xF000, 0x100A])))
        auth = b""
    msg = _message(version, family, vt, vrid, draw(st.integers(0, 255)), count, body, word, auth)
    pseudo_dst = mostly(destination, st.just(GROUP[family] if destination != GROUP[family] else OWN4
                                             if family == 4 else OWN6))
    pseudo = v3.pseudo_header(source, pseudo_dst, len(msg)) if version == 3 else b""
    csum = packet.checksum(pseudo + msg)
    csum = mostly(csum, st.integers(0, 0xFFFF))
    msg = msg[:6] + struct.pack("!H", csum) + msg[8:] + mostly(b"", st.binary(min_size=1, max_size=3))
    if family == 6:
        return Wire(6, msg, ip6(msg, source, destination, ttl), source, destination, ttl, True)
    ihl = mostly(5, st.integers(6, 7))
    total = mostly(4 * ihl + len(msg), st.integers(0, 80))
    proto = mostly(112, st.integers(0, 255))
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0xC0, total, 0, 0, ttl, proto, 0,
                       source.packed, destination.packed) + bytes(4 * (ihl - 5))
    data = head + msg
    return Wire(4, data, None, source, destination, ttl, ihl == 5 and total == len(data))


@pytest.mark.parametrize("case", CASES, ids=[f"v{v}-ipv{f}{'-unicast' if u else ''}" for v, f, u in CASES])
@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_the_fast_lane_takes_exactly_what_the_receive_checks_accept(
        case: tuple[int, int, bool], data: st.DataObject) -> None:
    """For every version, family and unicast setting: each packet goes to exactly one lane,
    and the fast lane's share is exactly what the receive pipeline (``invictusd.vrrp.receive``)
    accepts, the address list aside (configured count, exact length, plain IPv4 header)."""
    wire = data.draw(wires(case[0], case[1]))
    fast, slow = wire.lanes(case)
    assert fast != slow
    assert fast == wire.accepted_but_for_addresses(case)


@pytest.mark.parametrize("case", CASES, ids=[f"v{v}-ipv{f}{'-unicast' if u else ''}" for v, f, u in CASES])
@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=80), ttl=st.integers(0, 255))
def test_random_bytes_go_to_exactly_one_lane(case: tuple[int, int, bool], payload: bytes, ttl: int) -> None:
    if case[1] == 4:
        wire = Wire(4, ip(payload, ttl=ttl), None, PEER4, v3.GROUP4, ttl, True)
    else:
        wire = Wire(6, payload, ip6(payload, PEER6, v3.GROUP6, ttl), PEER6, v3.GROUP6, ttl, True)
    fast, slow = wire.lanes(case)
    assert fast != slow
    assert fast == wire.accepted_but_for_addresses(case)


def _v3_wire(family: int, priority: int = 100, source: Any = None, destination: Any = None,
             **kw: Any) -> Wire:
    src: Any = source or (PEER4 if family == 4 else PEER6)
    dst: Any = destination or GROUP[family]
    msg = v3.encode(v3.AdvertisementV3(51, priority, VIPS if family == 4 else VIPS6, **kw), src, dst)
    if family == 4:
        data = struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, 20 + len(msg), 0, 0, 255, 112, 0,
                           src.packed, dst.packed) + msg
        return Wire(4, data, None, src, dst, 255, True)
    return Wire(6, msg, ip6(msg, src, dst), src, dst, 255, True)


@pytest.mark.parametrize("family", [4, 6])
def test_v3_genuine_adverts_take_the_fast_lane_at_any_interval_and_reserved_bits(family: int) -> None:
    for unicast in (False, True):
        case = (3, family, unicast)
        for kw in ({}, {"interval_cs": 1}, {"interval_cs": 4095}, {"reserved": 0xF},
                   {"priority": 0}, {"priority": 255}):
            assert _v3_wire(family, **kw).lanes(case) == (True, False), (case, kw)
        own = OWN4 if family == 4 else OWN6
        stranger = STRANGER4 if family == 4 else STRANGER6
        assert _v3_wire(family, source=own).lanes(case) == (False, True)  # our own
        assert _v3_wire(family, source=stranger).lanes(case) == ((False, True) if unicast
                                                                else (True, False))


@pytest.mark.parametrize("family", [4, 6])
def test_v3_checksum_of_minus_zero_is_accepted_by_both_sides(family: int) -> None:
    """RFC 1071 has two zeros: an advert whose checksum is 0x0000 may carry 0xffff. The
    decoder accepts it; so must the fast lane (the folded sum is 0xffff either way)."""
    for prio in range(256):  # each interval centisecond more takes 1 off the checksum
        wire = _v3_wire(family, priority=prio, interval_cs=1)
        msg = wire.data[20:] if family == 4 else wire.data
        interval = 1 + int.from_bytes(msg[6:8], "big")
        if interval <= v3.MAX_INTERVAL:
            wire = _v3_wire(family, priority=prio, interval_cs=interval)
            msg = wire.data[20:] if family == 4 else wire.data
            break
    assert msg[6:8] == b"\0\0"
    msg = msg[:6] + b"\xff\xff" + msg[8:]
    data = wire.data[:20] + msg if family == 4 else msg
    other = Wire(family, data, wire.network, wire.source, wire.destination, 255, True)
    for unicast in (False, True):
        assert other.accepted_but_for_addresses((3, family, unicast))
        assert other.lanes((3, family, unicast)) == (True, False)


@pytest.mark.parametrize(("version", "family", "count"), [(2, 4, 255), (3, 4, 255), (3, 6, 90)])
def test_the_largest_adverts_fit_one_program_and_still_split(version: int, family: int, count: int) -> None:
    """Unrolled checksums grow with the address count: the largest configuration still
    assembles within BPF_MAXINSNS (far verdicts by ``ja``, beyond a conditional jump's 255)."""
    peers: tuple[Any, ...] = tuple(
        IPv6Address(f"fe80::{i + 10:x}") if family == 6 else IPv4Address(f"10.0.1.{i}")
        for i in range(16))
    source = peers[0]
    pool: list[Any] = [IPv6Address(f"fd00::{i + 1:x}") if family == 6
                       else IPv4Address(f"10.1.{i // 250}.{i % 250 + 1}") for i in range(count)]
    if version == 2:
        spec = LaneSpec(51, count, packet.AUTH_PASSWORD, b"pw", 1, peers=peers)
        msg = packet.encode(packet.Advertisement(51, 100, tuple(pool), auth_data=b"pw"))
    else:
        spec = LaneSpec(51, count, version=3, family=family, own=peers[1], peers=peers)
        msg = v3.encode(v3.AdvertisementV3(51, 100, tuple(pool)), source, GROUP[family])
    fast, slow = fast_lane(spec), slow_lane(spec)
    assert len(fast) <= cbpf.MAX_INSNS and len(slow) <= cbpf.MAX_INSNS
    if family == 4:
        data = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(msg), 0, 0, 255, 112, 0, source.packed,
                           v3.GROUP4.packed) + msg
        network = None
    else:
        assert isinstance(source, IPv6Address)
        data, network = msg, ip6(msg, source, v3.GROUP6)
    assert (run(fast, data, network), run(slow, data, network)) == (cbpf.ACCEPT, 0)
    bad = data[:-1] + bytes([data[-1] ^ 1])
    assert (run(fast, bad, network), run(slow, bad, network)) == (0, cbpf.ACCEPT)


def test_lane_specs_refuse_what_no_program_can_check() -> None:
    with pytest.raises(ValueError, match="does not exist"):
        LaneSpec(51, 1, version=2, family=6)
    with pytest.raises(ValueError, match="out of range"):
        LaneSpec(51, 91, version=3, family=6)
    with pytest.raises(ValueError, match="not an IPv6"):
        LaneSpec(51, 1, version=3, family=6, own=OWN4)
    with pytest.raises(ValueError, match="unicast peers"):
        LaneSpec(51, 1, version=3, peers=tuple(IPv4Address(f"10.0.0.{i}") for i in range(1, 18)))


def test_the_plan_gives_each_instance_a_lane_matching_its_receiver() -> None:
    """``plan.lane`` and ``plan.receiver`` describe the same instance: the peer's genuine
    advert takes the fast lane and is accepted; ours and a stranger's (unicast) do not."""
    from invictusd.config import LinkInfo, check_system, parse
    from invictusd.vrrp import plan

    text = ('[node]\nname = "fw1"\n\n[[vrrp]]\ninterface = "lan0"\nreal_address = "10.0.0.3"\n'
            'virtual_addresses = ["10.0.0.1/24", "10.0.0.9/24", "fd00::1/64", "fd00::9/64"]\n'
            'virtual_id = 51\nversion = 3\nadvert_interval = 0.05\n'
            'unicast_peers = ["10.0.0.2", "fe80::2"]\n')
    links = {"lan0": LinkInfo("lan0", (IPv4Interface("10.0.0.3/24"),),
                              (IPv6Interface("fd00::3/64"), IPv6Interface("fe80::3/64")))}
    cfg = check_system(parse(text), links)
    for spec in plan.instances(cfg):
        lane, receiver = plan.lane(cfg, spec), plan.receiver(cfg, spec)
        assert (lane.version, lane.family, lane.own, lane.peers) == (
            3, spec.family, receiver.own, tuple(receiver.peers))
        program = fast_lane(lane)
        peer = next(iter(receiver.peers))
        for source, genuine in ((peer, True), (spec.source, False),
                                (STRANGER4 if spec.family == 4 else STRANGER6, False)):
            wire = _v3_wire(spec.family, source=source, destination=spec.source, interval_cs=5)
            assert (run(program, wire.data, wire.network) != 0) is genuine, (spec, source)
