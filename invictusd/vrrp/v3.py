"""VRRPv3 advertisement codec (RFC 5798 section 5), IPv4 and IPv6.

Pure functions over bytes, the counterpart of ``invictusd.vrrp.packet`` (VRRPv2), whose
``DropReason``, ``PacketError`` and ``checksum`` it shares. The differences that matter:

- no authentication fields; 4 reserved bits and a 12-bit Max Adver Int in **centiseconds**
  where VRRPv2 had the auth type and whole seconds;
- the checksum covers a pseudo-header (RFC 5798 5.2.8), for IPv4 too, so encoding and
  decoding need the packet's source and destination. With unicast the destination is the
  peer's address, as keepalived does since 1.3.6 (verified against its captures in
  ``tests/unit/test_vrrp_v3.py``);
- addresses are IPv4 or IPv6, after the family of the packet (source and destination).

``decode`` returns an ``AdvertisementV3`` or raises ``PacketError``; it keeps the reserved
bits, so re-encoding what was received gives the same bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from invictusd.vrrp.packet import (
    TYPE_ADVERTISEMENT,
    VRRP_PROTO,
    VRRP_TTL,
    DropReason,
    PacketError,
    checksum,
    parse_ip4,
    version_error,
)

VERSION = 3
GROUP4 = ipaddress.IPv4Address("224.0.0.18")
GROUP6 = ipaddress.IPv6Address("ff02::12")
HEADER_LEN = 8
MAX_INTERVAL = 0x0FFF  # centiseconds: 40.95 s
DEFAULT_INTERVAL = 100  # centiseconds

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_HEADER = struct.Struct("!BBBBHH")
_PSEUDO4 = struct.Struct("!4s4sBBH")
_PSEUDO6 = struct.Struct("!16s16sI3xB")


@dataclass(frozen=True, slots=True)
class AdvertisementV3:
    vrid: int
    priority: int
    addresses: tuple[Address, ...]  # all of the packet's family
    interval_cs: int = DEFAULT_INTERVAL  # Max Adver Int, centiseconds (1..4095)
    # The 4 bits before the interval: sent as zero, ignored on receipt, but kept by decode so
    # that encoding what was received gives the same bytes.
    reserved: int = 0

    @property
    def interval(self) -> float:
        """The advertised interval in seconds."""
        return self.interval_cs / 100


def pseudo_header(source: Address, destination: Address, length: int) -> bytes:
    """RFC 5798 5.2.8: the IPv4 (RFC 791) or IPv6 (RFC 8200 8.1) upper-layer pseudo-header."""
    if isinstance(source, ipaddress.IPv4Address) and isinstance(destination, ipaddress.IPv4Address):
        return _PSEUDO4.pack(source.packed, destination.packed, 0, VRRP_PROTO, length)
    if isinstance(source, ipaddress.IPv6Address) and isinstance(destination, ipaddress.IPv6Address):
        return _PSEUDO6.pack(source.packed, destination.packed, length, VRRP_PROTO)
    raise ValueError(f"source {source} and destination {destination} differ in family")


def _family_len(source: Address) -> int:
    return 4 if isinstance(source, ipaddress.IPv4Address) else 16


def encode(adv: AdvertisementV3, source: Address, destination: Address) -> bytes:
    """The VRRPv3 message (without IP header) from ``source`` to ``destination``, checksummed."""
    if not 1 <= adv.vrid <= 255:
        raise ValueError(f"vrid {adv.vrid} out of range 1..255")
    if not 0 <= adv.priority <= 255:
        raise ValueError(f"priority {adv.priority} out of range 0..255")
    if not 1 <= adv.interval_cs <= MAX_INTERVAL:
        raise ValueError(f"interval {adv.interval_cs} cs out of range 1..{MAX_INTERVAL}")
    if not 0 <= adv.reserved <= 0x0F:
        raise ValueError(f"reserved {adv.reserved} does not fit 4 bits")
    if len(adv.addresses) > 255:
        raise ValueError("more than 255 addresses")
    if any(a.version != source.version for a in adv.addresses):
        raise ValueError(f"addresses {adv.addresses} are not all IPv{source.version}")
    body = b"".join(a.packed for a in adv.addresses)
    head = _HEADER.pack(
        (VERSION << 4) | TYPE_ADVERTISEMENT,
        adv.vrid,
        adv.priority,
        len(adv.addresses),
        (adv.reserved << 12) | adv.interval_cs,
        0,
    )
    length = len(head) + len(body)
    csum = checksum(pseudo_header(source, destination, length) + head + body)
    return head[:6] + struct.pack("!H", csum) + body


def decode(data: bytes, source: Address, destination: Address) -> AdvertisementV3:
    """Parse a VRRPv3 message that went from ``source`` to ``destination``.

    Checks version, type, length, checksum (over the pseudo-header) and a non-zero interval.
    Bytes after the advertised length (Ethernet padding) are ignored.
    """
    if not data:
        raise PacketError(DropReason.TRUNCATED, "0 bytes, need at least 8")
    if data[0] >> 4 != VERSION:
        raise version_error(data[0] >> 4, VERSION)
    if data[0] & 0x0F != TYPE_ADVERTISEMENT:
        raise PacketError(DropReason.TYPE, f"type {data[0] & 0x0F} at offset 0, expected 1")
    if len(data) < HEADER_LEN:
        raise PacketError(DropReason.TRUNCATED, f"{len(data)} bytes, need at least 8")
    _vt, vrid, priority, count, rsvd_interval, csum = _HEADER.unpack_from(data)
    size = _family_len(source)
    expected = HEADER_LEN + size * count
    if len(data) < expected:
        raise PacketError(
            DropReason.LENGTH,
            f"count {count} at offset 3 needs {expected} bytes (IPv{source.version}), "
            f"got {len(data)}",
        )
    data = bytes(data[:expected])
    if checksum(pseudo_header(source, destination, expected) + data) != 0:
        raise PacketError(
            DropReason.CHECKSUM,
            f"checksum 0x{csum:04x} at offset 6 is wrong (pseudo-header {source} -> {destination})",
        )
    interval = rsvd_interval & MAX_INTERVAL
    if interval == 0:
        # A master claiming a 0 interval would make every backup's Master_Down 0 (RFC 5798
        # gives no meaning to it): refused rather than adopted.
        raise PacketError(DropReason.INTERVAL, "max advert interval 0 at offset 4")
    cls = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    addresses = tuple(
        cls(data[HEADER_LEN + size * i : HEADER_LEN + size * (i + 1)]) for i in range(count)
    )
    return AdvertisementV3(vrid, priority, addresses, interval, rsvd_interval >> 12)


def decode_ip(packet: bytes) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address, int,
                                      AdvertisementV3]:
    """Parse an IPv4 packet as a raw socket delivers it: (source, destination, ttl, advert)."""
    head = parse_ip4(packet)
    return head.source, head.destination, head.ttl, decode(head.payload, head.source,
                                                           head.destination)


@dataclass(frozen=True, slots=True)
class ExpectV3:
    """What this router accepts on one VRRPv3 virtual router (RFC 5798 7.1, after decoding).

    No interval check: a backup adopts the master's interval (RFC 5798 6.4.2).
    """

    vrid: int
    addresses: frozenset[Address]


def validate(ttl: int, adv: AdvertisementV3, expect: ExpectV3) -> None:
    """The receive checks of RFC 5798 section 7.1 that need local configuration."""
    if ttl != VRRP_TTL:
        raise PacketError(DropReason.TTL, f"TTL/hop limit {ttl}, must be 255")
    if adv.vrid != expect.vrid:
        raise PacketError(DropReason.VRID, f"VRID {adv.vrid} is not configured here")
    # As for VRRPv2: a mismatch is accepted only from the address owner (priority 255).
    if adv.priority != 255 and frozenset(adv.addresses) != expect.addresses:
        raise PacketError(
            DropReason.ADDRESSES,
            f"addresses {sorted(map(str, adv.addresses))} differ from configured "
            f"{sorted(map(str, expect.addresses))}",
        )
