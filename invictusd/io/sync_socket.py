"""UDP socket on the dedicated sync interface, accepting only the configured peer."""

from __future__ import annotations

import ipaddress
import socket

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
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
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

    def recv(self) -> bytes | None:
        """The next datagram from the peer; others are counted and dropped. None when empty."""
        while True:
            try:
                data, source = self.sock.recvfrom(65535)
            except BlockingIOError:
                return None
            except OSError:
                # ICMP errors (peer port unreachable while it restarts) surface here.
                continue
            if source == self.peer:
                return data
            self.foreign += 1

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
