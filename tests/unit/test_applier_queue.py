"""The applier's queue and batching: deliveries wait as bytes, requests go in large batches.

The kernel side of the same code runs in the namespace tests (``test_transcode_kernel``,
``test_replication*``); here a recording injector stands in for the netlink socket so that
the batching, the accounting and the ordering against stream-control records are exact.
"""

from __future__ import annotations

import asyncio
import errno as E
import tracemalloc
from typing import Any

import pytest

from invictusd.applier import BATCH, DELIVERIES_PER_RUN, Applier
from invictusd.flows import IPPROTO_TCP
from invictusd.io.transcode import EventTranscoder
from invictusd.sync import wire
from invictusd.sync.policy import ReplicaMarks, Scope
from invictusd.sync.receiver import Delivery

SERVER = bytes([10, 20, 0, 100])
MARKS = ReplicaMarks()


def _deletes(seq: int, n: int = 90) -> list[wire.Record]:
    return [wire.Delete(4, IPPROTO_TCP, bytes([10, 10, seq & 255, i]), SERVER, 1024 + i, 9001, 0)
            for i in range(n)]


def _entry(i: int, new: bool = True, mark: int = 1 << 30) -> wire.Entry:
    a = bytes([10, 10, i >> 8 & 255, i & 255])
    return wire.Entry(new, 4, IPPROTO_TCP, a, SERVER, 1024 + i % 60000, 443, 0, SERVER, a, 443,
                      1024 + i % 60000, 0, 6, 600, mark, 3)


def _delivery(seq: int, records: list[wire.Record]) -> Delivery:
    return Delivery(seq, b"".join(wire.encode_record(r) for r in records))


class RecordingInjector:
    """Answers like the kernel would for a table: create of a present entry EEXIST, update
    or delete of a missing one ENOENT (keyed by the request's original tuple bytes)."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.table: set[bytes] = set()
        self._seq = 1000

    def next_seqs(self, count: int) -> int:
        base = self._seq
        self._seq += count
        return base

    def run(self, msgs: list[bytes], base: int) -> dict[int, int]:
        self.batches.append(len(msgs))
        failures = {}
        for i, m in enumerate(msgs):
            assert int.from_bytes(m[8:12], "little") == base + i  # seq = base + index
            mtype = int.from_bytes(m[4:6], "little") & 0xFF
            flags = int.from_bytes(m[6:8], "little")
            key = m[24:64]  # the original tuple's bytes
            if mtype == 2:  # delete
                if key in self.table:
                    self.table.discard(key)
                else:
                    failures[i] = E.ENOENT
            elif flags & 0x400:  # NLM_F_CREATE
                if key in self.table:
                    failures[i] = E.EEXIST
                else:
                    self.table.add(key)
            elif key not in self.table:
                failures[i] = E.ENOENT
        return failures


class Session:
    def __init__(self) -> None:
        self.applied_upto = 0

    def applied(self, seq: int, now: float) -> None:
        self.applied_upto = seq


def _applier(injector: Any = None, capacity: int = 1 << 20) -> Applier:
    unused: Any = None
    return Applier(Session(), injector or RecordingInjector(), MARKS,  # type: ignore[arg-type]
                   Scope(30, frozenset({0}), frozenset({4, 6})), EventTranscoder(30, 0),
                   replica_timeout=600, capacity=capacity, master=lambda: False,
                   progress=lambda: None, log=unused)


def _run(a: Applier) -> None:
    async def go() -> None:
        a.run()
        while a.queued:
            await asyncio.sleep(0)
            a.run()

    asyncio.run(go())


def test_a_delivery_is_its_bytes_and_decodes_on_demand() -> None:
    recs = [*_deletes(1, 5), _entry(7)]
    d = _delivery(1, recs)
    assert d.records == tuple(recs)
    assert not hasattr(d, "__dict__")  # slots: nothing else is held


def test_the_queue_holds_about_its_bytes() -> None:
    """What a backup behind its master holds (up to apply_slack + window = 1536 datagrams)
    is their bytes, a few MB, never the ~15 times larger decoded records."""
    tracemalloc.start()
    try:
        t0 = tracemalloc.get_traced_memory()[0]
        a = _applier()
        a.feed([_delivery(seq, _deletes(seq)) for seq in range(1, 201)])
        held = tracemalloc.get_traced_memory()[0] - t0
    finally:
        tracemalloc.stop()
    payload = 200 * 90 * 14
    assert a.queued == 200
    assert held < 1.5 * payload, (held, payload)


def test_requests_are_injected_in_batches_across_deliveries() -> None:
    inj = RecordingInjector()
    a = _applier(inj)
    n = 3 * DELIVERIES_PER_RUN
    a.feed([_delivery(seq, [_entry(seq * 40 + i) for i in range(40)]) for seq in range(1, n + 1)])
    _run(a)
    assert a.counters.created == 40 * n and not a.counters.failures
    assert a.replica_entries == 40 * n
    assert max(inj.batches) >= BATCH and len(inj.batches) < n  # not one send per datagram
    assert a.session.applied_upto == n  # type: ignore[attr-defined]


def test_control_records_see_everything_before_them_in_the_kernel() -> None:
    """A DIGEST (a scan of the kernel) only starts once the requests before it are in."""
    inj = RecordingInjector()
    a = _applier(inj)
    seen: list[int] = []
    a._check_digest = lambda rec: seen.append(len(inj.table))  # type: ignore[method-assign]
    a.feed([_delivery(1, [_entry(i) for i in range(30)]),
            _delivery(2, [_entry(100 + i) for i in range(5)] + [wire.Digest(35, 0)] + [_entry(200)])])
    _run(a)
    assert seen == [35]
    assert len(inj.table) == 36


def test_failures_are_retried_in_the_other_form_and_counted() -> None:
    inj = RecordingInjector()
    a = _applier(inj)
    # An UPSERT of an entry we do not hold (update first: ENOENT, then created), a NEW of one
    # we hold (EEXIST, then updated), a DELETE of one we never had (counted as missing).
    a.feed([_delivery(1, [_entry(1)])])
    _run(a)
    a.feed([_delivery(2, [_entry(2, new=False), _entry(1, new=True),
                          wire.Delete(4, IPPROTO_TCP, bytes([10, 10, 9, 9]), SERVER, 1, 2, 0)])])
    _run(a)
    c = a.counters
    assert (c.created, c.updated, c.delete_missing, c.retried) == (2, 1, 1, 2)
    assert not c.failures and a.replica_entries == 2


def test_a_later_record_of_the_same_entry_is_not_overtaken_by_a_retry() -> None:
    inj = RecordingInjector()
    a = _applier(inj)
    a.feed([_delivery(1, [_entry(1)])])
    _run(a)
    # NEW (EEXIST) then DELETE of the same entry in one batch: no retry of the NEW after it.
    a.feed([_delivery(2, [_entry(1, new=True), wire.Delete(*_entry(1)[1:8])])])
    _run(a)
    assert a.counters.retried == 0 and a.counters.deleted == 1 and not inj.table


def test_the_replica_cap_holds_within_a_batch() -> None:
    a = _applier(capacity=50)
    a.feed([_delivery(seq, [_entry(seq * 40 + i) for i in range(40)]) for seq in range(1, 4)])
    _run(a)
    assert a.replica_entries == 50 and a.counters.over_capacity == 70


@pytest.mark.parametrize("mark", [0, 1 << 29])
def test_entries_outside_the_scope_are_refused_not_built(mark: int) -> None:
    inj = RecordingInjector()
    log: Any = type("L", (), {"warning": lambda *a, **k: None})()
    a = _applier(inj)
    a.log = log
    a.feed([_delivery(1, [_entry(1, mark=mark), _entry(2)])])
    _run(a)
    assert len(inj.table) == 1 and sum(a.counters.refused.values()) == 1


def test_every_scan_asks_the_kernel_for_a_dense_set_and_selects_while_reading(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel walks its table with softirqs off until a reply chunk is full: a filter
    matching few entries (a re-mark or sweep with nothing to do) is one call walking the whole
    table, and every packet of that CPU waits (256-280 ms at 1M entries, measured; a VRRP
    advert among them). So the kernel's filter is every replicated entry, the narrower
    choice made by the scan itself."""
    import invictusd.applier as applier_mod
    from invictusd.sync.policy import Remark, Sweep

    made: list[tuple[str, int, int, Any]] = []

    class RecordingScan:
        def __init__(self, name: str, mark: int, mask: int, *args: Any, select: Any = None,
                     **kw: Any) -> None:
            made.append((name, mark, mask, select))

        def start(self) -> None:
            pass

    monkeypatch.setattr(applier_mod, "Scan", RecordingScan)
    a = _applier()
    a._remark(Remark(1, 0))
    a._blocking = None
    a._sweep(Sweep(0))
    a._blocking = None
    a._check_digest(wire.Digest(0, 0))
    a._blocking = None
    a.count()
    dense = MARKS.filter_marked()
    names = ("remark", "sweep", "digest", "count")
    assert [(n, (m, k)) for n, m, k, _ in made] == [(n, dense) for n in names]
    assert [s for *_, s in made] == [MARKS.filter_replica(1), MARKS.filter_replica(0), MARKS.filter_replica(),
                                     MARKS.filter_replica()]


class _Receiver:
    def __init__(self) -> None:
        self.completed: list[bool] = []

    def resync_begun(self, now: float) -> None:
        pass

    def resync_completed(self, now: float, complete: bool) -> None:
        self.completed.append(complete)


@pytest.mark.parametrize(("left", "expect"), [
    ([], []),  # a rebooted node, or one that was master: nothing to re-mark or sweep
    ([1 << 29 | 1 << 28], ["sweep"]),  # a previous run completed parity 1: only the sweep
    ([1 << 29, 1 << 29 | 1 << 28], ["remark", "sweep"]),  # left unfinished: both
])
def test_a_resync_reads_the_kernel_only_for_parities_it_can_hold(
        monkeypatch: pytest.MonkeyPatch, left: list[int], expect: list[str]) -> None:
    """A re-mark and a sweep each read the whole replicated table (seconds at a million
    entries, the stream waiting); one for a parity no replica entry has is skipped. What a
    previous run left is counted at start, so a backup that starts empty (and a master,
    whose hand-over makes every replica its own) resyncs with neither."""
    import invictusd.applier as applier_mod
    from invictusd.io.transcode import Batch

    scans: list[Any] = []

    class KernelScan:
        def __init__(self, name: str, mark: int, mask: int, transcoder: Any, on_batch: Any,
                     on_done: Any, on_error: Any, select: Any = None, **kw: Any) -> None:
            self.name, self.select, self.on_batch, self.on_done = name, select, on_batch, on_done

        def start(self) -> None:
            scans.append(self)

        def cancel(self) -> None:
            pass

    monkeypatch.setattr(applier_mod, "Scan", KernelScan)
    kernel = [wire.encode_record(_entry(i, mark=1 << 30 | m)) for i, m in enumerate(left)]
    a = _applier()
    receiver = _Receiver()
    a.session.receiver = receiver  # type: ignore[attr-defined]

    def finish(scan: Any) -> None:
        sel_mark, sel_mask = scan.select
        recs = [r for r in kernel if (wire.entry_mark(r) or 0) & sel_mask == sel_mark]
        scan.on_batch(Batch(recs, [b""] * len(recs), 0, True, 0))
        scan.on_done(scan)

    async def go() -> None:
        a.count()
        finish(scans.pop())
        a.feed([_delivery(1, [wire.ResyncBegin(1), _entry(500), wire.ResyncEnd(1, 1)])])
        a.run()
        while a.queued or a.busy or scans:
            while scans:
                s = scans.pop(0)
                names.append(s.name)
                finish(s)
            await asyncio.sleep(0)
            a.run()

    names: list[str] = []
    asyncio.run(go())
    assert names == expect
    assert receiver.completed == [True]
    assert a.gens.held == {a.gens.done}  # after the END: only the refreshed generation
