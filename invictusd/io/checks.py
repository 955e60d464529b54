"""The adapter of the health checks: runs command checks when the tracker says they are due,
feeds interface states from link events, and reports each change of state.

Timing is the tracker's (``invictusd.track``): one ``call_at`` timer re-armed at its next
deadline, as the daemon does for the VRRP machine. Each run is a task, so a slow or hung
check never blocks the event loop or the other checks; it is killed at its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

from invictusd.config import TrackConfig
from invictusd.io import proc
from invictusd.track import Change, CheckKind, CheckSpec, Result, Tracker


def specs(tracks: tuple[TrackConfig, ...]) -> tuple[CheckSpec, ...]:
    out = []
    for t in tracks:
        if t.command:
            out.append(CheckSpec(t.name, CheckKind.COMMAND, t.weight, t.interval, t.fall, t.rise))
        else:
            out.append(CheckSpec(t.name, CheckKind.INTERFACE, t.weight))
    return tuple(out)


class CheckRunner:
    def __init__(
        self, tracks: tuple[TrackConfig, ...], on_change: Callable[[Change], None], log: Any,
    ) -> None:
        self.tracks = tracks
        self.tracker = Tracker(specs(tracks))
        self.on_change = on_change
        self.log = log
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._settled = asyncio.Event()
        self._env = proc.child_env({"INVICTUSD_CHECK": "1"})

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self, link_up: Mapping[str, bool]) -> None:
        """Interface checks take their state from ``link_up`` now; command checks start."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for t in self.tracks:
            if t.interface:
                self.link(t.interface, link_up.get(t.interface), now)
        self.tracker.start(now)
        self._fire()
        self._check_settled()

    async def first_results(self, timeout: float) -> None:
        """Until every check has a first result (bounded: a check is killed at its timeout)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---- inputs ------------------------------------------------------------------------

    def link(self, name: str, up: bool | None, now: float) -> None:
        """A link event (or the start-up snapshot) for interface ``name``; None: no such
        interface."""
        for i, t in enumerate(self.tracks):
            if t.interface != name:
                continue
            detail = ("no such interface" if up is None else
                      "carrier up, admin up" if up else "carrier or admin state down")
            self._result(i, Result(bool(up), detail), now)

    # ---- command checks ----------------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.tracker.next_deadline()
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        for i in self.tracker.due(now):
            task = asyncio.ensure_future(self._run(i))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._arm()

    async def _run(self, i: int) -> None:
        t = self.tracks[i]
        r = await proc.run(t.command, t.timeout, self._env)
        self._result(i, Result(r.ok, r.detail, r.last_line, r.duration),
                     asyncio.get_running_loop().time())
        self._arm()

    def _result(self, i: int, result: Result, now: float) -> None:
        change = self.tracker.result(i, result, now)
        self._check_settled()
        if change is None:
            return
        level = self.log.warning if change.new.value == "down" else self.log.info
        level("track check " + change.new.value, check=change.name, old=change.old.value,
              detail=result.detail, output=result.output or None,
              duration_ms=round(result.duration * 1000, 1),
              weight=self.tracker.specs[i].weight_text)
        self.on_change(change)

    def _check_settled(self) -> None:
        if self.tracker.settled():
            self._settled.set()

    def status(self, now: float) -> list[dict[str, object]]:
        rows = self.tracker.status(now)
        for row, t in zip(rows, self.tracks, strict=True):
            if t.command:
                row.update(command=list(t.command), interval=t.interval, timeout=t.timeout,
                           fall=t.fall, rise=t.rise)
            else:
                row.update(interface=t.interface)
        return rows
