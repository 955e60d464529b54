"""Link and address changes from rtnetlink, parsed by hand (a few fields of two messages).

pyroute2 does the address changes and the start-up snapshot; this monitor only has to notice
a link going down or up and a virtual address removed behind our back, and it must work from
the event loop, which pyroute2's asyncio sockets do not under uvloop (kernel-notes.md).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import NamedTuple

from invictusd.io.sockopt import force_buffers

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFLA_IFNAME = 3

RCVBUF = 4 << 20  # address and link storms (many VLANs coming up) must not overrun it
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBi")
_NLATTR = struct.Struct("=HH")


class RtnlError(ValueError):
    def __init__(self, field: str, offset: int, detail: str) -> None:
        super().__init__(f"rtnetlink {field} at offset {offset}: {detail}")
        self.field, self.offset = field, offset


class LinkEvent(NamedTuple):
    ifindex: int
    up: bool  # administratively up and carrier present
    deleted: bool
    name: str = ""  # IFLA_IFNAME (tracked interfaces are named, and may come and go)


class AddrEvent(NamedTuple):
    ifindex: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    prefixlen: int
    deleted: bool


def parse(buf: bytes) -> list[LinkEvent | AddrEvent]:
    """Parse a datagram of rtnetlink messages; other message types are skipped."""
    out: list[LinkEvent | AddrEvent] = []
    off, end = 0, len(buf)
    while off + _NLMSGHDR.size <= end:
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if length < _NLMSGHDR.size or off + length > end:
            raise RtnlError("nlmsg_len", off, f"{length} does not fit in {end - off} bytes")
        body = off + _NLMSGHDR.size
        if mtype in (RTM_NEWLINK, RTM_DELLINK):
            if body + _IFINFOMSG.size > off + length:
                raise RtnlError("ifinfomsg", body, "truncated")
            _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(buf, body)
            up = bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP)
            name = _name_attr(buf, body + _IFINFOMSG.size, off + length)
            out.append(LinkEvent(index, up and mtype == RTM_NEWLINK, mtype == RTM_DELLINK, name))
        elif mtype in (RTM_NEWADDR, RTM_DELADDR):
            if body + _IFADDRMSG.size > off + length:
                raise RtnlError("ifaddrmsg", body, "truncated")
            family, prefixlen, _f, _scope, index = _IFADDRMSG.unpack_from(buf, body)
            if family in (socket.AF_INET, socket.AF_INET6):
                addr = _addr_attr(buf, body + _IFADDRMSG.size, off + length, family)
                if addr is not None:
                    out.append(AddrEvent(index, addr, prefixlen, mtype == RTM_DELADDR))
        off += (length + 3) & ~3
    return out


def _name_attr(buf: bytes, off: int, end: int) -> str:
    while off + _NLATTR.size <= end:
        alen, atype = _NLATTR.unpack_from(buf, off)
        if alen < _NLATTR.size or off + alen > end:
            raise RtnlError("nla_len", off, f"{alen} does not fit")
        if atype == IFLA_IFNAME:
            return buf[off + 4 : off + alen].split(b"\0", 1)[0].decode("utf-8", "replace")
        off += (alen + 3) & ~3
    return ""


def _addr_attr(
    buf: bytes, off: int, end: int, family: int
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    size = 4 if family == socket.AF_INET else 16
    found: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    while off + _NLATTR.size <= end:
        alen, atype = _NLATTR.unpack_from(buf, off)
        if alen < _NLATTR.size or off + alen > end:
            raise RtnlError("nla_len", off, f"{alen} does not fit")
        if atype in (IFA_LOCAL, IFA_ADDRESS) and alen == _NLATTR.size + size:
            found = ipaddress.ip_address(buf[off + 4 : off + 4 + size])
            if atype == IFA_LOCAL:
                return found
        off += (alen + 3) & ~3
    return found


class RtnlMonitor:
    def __init__(self, rcvbuf: int = RCVBUF) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self.buffers = force_buffers(self.sock, rcvbuf=rcvbuf)
            self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.overruns = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, budget: int) -> list[LinkEvent | AddrEvent]:
        """Up to ``budget`` datagrams. Raises ``OverflowError`` after an overrun (events were
        lost: the caller re-reads the state); what was read before it is lost with them."""
        events: list[LinkEvent | AddrEvent] = []
        for _ in range(budget):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == 105:  # ENOBUFS: events were lost
                    self.overruns += 1
                    raise OverflowError("rtnetlink overrun") from None
                raise
            events.extend(parse(data))
        return events

    def close(self) -> None:
        self.sock.close()
