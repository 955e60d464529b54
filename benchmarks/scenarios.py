"""The measurements of issues 9 and 10, one function per kind of sample.

* ``hold``: a stack holds N replicated entries: the burst (throughput, CPU per event), the
  daemons' RSS and the kernel's memory while holding, a bulk to a returning peer, a takeover
  and its hand-over; the master's adverts on the wire during each phase.
* ``failover``: TCP streams through the VIPs across a fault (box dead, graceful stop,
  step-down, daemon SIGKILL), every stack over the same window.
* ``timing``: invictusd VRRPv3 at a centisecond interval under each load (hostile flood,
  burst, bulk, hand-over): the worst advert interval, the backup's Master_Down margin, false
  failovers and the event loop's worst step.
* ``generator_alone``, ``lag``, ``idle_cpu``: the generator's own rate, the lag of single
  entries under background updates, idle CPU.

Each function starts the stack it is given, measures, checks that the run was valid (every
entry arrived, the generator reported no failure, the takeover left the table in the kernel,
the stack started) and always tears the stack down and resets the lab. Anything invalid
raises ``Invalid``: the caller must print no figure from such a run.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.stacks import Invictus, Stack, StackError, ct_count, flush, master_down, vips_on, wait_until
from invictusd.lab.monitor import IpMonitor
from invictusd.lab.topology import Lab
from invictusd.vrrp import v3
from tests.netns.daemons import pcap_frames, udp_datagrams
from tests.netns.test_audit import MAX_FLOOD, _flood_packets_v3
from tests.netns.test_hostile import FLOOD, SYNC_PORT, SYNC_PPS, _sync_packets

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class Invalid(RuntimeError):
    """The run cannot yield a figure (entries missing, a stack not started, ...)."""


# -- probes on processes, interfaces and the kernel ----------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a whole process, every thread, exited ones included: its
    process CPU-time clock (``clock_getcpuclockid``: ``~pid << 3 | CPUCLOCK_SCHED``), to the
    nanosecond; ``/proc/PID/stat``'s ticks (10 ms) if the clock cannot be read."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) seconds of a process, in ticks of 10 ms (``/proc/PID/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, MB."""
    out = {"rss_mb": 0.0, "hwm_mb": 0.0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                out["hwm_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def sync_bytes(lab: Lab, node: str) -> int:
    """Bytes sent plus received on the sync interface of ``node`` (both directions: acks too)."""
    data = json.loads(lab.exec(node, "ip", "-s", "-j", "link", "show", lab.config.sync_if))
    st = data[0]["stats64"]
    return int(st["rx"]["bytes"]) + int(st["tx"]["bytes"])


def conntrack_object_bytes() -> int | None:
    """Size of one conntrack entry in the kernel (the ``nf_conntrack`` slab's object size)."""
    try:
        for line in Path("/proc/slabinfo").read_text().splitlines():
            f = line.split()
            if f and f[0] == "nf_conntrack":
                return int(f[3])
    except (OSError, IndexError, ValueError):
        pass
    return None


def daemon_cpu(stack: Stack) -> dict[str, float]:
    return {f"{node}/{name}": cpu_seconds(pid) for node in ("fw1", "fw2")
            for name, pid in stack.pids(node).items()}


def daemon_cpu_split(stack: Stack) -> dict[str, tuple[float, float]]:
    return {f"{node}/{name}": cpu_split(pid) for node in ("fw1", "fw2")
            for name, pid in stack.pids(node).items()}


def daemon_memory(stack: Stack) -> dict[str, dict[str, float]]:
    return {f"{node}/{name}": memory_mb(pid) for node in ("fw1", "fw2")
            for name, pid in stack.pids(node).items()}


def reset_lab(lab: Lab) -> None:
    """Links up, no VIP anywhere, empty conntrack tables (no daemon may be running)."""
    c = lab.config
    for node in ("fw1", "fw2"):
        for ifn in (c.lan_if, c.wan_if, c.sync_if):
            lab.link_set(node, ifn, True)
        lab.del_vips(node)
        flush(lab, node)
    for node in ("client", "server"):
        lab.neigh_flush(node)


def gen(lab: Lab, *args: str, timeout: float = 900) -> dict[str, Any]:
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


def wait_quiet(lab: Lab, node: str, quiet_s: float = 0.5, noise: int = 400, timeout: float = 300) -> int:
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


def _wait(cond: Any, timeout: float, what: str, step: float = 0.02) -> Any:
    try:
        return wait_until(cond, timeout, what, step)
    except StackError as e:
        raise Invalid(str(e)) from e


# -- the master's adverts on the wire, per phase -------------------------------------------------


class Adverts:
    """tcpdump on both LANs for a whole sample: fw1's adverts as fw2 receives them and fw2's
    as fw1 does. ``phase(name, sender)`` marks a stretch of the sample (wall clock, the
    captures' clock); ``stop()`` gives, per phase, the longest interval between two adverts
    of that phase's master (intervals that end after the phase began and start before it
    ended)."""

    def __init__(self, lab: Lab, interval: float) -> None:
        c = lab.config
        self.caps = {
            "fw1": lab.start_capture("fw2", c.lan_if, f"proto 112 and src host {c.fw_lan_ips[0]}"),
            "fw2": lab.start_capture("fw1", c.lan_if, f"proto 112 and src host {c.fw_lan_ips[1]}"),
        }
        self.phases: list[tuple[str, str, float, float]] = []
        self.result: dict[str, dict[str, Any]] | None = None
        # The first phase's worst interval needs the master's advert before it began.
        path = self.caps["fw1"].path
        _wait(lambda: path.exists() and pcap_frames(path), 3 * interval + 3, "fw1's first advert on the wire",
              step=0.05)

    @contextlib.contextmanager
    def phase(self, name: str, sender: str = "fw1", new_master: bool = False) -> Iterator[None]:
        """``new_master``: the sender becomes master during the phase; only intervals between
        its adverts within the phase count (not from an advert it sent in an earlier life)."""
        t0 = time.time()
        try:
            yield
        finally:
            self.phases.append((name, sender, -t0 if new_master else t0, time.time()))

    def stop(self) -> dict[str, dict[str, Any]]:
        if self.result is not None:
            return self.result
        time.sleep(1.5)  # tcpdump writes its last second late (and loses it at SIGINT)
        times = {n: sorted(t for t, _ in pcap_frames(cap.stop())) for n, cap in self.caps.items()}
        out: dict[str, dict[str, Any]] = {}
        for name, sender, start, t1 in self.phases:
            t0 = abs(start)
            ts = [t for t in times[sender] if start > 0 or t >= t0]
            gaps = [b - a for a, b in itertools.pairwise(ts) if b > t0 and a < t1]
            out[name] = {"sender": sender, "seconds": round(t1 - t0, 3), "intervals": len(gaps),
                         "worst_s": round(max(gaps), 4) if gaps else None}
        self.result = out
        return out

    def close(self) -> None:
        for cap in self.caps.values():
            cap.stop()


# -- (0) the generator alone -------------------------------------------------------------------


def generator_alone(lab: Lab, size: int, ct_timeout: int) -> dict[str, Any]:
    reset_lab(lab)
    res = gen(lab, "burst", "--count", str(size), "--timeout", str(ct_timeout))
    got = ct_count(lab, "fw1")
    flush(lab, "fw1")
    if got < size:
        raise Invalid(f"generator alone: {got} of {size} entries in the kernel")
    return {"size": size, "rate": res["rate"], "seconds": res["t_end"] - res["t_start"]}


# -- issue 9: a stack holding N entries ------------------------------------------------------------


def _burst(lab: Lab, stack: Stack, size: int, ct_timeout: int, *, strict: bool = True,
           limit_s: float | None = None) -> dict[str, Any]:
    """``size`` new marked entries injected on fw1; until fw2 holds them all. ``strict``:
    fw2 not holding them all within ``limit_s`` makes the run invalid; otherwise it is a
    result (``complete`` false, ``held``)."""
    p = lab.python("fw1", "-m", "benchmarks.ctgen", "burst", "--count", str(size),
                   "--timeout", str(ct_timeout), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    limit_s = limit_s or max(60.0, size / 1000)
    limit = time.monotonic() + limit_s
    count: int | None = 0
    complete = True
    try:
        while True:
            count = stack.peer_count("fw2")
            if count is not None and count >= size:
                t_done = time.monotonic()
                break
            if time.monotonic() > limit or p.poll() not in (None, 0):
                if strict or p.poll() not in (None, 0):
                    raise Invalid(f"{stack.name}: fw2 holds {count} of {size} entries after "
                                  f"{limit_s:.0f} s (generator exit {p.poll()})")
                complete, t_done = False, time.monotonic()
                break
            time.sleep(0.01)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if p.returncode != 0:
        raise Invalid(f"generator exited {p.returncode}: {err[-2000:]}")
    g = json.loads(out.strip().splitlines()[-1])
    if g["failed"]:
        raise Invalid(f"generator: {g['failed']} of {size} entries failed")
    if complete and count != size:
        raise Invalid(f"{stack.name}: fw2 holds {count} entries, expected {size}")
    seconds = t_done - g["t_start"]
    return {"seconds": seconds, "events_per_s": size / seconds, "generator_rate": g["rate"],
            "complete": complete, "held": count}


def _costed_burst(lab: Lab, stack: Stack, size: int, ct_timeout: int) -> tuple[dict[str, Any], int]:
    """``_burst`` and what it cost each daemon until the sync link was quiet again
    (``cpu_s``; ``cpu_user_s`` and ``cpu_system_s``: how much of it the kernel did for the
    process, inserting entries, netlink, sockets; in ticks of 10 ms); and the sync link's
    byte count at that point."""
    cpu0, split0 = daemon_cpu(stack), daemon_cpu_split(stack)
    r = _burst(lab, stack, size, ct_timeout)
    quiet_bytes = wait_quiet(lab, "fw1")
    cpu1, split1 = daemon_cpu(stack), daemon_cpu_split(stack)
    r["cpu_s"] = {k: round(cpu1.get(k, 0) - v, 6) for k, v in cpu0.items()}
    r["cpu_user_s"] = {k: round(split1.get(k, (0, 0))[0] - v[0], 2) for k, v in split0.items()}
    r["cpu_system_s"] = {k: round(split1.get(k, (0, 0))[1] - v[1], 2) for k, v in split0.items()}
    return r, quiet_bytes


def burst_cost(lab: Lab, stack: Stack, size: int, ct_timeout: int) -> dict[str, Any]:
    """Only the burst of ``hold``: throughput and CPU per event, for a stack compared on
    that alone (the baseline doing invictusd's job, ``stacks.ConntrackdKernelReplica``)."""
    reset_lab(lab)
    _stack_start(stack)
    try:
        before = stack.peer_count("fw2")
        if before is None or before != 0:
            raise Invalid(f"{stack.name}: fw2 holds {before} peer entries before the burst")
        r, _ = _costed_burst(lab, stack, size, ct_timeout)
        return {"stack": stack.name, "size": size, "replicator": stack.replicator(), **r,
                "counters": {n: stack.counters(n) for n in ("fw1", "fw2")}}
    finally:
        stack.close()


def hold(lab: Lab, stack: Stack, size: int, *, update_delete: bool, ct_timeout: int,
         hold_s: float = 2.0) -> dict[str, Any]:
    """Burst of ``size`` new marked entries on fw1 (throughput, CPU per event, bytes); the
    daemons' memory and the kernel's while both nodes hold them; a bulk to a returning peer
    (fw2's replicator restarted on an empty kernel table); the takeover and its hand-over.
    The master's adverts on the wire during each phase."""
    reset_lab(lab)
    _stack_start(stack)
    adv: Adverts | None = None
    try:
        adv = Adverts(lab, stack.interval)
        r: dict[str, Any] = {"stack": stack.name, "size": size, "replicator": stack.replicator()}
        before = stack.peer_count("fw2")
        if before is None or before != 0:
            raise Invalid(f"{stack.name}: fw2 holds {before} peer entries before the burst")
        mem0 = daemon_memory(stack)
        b0 = sync_bytes(lab, "fw1")
        with adv.phase("burst"):
            burst, b1 = _costed_burst(lab, stack, size, ct_timeout)
            r.update(burst)
        r["bytes_per_new"] = (b1 - b0) / size
        with adv.phase("hold"):
            time.sleep(hold_s)
            r["memory"] = {"start": mem0, "holding": daemon_memory(stack)}
            r["kernel_entries"] = {n: ct_count(lab, n) for n in ("fw1", "fw2")}
        r["loop_after_burst"] = {n: stack.loop(n) for n in ("fw1", "fw2")}
        r["counters_after_burst"] = {n: stack.counters(n) for n in ("fw1", "fw2")}
        if update_delete:
            with adv.phase("update_delete"):
                gen(lab, "burst", "--count", str(size), "--kind", "update", "--timeout", str(ct_timeout))
                b2 = wait_quiet(lab, "fw1")
                r["bytes_per_update"] = (b2 - b1) / size
                gen(lab, "burst", "--count", str(size), "--kind", "delete")
                _wait(lambda: stack.peer_count("fw2") == 0, 60, f"{stack.name}: deletes replicated")
                b3 = wait_quiet(lab, "fw1")
                r["bytes_per_destroy"] = (b3 - b2) / size
                gen(lab, "burst", "--count", str(size), "--timeout", str(ct_timeout))
                _wait(lambda: (stack.peer_count("fw2") or 0) >= size, 120,
                      f"{stack.name}: second burst replicated")
                wait_quiet(lab, "fw1")
        # A master too busy to advertise loses mastership under the burst (a false takeover):
        # a finding, recorded.
        r["false_takeover"] = stack.backup_took_over()
        with adv.phase("bulk"):
            try:
                r["bulk"] = stack.restart_backup(size)
            except StackError as e:
                raise Invalid(str(e)) from e
        if r["bulk"]["entries"] != size:
            raise Invalid(f"{stack.name}: fw2 holds {r['bulk']['entries']} entries after the bulk, "
                          f"expected {size}")
        r["memory"]["after_bulk"] = daemon_memory(stack)
        r["loop_after_bulk"] = {n: stack.loop(n) for n in ("fw1", "fw2")}
        r["false_takeover"] = r["false_takeover"] or stack.backup_took_over()
        try:
            stack.wait_master("fw1", 20)
            mon = IpMonitor(lab, "fw2", "address")
            c0 = daemon_cpu(stack)
            with adv.phase("takeover", sender="fw2", new_master=True):
                tk = stack.takeover(size)
                # What the takeover cost (conntrackd: the commit, deferred from the burst;
                # invictusd: the hand-over). Not fw1's: keepalived stops there.
                c1 = daemon_cpu(stack)
                r["takeover_cpu_s"] = {k: round(v - c0.get(k, 0), 6) for k, v in c1.items()
                                       if k.startswith("fw2/")}
                time.sleep(1.2)  # the new master's adverts after the hand-over, too
        except StackError as e:
            raise Invalid(str(e)) from e
        t_vips = mon.added({lab.config.lan_vip, lab.config.wan_vip})
        if "t_notify" in tk and t_vips is not None:
            tk["vips_after_notify_s"] = round(t_vips - tk["t_notify"], 4)
        r["takeover"] = tk
        r["takeover_s"] = tk["seconds"]
        r["loop_after_takeover"] = {n: stack.loop(n) for n in ("fw1", "fw2")}
        in_kernel = ct_count(lab, "fw2")
        if in_kernel < size:
            raise Invalid(f"{stack.name}: after the takeover fw2's kernel holds {in_kernel} of {size}")
        r["committed"] = in_kernel
        r["adverts"] = adv.stop()
        return r
    finally:
        if adv is not None:
            adv.close()
        stack.close()


# -- lag of single new entries under background load ----------------------------------------------


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
        _wait(lambda: stack.peer_count("fw2") == pool, 30, f"{stack.name}: background pool")
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


# -- issue 10: failover of TCP streams through the VIPs ---------------------------------------------


def failover(lab: Lab, stack: Stack, kind: str, window: float) -> dict[str, Any]:
    """Two client TCP streams (plain and SNAT, a message every 10 ms) across ``kind``; every
    stack's streams run until ``window`` seconds after the fault, whenever they recover."""
    reset_lab(lab)
    _stack_start(stack)
    streams = {}
    try:
        streams = lab.start_streams("tcp", interval=0.01, dead_after=20.0)
        _wait(lambda: (stack.peer_count("fw2") or 0) >= 2, 10, f"{stack.name}: streams replicated")
        time.sleep(1.0)
        both = {lab.config.lan_vip, lab.config.wan_vip}
        mon = IpMonitor(lab, "fw2", "address")
        t_wall, t_fault = time.time(), time.monotonic()
        stack.fault(kind)
        _wait(lambda: vips_on(lab, "fw2") == both, 10, f"{stack.name}: fw2 owning the VIPs", step=0.005)
        t_poll = time.monotonic() - t_fault
        time.sleep(max(0.0, t_fault + window - time.monotonic()))
        results = {name: s.stop() for name, s in streams.items()}
        t_added = mon.added(both)
        res: dict[str, Any] = {"stack": stack.name, "fault": kind, "window_s": window,
                               "vip_s": round(t_added - t_wall, 4) if t_added is not None else t_poll,
                               "streams": {}}
        for name, fr in results.items():
            times = sorted(a[2] for a in fr.acks)
            # The worst silence the fault caused: the longest interval between two echoes
            # that ends after the fault. None: no echo in the last half second of the window.
            ends = [(t1 - t0) for t0, t1 in itertools.pairwise(times) if t1 > t_fault]
            alive = bool(times) and times[-1] > t_fault + window - 0.5
            res["streams"][name] = {
                "survived": fr.error is None and fr.seq_ok and alive,
                "error": fr.error, "gap_s": round(max(ends), 4) if ends and alive else None,
                "timeline": [[round(a[2] - t_fault, 4), round(a[2] - a[1], 4)] for a in fr.acks
                             if -1.0 <= a[2] - t_fault <= window],
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


# -- issue 10: advert timing of invictusd v3 under each load ----------------------------------------

# As fast as one process can: prebuilt IPv4 packets round-robin (tests/netns/test_audit.py).
# Paced categories of forged sync datagrams (tests/netns/test_hostile.py).


def _flood(lab: Lab, stack: Invictus, seconds: float, rng: random.Random) -> dict[str, Any]:
    """The fault tests' floods at once: two VRRPv3 flooders from the client as fast as they
    can (test_audit's largest flood) and forged sync datagrams at 3000/s on the sync link
    (test_hostile's), for ``seconds``."""
    c = lab.config
    # Real datagrams of this stream to forge from: a few hundred entries, then deleted.
    cap = lab.start_capture("fw2", c.sync_if, "udp")
    gen(lab, "burst", "--count", "300", "--base", "5000000")
    wait_quiet(lab, "fw1")
    time.sleep(1.5)
    real = [p for s, port, p in udp_datagrams(cap.stop()) if s == c.sync_ips[0] and port == SYNC_PORT][:50]
    gen(lab, "burst", "--count", "300", "--base", "5000000", "--kind", "delete")
    _wait(lambda: stack.peer_count("fw2") == 0, 30, "flood preparation deleted")
    if not real:
        raise Invalid("no sync datagram captured to forge the sync flood from")
    vrrp = {"iface": c.host_if, "dst": str(v3.GROUP4), "seconds": seconds,
            "packets": [p.hex() for p in _flood_packets_v3(stack.pair)]}
    sync = {"iface": c.sync_if, "rate": SYNC_PPS, "seconds": seconds,
            "packets": {k: [(p.hex(), d) for p, d in v]
                        for k, v in _sync_packets(real, c.sync_ips[0], c.sync_ips[1], rng).items()}}
    vspec = lab.write_file("bench-maxflood.json", json.dumps(vrrp))
    sspec = lab.write_file("bench-syncflood.json", json.dumps(sync))
    vscript = lab.write_file("bench-maxflood.py", MAX_FLOOD)
    sscript = lab.write_file("bench-syncflood.py", FLOOD)
    procs = [lab.python("client", str(vscript), str(vspec), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True) for _ in range(2)]
    procs.append(lab.python("fw1", str(sscript), str(sspec), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True))
    res = []
    for p in procs:
        out, err = p.communicate(timeout=seconds + 30)
        if p.returncode != 0:
            raise Invalid(f"flooder exited {p.returncode}: {err[-1000:]}")
        res.append(json.loads(out.strip().splitlines()[-1]))
    vsent = sum(r["sent"] for r in res[:2])
    ssent = sum(res[2]["sent"].values())
    return {"vrrp_packets": vsent, "vrrp_pps": round(vsent / max(r["seconds"] for r in res[:2])),
            "sync_datagrams": ssent, "seconds": seconds}


def _state_changes(stack: Invictus, node: str) -> list[dict[str, Any]]:
    """The group's transitions in ``node``'s log (logged once per table: the LAN's counts)."""
    lan = stack.lab.config.lan_if
    return [e for e in stack.pair.log_events(node) if e.get("event") == "state change"
            and e.get("interface") == lan]


LOG_KEPT = 200_000  # characters of each node's log kept with a phase that had a false failover


def timing(lab: Lab, interval: float, size: int, *, flood_s: float, ct_timeout: int) -> dict[str, Any]:
    """invictusd VRRPv3 at ``interval`` with replication: a hostile flood, a burst of ``size``,
    a bulk of ``size`` to fw2 restarted on an empty table, and a step-down of fw1 (fw2 takes
    over, hands ``size`` entries over and sends them back to fw1). For each: the master's
    worst advert interval on the wire at the backup, the backup's worst Master_Down margin
    (Master_Down - that interval - the backup's worst event-loop step: a lower bound, the two
    need not coincide), false failovers, and both loops' worst step."""
    stack = Invictus(lab, 3, interval)
    reset_lab(lab)
    _stack_start(stack)
    adv: Adverts | None = None
    rng = random.Random(13)
    try:
        adv = Adverts(lab, interval)
        out: dict[str, Any] = {"interval": interval, "size": size, "phases": {}}
        md = {"fw2": master_down(interval, 100), "fw1": master_down(interval, 150)}

        def snap() -> dict[str, Any]:
            return {n: {"loop": stack.loop(n), "changes": len(_state_changes(stack, n))}
                    for n in ("fw1", "fw2")}

        def record(name: str, master: str, s0: dict[str, Any], s1: dict[str, Any], extra: dict[str, Any],
                   expected: int = 0, restarted: str | None = None) -> None:
            ph: dict[str, Any] = {"master": master, **extra, "loop": {}}
            false = 0
            for n in ("fw1", "fw2"):
                l0, l1 = (s0[n]["loop"] or {}), (s1[n]["loop"] or {})
                # max_lag_ms is the worst since the daemon started: a phase's own worst when it
                # grew (or the daemon restarted in it), else at most the value before.
                grew = n == restarted or l1.get("max_lag_ms", 0) > l0.get("max_lag_ms", 0)
                ph["loop"][n] = {"max_lag_ms": l1.get("max_lag_ms"), "exact": grew,
                                 "last_stall": l1.get("last_stall")}
                changes = _state_changes(stack, n)[s0[n]["changes"]:]
                false += sum(1 for e in changes if e.get("new") in ("master", "backup")
                             and e.get("old") in ("master", "backup"))
            ph["false_failovers"] = max(0, false - expected)
            if ph["false_failovers"]:
                # What each node logged: why it took over (kept with the figures; the lab,
                # and with it the log files, is gone once the run ends).
                ph["logs"] = {n: stack.pair.log(n)[-LOG_KEPT:] for n in ("fw1", "fw2")}
            out["phases"][name] = ph

        s0 = snap()
        with adv.phase("flood"):
            out["flood"] = _flood(lab, stack, flood_s, rng)
        s1 = snap()
        record("flood", "fw1", s0, s1, {"load": out["flood"]})
        # Under load, replication that does not complete (or a takeover that does not hand
        # everything over) is a result of this figure, not an invalid run: recorded, and the
        # next phase starts from what is there.
        limit = max(60.0, size / 4000)
        with adv.phase("burst"):
            b = _burst(lab, stack, size, ct_timeout, strict=False, limit_s=limit)
            with contextlib.suppress(Invalid):
                wait_quiet(lab, "fw1", timeout=30)
        s2 = snap()
        record("burst", "fw1", s1, s2, {"load": b})
        with adv.phase("bulk"):
            try:
                bulk = stack.restart_backup(size, timeout=limit)
                bulk["complete"] = bulk["entries"] == size
            except StackError as e:
                bulk = {"complete": False, "held": stack.peer_count("fw2"), "error": str(e)}
            with contextlib.suppress(Invalid):
                wait_quiet(lab, "fw1", timeout=30)
        # fw2 restarted: its loop figures start again (its log goes on; a start's own
        # transitions, from init, are not failovers).
        s3 = snap()
        record("bulk", "fw1", s2, s3, {"load": bulk}, restarted="fw2")
        held = stack.peer_count("fw2") or 0
        with adv.phase("handover", sender="fw2", new_master=True):
            try:
                tk = stack.takeover(held, timeout=limit)
                # Then fw2 sends its table to fw1 (fw1's entries become replicas again: they
                # exist, so they are updates, and fw1's peer_entries does not count them).
                wait_until(lambda: ((stack.status("fw2") or {}).get("sync") or {}).get("last_bulk"),
                           limit, "fw2's table sent back to fw1")
                tk["complete"] = held == size
                wait_quiet(lab, "fw2", timeout=30)
            except (StackError, Invalid) as e:
                tk = {"complete": False, "held": held, "error": str(e)}
        s4 = snap()
        record("handover", "fw2", s3, s4, {"load": tk}, expected=2)
        advs = adv.stop()
        for name, ph in out["phases"].items():
            a = advs[name]
            backup = "fw2" if ph["master"] == "fw1" else "fw1"
            ph["adverts"] = a
            lag_s = (ph["loop"][backup]["max_lag_ms"] or 0) / 1000
            ph["master_down_s"] = round(md[backup], 4)
            if a["worst_s"] is not None:
                ph["margin_wire_s"] = round(md[backup] - a["worst_s"], 4)
                ph["margin_s"] = round(md[backup] - a["worst_s"] - lag_s, 4)
        return out
    finally:
        if adv is not None:
            adv.close()
        stack.close()


# -- idle CPU ----------------------------------------------------------------------------------


def idle_cpu(lab: Lab, stack: Stack, seconds: float) -> dict[str, Any]:
    reset_lab(lab)
    _stack_start(stack)
    try:
        time.sleep(5.0)  # past the start-up's own work (first dumps, imports, GC)
        c0 = daemon_cpu(stack)
        t0 = time.monotonic()
        time.sleep(seconds)
        c1 = daemon_cpu(stack)
        dt = time.monotonic() - t0
        if set(c1) != set(c0):
            raise Invalid(f"{stack.name}: a daemon exited during the idle measurement")
        per = {k: 100 * (c1[k] - v) / dt for k, v in c0.items()}
        return {"stack": stack.name, "seconds": dt, "cpu_percent": per,
                "total_percent": sum(per.values()), "memory": daemon_memory(stack)}
    finally:
        stack.close()


def python_version() -> str:
    return sys.version.split()[0]
