"""The core's own conntrack types.

Netlink attributes are converted to these at the border (``invictusd.io.ctnetlink``) and
the sync protocol (``invictusd.sync.wire``) encodes them; nothing here knows about sockets,
netlink or pyroute2.

These are ``NamedTuple`` rather than frozen dataclasses on purpose: they are created and
hashed once per conntrack event on the hot path, and tuples are several times cheaper to
build and hash than dataclass instances while staying immutable and typed.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import NamedTuple

# IP protocol numbers we replicate.
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132

# Conntrack status bits (linux/netfilter/nf_conntrack_common.h).
IPS_EXPECTED = 1 << 0
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_SRC_NAT_DONE = 1 << 7
IPS_DST_NAT_DONE = 1 << 8
IPS_DYING = 1 << 9
IPS_FIXED_TIMEOUT = 1 << 10
IPS_TEMPLATE = 1 << 11
IPS_UNTRACKED = 1 << 12
IPS_HELPER = 1 << 13
IPS_OFFLOAD = 1 << 14
IPS_HW_OFFLOAD = 1 << 15

# Status bits that userspace may set when creating an entry; the rest are kernel-owned.
IPS_SETTABLE = IPS_EXPECTED | IPS_SEEN_REPLY | IPS_ASSURED | IPS_FIXED_TIMEOUT

# TCP conntrack states (enum tcp_conntrack).
TCP_NONE = 0
TCP_SYN_SENT = 1
TCP_SYN_RECV = 2
TCP_ESTABLISHED = 3
TCP_FIN_WAIT = 4
TCP_CLOSE_WAIT = 5
TCP_LAST_ACK = 6
TCP_TIME_WAIT = 7
TCP_CLOSE = 8
TCP_SYN_SENT2 = 9


class FlowKey(NamedTuple):
    """One direction's tuple. For ICMP, ``sport`` is the id and ``dport`` is type << 8 | code."""

    family: int  # 4 or 6
    proto: int
    src: bytes  # packed address, 4 or 16 bytes
    dst: bytes
    sport: int
    dport: int
    zone: int = 0


class Flow(NamedTuple):
    """A conntrack entry as the core sees it."""

    orig: FlowKey
    reply: FlowKey
    ct_id: int = 0
    status: int = 0
    timeout: int = 0  # seconds left when captured
    mark: int = 0
    tcp_state: int = TCP_NONE

    @property
    def is_nat(self) -> bool:
        return self.reply != inverse(self.orig)


class EventKind(enum.IntEnum):
    NEW = 1
    UPDATE = 2
    DESTROY = 3


class FlowEvent(NamedTuple):
    kind: EventKind
    flow: Flow


_ICMP_REPLY_TYPE = {8: 0, 13: 14, 15: 16, 17: 18}  # echo, timestamp, info, address mask
_ICMPV6_REPLY_TYPE = {128: 129, 130: 131}  # echo, multicast listener query


def inverse(key: FlowKey) -> FlowKey:
    """The reply tuple the kernel expects for ``key`` when there is no NAT."""
    if key.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        table = _ICMP_REPLY_TYPE if key.proto == IPPROTO_ICMP else _ICMPV6_REPLY_TYPE
        icmp_type, code = key.dport >> 8, key.dport & 0xFF
        return FlowKey(
            key.family,
            key.proto,
            key.dst,
            key.src,
            key.sport,
            (table.get(icmp_type, icmp_type) << 8) | code,
            key.zone,
        )
    return FlowKey(key.family, key.proto, key.dst, key.src, key.dport, key.sport, key.zone)


def marked(mark: int, bit: int) -> bool:
    return bool(mark >> bit & 1)


_PROTO_NAMES = {IPPROTO_ICMP: "icmp", IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp",
                IPPROTO_ICMPV6: "icmpv6", IPPROTO_SCTP: "sctp"}


def _addr(raw: bytes) -> str:
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        return raw.hex()


def flow_text(flow: Flow) -> str:
    """One line naming a flow for logs: ``tcp 10.0.0.1:40000 -> 192.0.2.80:443 zone 0 mark 0x40000000``."""
    o = flow.orig
    proto = _PROTO_NAMES.get(o.proto, str(o.proto))
    return (f"{proto} {_addr(o.src)}:{o.sport} -> {_addr(o.dst)}:{o.dport} zone {o.zone} "
            f"mark {flow.mark:#x}")
