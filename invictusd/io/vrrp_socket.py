"""Raw IP protocol 112 sockets for one interface.

The sender is bound to the real address (so adverts never leave from a virtual address that
happens to be primary) with TTL 255. Two receivers are tied to the interface and joined to
224.0.0.18 (a raw socket bound to a unicast address would not see the group); a BPF filter
on each splits what arrives (``invictusd.vrrp.filter``): the fast lane gets only what looks
like this router's genuine adverts, the slow lane everything else. A flood therefore fills
the slow lane's queue, never the one the peer's adverts arrive on.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from invictusd.io.sockopt import Buffers, attach_filter, force_buffers, kernel_drops
from invictusd.vrrp.filter import LaneSpec, fast_lane, slow_lane
from invictusd.vrrp.packet import VRRP_GROUP, VRRP_PROTO, VRRP_TTL

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
RECV_SIZE = 2048
# Queue limits (the kernel charges ~1 KB per queued small packet). The fast lane only ever
# holds genuine-looking adverts; the slow lane's backlog is junk the rate limit did not read.
FAST_RCVBUF = 1 << 20
SLOW_RCVBUF = 2 << 20


def _mreqn(group: str, local: ipaddress.IPv4Address, ifindex: int) -> bytes:
    return struct.pack("4s4si", socket.inet_aton(group), local.packed, ifindex)


class VrrpSocket:
    def __init__(self, ifname: str, ifindex: int, source: ipaddress.IPv4Address, spec: LaneSpec) -> None:
        self.ifname, self.ifindex, self.source = ifname, ifindex, source
        socks: list[socket.socket] = []
        try:
            tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, VRRP_PROTO)
            socks.append(tx)
            tx.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
            tx.setblocking(False)
            mreq = _mreqn(VRRP_GROUP, source, ifindex)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreq)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, VRRP_TTL)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0xC0)  # CS6, network control
            tx.bind((str(source), 0))
            lanes = []
            for program, size in ((fast_lane(spec), FAST_RCVBUF), (slow_lane(spec), SLOW_RCVBUF)):
                rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, VRRP_PROTO)
                socks.append(rx)
                # The filter first: nothing unfiltered is ever queued.
                attach_filter(rx, program)
                rx.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
                rx.setblocking(False)
                lanes.append((rx, force_buffers(rx, rcvbuf=size)))
                rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        except OSError:
            for s in socks:
                s.close()
            raise
        self.tx = tx
        (self.fast, self.fast_buffers), (self.slow, self.slow_buffers) = lanes

    def update(self, spec: LaneSpec) -> None:
        """New password, interval or addresses (reload): the kernel swaps filters atomically."""
        attach_filter(self.fast, fast_lane(spec))
        attach_filter(self.slow, slow_lane(spec))

    def send(self, payload: bytes) -> None:
        self.tx.sendto(payload, (VRRP_GROUP, 0))

    @staticmethod
    def recv(sock: socket.socket, budget: int) -> list[bytes]:
        """Up to ``budget`` IPv4 packets (header included) waiting on ``sock``."""
        out: list[bytes] = []
        recv = sock.recv
        while len(out) < budget:
            try:
                out.append(recv(RECV_SIZE))
            except BlockingIOError:
                break
        return out

    def overflows(self) -> tuple[int, int]:
        """Packets the kernel dropped because a lane's queue was full: (fast, slow)."""
        return kernel_drops(self.fast), kernel_drops(self.slow)

    def buffers(self) -> dict[str, Buffers]:
        return {"fast": self.fast_buffers, "slow": self.slow_buffers}

    def close(self) -> None:
        for s in (self.tx, self.fast, self.slow):
            s.close()
