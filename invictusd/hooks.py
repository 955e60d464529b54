"""``[hooks]``: programs run on the group's transitions, in order, never blocking VRRP.

The daemon submits one ``HookJob`` per transition; before its program starts, a job waits
until the transition's own work is done (the addresses and the gratuitous ARP of a
takeover: ``ready``), and one task here runs the jobs strictly one after
the other: a later hook never overtakes an earlier one, and a slow hook delays only the
hooks behind it. A hook that
fails, hangs (killed at ``timeout``) or cannot start is logged and counted; it never changes
the VRRP state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from invictusd.config import HOOKS, HooksConfig
from invictusd.io import proc

MAX_LOGGED_LINES = 50  # output lines of one run that go to the log; the rest are counted


@dataclass(frozen=True, slots=True)
class HookJob:
    hook: str  # "on_master", ...
    argv: tuple[str, ...]
    env: Mapping[str, str]
    timeout: float
    queued_at: float  # loop time of the transition
    # Awaited before the program starts: the transition's own work is done (the daemon waits
    # for its action worker, so on_master finds the addresses in place).
    ready: Callable[[], Awaitable[None]] | None = None


@dataclass(slots=True)
class HookStats:
    runs: int = 0
    failures: int = 0  # non-zero exit, killed, or could not start
    timeouts: int = 0
    last_exit_code: int | None = None
    last_result: str = ""
    last_output: str = ""
    last_duration: float | None = None
    last_delay: float | None = None  # transition to start of the program
    last_finished_wall: float | None = None


@dataclass
class HookRunner:
    log: Any
    stats: dict[str, HookStats] = field(default_factory=lambda: {h: HookStats() for h in HOOKS})
    queue: asyncio.Queue[HookJob] = field(default_factory=asyncio.Queue)

    def submit(self, job: HookJob) -> None:
        self.queue.put_nowait(job)

    async def run(self) -> None:
        """The one consumer: forever, one job at a time."""
        while True:
            job = await self.queue.get()
            try:
                await self._run(job)
            except Exception as e:  # a bug of ours must not stop later hooks
                self.log.error("hook runner error", hook=job.hook, error=repr(e))
            finally:
                self.queue.task_done()

    async def drain(self, timeout: float) -> bool:
        """Wait until every queued hook has run (at stop); False if ``timeout`` passed."""
        try:
            await asyncio.wait_for(self.queue.join(), timeout)
        except TimeoutError:
            return False
        return True

    async def _run(self, job: HookJob) -> None:
        loop = asyncio.get_running_loop()
        stats = self.stats[job.hook]
        if job.ready is not None:
            await job.ready()
        delay = loop.time() - job.queued_at
        logged = 0

        def on_line(line: str) -> None:
            nonlocal logged
            logged += 1
            if logged <= MAX_LOGGED_LINES:
                self.log.info("hook output", hook=job.hook, line=line)

        result = await proc.run(job.argv, job.timeout, job.env, on_line)
        stats.runs += 1
        stats.last_exit_code = result.exit_code
        stats.last_result = result.detail
        stats.last_output = result.last_line
        stats.last_duration = result.duration
        stats.last_delay = delay
        stats.last_finished_wall = time.time()
        fields = dict(hook=job.hook, state=job.env.get("INVICTUSD_STATE"), result=result.detail,
                      duration_ms=round(result.duration * 1000, 1),
                      delay_ms=round(delay * 1000, 1), argv=list(job.argv))
        if logged > MAX_LOGGED_LINES:
            fields["lines_not_logged"] = logged - MAX_LOGGED_LINES
        if result.ok:
            self.log.info("hook finished", **fields)
            return
        stats.failures += 1
        if result.timed_out:
            stats.timeouts += 1
            self.log.error("hook killed at its timeout", timeout=job.timeout, **fields)
        else:
            self.log.warning("hook failed", **fields)

    def status(self, configured: HooksConfig) -> dict[str, Any]:
        out: dict[str, Any] = {"queued": self.queue.qsize(), "timeout": configured.timeout}
        for h in HOOKS:
            s = self.stats[h]
            argv = getattr(configured, h)
            out[h] = {
                "argv": list(argv) if argv else None,
                "runs": s.runs,
                "failures": s.failures,
                "timeouts": s.timeouts,
                "last_exit_code": s.last_exit_code,
                "last_result": s.last_result or None,
                "last_output": s.last_output or None,
                "last_duration_ms": None if s.last_duration is None
                else round(s.last_duration * 1000, 1),
                "last_delay_ms": None if s.last_delay is None else round(s.last_delay * 1000, 1),
            }
        return out


def environment(
    *, hook: str, state: str, old_state: str, reason: str, node: str, vips: list[str],
    interfaces: list[str], vrids: list[int], priority: int, track_down: tuple[str, ...],
    sequence: int,
) -> dict[str, str]:
    """What a hook learns about the transition (documented in the README)."""
    return proc.child_env({
        "INVICTUSD_HOOK": hook,
        "INVICTUSD_STATE": state,
        "INVICTUSD_OLD_STATE": old_state,
        "INVICTUSD_REASON": reason,
        "INVICTUSD_NODE": node,
        "INVICTUSD_VIPS": " ".join(vips),
        "INVICTUSD_INTERFACES": " ".join(interfaces),
        "INVICTUSD_VRIDS": " ".join(str(v) for v in vrids),
        "INVICTUSD_PRIORITY": str(priority),
        "INVICTUSD_TRACK_DOWN": " ".join(track_down),
        "INVICTUSD_TRANSITION": str(sequence),
        "INVICTUSD_TRANSITION_TIME": f"{time.time():.6f}",
    })


async def stop_runner(task: asyncio.Future[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
