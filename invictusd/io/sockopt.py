"""Socket options every adapter needs the same way: forced buffer sizes, BPF filters, drops.

One helper per chore so that no socket quietly ends up with the kernel's default limits:
``SO_RCVBUF`` is capped at ``net.core.rmem_max`` (208 KiB on a stock Debian kernel), so the
daemon (which holds CAP_NET_ADMIN) uses the FORCE variants and reports what it obtained.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections.abc import Sequence
from typing import NamedTuple

from invictusd import cbpf

SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8
_MEMINFO = struct.Struct("=9I")


class Buffers(NamedTuple):
    """What the kernel granted (it doubles a request for bookkeeping), and whether it was
    the forced size or one capped by rmem_max/wmem_max (no CAP_NET_ADMIN)."""

    rcvbuf: int
    sndbuf: int
    forced: bool


def force_buffers(sock: socket.socket, rcvbuf: int | None = None, sndbuf: int | None = None) -> Buffers:
    """Set the buffer sizes with SO_*BUFFORCE (falling back to the capped options without
    the capability) and return the sizes obtained."""
    forced = True
    for size, force, plain in ((rcvbuf, SO_RCVBUFFORCE, socket.SO_RCVBUF),
                               (sndbuf, SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        if size is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except PermissionError:
            forced = False
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
    return buffers(sock, forced)


def buffers(sock: socket.socket, forced: bool = True) -> Buffers:
    return Buffers(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                   sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), forced)


def attach_filter(sock: socket.socket, program: Sequence[cbpf.Insn]) -> None:
    """SO_ATTACH_FILTER with a classic BPF program (copied by the kernel at once)."""
    code = ctypes.create_string_buffer(cbpf.encode(program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def kernel_drops(sock: socket.socket) -> int:
    """Packets the kernel dropped for this socket because its queue was full (sk_drops)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
    except OSError as e:
        if e.errno in (errno.ENOPROTOOPT, errno.EBADF):
            return 0
        raise
    return int(_MEMINFO.unpack(raw.ljust(_MEMINFO.size, b"\0"))[SK_MEMINFO_DROPS])
