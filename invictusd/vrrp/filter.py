"""Kernel-side split of received VRRP packets into two lanes. Pure (builds BPF programs).

Every packet that reaches an interface's VRRP sockets is queued on exactly one of them:

* the **fast lane** takes what passes every receive check of this virtual router but the
  address list: TTL 255, version/type, VRID, address count, auth type, interval, password
  and checksum. The real peer's adverts always land here; a flood of anything else cannot
  fill this queue, so they are never lost to it (VRRPv2's cleartext password lets a LAN
  host forge valid adverts, which no filter can tell from real ones);
* the **slow lane** takes everything else. It is read with a rate limit and decoded exactly
  like the fast lane (an owner's advert with another address list is still valid there),
  so every bad packet is still counted by reason; what the rate limit leaves unread the
  kernel drops and counts (``SO_MEMINFO``), reported as ``overflow``.

Both programs run on raw IPv4 sockets, where the data starts at the IP header.
"""

from __future__ import annotations

from dataclasses import dataclass

from invictusd import cbpf as b
from invictusd.vrrp.packet import AUTH_DATA_LEN, HEADER_LEN, TYPE_ADVERTISEMENT, VERSION, VRRP_TTL

IP_HEADER = 20


@dataclass(frozen=True, slots=True)
class LaneSpec:
    """What a genuine advert of one virtual router looks like on the wire."""

    vrid: int
    count: int  # addresses in the advert
    auth_type: int
    password: bytes  # as sent (unpadded)
    advert_interval: int  # seconds (VRRPv2)

    def __post_init__(self) -> None:
        if not 1 <= self.vrid <= 255 or not 0 <= self.count <= 255:
            raise ValueError(f"vrid {self.vrid} / count {self.count} out of range")
        if len(self.password) > AUTH_DATA_LEN:
            raise ValueError("password longer than the auth data field")


def _checks(spec: LaneSpec, genuine: str, other: str) -> list[b.Step]:
    """Every receive check but the address list, the checksum included (unrolled: the
    length is fixed by the configured address count). A genuine advert has a plain
    20-byte IPv4 header; one with IP options still arrives, on the slow lane."""
    auth = spec.password.ljust(AUTH_DATA_LEN, b"\0")
    size = HEADER_LEN + 4 * spec.count + AUTH_DATA_LEN
    v = IP_HEADER  # VRRP starts here
    auth_off = v + HEADER_LEN + 4 * spec.count
    steps: list[b.Step] = [
        b.ld_len(),
        b.jeq(IP_HEADER + size, None, other),
        b.ld_b_abs(0),
        b.jeq(0x45, None, other),  # IPv4, no options
        b.ld_b_abs(8),  # TTL
        b.jeq(VRRP_TTL, None, other),
        b.ld_b_abs(v),
        b.jeq(VERSION << 4 | TYPE_ADVERTISEMENT, None, other),
        b.ld_b_abs(v + 1),
        b.jeq(spec.vrid, None, other),
        b.ld_b_abs(v + 3),
        b.jeq(spec.count, None, other),
        b.ld_b_abs(v + 4),
        b.jeq(spec.auth_type, None, other),
        b.ld_b_abs(v + 5),
        b.jeq(spec.advert_interval, None, other),
        b.ld_w_abs(auth_off),
        b.jeq(int.from_bytes(auth[:4], "big"), None, other),
        b.ld_w_abs(auth_off + 4),
        b.jeq(int.from_bytes(auth[4:], "big"), None, other),
        # RFC 1071 sum of the VRRP message, folded: a correct checksum makes it 0xffff.
        b.ldx_imm(0),
    ]
    for off in range(v, v + size, 2):
        steps += [b.ld_h_abs(off), b.add_x(), b.tax()]
    steps += [
        b.and_k(0xFFFF), b.st(0), b.txa(), b.rsh_k(16), b.tax(), b.ld_mem(0), b.add_x(),  # fold
        b.st(0), b.rsh_k(16), b.tax(), b.ld_mem(0), b.and_k(0xFFFF), b.add_x(),  # fold again
        b.jeq(0xFFFF, genuine, other),
    ]
    return steps


def fast_lane(spec: LaneSpec) -> tuple[b.Insn, ...]:
    """Accept exactly the packets that look like this router's genuine adverts."""
    return b.assemble([*_checks(spec, "yes", "no"),
                       b.Label("yes"), b.ret(b.ACCEPT), b.Label("no"), b.ret(b.DROP)])


def slow_lane(spec: LaneSpec) -> tuple[b.Insn, ...]:
    """Accept exactly what ``fast_lane`` refuses."""
    return b.assemble([*_checks(spec, "genuine", "other"),
                       b.Label("genuine"), b.ret(b.DROP), b.Label("other"), b.ret(b.ACCEPT)])
