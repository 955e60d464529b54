"""Every receive check of one instance, in order, from raw bytes to what the machine needs.

Pure: the daemon hands over what its socket delivered (an IPv4 packet with its header, or an
IPv6 payload with the source, destination and hop limit from ``recvmsg``) and gets a
``Heard`` or a ``PacketError`` naming the check that failed. The order:

1. the IP header (IPv4: truncated, protocol);
2. our own advert (``own_packet``, counted but never logged);
3. with ``unicast_peers``, a source that is not a listed peer (``source``), before anything
   else is looked at: a stranger's packet is not worth a checksum;
4. the codec of the configured version: a peer of the other version is refused here
   (``version``), never heard, so a mixed pair cannot flap;
5. the checks that need configuration (TTL or hop limit 255, VRID, addresses; VRRPv2 adds
   authentication and the interval).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from invictusd.vrrp import packet, v3
from invictusd.vrrp.packet import DropReason, PacketError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Receiver:
    """What one instance (interface, family) accepts."""

    version: int  # 2 or 3
    own: Address  # our source address on this link: our own adverts are dropped
    peers: frozenset[Address]  # unicast peers of this family; empty: multicast, any source
    expect2: packet.Expect | None = None  # version 2
    expect3: v3.ExpectV3 | None = None  # version 3

    def __post_init__(self) -> None:
        if (self.version == 2) != (self.expect2 is not None) or (
            (self.version == 3) != (self.expect3 is not None)
        ):
            raise ValueError(f"version {self.version} needs exactly its own Expect")


@dataclass(frozen=True, slots=True)
class Heard:
    """A valid advertisement: what the state machine is told."""

    source: Address
    priority: int
    # VRRPv3: the master's advertised interval in seconds, which a backup adopts
    # (RFC 5798 6.4.2). None under VRRPv2, where it must equal ours (checked).
    interval: float | None


def _screen(receiver: Receiver, source: Address) -> None:
    if source == receiver.own:
        raise PacketError(DropReason.OWN, "our own advertisement")
    if receiver.peers and source not in receiver.peers:
        raise PacketError(DropReason.SOURCE, f"{source} is not one of unicast_peers")


def receive_ip4(receiver: Receiver, data: bytes) -> Heard:
    """An IPv4 packet, header included, as the raw socket delivers it."""
    head = packet.parse_ip4(data)
    _screen(receiver, head.source)
    if receiver.expect2 is not None:
        adv2 = packet.decode(head.payload)
        packet.validate(head.ttl, adv2, receiver.expect2)
        return Heard(head.source, adv2.priority, None)
    assert receiver.expect3 is not None  # __post_init__: version 3 has its Expect
    adv3 = v3.decode(head.payload, head.source, head.destination)
    v3.validate(head.ttl, adv3, receiver.expect3)
    return Heard(head.source, adv3.priority, adv3.interval)


def receive_ip6(
    receiver: Receiver,
    payload: bytes,
    source: ipaddress.IPv6Address,
    destination: ipaddress.IPv6Address,
    hop_limit: int,
) -> Heard:
    """An IPv6 payload with what ``recvmsg`` said of its header (VRRPv3 only)."""
    _screen(receiver, source)
    if receiver.expect3 is None:
        raise PacketError(DropReason.VERSION, "VRRP over IPv6 exists only in version 3")
    adv = v3.decode(payload, source, destination)
    v3.validate(hop_limit, adv, receiver.expect3)
    return Heard(source, adv.priority, adv.interval)
