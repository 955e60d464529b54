"""The action worker (issue 8 item 9): ordered, coalesced, never piling up stale work."""

from __future__ import annotations

import asyncio

from invictusd.vrrp.machine import AddAddresses, CommitReplica, RemoveAddresses, SendGarp
from invictusd.worker import ActionWorker


class FakeDaemon:
    def __init__(self, commit_seconds: float = 0.05) -> None:
        self.master = False
        self.calls: list[str] = []
        self.commit_seconds = commit_seconds
        self.failures: list[str] = []

    def is_master(self) -> bool:
        return self.master

    async def commit(self) -> None:
        self.calls.append("commit")
        await asyncio.sleep(self.commit_seconds)

    async def set_addresses(self, present: bool) -> None:
        self.calls.append("add" if present else "remove")
        await asyncio.sleep(0.001)

    async def announce(self, index: int) -> None:
        self.calls.append(f"garp{index}")

    async def resnapshot(self) -> None:
        self.calls.append("resnapshot")

    def action_failed(self, what: str, error: BaseException) -> None:
        self.failures.append(f"{what}: {error!r}")


def _takeover(w: ActionWorker) -> None:
    for a in (CommitReplica(), AddAddresses(), SendGarp(0), SendGarp(1)):
        w.submit(a)


def test_commit_then_addresses_then_arp() -> None:
    async def go() -> list[str]:
        d = FakeDaemon()
        w = ActionWorker(d)
        w.start()
        d.master = True
        _takeover(w)
        assert await w.drain(5)
        await w.stop()
        return d.calls

    assert asyncio.run(go()) == ["commit", "add", "garp0", "garp1"]


def test_flapping_mastership_does_not_pile_up_commits_and_a_takeover_does_not_wait() -> None:
    """Forged adverts with the public password flap mastership every ~0.6 s while commits
    take longer: the queue used to grow by a commit per flap, and the real takeover's
    addresses waited behind all of them."""

    async def go() -> tuple[FakeDaemon, ActionWorker, float]:
        d = FakeDaemon(commit_seconds=0.2)
        w = ActionWorker(d)
        w.start()
        for _ in range(50):  # 50 flaps while the first commit runs
            d.master = True
            _takeover(w)
            await asyncio.sleep(0)
            d.master = False
            w.submit(RemoveAddresses())
        d.master = True  # the real takeover
        t0 = asyncio.get_running_loop().time()
        _takeover(w)
        assert await w.drain(10)
        took = asyncio.get_running_loop().time() - t0
        await w.stop()
        return d, w, took

    d, w, took = asyncio.run(go())
    assert d.calls.count("commit") <= 2, d.calls
    assert d.calls[-4:] == ["commit", "add", "garp0", "garp1"], d.calls
    assert took < 3 * 0.2 + 0.1  # at most the commit under way, then its own
    assert w.counters["commits_coalesced"] >= 45


def test_a_commit_for_a_mastership_that_ended_is_dropped() -> None:
    async def go() -> list[str]:
        d = FakeDaemon()
        w = ActionWorker(d)
        d.master = True
        w.submit(CommitReplica())
        d.master = False  # lost before the worker ran
        w.submit(RemoveAddresses())
        w.start()
        assert await w.drain(5)
        await w.stop()
        assert w.counters["commits_dropped"] == 1
        return d.calls

    assert asyncio.run(go()) == ["remove"]


def test_a_failing_action_is_reported_and_the_worker_goes_on() -> None:
    async def go() -> FakeDaemon:
        d = FakeDaemon()

        async def broken(present: bool) -> None:
            raise OSError(19, "No such device")

        d.set_addresses = broken  # type: ignore[method-assign]
        w = ActionWorker(d)
        w.start()
        d.master = True
        _takeover(w)
        assert await w.drain(5)
        w.resnapshot()
        assert await w.drain(5)
        await w.stop()
        return d

    d = asyncio.run(go())
    assert d.failures and "No such device" in d.failures[0]
    assert d.calls == ["commit", "garp0", "garp1", "resnapshot"]
