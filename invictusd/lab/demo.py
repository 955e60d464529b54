"""``invictusd demo``: a firewall pair in network namespaces, an election and a failover.

Builds client -- fw1/fw2 -- server, starts invictusd on both firewalls with replication on,
runs a TCP stream (plain and SNATed) through the virtual addresses, crashes the master
(daemon killed and links cut) and shows that the stream continued through the other one.
Everything is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Any

from invictusd import control
from invictusd.cli import format_status
from invictusd.lab import netns
from invictusd.lab.configs import control_socket, write_config
from invictusd.lab.topology import Lab, LabConfig


def _say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _status(lab: Lab, node: str) -> dict[str, Any] | None:
    try:
        return control.request(control_socket(lab, node), "status", timeout=2)
    except (OSError, ValueError):
        return None


def _wait(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def main(keep: bool = False) -> int:
    netns.exit_on_signals()
    with Lab(LabConfig(ipv6=False)) as lab:
        c = lab.config
        _say(f"lab built in {lab.build_seconds:.2f}s: client {c.client_ip} -> LAN VIP {c.lan_vip}"
             f" -> fw1/fw2 -> WAN VIP {c.wan_vip} -> server {c.server_ip}; sync link 10.9.0.0/24")
        procs: dict[str, subprocess.Popen[Any]] = {}
        for node, master in (("fw1", True), ("fw2", False)):
            cfg = write_config(lab, node, start_as_master=master, sync=True)
            procs[node] = lab.start_daemon(node, cfg)
            print(f"started invictusd on {node} (start_as_master = {str(master).lower()}), "
                  f"config {cfg}")
        if not _wait(lambda: (_status(lab, "fw1") or {}).get("group", {}).get("state") == "master",
                     15):
            print("fw1 did not become master; its log:\n" + (lab.workdir / "fw1.log").read_text())
            return 1
        _wait(lambda: (_status(lab, "fw2") or {}).get("sync", {}).get("synced"), 10)
        for node in ("fw1", "fw2"):
            s = _status(lab, node)
            if s:
                print(format_status(s))

        _say("starting TCP streams client -> server through the VIPs (one plain, one SNATed)")
        streams = lab.start_streams("tcp", dead_after=10)
        time.sleep(1.5)
        s2 = _status(lab, "fw2") or {}
        print(f"fw2 holds {s2.get('sync', {}).get('peer_entries')} replicated connections of fw1")

        _say("crashing fw1: daemon killed (SIGKILL) and its LAN and WAN links cut")
        t0 = time.monotonic()
        procs["fw1"].send_signal(signal.SIGKILL)
        lab.link_set("fw1", c.lan_if, False)
        lab.link_set("fw1", c.wan_if, False)
        ok = _wait(lambda: (_status(lab, "fw2") or {}).get("group", {}).get("state") == "master", 8)
        took = time.monotonic() - t0
        print(f"fw2 became master after {took:.2f}s" if ok else "fw2 did NOT become master")
        time.sleep(3)
        s = _status(lab, "fw2")
        if s:
            print(format_status(s))
        _say("streams after the failover")
        survived = True
        for name, st in streams.items():
            r = st.stop()
            alive = r.error is None
            survived &= alive
            print(f"  {name:<5} {'SURVIVED' if alive else 'BROKEN (' + str(r.error) + ')'}: "
                  f"{r.acked}/{r.sent} messages echoed, worst gap {r.worst_gap:.2f}s")
        if keep:
            input(f"\nlab kept (namespaces {', '.join(lab.names.values())}); Enter to tear down ")
    _say("lab removed")
    return 0 if survived else 1


if __name__ == "__main__":
    sys.exit(main())
