"""Gratuitous ARP on a persistent AF_PACKET socket (opening one costs ~12 ms; sending ~15 us)."""

from __future__ import annotations

import ipaddress
import socket
import struct

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
_ARP = struct.Struct("!6s6sHHHBBH6s4s6s4s")


def garp_frames(mac: bytes, address: ipaddress.IPv4Address) -> tuple[bytes, bytes]:
    """A gratuitous ARP request and reply for ``address`` at ``mac``, padded to 60 bytes."""
    ip = address.packed
    request = _ARP.pack(BROADCAST, mac, ETH_P_ARP, 1, 0x0800, 6, 4, 1, mac, ip, b"\0" * 6, ip)
    reply = _ARP.pack(BROADCAST, mac, ETH_P_ARP, 1, 0x0800, 6, 4, 2, mac, ip, mac, ip)
    return request.ljust(60, b"\0"), reply.ljust(60, b"\0")


class GarpSocket:
    def __init__(self, ifname: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        try:
            self.sock.bind((ifname, ETH_P_ARP))
            self.sock.setblocking(False)
            self.mac: bytes = self.sock.getsockname()[4]
        except OSError:
            self.sock.close()
            raise
        self.ifname = ifname

    def announce(self, addresses: list[ipaddress.IPv4Address], repeat: int = 1) -> int:
        sent = 0
        for _ in range(repeat):
            for address in addresses:
                for frame in garp_frames(self.mac, address):
                    try:
                        self.sock.send(frame)
                        sent += 1
                    except (BlockingIOError, OSError):
                        # A full queue or a link going down: the next burst or refresh
                        # retries; never let ARP stop the state machine.
                        pass
        return sent

    def close(self) -> None:
        self.sock.close()


ICMPV6_NA = 136
NA_OVERRIDE = 0x20000000
NA_ROUTER = 0x80000000
ALL_NODES = "ff02::1"
_NA = struct.Struct("!BBHI16sBB6s")


def na_message(address: ipaddress.IPv6Address, mac: bytes, router: bool = False) -> bytes:
    """Unsolicited neighbour advertisement (RFC 4861 7.2.6), override flag, target LL option.

    ``router`` sets the Router flag, as RFC 5798 6.4.2 asks of a VRRPv3 master (hosts that
    use the address as their default router keep it in their router list).
    The checksum field is left 0: the kernel fills it in for raw ICMPv6 sockets.
    """
    flags = NA_OVERRIDE | (NA_ROUTER if router else 0)
    return _NA.pack(ICMPV6_NA, 0, 0, flags, address.packed, 2, 1, mac)


class NeighbourAdvertiser:
    """The IPv6 counterpart of gratuitous ARP, on a raw ICMPv6 socket per interface."""

    def __init__(self, ifname: str, ifindex: int) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 25, ifname.encode())  # SO_BINDTODEVICE
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.ifindex = ifindex

    def announce(self, addresses: list[ipaddress.IPv6Address], mac: bytes, repeat: int = 1,
                 router: bool = False) -> int:
        sent = 0
        for _ in range(repeat):
            for address in addresses:
                try:
                    message = na_message(address, mac, router)
                    self.sock.sendto(message, (ALL_NODES, 0, 0, self.ifindex))
                    sent += 1
                except OSError:
                    pass  # as for ARP: the next burst or refresh retries
        return sent

    def close(self) -> None:
        self.sock.close()
