"""Create and destroy marked conntrack entries in the current namespace (run with ip netns exec).

``python3 -m tests.netns.churn --create 3000 --delete 1000 --seed 1 [--mark-bit 30]``
Entries are TCP ESTABLISHED between synthetic client addresses and the lab server, created
through ctnetlink (they raise NEW events exactly like packet-created ones). Prints JSON.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import time

from invictusd import flows as F
from invictusd.io.conntrack import Injector


def make_flows(count: int, seed: int, mark: int, base: str = "10.10.128.0") -> list[F.Flow]:
    rng = random.Random(seed)
    start = int(ipaddress.IPv4Address(base))
    server = ipaddress.IPv4Address("10.20.0.100").packed
    out = []
    for i in range(count):
        src = ipaddress.IPv4Address(start + (i % 30000)).packed
        key = F.FlowKey(4, F.IPPROTO_TCP, src, server, 1024 + rng.randrange(60000), 9001)
        out.append(F.Flow(key, F.inverse(key), 0, F.IPS_SEEN_REPLY | F.IPS_ASSURED, 3600, mark,
                          F.TCP_ESTABLISHED))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--create", type=int, default=0)
    ap.add_argument("--delete", type=int, default=0, help="delete this many of the created")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mark-bit", type=int, default=30)
    ap.add_argument("--unmarked", action="store_true")
    ap.add_argument("--batch", type=int, default=0, help="create in batches of this size")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds between batches")
    a = ap.parse_args()
    mark = 0 if a.unmarked else 1 << a.mark_bit
    flows = make_flows(a.create, a.seed, mark)
    t0 = time.perf_counter()
    created = failed = 0
    with Injector() as inj:
        step = a.batch or max(len(flows), 1)
        for i in range(0, len(flows), step):
            r = inj.commit(flows[i : i + step])
            created += r.created + r.updated
            failed += r.failed
            if a.pause:
                time.sleep(a.pause)
        rng = random.Random(a.seed + 1)
        doomed = rng.sample(flows, min(a.delete, len(flows)))
        d = inj.delete(doomed)
    print(json.dumps({"created": created, "failed": failed, "deleted": d.deleted,
                      "seconds": round(time.perf_counter() - t0, 3)}))


if __name__ == "__main__":
    main()
