"""What one conntrack insertion costs the kernel, alone and with an event listener elsewhere.

Run: ``sudo python3 -m benchmarks.bench_inject [--count N] [--reps R]`` (two namespaces it
creates and deletes). A child process in namespace A creates N marked TCP entries through
``Injector`` (512 requests per send, as the applier does) and reports its CPU time per entry;
first with no conntrack event listener anywhere, then with one subscribed in namespace B.

Why: the benchmark lab runs both firewalls on one kernel, and the kernel's "is anyone
listening to conntrack events?" test (``nfnetlink_has_listeners``) reads a mask that is
global to the netlink protocol, not per namespace. The master listening on fw1 therefore
makes the kernel build (and drop) an event for every entry the backup injects on fw2, which
two real machines never do. This measures that share of the backup's system time.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import statistics
import subprocess
import sys
import time

from invictusd.lab import netns


def _child_inject(count: int) -> None:
    from invictusd.io.conntrack import Injector
    from invictusd.io.transcode import build_entry
    from invictusd.sync import wire

    server = bytes([10, 2, 0, 1])
    entries = []
    for j in range(count):
        a = bytes([10, 1, j >> 8 & 255, j & 255])
        entries.append(wire.Entry(True, 4, 6, a, server, 1024 + j % 60000, 443 + j // 60000, 0, server, a,
                                  443 + j // 60000, 1024 + j % 60000, 0, 6, 600, 1 << 30, 3))
    inj = Injector()
    base = inj.next_seqs(count)
    msgs = [build_entry(e, base + i, create=True, mark=3 << 29, timeout=86400) for i, e in enumerate(entries)]
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    failed = sum(len(inj.run(msgs[s : s + 512], base + s)) for s in range(0, count, 512))
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"per_s": count / (t1 - t0), "failed": failed,
                      "sys_us": (r1.ru_stime - r0.ru_stime) / count * 1e6,
                      "user_us": (r1.ru_utime - r0.ru_utime) / count * 1e6}))


def _child_listen() -> None:
    from invictusd.io.conntrack import EventSocket

    sock = EventSocket(rcvbuf_bytes=1 << 20, subscribe=True)
    print("listening", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del sock


def _inject(ns: str, count: int) -> dict[str, float]:
    netns.ns_exec(ns, "conntrack", "-F", check=False)
    out = netns.ns_exec(ns, sys.executable, "-m", "benchmarks.bench_inject", "--child", "inject",
                        "--count", str(count), timeout=300)
    res: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    if res["failed"]:
        raise SystemExit(f"{res['failed']} of {count} insertions failed")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--child", choices=["inject", "listen"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child == "inject":
        return _child_inject(a.count)
    if a.child == "listen":
        return _child_listen()
    netns.exit_on_signals()
    with netns.netns("ivdinj") as ns_a, netns.netns("ivdlis") as ns_b:
        alone = [_inject(ns_a, a.count) for _ in range(a.reps)]
        listener = subprocess.Popen(netns.ns_argv(ns_b, [sys.executable, "-m", "benchmarks.bench_inject",
                                                         "--child", "listen"]),
                                    stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
            heard = [_inject(ns_a, a.count) for _ in range(a.reps)]
        finally:
            listener.terminate()
            listener.wait(10)
    print(f"{'kernel insertion of ' + format(a.count, ',') + ' entries (median of ' + str(a.reps) + ')':<58}"
          f"{'system us/entry':>16}{'entries/s':>12}")
    for name, rows in (("no listener anywhere", alone), ("a listener in another namespace", heard)):
        print(f"{name:<58}{statistics.median(r['sys_us'] for r in rows):>16.2f}"
              f"{statistics.median(r['per_s'] for r in rows):>12,.0f}")


if __name__ == "__main__":
    main()
