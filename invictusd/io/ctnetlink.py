"""ctnetlink codec: raw conntrack netlink messages <-> ``invictusd.flows`` types.

Pure: no sockets, no pyroute2, no asyncio. ``invictusd.io.conntrack`` owns the sockets.

Layout reminders (linux/netlink.h, linux/netfilter/nfnetlink*.h):

* ``nlmsghdr`` (16 bytes) and ``nlattr`` headers (4 bytes) are host byte order; attribute
  payloads of ctnetlink are network byte order.
* Every ctnetlink message carries ``nfgenmsg`` (family u8, version u8, res_id be16) right
  after ``nlmsghdr``; the message type is ``NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_*``.
* Nested attributes may carry ``NLA_F_NESTED`` (recent kernels always set it), so the type
  is masked with ``NLA_TYPE_MASK`` before it is looked at.
* Events: NEW and UPDATE both arrive as ``IPCTNL_MSG_CT_NEW``; NEW carries
  ``NLM_F_CREATE|NLM_F_EXCL``. DESTROY arrives as ``IPCTNL_MSG_CT_DELETE``. Dump replies are
  ``IPCTNL_MSG_CT_NEW`` with ``NLM_F_MULTI`` and decode as UPDATE.

Building is done with precompiled big-endian ``struct.Struct`` templates: the (host order)
attribute headers are constants, so they are precomputed as the big-endian integer that has
the same bytes, and a whole tuple packs in a single call.
"""

from __future__ import annotations

import struct
from typing import Final

from invictusd import flows as F
from invictusd.flows import EventKind, Flow, FlowEvent, FlowKey

__all__ = [
    "CTA_ID",
    "CTA_MARK",
    "CTA_STATUS",
    "CTA_TIMEOUT",
    "KernelError",
    "NetlinkError",
    "build_create",
    "build_delete",
    "build_dump_request",
    "nat_attrs",
    "parse_ack1",
    "parse_acks",
    "parse_dump",
    "parse_messages",
    "with_ack",
]

# --- netlink -------------------------------------------------------------------------------
NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLMSG_OVERRUN: Final = 4

NLM_F_REQUEST: Final = 0x01
NLM_F_MULTI: Final = 0x02
NLM_F_ACK: Final = 0x04
NLM_F_DUMP: Final = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL: Final = 0x200
NLM_F_CREATE: Final = 0x400

NLA_F_NESTED: Final = 0x8000
NLA_TYPE_MASK: Final = 0x3FFF

NLMSG_HDRLEN: Final = 16
NFGEN_HDRLEN: Final = 4

# --- nfnetlink / ctnetlink -----------------------------------------------------------------
NFNL_SUBSYS_CTNETLINK: Final = 1
IPCTNL_MSG_CT_NEW: Final = 0
IPCTNL_MSG_CT_GET: Final = 1
IPCTNL_MSG_CT_DELETE: Final = 2

CT_NEW: Final = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
CT_GET: Final = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET
CT_DELETE: Final = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE

# enum ctattr_type
CTA_TUPLE_ORIG: Final = 1
CTA_TUPLE_REPLY: Final = 2
CTA_STATUS: Final = 3
CTA_PROTOINFO: Final = 4
CTA_NAT_SRC: Final = 6
CTA_TIMEOUT: Final = 7
CTA_MARK: Final = 8
CTA_ID: Final = 12
CTA_NAT_DST: Final = 13
CTA_ZONE: Final = 18
CTA_MARK_MASK: Final = 21
# enum ctattr_tuple
CTA_TUPLE_IP: Final = 1
CTA_TUPLE_PROTO: Final = 2
CTA_TUPLE_ZONE: Final = 3
# enum ctattr_ip
CTA_IP_V4_SRC: Final = 1
CTA_IP_V4_DST: Final = 2
CTA_IP_V6_SRC: Final = 3
CTA_IP_V6_DST: Final = 4
# enum ctattr_l4proto
CTA_PROTO_NUM: Final = 1
CTA_PROTO_SRC_PORT: Final = 2
CTA_PROTO_DST_PORT: Final = 3
CTA_PROTO_ICMP_ID: Final = 4
CTA_PROTO_ICMP_TYPE: Final = 5
CTA_PROTO_ICMP_CODE: Final = 6
CTA_PROTO_ICMPV6_ID: Final = 7
CTA_PROTO_ICMPV6_TYPE: Final = 8
CTA_PROTO_ICMPV6_CODE: Final = 9
# enum ctattr_protoinfo / ctattr_protoinfo_tcp
CTA_PROTOINFO_TCP: Final = 1
CTA_PROTOINFO_TCP_STATE: Final = 1
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: Final = 4
CTA_PROTOINFO_TCP_FLAGS_REPLY: Final = 5
# enum ctattr_nat / ctattr_protonat
CTA_NAT_V4_MINIP: Final = 1
CTA_NAT_V4_MAXIP: Final = 2
CTA_NAT_PROTO: Final = 3
CTA_NAT_V6_MINIP: Final = 4
CTA_NAT_V6_MAXIP: Final = 5
CTA_PROTONAT_PORT_MIN: Final = 1
CTA_PROTONAT_PORT_MAX: Final = 2

IP_CT_TCP_FLAG_BE_LIBERAL: Final = 0x08

AF_UNSPEC: Final = 0
AF_INET: Final = 2  # linux/socket.h (this codec imports no socket module)
AF_INET6: Final = 10

DEFAULT_TIMEOUT: Final = 60  # seconds, used when a flow carries no timeout (as conntrackd)


class NetlinkError(ValueError):
    """Malformed netlink input: names the field and the byte offset where decoding failed."""

    def __init__(self, field: str, offset: int, detail: str = "") -> None:
        self.field = field
        self.offset = offset
        self.detail = detail
        msg = f"{field} at offset {offset}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class KernelError(NetlinkError):
    """The kernel answered a request with ``NLMSG_ERROR`` carrying a non-zero error.

    A subclass of ``NetlinkError`` so that decoding any input yields a list or a
    ``NetlinkError``; ``errno`` is the positive error number.
    """

    def __init__(self, errno: int, offset: int, seq: int) -> None:
        self.errno = errno
        self.seq = seq
        super().__init__("nlmsgerr", offset, f"kernel error {errno} for seq {seq}")


# --- decoding ------------------------------------------------------------------------------
_NLMSGHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_BE32 = struct.Struct(">I")
_BE16 = struct.Struct(">H")
_I32 = struct.Struct("=i")
_H16 = struct.Struct("=H")

_nlmsghdr = _NLMSGHDR.unpack_from
_nla = _NLA.unpack_from
_be32 = _BE32.unpack_from
_be16 = _BE16.unpack_from

_ICMP_PROTOS = (F.IPPROTO_ICMP, F.IPPROTO_ICMPV6)
_NEW_FLAGS = NLM_F_CREATE | NLM_F_EXCL
_KIND_NEW = EventKind.NEW
_KIND_UPDATE = EventKind.UPDATE
_KIND_DESTROY = EventKind.DESTROY


def _as_bytes(buf: bytes | bytearray | memoryview, nbytes: int | None) -> tuple[bytes, int]:
    # One copy up front makes every later slice a ``bytes`` (what FlowKey wants) instead of
    # a memoryview or bytearray that would need converting field by field.
    n = len(buf) if nbytes is None else nbytes
    if n < 0 or n > len(buf):
        raise NetlinkError("nbytes", 0, f"{n} outside buffer of {len(buf)}")
    if type(buf) is bytes:
        return buf, n
    return bytes(memoryview(buf)[:n]), n


def _parse_tuple(buf: bytes, start: int, end: int, zone: int) -> FlowKey:
    """Decode one CTA_TUPLE_* nest spanning ``buf[start:end]`` (header included)."""
    a = start + 4
    family = 0
    src = dst = b""
    proto = -1
    sport = dport = 0
    icmp_type = icmp_code = 0
    while a + 4 <= end:
        alen, atype = _nla(buf, a)
        if alen < 4 or a + alen > end:
            raise NetlinkError("tuple attribute length", a, str(alen))
        atype &= NLA_TYPE_MASK
        aend = a + alen
        if atype == CTA_TUPLE_IP:
            b = a + 4
            while b + 4 <= aend:
                blen, btype = _nla(buf, b)
                if blen < 4 or b + blen > aend:
                    raise NetlinkError("CTA_TUPLE_IP attribute length", b, str(blen))
                btype &= NLA_TYPE_MASK
                if btype in (CTA_IP_V4_SRC, CTA_IP_V4_DST):
                    if blen != 8:
                        raise NetlinkError("CTA_IP_V4 address", b, f"length {blen}")
                    family = 4
                    if btype == CTA_IP_V4_SRC:
                        src = buf[b + 4 : b + 8]
                    else:
                        dst = buf[b + 4 : b + 8]
                elif btype in (CTA_IP_V6_SRC, CTA_IP_V6_DST):
                    if blen != 20:
                        raise NetlinkError("CTA_IP_V6 address", b, f"length {blen}")
                    family = 6
                    if btype == CTA_IP_V6_SRC:
                        src = buf[b + 4 : b + 20]
                    else:
                        dst = buf[b + 4 : b + 20]
                b += (blen + 3) & ~3
        elif atype == CTA_TUPLE_PROTO:
            b = a + 4
            while b + 4 <= aend:
                blen, btype = _nla(buf, b)
                if blen < 4 or b + blen > aend:
                    raise NetlinkError("CTA_TUPLE_PROTO attribute length", b, str(blen))
                btype &= NLA_TYPE_MASK
                if btype == CTA_PROTO_NUM:
                    if blen < 5:
                        raise NetlinkError("CTA_PROTO_NUM", b, f"length {blen}")
                    proto = buf[b + 4]
                elif btype in (CTA_PROTO_SRC_PORT, CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID):
                    if blen < 6:
                        raise NetlinkError("CTA_PROTO_SRC_PORT/ICMP_ID", b, f"length {blen}")
                    sport = _be16(buf, b + 4)[0]
                elif btype == CTA_PROTO_DST_PORT:
                    if blen < 6:
                        raise NetlinkError("CTA_PROTO_DST_PORT", b, f"length {blen}")
                    dport = _be16(buf, b + 4)[0]
                elif btype in (CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE):
                    if blen < 5:
                        raise NetlinkError("CTA_PROTO_ICMP_TYPE", b, f"length {blen}")
                    icmp_type = buf[b + 4]
                elif btype in (CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMPV6_CODE):
                    if blen < 5:
                        raise NetlinkError("CTA_PROTO_ICMP_CODE", b, f"length {blen}")
                    icmp_code = buf[b + 4]
                b += (blen + 3) & ~3
        elif atype == CTA_TUPLE_ZONE:
            if alen < 6:
                raise NetlinkError("CTA_TUPLE_ZONE", a, f"length {alen}")
            zone = _be16(buf, a + 4)[0]
        a += (alen + 3) & ~3
    if not family or not src or not dst:
        raise NetlinkError("CTA_TUPLE_IP", start, "missing or incomplete")
    if proto < 0:
        raise NetlinkError("CTA_PROTO_NUM", start, "missing")
    if proto == F.IPPROTO_ICMP or proto == F.IPPROTO_ICMPV6:
        dport = icmp_type << 8 | icmp_code
    return FlowKey(family, proto, src, dst, sport, dport, zone)


# Fixed layouts the kernel emits for the common tuples (ctnetlink_dump_tuples): checked by
# comparing all their attribute headers at once, then unpacked in one call. Anything else
# (other shapes, older kernels without NLA_F_NESTED, odd attributes) takes the generic walk.
def _fast_tuple(size: int, v6: bool) -> tuple[int, struct.Struct, tuple[int, ...], struct.Struct]:
    st, hdrs = _TUPLES[v6, False]
    alen = 16 if v6 else 4
    # Header words at their offsets; payload skipped.
    hfmt = f">4xII{alen}xI{alen}xII4xI4xI4x"
    dfmt = f">12x{alen}s4x{alen}s8xB7xH6xH2x"
    assert struct.calcsize(hfmt) == size == struct.calcsize(dfmt) == st.size
    return size, struct.Struct(hfmt), hdrs, struct.Struct(dfmt)


_NLA2 = struct.Struct("=HHHH").unpack_from
_tuple_new = tuple.__new__


def _key(buf: bytes, a: int, alen: int, zone: int) -> FlowKey:
    if alen == 52 and _ft4_h(buf, a) == _FT4_HDRS:
        src, dst, proto, sport, dport = _ft4_d(buf, a)
        return _tuple_new(FlowKey, (4, proto, src, dst, sport, dport, zone))
    if alen == 76 and _ft6_h(buf, a) == _FT6_HDRS:
        src, dst, proto, sport, dport = _ft6_d(buf, a)
        return _tuple_new(FlowKey, (6, proto, src, dst, sport, dport, zone))
    return _parse_tuple(buf, a, a + alen, zone)


def _parse_ct(buf: bytes, start: int, end: int, mtype: int, mflags: int, mark_mask: int) -> FlowEvent | None:
    """Decode one IPCTNL_MSG_CT_NEW/DELETE message; None if filtered out by ``mark_mask``."""
    a = start + 20  # nlmsghdr + nfgenmsg
    if a > end:
        raise NetlinkError("nfgenmsg", start + NLMSG_HDRLEN, "truncated")
    orig = reply = protoinfo = -1
    orig_len = reply_len = protoinfo_len = 0
    status = timeout = mark = ct_id = zone = 0
    # Hot loop: literal attribute numbers (CTA_*) in the order the kernel emits them.
    while a + 4 <= end:
        alen, atype = _nla(buf, a)
        if alen < 4 or a + alen > end:
            raise NetlinkError("attribute length", a, str(alen))
        atype &= 0x3FFF
        if atype == 1:  # CTA_TUPLE_ORIG
            orig, orig_len = a, alen
        elif atype == 2:  # CTA_TUPLE_REPLY
            reply, reply_len = a, alen
        elif atype == 12:  # CTA_ID
            if alen < 8:
                raise NetlinkError("CTA_ID", a, f"length {alen}")
            ct_id = _be32(buf, a + 4)[0]
        elif atype == 3:  # CTA_STATUS
            if alen < 8:
                raise NetlinkError("CTA_STATUS", a, f"length {alen}")
            # Bits above 15 do not exist in 6.x kernels; the sync format carries 16.
            status = _be32(buf, a + 4)[0] & 0xFFFF
        elif atype == 7:  # CTA_TIMEOUT
            if alen < 8:
                raise NetlinkError("CTA_TIMEOUT", a, f"length {alen}")
            timeout = _be32(buf, a + 4)[0]
        elif atype == 8:  # CTA_MARK
            if alen < 8:
                raise NetlinkError("CTA_MARK", a, f"length {alen}")
            mark = _be32(buf, a + 4)[0]
        elif atype == 4:  # CTA_PROTOINFO
            protoinfo, protoinfo_len = a, alen
        elif atype == 18:  # CTA_ZONE
            if alen < 6:
                raise NetlinkError("CTA_ZONE", a, f"length {alen}")
            zone = _be16(buf, a + 4)[0]
        a += (alen + 3) & ~3
    # The mark is known before the tuples are decoded: filtered-out events cost one walk.
    if mark_mask and not mark & mark_mask:
        return None
    if orig < 0:
        raise NetlinkError("CTA_TUPLE_ORIG", start, "missing")
    if reply < 0:
        raise NetlinkError("CTA_TUPLE_REPLY", start, "missing")
    okey = _key(buf, orig, orig_len, zone)
    rkey = _key(buf, reply, reply_len, zone)
    tcp_state = 0
    if protoinfo >= 0:
        # Fast path: CTA_PROTOINFO_TCP nest whose first attribute is CTA_PROTOINFO_TCP_STATE.
        if protoinfo_len >= 16:
            tlen, ttype, slen, stype = _NLA2(buf, protoinfo + 4)
            if ttype & 0x3FFF == 1 and stype == 1 and slen >= 5 and 12 <= tlen <= protoinfo_len - 4:
                tcp_state = buf[protoinfo + 12]
            else:
                tcp_state = _parse_tcp_state(buf, protoinfo, protoinfo + protoinfo_len)
        else:
            tcp_state = _parse_tcp_state(buf, protoinfo, protoinfo + protoinfo_len)
    if mtype == CT_DELETE:
        kind = _KIND_DESTROY
    elif mflags & _NEW_FLAGS == _NEW_FLAGS:
        kind = _KIND_NEW
    else:
        kind = _KIND_UPDATE
    flow = _tuple_new(Flow, (okey, rkey, ct_id, status, timeout, mark, tcp_state))
    return _tuple_new(FlowEvent, (kind, flow))


def _parse_tcp_state(buf: bytes, start: int, end: int) -> int:
    a = start + 4
    while a + 4 <= end:
        alen, atype = _nla(buf, a)
        if alen < 4 or a + alen > end:
            raise NetlinkError("CTA_PROTOINFO attribute length", a, str(alen))
        if atype & NLA_TYPE_MASK == CTA_PROTOINFO_TCP:
            aend = a + alen
            b = a + 4
            while b + 4 <= aend:
                blen, btype = _nla(buf, b)
                if blen < 4 or b + blen > aend:
                    raise NetlinkError("CTA_PROTOINFO_TCP attribute length", b, str(blen))
                if btype & NLA_TYPE_MASK == CTA_PROTOINFO_TCP_STATE:
                    if blen < 5:
                        raise NetlinkError("CTA_PROTOINFO_TCP_STATE", b, f"length {blen}")
                    return buf[b + 4]
                b += (blen + 3) & ~3
        a += (alen + 3) & ~3
    return F.TCP_NONE


def _walk(buf: bytes, nbytes: int, mark_mask: int, out: list[FlowEvent]) -> bool:
    """Decode every message in ``buf[:nbytes]`` into ``out``; True once NLMSG_DONE is seen."""
    off = 0
    while off < nbytes:
        if nbytes - off < NLMSG_HDRLEN:
            raise NetlinkError("nlmsghdr", off, f"{nbytes - off} trailing bytes")
        mlen, mtype, mflags, seq, _pid = _nlmsghdr(buf, off)
        if mlen < NLMSG_HDRLEN or mlen > nbytes - off:
            raise NetlinkError("nlmsg_len", off, str(mlen))
        if mtype in (CT_NEW, CT_DELETE):
            ev = _parse_ct(buf, off, off + mlen, mtype, mflags, mark_mask)
            if ev is not None:
                out.append(ev)
        elif mtype == NLMSG_DONE:
            return True
        elif mtype == NLMSG_ERROR:
            if mlen < NLMSG_HDRLEN + 4:
                raise NetlinkError("nlmsgerr", off, "truncated")
            err = _I32.unpack_from(buf, off + NLMSG_HDRLEN)[0]
            if err:
                raise KernelError(-err, off, seq)
        # Anything else (NOOP, OVERRUN, other subsystems, expectations) is not ours: skip.
        off += (mlen + 3) & ~3
    return False


def parse_messages(
    buf: bytes | bytearray | memoryview, nbytes: int | None = None, mark_mask: int = 0
) -> list[FlowEvent]:
    """Decode conntrack events or dump replies from ``buf[:nbytes]``.

    ``mark_mask``: when non-zero, only flows whose ``mark & mark_mask`` is non-zero are
    returned (DESTROY events carry the mark too). Acks are skipped; NLMSG_DONE ends the walk;
    an error reply raises ``KernelError``; malformed input raises ``NetlinkError``.
    """
    data, n = _as_bytes(buf, nbytes)
    out: list[FlowEvent] = []
    _walk(data, n, mark_mask, out)
    return out


def parse_dump(
    buf: bytes | bytearray | memoryview, nbytes: int | None = None, mark_mask: int = 0
) -> tuple[list[Flow], bool]:
    """Decode one chunk of a dump reply: the flows, and whether NLMSG_DONE ended it."""
    data, n = _as_bytes(buf, nbytes)
    out: list[FlowEvent] = []
    done = _walk(data, n, mark_mask, out)
    return [ev.flow for ev in out], done


def parse_acks(buf: bytes | bytearray | memoryview, nbytes: int | None = None) -> list[tuple[int, int]]:
    """``(seq, errno)`` of every NLMSG_ERROR in ``buf``; errno 0 is a positive ack."""
    data, n = _as_bytes(buf, nbytes)
    out: list[tuple[int, int]] = []
    off = 0
    while off < n:
        if n - off < NLMSG_HDRLEN:
            raise NetlinkError("nlmsghdr", off, f"{n - off} trailing bytes")
        mlen, mtype, _flags, seq, _pid = _nlmsghdr(data, off)
        if mlen < NLMSG_HDRLEN or mlen > n - off:
            raise NetlinkError("nlmsg_len", off, str(mlen))
        if mtype == NLMSG_ERROR:
            if mlen < NLMSG_HDRLEN + 4:
                raise NetlinkError("nlmsgerr", off, "truncated")
            out.append((seq, -_I32.unpack_from(data, off + NLMSG_HDRLEN)[0]))
        off += (mlen + 3) & ~3
    return out


_ACK = struct.Struct("=IHHIIi")


def parse_ack1(buf: bytes | bytearray | memoryview, nbytes: int) -> tuple[int, int] | None:
    """``(seq, errno)`` when ``buf[:nbytes]`` is exactly one NLMSG_ERROR, else None.

    The cheap path for the one-datagram-per-answer stream an injector reads.
    """
    if nbytes < _ACK.size:
        return None
    mlen, mtype, _flags, seq, _pid, err = _ACK.unpack_from(buf)
    if mtype != NLMSG_ERROR or mlen != nbytes:
        return None
    return seq, -err


# --- encoding ------------------------------------------------------------------------------
def _h(length: int, atype: int, nested: bool = False) -> int:
    """An attribute header as the big-endian u32 whose bytes equal the host-order header."""
    value: int = _BE32.unpack(_NLA.pack(length, atype | (NLA_F_NESTED if nested else 0)))[0]
    return value


_MSGHDR = struct.Struct("=IHHIIBBH")  # nlmsghdr + nfgenmsg (res_id is 0 in either order)

# One struct per tuple shape: (outer header, then IP nest, then PROTO nest).
_TUP4_PORTS = struct.Struct(">II I4sI4s II B3x IH2x IH2x")  # 52 bytes
_TUP6_PORTS = struct.Struct(">II I16sI16s II B3x IH2x IH2x")  # 76 bytes
_TUP4_ICMP = struct.Struct(">II I4sI4s II B3x IH2x IB3x IB3x")  # 60 bytes
_TUP6_ICMP = struct.Struct(">II I16sI16s II B3x IH2x IB3x IB3x")  # 84 bytes
_ZONE = struct.Struct(">IH2x")  # CTA_ZONE / CTA_TUPLE_ZONE, 8 bytes


def _tuple_template(
    st: struct.Struct, ip_len: int, v6: bool, icmp: bool
) -> tuple[struct.Struct, tuple[int, ...]]:
    addr_t = (CTA_IP_V6_SRC, CTA_IP_V6_DST) if v6 else (CTA_IP_V4_SRC, CTA_IP_V4_DST)
    alen = 20 if v6 else 8
    if icmp:
        ids = (
            (CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE)
            if v6
            else (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE)
        )
        l4: tuple[int, ...] = (_h(6, ids[0]), _h(5, ids[1]), _h(5, ids[2]))
        proto_len = 36
    else:
        l4 = (_h(6, CTA_PROTO_SRC_PORT), _h(6, CTA_PROTO_DST_PORT))
        proto_len = 28
    hdrs = (
        _h(ip_len, CTA_TUPLE_IP, True),
        _h(alen, addr_t[0]),
        _h(alen, addr_t[1]),
        _h(proto_len, CTA_TUPLE_PROTO, True),
        _h(5, CTA_PROTO_NUM),
        *l4,
    )
    return st, hdrs


# (v6, icmp) -> (struct, header constants)
_TUPLES = {
    (False, False): _tuple_template(_TUP4_PORTS, 20, False, False),
    (True, False): _tuple_template(_TUP6_PORTS, 44, True, False),
    (False, True): _tuple_template(_TUP4_ICMP, 20, False, True),
    (True, True): _tuple_template(_TUP6_ICMP, 44, True, True),
}
_FT4_SIZE, _FT4_H, _FT4_HDRS, _FT4_D = _fast_tuple(52, False)
_FT6_SIZE, _FT6_H, _FT6_HDRS, _FT6_D = _fast_tuple(76, True)
_ft4_h = _FT4_H.unpack_from
_ft4_d = _FT4_D.unpack_from
_ft6_h = _FT6_H.unpack_from
_ft6_d = _FT6_D.unpack_from
_TUPLE_HDR = {
    (shape, atype): _h(st.size, atype, True)
    for shape, (st, _) in _TUPLES.items()
    for atype in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY)
}
_TUPLE_HDR_ZONED = {
    (shape, atype): _h(st.size + _ZONE.size, atype, True)
    for shape, (st, _) in _TUPLES.items()
    for atype in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY)
}
_H_TUPLE_ZONE = _h(6, CTA_TUPLE_ZONE)
_H_ZONE = _h(6, CTA_ZONE)


def _check_key(key: FlowKey) -> None:
    alen = 4 if key.family == 4 else 16 if key.family == 6 else 0
    if not alen:
        raise ValueError(f"FlowKey.family must be 4 or 6, not {key.family!r}")
    if len(key.src) != alen or len(key.dst) != alen:
        raise ValueError(f"FlowKey addresses must be {alen} bytes for family {key.family}")
    raise AssertionError("unreachable: key was valid")


def _pack_tuple(key: FlowKey, atype: int, tuple_zone: bool) -> bytes:
    """CTA_TUPLE_ORIG/REPLY for ``key``; ``tuple_zone`` adds a directional CTA_TUPLE_ZONE."""
    family = key.family
    v6 = family == 6
    if (not v6 and family != 4) or len(key.src) != (16 if v6 else 4) or len(key.dst) != len(key.src):
        _check_key(key)
    proto = key.proto
    icmp = proto == F.IPPROTO_ICMP or proto == F.IPPROTO_ICMPV6
    shape = (v6, icmp)
    st, h = _TUPLES[shape]
    outer = (_TUPLE_HDR_ZONED if tuple_zone else _TUPLE_HDR)[shape, atype]
    if icmp:
        packed = st.pack(
            outer, h[0], h[1], key.src, h[2], key.dst, h[3], h[4], proto,
            h[5], key.sport, h[6], key.dport >> 8 & 0xFF, h[7], key.dport & 0xFF,
        )  # fmt: skip
    else:
        packed = st.pack(
            outer, h[0], h[1], key.src, h[2], key.dst, h[3], h[4], proto,
            h[5], key.sport, h[6], key.dport,
        )  # fmt: skip
    if tuple_zone:
        return packed + _ZONE.pack(_H_TUPLE_ZONE, key.zone)
    return packed


def _zone_attrs(orig: FlowKey, reply: FlowKey | None) -> tuple[bytes, bool]:
    """(CTA_ZONE bytes or b"", whether tuples carry directional CTA_TUPLE_ZONE instead)."""
    if reply is None or orig.zone == reply.zone:
        return (_ZONE.pack(_H_ZONE, orig.zone) if orig.zone else b""), False
    return b"", True


_SCALARS = struct.Struct(">IIIIII")  # CTA_STATUS, CTA_TIMEOUT, CTA_MARK
_SCALARS_NO_STATUS = struct.Struct(">IIII")  # CTA_TIMEOUT, CTA_MARK
_STATUS_SENT = F.IPS_SETTABLE & ~F.IPS_EXPECTED
_CONFIRMED = F.IPS_CONFIRMED
_H_STATUS = _h(8, CTA_STATUS)
_H_TIMEOUT = _h(8, CTA_TIMEOUT)
_H_MARK = _h(8, CTA_MARK)

_TCPINFO_LIBERAL = struct.Struct(">II IB3x IBB2x IBB2x")  # 32 bytes
_TCPINFO_STATE = struct.Struct(">II IB3x")  # 16 bytes
_H_PI_LIB = _h(32, CTA_PROTOINFO, True)
_H_PI_TCP_LIB = _h(28, CTA_PROTOINFO_TCP, True)
_H_PI_ST = _h(16, CTA_PROTOINFO, True)
_H_PI_TCP_ST = _h(12, CTA_PROTOINFO_TCP, True)
_H_TCP_STATE = _h(5, CTA_PROTOINFO_TCP_STATE)
_H_TCP_FLAGS_O = _h(6, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL)
_H_TCP_FLAGS_R = _h(6, CTA_PROTOINFO_TCP_FLAGS_REPLY)


def _tcp_protoinfo(state: int, be_liberal: bool) -> bytes:
    if be_liberal:
        return _TCPINFO_LIBERAL.pack(
            _H_PI_LIB, _H_PI_TCP_LIB, _H_TCP_STATE, state,
            _H_TCP_FLAGS_O, IP_CT_TCP_FLAG_BE_LIBERAL, 0xFF,
            _H_TCP_FLAGS_R, IP_CT_TCP_FLAG_BE_LIBERAL, 0xFF,
        )  # fmt: skip
    return _TCPINFO_STATE.pack(_H_PI_ST, _H_PI_TCP_ST, _H_TCP_STATE, state)


_PROTONAT = struct.Struct(">IIH2xIH2x")  # CTA_NAT_PROTO nest with PORT_MIN/MAX, 20 bytes
_H_NAT_PROTO = _h(20, CTA_NAT_PROTO, True)
_H_PORT_MIN = _h(6, CTA_PROTONAT_PORT_MIN)
_H_PORT_MAX = _h(6, CTA_PROTONAT_PORT_MAX)
_NAT_IPS4 = struct.Struct(">II4sI4s")  # nest header + MINIP + MAXIP, 20 bytes
_NAT_IPS6 = struct.Struct(">II16sI16s")  # 44 bytes
_H_V4_MIN = _h(8, CTA_NAT_V4_MINIP)
_H_V4_MAX = _h(8, CTA_NAT_V4_MAXIP)
_H_V6_MIN = _h(20, CTA_NAT_V6_MINIP)
_H_V6_MAX = _h(20, CTA_NAT_V6_MAXIP)


def _nat(atype: int, addr: bytes, port: int | None) -> bytes:
    """CTA_NAT_SRC/DST mapping to exactly ``addr`` (and ``port`` when given)."""
    extra = _PROTONAT.size if port is not None else 0
    if len(addr) == 4:
        head = _NAT_IPS4.pack(_h(_NAT_IPS4.size + extra, atype, True), _H_V4_MIN, addr, _H_V4_MAX, addr)
    else:
        head = _NAT_IPS6.pack(_h(_NAT_IPS6.size + extra, atype, True), _H_V6_MIN, addr, _H_V6_MAX, addr)
    if port is None:
        return head
    return head + _PROTONAT.pack(_H_NAT_PROTO, _H_PORT_MIN, port, _H_PORT_MAX, port)


def nat_attrs(flow: Flow) -> bytes:
    """CTA_NAT_SRC / CTA_NAT_DST that make the kernel rebuild ``flow.reply`` from its inverse.

    SNAT: the reply goes back to the translated source (``reply.dst``/``reply.dport``);
    DNAT: the reply comes from the real destination (``reply.src``/``reply.sport``). For ICMP
    the id (``sport`` in both keys) is the only "port", and only source NAT rewrites it.
    """
    o, r = flow.orig, flow.reply
    out = b""
    if o.proto == F.IPPROTO_ICMP or o.proto == F.IPPROTO_ICMPV6:
        sport_changed = r.sport != o.sport
        if r.dst != o.src or sport_changed:
            out += _nat(CTA_NAT_SRC, r.dst, r.sport if sport_changed else None)
        if r.src != o.dst:
            out += _nat(CTA_NAT_DST, r.src, None)
        return out
    if r.dst != o.src or r.dport != o.sport:
        out += _nat(CTA_NAT_SRC, r.dst, r.dport if r.dport != o.sport else None)
    if r.src != o.dst or r.sport != o.dport:
        out += _nat(CTA_NAT_DST, r.src, r.sport if r.sport != o.dport else None)
    return out


_FLAGS_CREATE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
_FLAGS_CREATE_NOACK = _FLAGS_CREATE & ~NLM_F_ACK
_FLAGS_UPDATE = NLM_F_REQUEST | NLM_F_ACK


def _create_template(v6: bool) -> tuple[struct.Struct, int, tuple[int, ...], int, int, int]:
    """Both port tuples plus status/timeout/mark as one struct, for the no-NAT fast path."""
    st, hdrs = _TUPLES[v6, False]
    body = struct.Struct(">" + st.format[1:] * 2 + _SCALARS.format[1:])
    return (
        body,
        _MSGHDR.size + body.size,
        hdrs,
        _TUPLE_HDR[(v6, False), CTA_TUPLE_ORIG],
        _TUPLE_HDR[(v6, False), CTA_TUPLE_REPLY],
        AF_INET6 if v6 else AF_INET,
    )


_CREATE4 = _create_template(False)
_CREATE6 = _create_template(True)
_TCP_INFO_CACHE = {
    (state, liberal): _tcp_protoinfo(state, liberal) for state in range(16) for liberal in (False, True)
}


def _tcp_info_bytes(state: int, be_liberal: bool) -> bytes:
    cached = _TCP_INFO_CACHE.get((state, be_liberal))
    return cached if cached is not None else _tcp_protoinfo(state, be_liberal)


def build_create(
    flow: Flow,
    seq: int,
    *,
    be_liberal: bool = True,
    create: bool = True,
    default_timeout: int = DEFAULT_TIMEOUT,
    with_status: bool = True,
    ack: bool = True,
) -> bytes:
    """IPCTNL_MSG_CT_NEW injecting ``flow``.

    ``create=True``: NLM_F_CREATE|NLM_F_EXCL, both tuples (the reply as the inverse of the
    original, NAT expressed as CTA_NAT_SRC/DST so the kernel sets SRC_NAT/DST_NAT and its own
    NAT bindings). ``create=False``: the update form, original tuple only and no NAT (the
    kernel refuses NAT changes on an existing entry). Status is limited to
    ``flows.IPS_SETTABLE``; a zero timeout becomes ``default_timeout``; TCP flows get their
    state and, with ``be_liberal``, IP_CT_TCP_FLAG_BE_LIBERAL in both directions (mask 0xff).

    Status as the kernel checks it (ctnetlink_change_status, verified on 6.18): IPS_CONFIRMED
    must be present and IPS_EXPECTED absent, or the message fails with EBUSY, so CONFIRMED is
    always sent and EXPECTED never. SEEN_REPLY and ASSURED can only be set: an update whose
    status lacks a bit the entry already has fails with EBUSY; ``with_status=False`` leaves
    the status alone (the retry for that case).

    ``ack=False`` drops NLM_F_ACK: the kernel then answers only failures (used for batches
    where one acked message at the end serves as a barrier).
    """
    o = flow.orig
    timeout = flow.timeout if flow.timeout > 0 else default_timeout
    r = flow.reply
    proto = o.proto
    if (
        create
        and with_status
        and proto != 1  # IPPROTO_ICMP
        and proto != 58  # IPPROTO_ICMPV6
        and r.src == o.dst
        and r.dst == o.src
        and r.sport == o.dport
        and r.dport == o.sport
        and not o.zone
        and not r.zone
    ):
        # Common case (no NAT, no zone, ports): the whole message in two packs.
        fam = o.family
        src, dst = o.src, o.dst
        if fam == 4 and len(src) == 4 and len(dst) == 4:
            st, size, h, ho, hr, family = _CREATE4
        elif fam == 6 and len(src) == 16 and len(dst) == 16:
            st, size, h, ho, hr, family = _CREATE6
        else:
            _check_key(o)
            raise AssertionError("unreachable")
        tcp = _tcp_info_bytes(flow.tcp_state, be_liberal) if proto == 6 else b""
        flags = _FLAGS_CREATE if ack else _FLAGS_CREATE_NOACK
        head = _MSGHDR.pack(size + len(tcp), CT_NEW, flags, seq & 0xFFFFFFFF, 0, family, 0, 0)
        body = st.pack(
            ho, h[0], h[1], src, h[2], dst, h[3], h[4], proto, h[5], o.sport, h[6], o.dport,
            hr, h[0], h[1], dst, h[2], src, h[3], h[4], proto, h[5], o.dport, h[6], o.sport,
            _H_STATUS, flow.status & _STATUS_SENT | _CONFIRMED, _H_TIMEOUT, timeout, _H_MARK, flow.mark,
        )  # fmt: skip
        return head + body + tcp
    family = AF_INET6 if o.family == 6 else AF_INET
    if with_status:
        status = flow.status & _STATUS_SENT | F.IPS_CONFIRMED
        scalars = _SCALARS.pack(_H_STATUS, status, _H_TIMEOUT, timeout, _H_MARK, flow.mark)
    else:
        scalars = _SCALARS_NO_STATUS.pack(_H_TIMEOUT, timeout, _H_MARK, flow.mark)
    tcp = _tcp_info_bytes(flow.tcp_state, be_liberal) if proto == F.IPPROTO_TCP else b""
    if create:
        zone, tuple_zone = _zone_attrs(o, flow.reply)
        r = F.inverse(o)
        if tuple_zone:
            r = r._replace(zone=flow.reply.zone)
        body = b"".join(
            (
                _pack_tuple(o, CTA_TUPLE_ORIG, tuple_zone and o.zone != 0),
                _pack_tuple(r, CTA_TUPLE_REPLY, tuple_zone and r.zone != 0),
                zone,
                scalars,
                tcp,
                nat_attrs(flow),
            )
        )
        flags = _FLAGS_CREATE if ack else _FLAGS_CREATE_NOACK
    else:
        zone = _ZONE.pack(_H_ZONE, o.zone) if o.zone else b""
        body = b"".join((_pack_tuple(o, CTA_TUPLE_ORIG, False), zone, scalars, tcp))
        flags = _FLAGS_UPDATE if ack else NLM_F_REQUEST
    return _MSGHDR.pack(20 + len(body), CT_NEW, flags, seq & 0xFFFFFFFF, 0, family, 0, 0) + body


def build_delete(flow_or_key: Flow | FlowKey, seq: int, *, ack: bool = True) -> bytes:
    """IPCTNL_MSG_CT_DELETE by original tuple (and zone)."""
    key = flow_or_key.orig if isinstance(flow_or_key, Flow) else flow_or_key
    family = AF_INET6 if key.family == 6 else AF_INET
    zone = _ZONE.pack(_H_ZONE, key.zone) if key.zone else b""
    body = _pack_tuple(key, CTA_TUPLE_ORIG, False) + zone
    return (
        _MSGHDR.pack(
            20 + len(body),
            CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK if ack else NLM_F_REQUEST,
            seq & 0xFFFFFFFF,
            0,
            family,
            0,
            0,
        )
        + body
    )


_MARK_FILTER = struct.Struct(">IIII")
_H_MARK_MASK = _h(8, CTA_MARK_MASK)


def with_ack(msg: bytes) -> bytes:
    """``msg`` with NLM_F_ACK set (turns the last message of a batch into a barrier)."""
    flags: int = _H16.unpack_from(msg, 6)[0]
    return msg[:6] + _H16.pack(flags | NLM_F_ACK) + msg[8:]


def build_dump_request(seq: int, family: int = AF_UNSPEC, mark: int = 0, mark_mask: int = 0) -> bytes:
    """IPCTNL_MSG_CT_GET dump; with ``mark_mask`` the kernel returns only entries whose
    ``mark & mark_mask == mark``. ``AF_UNSPEC`` dumps IPv4 and IPv6."""
    body = _MARK_FILTER.pack(_H_MARK, mark, _H_MARK_MASK, mark_mask) if mark_mask else b""
    return (
        _MSGHDR.pack(
            20 + len(body),
            CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq & 0xFFFFFFFF,
            0,
            family,
            0,
            0,
        )
        + body
    )
