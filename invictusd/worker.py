"""The slow half of the VRRP machine's actions, carried out in order without piling up.

Adverts go out inline; everything slower (the replica commit, address changes through
pyroute2, gratuitous ARP, re-reading link state) runs here, on one task, so "commit, then
addresses, then ARP" holds without a lock. It is level-triggered, not a queue: an action
only marks work as wanted, and what is done is decided by the machine's state *when the
work runs*. However fast mastership flaps (forged adverts carry VRRPv2's public password),
at most one commit and one address change are outstanding, a commit for a mastership that
has ended is dropped, and a real takeover never waits behind stale work.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Protocol

from invictusd.vrrp.machine import Action, AddAddresses, CommitReplica, RemoveAddresses, SendGarp


class Target(Protocol):
    """What the worker acts on (the daemon)."""

    def is_master(self) -> bool: ...
    async def commit(self) -> None: ...
    async def set_addresses(self, present: bool) -> None: ...
    async def announce(self, index: int) -> None: ...
    async def resnapshot(self) -> None: ...
    def action_failed(self, what: str, error: BaseException) -> None: ...


class ActionWorker:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.counters: Counter[str] = Counter()
        self._commit = False
        self._addresses = False
        self._garp: set[int] = set()
        self._resnapshot = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def submit(self, action: Action) -> None:
        if isinstance(action, CommitReplica):
            if self._commit:
                self.counters["commits_coalesced"] += 1
            self._commit = True
        elif isinstance(action, AddAddresses | RemoveAddresses):
            self._addresses = True
        elif isinstance(action, SendGarp):
            self._garp.add(action.index)
        else:
            raise TypeError(f"not a worker action: {action!r}")
        self._kick()

    def resnapshot(self) -> None:
        self._resnapshot = True
        self._kick()

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()

    @property
    def pending(self) -> bool:
        return self._commit or self._addresses or bool(self._garp) or self._resnapshot

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is pending or running; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                await self._step()
            if not self._wake.is_set():
                self._idle.set()

    async def _step(self) -> None:
        t = self.target
        if self._resnapshot:
            self._resnapshot = False
            await self._do("resnapshot", t.resnapshot())
        if self._commit or self._addresses:
            commit, self._commit, self._addresses = self._commit, False, False
            if t.is_master():
                if commit:
                    self.counters["commits"] += 1
                    await self._do("commit", t.commit())
                # The state may have changed during the commit: decide again.
                await self._do("addresses", t.set_addresses(t.is_master()))
            else:
                if commit:
                    self.counters["commits_dropped"] += 1  # mastership already ended
                await self._do("addresses", t.set_addresses(False))
            self.counters["address_syncs"] += 1
        if self._garp and not (self._commit or self._addresses):
            indexes, self._garp = sorted(self._garp), set()
            if t.is_master():
                for i in indexes:
                    await self._do("announce", t.announce(i))

    async def _do(self, what: str, work: Any) -> None:
        try:
            await work
        except Exception as e:  # an I/O failure must never stop the worker
            self.counters[f"{what}_failures"] += 1
            self.target.action_failed(what, e)
