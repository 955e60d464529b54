"""The replication engine's decisions that need no I/O: generations, the preemption hold,
dump retries, hand-over timeouts, mark bits. Scripted clocks only."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from invictusd import flows as F
from invictusd.sync import wire
from invictusd.sync.policy import (
    DEFAULT_TIMEOUTS,
    Backoff,
    Generations,
    PreemptionHold,
    Refusal,
    Remark,
    ReplicaMarks,
    Scope,
    Sweep,
    handover_timeout,
)
from invictusd.sync.wire import Delete, Entry
from tests.unit.test_sync_wire import entries


def test_marks() -> None:
    m = ReplicaMarks(30, 29, 28)
    assert (m.marked, m.replica, m.generation) == (1 << 30, 1 << 29, 1 << 28)
    user = 0x0000_00FF
    assert m.replica_mark(user | m.marked, 0) == user | m.marked | m.replica
    assert m.replica_mark(user | m.marked | m.generation, 1) == user | m.marked | m.replica | m.generation
    assert m.replica_mark(user | m.marked | m.generation, 0) == user | m.marked | m.replica
    assert m.own_mark(user | m.ours) == user | m.marked  # what travels and what the new owner keeps
    assert m.filter_replica(1) == (m.marked | m.replica | m.generation, m.marked | m.replica | m.generation)
    assert m.filter_replica() == (m.marked | m.replica, m.marked | m.replica)
    assert m.filter_own() == (m.marked, m.marked | m.replica)


def test_generations_sweep_exactly_what_the_completed_resync_did_not_refresh() -> None:
    g = Generations()
    assert g.begin() == [Remark(1, 0)]  # at start: what a previous run left is unknown
    assert g.parity == 1
    g.remarked(Remark(1, 0))
    g.injected()
    assert g.end() == Sweep(0) and (g.done, g.active) == (1, False)
    g.swept(Sweep(0))
    assert g.parity == 1  # between resyncs, events refresh with the completed parity
    assert g.begin() == [] and g.parity == 0
    assert g.end() == Sweep(1)
    assert g.end() is None  # an END without its BEGIN sweeps nothing


@given(st.lists(st.sampled_from(["begin", "end", "inject", "count", "empty"]), max_size=40),
       st.integers(0, 1000))
def test_generations_on_a_model_table(script: list[str], seed: int) -> None:
    """Whatever the interleaving of BEGIN (possibly interrupting), END, injections, a count of
    the kernel and a hand-over that empties it, the sweep at an END removes exactly the
    entries not refreshed since the BEGIN it closes, and a re-mark or a sweep is skipped only
    when the kernel holds no entry it would touch."""
    g = Generations()
    table: dict[int, int] = {k: k % 2 for k in range(10)}  # key -> parity (unknown at start)
    refreshed: set[int] | None = None
    n = 10 + seed % 7
    for step in script:
        if step == "begin":
            other = 1 - g.done
            steps = g.begin()
            if not steps:
                assert other not in table.values()  # nothing to re-mark
            for r in steps:
                for k, p in table.items():
                    if p == r.from_parity:
                        table[k] = r.to_parity
                g.remarked(r)
            refreshed = set()
        elif step == "inject":
            n += 1
            for k in (n % 13, n):
                table[k] = g.parity
                if refreshed is not None:
                    refreshed.add(k)
            g.injected()
        elif step == "count":
            g.counted(set(table.values()))
        elif step == "empty":
            table.clear()
            g.emptied()
            refreshed = None
        else:
            closing = refreshed is not None and g.active and g.begun
            sweep = g.end()
            if sweep is None:
                if closing:
                    assert refreshed is not None and set(table) <= refreshed  # nothing stale
                refreshed = None if closing else refreshed
                continue
            assert refreshed is not None
            swept = {k for k, p in table.items() if p == sweep.parity}
            assert swept == set(table) - refreshed
            for k in swept:
                del table[k]
            g.swept(sweep)
            refreshed = None
        assert set(table.values()) <= g.held  # ``held`` never forgets a parity in the kernel


def test_generations_skip_the_remark_and_the_sweep_of_a_node_that_holds_no_replica() -> None:
    """A node whose kernel holds no replica entry (counted at start; or a master whose
    hand-over made them its own) re-marks nothing at the next BEGIN and sweeps nothing at its
    END: each would be a dump of the whole replicated table."""
    g = Generations()
    g.counted(set())
    assert g.parity == g.done and not g.active
    assert g.begin() == []
    g.injected()
    assert g.end() is None  # the previous generation held nothing
    g.injected()
    assert g.begin() == [] and g.end() == Sweep(1 - g.done)  # now one generation is there

    g = Generations()
    g.counted({1})  # a previous run completed parity 1: it becomes the completed one
    assert (g.done, g.current, g.active) == (1, 1, False)
    assert g.begin() == [] and g.parity == 0
    g.injected()
    assert g.end() == Sweep(1)

    g = Generations()
    g.counted({0, 1})  # a resync of a previous run was left unfinished
    assert g.begin() == [Remark(1, 0)]

    g = Generations()
    g.injected()
    assert g.begin() == [Remark(1, 0)]  # nothing counted: unknown, re-marked
    g.emptied()  # a hand-over while master
    assert g.begin() == [] and g.end() is None


def test_preemption_hold_until_the_table_however_long_and_loudly() -> None:
    h = PreemptionHold(warn_every=10.0)
    d = h.update(0.0, link_up=True, synced=False)
    assert d.demoted and "table" in d.reason and not d.warn
    warns = [t for t in range(1, 100) if h.update(float(t), True, False).warn]
    assert warns == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert h.held_for(99.0) == 99.0
    assert h.update(100.0, True, True) == h.update(100.0, True, True)
    assert not h.update(100.0, True, True).demoted and h.held_for(100.0) is None


def test_preemption_hold_link_down_and_its_bound() -> None:
    h = PreemptionHold(hold_max=30.0)
    d = h.update(0.0, link_up=False, synced=True, interface="sync0")
    assert d.demoted and d.reason == "sync link sync0 is down"
    assert h.update(29.9, False, True).demoted
    d = h.update(30.0, False, True)
    assert not d.demoted and d.expired
    assert not h.update(40.0, False, True).expired  # said once
    assert not h.update(41.0, True, True).demoted
    assert h.update(42.0, True, False).demoted  # a new hold starts over


def test_backoff() -> None:
    b = Backoff(first=1.0, limit=8.0)
    assert [b.failed(0.0) for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    b.succeeded()
    assert b.failed(100.0) == 101.0 and b.failures == 7


@pytest.mark.parametrize(("proto", "state", "status", "name"), [
    (F.IPPROTO_TCP, F.TCP_ESTABLISHED, F.IPS_ASSURED, "nf_conntrack_tcp_timeout_established"),
    (F.IPPROTO_TCP, F.TCP_FIN_WAIT, 0, "nf_conntrack_tcp_timeout_fin_wait"),
    (F.IPPROTO_TCP, F.TCP_SYN_SENT2, 0, "nf_conntrack_tcp_timeout_syn_sent"),
    (F.IPPROTO_UDP, 0, F.IPS_ASSURED, "nf_conntrack_udp_timeout_stream"),
    (F.IPPROTO_UDP, 0, 0, "nf_conntrack_udp_timeout"),
    (F.IPPROTO_ICMP, 0, 0, "nf_conntrack_icmp_timeout"),
    (F.IPPROTO_ICMPV6, 0, 0, "nf_conntrack_icmpv6_timeout"),
    (F.IPPROTO_SCTP, 0, 0, "nf_conntrack_generic_timeout"),
])
def test_handover_timeout_is_what_the_kernel_gives_at_a_packet(proto: int, state: int, status: int,
                                                                name: str) -> None:
    assert handover_timeout(proto, state, status, {}) == DEFAULT_TIMEOUTS[name]
    assert handover_timeout(proto, state, status, {name: 7}) == 7


# ---- scope ----------------------------------------------------------------------------------

V4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def _entry(family: int = 4, zone: int = 0, rzone: int | None = None, mark: int = 1 << 30) -> Entry:
    src, dst = V4 if family == 4 else (b"\xfd" + bytes(15), b"\xfd" + bytes(14) + b"\x02")
    rz = zone if rzone is None else rzone
    return Entry(True, family, F.IPPROTO_TCP, src, dst, 1000, 80, zone, dst, src, 80, 1000, rz,
                 0, 60, mark, F.TCP_ESTABLISHED)


def test_scope_refuses_by_the_first_reason_that_applies() -> None:
    scope = Scope(30, frozenset({0, 7}), frozenset({4}))
    assert scope.refusal(_entry()) is None
    assert scope.refusal(_entry(zone=7)) is None
    assert scope.refusal(_entry(family=6)) is Refusal.FAMILY
    assert scope.refusal(_entry(zone=9)) is Refusal.ZONE
    assert scope.refusal(_entry(rzone=9)) is Refusal.ZONE  # a directional zone counts too
    assert scope.refusal(_entry(mark=1 << 27)) is Refusal.MARK
    assert scope.refusal(_entry(family=6, zone=9, mark=0)) is Refusal.FAMILY
    d = Delete(4, F.IPPROTO_TCP, *V4, 1000, 80, 9)
    assert scope.refusal(d) is Refusal.ZONE  # a delete has no mark to check
    assert scope.refusal(d._replace(zone=0)) is None


@given(st.lists(entries(), max_size=12), st.sets(st.sampled_from([0, 1, 3, 0xFFFF]), min_size=1),
       st.sets(st.sampled_from([4, 6]), min_size=1), st.booleans())
def test_scope_select_on_encoded_records_agrees_with_refusal(
        recs: list[Entry], zones: set[int], families: set[int], deletes: bool) -> None:
    scope = Scope(30, frozenset(zones), frozenset(families))
    # what the transcoder hands over: marked entries (and deletes, which carry no mark)
    items: list[Entry | Delete] = [
        Delete(*e[1:8]) if deletes and i % 2 else e._replace(mark=e.mark | 1 << 30)
        for i, e in enumerate(recs)]
    encoded = [wire.encode_record(r) for r in items]
    keys = [wire.entry_key(r) for r in items]
    got, got_keys, out = scope.select(encoded, keys)
    want = [i for i, r in enumerate(items) if scope.refusal(r) is None]
    assert got == [encoded[i] for i in want]
    assert got_keys == [keys[i] for i in want]
    assert out == len(items) - len(want)
