"""VRRPv2 advertisement codec (RFC 3768 section 5, auth type 1 from RFC 2338).

Pure functions over bytes. ``decode`` either returns an ``Advertisement`` or raises
``PacketError`` whose ``reason`` is one of the receive-check counters the daemon keeps
(``DropReason``), so every dropped packet is counted under the check it failed. The VRRPv3
codec (``invictusd.vrrp.v3``) shares the reasons, the error and the checksum.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import struct
from dataclasses import dataclass

VRRP_PROTO = 112
VRRP_GROUP = "224.0.0.18"
VRRP_TTL = 255
VERSION = 2
TYPE_ADVERTISEMENT = 1
AUTH_NONE = 0
AUTH_PASSWORD = 1
AUTH_DATA_LEN = 8
HEADER_LEN = 8
MAX_PASSWORD = AUTH_DATA_LEN

_HEADER = struct.Struct("!BBBBBBH")


class DropReason(enum.StrEnum):
    """Why a received packet was dropped: one counter each (RFC 3768 section 7.1 order)."""

    TRUNCATED = "truncated"
    TTL = "ttl"
    VERSION = "version"
    TYPE = "type"
    LENGTH = "length"
    CHECKSUM = "checksum"
    VRID = "vrid"
    AUTH_TYPE = "auth_type"
    AUTH_FAIL = "auth_fail"
    INTERVAL = "interval"
    ADDRESSES = "addresses"
    OWN = "own_packet"
    # With unicast_peers: the advert came from an address that is not a listed peer.
    SOURCE = "source"


class PacketError(ValueError):
    """A packet that fails a receive check; ``reason`` says which, ``detail`` says how."""

    def __init__(self, reason: DropReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Advertisement:
    vrid: int
    priority: int
    addresses: tuple[ipaddress.IPv4Address, ...]
    advert_interval: int = 1
    auth_type: int = AUTH_PASSWORD
    auth_data: bytes = b""  # the password, unpadded (trailing NULs stripped on decode)


def checksum(data: bytes) -> int:
    """Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data = bytes(data) + b"\0"  # not +=: that would extend a caller's bytearray
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pad_password(password: bytes) -> bytes:
    if len(password) > AUTH_DATA_LEN:
        raise ValueError(f"password is {len(password)} bytes, at most {AUTH_DATA_LEN} allowed")
    return password.ljust(AUTH_DATA_LEN, b"\0")


def encode(adv: Advertisement) -> bytes:
    """The VRRP message (without IP header), checksum filled in."""
    if not 1 <= adv.vrid <= 255:
        raise ValueError(f"vrid {adv.vrid} out of range 1..255")
    if not 0 <= adv.priority <= 255:
        raise ValueError(f"priority {adv.priority} out of range 0..255")
    if not 1 <= adv.advert_interval <= 255:
        raise ValueError(f"advert_interval {adv.advert_interval} out of range 1..255")
    if len(adv.addresses) > 255:
        raise ValueError("more than 255 addresses")
    auth = pad_password(adv.auth_data) if adv.auth_type == AUTH_PASSWORD else b"\0" * 8
    body = b"".join(a.packed for a in adv.addresses) + auth
    head = _HEADER.pack(
        (VERSION << 4) | TYPE_ADVERTISEMENT,
        adv.vrid,
        adv.priority,
        len(adv.addresses),
        adv.auth_type,
        adv.advert_interval,
        0,
    )
    csum = checksum(head + body)
    return head[:6] + struct.pack("!H", csum) + body


def version_error(found: int, expected: int) -> PacketError:
    """The drop of an advert of the other VRRP version: a peer configured differently."""
    hint = " (the peer runs another VRRP version: set the same `version` on both nodes)" if (
        found in (2, 3)) else ""
    return PacketError(
        DropReason.VERSION, f"version {found} at offset 0, expected {expected}{hint}"
    )


def decode(data: bytes) -> Advertisement:
    """Parse a VRRP message (without IP header); checks version, type, length, checksum."""
    # The version first: a VRRPv3 advert is shorter than 16 bytes and must be counted as
    # the other version, not as truncated.
    if data and data[0] >> 4 != VERSION:
        raise version_error(data[0] >> 4, VERSION)
    if len(data) < HEADER_LEN + AUTH_DATA_LEN:
        raise PacketError(DropReason.TRUNCATED, f"{len(data)} bytes, need at least 16")
    ver_type, vrid, priority, count, auth_type, interval, _csum = _HEADER.unpack_from(data)
    if ver_type & 0x0F != TYPE_ADVERTISEMENT:
        raise PacketError(DropReason.TYPE, f"type {ver_type & 0x0F} at offset 0, expected 1")
    expected = HEADER_LEN + 4 * count + AUTH_DATA_LEN
    if len(data) < expected:
        raise PacketError(
            DropReason.LENGTH, f"count {count} at offset 3 needs {expected} bytes, got {len(data)}"
        )
    # Trailing bytes beyond the advertised length (Ethernet padding) are not ours to sum.
    data = data[:expected]
    if checksum(data) != 0:
        raise PacketError(DropReason.CHECKSUM, f"checksum 0x{_csum:04x} at offset 6 is wrong")
    addresses = tuple(
        ipaddress.IPv4Address(data[HEADER_LEN + 4 * i : HEADER_LEN + 4 * i + 4])
        for i in range(count)
    )
    auth = data[expected - AUTH_DATA_LEN : expected]
    return Advertisement(
        vrid=vrid,
        priority=priority,
        addresses=addresses,
        advert_interval=interval,
        auth_type=auth_type,
        auth_data=auth.rstrip(b"\0"),
    )


@dataclass(frozen=True, slots=True)
class Ip4Header:
    """What the receive checks need of the IPv4 header a raw socket delivers."""

    source: ipaddress.IPv4Address
    destination: ipaddress.IPv4Address
    ttl: int
    payload: bytes  # the VRRP message, cut to the IP total length


def parse_ip4(packet: bytes) -> Ip4Header:
    """Split an IPv4 packet (as a raw socket delivers it) into header fields and payload."""
    if len(packet) < 20:
        raise PacketError(DropReason.TRUNCATED, f"{len(packet)} bytes, no IPv4 header")
    ihl = (packet[0] & 0x0F) * 4
    if packet[0] >> 4 != 4 or ihl < 20 or len(packet) < ihl:
        raise PacketError(DropReason.TRUNCATED, "bad IPv4 header length at offset 0")
    if packet[9] != VRRP_PROTO:
        raise PacketError(DropReason.TYPE, f"IP protocol {packet[9]} at offset 9, expected 112")
    total = struct.unpack_from("!H", packet, 2)[0]
    if ihl <= total <= len(packet):
        packet = packet[:total]
    return Ip4Header(
        ipaddress.IPv4Address(packet[12:16]), ipaddress.IPv4Address(packet[16:20]), packet[8],
        bytes(packet[ihl:]),
    )


def decode_ip(packet: bytes) -> tuple[ipaddress.IPv4Address, int, Advertisement]:
    """Parse an IPv4 packet as a raw socket delivers it: (source, ttl, advertisement)."""
    head = parse_ip4(packet)
    return head.source, head.ttl, decode(head.payload)


@dataclass(frozen=True, slots=True)
class Expect:
    """What this router accepts on one virtual router (section 7.1 checks after decoding)."""

    vrid: int
    advert_interval: int
    addresses: frozenset[ipaddress.IPv4Address]
    auth_type: int
    password: bytes


def validate(ttl: int, adv: Advertisement, expect: Expect) -> None:
    """The receive checks of RFC 3768 section 7.1 that need local configuration."""
    if ttl != VRRP_TTL:
        raise PacketError(DropReason.TTL, f"TTL {ttl}, must be 255")
    if adv.vrid != expect.vrid:
        raise PacketError(DropReason.VRID, f"VRID {adv.vrid} is not configured here")
    if adv.auth_type != expect.auth_type:
        raise PacketError(
            DropReason.AUTH_TYPE, f"auth type {adv.auth_type}, configured {expect.auth_type}"
        )
    if expect.auth_type == AUTH_PASSWORD and not hmac.compare_digest(
        pad_password(adv.auth_data), pad_password(expect.password)
    ):
        raise PacketError(DropReason.AUTH_FAIL, "password does not match")
    if adv.advert_interval != expect.advert_interval:
        raise PacketError(
            DropReason.INTERVAL,
            f"advert interval {adv.advert_interval}s, configured {expect.advert_interval}s",
        )
    # RFC: the address list check may be skipped for the owner (priority 255); we log but
    # accept a mismatch from an owner, and drop it from anyone else (a misconfigured peer).
    if adv.priority != 255 and frozenset(adv.addresses) != expect.addresses:
        raise PacketError(
            DropReason.ADDRESSES,
            f"addresses {sorted(map(str, adv.addresses))} differ from configured "
            f"{sorted(map(str, expect.addresses))}",
        )
