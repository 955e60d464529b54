"""The baseline stack: keepalived (vrrp_sync_group LAN+WAN) + conntrackd (FTFW over UDP).

Everything lives in the lab's work directory, per node: ``conntrackd-<node>.conf`` with its
own ``LockFile`` and ``UNIX Path``, ``keepalived-<node>.conf`` with its own pid files, and
``primary-backup-<node>.sh``, the notify script conntrack-tools ships
(``/usr/share/doc/conntrackd/examples/sync/primary-backup.sh``) with the paths of this node.

conntrackd 1.4.7 has no mark filter in its ``Filter`` section, so the baseline selects
connections the way its documentation does: ``Address Ignore`` for every address of the
firewalls themselves (loopback, real, virtual and sync addresses), so only forwarded
connections are replicated. The mark rule (bit 30 on new forwarded connections) is installed
for both stacks all the same (the same nft table invictusd installs), so the kernel does the
same work under both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

from invictusd.io.markrule import mark_ruleset
from invictusd.lab.configs import LAN_VRID, PASSWORD, WAN_VRID
from invictusd.lab.topology import Lab

CONNTRACKD = "/usr/sbin/conntrackd"
KEEPALIVED = "keepalived"
SYNC_PORT = 3780
MARK_BIT = 30

# conntrackd's UNIX-socket requests (conntrack-tools include/conntrackd.h).
_STATS = 21  # "conntrackd -s"


class BaselineError(RuntimeError):
    pass


def conntrackd_conf(lab: Lab, node: str, external_cache: bool = True) -> str:
    """``external_cache`` False: ``DisableExternalCache On``, conntrackd injecting the peer's
    entries into the backup's kernel as they arrive (the job invictusd's backup does)."""
    c = lab.config
    i = 0 if node == "fw1" else 1
    own = sorted({"127.0.0.1", *c.sync_ips, *c.fw_lan_ips, *c.fw_wan_ips, c.lan_vip, c.wan_vip})
    ignore = "\n".join(f"            IPv4_address {a}" for a in own)
    wd = lab.workdir
    return f"""
Sync {{
    Mode FTFW {{
        ResendQueueSize 1048576{"" if external_cache else chr(10) + "        DisableExternalCache On"}
    }}
    UDP {{
        IPv4_address {c.sync_ips[i]}
        IPv4_Destination_Address {c.sync_ips[1 - i]}
        Port {SYNC_PORT}
        Interface {c.sync_if}
        SndSocketBuffer 24985600
        RcvSocketBuffer 24985600
        Checksum on
    }}
}}
General {{
    Systemd off
    HashSize 262144
    HashLimit 2097152
    LogFile {wd}/conntrackd-{node}.log
    Syslog off
    LockFile {wd}/conntrackd-{node}.lock
    UNIX {{
        Path {wd}/conntrackd-{node}.ctl
    }}
    NetlinkBufferSize 67108864
    NetlinkBufferSizeMaxGrowth 134217728
    NetlinkOverrunResync on
    Filter From Userspace {{
        Protocol Accept {{
            TCP
            UDP
            ICMP
        }}
        Address Ignore {{
{ignore}
        }}
    }}
}}
"""


def notify_script(lab: Lab, node: str) -> str:
    conf = lab.workdir / f"conntrackd-{node}.conf"
    lock = lab.workdir / f"conntrackd-{node}.lock"
    log = lab.workdir / f"notify-{node}.log"
    return f"""#!/bin/sh
# primary-backup.sh from conntrack-tools' examples, with this node's paths; each step logged
# with a wall-clock stamp (date +%s.%N, the clock of packet captures and ip -ts monitor)
# for the benchmark's takeover figure and timelines.
CONNTRACKD_BIN={CONNTRACKD}
CONNTRACKD_LOCK={lock}
CONNTRACKD_CONFIG={conf}
stamp() {{ echo "$(date +%s.%N) $*" >> {log}; }}
case "$1" in
  primary)
    stamp primary-start
    $CONNTRACKD_BIN -C $CONNTRACKD_CONFIG -c || stamp "ERROR: conntrackd -c"
    stamp commit-done
    $CONNTRACKD_BIN -C $CONNTRACKD_CONFIG -f || stamp "ERROR: conntrackd -f"
    $CONNTRACKD_BIN -C $CONNTRACKD_CONFIG -R || stamp "ERROR: conntrackd -R"
    $CONNTRACKD_BIN -C $CONNTRACKD_CONFIG -B || stamp "ERROR: conntrackd -B"
    stamp primary-done
    ;;
  backup)
    stamp backup-start
    if ! $CONNTRACKD_BIN -C $CONNTRACKD_CONFIG -s >/dev/null 2>&1; then
        rm -f $CONNTRACKD_LOCK
        $CONNTRACKD_BIN -C $CONNTRACKD_CONFIG -d || {{ stamp "ERROR: cannot launch"; exit 1; }}
    fi
    $CONNTRACKD_BIN -C $CONNTRACKD_CONFIG -t || stamp "ERROR: conntrackd -t"
    $CONNTRACKD_BIN -C $CONNTRACKD_CONFIG -n || stamp "ERROR: conntrackd -n"
    stamp backup-done
    ;;
  fault)
    $CONNTRACKD_BIN -C $CONNTRACKD_CONFIG -t
    stamp fault
    ;;
  *)
    exit 1
    ;;
esac
exit 0
"""


def keepalived_conf(lab: Lab, node: str, master: bool, version: int = 2, interval: float = 1.0) -> str:
    """LAN and WAN instances in one sync group. ``version`` 3 drops the authentication block
    (VRRPv3 has none) and allows a centisecond ``advert_int``."""
    c = lab.config
    i = 0 if node == "fw1" else 1
    prio = 150 if master else 100
    script = lab.workdir / f"primary-backup-{node}.sh"
    auth = ("    authentication {\n        auth_type PASS\n"
            f"        auth_pass {PASSWORD}\n    }}\n") if version == 2 else ""
    inst = ""
    for name, ifname, real, vip, vrid in (
        ("LAN", c.lan_if, c.fw_lan_ips[i], c.lan_vip, LAN_VRID),
        ("WAN", c.wan_if, c.fw_wan_ips[i], c.wan_vip, WAN_VRID),
    ):
        inst += f"""
vrrp_instance {name} {{
    version {version}
    state {"MASTER" if master else "BACKUP"}
    interface {ifname}
    mcast_src_ip {real}
    virtual_router_id {vrid}
    priority {prio}
    advert_int {interval:g}
{auth}    virtual_ipaddress {{
        {vip}/{c.prefix4} dev {ifname}
    }}
}}
"""
    return f"""
global_defs {{
    router_id ka{node}
    enable_script_security
    script_user root
    vrrp_garp_master_delay 5
}}
vrrp_sync_group G1 {{
    group {{
        LAN
        WAN
    }}
    notify_master "{script} primary"
    notify_backup "{script} backup"
    notify_fault "{script} fault"
}}
{inst}"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


class BaselineNode:
    """conntrackd + keepalived on one firewall of the lab."""

    def __init__(self, lab: Lab, node: str, master: bool, version: int = 2, interval: float = 1.0,
                 external_cache: bool = True) -> None:
        self.lab = lab
        self.node = node
        self.master = master
        self.external_cache = external_cache
        self.version = version
        self.interval = interval
        wd = lab.workdir
        self.ct_conf = wd / f"conntrackd-{node}.conf"
        self.ctl = wd / f"conntrackd-{node}.ctl"
        self.lock = wd / f"conntrackd-{node}.lock"
        self.ka_conf = wd / f"keepalived-{node}.conf"
        self.ka_pid = wd / f"keepalived-{node}.pid"
        self.ka_vrrp_pid = wd / f"keepalived-{node}-vrrp.pid"
        self.ctd: subprocess.Popen[Any] | None = None
        self.ka: subprocess.Popen[Any] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start_conntrackd(self, mark_rule: bool = True) -> None:
        lab = self.lab
        lab.write_file(self.ct_conf.name, conntrackd_conf(lab, self.node, self.external_cache))
        self.lock.unlink(missing_ok=True)
        self.ctl.unlink(missing_ok=True)
        if mark_rule:
            # The same marking rule invictusd installs for itself.
            lab.exec(self.node, "nft", "-f", "-", input=mark_ruleset(MARK_BIT).replace(
                "table inet invictusd", "table inet baseline_mark"))
        with open(lab.workdir / f"conntrackd-{self.node}.out", "ab") as out:
            self.ctd = lab.popen(self.node, CONNTRACKD, "-C", str(self.ct_conf),
                                 stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while self.stats() is None:
            if self.ctd.poll() is not None or time.monotonic() > deadline:
                raise BaselineError(f"conntrackd on {self.node} did not start "
                                    f"(exit {self.ctd.poll()}): {self.log()[-2000:]}")
            time.sleep(0.05)

    def start_keepalived(self) -> None:
        lab = self.lab
        script = lab.write_file(f"primary-backup-{self.node}.sh", notify_script(lab, self.node))
        script.chmod(0o700)
        lab.write_file(self.ka_conf.name, keepalived_conf(lab, self.node, self.master, self.version,
                                                          self.interval))
        for p in (self.ka_pid, self.ka_vrrp_pid):
            p.unlink(missing_ok=True)
        with open(lab.workdir / f"keepalived-{self.node}.log", "ab") as out:
            self.ka = lab.popen(self.node, KEEPALIVED, "-n", "-l", "-D", "-P", "-f", str(self.ka_conf),
                                "-p", str(self.ka_pid), "-r", str(self.ka_vrrp_pid),
                                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self.ka_vrrp_pid.exists():
            if self.ka.poll() is not None or time.monotonic() > deadline:
                raise BaselineError(f"keepalived on {self.node} did not start (exit {self.ka.poll()})")
            time.sleep(0.05)

    def pids(self) -> dict[str, int]:
        """Live daemon processes: conntrackd, keepalived (parent), keepalived-vrrp (child)."""
        out: dict[str, int] = {}
        if self.ctd is not None and self.ctd.poll() is None:
            out["conntrackd"] = self.ctd.pid
        if self.ka is not None and self.ka.poll() is None:
            out["keepalived"] = self.ka.pid
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.ka_vrrp_pid.read_text().strip())
            if _alive(pid):
                out["keepalived-vrrp"] = pid
        return out

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal every daemon of this node (keepalived's VRRP child by its own pid file, and
        first: a child that outlives its parent by a moment leaves gracefully, priority 0)."""
        pids = self.pids()
        for name in ("keepalived-vrrp", "keepalived", "conntrackd"):
            if name in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[name], sig)
        self._reap(pids)

    def freeze(self) -> None:
        """SIGSTOP every daemon of this node (a box that stopped: nothing more leaves it)."""
        for name, pid in self.pids().items():
            if name.startswith("keepalived"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
        if self.ctd is not None and self.ctd.poll() is None:
            self.ctd.send_signal(signal.SIGSTOP)

    def stop_conntrackd(self) -> None:
        pids = {k: v for k, v in self.pids().items() if k == "conntrackd"}
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self._reap(pids)
        self.ctd = None

    def stop_keepalived(self, sig: int = signal.SIGTERM) -> None:
        pids = {k: v for k, v in self.pids().items() if k.startswith("keepalived")}
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        self._reap(pids)

    def _reap(self, pids: dict[str, int], timeout: float = 10) -> None:
        for p in (self.ka, self.ctd):
            if p is not None and p.pid in pids.values():
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids.values()):
            if time.monotonic() > deadline:
                for p in pids.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
                break
            time.sleep(0.02)

    def close(self) -> None:
        # SIGKILL at once if frozen (a stopped process never sees SIGTERM).
        frozen = any(_stopped(p) for p in self.pids().values())
        if not frozen:
            self.kill(signal.SIGTERM)
        self.kill(signal.SIGKILL)
        for p in (self.ka_pid, self.ka_vrrp_pid, self.lock, self.ctl):
            p.unlink(missing_ok=True)
        with contextlib.suppress(RuntimeError):
            self.lab.exec(self.node, "nft", "delete", "table", "inet", "baseline_mark", check=False)

    # -- conntrackd's control socket -------------------------------------------------------

    def request(self, code: int, timeout: float = 10) -> str | None:
        """One request on conntrackd's UNIX socket (what ``conntrackd -C ... -s`` sends)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(self.ctl))
                s.sendall(struct.pack("=i", code))
                chunks = []
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
            return b"".join(chunks).decode(errors="replace")
        except OSError:
            return None

    def stats(self) -> str | None:
        return self.request(_STATS)

    def external_count(self) -> int | None:
        """Entries in the external cache (the peer's replicated table), or None."""
        text = self.stats()
        if text is None:
            return None
        return parse_cache_count(text, "external")

    def injected_count(self) -> int | None:
        """Without an external cache: the peer's entries conntrackd put into our kernel
        (``external inject``: created - destroyed), or None."""
        text = self.stats()
        return None if text is None else parse_injected_count(text)

    def internal_count(self) -> int | None:
        text = self.stats()
        return None if text is None else parse_cache_count(text, "internal")

    def ctl_cmd(self, *args: str, timeout: float = 120) -> float:
        """Run ``conntrackd -C conf ARGS`` in the node; return its wall time in seconds."""
        t0 = time.perf_counter()
        self.lab.exec(self.node, CONNTRACKD, "-C", str(self.ct_conf), *args, timeout=timeout)
        return time.perf_counter() - t0

    def log(self) -> str:
        text = ""
        for name in (f"conntrackd-{self.node}.log", f"conntrackd-{self.node}.out",
                     f"keepalived-{self.node}.log", f"notify-{self.node}.log"):
            p = self.lab.workdir / name
            if p.exists():
                text += f"--- {name}\n{p.read_text(errors='replace')[-3000:]}\n"
        return text


def parse_cache_count(text: str, which: str) -> int | None:
    """``current active connections`` of the ``cache <which>`` block of ``conntrackd -s cache``."""
    block = None
    for line in text.splitlines():
        low = line.strip().lower()
        if low.startswith("cache:"):
            block = low.split(":", 1)[1].strip()
        elif low.startswith("cache "):
            block = low.split()[1].rstrip(":")
        if block == which and "current active connections" in low:
            digits = "".join(ch for ch in low if ch.isdigit())
            return int(digits) if digits else None
    return None


def parse_injected_count(text: str) -> int | None:
    """Created minus destroyed in the ``external inject`` block of ``conntrackd -s``."""
    counts: dict[str, int] = {}
    inside = False
    for line in text.splitlines():
        low = line.strip().lower()
        if low.endswith(":") and not low.startswith("connections"):
            inside = low == "external inject:"
            continue
        if inside and low.startswith("connections "):
            what, _, rest = low.partition(":")
            digits = rest.split()[0] if rest.split() else ""
            if digits.isdigit():
                counts[what.split()[1]] = int(digits)
    if "created" not in counts:
        return None
    return counts["created"] - counts.get("destroyed", 0)


class Baseline:
    """keepalived + conntrackd on both firewalls; fw1 is the preferred master."""

    name = "baseline"

    def __init__(self, lab: Lab, version: int = 2, interval: float = 1.0,
                 external_cache: bool = True) -> None:
        self.lab = lab
        self.nodes = {"fw1": BaselineNode(lab, "fw1", True, version, interval, external_cache),
                      "fw2": BaselineNode(lab, "fw2", False, version, interval, external_cache)}

    def start(self, vrrp: bool = True) -> None:
        try:
            for n in self.nodes.values():
                n.start_conntrackd()
            if vrrp:
                for n in self.nodes.values():
                    n.start_keepalived()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for n in self.nodes.values():
            n.close()
        for node in ("fw1", "fw2"):
            self.lab.del_vips(node)
