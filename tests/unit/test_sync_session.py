"""Two sync sessions wired through an in-memory link with a scripted clock.

Every scenario ends by comparing the tables entry by entry: what the sender's kernel holds
(a model of it here), what the sender's session holds, and what the receiver replicated.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from invictusd.flows import (
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT,
    TCP_ESTABLISHED,
    TCP_FIN_WAIT,
    TCP_SYN_SENT,
    EventKind,
    Flow,
    FlowEvent,
    FlowKey,
    inverse,
)
from invictusd.sync import wire
from invictusd.sync.session import (
    SessionConfig,
    SessionConfigError,
    SessionEventKind,
    SyncSession,
)

KEY = b"k" * 32
MARK = 0x40000000


def config(node_id: int, **kw: object) -> SessionConfig:
    return SessionConfig(node_id=node_id, key=KEY, **kw)  # type: ignore[arg-type]


# ---- a model kernel producing conntrack events ------------------------------------------


class Kernel:
    """A conntrack table that emits the events a kernel would (for the replicated mark)."""

    def __init__(self, rng: random.Random, node: int, id_space: int = 1 << 32) -> None:
        self.rng = rng
        self.node = node
        self.id_space = id_space
        self.table: dict[FlowKey, Flow] = {}

    def _key(self) -> FlowKey:
        r = self.rng
        kind = r.random()
        if kind < 0.7:
            proto = IPPROTO_TCP if r.random() < 0.7 else IPPROTO_UDP
            return FlowKey(
                4, proto, bytes([10, self.node, r.randrange(4), r.randrange(256)]),
                bytes([192, 0, 2, r.randrange(8)]), r.randrange(1024, 65536),
                r.choice((80, 443, 53)),
            )  # fmt: skip
        if kind < 0.85:
            return FlowKey(
                6, IPPROTO_TCP, bytes(15) + bytes([self.node]), r.randbytes(16),
                r.randrange(65536), 443, r.choice((0, 0, 7)),
            )  # fmt: skip
        return FlowKey(
            4, IPPROTO_ICMP, bytes([10, self.node, 0, r.randrange(256)]), bytes([8, 8, 8, 8]),
            r.randrange(65536), 8 << 8,
        )  # fmt: skip

    def _new_flow(self, key: FlowKey) -> Flow:
        r = self.rng
        reply = inverse(key)
        status = IPS_CONFIRMED
        if key.family == 4 and key.proto != IPPROTO_ICMP and r.random() < 0.3:
            reply = reply._replace(dst=bytes([203, 0, 113, 1]), dport=r.randrange(1024, 65536))
            status |= IPS_SRC_NAT
        tcp = TCP_SYN_SENT if key.proto == IPPROTO_TCP else 0
        return Flow(key, reply, r.randrange(1, self.id_space), status, 120, MARK, tcp)

    def churn(self, n: int) -> list[FlowEvent]:
        r = self.rng
        events = []
        for _ in range(n):
            x = r.random()
            if x < 0.4 or len(self.table) < 5:
                key = self._key()
                if key in self.table:
                    continue
                flow = self._new_flow(key)
                self.table[key] = flow
                events.append(FlowEvent(EventKind.NEW, flow))
            elif x < 0.8:
                key = r.choice(list(self.table))
                f = self.table[key]
                tcp = f.tcp_state
                if tcp:
                    tcp = r.choice((TCP_ESTABLISHED, TCP_FIN_WAIT))
                f = f._replace(
                    status=f.status | IPS_SEEN_REPLY | IPS_ASSURED,
                    timeout=r.randrange(1, 432000),
                    tcp_state=tcp,
                )
                self.table[key] = f
                events.append(FlowEvent(EventKind.UPDATE, f))
            else:
                key = r.choice(list(self.table))
                events.append(FlowEvent(EventKind.DESTROY, self.table.pop(key)))
        return events


# ---- the in-memory link -----------------------------------------------------------------


@dataclass
class Net:
    a: SyncSession
    b: SyncSession
    rng: random.Random
    loss: float = 0.0
    dup: float = 0.0
    jitter: float = 0.0  # reordering: extra random delay up to this
    delay: float = 0.0005
    up: bool = True
    now: float = 0.0
    sent: list[tuple[str, bytes]] = field(default_factory=list)  # every datagram, for replays
    _queue: list[tuple[float, int, str, bytes]] = field(default_factory=list)
    _n: int = 0

    def session(self, name: str) -> SyncSession:
        return self.a if name == "a" else self.b

    def inject(self, dst: str, data: bytes, at: float | None = None) -> None:
        self._n += 1
        heapq.heappush(self._queue, (self.now if at is None else at, self._n, dst, data))

    def _collect(self) -> None:
        for src, dst in (("a", "b"), ("b", "a")):
            for d in self.session(src).datagrams_to_send(self.now):
                self.sent.append((dst, d))
                if not self.up or self.rng.random() < self.loss:
                    continue
                t = self.now + self.delay + self.rng.random() * self.jitter
                self.inject(dst, d, t)
                if self.rng.random() < self.dup:
                    self.inject(dst, d, t + self.rng.random() * 0.01)

    def run(self, duration: float) -> None:
        end = self.now + duration
        spins = 0
        while True:
            self._collect()
            t = min(x for x in (self.a.next_deadline(), self.b.next_deadline(), end) if x is not None)
            if self._queue:
                t = min(t, self._queue[0][0])
            if t >= end and not (self._queue and self._queue[0][0] <= end):
                self.now = end
                self._collect()
                return
            if t <= self.now:
                spins += 1
                assert spins < 10_000, "the sessions spin: a deadline that never moves"
            else:
                spins = 0
            self.now = max(self.now, t)
            while self._queue and self._queue[0][0] <= self.now:
                _, _, dst, data = heapq.heappop(self._queue)
                self.session(dst).datagram_received(data, self.now)
                self._collect()
            for s in (self.a, self.b):
                dl = s.next_deadline()
                if dl is not None and dl <= self.now:
                    s.timer(self.now)

    def settle(self, limit: float = 30.0) -> None:
        """Run until both sides are idle and synced (fails after ``limit`` simulated seconds)."""
        start = self.now
        while self.now - start < limit:
            self.run(0.25)
            if self.a.idle and self.b.idle and self.a.synced and self.b.synced:
                return
        raise AssertionError(f"not settled: a={self.a.status()} b={self.b.status()}")


def make_pair(seed: int = 1, **net: object) -> tuple[Net, Kernel, Kernel]:
    rng = random.Random(seed)
    a = SyncSession(config(1), epoch=rng.getrandbits(64) | 1, now=0.0)
    b = SyncSession(config(2), epoch=rng.getrandbits(64) | 1, now=0.0)
    return Net(a, b, rng, **net), Kernel(rng, 1), Kernel(rng, 2)  # type: ignore[arg-type]


def assert_replicated(n: Net, ka: Kernel, kb: Kernel) -> None:
    assert n.a.local_flows() == ka.table
    assert n.b.local_flows() == kb.table
    assert n.b.peer_flows() == ka.table
    assert n.a.peer_flows() == kb.table


def drive(n: Net, ka: Kernel, kb: Kernel, rounds: int, per_round: int = 20) -> None:
    for _ in range(rounds):
        n.a.local_events(ka.churn(per_round), n.now)
        n.b.local_events(kb.churn(per_round // 2), n.now)
        n.run(0.003)


# ---- scenarios --------------------------------------------------------------------------


def test_initial_bulk_then_incremental_replication() -> None:
    n, ka, kb = make_pair()
    ka.churn(300)
    n.a.local_resync(ka.table.values(), n.now)
    assert not n.a.synced and not n.b.synced
    n.settle()
    assert_replicated(n, ka, kb)
    assert n.b.peer_count == len(ka.table) > 0
    drive(n, ka, kb, 100)
    n.settle()
    assert_replicated(n, ka, kb)
    kinds = {e.kind for e in n.b.pop_events()}
    assert SessionEventKind.PEER_RESYNC_COMPLETED in kinds
    c = n.b.counters
    assert c["drop_auth"] == c["drop_malformed"] == c["divergences"] == 0
    # compact records were used: most updates and deletes never needed a FULL record
    assert n.a.counters["resyncs_started"] == 1


@pytest.mark.parametrize("loss", [0.1, 0.3])
def test_random_loss(loss: float) -> None:
    n, ka, kb = make_pair(seed=int(loss * 100), loss=loss)
    drive(n, ka, kb, 150)
    n.settle(60)
    assert_replicated(n, ka, kb)
    assert n.a.counters["retransmits"] > 0
    assert n.b.counters["divergences"] == 0


def test_reordering_and_duplication() -> None:
    n, ka, kb = make_pair(seed=7, jitter=0.02, dup=0.2)
    drive(n, ka, kb, 150)
    n.settle()
    assert_replicated(n, ka, kb)
    assert n.b.counters["drop_duplicate"] > 0
    assert n.b.counters["divergences"] == 0


def test_replayed_datagrams_have_no_effect() -> None:
    n, ka, kb = make_pair(seed=3)
    drive(n, ka, kb, 50)
    n.settle()
    old = list(n.sent)
    drive(n, ka, kb, 50)
    n.settle()
    before = (n.a.peer_flows(), n.b.peer_flows())
    resyncs = (n.a.counters["resyncs_started"], n.b.counters["resyncs_started"])
    for dst, data in old:
        n.inject(dst, data)
    n.run(1.0)
    n.settle()
    assert (n.a.peer_flows(), n.b.peer_flows()) == before
    assert (n.a.counters["resyncs_started"], n.b.counters["resyncs_started"]) == resyncs
    assert n.b.counters["drop_duplicate"] > 0
    assert n.b.status()["replay_drops"] > 0
    assert_replicated(n, ka, kb)


def test_rewritten_sequence_numbers_and_forgeries_are_rejected() -> None:
    n, ka, kb = make_pair(seed=4)
    drive(n, ka, kb, 40)
    n.settle()
    before = n.b.peer_flows()
    data_to_b = [d for dst, d in n.sent if dst == "b" and d[3] == wire.DatagramType.DATA]
    rng = random.Random(9)
    assert len(data_to_b) >= 10
    for d in data_to_b:
        forged = bytearray(d)
        forged[24:28] = rng.getrandbits(32).to_bytes(4, "big")  # a jump of the sequence
        n.inject("b", bytes(forged))
        n.inject("b", bytes(b ^ 0xFF if i == 40 else b for i, b in enumerate(d)))
    # a full datagram built with the wrong key: deletes everything if it were accepted
    h = wire.Header(wire.DatagramType.DATA, 1, n.a.epoch, n.b.epoch, 1_000_000, 0, wire.FLAG_SYNC_POINT)
    evil: list[wire.Record] = [wire.ResyncBegin(99), wire.ResyncEnd(99, 0, 0)]
    n.inject("b", wire.encode_datagram(h, evil, b"x" * 32))
    n.inject("b", b"garbage")
    n.inject("b", rng.randbytes(200))
    n.run(0.5)
    assert n.b.peer_flows() == before
    assert n.b.counters["drop_auth"] == 2 * len(data_to_b) + 1
    assert n.b.counters["drop_malformed"] == 2
    assert_replicated(n, ka, kb)


def test_reflected_datagrams_are_dropped() -> None:
    n, ka, kb = make_pair(seed=5)
    drive(n, ka, kb, 10)
    n.settle()
    own = [d for dst, d in n.sent if dst == "b"]
    for d in own:
        n.inject("a", d)  # a's own datagrams back to itself
    n.run(0.5)
    assert n.a.counters["drop_reflected"] == len(own)
    assert_replicated(n, ka, kb)


def test_peer_restart_bulk_resync_and_old_epoch_replays() -> None:
    n, ka, kb = make_pair(seed=6)
    drive(n, ka, kb, 40)
    n.settle()
    old_a_to_b = [d for dst, d in n.sent if dst == "b"]
    old_b_to_a = [d for dst, d in n.sent if dst == "a"]
    assert n.a.synced
    # b's daemon restarts: new epoch, its kernel table survives and is dumped at start
    n.b = SyncSession(config(2), epoch=0xB2B2, now=n.now)
    n.b.local_resync(kb.table.values(), n.now)
    n.run(0.001)
    n.settle()
    assert n.a.counters["peer_restarts"] == 1
    assert any(e.kind is SessionEventKind.PEER_RESTARTED for e in n.a.pop_events())
    assert_replicated(n, ka, kb)
    # replays from before the restart: old datagrams to b name b's old epoch; b's old
    # datagrams to a come from a retired epoch
    for d in old_a_to_b:
        n.inject("b", d)
    for d in old_b_to_a:
        n.inject("a", d)
    n.run(0.5)
    assert n.b.counters["drop_epoch"] >= len(old_a_to_b) - 5  # a few were HELLOs before b knew a
    assert n.a.counters["drop_retired_epoch"] == len(old_b_to_a)
    assert n.a.counters["peer_restarts"] == 1
    n.settle()
    assert_replicated(n, ka, kb)


def test_peer_reboot_with_empty_table_clears_replica() -> None:
    n, ka, kb = make_pair(seed=8)
    drive(n, ka, kb, 40)
    n.settle()
    assert n.a.peer_count > 0
    kb.table.clear()  # the whole machine rebooted: kernel table gone
    n.b = SyncSession(config(2), epoch=0xB3, now=n.now)
    n.b.local_resync([], n.now)
    assert not n.b.synced
    n.settle()
    assert n.a.synced and n.a.peer_count == 0
    assert_replicated(n, ka, kb)


def test_synced_waits_for_the_first_complete_resync() -> None:
    n, ka, kb = make_pair(seed=10)
    ka.churn(2000)
    n.a.local_resync(ka.table.values(), n.now)
    n.a.link_changed(True, n.now)
    n.run(0.0008)
    assert n.b.peer_count < len(ka.table)
    assert not n.b.synced
    n.settle()
    assert n.b.synced
    assert_replicated(n, ka, kb)


def test_link_down_then_up() -> None:
    n, ka, kb = make_pair(seed=11)
    drive(n, ka, kb, 20)
    n.settle()
    for s in (n.a, n.b):
        s.link_changed(False, n.now)
    n.up = False
    drive(n, ka, kb, 60)
    n.run(5.0)
    assert n.a.status()["queue_depth"] > 0
    assert not n.a.peer_alive
    n.up = True
    for s in (n.a, n.b):
        s.link_changed(True, n.now)
    n.settle()
    assert_replicated(n, ka, kb)
    assert n.a.counters["resyncs_started"] == 1  # incremental catch-up, no resync needed


def test_backlog_overflow_falls_back_to_resync() -> None:
    rng = random.Random(12)
    a = SyncSession(config(1, pending_capacity=50, retransmit_capacity=4), 0xA, 0.0)
    b = SyncSession(config(2), 0xB, 0.0)
    n = Net(a, b, rng)
    ka, kb = Kernel(rng, 1), Kernel(rng, 2)
    drive(n, ka, kb, 10)
    n.settle()
    n.up = False  # the peer is unreachable, the link looks fine: the window fills
    drive(n, ka, kb, 40)
    n.run(1.0)
    assert a.counters["overflows"] >= 1
    assert any(e.kind is SessionEventKind.OVERFLOW for e in a.pop_events())
    n.up = True
    n.settle()
    assert a.counters["resyncs_started"] >= 2
    assert b.counters["gaps_skipped"] + b.counters["peer_resyncs_started"] >= 2
    assert_replicated(n, ka, kb)


def test_local_resync_after_overrun_repairs_lost_deletes() -> None:
    n, ka, kb = make_pair(seed=13)
    drive(n, ka, kb, 30)
    n.settle()
    # an overrun: the kernel changed but the events never reached the session
    ka.churn(200)
    n.a.local_events(ka.churn(10)[:3], n.now)  # a few made it, out of context
    n.run(0.1)
    assert n.b.peer_flows() != ka.table
    n.a.local_resync(ka.table.values(), n.now)
    n.settle()
    assert_replicated(n, ka, kb)


def test_digest_detects_divergence_and_resync_repairs_it() -> None:
    n, ka, kb = make_pair(seed=14)
    drive(n, ka, kb, 30)
    n.settle()
    # corrupt b's replica behind the protocol's back (a bug, bit rot...)
    victim = next(iter(n.b._peer))
    del n.b._peer[victim]
    n.run(11.0)  # past one digest interval
    assert n.b.counters["divergences"] >= 1
    n.settle()
    assert_replicated(n, ka, kb)
    assert n.a.counters["resyncs_started"] == 2


def test_reused_and_colliding_conntrack_ids() -> None:
    rng = random.Random(15)
    n, _, kb = make_pair(seed=15, loss=0.05)
    ka = Kernel(rng, 1, id_space=8)  # ids collide all the time
    drive(n, ka, kb, 120)
    n.settle()
    assert_replicated(n, ka, kb)
    assert n.b.counters["update_unknown"] == n.b.counters["divergences"] == 0


def test_config_errors_name_the_field() -> None:
    with pytest.raises(SessionConfigError) as e:
        SessionConfig(node_id=1, key=b"short")
    assert e.value.field == "key"
    with pytest.raises(SessionConfigError) as e:
        SessionConfig(node_id=70000, key=KEY)
    assert e.value.field == "node_id"
    with pytest.raises(SessionConfigError) as e:
        config(1, resend_timeout=0)
    assert e.value.field == "resend_timeout"


def test_status_and_deadline() -> None:
    n, ka, kb = make_pair(seed=16)
    assert n.a.next_deadline() == 0.0  # the first HELLO is due at once
    drive(n, ka, kb, 5)
    n.settle()
    st_ = n.a.status()
    for k in ("peer_epoch", "link_up", "local_entries", "peer_entries", "queue_depth",
              "resends", "resyncs", "auth_failures", "replay_drops", "lag", "synced"):  # fmt: skip
        assert k in st_
    assert st_["peer_epoch"] == n.b.epoch and st_["synced"]
    dl = n.a.next_deadline()
    assert dl is not None and dl > n.now


# ---- randomized convergence -------------------------------------------------------------


def _scenario(seed: int, loss: float, dup: float, jitter: float, outages: int) -> Iterator[None]:
    n, ka, kb = make_pair(seed=seed, loss=loss, dup=dup, jitter=jitter)
    rng = random.Random(seed)
    for _ in range(outages + 1):
        drive(n, ka, kb, rng.randrange(5, 40), per_round=rng.randrange(1, 40))
        if outages:
            n.up = False
            drive(n, ka, kb, rng.randrange(1, 10))
            n.run(rng.random() * 2)
            n.up = True
        yield
    n.settle(120)
    assert_replicated(n, ka, kb)
    yield


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    loss=st.sampled_from([0.0, 0.05, 0.2, 0.4]),
    dup=st.sampled_from([0.0, 0.1]),
    jitter=st.sampled_from([0.0, 0.005, 0.05]),
    outages=st.integers(0, 2),
)
def test_converges_under_random_loss_reorder_and_outages(
    seed: int, loss: float, dup: float, jitter: float, outages: int
) -> None:
    for _ in _scenario(seed, loss, dup, jitter, outages):
        pass


# ---- audit (issue 8) ----------------------------------------------------------------------


def test_replayed_hello_from_an_epoch_before_our_restart_changes_nothing() -> None:
    """Issue 8 item 2: a HELLO captured before this node restarted must not retire the
    real peer's epoch (it used to, and every genuine datagram was dropped for good)."""
    n, ka, kb = make_pair(seed=21)
    drive(n, ka, kb, 20)
    n.settle()
    old_hellos = [d for dst, d in n.sent
                  if dst == "a" and d[3] == wire.DatagramType.HELLO]
    assert old_hellos
    # b restarts (new epoch), then a restarts: a's retired list is empty again.
    n.b = SyncSession(config(2), epoch=0xB0B2, now=n.now)
    n.b.local_resync(kb.table.values(), n.now)
    n.settle()
    n.a = SyncSession(config(1), epoch=0xA0A2, now=n.now)
    n.a.local_resync(ka.table.values(), n.now)
    n.settle()
    assert n.a.peer_epoch == 0xB0B2
    unproven = n.a.counters.get("hellos_unproven", 0)
    for d in old_hellos:  # the replay: b's first epoch says HELLO to a
        n.inject("a", d)
    n.run(0.5)
    assert n.a.peer_epoch == 0xB0B2, "a replayed HELLO took over the peer epoch"
    assert n.a.counters["hellos_unproven"] == unproven + len(old_hellos)
    assert n.a.counters["peer_restarts"] == 0
    assert n.a.counters["drop_retired_epoch"] == 0
    drive(n, ka, kb, 20)
    n.settle()
    assert n.a.synced and n.b.synced
    assert_replicated(n, ka, kb)


def test_a_new_epoch_is_adopted_once_it_proves_it_knows_ours() -> None:
    """The real peer after a restart: its HELLO is answered, it answers bound to us."""
    n, ka, kb = make_pair(seed=22)
    drive(n, ka, kb, 10)
    n.settle()
    n.b = SyncSession(config(2), epoch=0xB0B3, now=n.now)
    n.b.local_resync(kb.table.values(), n.now)
    n.settle(5)
    assert n.a.peer_epoch == 0xB0B3 and n.a.counters["peer_restarts"] == 1
    assert n.a.counters["hellos_unproven"] >= 1  # b's first HELLO did not know a's epoch
    assert_replicated(n, ka, kb)


def _flow(mark: int = MARK, zone: int = 0, family: int = 4, port: int = 1000) -> Flow:
    if family == 4:
        key = FlowKey(4, IPPROTO_TCP, bytes([10, 0, port >> 8 & 0xFF, port & 0xFF]),
                      bytes([192, 0, 2, 1]), port, 443, zone)
    else:
        key = FlowKey(6, IPPROTO_TCP, bytes(14) + port.to_bytes(2, "big"), bytes(15) + b"\x01",
                      port, 443, zone)
    return Flow(key, inverse(key), port, IPS_CONFIRMED, 120, mark, TCP_ESTABLISHED)


def test_receiver_refuses_entries_without_the_mark_or_in_foreign_zones_and_families() -> None:
    """Issue 8 item 1, defence in depth: an authenticated peer (or a stolen key) cannot plant
    an unmarked entry, one in a zone or an address family this node does not use."""
    rng = random.Random(23)
    a = SyncSession(config(1), epoch=0xA1, now=0.0)
    b = SyncSession(config(2, mark_mask=MARK, zones=frozenset({0}), families=frozenset({4})),
                    epoch=0xB1, now=0.0)
    n = Net(a, b, rng)
    good = [_flow(port=p) for p in range(1000, 1010)]
    bad = {
        "rejected_mark": _flow(mark=0x1, port=2000),
        "rejected_zone": _flow(zone=7, port=2001),
        "rejected_family": _flow(family=6, port=2002),
    }
    n.a.local_resync([*good, *bad.values()], n.now)
    n.run(2.0)
    held = n.b.peer_flows()
    assert set(held) == {f.orig for f in good}
    for counter, f in bad.items():
        assert n.b.counters[counter] >= 1, counter
        assert f.orig not in held
    refused = n.b.counters["rejected_mark"]
    assert any(e.kind is SessionEventKind.REJECTED for e in n.b.pop_events())
    # An update that clears the mark bit is refused too: the replica never holds the entry
    # unmarked (it keeps the marked state, or drops it at the next resync's sweep).
    n.a.local_events([FlowEvent(EventKind.UPDATE, good[0]._replace(mark=0, timeout=7))], n.now)
    n.run(1.0)
    kept = n.b.peer_flows().get(good[0].orig)
    assert kept is None or kept.mark == MARK
    assert n.b.counters["rejected_mark"] > refused


def test_peer_table_over_capacity_is_a_divergence_not_memory_growth() -> None:
    """Issue 8 item 4: the peer table is capped; overflow is counted, logged (an event),
    makes the replica unsynced and is repaired by resyncs once the peer's table fits."""
    rng = random.Random(24)
    a = SyncSession(config(1), epoch=0xA1, now=0.0)
    b = SyncSession(config(2, peer_capacity=50), epoch=0xB1, now=0.0)
    n = Net(a, b, rng)
    flows = [_flow(port=p) for p in range(1000, 1080)]
    n.a.local_resync(flows, n.now)
    n.run(3.0)
    assert n.b.peer_count == 50
    assert n.b.counters["peer_overflow"] >= 30  # each resync offers the 30 that do not fit
    assert not n.b.synced
    assert any(e.kind is SessionEventKind.PEER_OVERFLOW for e in n.b.pop_events())
    # resyncs are requested with back-off while it does not fit, not in a storm
    started = n.a.counters["resyncs_started"]
    n.run(60.0)
    assert n.b.peer_count == 50
    # back-off doubles from 1 s to 64 s: 1+2+4+8+16+32 = 63 s, at most 6 more resyncs
    assert n.a.counters["resyncs_started"] - started <= 6, n.a.counters["resyncs_started"]
    # the peer's table shrinks: the next resync fits and the replica is complete again
    gone = [FlowEvent(EventKind.DESTROY, f) for f in flows[40:]]
    n.a.local_events(gone, n.now)
    n.run(130.0)
    assert n.b.synced
    assert set(n.b.peer_flows()) == {f.orig for f in flows[:40]}
