"""Raw IP protocol 112 sockets for one interface.

Two sockets: the sender is bound to the real address (so adverts never leave from a virtual
address that happens to be primary) with TTL 255; the receiver is unbound (a raw socket bound
to a unicast address would not see packets to 224.0.0.18) and tied to the interface.

With unicast peers the receiver does not join 224.0.0.18 (multicast adverts of other routers
on the segment are not even delivered) and adverts go to each peer with TTL 255. The IPv6
counterpart (VRRPv3) is ``invictusd.io.vrrp6_socket``.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from invictusd.vrrp.packet import VRRP_GROUP, VRRP_PROTO, VRRP_TTL

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
RECV_SIZE = 2048


def _mreqn(group: str, local: ipaddress.IPv4Address, ifindex: int) -> bytes:
    return struct.pack("4s4si", socket.inet_aton(group), local.packed, ifindex)


class VrrpSocket:
    def __init__(self, ifname: str, ifindex: int, source: ipaddress.IPv4Address,
                 unicast: bool = False) -> None:
        self.ifname, self.ifindex, self.source = ifname, ifindex, source
        tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, VRRP_PROTO)
        rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, VRRP_PROTO)
        try:
            for s in (tx, rx):
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
                s.setblocking(False)
            mreq = _mreqn(VRRP_GROUP, source, ifindex)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreq)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, VRRP_TTL)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, VRRP_TTL)  # unicast peers
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0xC0)  # CS6, network control
            tx.bind((str(source), 0))
            if not unicast:
                rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            # A flood of forged adverts must not crowd the real ones out of the queue while
            # the loop is busy (default ~200 KB is ~1,000 packets).
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        except OSError:
            tx.close()
            rx.close()
            raise
        self.tx, self.rx = tx, rx

    def fileno(self) -> int:
        return self.rx.fileno()

    def send(self, payload: bytes, destination: str = VRRP_GROUP) -> None:
        self.tx.sendto(payload, (destination, 0))

    def recv(self) -> bytes | None:
        """One IPv4 packet (header included), or None when nothing is waiting."""
        try:
            return self.rx.recv(RECV_SIZE)
        except BlockingIOError:
            return None

    def close(self) -> None:
        self.tx.close()
        self.rx.close()
