"""Raw IPv6 protocol 112 sockets for one interface (VRRPv3 over IPv6, RFC 5798).

A raw IPv6 socket delivers the payload only, never the IPv6 header: the hop limit (checked
to be 255) and the destination (part of the checksum's pseudo-header, and ff02::12 or our
own address with unicast) come as ancillary data (``IPV6_RECVHOPLIMIT``,
``IPV6_RECVPKTINFO``), the source as the ``recvmsg`` address.

The sender is bound to the interface's link-local address (RFC 5798 5.1.2.1: the source of
an IPv6 advert is the link-local address) and sends with hop limit 255, to ff02::12 or to
each unicast peer. The checksum is ours (``invictusd.vrrp.v3``): ``IPV6_CHECKSUM`` is not set,
so a packet with a bad checksum still reaches us and is counted instead of vanishing in the
kernel.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from invictusd.vrrp.packet import VRRP_PROTO, VRRP_TTL
from invictusd.vrrp.v3 import GROUP6

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
IPV6_FREEBIND = getattr(socket, "IPV6_FREEBIND", 78)  # Linux >= 4.15
RECV_SIZE = 2048
_ANCILLARY = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(4)  # in6_pktinfo + hop limit


@dataclass(frozen=True, slots=True)
class Received6:
    """One IPv6 VRRP packet as ``recvmsg`` tells it."""

    payload: bytes
    source: ipaddress.IPv6Address
    destination: ipaddress.IPv6Address
    hop_limit: int  # -1 if the kernel did not say (never expected)


def _address(text: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(text.split("%", 1)[0])


class Vrrp6Socket:
    def __init__(self, ifname: str, ifindex: int, source: ipaddress.IPv6Address,
                 unicast: bool = False) -> None:
        self.ifname, self.ifindex, self.source = ifname, ifindex, source
        tx = socket.socket(socket.AF_INET6, socket.SOCK_RAW, VRRP_PROTO)
        rx = socket.socket(socket.AF_INET6, socket.SOCK_RAW, VRRP_PROTO)
        try:
            for s in (tx, rx):
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
                s.setblocking(False)
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, VRRP_TTL)
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, VRRP_TTL)
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 0xC0)  # CS6, network control
            # The link-local address may still be tentative (DAD) right after boot.
            tx.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            tx.bind((str(source), 0, 0, ifindex))
            rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
            rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            if not unicast:
                mreq = GROUP6.packed + struct.pack("@I", ifindex)
                rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        except OSError:
            tx.close()
            rx.close()
            raise
        self.tx, self.rx = tx, rx

    def fileno(self) -> int:
        return self.rx.fileno()

    def send(self, payload: bytes, destination: str = str(GROUP6)) -> None:
        self.tx.sendto(payload, (destination, 0, 0, self.ifindex))

    def recv(self) -> Received6 | None:
        """One packet with its header fields, or None when nothing is waiting."""
        try:
            data, ancdata, _flags, addr = self.rx.recvmsg(RECV_SIZE, _ANCILLARY)
        except BlockingIOError:
            return None
        hop_limit = -1
        destination = ipaddress.IPv6Address(0)
        for level, kind, value in ancdata:
            if level != socket.IPPROTO_IPV6:
                continue
            if kind == socket.IPV6_HOPLIMIT and len(value) >= 4:
                hop_limit = struct.unpack("@i", value[:4])[0]
            elif kind == socket.IPV6_PKTINFO and len(value) >= 16:
                destination = ipaddress.IPv6Address(value[:16])
        return Received6(data, _address(addr[0]), destination, hop_limit)

    def close(self) -> None:
        self.tx.close()
        self.rx.close()
