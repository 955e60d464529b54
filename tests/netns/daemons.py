"""Running real invictusd daemons in a lab, and asking them how they are."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from invictusd import control
from invictusd.lab.configs import control_socket, write_config
from invictusd.lab.topology import Lab, LabConfig


def wait_for(cond: Callable[[], Any], timeout: float, step: float = 0.02, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        time.sleep(step)


class Pair:
    """fw1 and fw2 of a lab, each with its config and (when running) its daemon."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.configs: dict[str, Path] = {}

    def configure(self, node: str, **kw: Any) -> Path:
        self.configs[node] = write_config(self.lab, node, **kw)
        return self.configs[node]

    def start(self, node: str, wait_ready: bool = True, env: dict[str, str] | None = None) -> None:
        if node not in self.configs:
            self.configure(node)
        logpath = self.lab.workdir / f"{node}.log"
        with open(logpath, "ab") as logf:
            self.procs[node] = self.lab.python(
                node, "-m", "invictusd", "run", "--config", str(self.configs[node]),
                stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            )
        if wait_ready:
            wait_for(lambda: self.try_status(node), 10, what=f"{node} control socket")

    def signal(self, node: str, sig: int) -> None:
        self.procs[node].send_signal(sig)

    def kill(self, node: str, cleanup: bool = True) -> None:
        """SIGKILL, then what systemd's ExecStopPost does (``invictusd cleanup``) unless told not."""
        self.procs[node].send_signal(signal.SIGKILL)
        self.procs[node].wait(5)
        if cleanup:
            self.lab.exec(node, sys.executable, "-m", "invictusd", "cleanup", "--config",
                          str(self.configs[node]))

    def stop(self, node: str, timeout: float = 15) -> int:
        self.procs[node].send_signal(signal.SIGTERM)
        return self.procs[node].wait(timeout)

    def try_status(self, node: str) -> dict[str, Any] | None:
        try:
            return control.request(control_socket(self.lab, node), "status", timeout=2)
        except (OSError, ValueError):
            return None

    def status(self, node: str) -> dict[str, Any]:
        s = self.try_status(node)
        assert s is not None, f"{node} is not answering on its control socket\n{self.log(node)}"
        return s

    def state(self, node: str) -> str | None:
        s = self.try_status(node)
        return None if s is None else str(s["group"]["state"])

    def log(self, node: str) -> str:
        path = self.lab.workdir / f"{node}.log"
        return path.read_text() if path.exists() else ""

    def log_events(self, node: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log(node).splitlines():
            line = line.strip()
            if line.startswith("{"):
                with suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def vips_on(self, node: str) -> set[str]:
        c = self.lab.config
        have = set(self.lab.addresses(node, c.lan_if)) | set(self.lab.addresses(node, c.wan_if))
        return {a for a in (c.lan_vip, c.wan_vip) if any(h.split("/")[0] == a for h in have)}

    def holders(self) -> dict[str, set[str]]:
        return {n: self.vips_on(n) for n in ("fw1", "fw2")}

    def master(self) -> str | None:
        """The node holding all VIPs while the other holds none, else None (split or none)."""
        h = self.holders()
        all_vips = {self.lab.config.lan_vip, self.lab.config.wan_vip}
        for a, b in (("fw1", "fw2"), ("fw2", "fw1")):
            if h[a] == all_vips and not h[b]:
                return a
        return None


@contextmanager
def lab_pair(config: LabConfig | None = None) -> Iterator[Pair]:
    with Lab(config or LabConfig(ipv6=False)) as lab:
        pair = Pair(lab)
        try:
            yield pair
        except BaseException:
            for node in ("fw1", "fw2", "keepalived"):
                print(f"---- {node} log ----\n{pair.log(node)[-6000:]}")
            raise


# ---- captures and process figures (hostile, fault and soak tests) ---------------------------


def pcap_frames(path: Path) -> list[tuple[float, bytes]]:
    """(timestamp, Ethernet frame) of every record of a classic little-endian pcap file."""
    data = Path(path).read_bytes()
    out, off = [], 24
    while off + 16 <= len(data):
        sec = int.from_bytes(data[off : off + 4], "little")
        usec = int.from_bytes(data[off + 4 : off + 8], "little")
        incl = int.from_bytes(data[off + 8 : off + 12], "little")
        out.append((sec + usec / 1e6, data[off + 16 : off + 16 + incl]))
        off += 16 + incl
    return out


def udp_datagrams(path: Path) -> list[tuple[str, int, bytes]]:
    """(source address, source port, payload) of every IPv4 UDP frame of a pcap."""
    out = []
    for _, frame in pcap_frames(path):
        if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
            continue
        ihl = (frame[14] & 0x0F) * 4
        udp = frame[14 + ihl :]
        length = int.from_bytes(udp[4:6], "big")
        src = ".".join(str(b) for b in frame[26:30])
        out.append((src, int.from_bytes(udp[0:2], "big"), bytes(udp[8:length])))
    return out


def proc_figures(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open file descriptors) of a process."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points (0 for fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return 0.0 if sxx == 0 else sum((x - mx) * (y - my) for x, y in points) / sxx


def error_events(pair: Pair, node: str) -> list[dict[str, Any]]:
    """Log events at level error or above (what a user would have to act on)."""
    return [e for e in pair.log_events(node) if e.get("level") in ("error", "critical")]
