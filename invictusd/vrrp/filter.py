"""Kernel-side split of received VRRP packets into two lanes. Pure (builds BPF programs).

Every packet that reaches an interface's VRRP sockets is queued on exactly one of them:

* the **fast lane** takes what has the shape of a genuine advert of this virtual router
  (TTL 255, version/type, VRID, address count, auth type, interval and password as
  configured). The real peer's adverts always land here; a flood of anything else cannot
  fill this queue, so they are never lost to it;
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
    auth = spec.password.ljust(AUTH_DATA_LEN, b"\0")
    auth_off = HEADER_LEN + 4 * spec.count
    return [
        b.ld_b_abs(8),  # TTL
        b.jeq(VRRP_TTL, None, other),
        b.ldx_msh(0),  # X = IPv4 header length
        # A load past the end would end the program with "drop" in *both* lanes: a short
        # packet must reach the slow lane to be counted.
        b.ld_len(),
        b.jge_x(None, other),  # (the kernel never delivers len < header length; be sure)
        b.sub_x(),
        b.jge(auth_off + AUTH_DATA_LEN, None, other),
        b.ld_b_ind(0),
        b.jeq(VERSION << 4 | TYPE_ADVERTISEMENT, None, other),
        b.ld_b_ind(1),
        b.jeq(spec.vrid, None, other),
        b.ld_b_ind(3),
        b.jeq(spec.count, None, other),
        b.ld_b_ind(4),
        b.jeq(spec.auth_type, None, other),
        b.ld_b_ind(5),
        b.jeq(spec.advert_interval, None, other),
        b.ld_w_ind(auth_off),
        b.jeq(int.from_bytes(auth[:4], "big"), None, other),
        b.ld_w_ind(auth_off + 4),
        b.jeq(int.from_bytes(auth[4:], "big"), genuine, other),
    ]


def fast_lane(spec: LaneSpec) -> tuple[b.Insn, ...]:
    """Accept exactly the packets that look like this router's genuine adverts."""
    return b.assemble([*_checks(spec, "yes", "no"),
                       b.Label("yes"), b.ret(b.ACCEPT), b.Label("no"), b.ret(b.DROP)])


def slow_lane(spec: LaneSpec) -> tuple[b.Insn, ...]:
    """Accept exactly what ``fast_lane`` refuses."""
    return b.assemble([*_checks(spec, "genuine", "other"),
                       b.Label("genuine"), b.ret(b.DROP), b.Label("other"), b.ret(b.ACCEPT)])
