"""Codec of the replication datagram (see ``docs/sync-protocol.md`` for the byte tables).

Pure and symmetric: ``encode_datagram``/``DatagramBuilder`` produce bytes, ``decode_datagram``
turns bytes back into a ``Datagram`` or raises ``WireError`` (``AuthError`` for a bad MAC)
naming the field and the offset. Nothing else ever escapes decoding: no ``IndexError``, no
``struct.error``, no ``ValueError`` from an enum.

Layout: a 32-byte header, the records, a 16-byte HMAC-SHA256 trailer over everything before
it. A record starts with one byte, record type in the high nibble and flags in the low nibble.
Records are ``NamedTuple``s (and a full record is the ``Flow`` itself): they are built once
per conntrack event on the hot path, where tuples are several times cheaper than dataclass
instances. Header and datagram are built once per datagram, so they are frozen dataclasses.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from invictusd.flows import IPPROTO_ICMP, IPPROTO_ICMPV6, Flow, FlowKey, inverse

MAGIC = b"IV"
VERSION = 1
MAC_LEN = 16
DEFAULT_MTU = 1400  # UDP payload budget of one datagram, header and MAC included

# magic, version, type, flags, reserved, node id, sender epoch, receiver epoch, seq, ack
HEADER = struct.Struct(">2sBBBBHQQII")
HEADER_LEN = HEADER.size  # 32
MIN_DATAGRAM = HEADER_LEN + MAC_LEN
U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF


class DatagramType(enum.IntEnum):
    DATA = 1  # sequenced: carries FULL..DIGEST records
    ACK = 2  # header only; the ack field is the news
    NACK = 3  # NACK_RANGE records
    HELLO = 4  # header only; accepted whatever its receiver epoch (carries no state)
    RESYNC_REQUEST = 5  # one RESYNC_REQUEST record


class RecordType(enum.IntEnum):
    FULL = 1
    UPDATE = 2
    DELETE = 3
    DELETE_KEY = 4
    RESYNC_BEGIN = 5
    RESYNC_END = 6
    DIGEST = 7
    NACK_RANGE = 8
    RESYNC_REQUEST = 9


# Header flags.
FLAG_SYNC_POINT = 0x01  # first datagram of a resync: the receiver may skip any gap before it
HEADER_FLAGS = FLAG_SYNC_POINT

# Record flags (low nibble of the first record byte).
RF_V6 = 0x1  # addresses are 16 bytes (else 4)
RF_NAT = 0x2  # reply tuple present (else it is inverse(orig))
RF_ZONE = 0x4  # zone u16 after each tuple present
RF_PROTOINFO = 0x8  # tcp_state u8 present at the end (else TCP_NONE)

_ALLOWED_FLAGS = {
    RecordType.FULL: RF_V6 | RF_NAT | RF_ZONE | RF_PROTOINFO,
    RecordType.UPDATE: RF_PROTOINFO,
    RecordType.DELETE_KEY: RF_V6 | RF_ZONE,
}

_DATA_RECORDS = frozenset(range(RecordType.FULL, RecordType.DIGEST + 1))
ALLOWED_RECORDS: dict[DatagramType, frozenset[int]] = {
    DatagramType.DATA: _DATA_RECORDS,
    DatagramType.ACK: frozenset(),
    DatagramType.NACK: frozenset({RecordType.NACK_RANGE}),
    DatagramType.HELLO: frozenset(),
    DatagramType.RESYNC_REQUEST: frozenset({RecordType.RESYNC_REQUEST}),
}
_TYPES = {int(t): t for t in DatagramType}

_T_FULL = RecordType.FULL << 4
_T_UPDATE = RecordType.UPDATE << 4
_T_DELETE = RecordType.DELETE << 4
_T_DELETE_KEY = RecordType.DELETE_KEY << 4

# Precompiled layouts. The common cases (no NAT, no zone) are one pack/unpack each.
_F4P = struct.Struct(">BB4s4sHHIHIIB")  # 29: v4 with tcp_state
_F4 = struct.Struct(">BB4s4sHHIHII")  # 28: v4 without
_F6P = struct.Struct(">BB16s16sHHIHIIB")  # 53
_F6 = struct.Struct(">BB16s16sHHIHII")  # 52
_HEAD2 = struct.Struct(">BB")
_TUPLE4 = struct.Struct(">4s4sHH")
_TUPLE6 = struct.Struct(">16s16sHH")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_TAIL = struct.Struct(">IHII")  # ct_id, status, timeout, mark
_UPDATE_P = struct.Struct(">BIHHIIB")  # 18
_UPDATE = struct.Struct(">BIHHII")  # 17
_DELETE = struct.Struct(">BIH")  # 7
_BEGIN = struct.Struct(">BI")  # 5
_END = struct.Struct(">BIIQ")  # 17
_DIGEST = struct.Struct(">BIQ")  # 13
_NACK = struct.Struct(">BII")  # 9
_REQUEST = struct.Struct(">BIB")  # 6
_KEYHASH = struct.Struct(">BBHHH")

_ICMPS = (IPPROTO_ICMP, IPPROTO_ICMPV6)


class WireError(ValueError):
    """A datagram that does not decode. ``field`` and ``offset`` say where."""

    def __init__(self, field: str, offset: int, reason: str) -> None:
        super().__init__(f"{field} at offset {offset}: {reason}")
        self.field = field
        self.offset = offset
        self.reason = reason


class AuthError(WireError):
    """The MAC does not match: wrong key, corruption or forgery."""


class FlowEncodeError(ValueError):
    """A flow or header that cannot be encoded (a bug of the caller, not network input)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# ---- messages ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    type: DatagramType
    node_id: int  # u16, the sender's
    sender_epoch: int  # u64, random per daemon start, never 0
    receiver_epoch: int  # u64, the peer's epoch as the sender knows it, 0 if unknown
    seq: int = 0  # u32: DATA: its sequence number; others: the sender's highest DATA seq
    ack: int = 0  # u32: highest in-order DATA seq received from the peer, 0 if none
    flags: int = 0


class Update(NamedTuple):
    """Compact update of an entry the receiver knows under ``ct_id``."""

    ct_id: int
    check: int  # key_hash(orig) & 0xFFFF: guards against an id naming another entry
    status: int
    timeout: int
    mark: int
    tcp_state: int


class Delete(NamedTuple):
    ct_id: int
    check: int


class DeleteKey(NamedTuple):
    key: FlowKey  # the original tuple


class ResyncBegin(NamedTuple):
    gen: int


class ResyncEnd(NamedTuple):
    gen: int
    entries: int  # entries in the sender's table at this point of the stream
    digest: int  # XOR of key_hash of those entries


class Digest(NamedTuple):
    entries: int
    digest: int


class NackRange(NamedTuple):
    first: int  # u32 sequence numbers, inclusive
    last: int


class ResyncRequest(NamedTuple):
    request_id: int  # increases per request within one receiver epoch
    reason: int


class RequestReason(enum.IntEnum):
    OTHER = 0
    DIGEST_MISMATCH = 1
    UNKNOWN_ID = 2
    STALLED = 3


# A ``Flow`` record is a FULL record (an upsert).
Record = Flow | Update | Delete | DeleteKey | ResyncBegin | ResyncEnd | Digest | NackRange | ResyncRequest


@dataclass(frozen=True, slots=True)
class Datagram:
    header: Header
    records: tuple[Record, ...] = ()


# ---- key hash ---------------------------------------------------------------------------


def key_hash(key: FlowKey) -> int:
    """64-bit hash of an original tuple, identical on every node and Python version.

    BLAKE2b (not a linear hash like CRC) because digests XOR these together: with a linear
    hash, differing sets of structured keys (ports 1,2 vs 0,3) would XOR to the same value.
    """
    family, proto, src, dst, sport, dport, zone = key
    return int.from_bytes(
        hashlib.blake2b(_KEYHASH.pack(family, proto, zone, sport, dport) + src + dst, digest_size=8).digest()
    )


# ---- encoding ---------------------------------------------------------------------------


def _flow_error(flow: Flow) -> FlowEncodeError:
    """Slow path: say which field of ``flow`` cannot be encoded."""
    o, r = flow.orig, flow.reply
    for name, k in (("orig", o), ("reply", r)):
        if k.family not in (4, 6):
            return FlowEncodeError(f"{name}.family", f"{k.family!r} is not 4 or 6")
        alen = 4 if k.family == 4 else 16
        for part in ("src", "dst"):
            addr = getattr(k, part)
            if not isinstance(addr, bytes) or len(addr) != alen:
                return FlowEncodeError(f"{name}.{part}", f"{addr!r} is not {alen} bytes")
        for part, hi in (("proto", 0xFF), ("sport", 0xFFFF), ("dport", 0xFFFF), ("zone", 0xFFFF)):
            v = getattr(k, part)
            if not isinstance(v, int) or not 0 <= v <= hi:
                return FlowEncodeError(f"{name}.{part}", f"{v!r} is out of range 0..{hi}")
    if (r.family, r.proto) != (o.family, o.proto):
        return FlowEncodeError("reply", "family/proto differ from the original tuple")
    for part, hi in (
        ("ct_id", U32),
        ("status", 0xFFFF),
        ("timeout", U32),
        ("mark", U32),
        ("tcp_state", 0xFF),
    ):
        v = getattr(flow, part)
        if not isinstance(v, int) or not 0 <= v <= hi:
            return FlowEncodeError(part, f"{v!r} is out of range 0..{hi}")
    return FlowEncodeError("flow", f"cannot encode {flow!r}")


def encode_full(flow: Flow) -> bytes:
    """FULL record: the whole entry (an upsert on the receiver). 28-29 bytes for v4 without NAT."""
    o, r = flow.orig, flow.reply
    family, proto, src, dst, sport, dport, zone = o
    if family == 4:
        alen, flags, plain_p, plain, tup = 4, 0, _F4P, _F4, _TUPLE4
    elif family == 6:
        alen, flags, plain_p, plain, tup = 16, RF_V6, _F6P, _F6, _TUPLE6
    else:
        raise _flow_error(flow)
    if len(src) != alen or len(dst) != alen:
        raise _flow_error(flow)
    # the inverse inline for TCP/UDP: this runs once per replicated event
    nat = r != inverse(o) if proto in _ICMPS else r != (family, proto, dst, src, dport, sport, zone)
    tcp = flow.tcp_state
    try:
        if not nat and not zone:
            if tcp:
                return plain_p.pack(
                    _T_FULL | flags | RF_PROTOINFO, proto, src, dst, sport, dport,
                    flow.ct_id, flow.status, flow.timeout, flow.mark, tcp,
                )  # fmt: skip
            return plain.pack(
                _T_FULL | flags, proto, src, dst, sport, dport,
                flow.ct_id, flow.status, flow.timeout, flow.mark,
            )  # fmt: skip
        has_zone = bool(zone) or (nat and bool(r.zone))
        if has_zone:
            flags |= RF_ZONE
        if nat:
            flags |= RF_NAT
            if r.family != family or r.proto != proto or len(r.src) != alen or len(r.dst) != alen:
                raise _flow_error(flow)
        if tcp:
            flags |= RF_PROTOINFO
        parts = [_HEAD2.pack(_T_FULL | flags, proto), tup.pack(src, dst, sport, dport)]
        if has_zone:
            parts.append(_U16.pack(zone))
        if nat:
            parts.append(tup.pack(r.src, r.dst, r.sport, r.dport))
            if has_zone:
                parts.append(_U16.pack(r.zone))
        parts.append(_TAIL.pack(flow.ct_id, flow.status, flow.timeout, flow.mark))
        if tcp:
            parts.append(_U8.pack(tcp))
        return b"".join(parts)
    except (struct.error, TypeError):
        raise _flow_error(flow) from None


def encode_update(ct_id: int, check: int, status: int, timeout: int, mark: int, tcp: int) -> bytes:
    """UPDATE record: 17 bytes, 18 with a tcp_state."""
    try:
        if tcp:
            return _UPDATE_P.pack(_T_UPDATE | RF_PROTOINFO, ct_id, check, status, timeout, mark, tcp)
        return _UPDATE.pack(_T_UPDATE, ct_id, check, status, timeout, mark)
    except struct.error:
        for name, v, hi in (
            ("ct_id", ct_id, U32),
            ("check", check, 0xFFFF),
            ("status", status, 0xFFFF),
            ("timeout", timeout, U32),
            ("mark", mark, U32),
            ("tcp_state", tcp, 0xFF),
        ):
            if not 0 <= v <= hi:
                raise FlowEncodeError(name, f"{v!r} is out of range 0..{hi}") from None
        raise


def encode_delete(ct_id: int, check: int) -> bytes:
    """DELETE record: 7 bytes."""
    try:
        return _DELETE.pack(_T_DELETE, ct_id, check)
    except struct.error:
        raise FlowEncodeError("ct_id", f"{ct_id!r}/{check!r} out of range") from None


def encode_delete_key(key: FlowKey) -> bytes:
    """DELETE_KEY record: the original tuple (14 bytes for v4 without zone)."""
    family, proto, src, dst, sport, dport, zone = key
    if family == 4:
        alen, flags, tup = 4, 0, _TUPLE4
    elif family == 6:
        alen, flags, tup = 16, RF_V6, _TUPLE6
    else:
        raise FlowEncodeError("key.family", f"{family!r} is not 4 or 6")
    if len(src) != alen or len(dst) != alen:
        raise FlowEncodeError("key.src", f"addresses must be {alen} bytes")
    try:
        if zone:
            return b"".join((
                _HEAD2.pack(_T_DELETE_KEY | flags | RF_ZONE, proto),
                tup.pack(src, dst, sport, dport),
                _U16.pack(zone),
            ))  # fmt: skip
        return _HEAD2.pack(_T_DELETE_KEY | flags, proto) + tup.pack(src, dst, sport, dport)
    except struct.error:
        raise FlowEncodeError("key", f"{key!r} out of range") from None


def encode_record(rec: Record) -> bytes:
    """Any record to bytes (the session uses the specialised encoders directly)."""
    try:
        if isinstance(rec, Flow):
            return encode_full(rec)
        if isinstance(rec, Update):
            return encode_update(*rec)
        if isinstance(rec, Delete):
            return encode_delete(*rec)
        if isinstance(rec, DeleteKey):
            return encode_delete_key(rec.key)
        if isinstance(rec, ResyncBegin):
            return _BEGIN.pack(RecordType.RESYNC_BEGIN << 4, rec.gen)
        if isinstance(rec, ResyncEnd):
            return _END.pack(RecordType.RESYNC_END << 4, rec.gen, rec.entries, rec.digest)
        if isinstance(rec, Digest):
            return _DIGEST.pack(RecordType.DIGEST << 4, rec.entries, rec.digest)
        if isinstance(rec, NackRange):
            return _NACK.pack(RecordType.NACK_RANGE << 4, rec.first, rec.last)
        if isinstance(rec, ResyncRequest):
            return _REQUEST.pack(RecordType.RESYNC_REQUEST << 4, rec.request_id, rec.reason)
    except struct.error as e:
        raise FlowEncodeError(type(rec).__name__, f"{rec!r}: {e}") from None
    raise FlowEncodeError("record", f"not a record: {rec!r}")


def record_type_of(rec: Record) -> RecordType:
    return _RECORD_TYPES[type(rec)]


_RECORD_TYPES: dict[type, RecordType] = {
    Flow: RecordType.FULL,
    Update: RecordType.UPDATE,
    Delete: RecordType.DELETE,
    DeleteKey: RecordType.DELETE_KEY,
    ResyncBegin: RecordType.RESYNC_BEGIN,
    ResyncEnd: RecordType.RESYNC_END,
    Digest: RecordType.DIGEST,
    NackRange: RecordType.NACK_RANGE,
    ResyncRequest: RecordType.RESYNC_REQUEST,
}


def _pack_header(header: Header) -> bytes:
    try:
        return HEADER.pack(
            MAGIC, VERSION, header.type, header.flags, 0, header.node_id,
            header.sender_epoch, header.receiver_epoch, header.seq, header.ack,
        )  # fmt: skip
    except struct.error as e:
        raise FlowEncodeError("header", f"{header!r}: {e}") from None


def seal(body: bytes, key: bytes) -> bytes:
    """Append the MAC to a header+records body."""
    return body + hmac.digest(key, body, "sha256")[:MAC_LEN]


def encode_datagram(
    header: Header, records: Iterable[Record], key: bytes, mtu: int | None = DEFAULT_MTU
) -> bytes:
    """Header, records and MAC. Raises ``FlowEncodeError`` if a record does not belong in this
    datagram type or the result exceeds ``mtu`` (``None``: no limit)."""
    allowed = ALLOWED_RECORDS[header.type]
    parts = [_pack_header(header)]
    for rec in records:
        if _RECORD_TYPES.get(type(rec)) not in allowed:
            raise FlowEncodeError("records", f"{type(rec).__name__} not allowed in {header.type.name}")
        parts.append(encode_record(rec))
    out = seal(b"".join(parts), key)
    if mtu is not None and len(out) > mtu:
        raise FlowEncodeError("records", f"datagram of {len(out)} bytes exceeds mtu {mtu}")
    return out


class DatagramBuilder:
    """Packs encoded records into one datagram up to an MTU budget.

    ``add`` returns False when the record does not fit (finish this one and start the next).
    """

    __slots__ = ("_parts", "_size", "capacity", "count")

    def __init__(self, mtu: int = DEFAULT_MTU) -> None:
        if mtu < MIN_DATAGRAM + 64:
            raise FlowEncodeError("mtu", f"{mtu} leaves no room for records")
        self.capacity = mtu - HEADER_LEN - MAC_LEN
        self._parts: list[bytes] = []
        self._size = 0
        self.count = 0

    def add(self, record: bytes) -> bool:
        size = self._size + len(record)
        if size > self.capacity:
            return False
        self._parts.append(record)
        self._size = size
        self.count += 1
        return True

    @property
    def size(self) -> int:
        return self._size

    @property
    def remaining(self) -> int:
        return self.capacity - self._size

    def __bool__(self) -> bool:
        return self.count > 0

    def clear(self) -> None:
        self._parts.clear()
        self._size = 0
        self.count = 0

    def finish(self, header: Header, key: bytes) -> bytes:
        """The datagram with the records added so far; the builder is emptied."""
        self._parts.insert(0, _pack_header(header))
        out = seal(b"".join(self._parts), key)
        self.clear()
        return out


def pack_records(records: Sequence[bytes], mtu: int = DEFAULT_MTU) -> list[list[bytes]]:
    """Split encoded records into groups that each fit one datagram (order kept)."""
    groups: list[list[bytes]] = []
    b = DatagramBuilder(mtu)
    cur: list[bytes] = []
    for rec in records:
        if not b.add(rec):
            if not cur:
                raise FlowEncodeError("records", f"a record of {len(rec)} bytes never fits")
            groups.append(cur)
            cur = []
            b.clear()
            if not b.add(rec):
                raise FlowEncodeError("records", f"a record of {len(rec)} bytes never fits")
        cur.append(rec)
    if cur:
        groups.append(cur)
    return groups


# ---- decoding ---------------------------------------------------------------------------


def decode_header(data: bytes) -> Header:
    """Header fields without checking the MAC (for logging and tests; never trust it)."""
    n = len(data)
    if n < HEADER_LEN:
        raise WireError("length", 0, f"{n} bytes, a header needs {HEADER_LEN}")
    magic, version, typ, flags, reserved, node, se, re_, seq, ack = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError("magic", 0, f"{magic!r} is not {MAGIC!r}")
    if version != VERSION:
        raise WireError("version", 2, f"{version} is not {VERSION}")
    t = _TYPES.get(typ)
    if t is None:
        raise WireError("type", 3, f"unknown datagram type {typ}")
    if flags & ~HEADER_FLAGS:
        raise WireError("flags", 4, f"unknown flags 0x{flags:02x}")
    if flags and t is not DatagramType.DATA:
        raise WireError("flags", 4, f"flags 0x{flags:02x} on a {t.name} datagram")
    if reserved:
        raise WireError("reserved", 5, f"must be 0, got {reserved}")
    if se == 0:
        raise WireError("sender_epoch", 8, "must not be 0")
    return Header(t, node, se, re_, seq, ack, flags)


def decode_datagram(data: bytes, key: bytes) -> Datagram:
    """Check length, magic, version and MAC, then parse. Raises WireError/AuthError only."""
    n = len(data)
    if n < MIN_DATAGRAM:
        raise WireError("length", 0, f"{n} bytes, minimum {MIN_DATAGRAM}")
    if data[:2] != MAGIC:
        raise WireError("magic", 0, f"{bytes(data[:2])!r} is not {MAGIC!r}")
    if data[2] != VERSION:
        raise WireError("version", 2, f"{data[2]} is not {VERSION}")
    end = n - MAC_LEN
    mac = hmac.digest(key, memoryview(data)[:end], "sha256")[:MAC_LEN]
    if not hmac.compare_digest(mac, data[end:]):
        raise AuthError("mac", end, "MAC mismatch")
    header = decode_header(data)
    if header.type is DatagramType.DATA:
        records = _decode_records(data, HEADER_LEN, end, _DATA_RECORDS)
    else:
        records = _decode_records(data, HEADER_LEN, end, ALLOWED_RECORDS[header.type])
    return Datagram(header, tuple(records))


def _truncated(name: str, off: int) -> WireError:
    return WireError("record", off, f"truncated {name} record")


# Integer copies of the enum values: enum attribute lookups cost more than the work here.
_R_FULL, _R_UPDATE, _R_DELETE, _R_DELETE_KEY = 1, 2, 3, 4
# Plain FULL layouts (no NAT, no zone) by flags: (struct, family, has tcp_state)
_PLAIN_FULL = {
    0: (_F4, 4, False),
    RF_PROTOINFO: (_F4P, 4, True),
    RF_V6: (_F6, 6, False),
    RF_V6 | RF_PROTOINFO: (_F6P, 6, True),
}
# NamedTuple.__new__ is a Python-level function; tuple.__new__ builds the same object in C.
_new = tuple.__new__


# Values shared by many records (addresses, ports, marks, timeouts); bounded, checked once
# per datagram, so a stream of ever-new values cannot grow them.
_INTERN_MAX = 1 << 17
_ADDRS: dict[bytes, bytes] = {}
_INTS: dict[int, int] = {}


def _decode_records(data: bytes, off: int, end: int, allowed: frozenset[int]) -> list[Record]:
    out: list[Record] = []
    append = out.append
    plain_full = _PLAIN_FULL
    icmps = _ICMPS
    new = _new
    if len(_ADDRS) > _INTERN_MAX:
        _ADDRS.clear()
    if len(_INTS) > _INTERN_MAX:
        _INTS.clear()
    intern_addr, intern_int = _ADDRS.setdefault, _INTS.setdefault
    while off < end:
        b0 = data[off]
        rt = b0 >> 4
        fl = b0 & 0xF
        if rt not in allowed:
            if 1 <= rt <= len(RecordType):
                raise WireError("record_type", off, f"{RecordType(rt).name} not allowed here")
            raise WireError("record_type", off, f"unknown record type {rt}")
        if rt == _R_UPDATE:
            if fl & ~RF_PROTOINFO:
                raise WireError("record_flags", off, f"0x{fl:x} not valid for UPDATE")
            if fl:
                if off + 18 > end:
                    raise _truncated("UPDATE", off)
                _, cid, chk, st, to, mk, tcp = _UPDATE_P.unpack_from(data, off)
                if tcp == 0:
                    raise WireError("tcp_state", off + 17, "present but 0")
                off += 18
            else:
                if off + 17 > end:
                    raise _truncated("UPDATE", off)
                _, cid, chk, st, to, mk = _UPDATE.unpack_from(data, off)
                tcp = 0
                off += 17
            append(new(Update, (cid, chk, st, to, mk, tcp)))
        elif rt == _R_FULL:
            plain = plain_full.get(fl)
            if plain is None:
                off = _decode_full(data, off, end, fl, append)
                continue
            s, family, has_tcp = plain
            if off + s.size > end:
                raise _truncated("FULL", off)
            if has_tcp:
                _, proto, src, dst, sp, dp, cid, st, to, mk, tcp = s.unpack_from(data, off)
                if tcp == 0:
                    raise WireError("tcp_state", off + s.size - 1, "present but 0")
            else:
                _, proto, src, dst, sp, dp, cid, st, to, mk = s.unpack_from(data, off)
                tcp = 0
            # Interned: a replica of 100k flows shares a few hundred addresses, ports and
            # marks instead of holding 100k copies of each (measured: -15% of both tables).
            src, dst = intern_addr(src, src), intern_addr(dst, dst)
            sp, dp = intern_int(sp, sp), intern_int(dp, dp)
            st, to, mk = intern_int(st, st), intern_int(to, to), intern_int(mk, mk)
            orig = new(FlowKey, (family, proto, src, dst, sp, dp, 0))
            reply = inverse(orig) if proto in icmps else new(FlowKey, (family, proto, dst, src, dp, sp, 0))
            append(new(Flow, (orig, reply, cid, st, to, mk, tcp)))
            off += s.size
        elif rt == _R_DELETE:
            if fl:
                raise WireError("record_flags", off, f"0x{fl:x} not valid for DELETE")
            if off + 7 > end:
                raise _truncated("DELETE", off)
            _, cid, chk = _DELETE.unpack_from(data, off)
            append(new(Delete, (cid, chk)))
            off += 7
        elif rt == _R_DELETE_KEY:
            if fl & ~(RF_V6 | RF_ZONE):
                raise WireError("record_flags", off, f"0x{fl:x} not valid for DELETE_KEY")
            alen, tup = (16, _TUPLE6) if fl & RF_V6 else (4, _TUPLE4)
            size = 2 + tup.size + (2 if fl & RF_ZONE else 0)
            if off + size > end:
                raise _truncated("DELETE_KEY", off)
            proto = data[off + 1]
            src, dst, sp, dp = tup.unpack_from(data, off + 2)
            zone = _U16.unpack_from(data, off + 2 + tup.size)[0] if fl & RF_ZONE else 0
            if fl & RF_ZONE and zone == 0:
                raise WireError("zone", off + 2 + tup.size, "present but 0")
            append(DeleteKey(FlowKey(6 if alen == 16 else 4, proto, src, dst, sp, dp, zone)))
            off += size
        else:
            if fl:
                raise WireError("record_flags", off, f"0x{fl:x} not valid for {RecordType(rt).name}")
            fs = _FIXED[rt]
            if off + fs.size > end:
                raise _truncated(RecordType(rt).name, off)
            vals = fs.unpack_from(data, off)
            append(_FIXED_CLS[rt](*vals[1:]))
            off += fs.size
    return out


_FIXED: dict[int, struct.Struct] = {
    RecordType.RESYNC_BEGIN: _BEGIN,
    RecordType.RESYNC_END: _END,
    RecordType.DIGEST: _DIGEST,
    RecordType.NACK_RANGE: _NACK,
    RecordType.RESYNC_REQUEST: _REQUEST,
}
_FIXED_CLS: dict[int, type[ResyncBegin | ResyncEnd | Digest | NackRange | ResyncRequest]] = {
    RecordType.RESYNC_BEGIN: ResyncBegin,
    RecordType.RESYNC_END: ResyncEnd,
    RecordType.DIGEST: Digest,
    RecordType.NACK_RANGE: NackRange,
    RecordType.RESYNC_REQUEST: ResyncRequest,
}


def _decode_full(data: bytes, off: int, end: int, fl: int, append: Callable[[Record], None]) -> int:
    start = off
    v6 = fl & RF_V6
    family = 6 if v6 else 4
    tup = _TUPLE6 if v6 else _TUPLE4
    zlen = 2 if fl & RF_ZONE else 0
    size = (
        2 + tup.size + zlen
        + ((tup.size + zlen) if fl & RF_NAT else 0)
        + _TAIL.size + (1 if fl & RF_PROTOINFO else 0)
    )  # fmt: skip
    if off + size > end:
        raise _truncated("FULL", off)
    proto = data[off + 1]
    off += 2
    src, dst, sp, dp = tup.unpack_from(data, off)
    off += tup.size
    zone = 0
    if zlen:
        zone = _U16.unpack_from(data, off)[0]
        off += 2
    orig = FlowKey(family, proto, src, dst, sp, dp, zone)
    if fl & RF_NAT:
        rsrc, rdst, rsp, rdp = tup.unpack_from(data, off)
        off += tup.size
        rzone = 0
        if zlen:
            rzone = _U16.unpack_from(data, off)[0]
            off += 2
        reply = FlowKey(family, proto, rsrc, rdst, rsp, rdp, rzone)
        if reply == inverse(orig):
            raise WireError("reply", start, "NAT flag set but the reply is the inverse")
    else:
        reply = inverse(orig)
    if zlen and not (zone or (fl & RF_NAT and reply.zone)):
        raise WireError("zone", start, "zone flag set but all zones are 0")
    cid, st, to, mk = _TAIL.unpack_from(data, off)
    off += _TAIL.size
    tcp = 0
    if fl & RF_PROTOINFO:
        tcp = data[off]
        if tcp == 0:
            raise WireError("tcp_state", off, "present but 0")
        off += 1
    append(Flow(orig, reply, cid, st, to, mk, tcp))
    return off
