"""Transcoding between ctnetlink messages and sync wire records, without object graphs.

Pure: no sockets, no asyncio. Three parts:

* **Master side** (``EventTranscoder``): conntrack events and dump replies straight into
  encoded ``invictusd.sync.wire`` records. The first message of each attribute layout is
  decoded by the generic walk (``ctnetlink._parse_ct``, the reference semantics) and its
  layout is *compiled*: one ``struct.Struct`` that reads every attribute header of that
  layout (plus the protocol numbers) for a single tuple comparison, one that reads the
  fields a record needs, and the record structs to pack them into. Later messages of that
  layout are two unpacks and one or two packs; a run of them is transcoded by strided
  copies across the messages (``_event_run``). A message whose headers differ from every
  layout cached for its (length, type, flags) takes the generic walk, so correctness never
  depends on the cache; the cache is bounded.
* **Backup side** (``build_entry``, ``build_entry_delete``): ``wire.Entry``/``wire.Delete``
  into the ctnetlink request that injects or deletes it, byte-identical to
  ``ctnetlink.build_create``/``build_delete`` of the equivalent ``Flow``, from templates.
* **Kernel-side filter** (``event_filter``): a classic BPF program for the event socket that
  passes only the events the master replicates.

Why a layout is safe to trust: it is compiled only from a message whose nested structure is
"clean" (every attribute the generic walk would read appears once, with the length it
needs), and the header check compares every attribute header the generic walk visits at
the top level and inside the tuples, plus the protocol bytes. Any message passing that
check is therefore decoded by the generic walk into exactly the fields the compiled layout
reads; the unit tests check that equivalence on captured and fuzzed messages.
"""

from __future__ import annotations

import random
import struct
import sys
from array import array
from collections.abc import Callable
from operator import itemgetter
from typing import Any, Final, NamedTuple

from invictusd import cbpf
from invictusd import flows as F
from invictusd.io import ctnetlink as ct
from invictusd.io.ctnetlink import KernelError, NetlinkError
from invictusd.sync import wire
from invictusd.sync.policy import Scope

__all__ = [
    "Batch",
    "Built",
    "EventTranscoder",
    "Injection",
    "build_entry",
    "build_entry_delete",
    "build_records",
    "event_filter",
    "select_entries",
    "with_ack",
]

with_ack = ct.with_ack

# --- wire record constants (the format is wire.py's; these are its bytes) -------------------
_T_NEW: Final = wire.RecordType.UPSERT_NEW << 4
_T_UPSERT: Final = wire.RecordType.UPSERT << 4
_T_DELETE: Final = wire.RecordType.DELETE << 4
_RF_V6: Final = wire.RF_V6
_RF_NAT: Final = wire.RF_NAT
_RF_ZONE: Final = wire.RF_ZONE
_RF_PI: Final = wire.RF_PROTOINFO

# Entry records: plain (no NAT, no zone) and NAT (reply tuple present, no zone), each with
# and without the trailing tcp_state byte. The plain ones are wire's own structs.
_REC = {
    (False, False, False): wire._E4,
    (False, False, True): wire._E4P,
    (True, False, False): wire._E6,
    (True, False, True): wire._E6P,
    (False, True, False): struct.Struct(">BB4s4sHH4s4sHHHII"),
    (False, True, True): struct.Struct(">BB4s4sHH4s4sHHHIIB"),
    (True, True, False): struct.Struct(">BB16s16sHH16s16sHHHII"),
    (True, True, True): struct.Struct(">BB16s16sHH16s16sHHHIIB"),
}
_DEL = {False: wire._DEL4, True: wire._DEL6}
_DELZ = {False: struct.Struct(">BB4s4sHHH"), True: struct.Struct(">BB16s16sHHH")}
_TUP = {False: struct.Struct(">4s4sHH"), True: struct.Struct(">16s16sHH")}
_ZONE_REC: Final = struct.Struct(">H")
_TAIL: Final = struct.Struct(">HII")
_TAIL_P: Final = struct.Struct(">HIIB")
_HEAD2: Final = struct.Struct(">BB")
# wire.key_bytes in one pack: family, proto, zone, sport, dport, src, dst
_KEY = {False: struct.Struct(">BBHHH4s4s"), True: struct.Struct(">BBHHH16s16s")}

_ICMPS: Final = (F.IPPROTO_ICMP, F.IPPROTO_ICMPV6)
_ICMP_REPLY = F.ICMP_INVERSE


class Batch(NamedTuple):
    """What one ``EventTranscoder.transcode`` call produced.

    ``records``: encoded wire records in message order; ``keys``: parallel to ``records``,
    ``wire.key_bytes`` of each entry's original tuple and zone; ``deleted``: how many of the
    records are DELETE; ``done``: NLMSG_DONE was seen (a dump ended; the walk stops there);
    ``skipped``: conntrack messages filtered out by their mark.
    """

    records: list[bytes]
    keys: list[bytes]
    deleted: int
    done: bool
    skipped: int


def select_entries(batch: Batch, mark: int, mask: int) -> Batch:
    """The entry records of a dump's ``batch`` whose mark has ``mark & mask == mark``: the
    selection a kernel dump filter would make, made here (``io/scan.py`` says why)."""
    mark_of = wire.entry_mark
    keep = [i for i, r in enumerate(batch.records) if (m := mark_of(r)) is not None and m & mask == mark]
    if len(keep) == len(batch.records):
        return batch
    records, keys = batch.records, batch.keys
    return Batch([records[i] for i in keep], [keys[i] for i in keep], 0, batch.done,
                 batch.skipped + len(records) - len(keep))


def _entry_record(
    head: int, v6: bool, proto: int, src: bytes, dst: bytes, sp: int, dp: int, zone: int,
    rs: bytes, rd: bytes, rsp: int, rdp: int, rzone: int, st: int, to: int, mk: int, tcp: int,
) -> bytes:
    """``wire.encode_entry`` of these fields (``head``: record type << 4), from flat values.

    A reply zone of its own (directional zones) takes the NAT form, with the reply tuple.
    """
    if proto == 1 or proto == 58:
        t = dp >> 8
        nat = not (rs == dst and rd == src and rsp == sp
                   and rdp == (_ICMP_REPLY[proto].get(t, t) << 8 | (dp & 0xFF)))
    else:
        nat = not (rs == dst and rd == src and rsp == dp and rdp == sp)
    flags = head | (_RF_V6 if v6 else 0)
    if not zone and not rzone:
        if nat:
            if tcp:
                return _REC[v6, True, True].pack(flags | _RF_NAT | _RF_PI, proto, src, dst, sp, dp,
                                                 rs, rd, rsp, rdp, st, to, mk, tcp)
            return _REC[v6, True, False].pack(flags | _RF_NAT, proto, src, dst, sp, dp,
                                              rs, rd, rsp, rdp, st, to, mk)
        if tcp:
            return _REC[v6, False, True].pack(flags | _RF_PI, proto, src, dst, sp, dp, st, to, mk, tcp)
        return _REC[v6, False, False].pack(flags, proto, src, dst, sp, dp, st, to, mk)
    nat = nat or rzone != zone
    tup = _TUP[v6]
    flags |= _RF_ZONE | (_RF_NAT if nat else 0) | (_RF_PI if tcp else 0)
    parts = [_HEAD2.pack(flags, proto), tup.pack(src, dst, sp, dp), _ZONE_REC.pack(zone)]
    if nat:
        parts.append(tup.pack(rs, rd, rsp, rdp))
        parts.append(_ZONE_REC.pack(rzone))
    parts.append(_TAIL_P.pack(st, to, mk, tcp) if tcp else _TAIL.pack(st, to, mk))
    return b"".join(parts)


# --- layouts ---------------------------------------------------------------------------------
# A compiled layout is a plain tuple (cheap to unpack on the hot path):
#   (op, check_unpack, expected, data_unpack, perm, proto, v6, head_base, upsert_base,
#    family, key_pack, plain_pack, plain_tcp_pack, nat_pack, nat_tcp_pack, run_plan)
# ``perm``: None, or an itemgetter putting the data fields in the op's canonical order;
# ``run_plan``: an ``_EventRun`` for the entry ops, else None.
OP_SKIP: Final = 0  # no CTA_MARK: unmarked, filtered out
OP_PORTS: Final = 1  # entry, ports, no zone, no protoinfo: src dst sp dp rs rd rsp rdp st to mk
OP_PORTS_TCP: Final = 2  # ... st to tcp mk
OP_DEL_PORTS: Final = 3  # DESTROY, ports, no zone: src dst sp dp mk
OP_GENERAL: Final = 4  # anything else that is clean: the _GENERAL_FIELDS order (0 if absent)
OP_GENERIC: Final = 5  # a layout that did not compile: go to the generic walk at once
_ENTRY_PORT_OPS: Final = (OP_PORTS, OP_PORTS_TCP)

_PORTS_FIELDS: tuple[str, ...] = ("src", "dst", "sp", "dp", "rs", "rd", "rsp", "rdp", "st", "to", "mk")
_PORTS_TCP_FIELDS: tuple[str, ...] = (
    "src", "dst", "sp", "dp", "rs", "rd", "rsp", "rdp", "st", "to", "tcp", "mk",
)
_DEL_FIELDS: tuple[str, ...] = ("src", "dst", "sp", "dp", "mk")
_GENERAL_FIELDS: tuple[str, ...] = ("src", "dst", "sp", "dp", "code", "rs", "rd", "rsp", "rdp", "rcode",
                   "ozone", "rzone", "st", "to", "tcp", "mk")

Layout = tuple[Any, ...]

MAX_LAYOUTS_PER_KEY: Final = 4
MAX_KEYS: Final = 256

_nla = ct._NLA.unpack_from
_NLMSGHDR = ct._NLMSGHDR
# The first 8 bytes of a message (length, type, flags) as one integer: the cache key.
_Q = struct.Struct("=Q")
_q = _Q.unpack_from
_LITTLE = sys.byteorder == "little"
_LEN_MASK: Final = 0xFFFFFFFF
_LEN_SHIFT: Final = 0 if _LITTLE else 32

_TOP_READ = frozenset({ct.CTA_TUPLE_ORIG, ct.CTA_TUPLE_REPLY, ct.CTA_STATUS, ct.CTA_PROTOINFO,
                       ct.CTA_TIMEOUT, ct.CTA_MARK, ct.CTA_ID, ct.CTA_ZONE})
_SPORT_TYPES = frozenset({ct.CTA_PROTO_SRC_PORT, ct.CTA_PROTO_ICMP_ID, ct.CTA_PROTO_ICMPV6_ID})
_TYPE_TYPES = frozenset({ct.CTA_PROTO_ICMP_TYPE, ct.CTA_PROTO_ICMPV6_TYPE})
_CODE_TYPES = frozenset({ct.CTA_PROTO_ICMP_CODE, ct.CTA_PROTO_ICMPV6_CODE})


class _Spec:
    """What the compiler collects: constant byte spans and named fields (offsets relative
    to the message start)."""

    __slots__ = ("checks", "fields")

    def __init__(self) -> None:
        self.checks: list[tuple[int, int]] = []
        self.fields: dict[str, tuple[int, str]] = {}

    def field(self, name: str, rel: int, fmt: str) -> None:
        self.fields[name] = (rel, fmt)


class _TupleInfo(NamedTuple):
    v6: bool
    proto: int
    ports: bool  # CTA_PROTO_SRC_PORT and DST_PORT, no ICMP attributes
    zone: bool  # CTA_TUPLE_ZONE present


def _compile_tuple(buf: bytes, base: int, a: int, alen: int, spec: _Spec, r: str) -> _TupleInfo | None:
    """Record a CTA_TUPLE_* nest's headers and fields; None unless it is clean."""
    end = a + alen
    b = a + 4
    seen: set[int] = set()
    v6: bool | None = None
    proto = -1
    sub: set[int] = set()
    while b + 4 <= end:
        blen, btype = _nla(buf, b)
        if blen < 4 or b + blen > end:
            return None
        t = btype & ct.NLA_TYPE_MASK
        if t in seen:
            return None
        seen.add(t)
        spec.checks.append((b - base, 4))
        bend = b + blen
        if t == ct.CTA_TUPLE_IP:
            c = b + 4
            while c + 4 <= bend:
                clen, ctype = _nla(buf, c)
                if clen < 4 or c + clen > bend:
                    return None
                ctype &= ct.NLA_TYPE_MASK
                spec.checks.append((c - base, 4))
                if ctype in (ct.CTA_IP_V4_SRC, ct.CTA_IP_V4_DST) and clen == 8:
                    is6 = False
                elif ctype in (ct.CTA_IP_V6_SRC, ct.CTA_IP_V6_DST) and clen == 20:
                    is6 = True
                else:
                    return None
                if v6 is not None and v6 != is6:
                    return None
                v6 = is6
                is_src = ctype in (ct.CTA_IP_V4_SRC, ct.CTA_IP_V6_SRC)
                name = ("rs" if is_src else "rd") if r else ("src" if is_src else "dst")
                if name in spec.fields:
                    return None
                spec.field(name, c + 4 - base, "16s" if is6 else "4s")
                c += (clen + 3) & ~3
            if not all(n in spec.fields for n in (("rs", "rd") if r else ("src", "dst"))):
                return None
        elif t == ct.CTA_TUPLE_PROTO:
            c = b + 4
            while c + 4 <= bend:
                clen, ctype = _nla(buf, c)
                if clen < 4 or c + clen > bend:
                    return None
                ctype &= ct.NLA_TYPE_MASK
                if ctype in sub:
                    return None
                sub.add(ctype)
                spec.checks.append((c - base, 4))
                if ctype == ct.CTA_PROTO_NUM and clen >= 5:
                    proto = buf[c + 4]
                    spec.checks.append((c + 4 - base, 1))
                elif ctype in _SPORT_TYPES and clen >= 6:
                    if len(sub & _SPORT_TYPES) > 1:
                        return None
                    spec.field(r + "sp", c + 4 - base, "H")
                elif ctype == ct.CTA_PROTO_DST_PORT and clen >= 6:
                    spec.field(r + "dp", c + 4 - base, "H")
                elif ctype in _TYPE_TYPES and clen >= 5:
                    if len(sub & _TYPE_TYPES) > 1:
                        return None
                    spec.field(r + "type", c + 4 - base, "B")
                elif ctype in _CODE_TYPES and clen >= 5:
                    if len(sub & _CODE_TYPES) > 1:
                        return None
                    spec.field(r + "code", c + 4 - base, "B")
                else:
                    return None
                c += (clen + 3) & ~3
        elif t == ct.CTA_TUPLE_ZONE:
            if blen < 6:
                return None
            spec.field(r + "tz", b + 4 - base, "H")
        else:
            return None
        b += (blen + 3) & ~3
    if v6 is None or proto < 0:
        return None
    ports = ct.CTA_PROTO_SRC_PORT in sub and ct.CTA_PROTO_DST_PORT in sub and len(sub) == 3
    return _TupleInfo(v6, proto, ports, ct.CTA_TUPLE_ZONE in seen)


def _structs(spec_items: list[tuple[int, int, str]]) -> struct.Struct:
    """A big-endian struct reading ``(offset, size, fmt)`` items (sorted, not overlapping)."""
    fmt = [">"]
    pos = 0
    for rel, size, f in spec_items:
        if rel < pos:
            raise ValueError("overlapping layout items")
        if rel > pos:
            fmt.append(f"{rel - pos}x")
        fmt.append(f)
        pos = rel + size
    return struct.Struct("".join(fmt))


_FMT_SIZE = {"4s": 4, "16s": 16, "H": 2, "B": 1, "I": 4}


def _check_struct(checks: list[tuple[int, int]]) -> struct.Struct:
    runs: list[list[int]] = []
    for rel, size in sorted(checks):
        if runs and rel <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], rel + size)
        else:
            runs.append([rel, rel + size])
    return _structs([(s, e - s, f"{e - s}s") for s, e in runs])


def _top_walk(
    buf: bytes, off: int, end: int
) -> tuple[list[tuple[int, int]], dict[int, tuple[int, int]], bool] | None:
    """Top-level attribute headers (for the check), positions of those the generic walk
    reads, and whether each of those appears once; None if the walk itself fails."""
    checks: list[tuple[int, int]] = []
    top: dict[int, tuple[int, int]] = {}
    clean = True
    a = off + 20
    while a + 4 <= end:
        alen, atype = _nla(buf, a)
        if alen < 4 or a + alen > end:
            return None
        t = atype & ct.NLA_TYPE_MASK
        checks.append((a - off, 4))
        if t in _TOP_READ:
            if t in (ct.CTA_STATUS, ct.CTA_TIMEOUT, ct.CTA_MARK, ct.CTA_ID) and alen < 8:
                return None
            if t == ct.CTA_ZONE and alen < 6:
                return None
            if t in top:
                clean = False
            top[t] = (a, alen)
        a += (alen + 3) & ~3
    return checks, top, clean


def _hint(buf: bytes, off: int, checks: list[tuple[int, int]]) -> Layout:
    cs = _check_struct(checks) if checks else struct.Struct(">16x")
    unused = _KEY[False].pack
    return (OP_GENERIC, cs.unpack_from, cs.unpack_from(buf, off), cs.unpack_from, None, 0, False, 0, 0,
            4, unused, unused, unused, unused, unused, None)


def compile_layout(buf: bytes, off: int, mlen: int, mtype: int, mflags: int) -> Layout | None:
    """The compiled layout of the conntrack message at ``buf[off:off+mlen]``, an OP_GENERIC
    hint if its layout is not one the fast path handles, or None if the top level does not
    even walk (the generic path raises for those)."""
    end = off + mlen
    walked = _top_walk(buf, off, end)
    if walked is None:
        return None
    checks, top, clean = walked
    spec = _Spec()
    spec.checks = list(checks)
    if ct.CTA_MARK not in top:
        # Filtered out by the generic walk before it looks at anything below the top level.
        return (OP_SKIP, *_hint(buf, off, checks)[1:])
    if not clean or ct.CTA_TUPLE_ORIG not in top or ct.CTA_TUPLE_REPLY not in top:
        return _hint(buf, off, checks)
    oi = _compile_tuple(buf, off, *top[ct.CTA_TUPLE_ORIG], spec, "")
    ri = _compile_tuple(buf, off, *top[ct.CTA_TUPLE_REPLY], spec, "r")
    if oi is None or ri is None or oi.v6 != ri.v6 or oi.proto != ri.proto:
        return _hint(buf, off, checks)
    proto = oi.proto
    icmp = proto in _ICMPS
    fields = spec.fields
    mark_at = top[ct.CTA_MARK][0]
    spec.field("mk", mark_at + 4 - off, "I")
    if ct.CTA_STATUS in top:
        spec.field("st", top[ct.CTA_STATUS][0] + 6 - off, "H")
    if ct.CTA_TIMEOUT in top:
        spec.field("to", top[ct.CTA_TIMEOUT][0] + 4 - off, "I")
    if ct.CTA_ZONE in top:
        spec.field("czone", top[ct.CTA_ZONE][0] + 4 - off, "H")
    if ct.CTA_PROTOINFO in top:
        p, plen = top[ct.CTA_PROTOINFO]
        if plen < 16:
            return _hint(buf, off, checks)
        tlen, ttype, slen, stype = ct._NLA2(buf, p + 4)
        if not (ttype & 0x3FFF == 1 and stype == 1 and slen >= 5 and 12 <= tlen <= plen - 4):
            return _hint(buf, off, checks)
        spec.checks.append((p + 4 - off, 8))
        spec.field("tcp", p + 12 - off, "B")
    # Rename ICMP fields to the canonical names: for ICMP dp is the type (dport = type<<8|code).
    for r in ("", "r"):
        if icmp:
            if r + "dp" in fields:  # a DST_PORT attribute in an ICMP tuple: not read as such
                del fields[r + "dp"]
            if r + "type" in fields:
                fields[r + "dp"] = fields.pop(r + "type")
        else:
            fields.pop(r + "type", None)
            fields.pop(r + "code", None)
    # The orig tuple's zone: its CTA_TUPLE_ZONE, else CTA_ZONE (as the generic walk does).
    zoned = oi.zone or ri.zone or "czone" in fields
    is_delete = mtype == ct.CT_DELETE
    if not zoned and not icmp and oi.ports and ri.ports:
        if is_delete:
            op, names = OP_DEL_PORTS, _DEL_FIELDS
        elif "st" in fields and "to" in fields:
            op, names = (OP_PORTS_TCP, _PORTS_TCP_FIELDS) if "tcp" in fields else (OP_PORTS, _PORTS_FIELDS)
        else:
            op, names = OP_GENERAL, _GENERAL_FIELDS
    else:
        op, names = OP_GENERAL, _GENERAL_FIELDS
    alias = {"ozone": "tz" if oi.zone else "czone", "rzone": "rtz" if ri.zone else "czone"}
    wanted = [alias.get(name, name) for name in names]
    if op != OP_GENERAL and not all(w in fields for w in wanted):
        return _hint(buf, off, checks)
    # Read only what the op uses, in message order; reorder with an itemgetter if needed.
    items = sorted((rel, _FMT_SIZE[f], f, name) for name, (rel, f) in fields.items() if name in wanted)
    ds = _structs([(rel, size, f) for rel, size, f, _ in items])
    order = [name for *_, name in items]
    zero = len(order)  # OP_GENERAL: absent fields read a 0 appended to the tuple
    idx = [order.index(w) if w in order else zero for w in wanted]
    perm: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None
    if op == OP_GENERAL:
        getter = itemgetter(*idx)

        def perm(t: tuple[Any, ...]) -> tuple[Any, ...]:
            return getter((*t, 0))  # type: ignore[no-any-return]
    elif idx == list(range(len(order))):
        perm = None
    else:
        perm = itemgetter(*idx)
    cs = _check_struct(spec.checks)
    v6 = oi.v6
    new = mflags & (ct.NLM_F_CREATE | ct.NLM_F_EXCL) == ct.NLM_F_CREATE | ct.NLM_F_EXCL
    v6f = _RF_V6 if v6 else 0
    head = (_T_DELETE if is_delete else _T_NEW if new else _T_UPSERT) | v6f
    run = None
    if op in _ENTRY_PORT_OPS:
        run = _event_run_plan(v6, proto, 6 if v6 else 4, {w: fields[w][0] for w in wanted}, spec.checks)
    return (op, cs.unpack_from, cs.unpack_from(buf, off), ds.unpack_from, perm, proto, v6, head,
            _T_UPSERT | v6f, 6 if v6 else 4, _KEY[v6].pack, _REC[v6, False, False].pack,
            _REC[v6, False, True].pack, _REC[v6, True, False].pack, _REC[v6, True, True].pack, run)


class EventTranscoder:
    """Conntrack events and dump replies -> encoded wire records (the master's data path).

    Replicated: entries whose mark has bit ``mark_bit`` and none of ``replica_mask`` (the
    bits the backup gives its replica: our own injections never echo back). An event without
    CTA_MARK is unmarked. Records carry the mark without the ``clear`` bits (a bulk sends
    inherited replica entries with their replica bits cleared: those never travel), the low
    16 status bits, the timeout left and the TCP state.
    """

    __slots__ = ("_bit", "_cache", "_keep", "_rmask", "_run_carry", "_run_wait", "fast", "generic", "in_runs")

    def __init__(self, mark_bit: int, replica_mask: int, clear: int = 0) -> None:
        if not 0 <= mark_bit < 32:
            raise ValueError(f"mark_bit {mark_bit} outside 0..31")
        if not 0 <= replica_mask <= 0xFFFFFFFF or replica_mask >> mark_bit & 1:
            raise ValueError(f"replica_mask {replica_mask:#x} must be u32 without bit {mark_bit}")
        if not 0 <= clear <= 0xFFFFFFFF or clear >> mark_bit & 1:
            raise ValueError(f"clear {clear:#x} must be u32 without bit {mark_bit}")
        self._bit = 1 << mark_bit
        self._rmask = replica_mask
        self._keep = 0xFFFFFFFF & ~(replica_mask | clear)
        self._cache: dict[int, list[Layout]] = {}
        self.fast = 0  # messages decoded by a compiled layout
        self.generic = 0  # messages decoded by the generic walk
        self.in_runs = 0  # of the fast ones, messages transcoded as part of a run
        self._run_wait = EVENT_RUN_MIN  # messages after a failed run before the next try
        self._run_carry = 0  # bytes of that wait left over for the next call

    @property
    def layouts(self) -> int:
        return sum(len(v) for v in self._cache.values())

    def transcode(self, buf: bytes | bytearray | memoryview, nbytes: int, *, dump: bool = False,
                  runs: bool = True) -> Batch:
        """Transcode the messages in ``buf[:nbytes]``.

        NEW events become UPSERT_NEW, UPDATE events and (``dump=True``) every entry
        UPSERT, DESTROY DELETE. Acks and foreign messages are skipped, NLMSG_DONE ends the
        walk, an error reply raises ``KernelError``, malformed input ``NetlinkError``.
        ``runs=False`` transcodes message by message (the reference the runs are held to).
        """
        if nbytes < 0 or nbytes > len(buf):
            raise NetlinkError("nbytes", 0, f"{nbytes} outside buffer of {len(buf)}")
        run_bytes = EVENT_RUN_MIN if runs else 1 << 40
        no_run_before = self._run_carry  # a wait that began in an earlier call
        self._run_carry = 0
        records: list[bytes] = []
        keys: list[bytes] = []
        rec = records.append
        key = keys.append
        deleted = skipped = 0
        done = False
        bit = self._bit
        rmask = self._rmask
        keep = self._keep
        cache_get = self._cache.get
        data: bytes | None = buf if type(buf) is bytes else None
        fast = 0
        off = 0
        while off < nbytes:
            if nbytes - off < 16:
                raise NetlinkError("nlmsghdr", off, f"{nbytes - off} trailing bytes")
            head = _q(buf, off)[0]
            mlen = head >> _LEN_SHIFT & _LEN_MASK
            if mlen < 16 or mlen > nbytes - off:
                raise NetlinkError("nlmsg_len", off, str(mlen))
            lays = cache_get(head)
            lay = None
            if lays is not None:
                for cand in lays:
                    if cand[1](buf, off) == cand[2]:
                        lay = cand
                        break
            if lay is not None and lay[0] != OP_GENERIC:
                fast += 1
                op, _, _, du, perm, proto, v6, hb, ub, fam, kp, e_pl, e_plp, e_nat, e_natp, plan = lay
                if plan is not None and off >= no_run_before and nbytes - off >= run_bytes * mlen:
                    # A run of messages of this layout (same first 8 bytes, same headers)?
                    stride = (mlen + 3) & ~3
                    j = off + stride
                    while j + mlen <= nbytes and _q(buf, j)[0] == head:
                        j += stride
                    k = (j - off) // stride
                    if k >= EVENT_RUN_MIN:
                        if data is None:
                            data = bytes(memoryview(buf)[:nbytes])
                        n, got, got_keys = _event_run(plan, data, off, stride, k, ub if dump else hb,
                                                      bit, rmask, keep)
                        if n > 0:
                            self._run_wait = EVENT_RUN_MIN
                            if got:
                                records.extend(got)
                                keys.extend(got_keys)
                            else:
                                skipped += n
                            fast += n - 1
                            self.in_runs += n
                            off += n * stride
                            continue
                        # Too short: message by message, and the next try waits twice as long
                        # (a stream of mixed shapes pays for few tries).
                        no_run_before = off + max(-n, self._run_wait) * stride
                        self._run_wait = min(2 * self._run_wait, EVENT_RUN_WAIT_MAX)
                if op in _ENTRY_PORT_OPS:
                    t = du(buf, off)
                    if perm is not None:
                        t = perm(t)
                    if op == OP_PORTS_TCP:
                        src, dst, sp, dp, rs, rd, rsp, rdp, st, to, tcp, mk = t
                    else:
                        src, dst, sp, dp, rs, rd, rsp, rdp, st, to, mk = t
                        tcp = 0
                    if not mk & bit or mk & rmask:
                        skipped += 1
                    else:
                        mk &= keep
                        h = ub if dump else hb
                        if rs == dst and rd == src and rsp == dp and rdp == sp:
                            if tcp:
                                rec(e_plp(h | _RF_PI, proto, src, dst, sp, dp, st, to, mk, tcp))
                            else:
                                rec(e_pl(h, proto, src, dst, sp, dp, st, to, mk))
                        elif tcp:
                            rec(e_natp(h | _RF_NAT | _RF_PI, proto, src, dst, sp, dp, rs, rd, rsp, rdp,
                                       st, to, mk, tcp))
                        else:
                            rec(e_nat(h | _RF_NAT, proto, src, dst, sp, dp, rs, rd, rsp, rdp, st, to, mk))
                        key(kp(fam, proto, 0, sp, dp, src, dst))
                elif op == OP_DEL_PORTS:
                    t = du(buf, off)
                    if perm is not None:
                        t = perm(t)
                    src, dst, sp, dp, mk = t
                    if not mk & bit or mk & rmask:
                        skipped += 1
                    else:
                        rec(_DEL[v6].pack(hb, proto, src, dst, sp, dp))
                        key(kp(fam, proto, 0, sp, dp, src, dst))
                        deleted += 1
                elif op == OP_GENERAL:
                    (src, dst, sp, dp, code, rs, rd, rsp, rdp, rcode, ozone, rzone, st, to, tcp,
                     mk) = perm(du(buf, off))
                    if not mk & bit or mk & rmask:
                        skipped += 1
                    else:
                        if proto == 1 or proto == 58:
                            dp = dp << 8 | code
                            rdp = rdp << 8 | rcode
                        if hb & 0xF0 == _T_DELETE:
                            if ozone:
                                rec(_DELZ[v6].pack(hb | _RF_ZONE, proto, src, dst, sp, dp, ozone))
                            else:
                                rec(_DEL[v6].pack(hb, proto, src, dst, sp, dp))
                            deleted += 1
                        else:
                            rec(_entry_record((ub if dump else hb) & 0xF0, v6, proto, src, dst, sp, dp,
                                              ozone, rs, rd, rsp, rdp, rzone, st, to, mk & keep, tcp))
                        key(kp(fam, proto, ozone, sp, dp, src, dst))
                else:  # OP_SKIP
                    skipped += 1
                off += (mlen + 3) & ~3
                continue
            # The generic walk: the reference semantics (ctnetlink._parse_ct), then learn.
            _mlen, mtype, mflags, seq, _pid = _NLMSGHDR.unpack_from(buf, off)
            if mtype == ct.CT_NEW or mtype == ct.CT_DELETE:
                if data is None:
                    data = bytes(memoryview(buf)[:nbytes])
                outcome, r, k = self._generic(data, off, mlen, mtype, mflags, dump)
                if outcome == _RECORD:
                    rec(r)
                    key(k)
                    if mtype == ct.CT_DELETE:
                        deleted += 1
                else:
                    skipped += 1
                if lay is None:
                    self._learn(data, off, mlen, mtype, mflags, head)
            elif mtype == ct.NLMSG_DONE:
                done = True
                break
            elif mtype == ct.NLMSG_ERROR:
                if mlen < ct.NLMSG_HDRLEN + 4:
                    raise NetlinkError("nlmsgerr", off, "truncated")
                err = ct._I32.unpack_from(buf, off + ct.NLMSG_HDRLEN)[0]
                if err:
                    raise KernelError(-err, off, seq)
            off += (mlen + 3) & ~3
        self.fast += fast
        if no_run_before > nbytes:
            self._run_carry = no_run_before - nbytes
        return Batch(records, keys, deleted, done, skipped)

    def _generic(self, data: bytes, off: int, mlen: int, mtype: int, mflags: int,
                 dump: bool) -> tuple[int, bytes, bytes]:
        """(outcome, record, key) of one message by the reference decoder."""
        self.generic += 1
        ev = ct._parse_ct(data, off, off + mlen, mtype, mflags, self._bit)
        if ev is None:
            return _SKIPPED, b"", b""
        flow = ev.flow
        if flow.mark & self._rmask:
            return _SKIPPED, b"", b""
        o = flow.orig
        alen = 4 if o.family == 4 else 16
        if len(o.src) != alen or len(o.dst) != alen:
            raise NetlinkError("CTA_TUPLE_ORIG", off, "addresses of mixed families")
        k = wire.key_bytes(o.family, o.proto, o.src, o.dst, o.sport, o.dport, o.zone)
        if mtype == ct.CT_DELETE:
            return _RECORD, wire.encode_delete(wire.delete_from_key(o)), k
        r = flow.reply
        if r.family != o.family or len(r.src) != alen or len(r.dst) != alen:
            raise NetlinkError("CTA_TUPLE_REPLY", off, "address family differs from the original")
        new = not dump and ev.kind == F.EventKind.NEW
        entry = wire.entry_from_flow(flow._replace(mark=flow.mark & self._keep), new)
        return _RECORD, wire.encode_entry(entry), k

    def _learn(self, data: bytes, off: int, mlen: int, mtype: int, mflags: int, head: int) -> None:
        lay = compile_layout(data, off, mlen, mtype, mflags)
        if lay is None:
            return
        cache = self._cache
        lays = cache.get(head)
        if lays is None:
            if len(cache) >= MAX_KEYS:
                del cache[next(iter(cache))]
            cache[head] = [lay]
        else:
            if len(lays) >= MAX_LAYOUTS_PER_KEY:
                del lays[0]
            lays.append(lay)


_RECORD: Final = 0
_SKIPPED: Final = 1

# --- master side: runs -----------------------------------------------------------------------
# A burst, a bulk or a dump reaches the master as long runs of messages of one layout
# (the same length, type, flags and attribute headers: only the values differ). For the
# plain-ports entry ops every record byte and key byte is a constant or a copy of one
# message byte, so a run of k messages is transcoded with one strided slice per record
# byte, after column checks that every message of the run has the first one's headers and
# mark, and its record form (plain or NAT, a TCP state or none). The longest such prefix
# is taken; what does not form one goes message by message (``_event_run``).
EVENT_RUN_MIN: Final = 32  # messages; below it the per-message path costs about the same
EVENT_RUN_WAIT_MAX: Final = 1024  # messages, at most, between tries in a stream of mixed shapes


class _RunForm(NamedTuple):
    """One record form of a run: its size, flag bits, copied bytes and the mark's place."""

    size: int
    flags: int  # _RF_* bits of the head byte
    copy: tuple[tuple[int, int], ...]  # (record byte, message offset)
    mark_at: int  # record offset of the mark (constant across a run)


class _EventRun(NamedTuple):
    proto: int
    mark: int  # message offset of CTA_MARK's value
    tcp: int  # message offset of the TCP state (-1: the layout has none)
    forms: dict[tuple[bool, bool], _RunForm]  # by (NAT: reply tuple sent, TCP state sent)
    key_size: int
    key_const: bytes  # the key's constant prefix: family, proto, zone 0
    key: tuple[tuple[int, int], ...]  # (key byte, message offset) copied
    inverse: tuple[tuple[int, int], ...]  # message offset pairs all equal iff the entry is plain
    checks: tuple[int, ...]  # message offsets equal in every message of the layout (its check)


def _run_form(at: dict[str, int], a: int, nat: bool, tcp: bool) -> _RunForm:
    """head, proto, src, dst, sp, dp, [rs, rd, rsp, rdp,] st, to, mk[, tcp] (``_REC``)."""
    spans = [("src", a), ("dst", a), ("sp", 2), ("dp", 2)]
    if nat:
        spans += [("rs", a), ("rd", a), ("rsp", 2), ("rdp", 2)]
    spans += [("st", 2), ("to", 4)]
    copy: list[tuple[int, int]] = []
    pos = 2
    for name, n in spans:
        copy.extend((pos + i, at[name] + i) for i in range(n))
        pos += n
    mark_at = pos
    pos += 4
    if tcp:
        copy.append((pos, at["tcp"]))
        pos += 1
    flags = (_RF_NAT if nat else 0) | (_RF_PI if tcp else 0)
    return _RunForm(pos, flags, tuple(copy), mark_at)


def _event_run_plan(v6: bool, proto: int, family: int, at: dict[str, int],
                    checks: list[tuple[int, int]]) -> _EventRun:
    """The run plan of a plain-ports entry layout whose fields are at ``at`` (message
    offsets) and whose check covers the ``checks`` spans."""
    a = 16 if v6 else 4
    tcp = "tcp" in at
    # The key: family, proto, zone 0, sp, dp, src, dst (wire.key_bytes).
    key: list[tuple[int, int]] = []
    kpos = 4
    for name, n in (("sp", 2), ("dp", 2), ("src", a), ("dst", a)):
        key.extend((kpos + i, at[name] + i) for i in range(n))
        kpos += n
    inverse: list[tuple[int, int]] = []
    for x, y, n in (("rs", "dst", a), ("rd", "src", a), ("rsp", "dp", 2), ("rdp", "sp", 2)):
        inverse.extend((at[x] + i, at[y] + i) for i in range(n))
    fixed = sorted({rel + i for rel, n in checks for i in range(n)})
    forms = {(nat, pi): _run_form(at, a, nat, pi) for nat in (False, True) for pi in (False, tcp)}
    return _EventRun(proto, at["mk"], at["tcp"] if tcp else -1, forms, kpos, bytes([family, proto, 0, 0]),
                     tuple(key), tuple(inverse), tuple(fixed))


def _prefix(column: bytes, value: int) -> int:
    """How many leading bytes of ``column`` equal ``value``."""
    return len(column) - len(column.lstrip(bytes((value,))))


def _event_run(plan: _EventRun, data: bytes, off: int, stride: int, k: int, head: int,
               bit: int, rmask: int, keep: int) -> tuple[int, list[bytes], list[bytes]]:
    """Transcode the longest uniform run among the k messages at ``data[off::stride]``
    (their first 8 bytes equal) exactly as the per-message path does: (n, records, keys)
    for its n messages (no records: all filtered out by their mark). Uniform: the layout's
    headers, plain or NAT, the mark, a TCP state sent or not (0) are those of the first.
    A uniform run shorter than ``EVENT_RUN_MIN`` is not taken: (-n, [], []), the caller
    goes message by message over those n."""
    last = off + (k - 1) * stride + 1

    def col(rel: int) -> bytes:
        return data[off + rel:last + rel:stride]

    # The cheap tests first: a stream that mixes shapes fails one of them early.
    n = k
    m = plan.mark
    for i in range(4):
        n = min(n, _prefix(col(m + i), data[off + m + i]))
    # A TCP state of 0 (none) is not sent: a run's are all 0 or none is.
    pi = False
    if plan.tcp >= 0 and n >= EVENT_RUN_MIN:
        states = col(plan.tcp)
        pi = states[0] != 0
        n = min(n, (states.find(0) % (k + 1)) if pi else _prefix(states, 0))
    # Plain or NAT, per message: OR of (reply byte XOR inverse byte) over the tuple, one
    # big integer per column pair; a zero byte: that message is plain.
    nat = False
    if n >= EVENT_RUN_MIN:
        nat_diff = 0
        for x, y in plan.inverse:
            nat_diff |= int.from_bytes(col(x), "big") ^ int.from_bytes(col(y), "big")
        nat_of = nat_diff.to_bytes(k, "big")
        nat = nat_of[0] != 0
        n = min(n, (nat_of.find(0) % (k + 1)) if nat else _prefix(nat_of, 0))
    if n >= EVENT_RUN_MIN:  # the layout's headers, equal to the first message's
        for rel in plan.checks:
            c = col(rel)
            if c.count(c[0]) != k:
                n = min(n, _prefix(c, c[0]))
    if n < EVENT_RUN_MIN:
        return -n, [], []
    mk = int.from_bytes(data[off + m:off + m + 4], "big")
    if not mk & bit or mk & rmask:
        return n, [], []
    if n < k:
        k = n
        last = off + (k - 1) * stride + 1
    form = plan.forms[nat, pi]
    size = form.size
    out = bytearray(size * k)
    out[0::size] = bytes([head | form.flags]) * k
    out[1::size] = bytes([plan.proto]) * k
    for r, rel in form.copy:
        out[r::size] = col(rel)
    for i, b in enumerate((mk & keep).to_bytes(4, "big")):
        out[form.mark_at + i::size] = bytes([b]) * k
    ks = plan.key_size
    kout = bytearray(ks * k)
    for i, b in enumerate(plan.key_const):
        kout[i::ks] = bytes([b]) * k
    for r, rel in plan.key:
        kout[r::ks] = col(rel)
    ob, kb = bytes(out), bytes(kout)
    return (k, [ob[i:i + size] for i in range(0, size * k, size)],
            [kb[i:i + ks] for i in range(0, ks * k, ks)])


# --- backup side: wire records -> ctnetlink requests ------------------------------------------
_h = ct._h
_MSGHDR = ct._MSGHDR
_STATUS_SENT: Final = F.IPS_SETTABLE & ~F.IPS_EXPECTED
_CONFIRMED: Final = F.IPS_CONFIRMED
_FLAGS_CREATE: Final = ct.NLM_F_REQUEST | ct.NLM_F_ACK | ct.NLM_F_CREATE | ct.NLM_F_EXCL
_FLAGS_CREATE_NOACK: Final = _FLAGS_CREATE & ~ct.NLM_F_ACK
_FLAGS_UPDATE: Final = ct.NLM_F_REQUEST | ct.NLM_F_ACK
_FLAGS_UPDATE_NOACK: Final = ct.NLM_F_REQUEST
_AF = {False: ct.AF_INET, True: ct.AF_INET6}
_H_STATUS = _h(8, ct.CTA_STATUS)
_H_TIMEOUT = _h(8, ct.CTA_TIMEOUT)
_H_MARK = _h(8, ct.CTA_MARK)
_H_ZONE = _h(6, ct.CTA_ZONE)


class _Shape(NamedTuple):
    hdrs: tuple[int, ...]  # IP nest, SRC, DST, PROTO nest, NUM, then the L4 attributes
    orig: int  # CTA_TUPLE_ORIG header
    reply: int  # CTA_TUPLE_REPLY header


def _shape(v6: bool, icmp: bool) -> _Shape:
    st, hdrs = ct._TUPLES[v6, icmp]
    return _Shape(hdrs, _h(st.size, ct.CTA_TUPLE_ORIG, True), _h(st.size, ct.CTA_TUPLE_REPLY, True))


_PORTS = {v6: _shape(v6, False) for v6 in (False, True)}
_ICMPSH = {v6: _shape(v6, True) for v6 in (False, True)}


def _msg_struct(*parts: str) -> struct.Struct:
    return struct.Struct(">" + "".join(p.lstrip(">") for p in parts))


# nlmsghdr and nfgenmsg are host order: packed apart (_MSGHDR), the body in one big-endian
# pack (attribute headers are the big-endian integers with the host-order bytes, ct._h).
_TP4 = ct._TUP4_PORTS.format[1:]
_TP6 = ct._TUP6_PORTS.format[1:]
_TI4 = ct._TUP4_ICMP.format[1:]
_TI6 = ct._TUP6_ICMP.format[1:]
_SC = "IIIIII"  # status, timeout, mark
_SC_NS = "IIII"  # timeout, mark
_ZN = "IH2x"

# (v6, create, with_status) -> body struct; ports tuples
_BODY_PORTS = {
    (v6, create, ws): _msg_struct((_TP6 if v6 else _TP4) * (2 if create else 1), _SC if ws else _SC_NS)
    for v6 in (False, True) for create in (False, True) for ws in (False, True)
}
_BODY_ICMP = {
    (v6, create, ws): _msg_struct((_TI6 if v6 else _TI4) * (2 if create else 1), _SC if ws else _SC_NS)
    for v6 in (False, True) for create in (False, True) for ws in (False, True)
}
_NAT_ADDR = {False: ct._NAT_IPS4, True: ct._NAT_IPS6}
_NAT_ADDR_PORT = {v6: _msg_struct(_NAT_ADDR[v6].format, ct._PROTONAT.format) for v6 in (False, True)}
_H_V4_MIN, _H_V4_MAX, _H_V6_MIN, _H_V6_MAX = ct._H_V4_MIN, ct._H_V4_MAX, ct._H_V6_MIN, ct._H_V6_MAX
_NAT_HDRS = {
    (v6, atype, port): _h((_NAT_ADDR_PORT if port else _NAT_ADDR)[v6].size, atype, True)
    for v6 in (False, True) for atype in (ct.CTA_NAT_SRC, ct.CTA_NAT_DST) for port in (False, True)
}
_MINMAX = {False: (_H_V4_MIN, _H_V4_MAX), True: (_H_V6_MIN, _H_V6_MAX)}
_H_NAT_PROTO, _H_PORT_MIN, _H_PORT_MAX = ct._H_NAT_PROTO, ct._H_PORT_MIN, ct._H_PORT_MAX
_tcp_info = ct._tcp_info_bytes


def _nat_part(v6: bool, atype: int, addr: bytes, port: int | None) -> bytes:
    lo, hi = _MINMAX[v6]
    if port is None:
        return _NAT_ADDR[v6].pack(_NAT_HDRS[v6, atype, False], lo, addr, hi, addr)
    return _NAT_ADDR_PORT[v6].pack(_NAT_HDRS[v6, atype, True], lo, addr, hi, addr,
                                   _H_NAT_PROTO, _H_PORT_MIN, port, _H_PORT_MAX, port)


def _general(e: wire.Entry, seq: int, create: bool, mark: int, timeout: int, with_status: bool,
             be_liberal: bool, ack: bool) -> bytes:
    flow = wire.flow_from_entry(e)._replace(mark=mark, timeout=timeout)
    return ct.build_create(flow, seq, be_liberal=be_liberal, create=create, with_status=with_status,
                           ack=ack)


def build_entry(
    e: wire.Entry,
    seq: int,
    *,
    create: bool,
    mark: int,
    timeout: int,
    with_status: bool = True,
    be_liberal: bool = True,
    ack: bool = False,
) -> bytes:
    """IPCTNL_MSG_CT_NEW injecting ``e`` with the caller's ``mark`` and ``timeout``.

    Byte-identical to ``ctnetlink.build_create(flow_from_entry(e)._replace(mark=mark,
    timeout=timeout), seq, ...)`` (same options; a zero timeout becomes
    ``ctnetlink.DEFAULT_TIMEOUT``): CONFIRMED always sent, EXPECTED never, status masked to
    ``flows.IPS_SETTABLE``; ``create``: both tuples, the reply as the inverse of the original
    and NAT as CTA_NAT_SRC/DST; update form: original tuple only, no NAT. Templates for TCP/
    UDP (any protocol with ports) and ICMP without zones; the rest through ``build_create``.
    """
    family, proto, src, dst, sp, dp, zone = e[1:8]
    if zone or e.rzone:
        return _general(e, seq, create, mark, timeout, with_status, be_liberal, ack)
    if family == 4:
        v6 = False
        if len(src) != 4 or len(dst) != 4:
            return _general(e, seq, create, mark, timeout, with_status, be_liberal, ack)
    elif family == 6:
        v6 = True
        if len(src) != 16 or len(dst) != 16:
            return _general(e, seq, create, mark, timeout, with_status, be_liberal, ack)
    else:
        return _general(e, seq, create, mark, timeout, with_status, be_liberal, ack)
    if timeout <= 0:
        timeout = ct.DEFAULT_TIMEOUT
    tcp = _tcp_info(e.tcp_state, be_liberal) if proto == 6 else b""
    nat = b""
    if proto == 1 or proto == 58:
        shape = _ICMPSH[v6]
        rs, rd, rsp = e.rsrc, e.rdst, e.rsport
        if create and (rd != src or rsp != sp or rs != dst):
            return _general(e, seq, create, mark, timeout, with_status, be_liberal, ack)
        body = _BODY_ICMP[v6, create, with_status]
        t, code = dp >> 8 & 0xFF, dp & 0xFF
        h = shape.hdrs
        hr = shape.reply
        if create:
            rt = _ICMP_REPLY[proto].get(t, t)
            if with_status:
                packed = body.pack(
                    shape.orig, h[0], h[1], src, h[2], dst, h[3], h[4], proto, h[5], sp, h[6], t, h[7], code,
                    hr, h[0], h[1], dst, h[2], src, h[3], h[4], proto, h[5], sp, h[6], rt, h[7], code,
                    _H_STATUS, e.status & _STATUS_SENT | _CONFIRMED, _H_TIMEOUT, timeout, _H_MARK, mark,
                )  # fmt: skip
            else:
                packed = body.pack(
                    shape.orig, h[0], h[1], src, h[2], dst, h[3], h[4], proto, h[5], sp, h[6], t, h[7], code,
                    hr, h[0], h[1], dst, h[2], src, h[3], h[4], proto, h[5], sp, h[6], rt, h[7], code,
                    _H_TIMEOUT, timeout, _H_MARK, mark,
                )  # fmt: skip
        elif with_status:
            packed = body.pack(
                shape.orig, h[0], h[1], src, h[2], dst, h[3], h[4], proto, h[5], sp, h[6], t, h[7], code,
                _H_STATUS, e.status & _STATUS_SENT | _CONFIRMED, _H_TIMEOUT, timeout, _H_MARK, mark,
            )  # fmt: skip
        else:
            packed = body.pack(
                shape.orig, h[0], h[1], src, h[2], dst, h[3], h[4], proto, h[5], sp, h[6], t, h[7], code,
                _H_TIMEOUT, timeout, _H_MARK, mark,
            )  # fmt: skip
    else:
        shape = _PORTS[v6]
        body = _BODY_PORTS[v6, create, with_status]
        h = shape.hdrs
        if create:
            rs, rd, rsp, rdp = e.rsrc, e.rdst, e.rsport, e.rdport
            if rd != src or rdp != sp:
                nat = _nat_part(v6, ct.CTA_NAT_SRC, rd, rdp if rdp != sp else None)
            if rs != dst or rsp != dp:
                nat += _nat_part(v6, ct.CTA_NAT_DST, rs, rsp if rsp != dp else None)
            hr = shape.reply
            if with_status:
                packed = body.pack(
                    shape.orig, h[0], h[1], src, h[2], dst, h[3], h[4], proto, h[5], sp, h[6], dp,
                    hr, h[0], h[1], dst, h[2], src, h[3], h[4], proto, h[5], dp, h[6], sp,
                    _H_STATUS, e.status & _STATUS_SENT | _CONFIRMED, _H_TIMEOUT, timeout, _H_MARK, mark,
                )  # fmt: skip
            else:
                packed = body.pack(
                    shape.orig, h[0], h[1], src, h[2], dst, h[3], h[4], proto, h[5], sp, h[6], dp,
                    hr, h[0], h[1], dst, h[2], src, h[3], h[4], proto, h[5], dp, h[6], sp,
                    _H_TIMEOUT, timeout, _H_MARK, mark,
                )  # fmt: skip
        elif with_status:
            packed = body.pack(
                shape.orig, h[0], h[1], src, h[2], dst, h[3], h[4], proto, h[5], sp, h[6], dp,
                _H_STATUS, e.status & _STATUS_SENT | _CONFIRMED, _H_TIMEOUT, timeout, _H_MARK, mark,
            )  # fmt: skip
        else:
            packed = body.pack(
                shape.orig, h[0], h[1], src, h[2], dst, h[3], h[4], proto, h[5], sp, h[6], dp,
                _H_TIMEOUT, timeout, _H_MARK, mark,
            )  # fmt: skip
    if create:
        flags = _FLAGS_CREATE if ack else _FLAGS_CREATE_NOACK
    else:
        flags = _FLAGS_UPDATE if ack else _FLAGS_UPDATE_NOACK
    size = 20 + body.size + len(tcp) + len(nat)
    return _MSGHDR.pack(size, ct.CT_NEW, flags, seq & 0xFFFFFFFF, 0, _AF[v6], 0, 0) + packed + tcp + nat


_DEL_BODY = {
    (v6, icmp, z): _msg_struct((_TI6 if v6 else _TI4) if icmp else (_TP6 if v6 else _TP4), _ZN if z else "")
    for v6 in (False, True) for icmp in (False, True) for z in (False, True)
}


def build_entry_delete(d: wire.Delete, seq: int, *, ack: bool = False) -> bytes:
    """IPCTNL_MSG_CT_DELETE by original tuple and zone: ``ctnetlink.build_delete`` of it."""
    family, proto, src, dst, sp, dp, zone = d
    v6 = family == 6
    if (not v6 and family != 4) or len(src) != (16 if v6 else 4) or len(dst) != len(src):
        return ct.build_delete(F.FlowKey(*d), seq, ack=ack)
    icmp = proto == 1 or proto == 58
    body = _DEL_BODY[v6, icmp, bool(zone)]
    shape = _ICMPSH[v6] if icmp else _PORTS[v6]
    h = shape.hdrs
    if icmp:
        args: tuple[Any, ...] = (shape.orig, h[0], h[1], src, h[2], dst, h[3], h[4], proto,
                                 h[5], sp, h[6], dp >> 8 & 0xFF, h[7], dp & 0xFF)
    else:
        args = (shape.orig, h[0], h[1], src, h[2], dst, h[3], h[4], proto, h[5], sp, h[6], dp)
    packed = body.pack(*args, _H_ZONE, zone) if zone else body.pack(*args)
    flags = ct.NLM_F_REQUEST | ct.NLM_F_ACK if ack else ct.NLM_F_REQUEST
    return _MSGHDR.pack(20 + body.size, ct.CT_DELETE, flags, seq & 0xFFFFFFFF, 0, _AF[v6], 0, 0) + packed


# --- backup side, fused: wire payload -> ctnetlink requests, no record objects ---------------
KIND_DELETE: Final = 0  # a DELETE record
KIND_UPDATE: Final = 1  # an UPSERT sent in the update form
KIND_CREATE: Final = 2  # an UPSERT sent as a create
KIND_NEW: Final = 3  # an UPSERT_NEW (always sent as a create)


class Injection(NamedTuple):
    """How the records of a payload go into our kernel (``build_records``).

    Each entry's mark becomes ``mark & mark_and | mark_or`` (``ReplicaMarks.replica_mark``/
    ``own_mark`` as masks). ``timeout``: the one every entry gets (0: the record's own, the
    master's remaining time), unless ``timeouts`` gives one per (proto, tcp_state, status)
    (a hand-over: what the kernel would give the entry). ``room``: creates allowed before
    the replica cap (None: no cap, as master); a full table drops UPSERT_NEW records and
    sends UPSERTs as updates. ``create_first``: UPSERTs try create before update. Records
    outside ``scope`` (family, zones, mark bit; None: our own kernel's, all in scope) are
    never built. ``with_status``: updates carry the status bits (not for a re-mark).
    """

    mark_and: int
    mark_or: int
    timeout: int
    room: int | None
    create_first: bool
    scope: Scope | None
    with_status: bool = True
    timeouts: Callable[[int, int, int], int] | None = None


class Built(NamedTuple):
    """What ``build_records`` made of a payload from ``start`` to ``end``.

    ``msgs``: the requests, seq = the caller's base + index; ``offsets``/``kinds``: per
    request, where its record starts in the payload and how it was sent (``KIND_*``);
    ``refused``: offsets of records outside the scope; ``over_capacity``: UPSERT_NEW records
    dropped by the cap; ``control``: the stream-control record that stopped the walk (the
    payload continues at ``end``, after it), or None at the payload's end.
    """

    msgs: list[bytes]
    offsets: list[int]
    kinds: bytearray
    refused: list[int]
    over_capacity: int
    end: int
    control: wire.Record | None


_PLAIN_REC = {  # flag nibble of a plain entry record -> (wire struct, v6, tcp_state present)
    0: (wire._E4, False, False),
    _RF_PI: (wire._E4P, False, True),
    _RF_V6: (wire._E6, True, False),
    _RF_V6 | _RF_PI: (wire._E6P, True, True),
}


class _Plan(NamedTuple):
    """Everything the fused path needs for one flag nibble of a plain entry record, so that
    a record costs one tuple unpack of constants: the wire layout, the tuple attribute
    headers, and the update and create request layouts."""

    unpack: Callable[[bytes, int], tuple[Any, ...]]
    size: int
    has_tcp: bool
    v6: bool
    orig: int
    reply: int
    h0: int
    h1: int
    h2: int
    h3: int
    h4: int
    h5: int
    h6: int
    update: Callable[..., bytes]
    update_size: int  # nlmsghdr + nfgenmsg + body, without the tcp protoinfo
    create: Callable[..., bytes]
    create_size: int
    af: int


def _plans(with_status: bool) -> dict[int, _Plan]:
    out = {}
    for fl, (st, v6, has_tcp) in _PLAIN_REC.items():
        shape = _PORTS[v6]
        # a create always carries the status; an update only ``with_status``
        update, create = _BODY_PORTS[v6, False, with_status], _BODY_PORTS[v6, True, True]
        h = shape.hdrs
        out[fl] = _Plan(st.unpack_from, st.size, has_tcp, v6, shape.orig, shape.reply,
                        h[0], h[1], h[2], h[3], h[4], h[5], h[6],
                        update.pack, 20 + update.size, create.pack, 20 + create.size, _AF[v6])
    return out


_PLANS = {ws: _plans(ws) for ws in (False, True)}


# --- runs of one shape: a run's requests from a few strided copies -----------------------------
# A stream or a bulk carries long runs of records of one shape (a burst of new UDP flows, a
# dump of a homogeneous table). For plain TCP/UDP entries and deletes, with a fixed timeout
# (the replica's, a re-mark's), every byte of the request is a constant or a bitwise function
# ``byte & keep | set`` of one byte of the record (tuple fields copied, the mark and the
# status masked). So the requests of k such records are the constant request repeated k
# times with, for each record byte, one strided copy across all k (``bytes.translate`` for a
# masked one): ~20 C-level operations per run instead of ~60 bytecodes per record.
# Each plan is derived from the per-record path itself, by probing it one bit at a time,
# and checked on random records before use: the two paths are the same bytes by construction
# (and by the property test). A plan that does not check out is never used.

RUN_MIN: Final = 12  # records; below it the per-record path costs about the same
RUN_MAX: Final = 512  # records looked at for one run
_RUN_PLANS_MAX: Final = 512  # shapes x injections compiled, at ~1 ms each; then per record
_RUN_CHECKS: Final = 16  # random records each plan must build like the per-record path
_SEQ_OFF: Final = 8  # nlmsg_seq in the request (host order)
assert array("I").itemsize == 4


class _RunPlan(NamedTuple):
    template: bytes  # the request of the record whose varying bytes are all zero, seq 0
    size: int
    moves: tuple[tuple[int, int, bytes | None], ...]  # (record byte, request byte, table)


_run_plans: dict[tuple[int, ...], _RunPlan | None] = {}
_WITH_BIT = {1 << b: bytes(v for v in range(256) if v & 1 << b) for b in range(8)}


def _run_plan(b0: int, proto: int, size: int, create: bool, with_status: bool, mark_and: int,
              mark_or: int, timeout: int) -> _RunPlan | None:
    key = (b0, proto, size, create, with_status, mark_and, mark_or, timeout)
    if key in _run_plans:
        return _run_plans[key]
    if len(_run_plans) >= _RUN_PLANS_MAX:
        return None
    try:
        plan = _compile_run(b0, proto, size, Injection(mark_and, mark_or, timeout, None, create, None,
                                                       with_status))
    except (wire.WireError, struct.error, IndexError, KeyError, ValueError):
        plan = None  # a shape the per-record path refuses as such: it stays per record
    _run_plans[key] = plan
    return plan


def _compile_run(b0: int, proto: int, size: int, how: Injection) -> _RunPlan | None:
    def one(rec: bytes, seq: int = 0) -> bytes | None:
        built = _build_records(rec, 0, seq, how, runs=False)
        return built.msgs[0] if len(built.msgs) == 1 and built.control is None else None

    zero = bytes([b0, proto]) + bytes(size - 2)
    base = one(zero)
    if base is None:
        return None
    length = len(base)
    moves: list[tuple[int, int, bytes | None]] = []
    fed: dict[int, int] = {}  # request byte -> the record byte it depends on
    for j in range(2, size):
        keep: dict[int, int] = {}
        for bit in range(8):
            probe = bytearray(zero)
            probe[j] = 1 << bit
            msg = one(bytes(probe))
            if msg is None or len(msg) != length:
                return None
            for p in range(length):
                if msg[p] != base[p]:
                    keep[p] = keep.get(p, 0) | 1 << bit
        for p, mask in keep.items():
            if fed.setdefault(p, j) != j:
                return None  # two record bytes in one request byte: not a copy
            const = base[p] & ~mask & 0xFF
            table = None if mask == 0xFF and not const else bytes(v & mask | const for v in range(256))
            moves.append((j, p, table))
    plan = _RunPlan(base, length, tuple(moves))
    rng = random.Random(size * 257 + proto)
    recs = [zero[:2] + rng.randbytes(size - 2) for _ in range(_RUN_CHECKS)]
    seq = rng.getrandbits(32)
    want = [one(r, seq + i) for i, r in enumerate(recs)]
    if want != _run_build(plan, b"".join(recs), 0, size, _RUN_CHECKS, seq):
        return None
    return plan


def _run_build(plan: _RunPlan, payload: bytes, off: int, size: int, k: int, seq: int) -> list[bytes]:
    """The requests of the ``k`` records of ``size`` bytes from ``off``, seq = ``seq`` + i."""
    length = plan.size
    buf = bytearray(plan.template * k)
    stop = off + k * size
    for j, p, table in plan.moves:
        src = payload[off + j : stop : size]
        buf[p::length] = src if table is None else src.translate(table)
    if seq + k <= 0x1_0000_0000:
        seqs = array("I", range(seq, seq + k)).tobytes()  # host order, as the header
    else:
        seqs = array("I", [(seq + i) & 0xFFFFFFFF for i in range(k)]).tobytes()
    for b in range(4):
        buf[_SEQ_OFF + b :: length] = seqs[b::4]
    blob = bytes(buf)
    return [blob[i : i + length] for i in range(0, k * length, length)]


def _emit_run(plan: _RunPlan, payload: bytes, off: int, size: int, k: int, seq: int, msgs: list[bytes],
              offsets: list[int], kinds: bytearray, kind: int) -> None:
    msgs += _run_build(plan, payload, off, size, k, seq)
    offsets.extend(range(off, off + k * size, size))
    kinds.extend(bytes([kind]) * k)


def _run_length(payload: bytes, off: int, end: int, size: int) -> int:
    """How many records of ``size`` bytes from ``off`` have the type byte and the protocol
    of the first (positions past a record of another size are never reached: the first
    differing type byte or protocol ends the run before them)."""
    k = _prefix(payload[off : min(end, off + RUN_MAX * size) : size], payload[off])
    return min(k, _prefix(payload[off + 1 : off + 1 + k * size : size], payload[off + 1]))


_R_NEW: Final = wire.RecordType.UPSERT_NEW
_R_UPSERT: Final = wire.RecordType.UPSERT
_R_DELETE: Final = wire.RecordType.DELETE


def build_records(payload: bytes, start: int, seq: int, how: Injection) -> Built:
    """The ctnetlink requests for the records of a checked DATA payload from ``start``
    (``wire.validate_records`` passed), up to the first stream-control record.

    The same bytes as ``build_entry``/``build_entry_delete`` of each decoded record with the
    marks, timeouts and forms ``how`` gives (the unit tests hold the two paths equal): plain
    TCP/UDP entries and deletes (no NAT, no zone: the bulk of a stream) go from one unpack
    of the wire record to one pack of the request; the rest is decoded and built. Runs of
    at least ``RUN_MIN`` records of one plain shape, with a fixed timeout, are built as
    a run (``_run_plan``): the same bytes.
    """
    return _build_records(payload, start, seq, how, runs=True)


def _build_records(payload: bytes, start: int, seq: int, how: Injection, runs: bool) -> Built:
    msgs: list[bytes] = []
    offsets: list[int] = []
    kinds = bytearray()
    refused: list[int] = []
    append, note, kind = msgs.append, offsets.append, kinds.append
    over = 0
    mark_and, mark_or, fixed_timeout, with_status = how.mark_and, how.mark_or, how.timeout, how.with_status
    timeouts = how.timeouts
    timeout_memo: dict[tuple[int, int, int], int] = {}
    room = how.room
    capped = room is not None
    left = room if room is not None else 0
    create_first = how.create_first
    scope = how.scope
    if scope is None:
        families, zones, bit = frozenset((4, 6)), None, 0
        plain_ok = {False: True, True: True}
    else:
        families, zones, bit = scope.families, scope.zones, 1 << scope.mark_bit
        plain_ok = {False: 4 in families and 0 in zones, True: 6 in families and 0 in zones}
    plans = _PLANS[with_status]
    icmps, ports = _ICMPS, _PORTS
    mhdr = _MSGHDR.pack
    af = _AF
    ct_new, flags_create, flags_update = ct.CT_NEW, _FLAGS_CREATE_NOACK, _FLAGS_UPDATE_NOACK
    h_status, h_timeout, h_mark = _H_STATUS, _H_TIMEOUT, _H_MARK
    status_sent, confirmed = _STATUS_SENT, _CONFIRMED
    tcp_cache: dict[int, bytes] = {}
    off, end = start, len(payload)
    seq &= 0xFFFFFFFF
    # Runs (see _run_plan): with a fixed timeout, or per-state timeouts (a hand-over) over a
    # run whose records share their state; not again inside a run found too short.
    runs = runs and (timeouts is not None or fixed_timeout != 0)
    no_run_before = 0
    # The mark byte holding the replicated bit (the mark ends a plain record, before the TCP
    # state), and the bit in it.
    mark_byte = 3 - scope.mark_bit // 8 - 4 if scope is not None else 0
    byte_bit = 1 << scope.mark_bit % 8 if scope is not None and bit else 0
    while off < end:
        b0 = payload[off]
        rt, fl = b0 >> 4, b0 & 0xF
        if rt in (_R_NEW, _R_UPSERT):
            plan = plans.get(fl)
            rec: wire.Entry | None = None
            here = off
            if plan is not None and payload[off + 1] not in icmps:  # plain TCP/UDP: fused
                if runs and off >= no_run_before:
                    size = plan.size
                    k = _run_length(payload, off, end, size)
                    new = rt == _R_NEW
                    create = new or create_first
                    run = None
                    run_timeout = fixed_timeout
                    if timeouts is not None and k >= RUN_MIN:
                        # The timeout follows (proto, tcp_state, status): the run is the
                        # records that share the first one's.
                        at = off + size - plan.has_tcp - 10  # status: before timeout and mark
                        last = off + k * size
                        for rel in (at, at + 1, off + size - 1) if plan.has_tcp else (at, at + 1):
                            k = min(k, _prefix(payload[rel:last:size], payload[rel]))
                        if k >= RUN_MIN:  # (a timeout of 0 would mean the record's own: per record)
                            st0 = payload[at] << 8 | payload[at + 1]
                            k3 = (payload[off + 1], payload[off + size - 1] if plan.has_tcp else 0, st0)
                            run_timeout = timeout_memo.get(k3) or timeout_memo.setdefault(k3, timeouts(*k3))
                    if (k >= RUN_MIN and run_timeout > 0 and plain_ok[plan.v6]
                            and not (capped and create and left < k)):
                        at = off + size - plan.has_tcp + mark_byte
                        # Every mark has the replicated bit (else: record by record).
                        if not byte_bit or not payload[at : off + k * size : size].translate(
                                None, _WITH_BIT[byte_bit]):
                            run = _run_plan(b0, payload[off + 1], size, create, with_status or create,
                                            mark_and, mark_or, run_timeout)
                    if run is None:
                        no_run_before = off + max(k, 1) * size
                    else:
                        _emit_run(run, payload, off, size, k, seq, msgs, offsets, kinds,
                                  KIND_NEW if new else KIND_CREATE if create else KIND_UPDATE)
                        if capped and create:
                            left -= k
                        seq = (seq + k) & 0xFFFFFFFF
                        off += k * size
                        continue
                (unpack, size, has_tcp, v6, orig, reply, h0, h1, h2, h3, h4, h5, h6,
                 update, update_size, create_pack, create_size, family) = plan
                if has_tcp:
                    _, proto, src, dst, sp, dp, st, to, mk, tcp = unpack(payload, off)
                else:
                    _, proto, src, dst, sp, dp, st, to, mk = unpack(payload, off)
                    tcp = 0
                off += size
                ok = plain_ok[v6] and (not bit or mk & bit)
            else:  # NAT, zones, ICMP: decoded, then templated by build_entry
                decoded, off = wire.decode_record_at(payload, off)
                assert isinstance(decoded, wire.Entry)
                rec = decoded
                proto, st, to, mk, tcp = rec.proto, rec.status, rec.timeout, rec.mark, rec.tcp_state
                ok = zones is None or (rec.family in families and rec.zone in zones
                                       and rec.rzone in zones and bool(mk & bit))
            if not ok:
                refused.append(here)
                continue
            new = rt == _R_NEW
            if capped:
                full = left <= 0
                if new and full:
                    over += 1
                    continue
                create = new or (create_first and not full)
                left -= create
            else:
                create = new or create_first
            if timeouts is not None:
                k3 = (proto, tcp, st)
                timeout = timeout_memo.get(k3) or timeout_memo.setdefault(k3, timeouts(*k3))
            else:
                timeout = fixed_timeout or to or ct.DEFAULT_TIMEOUT
            mark = mk & mark_and | mark_or
            if rec is not None:
                append(build_entry(rec, seq, create=create, mark=mark, timeout=timeout,
                                   with_status=with_status or create))
                kind(KIND_NEW if new else KIND_CREATE if create else KIND_UPDATE)
            else:
                if proto == 6:
                    ti = tcp_cache.get(tcp)
                    if ti is None:
                        ti = tcp_cache[tcp] = _tcp_info(tcp, True)
                else:
                    ti = b""
                if create:
                    packed = create_pack(
                        orig, h0, h1, src, h2, dst, h3, h4, proto, h5, sp, h6, dp,
                        reply, h0, h1, dst, h2, src, h3, h4, proto, h5, dp, h6, sp,
                        h_status, st & status_sent | confirmed, h_timeout, timeout, h_mark, mark,
                    )  # fmt: skip
                    mlen = create_size + len(ti)
                    append(mhdr(mlen, ct_new, flags_create, seq, 0, family, 0, 0) + packed + ti)
                    kind(KIND_NEW if new else KIND_CREATE)
                else:
                    if with_status:
                        packed = update(
                            orig, h0, h1, src, h2, dst, h3, h4, proto, h5, sp, h6, dp,
                            h_status, st & status_sent | confirmed, h_timeout, timeout, h_mark, mark,
                        )  # fmt: skip
                    else:
                        packed = update(
                            orig, h0, h1, src, h2, dst, h3, h4, proto, h5, sp, h6, dp,
                            h_timeout, timeout, h_mark, mark,
                        )  # fmt: skip
                    mlen = update_size + len(ti)
                    append(mhdr(mlen, ct_new, flags_update, seq, 0, family, 0, 0) + packed + ti)
                    kind(KIND_UPDATE)
            note(here)
            seq = (seq + 1) & 0xFFFFFFFF
        elif rt == _R_DELETE:
            if not fl & _RF_ZONE and payload[off + 1] not in icmps:
                v6 = bool(fl & _RF_V6)
                s = _DEL[v6]
                if runs and off >= no_run_before and plain_ok[v6]:
                    k = _run_length(payload, off, end, s.size)
                    run = None
                    if k >= RUN_MIN:  # a delete is the same whatever the marks and timeouts
                        run = _run_plan(b0, payload[off + 1], s.size, False, False, 0, 0, 1)
                    if run is None:
                        no_run_before = off + max(k, 1) * s.size
                    else:
                        _emit_run(run, payload, off, s.size, k, seq, msgs, offsets, kinds, KIND_DELETE)
                        seq = (seq + k) & 0xFFFFFFFF
                        off += k * s.size
                        continue
                _, proto, src, dst, sp, dp = s.unpack_from(payload, off)
                here, off = off, off + s.size
                if not plain_ok[v6]:
                    refused.append(here)
                    continue
                shape = ports[v6]
                h0, h1, h2, h3, h4, h5, h6 = shape.hdrs[:7]
                body = _DEL_BODY[v6, False, False]
                packed = body.pack(shape.orig, h0, h1, src, h2, dst, h3, h4, proto, h5, sp, h6, dp)
                append(mhdr(20 + body.size, ct.CT_DELETE, ct.NLM_F_REQUEST, seq, 0, af[v6], 0, 0) + packed)
                note(here)
                kind(KIND_DELETE)
                seq = (seq + 1) & 0xFFFFFFFF
                continue
            gone, nxt = wire.decode_record_at(payload, off)
            assert isinstance(gone, wire.Delete)
            here, off = off, nxt
            if zones is not None and not (gone.family in families and gone.zone in zones):
                refused.append(here)
                continue
            append(build_entry_delete(gone, seq))
            note(here)
            kind(KIND_DELETE)
            seq = (seq + 1) & 0xFFFFFFFF
        else:
            control, off = wire.decode_record_at(payload, off)
            return Built(msgs, offsets, kinds, refused, over, off, control)
    return Built(msgs, offsets, kinds, refused, over, off, None)


# --- kernel-side event filter -----------------------------------------------------------------
def _host16(v: int) -> int:
    """The value a big-endian BPF half-word load sees for host-order ``v``."""
    return int.from_bytes(struct.pack("=H", v), "big")


def _host32(v: int) -> int:
    return int.from_bytes(struct.pack("=I", v), "big")


NLMSG_TYPE_OFF: Final = 4
NLMSG_PID_OFF: Final = 12
FIRST_ATTR_OFF: Final = ct.NLMSG_HDRLEN + ct.NFGEN_HDRLEN  # 20


def event_filter(mark_bit: int, replica_mask: int, own_port_id: int) -> tuple[cbpf.Insn, ...]:
    """Classic BPF for the ctnetlink event socket: pass a message only when it is a
    conntrack NEW/DELETE message whose top-level CTA_MARK is present, has ``mark_bit`` and
    none of ``replica_mask``, and whose ``nlmsg_pid`` is not ``own_port_id`` (events caused
    by our own injector socket). ``own_port_id`` 0 disables the port check (no user socket
    has port id 0; packet-driven events carry 0).
    """
    if not 0 <= mark_bit < 32:
        raise ValueError(f"mark_bit {mark_bit} outside 0..31")
    bit = 1 << mark_bit
    if not 0 <= replica_mask <= 0xFFFFFFFF or replica_mask & bit:
        raise ValueError(f"replica_mask {replica_mask:#x} must be u32 without bit {mark_bit}")
    if not 0 <= own_port_id <= 0xFFFFFFFF:
        raise ValueError(f"own_port_id {own_port_id} is not a u32")
    steps: list[cbpf.Step] = [
        cbpf.ld_h_abs(NLMSG_TYPE_OFF),
        cbpf.jeq(_host16(ct.CT_NEW), "type_ok"),
        cbpf.jeq(_host16(ct.CT_DELETE), None, "drop"),
        cbpf.Label("type_ok"),
    ]
    if own_port_id:
        steps += [cbpf.ld_w_abs(NLMSG_PID_OFF), cbpf.jeq(_host32(own_port_id), "drop")]
    steps += [
        cbpf.ld_imm(FIRST_ATTR_OFF),
        cbpf.ldx_imm(ct.CTA_MARK),
        cbpf.ld_ancillary(cbpf.SKF_AD_NLATTR),  # A = offset of CTA_MARK, 0 if absent
        cbpf.jeq(0, "drop"),
        cbpf.tax(),
        cbpf.ld_w_ind(4),  # the mark (network order, as BPF loads it)
    ]
    if replica_mask:
        steps.append(cbpf.jset(replica_mask, "drop"))
    steps += [
        cbpf.jset(bit, None, "drop"),
        cbpf.ret(cbpf.ACCEPT),
        cbpf.Label("drop"),
        cbpf.ret(cbpf.DROP),
    ]
    return cbpf.assemble(steps)
