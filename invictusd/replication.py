"""Conntrack replication: the engine between our kernel, the peer and the daemon.

The sans-IO ``SyncSession`` does the protocol; this adapter feeds it and carries out what
it decides, on the daemon's event loop, every step bounded so VRRP never waits:

* **The kernel is each node's table.** Nothing is kept per entry here. The master's marked
  conntrack events (filtered in the kernel by a BPF program: unmarked entries, replicas and
  our own injections never wake us) are transcoded straight into wire records. The backup
  injects the master's records into its own kernel as *replica* entries (``Applier``), so a
  takeover commits nothing: the addresses move the moment VRRP decides.
* **Ownership follows the VRRP state.** Only the master sends its table. A node that
  becomes master hands the inherited replica entries over in the background (its own mark,
  the timeout the kernel would have given them) and then sends its whole table to the peer.
* Bulks, resyncs, sweeps, digests and ``tables`` read the kernel by dumps filtered by mark
  in the kernel, a few chunks per wake-up (``invictusd.io.scan``).

The daemon uses the engine through ``set_role``, ``link_changed``, ``status`` and ``tables``;
the engine reaches the daemon only through the ``ReplicaEnv`` it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import select
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invictusd import log
from invictusd.applier import Applier
from invictusd.config import Config, LinkInfo
from invictusd.io.conntrack import EventSocket, Injector, set_conntrack_events
from invictusd.io.ctnetlink import NetlinkError
from invictusd.io.markrule import TABLE, MarkRuleError, install_mark_rule, remove_mark_rule
from invictusd.io.scan import Scan
from invictusd.io.sync_socket import SyncSocket
from invictusd.io.transcode import Batch, EventTranscoder, Injection, build_records, event_filter
from invictusd.sync import wire
from invictusd.sync.policy import (
    OTHER_TIMEOUT_SYSCTLS,
    TCP_TIMEOUT_SYSCTLS,
    Backoff,
    PreemptionHold,
    Refusal,
    ReplicaMarks,
    Scope,
    handover_timeout,
)
from invictusd.sync.receiver import ReceiverConfig
from invictusd.sync.sender import COALESCE_CAPACITY, SenderConfig
from invictusd.sync.sender import Phase as SenderPhase
from invictusd.sync.session import SessionConfig, SessionEventKind, SyncSession
from invictusd.sync.wire import Entry, RequestReason

RATE_WINDOW = 1.0
MARK_TABLE = f"inet {TABLE}"
# Netlink datagrams read from the event socket per wake-up (one event each): a few ms of
# work, so an event storm never keeps the loop from its timers; the rest waits its turn.
EVENT_BUDGET = 256
SYNC_BUDGET = 64  # sync datagrams per wake-up (each: a MAC check, then its records)
HANDOVER_WAIT = 1.0  # seconds the hand-over waits for the addresses, at most
TOUCHED_MAX = 1 << 20  # keys of entries changed by events during a bulk, at most
CT_MAX_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_max"
SYSCTL_DIR = "/proc/sys/net/netfilter"


class ReplicationError(RuntimeError):
    """Replication cannot start as configured (the daemon refuses to run half-configured)."""


@dataclass(frozen=True)
class ReplicaEnv:
    """What the engine may use of the daemon: the only way back to it."""

    links: Callable[[], Awaitable[tuple[dict[str, LinkInfo], dict[str, int], dict[str, bool]]]]
    demote: Callable[[bool, str], None]
    record_table: Callable[[str, bool], None]  # (table, installed) into the runtime record
    # ``timed(fn, what)``: ``fn`` timed by the daemon's loop monitor (a stall names its culprit)
    timed: Callable[[Callable[..., Any], str], Callable[..., Any]] = lambda fn, what: fn


def node_ids(local: ipaddress.IPv4Address, peer: ipaddress.IPv4Address) -> tuple[int, int]:
    """(ours, the peer's): 1 for the lower sync address, 2 for the higher. Both nodes derive
    the same pair, and the ids cannot collide whatever the subnet."""
    return (1, 2) if int(local) < int(peer) else (2, 1)


def _read_int(path: str, default: int) -> int:
    try:
        return int(Path(path).read_text())
    except (OSError, ValueError):
        return default


def timeout_table() -> dict[str, int]:
    """The namespace's conntrack timeouts (what the kernel gives an entry at a packet)."""
    names = {*TCP_TIMEOUT_SYSCTLS.values(), *OTHER_TIMEOUT_SYSCTLS}
    out = {}
    for name in names:
        v = _read_int(f"{SYSCTL_DIR}/{name}", -1)
        if v >= 0:
            out[name] = v
    return out


class Replication:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sync = cfg.sync
        self.log = log.get(node=cfg.node.name, component="sync")
        self.marks = ReplicaMarks(self.sync.mark_bit, self.sync.replica_bit, self.sync.generation_bit)
        self.scope = Scope(self.sync.mark_bit, self.sync.zones, self.sync.families)
        self.env: ReplicaEnv | None = None
        self.session: SyncSession | None = None
        self.sock: SyncSocket | None = None
        self.events: EventSocket | None = None
        self.injector: Injector | None = None
        self.applier: Applier | None = None
        self.master = False
        self.mark_rule_installed = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._link_up = True
        self._sync_ifindex: int | None = None
        self._epoch = int.from_bytes(os.urandom(8), "big") | 1
        self._own = EventTranscoder(self.sync.mark_bit, self.marks.ours)  # our table
        self._all = EventTranscoder(self.sync.mark_bit, 0)  # replicas too
        # A bulk sends inherited replica entries as ours: their replica bits never travel.
        self._bulk_tr = EventTranscoder(self.sync.mark_bit, 0, clear=self.marks.ours)
        self._subscribed = False
        self._resync_when_drained = False
        self._bulk: Scan | None = None
        self._handover: Scan | None = None
        self._digest: Scan | None = None
        self._touched: set[bytes] | None = None  # during a bulk: keys of events since it began
        self._dump_retry = Backoff()
        self._dump_retry_at: float | None = None
        self._handover_retry = False
        # Reactor callbacks, timed by the daemon's loop monitor once started.
        self._cb_datagrams: Callable[..., Any] = self._on_datagrams
        self._cb_events: Callable[..., Any] = self._on_events
        self._cb_timer: Callable[..., Any] = self._on_timer
        self._handover_due: asyncio.TimerHandle | None = None  # becoming master: after the addresses
        self._bulk_t0 = 0.0
        self._fail_next_dump = False  # test hook
        self._hold = PreemptionHold(self.sync.preempt_hold_max)
        self._events_seen = 0
        self._out_of_scope = 0  # our marked entries of zones/families not replicated
        self._overruns = 0
        self._rcvbuf_grown = 0
        self._dump_failures = 0
        self._handovers = 0
        self._dumps = 0  # bulks and digests read from the kernel
        self.last_handover: dict[str, Any] | None = None
        self.last_bulk: dict[str, Any] | None = None
        self._local_estimate = 0
        self._rates: dict[str, float] = {}
        self._rate_base: tuple[float, dict[str, int]] | None = None
        self._next_digest = 0.0
        self._next_resync = 0.0

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self, env: ReplicaEnv) -> None:
        self.env = env
        loop = asyncio.get_running_loop()
        now = loop.time()
        infos, ifindex, link_up = await env.links()
        peer = self.sync.peer_address
        assert peer is not None
        local = next(a.ip for a in infos[self.sync.interface].addresses if peer in a.network)
        self._sync_ifindex = ifindex[self.sync.interface]
        self._link_up = link_up.get(self.sync.interface, False)

        if self.sync.install_mark_rule:
            env.record_table(MARK_TABLE, True)
            try:
                await loop.run_in_executor(None, install_mark_rule, self.sync.mark_bit)
            except MarkRuleError as e:
                # Running on with nothing marked would replicate nothing, silently.
                raise ReplicationError(f"mark rule not installed: {e}") from None
            self.mark_rule_installed = True
            self.log.info("mark rule installed", table=MARK_TABLE, mark=f"0x{self.marks.marked:08x}")
        previous = await loop.run_in_executor(None, set_conntrack_events, 1)
        if previous != 1:
            self.log.info("nf_conntrack_events set to 1", previous=previous)

        ours, theirs = node_ids(local, peer)
        capacity = self.sync.max_replica_entries or max(1, _read_int(CT_MAX_SYSCTL, 1 << 20) * 9 // 10)
        # A burst may run ahead of the peer by as many records as our table holds entries
        # (~30 bytes each while they wait) before a resync is cheaper than the backlog.
        sender = SenderConfig(flush_delay=self.sync.flush_ms / 1000,
                              backlog_capacity=max(COALESCE_CAPACITY, capacity))
        self.session = SyncSession(
            SessionConfig(node_id=ours, key=self.sync.key, peer_node_id=theirs,
                          sender=sender, receiver=ReceiverConfig()),
            epoch=self._epoch, now=now)
        self.session.link_changed(self._link_up, now)
        self.sock = SyncSocket(self.sync.interface, local, peer, self.sync.port)
        self._cb_datagrams = env.timed(self._on_datagrams, "sync: datagrams")
        self._cb_events = env.timed(self._on_events, "sync: conntrack events")
        self._cb_timer = env.timed(self._on_timer, "sync: timer")
        loop.add_reader(self.sock.fileno(), self._cb_datagrams)
        self.injector = Injector(default_timeout=60)
        # Only the master reads its events (it subscribes when it becomes master).
        self.events = EventSocket(
            rcvbuf_bytes=self.sync.rcvbuf_mb << 20, mark_bit=self.sync.mark_bit, subscribe=False,
            program=event_filter(self.sync.mark_bit, self.marks.ours, self.injector.port_id))
        self.applier = Applier(self.session, self.injector, self.marks, self.scope, self._all,
                               replica_timeout=self.sync.replica_timeout, capacity=capacity,
                               master=lambda: self.master, progress=self._pump, log=self.log,
                               timed=env.timed)
        self.applier.count()  # replicas a previous run left in the kernel
        self._next_digest = now + self.sync.digest_interval if self.sync.digest_interval else 0.0
        self._next_resync = now + self.sync.resync_interval if self.sync.resync_interval else 0.0
        self._spawn(self._periodic())
        self.log.info("replication started", interface=self.sync.interface, local=str(local),
                      peer=str(peer), port=self.sync.port, key=self.sync.key_source,
                      mark_bit=self.sync.mark_bit, replica_bit=self.sync.replica_bit,
                      generation_bit=self.sync.generation_bit, max_replica_entries=capacity)
        self._update_demotion(now)
        self._pump()

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
        if self._handover_due is not None:
            self._handover_due.cancel()
            self._handover_due = None
        for t in self._tasks:
            t.cancel()
        for scan in (self._bulk, self._handover, self._digest):
            if scan is not None:
                scan.cancel()
        if self.applier is not None:
            self.applier.cancel()
        if self.session is not None and self.sock is not None:
            for d in self.session.datagrams_to_send(loop.time()):
                self.sock.send(d)
        for s in (self.sock, self.events):
            if s is not None:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(s.fileno())
                s.close()
        if self.injector is not None:
            self.injector.close()
        if self.sync.install_mark_rule and self.env is not None:
            await loop.run_in_executor(None, remove_mark_rule)
            self.env.record_table(MARK_TABLE, False)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- role ----------------------------------------------------------------------------

    def set_role(self, master: bool) -> None:
        """The VRRP state changed: only the master sends its table and reads its events."""
        if master == self.master or self.session is None or self.events is None:
            return
        now = asyncio.get_running_loop().time()
        self.master = master
        self.session.set_role(master, now)
        if self._handover_due is not None:
            self._handover_due.cancel()
            self._handover_due = None
        if master:
            self._subscribe(True)
            # The hand-over and the bulk walk the kernel's table (a quarter of a second of a
            # CPU for a million buckets): they start once the addresses are in place, so
            # that nothing competes with the takeover itself.
            self._handover_due = asyncio.get_running_loop().call_later(HANDOVER_WAIT, self.addresses_in_place)
        else:
            self._subscribe(False)
            for scan in (self._bulk, self._handover, self._digest):
                if scan is not None:
                    scan.cancel()
            self._bulk = self._handover = self._digest = None
            self._touched = None
            # What we held as master is ours in our kernel: the new master's table makes it
            # replicas again (a split brain resolved; a step-down).
            self.session.divergence(RequestReason.BECAME_BACKUP, now)
        self._update_demotion(now)
        self._pump()

    def addresses_in_place(self) -> None:
        """The daemon's addresses are up after a takeover (or HANDOVER_WAIT passed)."""
        if self._handover_due is not None:
            self._handover_due.cancel()
            self._handover_due = None
            if self.master:
                self._start_handover()
                self._pump()

    def _subscribe(self, on: bool) -> None:
        assert self.events is not None
        if on == self._subscribed:
            return
        loop = asyncio.get_running_loop()
        self.events.subscribe(on)
        self._subscribed = on
        if on:
            loop.add_reader(self.events.fileno(), self._cb_events)
        else:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self.events.fileno())
            self.events.skip(1 << 20)  # what was queued is no longer ours to send

    # ---- our kernel's events (master) ------------------------------------------------------

    def _on_events(self) -> None:
        assert self.events is not None and self.session is not None
        view, n, overrun = self.events.read_raw(EVENT_BUDGET)
        if n:
            try:
                batch = self._own.transcode(view, n)
            except ValueError as e:  # NetlinkError: a kernel message we do not understand
                self.log.error("conntrack event not understood; resyncing", error=str(e))
                self.session.sender.want_resync("unreadable event")
            else:
                self._events_seen += len(batch.records)
                self._local_estimate += sum(1 for r in batch.records if r[0] >> 4 == 1) - batch.deleted
                if self._touched is not None:
                    self._note_touched(batch)
                recs, keys, out = self.scope.select(batch.records, batch.keys)
                self._out_of_scope += out
                self.session.records(recs, keys)
        if overrun:
            self._overruns += 1
            self.log.warning("conntrack event overrun: events were lost; resyncing by dump",
                             overruns=self._overruns)
            grown = self.events.grow(self.sync.rcvbuf_max_mb << 20)
            if grown is not None:
                self._rcvbuf_grown += 1
                self.log.warning("conntrack event buffer grown after the overrun",
                                 rcvbuf_bytes=grown, rcvbuf_max_mb=self.sync.rcvbuf_max_mb)
            # libuv stops watching a socket whose poll reported an error: watch it again.
            asyncio.get_running_loop().call_soon(self._rearm_events)
            # After ENOBUFS the kernel drops every event until our queue is drained: a dump
            # taken now would miss what is lost after it. Dump once the queue is empty.
            self._resync_when_drained = True
        if self._resync_when_drained and not overrun and not self._readable(self.events.fileno()):
            self._resync_when_drained = False
            self.session.sender.want_resync("netlink overrun")
        self._pump()

    @staticmethod
    def _readable(fd: int) -> bool:
        return bool(select.select([fd], [], [], 0)[0])

    def _rearm_events(self) -> None:
        if self.events is None or not self._subscribed:
            return
        loop = asyncio.get_running_loop()
        fd = self.events.fileno()
        loop.remove_reader(fd)
        loop.add_reader(fd, self._cb_events)

    def _note_touched(self, batch: Batch) -> None:
        """Entries an event told about during a bulk: the dump's record of them may be older
        than the event (its chunk was made before, read after) and must not follow it."""
        touched = self._touched
        assert touched is not None
        touched.update(batch.keys)
        if len(touched) > TOUCHED_MAX:
            # Bounded: give up on this bulk; the next resync starts at once.
            touched.clear()
            assert self.session is not None
            self.session.sender.want_resync("too many changes during a bulk")

    # ---- the peer's datagrams ----------------------------------------------------------------

    def _on_datagrams(self) -> None:
        assert self.sock is not None and self.session is not None and self.applier is not None
        batch = self.sock.recv(SYNC_BUDGET)
        if not batch:
            return
        now = asyncio.get_running_loop().time()
        epoch = self.session.peer_epoch
        for data in batch:
            self.session.datagram_received(data, now)
        if self.session.peer_epoch != epoch:
            self.applier.reset()
        self.applier.feed(self.session.take_deliveries())
        self.applier.run()
        self._pump()

    def link_changed(self, ifindex: int, up: bool) -> None:
        if ifindex != self._sync_ifindex or up == self._link_up or self.session is None:
            return
        self._link_up = up
        self.log.warning("sync link " + ("up" if up else "down"), interface=self.sync.interface)
        now = asyncio.get_running_loop().time()
        self.session.link_changed(up, now)
        self._update_demotion(now)
        self._pump()

    # ---- kernel jobs of the master: hand-over, bulk, digest ---------------------------------

    def _start_handover(self) -> None:
        """Inherited replica entries become ours: our mark, the timeout the kernel would have
        given them at their last packet. In the background: the addresses do not wait."""
        assert self.injector is not None
        t0 = time.perf_counter()
        table = timeout_table()
        marks = self.marks
        injector = self.injector
        done = [0]
        refused = [0]

        def timeouts(proto: int, tcp_state: int, status: int) -> int:
            return handover_timeout(proto, tcp_state, status, table)

        # Our own kernel's entries (no scope to check), in the update form, no status.
        how = Injection(*marks.own_masks(), 0, None, False, None, with_status=False, timeouts=timeouts)

        def on_batch(batch: Batch) -> None:
            base = injector.next_seqs(len(batch.records))
            msgs = build_records(b"".join(batch.records), 0, base, how).msgs
            failures = injector.run(msgs, base) if msgs else {}
            done[0] += len(msgs) - len(failures)
            refused[0] += sum(1 for err in failures.values() if err != errno.ENOENT)  # not gone: kept

        def finished(scan: Scan) -> None:
            self._handover = None
            self._handovers += 1
            self.last_handover = {"entries": done[0], "seconds": round(time.perf_counter() - t0, 3)}
            if refused[0]:
                self.last_handover["refused"] = refused[0]
            if self.applier is not None:
                self.applier.handed_over(complete=not refused[0])
            self.log.info("inherited entries handed over", **self.last_handover)
            self._pump()

        self._handover = Scan("hand-over", *marks.filter_marked(), self._all, on_batch, finished,
                              self._scan_failed, select=marks.filter_replica())
        self._handover.start()

    def _maybe_start_bulk(self, now: float) -> None:
        s = self.session
        assert s is not None
        if (not self.master or not s.sender.resync_wanted or self._bulk is not None
                or self._handover is not None or self._handover_due is not None
                or not s.peer_epoch or not self._link_up):
            return
        if self._dump_retry_at is not None and now < self._dump_retry_at:
            return
        reason = s.sender.resync_wanted
        gen = s.sender.begin_resync(now)
        t0 = time.perf_counter()
        self._touched = set()
        if self._fail_next_dump:
            self._fail_next_dump = False
            self._bulk = Scan("bulk", *self.marks.filter_marked(), self._bulk_tr, self._bulk_batch,
                              self._bulk_done, self._scan_failed, lambda: s.sender.bulk_room)
            self._scan_failed(self._bulk, NetlinkError("dump", 0, "failure injected by a test hook"))
            return
        self._bulk = Scan("bulk", *self.marks.filter_marked(), self._bulk_tr, self._bulk_batch,
                          self._bulk_done, self._scan_failed, lambda: s.sender.bulk_room)
        self.log.info("sending our table", reason=reason, gen=gen)
        self._bulk_t0 = t0
        self._bulk.start()

    def _bulk_batch(self, batch: Batch) -> None:
        assert self.session is not None
        touched = self._touched
        recs, keys, out = self.scope.select(batch.records, batch.keys)
        self._out_of_scope += out
        if touched:
            recs = [r for r, k in zip(recs, keys, strict=True) if k not in touched]
        self.session.sender.bulk(recs)
        self._pump(resume_bulk=False)

    def _bulk_done(self, scan: Scan) -> None:
        assert self.session is not None
        now = asyncio.get_running_loop().time()
        self.session.sender.end_resync(now)
        self._bulk = None
        self._touched = None
        self._dumps += 1
        self._dump_retry.succeeded()
        self._dump_retry_at = None
        self._local_estimate = self.session.sender.resync_entries
        self.last_bulk = {"entries": self.session.sender.resync_entries,
                          "seconds": round(time.perf_counter() - self._bulk_t0, 3)}
        self.log.info("our table sent", **self.last_bulk)
        self._pump()

    def _scan_failed(self, scan: Scan, e: BaseException) -> None:
        """Any failure of a kernel read ends it, is logged and counted, and is retried."""
        self._dump_failures += 1
        now = asyncio.get_running_loop().time()
        self._dump_retry_at = self._dump_retry.failed(now)
        self.log.error("conntrack dump failed; retrying", job=scan.name, error=repr(e),
                       retry_in=round(self._dump_retry_at - now, 1), failures=self._dump_failures)
        assert self.session is not None
        if scan is self._bulk:
            self._bulk = None
            self._touched = None
            self.session.sender.abort_resync()
        elif scan is self._handover:
            self._handover = None
            self._handover_retry = True
        elif scan is self._digest:
            self._digest = None

    def _start_digest(self, now: float) -> None:
        """Count and XOR of key hashes of our table, sent only if nothing changed while the
        dump ran (the receiver compares at the same point of the stream)."""
        s = self.session
        assert s is not None
        if not self.master or self._digest or self._bulk or self._handover or not s.sender.idle:
            return
        seen = self._events_seen
        scope = self.scope
        acc = [0, 0]

        def on_batch(batch: Batch) -> None:
            for e in wire.decode_records(b"".join(batch.records)):
                if isinstance(e, Entry) and scope.refusal(e) is None:
                    acc[0] += 1
                    acc[1] ^= wire.key_hash(e.family, e.proto, e.src, e.dst, e.sport, e.dport, e.zone)

        def finished(scan: Scan) -> None:
            self._digest = None
            self._dumps += 1
            self._local_estimate = acc[0]
            if self._events_seen == seen and self.master:
                s.digest(acc[0], acc[1], asyncio.get_running_loop().time())
                self._pump()

        self._digest = Scan("digest", *self.marks.filter_marked(), self._all, on_batch, finished,
                            self._scan_failed)
        self._digest.start()

    # ---- the session's clock -----------------------------------------------------------------

    def _pump(self, resume_bulk: bool = True) -> None:
        s = self.session
        if s is None or self.sock is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._bulk is not None and s.sender.phase is not SenderPhase.RESYNCING:
            # The sender gave this resync up (its backlog overflowed): start over.
            self._bulk.cancel()
            self._bulk = None
            self._touched = None
        self._maybe_start_bulk(now)
        for d in s.datagrams_to_send(now):
            self.sock.send(d)
        for ev in s.pop_events():
            self._on_session_event(ev.kind, ev.detail)
        if resume_bulk and self._bulk is not None and self._bulk.paused:
            self._bulk.resume()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(max(s.next_deadline(), now), self._cb_timer)

    def _on_timer(self) -> None:
        assert self.session is not None
        self._timer = None
        self.session.timer(asyncio.get_running_loop().time())
        self._pump()

    def _on_session_event(self, kind: SessionEventKind, detail: str) -> None:
        bad = {SessionEventKind.PEER_DEAD}
        fn = self.log.warning if kind in bad else self.log.info
        fn("sync " + kind.value.replace("_", " "), detail=detail or None)
        if kind in (SessionEventKind.PEER_LEARNED, SessionEventKind.PEER_RESTARTED) and self.applier:
            self.applier.reset()

    def _update_demotion(self, now: float) -> None:
        assert self.session is not None and self.env is not None
        d = self._hold.update(now, self._link_up, self.session.synced or self.master, self.sync.interface)
        if d.warn:
            self.log.warning("preemption held", reason=d.reason,
                             seconds=round(self._hold.held_for(now) or 0, 1),
                             peer_alive=self.session.peer_alive)
        if d.expired:
            self.log.error("preemption no longer held: preempt_hold_max reached without the "
                           "peer's table", seconds=self.sync.preempt_hold_max)
        self.env.demote(d.demoted, d.reason)

    async def _periodic(self) -> None:
        """Rates for status, demotion, retries of failed dumps, digests and resyncs."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(RATE_WINDOW)
            now = loop.time()
            self._rearm_events()
            counters = self._counters()
            if self._rate_base is not None:
                t0, base = self._rate_base
                dt = max(now - t0, 1e-6)
                self._rates = {k: round((counters.get(k, 0) - base.get(k, 0)) / dt, 1)
                               for k in ("events", "tx_bytes", "rx_bytes", "applied")}
            self._rate_base = (now, counters)
            if self.session is not None:
                self._update_demotion(now)
            if self._handover_retry and self.master and self._dump_retry_at is not None \
                    and now >= self._dump_retry_at:
                self._handover_retry = False
                self._start_handover()
            if self._next_digest and now >= self._next_digest:
                self._next_digest = now + self.sync.digest_interval
                self._start_digest(now)
            if self._next_resync and now >= self._next_resync and self.session is not None:
                self._next_resync = now + self.sync.resync_interval
                self.session.sender.want_resync("periodic")
            self._pump()

    # ---- status and tables -------------------------------------------------------------------

    def _counters(self) -> dict[str, int]:
        s = self.session
        c: dict[str, int] = {}
        if s is not None:
            c.update(s.status()["counters"])
        a = self.applier
        if a is not None:
            ac = a.counters
            c.update({"applied_created": ac.created, "applied_updated": ac.updated,
                      "applied_deleted": ac.deleted, "delete_missing": ac.delete_missing,
                      "apply_failures": sum(ac.failures.values()), "over_capacity": ac.over_capacity,
                      "applied_retried": ac.retried,
                      "resyncs_applied": ac.resyncs_applied, "swept": ac.swept,
                      "remarked": ac.remarked, "sweep_scans": ac.sweep_scans,
                      "remark_scans": ac.remark_scans, "digests_matched": ac.digests_matched,
                      "digests_mismatched": ac.digests_mismatched})
            c.update({f"rejected_{why.value}": ac.refused[why] for why in Refusal})
            c["applied"] = ac.created + ac.updated + ac.deleted
        c.update({"events": self._events_seen, "out_of_scope": self._out_of_scope,
                  "netlink_overruns": self._overruns,
                  "netlink_rcvbuf_grown": self._rcvbuf_grown,
                  "kernel_dumps": self._dumps,
                  "dump_failures": self._dump_failures, "handovers": self._handovers,
                  "foreign_datagrams": self.sock.foreign if self.sock else 0,
                  "send_errors": self.sock.send_errors if self.sock else 0,
                  "events_overrun": self.events.overruns if self.events else 0})
        return c

    def status(self) -> dict[str, Any]:
        s = self.session.status() if self.session is not None else {}
        s.pop("counters", None)
        a = self.applier
        now = asyncio.get_running_loop().time()
        return {
            **s,
            "peer": str(self.sync.peer_address),
            "interface": self.sync.interface,
            "link_up": self._link_up,
            "role": "master" if self.master else "backup",
            "peer_entries": a.replica_entries if a else 0,
            "local_entries": self._local_estimate,
            "kernel_marked_entries": self._local_estimate if self.master else (a.replica_entries if a else 0),
            # Backup: we hold the master's whole table. Master: the peer holds ours.
            "synced": (self.session.sender.in_sync if self.master else self.session.synced)
            if self.session else False,
            "applier": {"queued": a.queued if a else 0, "busy": a.busy if a else False,
                        "failures": {str(k): v for k, v in a.counters.failures.items()} if a else {},
                        "last_sweep_seconds": a.counters.last_sweep_seconds if a else None},
            "last_handover": self.last_handover,
            "last_bulk": self.last_bulk,
            "rates": self._rates,
            "mark_rule": {"managed": self.sync.install_mark_rule,
                          "installed": self.mark_rule_installed, "table": MARK_TABLE},
            "marks": {"replicated": f"0x{self.marks.marked:08x}", "replica": f"0x{self.marks.replica:08x}",
                      "generation": f"0x{self.marks.generation:08x}"},
            "preemption_held_for": (None if self._hold.held_for(now) is None
                                    else round(self._hold.held_for(now) or 0, 1)),
            "socket": self.sock.buffers._asdict() if self.sock else None,
            "netlink_rcvbuf": self.events.rcvbuf if self.events else None,
            "counters": self._counters(),
        }

    async def tables(self) -> dict[str, Any]:
        """Our entries and the replica entries, read from the kernel (``invictusd tables``)."""
        loop = asyncio.get_running_loop()
        out: dict[str, list[dict[str, Any]]] = {"local": [], "peer": []}
        for name, filt in (("local", self.marks.filter_own()), ("peer", self.marks.filter_replica())):
            done: asyncio.Future[None] = loop.create_future()

            def on_batch(batch: Batch, name: str = name) -> None:
                for e in wire.decode_records(b"".join(batch.records)):
                    if isinstance(e, Entry):
                        out[name].append(entry_json(e, self.marks))

            def finished(scan: Scan, done: asyncio.Future[None] = done) -> None:
                if not done.done():
                    done.set_result(None)

            def failed(scan: Scan, e: BaseException, done: asyncio.Future[None] = done) -> None:
                if not done.done():
                    done.set_exception(e)

            Scan(f"tables-{name}", *self.marks.filter_marked(), self._all, on_batch, finished, failed,
                 select=filt).start()
            await done
        return out

    def test_hook(self, request: dict[str, Any]) -> dict[str, Any]:
        """Fault injection for tests (the daemon only calls it with INVICTUSD_TEST_HOOKS=1)."""
        if request.get("what") == "dump" and self.session is not None:
            self._fail_next_dump = True
            self.session.sender.want_resync("test hook")
            self._pump()
            return {"ok": True}
        return {"ok": False, "error": f"unknown fault {request.get('what')!r}"}


def _addr(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def entry_json(e: Entry, marks: ReplicaMarks) -> dict[str, Any]:
    return {
        "family": e.family, "proto": e.proto, "zone": e.zone,
        "orig": [_addr(e.src), _addr(e.dst), e.sport, e.dport],
        "reply": [_addr(e.rsrc), _addr(e.rdst), e.rsport, e.rdport],
        "status": e.status, "timeout": e.timeout, "mark": e.mark & ~marks.ours,
        "tcp_state": e.tcp_state,
    }

