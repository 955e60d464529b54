"""The two stacks under test behind one interface: ``Invictus`` and ``KeepalivedConntrackd``.

Both run on fw1 (preferred master) and fw2 (backup) of the same ``Lab``, with the same VRRP
timing (advert 1 s, backup priority 100: Master_Down 3.61 s) and the same ruleset and mark
rule. Every ``start`` is checked (daemons alive, fw1 owning both VIPs, the backup reachable)
and raises ``StackError`` otherwise: a benchmark never measures a stack that did not start.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.baseline import Baseline, BaselineError
from invictusd.lab.topology import Lab
from tests.netns.daemons import Pair

FAULTS = ("kill", "links", "graceful")


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


class Stack:
    name = ""
    label = ""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def start(self) -> None: ...
    def close(self) -> None: ...
    def peer_count(self, node: str) -> int | None: ...
    def pids(self, node: str) -> dict[str, int]: ...
    def fault(self, kind: str) -> None: ...
    def takeover(self, expect: int) -> float: ...
    def backup_took_over(self) -> bool:
        """Whether fw2 has become master at any time since the stack started."""
        ...

    def links_down(self, node: str) -> None:
        c = self.lab.config
        for ifn in (c.lan_if, c.wan_if, c.sync_if):
            self.lab.link_set(node, ifn, False)

    def wait_master(self, node: str, timeout: float = 15) -> None:
        wait_until(lambda: owner(self.lab) == node, timeout, f"{self.name}: {node} owning both VIPs")


class Invictus(Stack):
    name = "invictusd"
    label = "invictusd"

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab)
        self.pair = Pair(lab)
        self._events_before = 0

    def start(self) -> None:
        p = self.pair
        self._events_before = len(p.log_events("fw2"))
        try:
            p.configure("fw1", start_as_master=True, sync=True)
            p.configure("fw2", start_as_master=False, sync=True)
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

    def backup_took_over(self) -> bool:
        # The log is appended across samples: only lines since this start count.
        return any(e.get("event") == "state change" and e.get("new") == "master"
                   for e in self.pair.log_events("fw2")[self._events_before:])

    def takeover(self, expect: int) -> float:
        """SIGUSR1 (step down) on fw1; fw2's ``group.last_takeover.addresses_ms``: from the
        decision to the addresses in place. The replica is in fw2's kernel already: there
        is nothing to commit (the hand-over of the entries runs afterwards, in the
        background, and is checked to cover ``expect`` entries)."""
        before = (self.pair.try_status("fw2") or {}).get("group", {}).get("last_takeover")
        self.pair.signal("fw1", signal.SIGUSR1)

        def done() -> dict[str, Any] | None:
            s = self.pair.try_status("fw2")
            lt = s and s["group"].get("last_takeover")
            return lt if lt and lt != before and s["sync"].get("last_handover") else None

        lt = wait_until(done, 120, "invictusd takeover on fw2", step=0.02)
        wait_until(lambda: ((self.pair.try_status("fw2") or {}).get("sync", {}).get("last_handover")
                            or {}).get("entries", 0) >= expect, 120, f"hand-over of {expect} entries")
        return float(lt["addresses_ms"]) / 1000

    def fault(self, kind: str) -> None:
        if kind == "kill":
            self.pair.procs["fw1"].send_signal(signal.SIGKILL)
            self.links_down("fw1")
            self.pair.procs["fw1"].wait(5)
        elif kind == "links":
            self.links_down("fw1")
        else:
            self.pair.signal("fw1", signal.SIGTERM)

    def close(self) -> None:
        for node, proc in list(self.pair.procs.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.lab.exec(node, sys.executable, "-m", "invictusd", "cleanup", "--config",
                              str(self.pair.configs[node]), check=False)
        self.pair.procs.clear()
        for node in ("fw1", "fw2"):
            self.lab.del_vips(node)


class KeepalivedConntrackd(Stack):
    name = "baseline"
    label = "keepalived+conntrackd"

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab)
        self.base = Baseline(lab)
        self._notify_before = 0

    def start(self) -> None:
        self._notify_before = len(self._notify_log("fw2"))
        try:
            self.base.start()
            self.wait_master("fw1")
            wait_until(lambda: "backup-done" in self._notify_log("fw2"), 10, "fw2 notify backup")
        except BaseException as e:
            logs = "\n".join(n.log() for n in self.base.nodes.values())
            self.base.close()
            if isinstance(e, BaselineError | StackError):
                raise StackError(f"keepalived+conntrackd did not start: {e}\n{logs}") from e
            raise

    def _notify_log(self, node: str) -> str:
        p = self.lab.workdir / f"notify-{node}.log"
        return p.read_text() if p.exists() else ""

    def peer_count(self, node: str) -> int | None:
        return self.base.nodes[node].external_count()

    def backup_took_over(self) -> bool:
        return "primary-start" in self._notify_log("fw2")[self._notify_before:]

    def pids(self, node: str) -> dict[str, int]:
        return self.base.nodes[node].pids()

    def takeover(self, expect: int) -> float:
        """``time conntrackd -c`` on fw2 (what the notify script runs first on ``primary``)."""
        return self.base.nodes["fw2"].ctl_cmd("-c")

    def fault(self, kind: str) -> None:
        n = self.base.nodes["fw1"]
        if kind == "kill":
            n.kill(signal.SIGKILL)
            self.links_down("fw1")
        elif kind == "links":
            self.links_down("fw1")
        else:
            n.stop_keepalived(signal.SIGTERM)

    def close(self) -> None:
        self.base.close()


STACKS: dict[str, type[Stack]] = {"invictusd": Invictus, "baseline": KeepalivedConntrackd}
