"""Throughput of the sync codec and session: ``python3 -m benchmarks.bench_sync_codec``.

Prints records/s for the bare codec, and conntrack events/s through the whole sender
(session bookkeeping + encoding + MAC) and receiver (MAC + decoding + applying), with the
bytes on the wire per event. Single core, pure Python.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Callable

from invictusd.flows import (
    IPPROTO_TCP,
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT,
    TCP_CLOSE,
    TCP_ESTABLISHED,
    TCP_SYN_SENT,
    EventKind,
    Flow,
    FlowEvent,
    FlowKey,
    inverse,
)
from invictusd.sync.session import SessionConfig, SyncSession
from invictusd.sync.wire import (
    DatagramBuilder,
    DatagramType,
    Header,
    decode_datagram,
    encode_full,
    encode_update,
)

KEY = b"k" * 32


def make_flows(n: int, nat_share: float, rng: random.Random) -> list[Flow]:
    flows = []
    for i in range(n):
        orig = FlowKey(
            4, IPPROTO_TCP, bytes([10, 1, i >> 8 & 0xFF, i & 0xFF]),
            bytes([192, 0, 2, rng.randrange(256)]), rng.randrange(1024, 65536), 443,
        )  # fmt: skip
        reply = inverse(orig)
        status = IPS_CONFIRMED
        if rng.random() < nat_share:
            reply = reply._replace(dst=bytes([203, 0, 113, 1]), dport=rng.randrange(1024, 65536))
            status |= IPS_SRC_NAT
        flows.append(Flow(orig, reply, rng.getrandbits(32), status, 120, 0x40000000, TCP_SYN_SENT))
    return flows


def rate(label: str, count: int, fn: Callable[[], object], unit: str = "records") -> float:
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    r = count / dt
    print(f"  {label:<44} {r:>12,.0f} {unit}/s  ({1e6 / r:.2f} us each)")
    return r


def bench_codec(flows: list[Flow]) -> None:
    print("codec (IPv4 TCP, no NAT unless said):")
    plain = [f for f in flows if not f.status & IPS_SRC_NAT]
    nat = [f for f in flows if f.status & IPS_SRC_NAT]
    rate("encode FULL", len(plain), lambda: [encode_full(f) for f in plain])
    if nat:
        rate("encode FULL with SNAT", len(nat), lambda: [encode_full(f) for f in nat])
    rate("encode UPDATE", len(flows),
         lambda: [encode_update(f.ct_id, 1, 14, 431999, f.mark, 3) for f in flows])  # fmt: skip
    recs = [encode_full(f) for f in plain]
    datagrams: list[bytes] = []

    def pack() -> None:
        b = DatagramBuilder()
        h = Header(DatagramType.DATA, 1, 2, 3, 4, 5)
        for r in recs:
            if not b.add(r):
                datagrams.append(b.finish(h, KEY))
                b.add(r)
        datagrams.append(b.finish(h, KEY))

    rate("pack + HMAC into 1400-byte datagrams", len(recs), pack)
    rate("HMAC check + decode FULL", len(recs), lambda: [decode_datagram(d, KEY) for d in datagrams])
    print(f"  FULL record {len(recs[0])} bytes, {len(recs) / len(datagrams):.1f} per datagram, "
          f"{sum(map(len, datagrams)) / len(recs):.1f} wire bytes per record")  # fmt: skip


def bench_session(flows: list[Flow], batch: int) -> None:
    print(f"session, lossless, {batch} events per batch "
          "(each flow: NEW, 2 UPDATEs, DESTROY):")  # fmt: skip
    a = SyncSession(SessionConfig(1, KEY), epoch=0xA, now=0.0)
    b = SyncSession(SessionConfig(2, KEY), epoch=0xB, now=0.0)
    now = 0.0
    sender_time = receiver_time = 0.0

    def exchange() -> None:
        nonlocal sender_time, receiver_time, now
        for _ in range(3):
            t0 = time.perf_counter()
            out_a = a.datagrams_to_send(now)
            t1 = time.perf_counter()
            for d in out_a:
                b.datagram_received(d, now)
            out_b = b.datagrams_to_send(now)
            t2 = time.perf_counter()
            for d in out_b:
                a.datagram_received(d, now)
            t3 = time.perf_counter()
            sender_time += (t1 - t0) + (t3 - t2)
            receiver_time += t2 - t1
            if not out_a and not out_b:
                break

    for s in (a, b):
        s.timer(now)
    exchange()
    rng = random.Random(2)
    events: list[FlowEvent] = []
    for f in flows:
        est = f._replace(status=f.status | IPS_SEEN_REPLY | IPS_ASSURED, tcp_state=TCP_ESTABLISHED,
                         timeout=432000)  # fmt: skip
        events.append(FlowEvent(EventKind.NEW, f))
        events.append(FlowEvent(EventKind.UPDATE, est))
        events.append(FlowEvent(EventKind.UPDATE, est._replace(tcp_state=TCP_CLOSE, timeout=10)))
        events.append(FlowEvent(EventKind.DESTROY, est._replace(tcp_state=TCP_CLOSE)))
    # interleave flows like real traffic: a window of concurrent connections
    window = 2000
    stream: list[FlowEvent] = []
    for start in range(0, len(flows), window):
        chunk = events[start * 4 : (start + window) * 4]
        per_flow = [chunk[i : i + 4] for i in range(0, len(chunk), 4)]
        pos = [0] * len(per_flow)
        live = list(range(len(per_flow)))
        while live:
            j = rng.randrange(len(live))
            k = live[j]
            stream.append(per_flow[k][pos[k]])
            pos[k] += 1
            if pos[k] == 4:
                live[j] = live[-1]
                live.pop()
    bytes0 = a.counters["tx_bytes"]
    for i in range(0, len(stream), batch):
        now += 0.001
        t0 = time.perf_counter()
        a.local_events(stream[i : i + batch], now)
        sender_time += time.perf_counter() - t0
        exchange()
        a.timer(now)
        b.timer(now)
    now += 0.1
    a.timer(now)
    exchange()
    assert a.local_flows() == b.peer_flows(), "tables differ"
    n = len(stream)
    sent = a.counters["tx_bytes"] - bytes0
    print(f"  {'sender: events + encode + HMAC + acks':<44} {n / sender_time:>12,.0f} events/s  "
          f"({1e6 * sender_time / n:.2f} us each)")  # fmt: skip
    print(f"  {'receiver: HMAC + decode + apply':<44} {n / receiver_time:>12,.0f} events/s  "
          f"({1e6 * receiver_time / n:.2f} us each)")  # fmt: skip
    print(f"  {'both ends on one core':<44} {n / (sender_time + receiver_time):>12,.0f} events/s")
    print(f"  wire: {sent / n:.1f} bytes per event, {a.counters['tx_datagrams']} datagrams, "
          f"{a.counters['tx_records'] / max(1, a.counters['tx_datagrams']):.1f} records each "
          f"(events coalesced per flow while a datagram fills)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--flows", type=int, default=50_000)
    p.add_argument("--nat", type=float, default=0.2, help="share of SNAT flows")
    p.add_argument("--batch", type=int, default=64, help="events per local_events call")
    p.add_argument(
        "--gc-threshold",
        type=int,
        default=0,
        help="gc generation-0 threshold (0: Python's default); decoding allocates many small "
        "tuples, so the default collector costs up to ~3x on decode",
    )
    args = p.parse_args()
    if args.gc_threshold:
        gc.set_threshold(args.gc_threshold, 20, 20)
    flows = make_flows(args.flows, args.nat, random.Random(1))
    bench_codec(flows)
    bench_session(flows, args.batch)


if __name__ == "__main__":
    main()
