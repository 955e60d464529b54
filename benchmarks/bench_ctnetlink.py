"""Raw ctnetlink vs pyroute2: parse, build, inject, event drain.

Run as root: ``python3 -m benchmarks.bench_ctnetlink [--quick]``. It creates a throwaway
network namespace, re-runs itself inside it (``--inside``) and always removes it. Nothing
leaves the namespace: all entries are injected over netlink, no packets are sent.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from invictusd import flows as F
from invictusd.flows import Flow, FlowKey
from invictusd.io import conntrack as C
from invictusd.io import ctnetlink as ct

MARK30 = 1 << 30
EST = F.IPS_SEEN_REPLY | F.IPS_ASSURED


def make_flows(n: int, base: int = 0) -> list[Flow]:
    """``n`` distinct flows: mostly established IPv4 TCP, some UDP, IPv6 and ICMP."""
    out = []
    for j in range(base, base + n):
        a, b, c = j >> 16 & 0xFF, j >> 8 & 0xFF, j & 0xFF
        kind = j % 20
        if kind < 16:
            key = FlowKey(4, F.IPPROTO_TCP, bytes([10, 1, a, b]), bytes([10, 2, 0, 1]), 1024 + c, 443)
            out.append(Flow(key, F.inverse(key), 0, EST, 600, MARK30, F.TCP_ESTABLISHED))
        elif kind < 18:
            key = FlowKey(4, F.IPPROTO_UDP, bytes([10, 3, a, b]), bytes([10, 2, 0, 1]), 1024 + c, 53)
            out.append(Flow(key, F.inverse(key), 0, F.IPS_SEEN_REPLY, 30, MARK30, 0))
        elif kind < 19:
            key = FlowKey(
                6,
                F.IPPROTO_TCP,
                bytes([0xFD] + [0] * 12 + [a, b, c]),
                bytes([0xFD] + [0] * 14 + [1]),
                40000,
                443,
            )
            out.append(Flow(key, F.inverse(key), 0, EST, 600, MARK30, F.TCP_ESTABLISHED))
        else:
            key = FlowKey(4, F.IPPROTO_ICMP, bytes([10, 4, a, b]), bytes([10, 2, 0, 1]), c, 8 << 8)
            out.append(Flow(key, F.inverse(key), 0, 0, 30, MARK30, 0))
    return out


def best_of(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: the first call pays for caches and allocator growth
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def capture_events(n: int) -> list[bytes]:
    """Real NEW and DESTROY event datagrams for ``n`` injected flows."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, C.NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, C.SO_RCVBUFFORCE, 256 << 20)
    sock.bind((0, 0))
    for group in (1, 2, 3):
        sock.setsockopt(C.SOL_NETLINK, C.NETLINK_ADD_MEMBERSHIP, group)
    flows = make_flows(n, base=1 << 20)
    datagrams: list[bytes] = []
    with C.Injector() as inj:
        inj.commit(flows)
        inj.delete(flows)
    while True:
        try:
            datagrams.append(sock.recv(1 << 16))
        except BlockingIOError:
            break
    sock.close()
    return datagrams


Row = tuple[str, str, str, str]


def fmt_rate(count: float, seconds: float) -> str:
    return f"{count / seconds:,.0f}/s" if seconds > 0 else "-"


def inside(quick: bool) -> None:
    rows: list[Row] = []
    C.set_conntrack_events(1)

    # --- parse -----------------------------------------------------------------------------
    datagrams = capture_events(500 if quick else 2000)
    buf = b"".join(d + b"\0" * (-len(d) % 4) for d in datagrams)
    n_msgs = len(ct.parse_messages(buf))
    reps = 3 if quick else 7
    t = best_of(lambda: ct.parse_messages(buf), reps)
    t_match = best_of(lambda: ct.parse_messages(buf, mark_mask=MARK30), reps)
    t_none = best_of(lambda: ct.parse_messages(buf, mark_mask=1 << 29), reps)
    t_each = best_of(lambda: [ct.parse_messages(d) for d in datagrams], reps)
    us = t / n_msgs * 1e6
    rows.append(("parse events (batched buffer)", fmt_rate(n_msgs, t), "", f"{us:.1f} us/ev"))
    rows.append(("parse, one call per datagram", fmt_rate(n_msgs, t_each), "", ""))
    rows.append(("parse, mark filter passes all", fmt_rate(n_msgs, t_match), "", ""))
    rows.append(("parse, mark filter drops all", fmt_rate(n_msgs, t_none), "", ""))

    from pyroute2.conntrack import ConntrackEntry
    from pyroute2.netlink.nfnetlink.nfctsocket import AsyncNFCTSocket

    py_sock = AsyncNFCTSocket()
    sample = b"".join(datagrams[: 300 if quick else 1000])
    n_sample = len(ct.parse_messages(sample))
    marshal = py_sock.marshal
    t_py = best_of(lambda: list(marshal.parse(sample)), 3)

    def py_entries() -> None:
        for x in marshal.parse(sample):
            ConntrackEntry(
                x["nfgen_family"],
                x.get_attr("CTA_TUPLE_ORIG"),
                x.get_attr("CTA_TUPLE_REPLY"),
                x.get_attr("CTA_STATUS"),
                x.get_attr("CTA_TIMEOUT"),
                x.get_attr("CTA_PROTOINFO"),
                x.get_attr("CTA_MARK"),
                x.get_attr("CTA_ID"),
                x.get_attr("CTA_USE"),
                x.get_attr("CTA_ZONE"),
            )

    t_py_e = best_of(py_entries, 3)
    py_sock.close()
    rows[0] = (
        rows[0][0],
        rows[0][1],
        fmt_rate(n_sample, t_py),
        f"{us:.1f} vs {t_py / n_sample * 1e6:.0f} us/ev",
    )
    rows.append(("pyroute2 parse + ConntrackEntry", "", fmt_rate(n_sample, t_py_e), ""))

    # --- build -----------------------------------------------------------------------------
    bflows = make_flows(20_000 if quick else 100_000)
    t_build = best_of(lambda: [ct.build_create(f, i) for i, f in enumerate(bflows)], 3)
    rows.append(("build create messages (no kernel)", fmt_rate(len(bflows), t_build), "", ""))

    # --- inject ----------------------------------------------------------------------------
    sizes = (10_000,) if quick else (10_000, 100_000)
    with C.Injector() as inj:
        for n in sizes:
            fl = make_flows(n)
            r1 = inj.commit(fl)
            r2 = inj.commit(fl)
            r3 = inj.delete(fl)
            assert r1.created == n and r2.updated == n and r3.deleted == n, (r1, r2, r3)
            build_s = best_of(lambda fl=fl: [ct.build_create(f, i) for i, f in enumerate(fl)], 1)
            rows.append(
                (
                    f"commit {n:,} new (build+send+acks)",
                    fmt_rate(n, r1.duration_s),
                    "",
                    f"kernel part ~{n / max(r1.duration_s - build_s, 1e-9):,.0f}/s",
                )
            )
            rows.append((f"commit {n:,} existing (EEXIST->update)", fmt_rate(n, r2.duration_s), "", ""))
            rows.append((f"delete {n:,}", fmt_rate(n, r3.duration_s), "", ""))

    # pyroute2 equivalent, one request per entry.
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    n_py = 300 if quick else 1000
    py_flows = [f for f in make_flows(n_py * 2) if f.orig.family == 4 and f.orig.proto == 6]
    py_flows = py_flows[:n_py]

    def attr_tuple(k: FlowKey) -> NFCTAttrTuple:
        return NFCTAttrTuple(
            saddr=socket.inet_ntoa(k.src),
            daddr=socket.inet_ntoa(k.dst),
            proto=k.proto,
            sport=k.sport,
            dport=k.dport,
        )

    with Conntrack() as pct:
        t0 = time.perf_counter()
        for f in py_flows:
            pct.entry(
                "add",
                timeout=f.timeout,
                mark=f.mark,
                status=f.status | F.IPS_CONFIRMED,
                tuple_orig=attr_tuple(f.orig),
                tuple_reply=attr_tuple(f.reply),
            )
        t_add = time.perf_counter() - t0
        for f in py_flows:
            pct.entry("del", tuple_orig=attr_tuple(f.orig))
    rows.append((f"pyroute2 entry('add') x{n_py}", "", fmt_rate(n_py, t_add), ""))

    # --- events end to end -----------------------------------------------------------------
    n_ev = 10_000 if quick else 50_000
    fl = make_flows(n_ev, base=2 << 20)
    with C.EventSocket(rcvbuf_bytes=256 << 20, mark_bit=30) as es, C.Injector() as inj:
        inj.commit(fl)
        got = 0
        t0 = time.perf_counter()
        while True:
            batch = es.read()
            if not batch:
                break
            got += len(batch)
        t_drain = time.perf_counter() - t0
        inj.delete(fl)
    rows.append(
        (
            f"drain {n_ev:,} queued events (recv+parse)",
            fmt_rate(got, t_drain),
            "",
            f"{got} read, overruns {es.overruns}",
        )
    )

    width = [max(len(r[i]) for r in [*rows, ("metric", "invictusd raw", "pyroute2", "note")])
             for i in range(4)]  # fmt: skip
    header = ("metric", "invictusd raw", "pyroute2", "note")
    print(" | ".join(h.ljust(w) for h, w in zip(header, width, strict=True)))
    print("-+-".join("-" * w for w in width))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, width, strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (~10 s)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args.quick)
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces, netlink)", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests import nsutil

    with nsutil.netns("bench") as ns:
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "benchmarks.bench_ctnetlink", "--inside"] + (
            ["--quick"] if args.quick else []
        )
        env = dict(os.environ, PYTHONPATH=str(root))
        return subprocess.run(cmd, cwd=root, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
