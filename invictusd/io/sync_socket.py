"""UDP socket on the dedicated sync interface, accepting only the configured peer."""

from __future__ import annotations

import ipaddress
import socket

from invictusd.io.sockopt import force_buffers

# Queue limits: a burst of the peer's datagrams while our loop is busy must not be dropped
# (each drop costs a resend round trip). The kernel doubles these.
RCVBUF = 16 << 20
SNDBUF = 16 << 20

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2


class SyncSocket:
    def __init__(
        self, ifname: str, local: ipaddress.IPv4Address, peer: ipaddress.IPv4Address, port: int
    ) -> None:
        self.peer = (str(peer), port)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
            self.buffers = force_buffers(s, RCVBUF, SNDBUF)
            # Never fragment: a datagram is sized to the link MTU; a lost fragment loses it all.
            s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0xC0)
            s.bind((str(local), port))
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        self.sock = s
        self.foreign = 0  # datagrams from anyone but the peer
        self.send_errors = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, budget: int) -> list[bytes]:
        """Up to ``budget`` datagrams waiting (from anyone: those not from the peer are
        counted in ``foreign`` and dropped, and use up the budget too)."""
        out: list[bytes] = []
        recvfrom = self.sock.recvfrom
        peer = self.peer
        for _ in range(budget):
            try:
                data, source = recvfrom(65535)
            except BlockingIOError:
                break
            except OSError:
                # ICMP errors (peer port unreachable while it restarts) surface here.
                continue
            if source == peer:
                out.append(data)
            else:
                self.foreign += 1
        return out

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendto(data, self.peer)
            return True
        except OSError:
            # Link down, buffer full, peer unreachable: the session's acks and resends repair it.
            self.send_errors += 1
            return False

    def close(self) -> None:
        self.sock.close()
