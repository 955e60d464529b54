"""The stacks under test behind one interface: ``Invictus`` and ``KeepalivedConntrackd``.

Both run on fw1 (preferred master, priority 150) and fw2 (backup, priority 100) of the same
``Lab``, with the same VRRP version and timing, the same ruleset and the same mark rule:

* the replication stacks of issue 9 (``STACKS``): VRRPv2, advert 1 s (Master_Down 3.61 s);
* the failover stacks of issue 10 (``FAILOVER_STACKS``): VRRPv3 at 0.1 s for both
  (Master_Down 0.361 s), and invictusd at 0.05 s (0.180 s).

Every ``start`` is checked (daemons alive, fw1 owning both VIPs, the backup in sync) and
raises ``StackError`` otherwise: a benchmark never measures a stack that did not start.
"""

from __future__ import annotations

import contextlib
import datetime
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.baseline import CONNTRACKD, Baseline, BaselineError
from invictusd.lab.topology import Lab
from tests.netns.daemons import Pair

# The faults of the failover figures (issue 10):
#   box_dead  the daemons of fw1 frozen (SIGSTOP), then its LAN, WAN and sync links cut
#   graceful  SIGTERM to invictusd / to keepalived on fw1 (priority 0, then gone)
#   stepdown  invictusd's step-down (SIGUSR1) on fw1; keepalived has none
#   kill      SIGKILL of every daemon of fw1, links up: the kernel still forwards with the
#             addresses it has until fw2 takes over
FAULTS = ("box_dead", "graceful", "stepdown", "kill")


class StackError(RuntimeError):
    pass


def wait_until(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def vips_on(lab: Lab, node: str) -> set[str]:
    c = lab.config
    have = {a for ifn in (c.lan_if, c.wan_if) for a in lab.addresses(node, ifn)}
    return {c.lan_vip, c.wan_vip} & have


def owner(lab: Lab) -> str | None:
    both = {lab.config.lan_vip, lab.config.wan_vip}
    h = {n: vips_on(lab, n) for n in ("fw1", "fw2")}
    for a, b in (("fw1", "fw2"), ("fw2", "fw1")):
        if h[a] == both and not h[b]:
            return a
    return None


def master_down(interval: float, priority: int = 100) -> float:
    """RFC 3768/5798 Master_Down_Interval of a backup (v2: skew in whole seconds' terms)."""
    return 3 * interval + (256 - priority) * interval / 256


def flush(lab: Lab, node: str, timeout: float = 300) -> None:
    """Empty ``node``'s conntrack table (a million entries take seconds) and check it."""
    lab.exec(node, "conntrack", "-F", check=False, timeout=timeout)
    wait_until(lambda: ct_count(lab, node) < 50, 60, f"{node}'s conntrack table flushed", step=0.2)


def ct_count(lab: Lab, node: str) -> int:
    """Entries in ``node``'s conntrack table (``nf_conntrack_count`` of its namespace)."""
    return int(lab.exec(node, "cat", "/proc/sys/net/netfilter/nf_conntrack_count").strip() or 0)


class Stack:
    name = ""
    label = ""
    version = 2
    interval = 1.0

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.frozen: set[str] = set()

    def start(self) -> None: ...
    def close(self) -> None: ...
    def peer_count(self, node: str) -> int | None: ...
    def pids(self, node: str) -> dict[str, int]: ...
    def replicator(self) -> str:
        """The name of the process that holds the replica (``pids`` key)."""
        ...
    def fault(self, kind: str) -> None: ...
    def takeover(self, expect: int, timeout: float | None = None) -> dict[str, Any]:
        """fw1 hands over gracefully; fw2 takes over with ``expect`` entries replicated.
        Returns ``seconds``: from fw2's decision until both the addresses and the table are
        in fw2's kernel, and what else each stack tells."""
        ...
    def restart_backup(self, expect: int, timeout: float | None = None) -> dict[str, Any]:
        """fw2's replicator restarts with an empty kernel table (a returning peer) and is sent
        the master's table. Returns ``seconds``: from the restarted replicator ready until
        it holds ``expect`` entries."""
        ...
    def backup_took_over(self) -> bool:
        """Whether fw2 has become master at any time since the stack started."""
        ...
    def loop(self, node: str) -> dict[str, Any] | None:
        """invictusd's event-loop figures (None for the baseline)."""
        return None

    def counters(self, node: str) -> dict[str, Any]:
        """What the replicator says about lost events and resyncs."""
        return {}

    def links_down(self, node: str) -> None:
        c = self.lab.config
        self.lab.exec(node, "ip", "-batch", "-", input="".join(
            f"link set {ifn} down\n" for ifn in (c.lan_if, c.wan_if, c.sync_if)))

    def wait_master(self, node: str, timeout: float = 15) -> None:
        wait_until(lambda: owner(self.lab) == node, timeout, f"{self.name}: {node} owning both VIPs")


class Invictus(Stack):
    label = "invictusd"

    def __init__(self, lab: Lab, version: int = 2, interval: float = 1.0) -> None:
        super().__init__(lab)
        self.version, self.interval = version, interval
        self.name = "invictusd" if version == 2 else f"invictusd-{interval:g}"
        self.label = "invictusd" if version == 2 else f"invictusd v3 {interval:g} s"
        self.pair = Pair(lab)
        self._events_before = 0

    def _configure(self, node: str) -> None:
        kw: dict[str, Any] = {}
        if self.version == 3:
            kw = {"password": None, "vrrp_extra": {"version": 3, "advert_interval": self.interval}}
        self.pair.configure(node, start_as_master=node == "fw1", sync=True, **kw)

    def start(self) -> None:
        p = self.pair
        self._events_before = len(p.log_events("fw2"))
        try:
            for node in ("fw1", "fw2"):
                self._configure(node)
            p.start("fw1")
            p.start("fw2")
            self.wait_master("fw1")
            wait_until(lambda: self._synced("fw2") and self._synced("fw1"), 20, "invictusd in sync")
        except BaseException as e:
            logs = "\n".join(f"--- {n}\n{p.log(n)[-3000:]}" for n in ("fw1", "fw2"))
            self.close()
            if isinstance(e, AssertionError | StackError):
                raise StackError(f"invictusd did not start: {e}\n{logs}") from e
            raise

    def _synced(self, node: str) -> bool:
        s = self.pair.try_status(node)
        return bool(s and s.get("sync") and s["sync"].get("synced"))

    def status(self, node: str) -> dict[str, Any] | None:
        return self.pair.try_status(node)

    def peer_count(self, node: str) -> int | None:
        s = self.pair.try_status(node)
        if s is None or not s.get("sync"):
            return None
        return int(s["sync"]["peer_entries"])

    def pids(self, node: str) -> dict[str, int]:
        p = self.pair.procs.get(node)
        return {"invictusd": p.pid} if p is not None and p.poll() is None else {}

    def replicator(self) -> str:
        return "invictusd"

    def loop(self, node: str) -> dict[str, Any] | None:
        s = self.pair.try_status(node)
        return None if s is None else dict(s["loop"])

    def counters(self, node: str) -> dict[str, Any]:
        c = ((self.pair.try_status(node) or {}).get("sync") or {}).get("counters") or {}
        return {k: v for k, v in c.items() if k in (
            "netlink_overruns", "events_overrun", "resyncs_sent", "resyncs_applied", "kernel_dumps",
            "events", "applied", "retransmits", "dump_failures", "over_capacity")}

    def backup_took_over(self) -> bool:
        # The log is appended across samples: only lines since this start count.
        return any(e.get("event") == "state change" and e.get("new") == "master"
                   for e in self.pair.log_events("fw2")[self._events_before:])

    def takeover(self, expect: int, timeout: float | None = None) -> dict[str, Any]:
        """SIGUSR1 (step down) on fw1; fw2's ``group.last_takeover.addresses_ms``: from the
        decision to the addresses in place. The replica is in fw2's kernel already: there
        is nothing to commit. The hand-over of the entries runs afterwards, in the
        background, and is waited for (``expect`` entries)."""
        before = (self.pair.try_status("fw2") or {}).get("group", {}).get("last_takeover")
        self.pair.signal("fw1", signal.SIGUSR1)

        def done() -> dict[str, Any] | None:
            s = self.pair.try_status("fw2")
            lt = s and s["group"].get("last_takeover")
            return lt if lt and lt != before else None

        lt = wait_until(done, 120, "invictusd takeover on fw2", step=0.01)
        t_addresses = time.time()

        def handed() -> dict[str, Any] | None:
            h = (self.pair.try_status("fw2") or {}).get("sync", {}).get("last_handover")
            return h if h and h.get("entries", 0) >= expect else None

        ho = wait_until(handed, timeout or 60 + expect / 2000, f"hand-over of {expect} entries", step=0.05)
        return {"seconds": float(lt["addresses_ms"]) / 1000, "addresses_ms": lt["addresses_ms"],
                "handover": ho, "t_addresses": t_addresses}

    def restart_backup(self, expect: int, timeout: float | None = None) -> dict[str, Any]:
        """fw2's daemon stopped (SIGTERM), its kernel table flushed (the peer rebooted), the
        daemon started again: fw1 sees a new epoch and sends its table by kernel dump.
        ``seconds`` runs from the restarted daemon's ``replication started`` (its log's
        timestamp: the interpreter's start-up is not the bulk) until it holds ``expect``."""
        p = self.pair
        before = (p.try_status("fw1") or {}).get("sync", {}).get("last_bulk")
        p.stop("fw2")
        flush(self.lab, "fw2")
        n_events = len(p.log_events("fw2"))
        t_popen = time.time()
        p.start("fw2")
        wait_until(lambda: (self.peer_count("fw2") or 0) >= expect, timeout or 60 + expect / 2000,
                   f"{self.name}: fw2 holding {expect} entries after its restart", step=0.01)
        t_all = time.time()
        started = next((e for e in p.log_events("fw2")[n_events:] if e.get("event") == "replication started"),
                       None)
        if started is None:
            raise StackError("fw2 logged no 'replication started' after its restart")
        t_ready = datetime.datetime.fromisoformat(started["timestamp"]).timestamp()
        bulk = wait_until(lambda: ((s := p.try_status("fw1")) and s["sync"].get("last_bulk") != before
                                   and s["sync"]["last_bulk"]), 60, "fw1's last_bulk", step=0.05)
        return {"seconds": t_all - t_ready, "from_restart_s": t_all - t_popen,
                "entries": self.peer_count("fw2"), "last_bulk": bulk}

    def freeze(self, node: str) -> None:
        self.pair.signal(node, signal.SIGSTOP)
        self.frozen.add(node)

    def fault(self, kind: str) -> None:
        if kind == "box_dead":
            # Frozen first: a running daemon notices its first link going down and says
            # goodbye (priority 0) on the others, which is a graceful handover.
            self.freeze("fw1")
            self.links_down("fw1")
        elif kind == "kill":
            self.pair.procs["fw1"].send_signal(signal.SIGKILL)
            self.pair.procs["fw1"].wait(5)
        elif kind == "stepdown":
            self.pair.signal("fw1", signal.SIGUSR1)
        elif kind == "graceful":
            self.pair.signal("fw1", signal.SIGTERM)
        else:
            raise ValueError(kind)

    def close(self) -> None:
        for node, proc in list(self.pair.procs.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL if node in self.frozen else signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.lab.exec(node, sys.executable, "-m", "invictusd", "cleanup", "--config",
                              str(self.pair.configs[node]), check=False)
        self.pair.procs.clear()
        self.frozen.clear()
        for node in ("fw1", "fw2"):
            self.lab.del_vips(node)


class KeepalivedConntrackd(Stack):
    label = "keepalived+conntrackd"

    def __init__(self, lab: Lab, version: int = 2, interval: float = 1.0,
                 external_cache: bool = True) -> None:
        super().__init__(lab)
        self.version, self.interval = version, interval
        self.name = "baseline" if version == 2 else f"baseline-{interval:g}"
        self.label = ("keepalived+conntrackd" if version == 2
                      else f"keepalived v3 {interval:g} s + conntrackd")
        self.base = Baseline(lab, version, interval, external_cache)
        self._notify_before = 0

    def start(self) -> None:
        self._notify_before = len(self._notify_log("fw2"))
        try:
            self.base.start()
            self.wait_master("fw1")
            wait_until(lambda: "backup-done" in self._notify_log("fw2")[self._notify_before:], 10,
                       "fw2 notify backup")
        except BaseException as e:
            logs = "\n".join(n.log() for n in self.base.nodes.values())
            self.base.close()
            if isinstance(e, BaselineError | StackError):
                raise StackError(f"keepalived+conntrackd did not start: {e}\n{logs}") from e
            raise

    def _notify_path(self, node: str) -> Path:
        return self.lab.workdir / f"notify-{node}.log"

    def _notify_log(self, node: str) -> str:
        p = self._notify_path(node)
        return p.read_text() if p.exists() else ""

    def _stamps(self, node: str) -> list[tuple[float, str]]:
        out = []
        for line in self._notify_log(node)[self._notify_before:].splitlines():
            t, _, what = line.partition(" ")
            with contextlib.suppress(ValueError):
                out.append((float(t), what.strip()))
        return out

    def peer_count(self, node: str) -> int | None:
        return self.base.nodes[node].external_count()

    def backup_took_over(self) -> bool:
        return "primary-start" in self._notify_log("fw2")[self._notify_before:]

    def pids(self, node: str) -> dict[str, int]:
        return self.base.nodes[node].pids()

    def replicator(self) -> str:
        return "conntrackd"

    def counters(self, node: str) -> dict[str, Any]:
        """``conntrackd -s runtime``: its netlink overruns and resyncs with the kernel."""
        n = self.base.nodes[node]
        text = self.lab.exec(node, CONNTRACKD, "-C", str(n.ct_conf), "-s", "runtime", check=False)
        out: dict[str, Any] = {}
        for line in text.splitlines():
            name, _, value = line.strip().partition(":")
            if name in ("events received", "netlink overrun", "resync with kernel table") and value.strip():
                out[name.replace(" ", "_")] = int(value.split()[0])
        return out

    def takeover(self, expect: int, timeout: float | None = None) -> dict[str, Any]:
        """keepalived on fw1 stops (SIGTERM: priority 0); fw2's keepalived becomes master,
        adds the addresses and runs its notify script, whose first step is ``conntrackd -c``
        (the external cache into the kernel). Until it returns, fw2's kernel has no state
        for the connections and the stateful ruleset drops their packets. ``seconds``: from
        the script's start (its first line, a few ms after keepalived's decision: not
        counted, in the baseline's favour) until ``conntrackd -c`` returned."""
        self.base.nodes["fw1"].stop_keepalived(signal.SIGTERM)

        def committed() -> tuple[float, float] | None:
            st = self._stamps("fw2")
            start = next((t for t, w in st if w == "primary-start"), None)
            done = next((t for t, w in st if w in ("commit-done", "ERROR: conntrackd -c")), None)
            return (start, done) if start is not None and done is not None else None

        start, done = wait_until(committed, timeout or 120 + expect / 2000,
                                 "fw2's notify: conntrackd -c done")
        if any(w == "ERROR: conntrackd -c" for _, w in self._stamps("fw2")):
            raise StackError("conntrackd -c failed on fw2")
        return {"seconds": done - start, "t_addresses": done, "t_notify": start}

    def restart_backup(self, expect: int, timeout: float | None = None) -> dict[str, Any]:
        """fw2's conntrackd stopped, the kernel table flushed, conntrackd started again and
        asked for a resync (``conntrackd -n``, what the notify script runs on ``backup``):
        fw1's conntrackd sends its internal cache."""
        n = self.base.nodes["fw2"]
        n.stop_conntrackd()
        flush(self.lab, "fw2")
        t_popen = time.monotonic()
        n.start_conntrackd(mark_rule=False)  # returns once its control socket answers
        t_ready = time.monotonic()
        n.ctl_cmd("-n")
        wait_until(lambda: (n.external_count() or 0) >= expect, timeout or 60 + expect / 2000,
                   f"{self.name}: fw2's external cache holding {expect} entries", step=0.01)
        t_all = time.monotonic()
        return {"seconds": t_all - t_ready, "from_restart_s": t_all - t_popen,
                "entries": n.external_count()}

    def freeze(self, node: str) -> None:
        self.base.nodes[node].freeze()
        self.frozen.add(node)

    def fault(self, kind: str) -> None:
        n = self.base.nodes["fw1"]
        if kind == "box_dead":
            self.freeze("fw1")
            self.links_down("fw1")
        elif kind == "kill":
            n.kill(signal.SIGKILL)
        elif kind == "graceful":
            n.stop_keepalived(signal.SIGTERM)
        else:
            raise ValueError(f"{self.name} has no {kind!r} fault")

    def close(self) -> None:
        self.base.close()
        self.frozen.clear()


# The baseline configured to do the same job as invictusd (the replica in the backup's kernel).
SAME_JOB_STACK = "baseline-kernel"


class ConntrackdKernelReplica(KeepalivedConntrackd):
    """The baseline doing invictusd's job: conntrackd with ``DisableExternalCache On``
    injects the master's entries into fw2's kernel as they arrive (no commit at takeover).
    Measured for the burst's throughput and CPU only: the same work side by side."""

    label = "keepalived+conntrackd, DisableExternalCache"

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab, external_cache=False)
        self.name = SAME_JOB_STACK

    def peer_count(self, node: str) -> int | None:
        return self.base.nodes[node].injected_count()


STACKS: dict[str, Callable[[Lab], Stack]] = {
    "invictusd": Invictus,
    "baseline": KeepalivedConntrackd,
}

FAILOVER_STACKS: dict[str, Callable[[Lab], Stack]] = {
    "invictusd-0.1": lambda lab: Invictus(lab, 3, 0.1),
    "invictusd-0.05": lambda lab: Invictus(lab, 3, 0.05),
    "baseline-0.1": lambda lab: KeepalivedConntrackd(lab, 3, 0.1),
}

# Which faults each failover stack is measured under (issue 10's table).
FAILOVER_FAULTS: dict[str, tuple[str, ...]] = {
    "invictusd-0.1": ("box_dead", "graceful", "stepdown", "kill"),
    "invictusd-0.05": ("box_dead",),
    "baseline-0.1": ("box_dead", "graceful", "kill"),
}
