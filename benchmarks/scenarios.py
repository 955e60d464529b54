"""The measurements of issue 4, one function per kind of sample.

Each function starts the stack it is given, measures, checks that the run was valid (every
entry arrived, the generator reported no failure, the commit put the table in the kernel,
the stack started) and always tears the stack down and resets the lab. Anything invalid raises
``Invalid``: the caller must print no figure from such a run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.stacks import Stack, StackError, vips_on, wait_until
from invictusd.lab.topology import Lab

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Invalid(RuntimeError):
    """The run cannot yield a figure (entries missing, a stack not started, ...)."""


# -- probes on processes and interfaces --------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def sync_bytes(lab: Lab, node: str) -> int:
    """Bytes sent plus received on the sync interface of ``node`` (both directions: acks too)."""
    data = json.loads(lab.exec(node, "ip", "-s", "-j", "link", "show", lab.config.sync_if))
    st = data[0]["stats64"]
    return int(st["rx"]["bytes"]) + int(st["tx"]["bytes"])


def kernel_count(lab: Lab, node: str) -> int:
    return int(lab.exec(node, "conntrack", "-C").strip() or 0)


def daemon_cpu(stack: Stack) -> dict[str, float]:
    return {f"{node}/{name}": cpu_seconds(pid) for node in ("fw1", "fw2")
            for name, pid in stack.pids(node).items()}


def daemon_rss(stack: Stack) -> dict[str, float]:
    return {f"{node}/{name}": peak_rss_mb(pid) for node in ("fw1", "fw2")
            for name, pid in stack.pids(node).items()}


def reset_lab(lab: Lab) -> None:
    """Links up, no VIP anywhere, empty conntrack tables (no daemon may be running)."""
    c = lab.config
    for node in ("fw1", "fw2"):
        for ifn in (c.lan_if, c.wan_if, c.sync_if):
            lab.link_set(node, ifn, True)
        lab.del_vips(node)
        lab.ct_flush(node)
    for node in ("client", "server"):
        lab.neigh_flush(node)


def gen(lab: Lab, *args: str, timeout: float = 600) -> dict[str, Any]:
    """Run ``benchmarks.ctgen`` in fw1 to completion; its JSON result."""
    p = lab.python("fw1", "-m", "benchmarks.ctgen", *args, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise Invalid(f"generator {' '.join(args)} exited {p.returncode}: {err[-2000:]}")
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if res.get("failed"):
        raise Invalid(f"generator {' '.join(args)}: {res['failed']} entries failed")
    return res


def wait_quiet(lab: Lab, node: str, quiet_s: float = 0.5, noise: int = 400, timeout: float = 60) -> int:
    """Wait until the sync link carries less than ``noise`` bytes for ``quiet_s``."""
    deadline = time.monotonic() + timeout
    last = sync_bytes(lab, node)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = sync_bytes(lab, node)
        if now - last < noise:
            return now
        last = now
    raise Invalid(f"sync link of {node} never went quiet")


def _stack_start(stack: Stack) -> None:
    try:
        stack.start()
    except StackError as e:
        raise Invalid(str(e)) from e


# -- (0) the generator alone -------------------------------------------------------------------


def generator_alone(lab: Lab, size: int) -> dict[str, Any]:
    reset_lab(lab)
    res = gen(lab, "burst", "--count", str(size))
    got = kernel_count(lab, "fw1")
    lab.ct_flush("fw1")
    if got < size:
        raise Invalid(f"generator alone: {got} of {size} entries in the kernel")
    return {"size": size, "rate": res["rate"], "seconds": res["t_end"] - res["t_start"]}


# -- (1)(2)(4)(5) replication burst, takeover, bytes, CPU/RSS --------------------------------------


def replication(lab: Lab, stack: Stack, size: int, *, update_delete: bool) -> dict[str, Any]:
    """Burst of ``size`` new marked entries on fw1; time until fw2 holds them all; then
    (optionally) an update and a delete burst for bytes per entry; then the takeover."""
    reset_lab(lab)
    _stack_start(stack)
    try:
        r: dict[str, Any] = {"stack": stack.name, "size": size}
        before = stack.peer_count("fw2")
        if before is None or before != 0:
            raise Invalid(f"{stack.name}: fw2 holds {before} peer entries before the burst")
        cpu0 = daemon_cpu(stack)
        b0 = sync_bytes(lab, "fw1")
        p = lab.python("fw1", "-m", "benchmarks.ctgen", "burst", "--count", str(size),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        limit = time.monotonic() + max(60.0, size / 1000)
        count: int | None = 0
        while True:
            count = stack.peer_count("fw2")
            if count is not None and count >= size:
                t_done = time.monotonic()
                break
            if time.monotonic() > limit:
                raise Invalid(f"{stack.name}: fw2 holds {count} of {size} entries after "
                              f"{max(60.0, size / 1000):.0f} s")
            time.sleep(0.01)
        out, err = p.communicate(timeout=60)
        if p.returncode != 0:
            raise Invalid(f"generator exited {p.returncode}: {err[-2000:]}")
        g = json.loads(out.strip().splitlines()[-1])
        if g["failed"]:
            raise Invalid(f"generator: {g['failed']} of {size} entries failed")
        if count != size:
            raise Invalid(f"{stack.name}: fw2 holds {count} entries, expected {size}")
        cpu1 = daemon_cpu(stack)
        seconds = t_done - g["t_start"]
        r.update(seconds=seconds, events_per_s=size / seconds, generator_rate=g["rate"],
                 cpu_s={k: round(cpu1.get(k, 0) - v, 3) for k, v in cpu0.items()},
                 peak_rss_mb={k: round(v, 1) for k, v in daemon_rss(stack).items()})
        b1 = wait_quiet(lab, "fw1")
        r["bytes_per_new"] = (b1 - b0) / size
        if update_delete:
            gen(lab, "burst", "--count", str(size), "--kind", "update")
            b2 = wait_quiet(lab, "fw1")
            r["bytes_per_update"] = (b2 - b1) / size
            gen(lab, "burst", "--count", str(size), "--kind", "delete")
            wait_until(lambda: stack.peer_count("fw2") == 0, 60, f"{stack.name}: deletes replicated")
            b3 = wait_quiet(lab, "fw1")
            r["bytes_per_destroy"] = (b3 - b2) / size
            gen(lab, "burst", "--count", str(size))
            wait_until(lambda: (stack.peer_count("fw2") or 0) >= size, 120,
                       f"{stack.name}: second burst replicated")
        # A master too busy to advertise loses mastership under the burst (a false takeover):
        # a finding, recorded; the takeover below is measured once fw1 is master again.
        r["false_takeover"] = stack.backup_took_over()
        try:
            stack.wait_master("fw1", 20)
            # (2) takeover: from the decision on fw2 until the table is in fw2's kernel.
            r["takeover_s"] = stack.takeover(size)
        except StackError as e:
            raise Invalid(str(e)) from e
        in_kernel = kernel_count(lab, "fw2")
        if in_kernel < size:
            raise Invalid(f"{stack.name}: takeover put {in_kernel} of {size} entries in fw2's kernel")
        r["committed"] = in_kernel
        return r
    finally:
        stack.close()


# -- (1b) lag of single updates under background load ------------------------------------------


def lag(lab: Lab, stack: Stack, probes: int, rate: float = 2000, pool: int = 2000) -> dict[str, Any]:
    reset_lab(lab)
    _stack_start(stack)
    bg = probe = None
    try:
        bg = lab.python("fw1", "-m", "benchmarks.ctgen", "steady", "--rate", str(rate), "--pool",
                        str(pool), "--base", "1000000", stdout=subprocess.PIPE, text=True)
        assert bg.stdout is not None
        if bg.stdout.readline().strip() != "READY":
            raise Invalid("background generator did not start")
        wait_until(lambda: stack.peer_count("fw2") == pool, 30, f"{stack.name}: background pool")
        probe = lab.python("fw1", "-m", "benchmarks.ctgen", "probe", "--base", "2000000",
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert probe.stdin is not None and probe.stdout is not None
        lags = []
        for k in range(probes):
            probe.stdin.write("\n")
            probe.stdin.flush()
            got = json.loads(probe.stdout.readline())
            if got["failed"]:
                raise Invalid("probe entry failed")
            want = pool + k + 1
            deadline = got["t"] + 10
            while True:
                c = stack.peer_count("fw2")
                now = time.monotonic()
                if c is not None and c >= want:
                    break
                if now > deadline:
                    raise Invalid(f"{stack.name}: probe {k} never reached fw2 ({c} < {want})")
            lags.append(now - got["t"])
            time.sleep(random.uniform(0.01, 0.03))
        lags.sort()
        return {"stack": stack.name, "probes": probes, "background_rate": rate,
                "p50_ms": 1000 * lags[len(lags) // 2],
                "p99_ms": 1000 * lags[min(len(lags) - 1, int(len(lags) * 0.99))],
                "max_ms": 1000 * lags[-1]}
    finally:
        for proc in (probe, bg):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        stack.close()


# -- (3) failover gap ---------------------------------------------------------------------------


def failover(lab: Lab, stack: Stack, kind: str) -> dict[str, Any]:
    reset_lab(lab)
    _stack_start(stack)
    streams = {}
    try:
        streams = lab.start_streams("tcp", interval=0.015, dead_after=20.0)
        wait_until(lambda: (stack.peer_count("fw2") or 0) >= 2, 10, f"{stack.name}: streams replicated")
        time.sleep(1.0)
        both = {lab.config.lan_vip, lab.config.wan_vip}
        t_fault = time.monotonic()
        stack.fault(kind)
        try:
            wait_until(lambda: vips_on(lab, "fw2") == both, 20, f"{stack.name}: fw2 owning the VIPs",
                       step=0.005)
        except StackError as e:
            raise Invalid(str(e)) from e
        t_vip = time.monotonic() - t_fault
        # TCP retransmits back off exponentially: after a few seconds of outage the next try
        # may come several seconds after the new master is ready. Wait for it (bounded).
        deadline = t_fault + 25.0
        while time.monotonic() < deadline:
            time.sleep(0.25)
            try:
                snaps = [s.snapshot() for s in streams.values()]
            except TimeoutError:
                continue  # a client busy retransmitting; ask again
            if all(any(a[2] > t_fault for a in fr.acks) or fr.error for fr in snaps):
                break
        time.sleep(0.5)
        res: dict[str, Any] = {"stack": stack.name, "fault": kind, "vip_s": t_vip, "streams": {}}
        for name, s in streams.items():
            fr = s.stop()
            times = sorted(a[2] for a in fr.acks)
            # The worst silence the fault caused: the longest interval between two echoes
            # that ends after the fault (the silence may start a little after it, while the
            # fault is still being applied). None: no echo came back after the fault.
            ends = [(t1 - t0) for t0, t1 in itertools.pairwise(times) if t1 > t_fault]
            first_after = next((t for t in times if t > t_fault), None)
            gap = max(ends) if ends and times[-1] > t_fault + 0.5 else None
            res["streams"][name] = {
                "survived": fr.error is None and fr.seq_ok and first_after is not None,
                "error": fr.error, "gap_s": gap,
                "timeline": [[round(a[2] - t_fault, 4), round(a[2] - a[1], 4)] for a in fr.acks
                             if -1.0 <= a[2] - t_fault <= 8.0],
            }
        gaps = [v["gap_s"] for v in res["streams"].values()]
        res["survived"] = all(v["survived"] for v in res["streams"].values())
        res["gap_s"] = max(g for g in gaps if g is not None) if all(g is not None for g in gaps) else None
        return res
    finally:
        for s in streams.values():
            with contextlib.suppress(Exception):
                s.stop()
        stack.close()


# -- (5b) idle CPU -------------------------------------------------------------------------------


def idle_cpu(lab: Lab, stack: Stack, seconds: float) -> dict[str, Any]:
    reset_lab(lab)
    _stack_start(stack)
    try:
        time.sleep(2.0)
        c0 = daemon_cpu(stack)
        t0 = time.monotonic()
        time.sleep(seconds)
        c1 = daemon_cpu(stack)
        dt = time.monotonic() - t0
        if set(c1) != set(c0):
            raise Invalid(f"{stack.name}: a daemon exited during the idle measurement")
        per = {k: 100 * (c1[k] - v) / dt for k, v in c0.items()}
        return {"stack": stack.name, "seconds": dt, "cpu_percent": per,
                "total_percent": sum(per.values()), "rss_mb": daemon_rss(stack)}
    finally:
        stack.close()


def python_version() -> str:
    return sys.version.split()[0]
