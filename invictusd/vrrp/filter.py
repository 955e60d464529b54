"""Kernel-side split of received VRRP packets into two lanes. Pure (builds BPF programs).

Every packet that reaches an instance's VRRP sockets is queued on exactly one of them:

* the **fast lane** takes what passes every receive check of this instance but the address
  list (``invictusd.vrrp.receive``, in BPF): not our own source; with ``unicast_peers``, a
  listed source; TTL/hop limit 255; version/type; VRID; address count; VRRPv2's auth type,
  interval and password; VRRPv3's non-zero interval; the checksum (VRRPv3's over the
  pseudo-header). The real peer's adverts always land here; a flood of anything else cannot
  fill this queue, so they are never lost to it. (VRRPv2's cleartext password, and VRRPv3's
  lack of any authentication, let a LAN host forge valid adverts, which no filter can tell
  from real ones; ``unicast_peers`` at least names who may send them.)
* the **slow lane** takes everything else. It is read with a rate limit and decoded exactly
  like the fast lane (an owner's advert with another address list is still valid there),
  so every bad packet is still counted by reason; what the rate limit leaves unread the
  kernel drops and counts (``SO_MEMINFO``), reported as ``overflow``.

What a filter sees (checked against Linux 6.18 with a filter per field, see
``tests/netns/test_vrrp_lanes.py``):

* **IPv4 raw socket**: the data starts at the IPv4 header, cut to its total length. A
  genuine advert has a plain 20-byte header; one with IP options still arrives, on the slow
  lane. The VRRPv3 pseudo-header is summed from the header's source and destination words,
  plus the protocol (112) and the VRRP length, which the exact-length check fixes.
* **IPv6 raw socket**: the data is the VRRP payload (after any extension header; ``ld len``
  is its length), never the IPv6 header, so offset 0 is the VRRP version byte. The header is
  still reachable through ``SKF_NET_OFF`` (the network header, wherever the data starts):
  ``[SKF_NET_OFF + 7]`` is the hop limit and ``[SKF_NET_OFF + 8 .. + 39]`` the source and
  destination, the same values ``recvmsg`` reports (``IPV6_HOPLIMIT``, ``IPV6_PKTINFO``) and
  the decoder's pseudo-header uses. So the IPv6 fast lane checks the hop limit, source and
  checksum in the kernel too. A filter on an IPv6 raw socket does not make the kernel verify
  the checksum itself (it does only with ``IPV6_CHECKSUM``, which we do not set), so a
  corrupt advert still reaches the slow lane and is counted as ``checksum``.

The checksum is unrolled (classic BPF has no backward jumps): the length is fixed by the
configured address count, which is why ``MAX_COUNT`` bounds it (a program has at most 4096
instructions; a conditional jump reaches 255 ahead, so every far target is reached by ``ja``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from invictusd import cbpf as b
from invictusd.vrrp.packet import (
    AUTH_DATA_LEN,
    HEADER_LEN,
    TYPE_ADVERTISEMENT,
    VRRP_PROTO,
    VRRP_TTL,
)

IP_HEADER = 20
NET = b.SKF_NET_OFF
# Addresses per advert the fast lane can check. IPv4: the count field's limit. IPv6: an
# advert that fits a 1500-byte link (8 + 16 x 90 = 1448 bytes of VRRP after 40 of header);
# its unrolled checksum then takes ~2,300 of the 4,096 instructions a program may have.
MAX_COUNT = {4: 255, 6: 90}
MAX_PEERS = 16  # unicast peers per family (10 instructions each on IPv6)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class LaneSpec:
    """What a genuine advert of one VRRP instance looks like on the wire."""

    vrid: int
    count: int  # addresses in the advert
    auth_type: int = 1  # VRRPv2 only
    password: bytes = b""  # VRRPv2 only, as sent (unpadded)
    advert_interval: int = 1  # VRRPv2 only, seconds (VRRPv3 adopts the master's)
    version: int = 2
    family: int = 4
    own: Address | None = None  # our own source address: our adverts are never "genuine"
    peers: tuple[Address, ...] = ()  # unicast_peers of this family; empty: any source

    def __post_init__(self) -> None:
        if self.version not in (2, 3) or self.family not in (4, 6) or (
                self.version == 2 and self.family == 6):
            raise ValueError(f"VRRPv{self.version} over IPv{self.family} does not exist")
        if not 1 <= self.vrid <= 255 or not 0 <= self.count <= MAX_COUNT[self.family]:
            raise ValueError(f"vrid {self.vrid} / count {self.count} out of range "
                             f"(1..255 / 0..{MAX_COUNT[self.family]})")
        if len(self.password) > AUTH_DATA_LEN:
            raise ValueError("password longer than the auth data field")
        if len(self.peers) > MAX_PEERS:
            raise ValueError(f"{len(self.peers)} unicast peers; the filter takes {MAX_PEERS}")
        for a in (self.own, *self.peers):
            if a is not None and a.version != self.family:
                raise ValueError(f"{a} is not an IPv{self.family} address")

    @property
    def size(self) -> int:
        """Length of a genuine VRRP message (without IP header)."""
        if self.version == 2:
            return HEADER_LEN + 4 * self.count + AUTH_DATA_LEN
        return HEADER_LEN + (4 if self.family == 4 else 16) * self.count


def _words(a: Address) -> list[int]:
    raw = a.packed
    return [int.from_bytes(raw[i : i + 4], "big") for i in range(0, len(raw), 4)]


def _source(spec: LaneSpec, fail: str) -> list[b.Step]:
    """Not our own address; with peers, one of them. Mismatches jump near, verdicts by ja."""
    src = IP_HEADER - 8 if spec.family == 4 else NET + 8  # IPv4: [12]; IPv6: header + 8
    steps: list[b.Step] = []
    if spec.own is not None:
        words = _words(spec.own)
        for n, w in enumerate(words):
            steps += [b.ld_w_abs(src + 4 * n), b.jeq(w, None, "not_own")]
        steps += [b.ja(fail), b.Label("not_own")]
    if spec.peers:
        for i, peer in enumerate(spec.peers):
            for n, w in enumerate(_words(peer)):
                steps += [b.ld_w_abs(src + 4 * n), b.jeq(w, None, f"not_peer{i}")]
            steps += [b.ja("peer"), b.Label(f"not_peer{i}")]
        steps += [b.ja(fail), b.Label("peer")]
    return steps


def _checks(spec: LaneSpec, genuine: str, other: str) -> list[b.Step]:
    """Every receive check but the address list, the checksum included (unrolled: the
    length is fixed by the configured address count)."""
    size = spec.size
    if spec.family == 4:
        v = IP_HEADER  # the VRRP message starts here
        steps: list[b.Step] = [
            b.ld_len(),
            b.jeq(IP_HEADER + size, None, "no"),
            b.ld_b_abs(0),
            b.jeq(0x45, None, "no"),  # IPv4, no options
            b.ld_b_abs(8),  # TTL
            b.jeq(VRRP_TTL, None, "no"),
            b.ld_h_abs(2),  # total length: what the decoder cuts the packet to
            b.jeq(IP_HEADER + size, None, "no"),
            b.ld_b_abs(9),
            b.jeq(VRRP_PROTO, None, "no"),
        ]
        pseudo = range(IP_HEADER - 8, IP_HEADER, 2)  # source and destination words
    else:
        v = 0  # the payload: the IPv6 header is only reachable at NET + n
        steps = [
            b.ld_len(),
            b.jeq(size, None, "no"),
            b.ld_b_abs(NET + 7),  # hop limit
            b.jeq(VRRP_TTL, None, "no"),
        ]
        pseudo = range(NET + 8, NET + 40, 2)
    steps += [
        b.ld_b_abs(v),
        b.jeq(spec.version << 4 | TYPE_ADVERTISEMENT, None, "no"),
        b.ld_b_abs(v + 1),
        b.jeq(spec.vrid, None, "no"),
        b.ld_b_abs(v + 3),
        b.jeq(spec.count, None, "no"),
    ]
    if spec.version == 2:
        auth = spec.password.ljust(AUTH_DATA_LEN, b"\0")
        auth_off = v + size - AUTH_DATA_LEN
        steps += [
            b.ld_b_abs(v + 4),
            b.jeq(spec.auth_type, None, "no"),
            b.ld_b_abs(v + 5),
            b.jeq(spec.advert_interval, None, "no"),
            b.ld_w_abs(auth_off),
            b.jeq(int.from_bytes(auth[:4], "big"), None, "no"),
            b.ld_w_abs(auth_off + 4),
            b.jeq(int.from_bytes(auth[4:], "big"), None, "no"),
        ]
    else:
        # 4 reserved bits (ignored, as the decoder does) and a 12-bit interval, not zero.
        steps += [b.ld_h_abs(v + 4), b.and_k(0x0FFF), b.jeq(0, "no", None)]
    # The far verdicts are reached by ja from here on: "no" sits right after these checks.
    steps += [b.ja("source"), b.Label("no"), b.ja(other), b.Label("source")]
    steps += _source(spec, other)
    # RFC 1071 sum, folded: a correct checksum makes it 0xffff. VRRPv3 starts from its
    # pseudo-header: source, destination, protocol and length (RFC 5798 5.2.8).
    if spec.version == 2:
        steps.append(b.ldx_imm(0))
    else:
        steps.append(b.ldx_imm(VRRP_PROTO + size))
        for off in pseudo:
            steps += [b.ld_h_abs(off), b.add_x(), b.tax()]
    for off in range(v, v + size, 2):
        steps += [b.ld_h_abs(off), b.add_x(), b.tax()]
    steps += [
        b.and_k(0xFFFF), b.st(0), b.txa(), b.rsh_k(16), b.tax(), b.ld_mem(0), b.add_x(),
        b.st(0), b.rsh_k(16), b.tax(), b.ld_mem(0), b.and_k(0xFFFF), b.add_x(),  # fold twice
        b.jeq(0xFFFF, genuine, other),
    ]
    return steps


def fast_lane(spec: LaneSpec) -> tuple[b.Insn, ...]:
    """Accept exactly the packets that look like this instance's genuine adverts."""
    return b.assemble([*_checks(spec, "yes", "nope"),
                       b.Label("yes"), b.ret(b.ACCEPT), b.Label("nope"), b.ret(b.DROP)])


def slow_lane(spec: LaneSpec) -> tuple[b.Insn, ...]:
    """Accept exactly what ``fast_lane`` refuses."""
    return b.assemble([*_checks(spec, "genuine", "other"),
                       b.Label("genuine"), b.ret(b.DROP), b.Label("other"), b.ret(b.ACCEPT)])
