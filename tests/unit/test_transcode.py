"""Transcoding: kernel events -> wire records, wire records -> kernel requests, event filter.

The reference for every fast path is the generic code it replaces: ``ctnetlink.parse_messages``
+ ``wire.encode_entry(wire.entry_from_flow(...))`` for the master side, ``ctnetlink.build_create``
/ ``build_delete`` of ``wire.flow_from_entry`` for the backup side. Events are real captures
(``ct_event_vectors.py``); hypothesis mutates them and checks the compiled layouts never
disagree with the generic walk.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from invictusd import cbpf
from invictusd import flows as F
from invictusd.io import ctnetlink as ct
from invictusd.io import transcode as T
from invictusd.sync import policy, wire
from tests import cbpf_vm
from tests.timeouts import no_hang
from tests.unit.ct_event_vectors import EVENTS
from tests.unit.test_ctnetlink_codec import VECTORS_HEX

MARK_BIT = 30
MARK = 1 << MARK_BIT
REPLICA = 0x1  # some captured entries carry MARK | 1 or MARK | 3: they count as replica
EV: dict[str, bytes] = {k: bytes.fromhex(v) for k, v in EVENTS.items()}
CLI_EV: dict[str, bytes] = {k: bytes.fromhex(v) for k, v in VECTORS_HEX.items()}
_CLI_OK = ("tcp_new", "tcp_update", "tcp_destroy", "udp_new_nomark", "icmp_new", "tcp6_zone_new",
           "icmp6_new", "tcp_snat_new", "dump_mark30", "dump_done", "ack_ok", "create_tcp", "create_snat")
ALL_CT = {**{f"cap_{k}": v for k, v in EV.items()}, **{f"cli_{k}": CLI_EV[k] for k in _CLI_OK}}
V4 = socket.inet_aton


def V6(s: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, s)


class Expected:
    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.keys: list[bytes] = []
        self.deleted = 0


def reference(buf: bytes, mark_bit: int = MARK_BIT, replica_mask: int = REPLICA,
              dump: bool = False) -> Expected:
    """What the transcoder must produce, by the generic codec (raises NetlinkError)."""
    out = Expected()
    for ev in ct.parse_messages(buf, len(buf), 1 << mark_bit):
        flow = ev.flow
        if flow.mark & replica_mask:
            continue
        o = flow.orig
        try:
            if ev.kind == F.EventKind.DESTROY:
                rec = wire.encode_delete(wire.delete_from_key(o))
                out.deleted += 1
            else:
                e = wire.entry_from_flow(flow, ev.kind == F.EventKind.NEW and not dump)
                rec = wire.encode_entry(e)
        except wire.EncodeError as exc:
            raise ct.NetlinkError("entry", 0, str(exc)) from None
        out.records.append(rec)
        out.keys.append(wire.key_bytes(o.family, o.proto, o.src, o.dst, o.sport, o.dport, o.zone))
    return out


def check_same(tr: T.EventTranscoder, buf: bytes, dump: bool = False) -> T.Batch | None:
    try:
        want = reference(buf, dump=dump)
    except ct.NetlinkError:
        with pytest.raises(ct.NetlinkError):
            tr.transcode(buf, len(buf), dump=dump)
        return None
    got = tr.transcode(buf, len(buf), dump=dump)
    assert got.records == want.records
    assert got.keys == want.keys
    assert got.deleted == want.deleted
    return got


def warmed() -> T.EventTranscoder:
    tr = T.EventTranscoder(MARK_BIT, REPLICA)
    for buf in ALL_CT.values():
        tr.transcode(buf, len(buf))
    return tr


# --- master side: golden captures ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ALL_CT))
def test_capture_matches_generic_cold_and_warm(name: str) -> None:
    buf = ALL_CT[name]
    tr = T.EventTranscoder(MARK_BIT, REPLICA)
    cold = check_same(tr, buf)
    fast_before = tr.fast
    warm = check_same(tr, buf)
    assert cold == warm
    if name not in ("cli_dump_done", "cli_ack_ok", "cli_dump_request"):  # no conntrack entry
        assert tr.fast > fast_before, "second pass should take the compiled layout"


def test_every_captured_layout_compiles_to_a_fast_op() -> None:
    tr = warmed()
    ops = {lay[0] for lays in tr._cache.values() for lay in lays}
    assert T.OP_GENERIC not in ops
    assert {T.OP_PORTS, T.OP_PORTS_TCP, T.OP_DEL_PORTS, T.OP_GENERAL, T.OP_SKIP} <= ops


def _one(name: str, **kw: Any) -> T.Batch:
    buf = EV[name]
    return T.EventTranscoder(MARK_BIT, kw.pop("replica_mask", REPLICA)).transcode(buf, len(buf), **kw)


def test_record_kinds_and_pinned_bytes() -> None:
    new = _one("nl_tcp_new")
    assert new.records == [bytes.fromhex("18060a0000010a0000029c400050000e0000012c4000000003")]
    assert new.keys == [wire.key_bytes(4, 6, V4("10.0.0.1"), V4("10.0.0.2"), 40000, 80, 0)]
    assert (new.deleted, new.done, new.skipped) == (0, False, 0)
    # the update carries MARK | 1: a replica bit with REPLICA = 1
    assert _one("nl_tcp_update").skipped == 1
    upd = _one("nl_tcp_update", replica_mask=0x2)
    assert upd.records[0][0] >> 4 == wire.RecordType.UPSERT
    dele = _one("nl_tcp_destroy", replica_mask=0x2)
    assert dele.records == [bytes.fromhex("30060a0000010a0000029c400050")] and dele.deleted == 1
    assert _one("nl_tcp_new", dump=True).records[0][0] >> 4 == wire.RecordType.UPSERT


def test_nat_zone_icmp_v6_records_decode_back() -> None:
    tr = T.EventTranscoder(MARK_BIT, REPLICA)
    want = {
        "nl_snat_new": (True, 0, 0),
        "pkt_tcp_snat_new": (True, 0, 0),
        "pkt_tcp_dnat_update": (True, 0, 0),
        "pkt_udp_dnat_new": (True, 0, 0),
        "nl_zone_new": (False, 5, 5),
        "pkt_zone_new": (False, 7, 7),
        "nl_dirzone_new": (True, 6, 0),
        "pkt_ping_new": (False, 0, 0),
        "pkt_ping6_update": (False, 0, 0),
        "nl_tcp6_new": (False, 0, 0),
    }
    for name, (nat, zone, rzone) in want.items():
        for _ in range(2):  # generic, then compiled
            b = tr.transcode(EV[name], len(EV[name]))
            (e,) = wire._decode_records(b.records[0], 0, len(b.records[0]), wire._DATA_RECORDS)
            assert isinstance(e, wire.Entry), name
            assert (e.is_nat, e.zone, e.rzone) == (nat, zone, rzone), name
            assert e.mark & MARK, name
            assert b.keys == [wire.entry_key(e)], name


def test_unmarked_and_directional_zones() -> None:
    assert _one("nl_unmarked_new").skipped == 1  # CTA_MARK 0
    assert _one("nl_unmarked_destroy").skipped == 1  # no CTA_MARK at all
    # a directional zone without NAT travels in the NAT form (the reply and its zone)
    b = _one("pkt_dirzone_new")
    (e,) = wire.decode_records(b.records[0])
    assert isinstance(e, wire.Entry) and not e.is_nat and e.zone != e.rzone and b.skipped == 0
    d = _one("pkt_dirzone_destroy")
    (rec,) = wire._decode_records(d.records[0], 0, len(d.records[0]), wire._DATA_RECORDS)
    assert isinstance(rec, wire.Delete) and rec.zone == 9


def test_replica_mask_and_other_mark_bit() -> None:
    buf = b"".join(EV.values())
    everything = T.EventTranscoder(MARK_BIT, 0).transcode(buf, len(buf))
    stricter = T.EventTranscoder(MARK_BIT, 0x3).transcode(buf, len(buf))
    assert len(stricter.records) < len(everything.records)
    none = T.EventTranscoder(29, 0).transcode(buf, len(buf))
    assert none.records == [] and none.skipped == len(EV)
    for b in (everything, stricter):
        assert len(b.records) + b.skipped == len(EV)


def test_stream_buffers_and_nbytes() -> None:
    msgs = list(EV.values())
    buf = b"".join(msgs)
    tr = warmed()
    whole = tr.transcode(buf, len(buf))
    parts = [tr.transcode(m, len(m)) for m in msgs]
    assert whole.records == [r for p in parts for r in p.records]
    assert whole.skipped == sum(p.skipped for p in parts)
    big = bytearray(buf) + bytearray(100)
    assert tr.transcode(big, len(buf)) == whole
    assert tr.transcode(memoryview(big), len(buf)) == whole
    assert T.EventTranscoder(MARK_BIT, REPLICA).transcode(memoryview(big), len(buf)) == whole
    with pytest.raises(ct.NetlinkError):
        tr.transcode(buf, len(buf) + 1)
    with pytest.raises(ct.NetlinkError):
        tr.transcode(buf, -1)


@pytest.mark.parametrize("dump", [False, True])
def test_cleared_bits_never_travel_and_filter_nothing(dump: bool) -> None:
    """A bulk's transcoder (``clear``: our replica bits) sends inherited replica entries with
    those bits cleared and every other field as the generic codec reads it, cold and warm."""
    clear = 0x3
    tr = T.EventTranscoder(MARK_BIT, 0, clear=clear)
    seen_replica = 0
    for _ in range(2):
        for buf in ALL_CT.values():
            try:
                want = reference(buf, replica_mask=0, dump=dump)
            except ct.NetlinkError:
                continue
            got = tr.transcode(buf, len(buf), dump=dump)
            assert got.keys == want.keys and got.deleted == want.deleted
            for g, w in zip(got.records, want.records, strict=True):
                (ge,), (we,) = wire.decode_records(g), wire.decode_records(w)
                if isinstance(we, wire.Entry):
                    assert isinstance(ge, wire.Entry)
                    seen_replica += bool(we.mark & clear)
                    assert ge == we._replace(mark=we.mark & ~clear)
                else:
                    assert ge == we
    assert seen_replica >= 2, "the captures hold replica-marked entries: the test must see them"
    with pytest.raises(ValueError, match="clear"):
        T.EventTranscoder(MARK_BIT, 0, clear=MARK)


def test_dump_chunk_done_and_errors() -> None:
    dump = CLI_EV["dump_mark30"] + CLI_EV["dump_done"]
    b = T.EventTranscoder(MARK_BIT, 0).transcode(dump + dump, len(dump) * 2, dump=True)
    assert b.done and len(b.records) == 4  # stops at the first NLMSG_DONE
    first = T.EventTranscoder(MARK_BIT, 0).transcode(CLI_EV["dump_mark30"], len(CLI_EV["dump_mark30"]))
    assert not first.done and first.records == b.records
    assert all(r[0] >> 4 == wire.RecordType.UPSERT for r in b.records)
    ack = CLI_EV["ack_ok"] + CLI_EV["dump_done"]
    assert T.EventTranscoder(MARK_BIT, 0).transcode(ack, len(ack)) == T.Batch([], [], 0, True, 0)
    err = CLI_EV["ack_eexist"]
    with pytest.raises(ct.KernelError):
        T.EventTranscoder(MARK_BIT, 0).transcode(err, len(err))
    tr = warmed()
    buf = EV["nl_tcp_new"]
    with pytest.raises(ct.NetlinkError, match="nlmsghdr at offset 232"):
        tr.transcode(buf + b"\0" * 8, len(buf) + 8)
    with pytest.raises(ct.NetlinkError, match="nlmsg_len at offset 0"):
        tr.transcode(buf[:200], 200)


def _with_extra_attr(msg: bytes, size: int) -> bytes:
    """``msg`` with an unknown top-level attribute of ``size`` payload bytes appended."""
    attr = struct.pack("=HH", 4 + size, 30) + bytes(size) + bytes(-size % 4)
    out = msg + attr
    return struct.pack("=I", len(out)) + out[4:]


def test_cache_is_bounded_and_layouts_per_key() -> None:
    tr = T.EventTranscoder(MARK_BIT, 0)
    base = EV["nl_tcp_new"]
    for size in range(0, 4 * (T.MAX_KEYS + 20), 4):
        m = _with_extra_attr(base, size)
        check_same(tr, m)
    assert len(tr._cache) <= T.MAX_KEYS
    # same length and type, different attribute types: several layouts for one key
    tr = T.EventTranscoder(MARK_BIT, 0)
    for t in range(30, 40):
        m = bytearray(_with_extra_attr(base, 4))
        struct.pack_into("=H", m, len(base) + 2, t)
        check_same(tr, bytes(m))
        check_same(tr, bytes(m))
    assert max(len(v) for v in tr._cache.values()) <= T.MAX_LAYOUTS_PER_KEY
    assert tr.fast > 0


def test_unknown_nested_attributes_fall_back_to_generic() -> None:
    # An attribute inside the orig tuple the compiler does not know: the layout is a hint
    # (generic every time), and the output still equals the reference.
    m = bytearray(EV["nl_tcp_new"])
    # CTA_PROTO_DST_PORT (type 3) of the orig tuple at offset 20+4+20+4+5+3+8 = 64 -> type 40
    assert struct.unpack_from("=HH", m, 64) == (6, 3)
    struct.pack_into("=H", m, 66, 40)
    tr = T.EventTranscoder(MARK_BIT, REPLICA)
    for _ in range(3):
        check_same(tr, bytes(m))
    assert tr.fast == 0 or all(lay[0] == T.OP_GENERIC for lays in tr._cache.values() for lay in lays)


# --- master side: fuzzing against the generic walk -------------------------------------------
_NAMES = sorted(ALL_CT)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_NAMES), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
       st.integers(0, 400), st.booleans())
def test_fuzz_mutated_captures_agree_with_generic(name: str, flips: list[tuple[int, int]], cut: int,
                                                  dump: bool) -> None:
    buf = bytearray(ALL_CT[name])
    for pos, val in flips:
        if pos < len(buf):
            buf[pos] = val
    data = bytes(buf[: max(cut, 0)] if cut < len(buf) else buf)
    with no_hang(5, "transcode"):
        check_same(TR_WARM, data, dump)
        check_same(T.EventTranscoder(MARK_BIT, REPLICA), data, dump)


TR_WARM = warmed()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_NAMES), st.integers(20, 400), st.integers(0, 0xFFFF))
def test_fuzz_header_words_agree_with_generic(name: str, pos: int, word: int) -> None:
    """Rewrite one 16-bit word (an attribute length or type, most likely) on a warm cache."""
    buf = bytearray(ALL_CT[name])
    assume(pos + 2 <= len(buf))
    struct.pack_into("=H", buf, pos & ~1, word)
    with no_hang(5, "transcode"):
        check_same(TR_WARM, bytes(buf))


# --- master side: runs of one layout ----------------------------------------------------------
def _run_plan_of(msg: bytes) -> T._EventRun | None:
    mlen, mtype, mflags, _seq, _pid = struct.unpack_from("=IHHII", msg, 0)
    lay = T.compile_layout(msg, 0, mlen, mtype, mflags)
    return None if lay is None else lay[15]


_RUN_NAMES = sorted(n for n, m in ALL_CT.items() if _run_plan_of(m) is not None)
_MARKS = (MARK, MARK | 0x10, MARK | REPLICA, 0x10, MARK | 0x80000000)


def _padded(msg: bytes) -> bytearray:
    return bytearray(msg + bytes(-len(msg) % 4))


# Per message: which change (0 none, 1 new tuple, 2 NAT'd reply, 3 plain reply, 4 mark,
# 5 status and timeout, 6 one random byte anywhere), a value, a position.
_change = st.tuples(st.integers(0, 6), st.integers(0, 1 << 32), st.integers(0, 400))


def _varied(name: str, changes: list[tuple[int, int, int]]) -> bytes:
    """Copies of capture ``name`` with their values changed the way a burst's differ (and,
    now and then, in ways that must break a run: a NAT among plain entries, another mark,
    a header byte)."""
    base = _padded(ALL_CT[name])
    plan = _run_plan_of(ALL_CT[name])
    assert plan is not None
    out = bytearray()
    for n, (what, value, pos) in enumerate(changes):
        m = bytearray(base)
        if what in (1, 2, 3):  # a new original tuple (and its reply: plain or NAT)
            for i, (_r, rel) in enumerate(plan.key):
                m[rel] = (value >> (i % 24) ^ n ^ i) & 0xFF
            for x, y in plan.inverse:
                m[x] = m[y]
            if what == 2:
                x = plan.inverse[pos % len(plan.inverse)][0]
                m[x] ^= 1 + value % 255
        elif what == 4:
            struct.pack_into(">I", m, plan.mark, _MARKS[value % len(_MARKS)])
        elif what == 5:  # status and timeout, and the TCP state (0 now and then: not sent)
            for _r, rel in plan.forms[False, plan.tcp >= 0].copy[-7:]:
                m[rel] = (value >> (rel % 24)) & 0xFF
        elif what == 6 and pos < len(m):
            m[pos] = value & 0xFF
        out += m
    return bytes(out)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_RUN_NAMES), st.lists(_change, min_size=1, max_size=40),
       st.sampled_from(_RUN_NAMES), st.lists(_change, max_size=12), st.booleans())
def test_runs_of_one_layout_are_the_per_message_path(name: str, changes: list[tuple[int, int, int]],
                                                     other: str, tail: list[tuple[int, int, int]],
                                                     dump: bool) -> None:
    """The master's runs (strided copies across messages of one layout) are byte-equal to
    transcoding message by message, which the generic walk holds in turn."""
    buf = _varied(name, changes) + (_varied(other, tail) if tail else b"")
    with no_hang(5, "transcode"):
        try:
            want = T.EventTranscoder(MARK_BIT, REPLICA).transcode(buf, len(buf), dump=dump, runs=False)
        except ct.NetlinkError:
            with pytest.raises(ct.NetlinkError):
                T.EventTranscoder(MARK_BIT, REPLICA).transcode(buf, len(buf), dump=dump)
            return
        for tr in (T.EventTranscoder(MARK_BIT, REPLICA), TR_WARM):
            got = tr.transcode(buf, len(buf), dump=dump)
            assert got == want
    check_same(T.EventTranscoder(MARK_BIT, REPLICA), buf, dump)


@pytest.mark.parametrize("name", ["cap_nl_tcp_new", "cap_pkt_udp_snat_new", "cap_nl_tcp6_new"])
def test_any_header_byte_changed_inside_a_run_is_seen(name: str) -> None:
    """Every byte a layout's check covers, changed in the middle of a run, gives what the
    per-message path gives (another layout, the generic walk, or an error)."""
    plan = _run_plan_of(ALL_CT[name])
    assert plan is not None
    tried = 0
    for pos in plan.checks:
        if pos < 8:
            continue  # length, type, flags: a different run key altogether
        for val in (0x00, 0x01, 0x02, 0x80, 0xFF):
            changes = [(1, 7 * i + 3, 0) for i in range(20)]
            changes[10] = (6, val, pos)
            buf = _varied(name, changes)
            try:
                want = T.EventTranscoder(MARK_BIT, REPLICA).transcode(buf, len(buf), runs=False)
            except ct.NetlinkError:
                with pytest.raises(ct.NetlinkError):
                    T.EventTranscoder(MARK_BIT, REPLICA).transcode(buf, len(buf))
                continue
            assert T.EventTranscoder(MARK_BIT, REPLICA).transcode(buf, len(buf)) == want, (pos, val)
            tried += 1
    assert tried > 100


def test_a_run_is_transcoded_as_a_run_plain_and_nat() -> None:
    """Uniform runs take the strided path (one per run, counted as fast), NAT and plain
    alike; a run mixing them goes message by message, with the same records."""
    for name in ("cap_nl_tcp_new", "cap_pkt_udp_new", "cap_nl_snat_new", "cap_pkt_udp_snat_new",
                 "cap_nl_tcp6_new"):
        kind = 2 if "snat" in name else 1  # new tuples, NAT'd or plain
        buf = _varied(name, [(kind, 7 * i + 3, 0) for i in range(40)])
        plan = _run_plan_of(ALL_CT[name])
        assert plan is not None
        tr = T.EventTranscoder(MARK_BIT, REPLICA)
        tr.transcode(buf, len(buf))  # learns the layout on the first message
        calls = 0
        real = T._event_run

        def counting(*a: Any, real: Any = real) -> Any:
            nonlocal calls
            calls += 1
            return real(*a)

        T._event_run = counting  # type: ignore[assignment]
        try:
            got = tr.transcode(buf, len(buf))
        finally:
            T._event_run = real  # type: ignore[assignment]
        assert calls == 1 and len(got.records) == 40, name
        assert got == T.EventTranscoder(MARK_BIT, REPLICA).transcode(buf, len(buf), runs=False)
        nat = bool(wire.decode_records(got.records[0])[0].is_nat)  # type: ignore[union-attr]
        assert nat == ("snat" in name)
        # One NAT'd entry among plain ones (or the reverse) breaks uniformity, not the records.
        mixed = _varied(name, [(kind, 7 * i + 3, 0) for i in range(39)] + [(3 - kind, 5, 1)])
        assert tr.transcode(mixed, len(mixed)) == tr.transcode(mixed, len(mixed), runs=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    with no_hang(5, "transcode"):
        try:
            b = TR_WARM.transcode(data, len(data))
        except ct.NetlinkError:
            return
    assert len(b.records) == len(b.keys)


# --- _entry_record is wire.encode_entry ------------------------------------------------------
def _addr(v6: bool) -> st.SearchStrategy[bytes]:
    n = 16 if v6 else 4
    return st.sampled_from([bytes(n), b"\x0a" + bytes(n - 2) + b"\x01", b"\x0a" + bytes(n - 2) + b"\x02",
                            b"\xc0" * n]) | st.binary(min_size=n, max_size=n)


@st.composite
def entries(draw: st.DrawFn, zones: bool = True) -> wire.Entry:
    v6 = draw(st.booleans())
    proto = draw(st.sampled_from([6, 17, 132, 1, 58] if True else []))
    if proto == 1 and v6:
        proto = 58
    if proto == 58 and not v6:
        proto = 1
    src, dst = draw(_addr(v6)), draw(_addr(v6))
    sp = draw(st.integers(0, 0xFFFF))
    if proto in (1, 58):
        dp = draw(st.sampled_from([8, 0, 13, 15, 17, 3, 128, 129, 130, 255])) << 8 | draw(st.integers(0, 3))
    else:
        dp = draw(st.integers(0, 0xFFFF))
    rs, rd, rsp, rdp = wire.reply_of(proto, src, dst, sp, dp)
    nat = draw(st.sampled_from(["none", "snat", "snat_port", "dnat", "dnat_port", "both", "any"]))
    if nat in ("snat", "snat_port", "both"):
        rd = draw(_addr(v6))
    if nat in ("snat_port", "both"):
        rdp = draw(st.integers(0, 0xFFFF))
    if nat in ("dnat", "dnat_port", "both"):
        rs = draw(_addr(v6))
    if nat in ("dnat_port", "both"):
        rsp = draw(st.integers(0, 0xFFFF))
    if nat == "any":
        rs, rd = draw(_addr(v6)), draw(_addr(v6))
        rsp, rdp = draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))
    zone = rzone = 0
    if zones:
        zone, rzone = draw(st.sampled_from([(0, 0), (5, 5), (5, 0), (0, 7), (3, 9)]))
    return wire.Entry(
        draw(st.booleans()), 6 if v6 else 4, proto, src, dst, sp, dp, zone, rs, rd, rsp, rdp, rzone,
        draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFFFFFF)), draw(st.integers(0, 0xFFFFFFFF)),
        draw(st.integers(0, 10)) if proto == 6 else 0,
    )


@settings(max_examples=500, deadline=None)
@given(entries())
def test_entry_record_is_encode_entry(e: wire.Entry) -> None:
    head = T._T_NEW if e.new else T._T_UPSERT
    got = T._entry_record(head, e.family == 6, e.proto, e.src, e.dst, e.sport, e.dport, e.zone, e.rsrc,
                          e.rdst, e.rsport, e.rdport, e.rzone, e.status, e.timeout, e.mark, e.tcp_state)
    try:
        want = wire.encode_entry(e)
    except wire.EncodeError:
        assert got is None
        assert e.zone != e.rzone and not e.is_nat
        return
    assert got == want


# --- backup side: builders are build_create / build_delete ----------------------------------
@settings(max_examples=800, deadline=None)
@given(entries(), st.integers(0, 0xFFFFFFFF), st.booleans(), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 1 << 31), st.booleans(), st.booleans(), st.booleans())
def test_build_entry_is_build_create(e: wire.Entry, seq: int, create: bool, mark: int, timeout: int,
                                     with_status: bool, be_liberal: bool, ack: bool) -> None:
    want = ct.build_create(wire.flow_from_entry(e)._replace(mark=mark, timeout=timeout), seq,
                           be_liberal=be_liberal, create=create, with_status=with_status, ack=ack)
    got = T.build_entry(e, seq, create=create, mark=mark, timeout=timeout, with_status=with_status,
                        be_liberal=be_liberal, ack=ack)
    assert got == want


@settings(max_examples=300, deadline=None)
@given(entries(), st.integers(0, 0xFFFFFFFF), st.booleans())
def test_build_entry_delete_is_build_delete(e: wire.Entry, seq: int, ack: bool) -> None:
    d = wire.Delete(e.family, e.proto, e.src, e.dst, e.sport, e.dport, e.zone)
    assert T.build_entry_delete(d, seq, ack=ack) == ct.build_delete(F.FlowKey(*d), seq, ack=ack)


def test_build_entry_defaults_and_with_ack() -> None:
    e = wire.Entry(True, 4, 6, V4("10.0.0.1"), V4("10.0.0.2"), 40000, 80, 0, V4("10.0.0.2"),
                   V4("10.9.9.9"), 80, 40001, 0, F.IPS_SEEN_REPLY | F.IPS_ASSURED, 10, MARK, 3)
    msg = T.build_entry(e, 7, create=True, mark=MARK | 0x100, timeout=0)
    flow = wire.flow_from_entry(e)._replace(mark=MARK | 0x100, timeout=0)
    assert msg == ct.build_create(flow, 7, ack=False)
    assert T.with_ack(msg) == ct.build_create(flow, 7, ack=True)
    assert ct.parse_messages(msg)[0].flow.orig == flow.orig  # the request decodes as an entry
    with pytest.raises(ValueError):
        T.build_entry(e._replace(family=5), 1, create=True, mark=0, timeout=1)


# --- kernel-side filter on captured messages -------------------------------------------------
def _set_pid(msg: bytes, pid: int) -> bytes:
    return msg[:12] + struct.pack("=I", pid) + msg[16:]


OWN = struct.unpack_from("=I", EV["nl_tcp_new"], 12)[0]  # the capture's injector port id


def _passes(msg: bytes) -> bool:
    """What the filter must decide: the transcoder's own mark rule, plus the port id."""
    _mlen, mtype, _flags, _seq, pid = struct.unpack_from("=IHHII", msg)
    if mtype not in (ct.CT_NEW, ct.CT_DELETE) or pid == OWN:
        return False
    a = 20
    while a + 4 <= len(msg):
        alen, atype = struct.unpack_from("=HH", msg, a)
        if alen < 4:
            return False
        if atype & 0x3FFF == ct.CTA_MARK:
            mark = struct.unpack_from(">I", msg, a + 4)[0]
            return bool(mark & MARK) and not mark & REPLICA
        a += (alen + 3) & ~3
    return False


@pytest.mark.parametrize("name", sorted(EV))
def test_event_filter_on_captures(name: str) -> None:
    prog = T.event_filter(MARK_BIT, REPLICA, OWN)
    msg = EV[name]
    for m in (msg, _set_pid(msg, 0), _set_pid(msg, OWN), _set_pid(msg, OWN ^ 1)):
        assert (cbpf_vm.run(prog, m) != 0) == _passes(m), name


def test_event_filter_cases() -> None:
    prog = T.event_filter(MARK_BIT, REPLICA, OWN)
    ours = EV["nl_tcp_new"]  # marked, from OWN
    assert cbpf_vm.run(prog, ours) == 0
    assert cbpf_vm.run(prog, _set_pid(ours, 0)) == cbpf.ACCEPT
    assert cbpf_vm.run(prog, _set_pid(EV["nl_tcp_update"], 0)) == 0  # MARK | 1: replica
    assert cbpf_vm.run(T.event_filter(MARK_BIT, 0, OWN), _set_pid(EV["nl_tcp_update"], 0)) == cbpf.ACCEPT
    assert cbpf_vm.run(prog, _set_pid(EV["nl_unmarked_new"], 0)) == 0  # mark 0
    assert cbpf_vm.run(prog, _set_pid(EV["nl_unmarked_destroy"], 0)) == 0  # no CTA_MARK
    assert cbpf_vm.run(prog, EV["pkt_udp_new"]) == cbpf.ACCEPT  # packets: pid 0
    assert cbpf_vm.run(T.event_filter(29, 0, OWN), EV["pkt_udp_new"]) == 0
    # port id check off: our own events pass
    assert cbpf_vm.run(T.event_filter(MARK_BIT, REPLICA, 0), ours) == cbpf.ACCEPT
    # not a conntrack message
    assert cbpf_vm.run(prog, CLI_EV["ack_ok"]) == 0
    assert cbpf_vm.run(prog, b"") == 0
    with pytest.raises(ValueError):
        T.event_filter(30, MARK, 1)
    with pytest.raises(ValueError):
        T.event_filter(32, 0, 1)
    with pytest.raises(ValueError):
        T.EventTranscoder(30, MARK)
    assert len(prog) <= 20


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(EV)), st.integers(0, 0xFFFFFFFF), st.sampled_from([0, OWN, 1]))
def test_event_filter_mark_values(name: str, mark: int, pid: int) -> None:
    msg = bytearray(_set_pid(EV[name], pid))
    a = 20
    while a + 4 <= len(msg):
        alen, atype = struct.unpack_from("=HH", msg, a)
        if atype & 0x3FFF == ct.CTA_MARK:
            struct.pack_into(">I", msg, a + 4, mark)
        a += (alen + 3) & ~3
    m = bytes(msg)
    assert (cbpf_vm.run(T.event_filter(MARK_BIT, REPLICA, OWN), m) != 0) == _passes(m)


# --- backup side, fused: build_records is build_entry/build_entry_delete of each record ---------
def _reference(records: list[wire.Record], seq: int, how: T.Injection,
               sent: list[wire.Record] | None = None) -> tuple[list[bytes], list[int], int]:
    """What the applier built per decoded record before the fused path: (requests, kinds,
    UPSERT_NEW records dropped by the cap); ``sent`` collects the records built."""
    sent = [] if sent is None else sent
    msgs: list[bytes] = []
    kinds: list[int] = []
    over = 0
    left = how.room
    sc = how.scope
    for r in records:
        if isinstance(r, wire.Delete):
            if sc is None or (r.family in sc.families and r.zone in sc.zones):
                msgs.append(T.build_entry_delete(r, seq + len(msgs)))
                kinds.append(T.KIND_DELETE)
                sent.append(r)
            continue
        assert isinstance(r, wire.Entry)
        if sc is not None and not (r.family in sc.families and r.zone in sc.zones and r.rzone in sc.zones
                                   and r.mark >> sc.mark_bit & 1):
            continue
        if left is not None:
            full = left <= 0
            if r.new and full:
                over += 1
                continue
            create = r.new or (how.create_first and not full)
            left -= create
        else:
            create = r.new or how.create_first
        timeout = how.timeouts(r.proto, r.tcp_state, r.status) if how.timeouts else how.timeout or r.timeout
        msgs.append(T.build_entry(r, seq + len(msgs), create=create, mark=r.mark & how.mark_and | how.mark_or,
                                  timeout=timeout, with_status=how.with_status or create))
        kinds.append(T.KIND_NEW if r.new else T.KIND_CREATE if create else T.KIND_UPDATE)
        sent.append(r)
    return msgs, kinds, over


@st.composite
def injections(draw: st.DrawFn) -> T.Injection:
    mark_bit = draw(st.sampled_from([30, 0, 31]))
    master = draw(st.booleans())
    marks = policy.ReplicaMarks(mark_bit=mark_bit, replica_bit=29 if mark_bit != 29 else 28,
                                generation_bit=27)
    m_and, m_or = marks.own_masks() if master else marks.replica_masks(draw(st.integers(0, 1)))
    scope = policy.Scope(mark_bit, draw(st.sampled_from([frozenset({0}), frozenset({0, 5}),
                                                         frozenset({5, 7, 3, 9})])),
                         draw(st.sampled_from([frozenset({4, 6}), frozenset({4}), frozenset({6})])))
    remark = draw(st.booleans())  # a re-mark or hand-over of our own kernel's entries
    timeouts = None
    if draw(st.booleans()):
        table = {"nf_conntrack_tcp_timeout_established": 7, "nf_conntrack_udp_timeout": 3}

        def timeouts(proto: int, tcp: int, status: int) -> int:
            return policy.handover_timeout(proto, tcp, status, table)

    return T.Injection(m_and, m_or, 0 if master else draw(st.integers(1, 1 << 31)),
                       None if master else draw(st.integers(-2, 6)), draw(st.booleans()),
                       None if remark else scope, not remark, timeouts)


@st.composite
def stream_records(draw: st.DrawFn) -> wire.Record:
    kind = draw(st.sampled_from(["entry", "entry", "plain", "plain", "delete", "control"]))
    if kind == "control":
        return draw(st.sampled_from([wire.ResyncBegin(7), wire.ResyncEnd(7, 3), wire.Digest(3, 99)]))
    e = draw(entries(zones=kind != "plain"))
    if kind == "plain":
        e = e._replace(rsrc=e.dst, rdst=e.src, rsport=e.dport, rdport=e.sport) \
            if e.proto not in (1, 58) else e
        e = e._replace(mark=e.mark | draw(st.sampled_from([0, 1 << 30, 1, 1 << 31])))
    if kind == "delete":
        return wire.Delete(e.family, e.proto, e.src, e.dst, e.sport, e.dport, e.zone)
    return e


@settings(max_examples=600, deadline=None)
@given(st.lists(stream_records(), max_size=25), st.integers(0, 0xFFFFFFFF), injections())
def test_build_records_is_the_per_record_builders(records: list[wire.Record], seq: int,
                                                 how: T.Injection) -> None:
    encodable = []
    for r in records:
        with contextlib.suppress(wire.EncodeError):
            wire.encode_record(r)
            encodable.append(r)
    payload = b"".join(wire.encode_record(r) for r in encodable)
    pos, upto = 0, 0
    while True:
        built = T.build_records(payload, pos, seq, how)
        control = next((i for i in range(upto, len(encodable))
                        if not isinstance(encodable[i], wire.Entry | wire.Delete)), len(encodable))
        msgs, kinds, over = _reference(encodable[upto:control], seq, how)
        assert built.msgs == msgs
        assert list(built.kinds) == kinds
        assert built.over_capacity == over
        assert len(built.offsets) == len(msgs)
        for off in built.offsets + built.refused:
            rec, _ = wire.decode_record_at(payload, off)
            assert isinstance(rec, wire.Entry | wire.Delete)
        assert len(built.refused) + len(msgs) + over == control - upto
        if control == len(encodable):
            assert built.control is None and built.end == len(payload)
            break
        assert built.control == encodable[control]
        pos, upto = built.end, control + 1


@st.composite
def runs_of_one_shape(draw: st.DrawFn) -> list[wire.Record]:
    """Records of one plain shape in a row (a burst, a dump), each field its own, sometimes
    one mark without the replicated bit; or a row of plain deletes."""
    family = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from([6, 17, 132, 136]))
    n = draw(st.integers(T.RUN_MIN - 2, 3 * T.RUN_MIN))
    alen = 4 if family == 4 else 16
    addr, port = st.binary(min_size=alen, max_size=alen), st.integers(0, 0xFFFF)
    if draw(st.integers(0, 3)) == 0:
        return [wire.Delete(family, proto, draw(addr), draw(addr), draw(port), draw(port), 0)
                for _ in range(n)]
    new, with_tcp = draw(st.booleans()), draw(st.booleans())
    odd = draw(st.sampled_from([None, None, draw(st.integers(0, n - 1))]))
    # A hand-over's timeout follows the state: a dump of established flows shares it, but
    # for one entry now and then.
    state = draw(st.sampled_from([None, (draw(st.integers(0, 0xFFFF)), draw(st.integers(1, 255)))]))
    other = draw(st.sampled_from([None, draw(st.integers(0, n - 1))]))
    out: list[wire.Record] = []
    for i in range(n):
        src, dst, sp, dp = draw(addr), draw(addr), draw(port), draw(port)
        mark = draw(st.integers(0, 0xFFFFFFFF)) | 1 << 30 | 1 << 31 | 1  # every mark_bit drawn
        if i == odd:
            mark &= ~(1 << 30 | 1 << 31 | 1)
        status, tcp = state if state is not None and i != other else (
            draw(st.integers(0, 0xFFFF)), draw(st.integers(1, 255)))
        out.append(wire.Entry(new, family, proto, src, dst, sp, dp, 0, dst, src, dp, sp, 0,
                              status, draw(st.integers(0, 0xFFFFFFFF)), mark, tcp if with_tcp else 0))
    return out


def _handover_timeouts(proto: int, tcp: int, status: int) -> int:
    return policy.handover_timeout(proto, tcp, status, {"nf_conntrack_tcp_timeout_established": 7,
                                                        "nf_conntrack_udp_timeout": 3})


@st.composite
def run_injections(draw: st.DrawFn) -> T.Injection:
    """Injections that build runs as runs (a fixed timeout: the replica's, a re-mark's; or
    the hand-over's per-state timeouts)."""
    marks = policy.ReplicaMarks()
    if draw(st.booleans()):  # the hand-over: our own kernel's entries, made ours
        return T.Injection(*marks.own_masks(), 0, None, False, None, with_status=False,
                           timeouts=_handover_timeouts)
    remark = draw(st.booleans())
    scope = None if remark else policy.Scope(30, frozenset({0}), draw(st.sampled_from(
        [frozenset({4, 6}), frozenset({4}), frozenset({6})])))
    return T.Injection(*marks.replica_masks(draw(st.integers(0, 1))), draw(st.integers(1, 1 << 31)),
                       None if remark else draw(st.sampled_from([None, 0, 5, 40, 1000])),
                       draw(st.booleans()), scope, not remark)


@settings(max_examples=400, deadline=None)
@given(st.lists(runs_of_one_shape() | stream_records().map(lambda r: [r]), min_size=1, max_size=5),
       st.integers(0, 0xFFFFFFFF), run_injections() | injections())
def test_runs_of_one_shape_are_the_per_record_builders(segments: list[list[wire.Record]], seq: int,
                                                       how: T.Injection) -> None:
    """A run of records of one shape is built from strided copies (``T._run_plan``): the
    requests, kinds, offsets and refusals are those of the records built one by one, at any
    seq (wrapping included), cap, scope and marks."""
    records = [r for seg in segments for r in seg if isinstance(r, wire.Entry | wire.Delete)]
    payload = b"".join(wire.encode_record(r) for r in records)
    built = T.build_records(payload, 0, seq, how)
    sent: list[wire.Record] = []
    msgs, kinds, over = _reference(records, seq, how, sent)
    assert built.msgs == msgs
    assert list(built.kinds) == kinds and built.over_capacity == over
    assert [wire.decode_record_at(payload, off)[0] for off in built.offsets] == sent
    assert len(built.refused) + len(msgs) + over == len(records)


def test_a_run_is_built_as_a_run_and_as_the_per_record_path() -> None:
    """The run path is taken for a burst's datagram (so the property above tests it), and
    for a hand-over's records while they share the state its timeout follows."""
    marks = policy.ReplicaMarks()
    a, b = bytes([10, 1, 0, 1]), bytes([10, 2, 0, 1])
    recs = [wire.Entry(True, 4, 17, a, b, 40000 + i, 53, 0, b, a, 53, 40000 + i, 0, 0xE, 30, 1 << 30, 0)
            for i in range(50)]
    payload = b"".join(wire.encode_entry(e) for e in recs)
    scope = policy.Scope(30, frozenset({0}), frozenset({4}))
    how = T.Injection(*marks.replica_masks(1), 86400, 100, False, scope)
    T._run_plans.clear()
    built = T.build_records(payload, 0, 0xFFFFFFF0, how)  # the seq wraps inside the run
    assert len(T._run_plans) == 1 and None not in T._run_plans.values()
    assert built.msgs == [T.build_entry(e, (0xFFFFFFF0 + i) & 0xFFFFFFFF, create=True,
                                        mark=marks.replica_mark(e.mark, 1), timeout=86400)
                          for i, e in enumerate(recs)]
    assert built.offsets == list(range(0, 50 * 24, 24)) and set(built.kinds) == {T.KIND_NEW}
    # The hand-over: a timeout per (proto, TCP state, status), one run while they agree.
    T._run_plans.clear()
    handover = T.Injection(*marks.own_masks(), 0, None, False, None, with_status=False,
                           timeouts=lambda p, t, s: 30 if s == 0xE else 60)
    odd = [*recs[:25], recs[25]._replace(status=0xA), *recs[26:]]
    built = T.build_records(b"".join(wire.encode_entry(e) for e in odd), 0, 5, handover)
    assert built.msgs == [T.build_entry(e, 5 + i, create=True, mark=e.mark, timeout=30 if i != 25 else 60,
                                        with_status=True) for i, e in enumerate(odd)]
    assert list(T._run_plans) and all(key[-1] == 30 for key in T._run_plans)  # 2 runs, 1 record


def test_build_records_plain_tcp_is_pinned() -> None:
    """The fused path's bytes for a plain TCP entry: those of build_entry (create and update)."""
    a, b = bytes([10, 1, 0, 1]), bytes([10, 2, 0, 1])
    e = wire.Entry(True, 4, 6, a, b, 40000, 443, 0, b, a, 443, 40000, 0, 0xE, 300, 1 << 30, 3)
    u = e._replace(new=False)
    marks = policy.ReplicaMarks()
    scope = policy.Scope(30, frozenset({0}), frozenset({4}))
    how = T.Injection(*marks.replica_masks(1), 86400, 10, False, scope)
    built = T.build_records(wire.encode_entry(e) + wire.encode_entry(u), 0, 77, how)
    mark = marks.replica_mark(e.mark, 1)
    assert built.msgs == [T.build_entry(e, 77, create=True, mark=mark, timeout=86400),
                          T.build_entry(u, 78, create=False, mark=mark, timeout=86400)]
    assert list(built.kinds) == [T.KIND_NEW, T.KIND_UPDATE] and built.offsets == [0, 25]


def test_entry_mark_and_selection_of_dump_records() -> None:
    """``select_entries`` keeps exactly the entries whose decoded mark matches, keys aligned;
    ``wire.entry_mark`` reads every entry record's mark (v4/v6, NAT, zones, TCP state) and
    nothing else."""
    tr = T.EventTranscoder(MARK_BIT, 0)
    batch = T.Batch([], [], 0, False, 0)
    for buf in ALL_CT.values():
        with contextlib.suppress(ct.NetlinkError, ct.KernelError):
            b = tr.transcode(buf, len(buf), dump=True)
            batch = T.Batch(batch.records + b.records, batch.keys + b.keys, 0, False, 0)
    decoded = [wire.decode_records(r)[0] for r in batch.records]
    assert len(decoded) >= 8 and len({e.mark for e in decoded if isinstance(e, wire.Entry)}) >= 2
    for r, e in zip(batch.records, decoded, strict=True):
        assert wire.entry_mark(r) == (e.mark if isinstance(e, wire.Entry) else None)
    for rec in (wire.Delete(4, 6, V4("10.0.0.1"), V4("10.0.0.2"), 1, 2, 0), wire.ResyncBegin(3)):
        assert wire.entry_mark(wire.encode_record(rec)) is None
    for mark, mask in ((MARK, MARK), (MARK | 1, MARK | 1), (MARK | 3, 0xFFFFFFFF), (0, 0)):
        got = T.select_entries(batch, mark, mask)
        want = [i for i, e in enumerate(decoded) if isinstance(e, wire.Entry) and e.mark & mask == mark]
        assert got.records == [batch.records[i] for i in want]
        assert got.keys == [batch.keys[i] for i in want]
        assert got.skipped == len(batch.records) - len(want)
