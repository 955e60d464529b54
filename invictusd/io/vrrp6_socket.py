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

As over IPv4 (``invictusd.io.vrrp_socket``), two receivers split what arrives with a BPF
filter each (``invictusd.vrrp.filter``): a fast lane for what looks like this instance's
genuine adverts, a slow lane for everything else. An IPv6 raw socket's filter sees the
payload at offset 0 and reaches the header (hop limit, source, destination) through
``SKF_NET_OFF``, so both lanes split on every check but the address list, as over IPv4.
With unicast peers neither receiver joins ff02::12; both are bound to the link-local address
(the peers' destination) and turn ``IPV6_MULTICAST_ALL`` off: an unbound IPv6 raw socket gets
every multicast packet the link accepted for any socket of the host (keepalived's, say).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from invictusd.io.sockopt import Buffers, attach_filter, force_buffers, kernel_drops
from invictusd.io.vrrp_socket import FAST_RCVBUF, SLOW_RCVBUF
from invictusd.vrrp.filter import LaneSpec, fast_lane, slow_lane
from invictusd.vrrp.packet import VRRP_PROTO, VRRP_TTL
from invictusd.vrrp.v3 import GROUP6

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
IPV6_FREEBIND = getattr(socket, "IPV6_FREEBIND", 78)  # Linux >= 4.15
IPV6_MULTICAST_ALL = getattr(socket, "IPV6_MULTICAST_ALL", 29)  # linux/in6.h, Linux >= 4.20
RECV_SIZE = 2048
_ANCILLARY = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(4)  # in6_pktinfo + hop limit


@dataclass(frozen=True, slots=True)
class Received6:
    """One IPv6 VRRP packet as ``recvmsg`` tells it."""

    payload: bytes
    source: ipaddress.IPv6Address
    destination: ipaddress.IPv6Address
    hop_limit: int  # -1 if the kernel did not say (never expected)


_UNSPECIFIED = ipaddress.IPv6Address(0)


def _address(text: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(text.split("%", 1)[0])


class Vrrp6Socket:
    def __init__(self, ifname: str, ifindex: int, source: ipaddress.IPv6Address, spec: LaneSpec,
                 unicast: bool = False) -> None:
        self.ifname, self.ifindex, self.source, self.unicast = ifname, ifindex, source, unicast
        socks: list[socket.socket] = []
        try:
            tx = socket.socket(socket.AF_INET6, socket.SOCK_RAW, VRRP_PROTO)
            socks.append(tx)
            tx.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
            tx.setblocking(False)
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, VRRP_TTL)
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, VRRP_TTL)
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 0xC0)  # CS6, network control
            # The link-local address may still be tentative (DAD) right after boot.
            tx.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            tx.bind((str(source), 0, 0, ifindex))
            lanes = []
            for program, size in ((fast_lane(spec), FAST_RCVBUF), (slow_lane(spec), SLOW_RCVBUF)):
                rx = socket.socket(socket.AF_INET6, socket.SOCK_RAW, VRRP_PROTO)
                socks.append(rx)
                # The filter first: nothing unfiltered is ever queued.
                attach_filter(rx, program)
                rx.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
                rx.setblocking(False)
                rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
                rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                lanes.append((rx, force_buffers(rx, rcvbuf=size)))
                if unicast:
                    # No group's packets through another socket's membership: an unbound IPv6
                    # raw socket takes every multicast packet its link accepted, a bound one
                    # only its groups' (none), and with IPV6_MULTICAST_ALL off.
                    rx.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
                    rx.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
                    rx.bind((str(source), 0, 0, ifindex))
                else:
                    mreq = GROUP6.packed + struct.pack("@I", ifindex)
                    rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        except OSError:
            for s in socks:
                s.close()
            raise
        self.tx = tx
        (self.fast, self.fast_buffers), (self.slow, self.slow_buffers) = lanes

    def update(self, spec: LaneSpec) -> None:
        """New addresses (reload): the kernel swaps filters atomically."""
        attach_filter(self.fast, fast_lane(spec))
        attach_filter(self.slow, slow_lane(spec))

    def send(self, payload: bytes, destination: str = str(GROUP6)) -> None:
        self.tx.sendto(payload, (destination, 0, 0, self.ifindex))

    @staticmethod
    def recv(sock: socket.socket, budget: int) -> list[Received6]:
        """Up to ``budget`` packets waiting on ``sock``, each with its header fields."""
        out: list[Received6] = []
        recvmsg = sock.recvmsg
        while len(out) < budget:
            try:
                data, ancdata, _flags, addr = recvmsg(RECV_SIZE, _ANCILLARY)
            except BlockingIOError:
                break
            hop_limit = -1
            destination = _UNSPECIFIED
            for level, kind, value in ancdata:
                if level != socket.IPPROTO_IPV6:
                    continue
                if kind == socket.IPV6_HOPLIMIT and len(value) >= 4:
                    hop_limit = struct.unpack("@i", value[:4])[0]
                elif kind == socket.IPV6_PKTINFO and len(value) >= 16:
                    destination = ipaddress.IPv6Address(value[:16])
            out.append(Received6(data, _address(addr[0]), destination, hop_limit))
        return out

    def overflows(self) -> tuple[int, int]:
        """Packets the kernel dropped because a lane's queue was full: (fast, slow)."""
        return kernel_drops(self.fast), kernel_drops(self.slow)

    def buffers(self) -> dict[str, Buffers]:
        return {"fast": self.fast_buffers, "slow": self.slow_buffers}

    def close(self) -> None:
        for s in (self.tx, self.fast, self.slow):
            s.close()
