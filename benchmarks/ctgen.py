"""Conntrack load generator, run inside a firewall's namespace by the benchmark.

``python3 -m benchmarks.ctgen burst --count N [--base B] [--kind create|update|delete] [--timeout S]``
    Creates (or updates, or deletes) N marked IPv4 TCP entries over ctnetlink as fast as the
    machine allows: all messages are built before the clock starts, then sent in large
    batches by ``Injector``. Prints one JSON line: t_start/t_end (CLOCK_MONOTONIC, shared by
    all namespaces), ok, failed, rate.
``python3 -m benchmarks.ctgen steady --rate R --pool P --base B``
    Background load: P entries created first, then UPDATE events at R per second (batches
    every 10 ms) until SIGTERM. Prints ``READY`` once the pool exists.
``python3 -m benchmarks.ctgen probe --base B``
    For each line read on stdin creates one new entry and prints the monotonic time at which
    the kernel acknowledged it; the benchmark times how long the backup takes to hold it.

Entries created through ctnetlink raise NEW/UPDATE/DESTROY events exactly like packets do,
which is what both conntrackd and invictusd listen to.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from invictusd import flows as F
from invictusd.flows import Flow, FlowKey
from invictusd.io import conntrack as C
from invictusd.io import ctnetlink as ct

MARK = 1 << 30
EST = F.IPS_SEEN_REPLY | F.IPS_ASSURED
DST = bytes([10, 20, 7, 7])


def make_flows(n: int, base: int = 0, tcp_state: int = F.TCP_ESTABLISHED, timeout: int = 600) -> list[Flow]:
    """``n`` distinct established IPv4 TCP flows (10.1.x.y:port -> 10.20.7.7:443), marked."""
    out = []
    for j in range(base, base + n):
        key = FlowKey(4, F.IPPROTO_TCP, bytes([10, 1, j >> 8 & 0xFF, j & 0xFF]), DST,
                      1024 + (j >> 16), 443)
        out.append(Flow(key, F.inverse(key), 0, EST, timeout, MARK, tcp_state))
    return out


def _send(inj: C.Injector, msgs: list[bytes], base: int) -> int:
    # The injector's batched sender, fed prebuilt messages so that building them is not timed.
    return len(inj.run(msgs, base))


def _build(inj: C.Injector, flows: list[Flow], kind: str) -> tuple[list[bytes], int]:
    base = inj.next_seqs(len(flows))
    if kind == "create":
        msgs = [ct.build_create(f, base + i, ack=False) for i, f in enumerate(flows)]
    elif kind == "update":
        msgs = [ct.build_create(f, base + i, create=False, with_status=False, ack=False)
                for i, f in enumerate(flows)]
    else:
        msgs = [ct.build_delete(f, base + i, ack=False) for i, f in enumerate(flows)]
    return msgs, base


def burst(count: int, base: int, kind: str, timeout: int = 3600) -> dict[str, float]:
    state = F.TCP_CLOSE_WAIT if kind == "update" else F.TCP_ESTABLISHED
    flows = make_flows(count, base, tcp_state=state, timeout=timeout - 100 if kind == "update" else timeout)
    with C.Injector(batch_bytes=256 * 1024) as inj:
        msgs, seq = _build(inj, flows, kind)
        t0 = time.monotonic()
        failed = _send(inj, msgs, seq)
        t1 = time.monotonic()
    return {"t_start": t0, "t_end": t1, "ok": count - failed, "failed": failed,
            "rate": count / max(t1 - t0, 1e-9)}


def steady(rate: float, pool: int, base: int) -> None:
    stop = False

    def on_term(_s: int, _f: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    flows = make_flows(pool, base)
    with C.Injector() as inj:
        msgs, seq = _build(inj, flows, "create")
        _send(inj, msgs, seq)
        print("READY", flush=True)
        tick = 0.01
        per_tick = max(1, round(rate * tick))
        states = (F.TCP_ESTABLISHED, F.TCP_CLOSE_WAIT)
        i = 0
        next_t = time.monotonic()
        sent = 0
        while not stop:
            chunk = [flows[(i + k) % pool] for k in range(per_tick)]
            state = states[(i // pool) % 2]
            chunk = [f._replace(tcp_state=state) for f in chunk]
            i += per_tick
            m, s = _build(inj, chunk, "update")
            _send(inj, m, s)
            sent += len(chunk)
            next_t += tick
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.monotonic()
        print(json.dumps({"updates": sent}), flush=True)


def probe(base: int) -> None:
    with C.Injector() as inj:
        j = base
        for _line in sys.stdin:
            flows = make_flows(1, j)
            j += 1
            m, s = _build(inj, flows, "create")
            failed = _send(inj, m, s)
            print(json.dumps({"t": time.monotonic(), "failed": failed}), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.ctgen")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("burst")
    b.add_argument("--count", type=int, required=True)
    b.add_argument("--base", type=int, default=0)
    b.add_argument("--kind", choices=["create", "update", "delete"], default="create")
    b.add_argument("--timeout", type=int, default=3600,
                   help="seconds the entries live (the benchmark's samples must end before)")
    s = sub.add_parser("steady")
    s.add_argument("--rate", type=float, required=True)
    s.add_argument("--pool", type=int, default=2000)
    s.add_argument("--base", type=int, default=0)
    r = sub.add_parser("probe")
    r.add_argument("--base", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "burst":
        print(json.dumps(burst(a.count, a.base, a.kind, a.timeout)), flush=True)
    elif a.cmd == "steady":
        steady(a.rate, a.pool, a.base)
    else:
        probe(a.base)


if __name__ == "__main__":
    main()
