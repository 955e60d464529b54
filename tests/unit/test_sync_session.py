"""Two sync sessions wired through an in-memory link with a scripted clock.

Each node has a model kernel: a dict of entries, each owned or held as a replica of the peer
(with a resync parity), exactly what the engine keeps in the real kernel's marks. The model
adapter does what ``invictusd.replication`` and ``invictusd.applier`` do: it turns events
into records, drives resyncs from a "dump" of its table, and applies the peer's deliveries
(including the generation bookkeeping of ``policy.Generations``). Every scenario ends by
comparing tables entry by entry: the master's own entries against the backup's replicas.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from invictusd.flows import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_ESTABLISHED, TCP_SYN_SENT
from invictusd.sync import wire
from invictusd.sync.policy import Generations, Remark
from invictusd.sync.receiver import Delivery, ReceiverConfig
from invictusd.sync.sender import SenderConfig
from invictusd.sync.session import SessionConfig, SessionConfigError, SessionEventKind, SyncSession
from invictusd.sync.wire import Delete, Digest, Entry, RequestReason, ResyncBegin, ResyncEnd, reply_of

KEY = b"k" * 32
MARK = 0x40000000

Key = bytes


def config(node_id: int, **kw: object) -> SessionConfig:
    return SessionConfig(node_id=node_id, key=KEY, **kw)  # type: ignore[arg-type]


@dataclass
class Held:
    entry: Entry
    replica: bool
    parity: int = 0


@dataclass
class Node:
    """One firewall: its session, its kernel, and the model of the engine around them."""

    name: str
    session: SyncSession
    rng: random.Random
    kernel: dict[Key, Held] = field(default_factory=dict)
    master: bool = False
    gens: Generations = field(default_factory=Generations)
    bulk: list[bytes] | None = None  # records of a dump being streamed
    refused: int = 0  # entries this kernel would not take (capacity)
    capacity: int = 1 << 30
    chunk: int = 100
    touched: set[bytes] = field(default_factory=set)  # keys of events since the bulk began

    # ---- the kernel making events (only our own entries change by traffic) ----

    def _new_key(self) -> tuple[int, int, bytes, bytes, int, int, int]:
        r = self.rng
        x = r.random()
        if x < 0.7:
            return (4, IPPROTO_TCP if r.random() < 0.7 else IPPROTO_UDP,
                    bytes([10, ord(self.name[-1]) % 250, r.randrange(4), r.randrange(256)]),
                    bytes([192, 0, 2, r.randrange(8)]), r.randrange(1024, 65536), r.choice((80, 443)), 0)
        if x < 0.85:
            return (6, IPPROTO_TCP, bytes(15) + self.name[-1].encode(), r.randbytes(16),
                    r.randrange(65536), 443, r.choice((0, 0, 7)))
        return (4, IPPROTO_ICMP, bytes([10, 9, 0, r.randrange(256)]), bytes([8, 8, 8, 8]),
                r.randrange(65536), 8 << 8, 0)

    def churn(self, n: int) -> tuple[list[bytes], list[bytes]]:
        """``n`` kernel events on our own entries, as the transcoder hands them over."""
        r = self.rng
        recs: list[bytes] = []
        keys: list[bytes] = []
        own = [k for k, h in self.kernel.items() if not h.replica]
        for _ in range(n):
            x = r.random()
            if x < 0.4 or len(own) < 5:
                family, proto, src, dst, sp, dp, zone = self._new_key()
                k = wire.key_bytes(family, proto, src, dst, sp, dp, zone)
                if k in self.kernel:
                    continue
                rs, rd, rsp, rdp = reply_of(proto, src, dst, sp, dp)
                if proto == IPPROTO_TCP and family == 4 and r.random() < 0.3:
                    rd, rdp = bytes([203, 0, 113, 1]), r.randrange(1024, 65536)  # SNAT
                e = Entry(True, family, proto, src, dst, sp, dp, zone, rs, rd, rsp, rdp, zone,
                          8, 120, MARK, TCP_SYN_SENT if proto == IPPROTO_TCP else 0)
                self.kernel[k] = Held(e, False)
                own.append(k)
            elif x < 0.8:
                k = r.choice(own)
                e = self.kernel[k].entry
                e = e._replace(new=False, status=e.status | 6, timeout=r.randrange(1, 432000),
                               tcp_state=TCP_ESTABLISHED if e.tcp_state else 0)
                self.kernel[k] = Held(e, False)
            else:
                k = r.choice(own)
                own.remove(k)
                e = self.kernel.pop(k).entry
                recs.append(wire.encode_delete(Delete(e.family, e.proto, e.src, e.dst, e.sport, e.dport,
                                                      e.zone)))
                keys.append(k)
                continue
            recs.append(wire.encode_entry(e))
            keys.append(k)
        return recs, keys

    def events(self, n: int, now: float) -> None:
        recs, keys = self.churn(n)
        if self.master:
            self.session.records(recs, keys)
            self.touched.update(keys)

    # ---- the engine model -----------------------------------------------------------

    def owned(self) -> dict[Key, Entry]:
        return {k: h.entry._replace(new=False) for k, h in self.kernel.items() if not h.replica}

    def replicas(self) -> dict[Key, Entry]:
        return {k: h.entry._replace(new=False) for k, h in self.kernel.items() if h.replica}

    def set_role(self, master: bool, now: float) -> None:
        if master and not self.master:
            for h in self.kernel.values():  # the hand-over
                h.replica = False
        self.master = master
        self.session.set_role(master, now)
        self.bulk = None
        if not master:
            self.session.divergence(RequestReason.BECAME_BACKUP, now)

    def step(self, now: float) -> None:
        s = self.session.sender
        if self.bulk is not None and s.phase.value != "resyncing":
            self.bulk = None  # the sender gave the resync up (an overflow): it starts over
        if self.master and s.resync_wanted and self.bulk is None and self.session.peer_epoch:
            s.begin_resync(now)
            self.bulk = [wire.encode_entry(e) for e in self.owned().values()]
            self.touched = set()
        if self.bulk is not None and s.bulk_room:  # one dump chunk per step, like the kernel's
            chunk, self.bulk = self.bulk[:self.chunk], self.bulk[self.chunk:]
            # what an event told about since the bulk began is newer than this snapshot
            s.bulk([r for r in chunk if wire.entry_key(wire.decode_records(r)[0]) not in self.touched])
            if not self.bulk:
                s.end_resync(now)
                self.bulk = None
        for d in self.session.take_deliveries():
            self.apply(d, now)
            self.session.applied(d.seq, now)

    def apply(self, d: Delivery, now: float) -> None:
        for rec in d.records:
            if isinstance(rec, Entry):
                k = wire.entry_key(rec)
                if not self.master and k not in self.kernel and len(self.kernel) >= self.capacity:
                    self.refused += 1
                    continue
                self.kernel[k] = Held(rec, not self.master, self.gens.parity)
            elif isinstance(rec, Delete):
                self.kernel.pop(wire.entry_key(rec), None)
            elif isinstance(rec, ResyncBegin):
                for step in self.gens.begin():
                    assert isinstance(step, Remark)
                    for h in self.kernel.values():
                        if h.replica and h.parity == step.from_parity:
                            h.parity = step.to_parity
                self.session.receiver.resync_begun(now)
                self.refused = 0
            elif isinstance(rec, ResyncEnd):
                sweep = self.gens.end()
                if sweep is not None:
                    for k in [k for k, h in self.kernel.items() if h.replica and h.parity == sweep.parity]:
                        del self.kernel[k]
                self.session.receiver.resync_completed(now, self.refused == 0)
            elif isinstance(rec, Digest):
                reps = self.replicas()
                xor = 0
                for e in reps.values():
                    xor ^= wire.key_hash(e.family, e.proto, e.src, e.dst, e.sport, e.dport, e.zone)
                if (len(reps), xor) != (rec.entries, rec.digest):
                    self.session.receiver.digest_mismatch(now)

    def digest(self, now: float) -> None:
        own = self.owned()
        xor = 0
        for e in own.values():
            xor ^= wire.key_hash(e.family, e.proto, e.src, e.dst, e.sport, e.dport, e.zone)
        self.session.digest(len(own), xor, now)


# ---- the in-memory link -----------------------------------------------------------------


@dataclass
class Net:
    a: Node
    b: Node
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

    def node(self, name: str) -> Node:
        return self.a if name == "a" else self.b

    def inject(self, dst: str, data: bytes, at: float | None = None) -> None:
        self._n += 1
        heapq.heappush(self._queue, (self.now if at is None else at, self._n, dst, data))

    def _collect(self) -> None:
        for src, dst in (("a", "b"), ("b", "a")):
            n = self.node(src)
            n.step(self.now)
            for d in n.session.datagrams_to_send(self.now):
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
            t = min(self.a.session.next_deadline(), self.b.session.next_deadline(), end)
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
                self.node(dst).session.datagram_received(data, self.now)
                self._collect()
            for n in (self.a, self.b):
                if n.session.next_deadline() <= self.now:
                    n.session.timer(self.now)

    def settle(self, limit: float = 30.0) -> None:
        """Run until the master's table is held by the backup and everything is acked."""
        start = self.now
        while self.now - start < limit:
            self.run(0.25)
            m, bk = (self.a, self.b) if self.a.master else (self.b, self.a)
            if m.session.sender.in_sync and m.session.idle and bk.session.idle and bk.session.synced:
                return
        raise AssertionError(f"not settled: a={self.a.session.status()} b={self.b.session.status()}")


def make_pair(seed: int = 1, **net: object) -> Net:
    rng = random.Random(seed)
    a = Node("a", SyncSession(config(1), epoch=rng.getrandbits(64) | 1, now=0.0), random.Random(seed + 1))
    b = Node("b", SyncSession(config(2), epoch=rng.getrandbits(64) | 1, now=0.0), random.Random(seed + 2))
    n = Net(a, b, rng, **net)  # type: ignore[arg-type]
    a.set_role(True, 0.0)
    return n


def assert_replicated(n: Net) -> None:
    m, bk = (n.a, n.b) if n.a.master else (n.b, n.a)
    assert bk.replicas() == m.owned()
    assert not m.replicas()


def drive(n: Net, rounds: int, per_round: int = 20) -> None:
    m = n.a if n.a.master else n.b
    for _ in range(rounds):
        m.events(per_round, n.now)
        n.run(0.003)


# ---- scenarios --------------------------------------------------------------------------


def test_initial_bulk_then_incremental_replication() -> None:
    n = make_pair()
    n.a.churn(300)
    assert not n.b.session.synced
    n.settle()
    assert_replicated(n)
    assert len(n.b.replicas()) == len(n.a.owned()) > 0
    drive(n, 100)
    n.settle()
    assert_replicated(n)
    c = n.b.session.counters
    assert c.drop_auth == c.drop_malformed == 0
    assert n.b.session.receiver.counters.divergences == 0
    assert n.a.session.sender.counters.resyncs_started == 1
    assert n.a.session.status()["synced"] is False  # a master holds no replica of its peer
    assert n.a.session.sender.in_sync


def test_only_the_master_sends() -> None:
    n = make_pair()
    n.b.churn(50)  # the backup's own traffic: never announced
    n.b.events(50, n.now)
    drive(n, 20)
    n.settle()
    assert_replicated(n)
    assert n.b.session.sender.counters.datagrams == 0
    assert not n.a.replicas()


@pytest.mark.parametrize("loss", [0.1, 0.3])
def test_random_loss(loss: float) -> None:
    n = make_pair(seed=int(loss * 100), loss=loss)
    drive(n, 150)
    n.settle(60)
    assert_replicated(n)
    assert n.a.session.sender.counters.retransmits > 0


def test_reordering_and_duplication() -> None:
    n = make_pair(seed=7, jitter=0.02, dup=0.2)
    drive(n, 150)
    n.settle()
    assert_replicated(n)
    assert n.b.session.receiver.counters.duplicates > 0


def test_a_datagram_is_held_as_its_bytes() -> None:
    """Decoded records take ~15x their datagram: every datagram, in order or waiting, is
    held as its records' bytes, and decodes to what was sent."""
    ours, peers = 0x1111, 0x2222
    s = SyncSession(config(1, peer_node_id=2), epoch=ours, now=0.0)

    def dg(seq: int, records: list[wire.Record], flags: int = 0) -> bytes:
        h = wire.Header(wire.DatagramType.DATA, 2, peers, ours, seq, 0, flags)
        return wire.encode_datagram(h, records, KEY)

    server = bytes([10, 20, 0, 100])
    entries: list[wire.Record] = [
        Entry(True, 4, IPPROTO_TCP, bytes([10, 10, 0, i]), server, 1024 + i, 9001, 0,
              server, bytes([10, 10, 0, i]), 9001, 1024 + i, 0, 0xE, 3600, MARK, TCP_ESTABLISHED)
        for i in range(40)]
    s.datagram_received(dg(1, [ResyncBegin(1)], wire.FLAG_SYNC_POINT), 0.0)
    s.datagram_received(dg(3, entries[20:]), 0.001)  # out of order: it waits
    s.datagram_received(dg(2, entries[:20]), 0.002)
    d1, d2, d3 = s.take_deliveries()
    assert [d.seq for d in (d1, d2, d3)] == [1, 2, 3]
    assert list(d2.records) == entries[:20] and list(d3.records) == entries[20:]
    assert d3.payload == b"".join(wire.encode_record(e) for e in entries[20:])
    assert d2.payload == b"".join(wire.encode_record(e) for e in entries[:20])
    assert s.receiver.counters.records == 41


def test_replayed_datagrams_have_no_effect() -> None:
    n = make_pair(seed=3)
    drive(n, 50)
    n.settle()
    old = list(n.sent)
    drive(n, 50)
    n.settle()
    before = n.b.replicas()
    resyncs = n.a.session.sender.counters.resyncs_started
    for dst, data in old:
        n.inject(dst, data)
    n.run(1.0)
    n.settle()
    assert n.b.replicas() == before
    assert n.a.session.sender.counters.resyncs_started == resyncs
    assert n.b.session.status()["replay_drops"] > 0
    assert_replicated(n)


def test_rewritten_sequence_numbers_and_forgeries_are_rejected() -> None:
    n = make_pair(seed=4)
    drive(n, 40)
    n.settle()
    before = n.b.replicas()
    data_to_b = [d for dst, d in n.sent if dst == "b" and d[3] == wire.DatagramType.DATA]
    rng = random.Random(9)
    assert len(data_to_b) >= 10
    for d in data_to_b:
        forged = bytearray(d)
        forged[24:28] = rng.getrandbits(32).to_bytes(4, "big")  # a jump of the sequence
        n.inject("b", bytes(forged))
        n.inject("b", bytes(b ^ 0xFF if i == 40 else b for i, b in enumerate(d)))
    # a whole resync sealed with the wrong key: it would delete everything if accepted
    h = wire.Header(wire.DatagramType.DATA, 1, n.a.session.epoch, n.b.session.epoch, 1_000_000, 0,
                    wire.FLAG_SYNC_POINT)
    n.inject("b", wire.encode_datagram(h, [ResyncBegin(99), ResyncEnd(99, 0)], b"x" * 32))
    n.inject("b", b"garbage")
    n.inject("b", rng.randbytes(200))
    n.run(0.5)
    assert n.b.replicas() == before
    assert n.b.session.counters.drop_auth == 2 * len(data_to_b) + 1
    assert n.b.session.counters.drop_malformed == 2
    assert_replicated(n)


def test_reflected_datagrams_are_dropped() -> None:
    n = make_pair(seed=5)
    drive(n, 10)
    n.settle()
    own = [d for dst, d in n.sent if dst == "b"]
    for d in own:
        n.inject("a", d)  # a's own datagrams back to itself
    n.run(0.5)
    assert n.a.session.counters.drop_reflected == len(own)
    assert_replicated(n)


def test_backup_restart_gets_the_bulk_and_stale_replicas_are_swept() -> None:
    n = make_pair(seed=6)
    drive(n, 40)
    n.settle()
    old_to_b = [d for dst, d in n.sent if dst == "b"]
    old_to_a = [d for dst, d in n.sent if dst == "a"]
    # b's daemon restarts: new epoch; its kernel keeps the replica, some of it stale by now
    kernel = n.b.kernel
    n.b = Node("b", SyncSession(config(2), epoch=0xB2B2, now=n.now), random.Random(66), kernel=kernel)
    drive(n, 30)  # changes while b is away: a's deletes of these never reach b's kernel
    n.run(0.001)
    n.settle()
    assert n.a.session.counters.peer_restarts == 1
    assert_replicated(n)
    # replays from before the restart: old datagrams to b name b's old epoch; b's old
    # datagrams to a come from a retired epoch
    for d in old_to_b:
        n.inject("b", d)
    for d in old_to_a:
        n.inject("a", d)
    n.run(0.5)
    assert n.b.session.counters.drop_epoch >= len(old_to_b) - 5  # a few were HELLOs
    assert n.a.session.counters.drop_retired_epoch == len(old_to_a)
    n.settle()
    assert_replicated(n)


def test_an_interrupted_resync_leaves_nothing_stale() -> None:
    """A resync interrupted by another (a gap skipped by the SYNC_POINT) must still sweep
    every replica not refreshed by the one that completes: one parity bit, kept exact."""
    n = make_pair(seed=8)
    drive(n, 30)
    n.settle()
    n.a.chunk = 1
    s = n.a.session.sender
    for _ in range(3):
        s.want_resync("test: interrupt")
        n.a.step(n.now)  # a resync begins ...
        n.run(0.0008)
        assert s.phase.value == "resyncing" and n.b.gens.active
        n.a.churn(40)  # ... deletes and creates happen, unseen by b (no events sent)
        n.a.bulk = None
        s.abort_resync()  # ... and it is abandoned; the next one starts over
    n.settle()
    assert n.b.gens.done == n.b.gens.current and not n.b.gens.active
    assert_replicated(n)


def test_sync_points_repair_lost_deletes() -> None:
    n = make_pair(seed=10, loss=1.0)
    drive(n, 10)  # all of it lost
    n.loss = 0.0
    n.a.session.sender.want_resync("test: overrun")
    n.settle()
    assert_replicated(n)


def test_link_down_then_up() -> None:
    n = make_pair(seed=11)
    drive(n, 20)
    n.settle()
    n.up = False
    for s in (n.a.session, n.b.session):
        s.link_changed(False, n.now)
    drive(n, 30)
    n.run(2.0)
    n.up = True
    for s in (n.a.session, n.b.session):
        s.link_changed(True, n.now)
    n.settle()
    assert_replicated(n)


def test_backlog_overflow_falls_back_to_a_resync() -> None:
    cfg = config(1, sender=SenderConfig(window=4, backlog_capacity=50))
    rng = random.Random(12)
    a = Node("a", SyncSession(cfg, epoch=0xA, now=0.0), random.Random(1))
    b = Node("b", SyncSession(config(2), epoch=0xB, now=0.0), random.Random(2))
    n = Net(a, b, rng)
    a.set_role(True, 0.0)
    n.settle()
    n.loss = 0.5
    drive(n, 50, per_round=40)
    n.loss = 0.0
    n.settle(60)
    assert_replicated(n)
    assert a.session.sender.counters.backlog_overflows >= 1


def test_digest_detects_divergence_and_a_resync_repairs_it() -> None:
    n = make_pair(seed=13)
    drive(n, 20)
    n.settle()
    # Someone flushes part of the backup's table behind our back.
    for k in list(n.b.kernel)[:5]:
        del n.b.kernel[k]
    n.a.digest(n.now)
    n.settle()
    assert n.b.session.receiver.counters.divergences >= 1
    assert n.a.session.sender.counters.resyncs_started == 2
    assert_replicated(n)
    n.a.digest(n.now)  # and a matching digest changes nothing
    n.settle()
    assert n.a.session.sender.counters.resyncs_started == 2


def test_failover_then_the_old_master_returns_as_backup() -> None:
    """Ownership follows the role: the new master hands its replicas over and sends its
    table; the old one, now backup, holds the new master's entries as replicas."""
    n = make_pair(seed=14)
    drive(n, 30)
    n.settle()
    held = n.b.replicas()
    n.a.set_role(False, n.now)  # a graceful step-down ...
    n.b.set_role(True, n.now)  # ... b takes over
    assert n.b.owned() == held  # takeover committed nothing: it was in the kernel
    drive(n, 30)
    n.settle()
    assert_replicated(n)
    assert n.a.session.sender.counters.datagrams > 0  # what a sent before stepping down
    assert not n.a.session.sender.active


def test_split_brain_resolves_into_one_table() -> None:
    n = make_pair(seed=15)
    drive(n, 20)
    n.settle()
    n.b.set_role(True, n.now)  # both masters
    drive(n, 10)
    n.b.events(20, n.now)
    n.run(1.0)
    n.b.set_role(False, n.now)  # b loses the election: it asks for a's table
    n.settle()
    assert_replicated(n)


def test_replica_over_capacity_is_refused_and_retried_with_backoff() -> None:
    n = make_pair(seed=16)
    n.b.capacity = 40
    while len(n.a.owned()) < 80:
        n.a.churn(10)
    n.run(3.0)
    assert not n.b.session.synced
    assert n.b.refused > 0
    started = n.a.session.sender.counters.resyncs_started
    n.run(60.0)
    # back-off doubles from 1 s to 64 s: 1+2+4+8+16+32 = 63 s, at most 6 more resyncs
    assert n.a.session.sender.counters.resyncs_started - started <= 6
    for k in list(n.a.owned())[40:]:  # the table shrinks: it fits again
        del n.a.kernel[k]
    n.a.session.sender.want_resync("test: the table shrank")
    n.run(130.0)
    assert n.b.session.synced
    assert_replicated(n)


def test_a_resync_request_to_a_backup_is_ignored() -> None:
    n = make_pair(seed=17)
    drive(n, 5)
    n.settle()
    n.a.session.receiver.set_requests(True)  # a request racing a's becoming master
    n.a.session.receiver.divergence(RequestReason.OTHER, n.now)
    n.run(0.5)
    assert n.b.session.counters.resync_requests_ignored >= 1
    assert any(e.kind is SessionEventKind.REQUEST_IGNORED for e in n.b.session.pop_events())


def test_replayed_hello_from_an_epoch_before_our_restart_changes_nothing() -> None:
    """Issue 8 item 2: a HELLO captured before this node restarted must not retire the
    real peer's epoch (it used to, and every genuine datagram was dropped for good)."""
    n = make_pair(seed=21)
    drive(n, 20)
    n.settle()
    old_hellos = [d for dst, d in n.sent if dst == "a" and d[3] == wire.DatagramType.HELLO]
    assert old_hellos
    kb = n.b.kernel
    n.b = Node("b", SyncSession(config(2), epoch=0xB0B2, now=n.now), random.Random(3), kernel=kb)
    n.settle()
    ka = n.a.kernel
    n.a = Node("a", SyncSession(config(1), epoch=0xA0A2, now=n.now), random.Random(4), kernel=ka)
    n.a.set_role(True, n.now)
    n.settle()
    assert n.a.session.peer_epoch == 0xB0B2
    unproven = n.a.session.counters.hellos_unproven
    for d in old_hellos:
        n.inject("a", d)
    n.run(0.5)
    assert n.a.session.peer_epoch == 0xB0B2, "a replayed HELLO took over the peer epoch"
    assert n.a.session.counters.hellos_unproven == unproven + len(old_hellos)
    assert n.a.session.counters.peer_restarts == 0
    drive(n, 20)
    n.settle()
    assert_replicated(n)


def test_status_and_config_errors() -> None:
    n = make_pair(seed=18)
    drive(n, 10)
    n.settle()
    s = n.a.session.status()
    assert s["sending"] == "streaming" and s["inflight"] == 0 and s["queue_depth"] == 0
    for k in ("retransmits", "drop_auth", "drop_duplicate", "resyncs_started", "nacks_sent",
              "tx_datagrams", "tx_bytes", "rx_datagrams", "hellos_unproven"):
        assert k in s["counters"], k
    with pytest.raises(SessionConfigError) as e:
        SessionConfig(node_id=1, key=b"short")
    assert e.value.field == "key"
    with pytest.raises(SessionConfigError) as e:
        config(1, peer_node_id=1)
    assert e.value.field == "peer_node_id"
    with pytest.raises(SessionConfigError) as e:
        config(1, receiver=ReceiverConfig(reorder_capacity=0))
    assert e.value.field == "receiver.reorder_capacity"
    with pytest.raises(SessionConfigError):
        SyncSession(config(1), epoch=0, now=0.0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.floats(0, 0.3), st.floats(0, 0.02), st.floats(0, 0.2),
       st.lists(st.sampled_from(["churn", "outage", "restart_b", "failover", "digest"]), max_size=8))
def test_converges_under_random_loss_reorder_outages_and_failovers(
    seed: int, loss: float, jitter: float, dup: float, script: list[str]
) -> None:
    n = make_pair(seed=seed, loss=loss, jitter=jitter, dup=dup)
    for step in script:
        if step == "churn":
            drive(n, 10)
        elif step == "outage":
            n.up = False
            drive(n, 5)
            n.run(1.0)
            n.up = True
        elif step == "restart_b":
            kb = n.b.kernel
            was = n.b.master
            n.b = Node("b", SyncSession(config(2), epoch=n.rng.getrandbits(64) | 1, now=n.now),
                       random.Random(seed), kernel=kb)
            if was:
                n.b.set_role(True, n.now)
        elif step == "failover":
            m, bk = (n.a, n.b) if n.a.master else (n.b, n.a)
            m.set_role(False, n.now)
            bk.set_role(True, n.now)
        else:
            (n.a if n.a.master else n.b).digest(n.now)
        n.run(0.2)
    if not (n.a.master or n.b.master):
        n.a.set_role(True, n.now)
    n.loss = n.dup = 0.0
    n.up = True
    n.settle(120)
    assert_replicated(n)
