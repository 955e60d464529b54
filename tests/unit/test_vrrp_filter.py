"""The kernel-side lanes of VRRP reception (``invictusd.vrrp.filter``), run in a cBPF VM.

Every packet goes to exactly one lane: the fast lane takes exactly the genuine-looking adverts
of the configured router, the slow lane everything else (so every bad packet is still read
and counted by reason). The kernel runs the same programs in ``tests/netns``.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invictusd import cbpf
from invictusd.vrrp import packet
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
