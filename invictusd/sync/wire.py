"""Codec of the replication datagram, version 2 (byte tables: ``docs/sync-protocol.md``).

Pure and symmetric: ``encode_datagram``/``DatagramBuilder`` produce bytes, ``decode_datagram``
turns bytes back into a ``Datagram`` or raises ``WireError`` (``AuthError`` for a bad MAC)
naming the field and the offset. Nothing else ever escapes decoding: no ``IndexError``, no
``struct.error``, no ``ValueError`` from an enum. The backup's hot path decodes nothing:
``open_datagram`` checks the MAC and header, ``validate_records`` checks a DATA payload
exactly as decoding would (property-tested), and the records go from their bytes to kernel
requests (``invictusd.io.transcode.build_records``).

Layout: a 32-byte header, the records, a 16-byte HMAC-SHA256 trailer over everything before
it. A record starts with one byte, record type in the high nibble and flags in the low nibble.

Entries are named by their original tuple, never by a conntrack id (ids are local to each
kernel): the receiver holds the replica in its kernel and keeps nothing per entry, so every
record must be applicable to the kernel on its own. An entry record is an upsert, in one of
two kinds that only differ in what the receiver tries first (``UPSERT_NEW``: create, for a
conntrack NEW event; ``UPSERT``: update). Records are flat ``NamedTuple``s of plain values:
they are made once per conntrack event on the master's generic path.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from invictusd.flows import ICMP_INVERSE, IPPROTO_ICMP, IPPROTO_ICMPV6, Flow, FlowKey

MAGIC = b"IV"
VERSION = 2
MAC_LEN = 16
DEFAULT_MTU = 1400  # UDP payload budget of one datagram, header and MAC included

# magic, version, type, flags, reserved, node id, sender epoch, receiver epoch, seq, ack
HEADER = struct.Struct(">2sBBBBHQQII")
HEADER_LEN = HEADER.size  # 32
MIN_DATAGRAM = HEADER_LEN + MAC_LEN
U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF


class DatagramType(enum.IntEnum):
    DATA = 1  # sequenced: carries entry and stream-control records
    ACK = 2  # header only; the ack field is the news
    NACK = 3  # NACK_RANGE records
    HELLO = 4  # header only; accepted whatever its receiver epoch (carries no state)
    RESYNC_REQUEST = 5  # one RESYNC_REQUEST record


class RecordType(enum.IntEnum):
    UPSERT_NEW = 1  # an entry, most likely new to the receiver (create first)
    UPSERT = 2  # an entry, most likely known to the receiver (update first)
    DELETE = 3  # remove the entry with this original tuple
    RESYNC_BEGIN = 4
    RESYNC_END = 5
    DIGEST = 6
    NACK_RANGE = 7
    RESYNC_REQUEST = 8


# Header flags.
FLAG_SYNC_POINT = 0x01  # first datagram of a resync: the receiver may skip any gap before it
HEADER_FLAGS = FLAG_SYNC_POINT

# Record flags (low nibble of the first record byte).
RF_V6 = 0x1  # addresses are 16 bytes (else 4)
RF_NAT = 0x2  # reply tuple present (NAT or a reply zone of its own; else it is inverse(orig))
RF_ZONE = 0x4  # zone u16 after each tuple present
RF_PROTOINFO = 0x8  # tcp_state u8 present at the end (else TCP_NONE)

_ENTRY_FLAGS = RF_V6 | RF_NAT | RF_ZONE | RF_PROTOINFO
_DELETE_FLAGS = RF_V6 | RF_ZONE

_DATA_RECORDS = frozenset(range(RecordType.UPSERT_NEW, RecordType.DIGEST + 1))
ALLOWED_RECORDS: dict[DatagramType, frozenset[int]] = {
    DatagramType.DATA: _DATA_RECORDS,
    DatagramType.ACK: frozenset(),
    DatagramType.NACK: frozenset({RecordType.NACK_RANGE}),
    DatagramType.HELLO: frozenset(),
    DatagramType.RESYNC_REQUEST: frozenset({RecordType.RESYNC_REQUEST}),
}
_TYPES = {int(t): t for t in DatagramType}

# Precompiled layouts. The common cases (no NAT, no zone) are one pack/unpack each.
_E4P = struct.Struct(">BB4s4sHHHIIB")  # 25: v4 with tcp_state
_E4 = struct.Struct(">BB4s4sHHHII")  # 24: v4 without
_E6P = struct.Struct(">BB16s16sHHHIIB")  # 49
_E6 = struct.Struct(">BB16s16sHHHII")  # 48
_HEAD2 = struct.Struct(">BB")
_TUPLE4 = struct.Struct(">4s4sHH")
_TUPLE6 = struct.Struct(">16s16sHH")
_U16 = struct.Struct(">H")
_TAIL = struct.Struct(">HII")  # status, timeout, mark
_DEL4 = struct.Struct(">BB4s4sHH")  # 14
_DEL6 = struct.Struct(">BB16s16sHH")  # 38
_BEGIN = struct.Struct(">BI")  # 5
_END = struct.Struct(">BII")  # 9
_DIGEST = struct.Struct(">BIQ")  # 13
_NACK = struct.Struct(">BII")  # 9
_REQUEST = struct.Struct(">BIB")  # 6
_KEYHASH = struct.Struct(">BBHHH")

_ICMPS = (IPPROTO_ICMP, IPPROTO_ICMPV6)
_T_NEW = RecordType.UPSERT_NEW << 4
_T_UPSERT = RecordType.UPSERT << 4
_T_DELETE = RecordType.DELETE << 4


class WireError(ValueError):
    """A datagram that does not decode. ``field`` and ``offset`` say where."""

    def __init__(self, field: str, offset: int, reason: str) -> None:
        super().__init__(f"{field} at offset {offset}: {reason}")
        self.field = field
        self.offset = offset
        self.reason = reason


class AuthError(WireError):
    """The MAC does not match: wrong key, corruption or forgery."""


class EncodeError(ValueError):
    """A record or header that cannot be encoded (a bug of the caller, not network input)."""

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


class Entry(NamedTuple):
    """An UPSERT_NEW/UPSERT record: one conntrack entry, flat. ``new`` says which kind."""

    new: bool
    family: int  # 4 or 6
    proto: int
    src: bytes
    dst: bytes
    sport: int  # ICMP: the id
    dport: int  # ICMP: type << 8 | code
    zone: int
    rsrc: bytes  # the reply tuple (equal to the inverse of the original without NAT)
    rdst: bytes
    rsport: int
    rdport: int
    rzone: int
    status: int  # bits 0-15 of the conntrack status
    timeout: int  # seconds left when captured
    mark: int
    tcp_state: int  # 0: none

    @property
    def is_nat(self) -> bool:
        return (self.rsrc, self.rdst, self.rsport, self.rdport) != _inverse_ports(self)

    @property
    def needs_reply(self) -> bool:
        """The record carries the reply tuple: NAT, or a reply zone of its own (directional
        zones, e.g. nft ``ct original zone set``)."""
        return self.is_nat or self.rzone != self.zone


class Delete(NamedTuple):
    family: int
    proto: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    zone: int


class ResyncBegin(NamedTuple):
    gen: int


class ResyncEnd(NamedTuple):
    gen: int
    entries: int  # entry records the sender put in this resync (informational)


class Digest(NamedTuple):
    entries: int
    digest: int  # XOR of key_hash of those entries


class NackRange(NamedTuple):
    first: int  # u32 sequence numbers, inclusive
    last: int


class ResyncRequest(NamedTuple):
    request_id: int  # increases per request within one receiver epoch
    reason: int


class RequestReason(enum.IntEnum):
    OTHER = 0
    DIGEST_MISMATCH = 1
    STALLED = 2
    APPLY_FAILED = 3  # the receiver's kernel refused entries
    BECAME_BACKUP = 4  # the receiver was master: what it took over must become replicas again


Record = Entry | Delete | ResyncBegin | ResyncEnd | Digest | NackRange | ResyncRequest


@dataclass(frozen=True, slots=True)
class Datagram:
    header: Header
    records: tuple[Record, ...] = ()


# ---- tuples and the key hash ------------------------------------------------------------

def reply_of(proto: int, src: bytes, dst: bytes, sport: int, dport: int) -> tuple[bytes, bytes, int, int]:
    """(src, dst, sport, dport) of the reply tuple the kernel expects without NAT."""
    if proto in _ICMPS:
        table = ICMP_INVERSE[proto]
        t, code = dport >> 8, dport & 0xFF
        return dst, src, sport, (table.get(t, t) << 8) | code
    return dst, src, dport, sport


def _inverse_ports(e: Entry | Delete) -> tuple[bytes, bytes, int, int]:
    return reply_of(e.proto, e.src, e.dst, e.sport, e.dport)


def key_bytes(family: int, proto: int, src: bytes, dst: bytes, sport: int, dport: int, zone: int) -> bytes:
    """The identity of an entry (its original tuple and zone) as bytes: a dict key."""
    return _KEYHASH.pack(family, proto, zone, sport, dport) + src + dst


def key_hash(family: int, proto: int, src: bytes, dst: bytes, sport: int, dport: int, zone: int) -> int:
    """64-bit hash of an original tuple, identical on every node and Python version.

    BLAKE2b (not a linear hash like CRC) because digests XOR these together: with a linear
    hash, differing sets of structured keys (ports 1,2 vs 0,3) would XOR to the same value.
    """
    return int.from_bytes(
        hashlib.blake2b(key_bytes(family, proto, src, dst, sport, dport, zone), digest_size=8).digest()
    )


def entry_key(e: Entry | Delete) -> bytes:
    return key_bytes(e.family, e.proto, e.src, e.dst, e.sport, e.dport, e.zone)


# ---- encoding ---------------------------------------------------------------------------


def encode_entry(e: Entry) -> bytes:
    """UPSERT_NEW/UPSERT record: 24-25 bytes for v4 without NAT, 36-37 with, 48-49 for v6."""
    family, proto, src, dst, sport, dport, zone = e[1:8]
    if family == 4:
        alen, flags, plain_p, plain, tup = 4, 0, _E4P, _E4, _TUPLE4
    elif family == 6:
        alen, flags, plain_p, plain, tup = 16, RF_V6, _E6P, _E6, _TUPLE6
    else:
        raise EncodeError("family", f"{family!r} is not 4 or 6")
    head = _T_NEW if e.new else _T_UPSERT
    tcp = e.tcp_state
    try:
        if len(src) != alen or len(dst) != alen or len(e.rsrc) != alen or len(e.rdst) != alen:
            raise EncodeError("addresses", f"must be {alen} bytes for family {family}")
        nat = e.needs_reply
        if not nat and not zone and not e.rzone:
            if tcp:
                return plain_p.pack(head | flags | RF_PROTOINFO, proto, src, dst, sport, dport,
                                    e.status, e.timeout, e.mark, tcp)
            return plain.pack(head | flags, proto, src, dst, sport, dport, e.status, e.timeout, e.mark)
        has_zone = bool(zone or e.rzone)
        flags |= (RF_ZONE if has_zone else 0) | (RF_NAT if nat else 0) | (RF_PROTOINFO if tcp else 0)
        parts = [_HEAD2.pack(head | flags, proto), tup.pack(src, dst, sport, dport)]
        if has_zone:
            parts.append(_U16.pack(zone))
        if nat:
            parts.append(tup.pack(e.rsrc, e.rdst, e.rsport, e.rdport))
            if has_zone:
                parts.append(_U16.pack(e.rzone))
        parts.append(_TAIL.pack(e.status, e.timeout, e.mark))
        if tcp:
            parts.append(bytes((tcp,)))
        return b"".join(parts)
    except (struct.error, TypeError, ValueError) as ex:
        if isinstance(ex, EncodeError):
            raise
        raise EncodeError("entry", f"{e!r}: {ex}") from None


def encode_delete(d: Delete) -> bytes:
    """DELETE record: the original tuple (14 bytes for v4 without zone)."""
    family, proto, src, dst, sport, dport, zone = d
    if family == 4:
        alen, flags, st, tup = 4, 0, _DEL4, _TUPLE4
    elif family == 6:
        alen, flags, st, tup = 16, RF_V6, _DEL6, _TUPLE6
    else:
        raise EncodeError("family", f"{family!r} is not 4 or 6")
    if len(src) != alen or len(dst) != alen:
        raise EncodeError("addresses", f"must be {alen} bytes")
    try:
        if zone:
            return _HEAD2.pack(_T_DELETE | flags | RF_ZONE, proto) + tup.pack(src, dst, sport, dport) + \
                _U16.pack(zone)
        return st.pack(_T_DELETE | flags, proto, src, dst, sport, dport)
    except struct.error as ex:
        raise EncodeError("delete", f"{d!r}: {ex}") from None


def encode_record(rec: Record) -> bytes:
    try:
        if isinstance(rec, Entry):
            return encode_entry(rec)
        if isinstance(rec, Delete):
            return encode_delete(rec)
        if isinstance(rec, ResyncBegin):
            return _BEGIN.pack(RecordType.RESYNC_BEGIN << 4, rec.gen)
        if isinstance(rec, ResyncEnd):
            return _END.pack(RecordType.RESYNC_END << 4, rec.gen, rec.entries)
        if isinstance(rec, Digest):
            return _DIGEST.pack(RecordType.DIGEST << 4, rec.entries, rec.digest)
        if isinstance(rec, NackRange):
            return _NACK.pack(RecordType.NACK_RANGE << 4, rec.first, rec.last)
        if isinstance(rec, ResyncRequest):
            return _REQUEST.pack(RecordType.RESYNC_REQUEST << 4, rec.request_id, rec.reason)
    except struct.error as e:
        raise EncodeError(type(rec).__name__, f"{rec!r}: {e}") from None
    raise EncodeError("record", f"not a record: {rec!r}")


_RECORD_TYPES: dict[type, RecordType] = {
    Delete: RecordType.DELETE,
    ResyncBegin: RecordType.RESYNC_BEGIN,
    ResyncEnd: RecordType.RESYNC_END,
    Digest: RecordType.DIGEST,
    NackRange: RecordType.NACK_RANGE,
    ResyncRequest: RecordType.RESYNC_REQUEST,
}


def record_type_of(rec: Record) -> RecordType:
    if isinstance(rec, Entry):
        return RecordType.UPSERT_NEW if rec.new else RecordType.UPSERT
    return _RECORD_TYPES[type(rec)]


def entry_from_flow(flow: Flow, new: bool) -> Entry:
    o, r = flow.orig, flow.reply
    return Entry(new, o.family, o.proto, o.src, o.dst, o.sport, o.dport, o.zone,
                 r.src, r.dst, r.sport, r.dport, r.zone, flow.status & 0xFFFF, flow.timeout,
                 flow.mark, flow.tcp_state)


def flow_from_entry(e: Entry) -> Flow:
    orig = FlowKey(e.family, e.proto, e.src, e.dst, e.sport, e.dport, e.zone)
    reply = FlowKey(e.family, e.proto, e.rsrc, e.rdst, e.rsport, e.rdport, e.rzone)
    return Flow(orig, reply, 0, e.status, e.timeout, e.mark, e.tcp_state)


def delete_from_key(k: FlowKey) -> Delete:
    return Delete(k.family, k.proto, k.src, k.dst, k.sport, k.dport, k.zone)


def _pack_header(header: Header) -> bytes:
    try:
        return HEADER.pack(
            MAGIC, VERSION, header.type, header.flags, 0, header.node_id,
            header.sender_epoch, header.receiver_epoch, header.seq, header.ack,
        )  # fmt: skip
    except struct.error as e:
        raise EncodeError("header", f"{header!r}: {e}") from None


def seal(body: bytes, key: bytes) -> bytes:
    """Append the MAC to a header+records body."""
    return body + hmac.digest(key, body, "sha256")[:MAC_LEN]


def encode_datagram(
    header: Header, records: Iterable[Record], key: bytes, mtu: int | None = DEFAULT_MTU
) -> bytes:
    """Header, records and MAC. Raises ``EncodeError`` if a record does not belong in this
    datagram type or the result exceeds ``mtu`` (``None``: no limit)."""
    allowed = ALLOWED_RECORDS[header.type]
    parts = [_pack_header(header)]
    for rec in records:
        if record_type_of(rec) not in allowed:
            raise EncodeError("records", f"{type(rec).__name__} not allowed in {header.type.name}")
        parts.append(encode_record(rec))
    out = seal(b"".join(parts), key)
    if mtu is not None and len(out) > mtu:
        raise EncodeError("records", f"datagram of {len(out)} bytes exceeds mtu {mtu}")
    return out


class DatagramBuilder:
    """Packs encoded records into one datagram up to an MTU budget.

    ``add`` returns False when the record does not fit (finish this one and start the next).
    """

    __slots__ = ("_parts", "_size", "capacity", "count")

    def __init__(self, mtu: int = DEFAULT_MTU) -> None:
        if mtu < MIN_DATAGRAM + 64:
            raise EncodeError("mtu", f"{mtu} leaves no room for records")
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

    def add_packed(self, records: bytes, count: int) -> None:
        """Add ``count`` records already joined; the caller checked they fit (``room``)."""
        if self._size + len(records) > self.capacity:
            raise EncodeError("records", f"{len(records)} bytes do not fit in {self.room}")
        self._parts.append(records)
        self._size += len(records)
        self.count += count

    @property
    def size(self) -> int:
        return self._size

    @property
    def room(self) -> int:
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
                raise EncodeError("records", f"a record of {len(rec)} bytes never fits")
            groups.append(cur)
            cur = []
            b.clear()
            if not b.add(rec):
                raise EncodeError("records", f"a record of {len(rec)} bytes never fits")
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


def open_datagram(data: bytes, key: bytes) -> Header:
    """Check length, magic, version and MAC; the header. Raises WireError/AuthError only.

    The records are left to ``decode_records_at``/``validate_records`` (a DATA datagram's
    records go to the kernel straight from their bytes, ``invictusd.io.transcode``)."""
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
    return decode_header(data)


def decode_datagram(data: bytes, key: bytes) -> Datagram:
    """Check length, magic, version and MAC, then parse. Raises WireError/AuthError only."""
    header = open_datagram(data, key)
    records = _decode_records(bytes(data), HEADER_LEN, len(data) - MAC_LEN, ALLOWED_RECORDS[header.type])
    return Datagram(header, tuple(records))


def decode_records(data: bytes) -> list[Record]:
    """The records of a DATA payload (no header, no MAC), e.g. what a transcoder produced."""
    return _decode_records(data, 0, len(data), _DATA_RECORDS)


def decode_record_at(data: bytes, off: int) -> tuple[Record, int]:
    """The one record of a DATA payload at ``off``, and the offset after it."""
    out: list[Record] = []
    nxt = _decode_into(data, off, len(data), _DATA_RECORDS, out, 1)
    if not out:
        raise WireError("record", off, "no record here")
    return out[0], nxt


def decode_payload(data: bytes, off: int, end: int, dtype: DatagramType) -> list[Record]:
    """The records of a ``dtype`` datagram's ``data[off:end]`` (after ``open_datagram``)."""
    return _decode_records(data, off, end, ALLOWED_RECORDS[dtype])


def entry_mark(record: bytes) -> int | None:
    """The mark of one encoded entry record (UPSERT_NEW or UPSERT); None for any other kind.
    Every entry record ends with status, timeout and mark, then the TCP state if flagged."""
    if record[0] >> 4 not in (RecordType.UPSERT_NEW, RecordType.UPSERT):
        return None
    end = len(record) - (1 if record[0] & RF_PROTOINFO else 0)
    return int.from_bytes(record[end - 4 : end], "big")


def record_ident(data: bytes, off: int) -> bytes:
    """The entry that the (checked) entry or DELETE record at ``off`` names: its original
    tuple and zone, as bytes equal for every record of the same entry, whatever its kind
    (both kinds start with the type byte, the protocol, the tuple, then the zone if any)."""
    b0 = data[off]
    end = off + (38 if b0 & RF_V6 else 14)
    if b0 & RF_ZONE and data[end : end + 2] != b"\0\0":
        end += 2
    return data[off + 1 : end]


def validate_records(data: bytes, off: int, end: int, dtype: DatagramType) -> int:
    """How many records of a ``dtype`` datagram ``data[off:end]`` holds, checked exactly as
    decoding checks them (the same ``WireError`` for the same bytes) without building them:
    the fixed-size layouts by a table of the first byte, the rest by the decoder itself."""
    allowed = ALLOWED_RECORDS[dtype]
    table = _sizes(allowed)
    check_last = _CHECK_LAST
    count = 0
    scratch: list[Record] = []
    while off < end:
        b0 = data[off]
        size = table[b0]
        nxt = off + size
        if size and nxt <= end and (not check_last[b0] or data[nxt - 1]):
            off = nxt
        else:
            off = _decode_into(data, off, end, allowed, scratch, 1)
            scratch.clear()
        count += 1
    return count


def _truncated(name: str, off: int) -> WireError:
    return WireError("record", off, f"truncated {name} record")


# Plain entry layouts (no NAT, no zone) by flags: (struct, family, has tcp_state)
_PLAIN = {
    0: (_E4, 4, False),
    RF_PROTOINFO: (_E4P, 4, True),
    RF_V6: (_E6, 6, False),
    RF_V6 | RF_PROTOINFO: (_E6P, 6, True),
}
_new = tuple.__new__  # NamedTuple.__new__ is a Python function; this is the same in C
_R_NEW, _R_UPSERT, _R_DELETE = 1, 2, 3


def _decode_records(data: bytes, off: int, end: int, allowed: frozenset[int]) -> list[Record]:
    out: list[Record] = []
    _decode_into(data, off, end, allowed, out, -1)
    return out


def _decode_into(data: bytes, off: int, end: int, allowed: frozenset[int], out: list[Record],
                 limit: int) -> int:
    """Decode records into ``out`` until ``end`` or ``limit`` of them (-1: no limit);
    returns the offset after the last one."""
    append = out.append
    plain = _PLAIN
    icmps = _ICMPS
    new = _new
    while off < end and limit:
        limit -= 1
        b0 = data[off]
        rt = b0 >> 4
        fl = b0 & 0xF
        if rt not in allowed:
            if 1 <= rt <= len(RecordType):
                raise WireError("record_type", off, f"{RecordType(rt).name} not allowed here")
            raise WireError("record_type", off, f"unknown record type {rt}")
        if rt in (_R_NEW, _R_UPSERT):
            p = plain.get(fl)
            if p is None:
                off = _decode_entry(data, off, end, rt == _R_NEW, fl, out)
                continue
            s, family, has_tcp = p
            if off + s.size > end:
                raise _truncated("entry", off)
            if has_tcp:
                _, proto, src, dst, sp, dp, st, to, mk, tcp = s.unpack_from(data, off)
                if tcp == 0:
                    raise WireError("tcp_state", off + s.size - 1, "present but 0")
            else:
                _, proto, src, dst, sp, dp, st, to, mk = s.unpack_from(data, off)
                tcp = 0
            if proto in icmps:
                rs, rd, rsp, rdp = reply_of(proto, src, dst, sp, dp)
                append(new(Entry, (rt == _R_NEW, family, proto, src, dst, sp, dp, 0,
                                   rs, rd, rsp, rdp, 0, st, to, mk, tcp)))
            else:
                append(new(Entry, (rt == _R_NEW, family, proto, src, dst, sp, dp, 0,
                                   dst, src, dp, sp, 0, st, to, mk, tcp)))
            off += s.size
        elif rt == _R_DELETE:
            if fl & ~_DELETE_FLAGS:
                raise WireError("record_flags", off, f"0x{fl:x} not valid for DELETE")
            v6 = fl & RF_V6
            s = _DEL6 if v6 else _DEL4
            size = s.size + (2 if fl & RF_ZONE else 0)
            if off + size > end:
                raise _truncated("DELETE", off)
            _, proto, src, dst, sp, dp = s.unpack_from(data, off)
            zone = 0
            if fl & RF_ZONE:
                zone = _U16.unpack_from(data, off + s.size)[0]
                if zone == 0:
                    raise WireError("zone", off + s.size, "present but 0")
            append(new(Delete, (6 if v6 else 4, proto, src, dst, sp, dp, zone)))
            off += size
        else:
            if fl:
                raise WireError("record_flags", off, f"0x{fl:x} not valid for {RecordType(rt).name}")
            fs, cls = _FIXED[rt]
            if off + fs.size > end:
                raise _truncated(RecordType(rt).name, off)
            append(cls(*fs.unpack_from(data, off)[1:]))
            off += fs.size
    return off


_Fixed = ResyncBegin | ResyncEnd | Digest | NackRange | ResyncRequest
_FIXED: dict[int, tuple[struct.Struct, type[_Fixed]]] = {
    RecordType.RESYNC_BEGIN: (_BEGIN, ResyncBegin),
    RecordType.RESYNC_END: (_END, ResyncEnd),
    RecordType.DIGEST: (_DIGEST, Digest),
    RecordType.NACK_RANGE: (_NACK, NackRange),
    RecordType.RESYNC_REQUEST: (_REQUEST, ResyncRequest),
}


# validate_records: the size of each fixed-size record by its first byte (0: the decoder
# decides), and whether its last byte is a tcp_state that must not be 0.
_CHECK_LAST = bytes(
    1 if b >> 4 in (_R_NEW, _R_UPSERT) and (b & 0xF) in _PLAIN and b & RF_PROTOINFO else 0 for b in range(256)
)
_SIZE_TABLES: dict[frozenset[int], tuple[int, ...]] = {}


def _sizes(allowed: frozenset[int]) -> tuple[int, ...]:
    table = _SIZE_TABLES.get(allowed)
    if table is None:
        sizes = [0] * 256
        for b in range(256):
            rt, fl = b >> 4, b & 0xF
            if rt not in allowed:
                continue
            if rt in (_R_NEW, _R_UPSERT) and fl in _PLAIN:
                sizes[b] = _PLAIN[fl][0].size
            elif rt == _R_DELETE and not fl & ~_DELETE_FLAGS and not fl & RF_ZONE:
                sizes[b] = (_DEL6 if fl & RF_V6 else _DEL4).size
            elif rt in _FIXED and not fl:
                sizes[b] = _FIXED[rt][0].size
        table = _SIZE_TABLES[allowed] = tuple(sizes)
    return table


def _decode_entry(data: bytes, off: int, end: int, is_new: bool, fl: int, out: list[Record]) -> int:
    """The general entry layout (NAT and/or zones)."""
    start = off
    v6 = fl & RF_V6
    family = 6 if v6 else 4
    tup = _TUPLE6 if v6 else _TUPLE4
    zlen = 2 if fl & RF_ZONE else 0
    size = (2 + tup.size + zlen + ((tup.size + zlen) if fl & RF_NAT else 0)
            + _TAIL.size + (1 if fl & RF_PROTOINFO else 0))
    if off + size > end:
        raise _truncated("entry", off)
    proto = data[off + 1]
    off += 2
    src, dst, sp, dp = tup.unpack_from(data, off)
    off += tup.size
    zone = 0
    if zlen:
        zone = _U16.unpack_from(data, off)[0]
        off += 2
    inv = reply_of(proto, src, dst, sp, dp)
    rs, rd, rsp, rdp = inv
    rzone = zone
    if fl & RF_NAT:
        rs, rd, rsp, rdp = tup.unpack_from(data, off)
        off += tup.size
        if zlen:
            rzone = _U16.unpack_from(data, off)[0]
            off += 2
        if (rs, rd, rsp, rdp) == inv and rzone == zone:
            raise WireError("reply", start, "NAT flag set but the reply is the inverse in the same zone")
    if zlen and not (zone or rzone):
        raise WireError("zone", start, "zone flag set but all zones are 0")
    if zlen and not fl & RF_NAT and rzone != zone:
        raise WireError("zone", start, "reply zone differs without the NAT form")
    st, to, mk = _TAIL.unpack_from(data, off)
    off += _TAIL.size
    tcp = 0
    if fl & RF_PROTOINFO:
        tcp = data[off]
        if tcp == 0:
            raise WireError("tcp_state", off, "present but 0")
        off += 1
    out.append(Entry(is_new, family, proto, src, dst, sp, dp, zone, rs, rd, rsp, rdp, rzone,
                     st, to, mk, tcp))
    return off
