"""Transcoding micro-benchmark: conntrack events -> wire records, wire records -> requests.

Run: ``python3 -m benchmarks.bench_transcode [--quick]`` (no root, no kernel: the events are
real captured messages, ``tests/unit/ct_event_vectors.py``, with their addresses and ports
rewritten per event so that every record differs). Prints a table of medians.

Master side, per event of a realistic mix (plain and SNAT TCP with NEW/UPDATE/DESTROY, UDP,
ICMP, IPv6), against today's path ``ctnetlink.parse_messages`` + ``wire.encode_entry(
wire.entry_from_flow(...))``. Backup side, messages built per second against
``ctnetlink.build_create(wire.flow_from_entry(...))``, and ``build_records`` (wire bytes
straight into requests) against decoding the records and building each.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time
from collections.abc import Callable

from invictusd.io import ctnetlink as ct
from invictusd.io import transcode as T
from invictusd.sync import wire
from tests.unit.ct_event_vectors import EVENTS

MARK_BIT = 30
REPLICA = 0x0F000000

# (captured message, weight) of the mix; packet-made events where the capture has them.
MIX = {
    "pkt_tcp_new": 2, "pkt_tcp_update": 6, "pkt_tcp_destroy": 2,
    "pkt_tcp_snat_new": 1, "pkt_tcp_snat_update": 3, "pkt_tcp_snat_destroy": 1,
    "pkt_udp_new": 2, "pkt_udp_update": 1, "pkt_udp_destroy": 2,
    "pkt_ping_new": 1, "pkt_ping_destroy": 1,
    "nl_tcp6_new": 1, "nl_tcp6_destroy": 1, "pkt_ping6_new": 1,
}  # fmt: skip
SHAPES = {
    "plain TCP v4": ("pkt_tcp_new", "pkt_tcp_update", "pkt_tcp_destroy"),
    "SNAT TCP v4": ("pkt_tcp_snat_new", "pkt_tcp_snat_update", "pkt_tcp_snat_destroy"),
    "UDP v4": ("pkt_udp_new", "pkt_udp_update", "pkt_udp_destroy"),
    "ICMP v4": ("pkt_ping_new", "pkt_ping_update", "pkt_ping_destroy"),
    "TCP v6": ("nl_tcp6_new", "nl_tcp6_destroy"),
    "ICMPv6": ("pkt_ping6_new", "pkt_ping6_update", "pkt_ping6_destroy"),
}


def _tuple_fields(msg: bytes) -> dict[str, int]:
    """Offsets of the orig source address/port and the reply destination address/port."""
    out: dict[str, int] = {}

    def attrs(start: int, end: int) -> list[tuple[int, int, int]]:
        res, a = [], start
        while a + 4 <= end:
            alen, atype = struct.unpack_from("=HH", msg, a)
            res.append((a, alen, atype & 0x3FFF))
            a += (alen + 3) & ~3
        return res

    for a, alen, t in attrs(20, len(msg)):
        if t not in (ct.CTA_TUPLE_ORIG, ct.CTA_TUPLE_REPLY):
            continue
        side = "o" if t == ct.CTA_TUPLE_ORIG else "r"
        for b, blen, bt in attrs(a + 4, a + alen):
            for c, _clen, ctype in attrs(b + 4, b + blen):
                if bt == ct.CTA_TUPLE_IP:
                    is_src = ctype in (ct.CTA_IP_V4_SRC, ct.CTA_IP_V6_SRC)
                    out[side + ("src" if is_src else "dst")] = c + 4
                elif bt == ct.CTA_TUPLE_PROTO and ctype in (2, 4, 7):
                    out[side + "sport"] = c + 4
                elif bt == ct.CTA_TUPLE_PROTO and ctype == 3:
                    out[side + "dport"] = c + 4
    return out


def make_events(n: int) -> bytes:
    """``n`` events of the mix, concatenated like one large recv buffer."""
    order = [name for name, w in MIX.items() for _ in range(w)]
    templates = {name: (bytes.fromhex(EVENTS[name]), _tuple_fields(bytes.fromhex(EVENTS[name])))
                 for name in MIX}
    parts = []
    for j in range(n):
        msg, f = templates[order[j % len(order)]]
        m = bytearray(msg)
        # A distinct orig source (and the reply's destination, where the reply goes back to it).
        v6 = len(m) > 250 or m[16] == 10
        tail = struct.pack(">I", 0x0A000000 | (j & 0xFFFFFF))
        if v6:
            m[f["osrc"] + 12 : f["osrc"] + 16] = tail
            if m[f["rdst"] : f["rdst"] + 12] == m[f["osrc"] : f["osrc"] + 12]:
                m[f["rdst"] + 12 : f["rdst"] + 16] = tail
        else:
            was_plain = m[f["rdst"] : f["rdst"] + 4] == m[f["osrc"] : f["osrc"] + 4]
            m[f["osrc"] : f["osrc"] + 4] = tail
            if was_plain:
                m[f["rdst"] : f["rdst"] + 4] = tail
        parts.append(bytes(m))
    return b"".join(parts)


def baseline(buf: bytes, replica_mask: int) -> list[bytes]:
    """Today's path: Flow objects, then Entry, then the record."""
    out = []
    for ev in ct.parse_messages(buf, len(buf), 1 << MARK_BIT):
        flow = ev.flow
        if flow.mark & replica_mask:
            continue
        o = flow.orig
        if ev.kind == 3:
            out.append(wire.encode_delete(wire.delete_from_key(o)))
        else:
            out.append(wire.encode_entry(wire.entry_from_flow(flow, ev.kind == 1)))
        wire.key_bytes(o.family, o.proto, o.src, o.dst, o.sport, o.dport, o.zone)
    return out


class _GenericOnly(T.EventTranscoder):
    """The transcoder with its layout cache disabled: every message by the generic walk."""

    def _learn(self, *args: object) -> None:
        return None


def median_rate(fn: Callable[[], object], count: int, repeat: int) -> float:
    fn()  # warm-up: layouts compiled, allocator grown
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return count / statistics.median(times)


def bench_events(n: int, repeat: int) -> list[tuple[str, float, float]]:
    rows = []
    buf = make_events(n)
    tr = T.EventTranscoder(MARK_BIT, REPLICA)
    assert tr.transcode(buf, len(buf)).records == baseline(buf, REPLICA), "transcoder disagrees"
    gen = _GenericOnly(MARK_BIT, REPLICA)
    base = median_rate(lambda: baseline(buf, REPLICA), n, repeat)
    rows.append(("events: realistic mix, transcoded (fast)",
                 median_rate(lambda: tr.transcode(buf, len(buf)), n, repeat), base))
    rows.append(("events: realistic mix, generic walk only",
                 median_rate(lambda: gen.transcode(buf, len(buf)), n, repeat), base))
    for shape, names in SHAPES.items():
        msgs = b"".join(bytes.fromhex(EVENTS[x]) for x in names) * (n // 30)
        k = len(names) * (n // 30)
        rows.append((f"events: {shape} (new/update/destroy)",
                     median_rate(lambda msgs=msgs: tr.transcode(msgs, len(msgs)), k, repeat),
                     median_rate(lambda msgs=msgs: baseline(msgs, REPLICA), k, repeat)))
    dump = bytes.fromhex(EVENTS["pkt_tcp_update"])
    # a dump reply layout: status, mark, id, use, timeout, protoinfo (reordered fields)
    from tests.unit.test_ctnetlink_codec import VECTORS_HEX

    dmsg = bytes.fromhex(VECTORS_HEX["dump_mark30"])
    first = struct.unpack_from("=I", dmsg)[0]
    dump = dmsg[:first] * (n // 10)
    rows.append(("dump replies (TCP v4, reordered layout)",
                 median_rate(lambda: tr.transcode(dump, len(dump), dump=True), n // 10, repeat),
                 median_rate(lambda: baseline(dump, REPLICA), n // 10, repeat)))
    filtered = bytes.fromhex(EVENTS["nl_unmarked_destroy"]) * (n // 10)
    rows.append(("events filtered out (no CTA_MARK)",
                 median_rate(lambda: tr.transcode(filtered, len(filtered)), n // 10, repeat),
                 median_rate(lambda: baseline(filtered, REPLICA), n // 10, repeat)))
    return rows


def make_entries(n: int) -> list[wire.Entry]:
    out = []
    for j in range(n):
        a = struct.pack(">I", 0x0A010000 | (j & 0xFFFF))
        b = bytes([10, 2, 0, 1])
        kind = j % 20
        if kind < 10:  # plain TCP
            e = wire.Entry(True, 4, 6, a, b, 1024 + j % 60000, 443, 0, b, a, 443, 1024 + j % 60000, 0,
                           6, 600, 1 << 30, 3)
        elif kind < 13:  # SNAT TCP with port
            e = wire.Entry(True, 4, 6, a, b, 1024 + j % 60000, 443, 0, b, bytes([192, 0, 2, 1]), 443,
                           40000 + j % 20000, 0, 6, 600, 1 << 30, 3)
        elif kind < 14:  # DNAT TCP with port
            e = wire.Entry(True, 4, 6, a, b, 1024 + j % 60000, 80, 0, bytes([192, 168, 1, 5]), a, 8080,
                           1024 + j % 60000, 0, 6, 600, 1 << 30, 3)
        elif kind < 17:  # UDP
            e = wire.Entry(True, 4, 17, a, b, 1024 + j % 60000, 53, 0, b, a, 53, 1024 + j % 60000, 0,
                           2, 30, 1 << 30, 0)
        elif kind < 18:  # ICMP
            e = wire.Entry(True, 4, 1, a, b, j & 0xFFFF, 8 << 8, 0, b, a, j & 0xFFFF, 0, 0, 0, 30, 1 << 30, 0)
        else:  # TCP v6
            a6, b6 = b"\xfd" + bytes(11) + a, b"\xfd" + bytes(14) + b"\x01"
            e = wire.Entry(True, 6, 6, a6, b6, 1024 + j % 60000, 443, 0, b6, a6, 443, 1024 + j % 60000, 0,
                           6, 600, 1 << 30, 3)
        out.append(e)
    return out


def bench_build(n: int, repeat: int) -> list[tuple[str, float, float]]:
    rows = []
    entries = make_entries(n)
    mark, timeout = 0x40000100, 86400
    build, build_create, ffe = T.build_entry, ct.build_create, wire.flow_from_entry

    def fast(create: bool) -> None:
        for i, e in enumerate(entries):
            build(e, i, create=create, mark=mark, timeout=timeout)

    def ref(create: bool) -> None:
        for i, e in enumerate(entries):
            build_create(ffe(e)._replace(mark=mark, timeout=timeout), i, create=create, ack=False)

    rows.append(("build: create, mixed entries", median_rate(lambda: fast(True), n, repeat),
                 median_rate(lambda: ref(True), n, repeat)))
    rows.append(("build: update form, mixed entries", median_rate(lambda: fast(False), n, repeat),
                 median_rate(lambda: ref(False), n, repeat)))
    # The backup's path since the fused builder: the wire records' bytes straight into the
    # requests (plain entries by one unpack and one pack, the rest decoded and templated),
    # against decoding each record and building it.
    payload = b"".join(wire.encode_entry(e) for e in entries)
    how = T.Injection(~0x30000000 & 0xFFFFFFFF, mark, timeout, None, True, None)

    def decoded_then_built() -> None:
        for i, e in enumerate(wire.decode_records(payload)):
            assert isinstance(e, wire.Entry)
            build(e, i, create=True, mark=e.mark & how.mark_and | how.mark_or, timeout=timeout)

    rows.append(("build: from wire bytes (build_records)",
                 median_rate(lambda: T.build_records(payload, 0, 0, how), n, repeat),
                 median_rate(decoded_then_built, n, repeat)))
    zoned = [e._replace(zone=5, rzone=5) for e in entries[: n // 4]]

    def general() -> None:
        for i, e in enumerate(zoned):
            build(e, i, create=True, mark=mark, timeout=timeout)

    rows.append(("build: create, zoned (general path)", median_rate(general, len(zoned), repeat),
                 median_rate(lambda: [build_create(ffe(e)._replace(mark=mark, timeout=timeout), i)
                                      for i, e in enumerate(zoned)], len(zoned), repeat)))
    dels = [wire.Delete(*e[1:8]) for e in entries]
    bd = T.build_entry_delete
    rows.append(("build: delete",
                 median_rate(lambda: [bd(d, i) for i, d in enumerate(dels)], n, repeat),
                 median_rate(lambda: [ct.build_delete(wire.flow_from_entry(e).orig, i)
                                      for i, e in enumerate(entries)], n, repeat)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer events and repeats")
    args = parser.parse_args()
    n, repeat = (30_000, 5) if args.quick else (150_000, 9)
    rows = bench_events(n, repeat) + bench_build(n, repeat)
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'new path':>12}  {'today':>12}  speed-up")
    for name, new, old in rows:
        print(f"{name:{width}}  {new:>10,.0f}/s  {old:>10,.0f}/s  {new / old:6.1f}x")


if __name__ == "__main__":
    main()
