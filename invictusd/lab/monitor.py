"""``ip -ts monitor`` in a lab namespace: kernel link and address events with wall-clock times.

What the namespace tests and the benchmarks time failovers by: when an address appeared on
the backup, as the kernel announced it (not when a poll noticed it).
"""

from __future__ import annotations

import contextlib
import datetime
import signal
import subprocess
import time

from invictusd.lab.topology import Lab

Event = tuple[float, str]  # (wall-clock time, the monitor's line without its stamp)


class IpMonitor:
    """``ip -ts monitor OBJECTS`` in ``node``, from construction until ``stop``."""

    def __init__(self, lab: Lab, node: str, *objects: str) -> None:
        self.proc = lab.popen(node, "ip", "-ts", "monitor", *objects, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
        time.sleep(0.2)  # subscribed before anything happens
        self._events: list[Event] | None = None

    def stop(self) -> list[Event]:
        """Every event seen, in order (the monitor stops at the first call)."""
        if self._events is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            out, _ = self.proc.communicate(timeout=5)
            events = []
            for line in out.splitlines():
                if line.startswith("[") and "]" in line:
                    stamp, rest = line[1:].split("]", 1)
                    with contextlib.suppress(ValueError):
                        events.append((datetime.datetime.fromisoformat(stamp).timestamp(), rest.strip()))
            self._events = events
        return self._events

    def added(self, addresses: set[str]) -> float | None:
        """When the last of ``addresses`` was added (None if one never was)."""
        events = self.stop()
        ts = []
        for a in addresses:
            t = next((t for t, text in events if not text.startswith("Deleted") and f"inet {a}/" in text),
                     None)
            if t is None:
                return None
            ts.append(t)
        return max(ts)
