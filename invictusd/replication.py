"""Conntrack replication wired to the daemon: kernel events -> session -> UDP, and back.

The sans-IO ``SyncSession`` does all protocol work; this adapter feeds it the kernel's
marked conntrack events (raw ctnetlink, ``invictusd.io.conntrack``), the peer's datagrams
and the time, sends what it asks to send, and commits the peer's table into the kernel when
the VRRP machine becomes master (``commit``, awaited by the daemon *before* it adds the
virtual addresses).

While the peer's bulk table is not complete (our start, the peer's restart) or the sync
link is down, VRRP preemption is held (pfsync's demotion): a node never takes mastership
back with an incomplete table. Taking over from a *dead* master is never held.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import select
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from invictusd import log
from invictusd.config import Config
from invictusd.flows import Flow, FlowEvent
from invictusd.io.conntrack import (
    EventSocket,
    Injector,
    Overrun,
    dump,
    set_conntrack_events,
)
from invictusd.io.ctnetlink import NetlinkError
from invictusd.io.markrule import TABLE, MarkRuleError, install_mark_rule, remove_mark_rule
from invictusd.io.sync_socket import SyncSocket
from invictusd.sync.session import SessionConfig, SessionEventKind, SyncSession

if TYPE_CHECKING:
    from invictusd.daemon import Daemon

RATE_WINDOW = 1.0
MARK_TABLE = f"inet {TABLE}"
# Datagrams read from the sync socket per wake-up (each costs a MAC check, ~5 us, plus its
# records): a flood of forged datagrams never keeps the loop from its timers.
SYNC_READ_BUDGET = 64
# Events held while a dump is under way (applied after it); beyond this they are dropped and
# a second dump follows, which reads what they said.
HELD_MAX = 200_000
DUMP_RETRY_MIN, DUMP_RETRY_MAX = 1.0, 30.0
HOLD_LOG_EVERY = 10.0  # seconds between "preemption held" warnings
# Netlink datagrams read per wake-up (a multicast event is one datagram): about 3 ms of
# work, so a storm of events never keeps the loop from sending adverts, while a burst still
# fills whole sync datagrams; what is left is read on the next turn.
READ_BUDGET = 256


def node_ids(local: ipaddress.IPv4Address, peer: ipaddress.IPv4Address) -> tuple[int, int]:
    """(ours, the peer's): 1 for the lower sync address, 2 for the higher. Both nodes derive
    the same pair, and the ids cannot collide whatever the subnet (the low 16 bits of the
    addresses did on subnets wider than /16)."""
    return (1, 2) if int(local) < int(peer) else (2, 1)


CT_MAX_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_max"


def peer_capacity() -> int:
    """The most peer entries we hold: what our own kernel could hold (nf_conntrack_max)."""
    try:
        with open(CT_MAX_SYSCTL) as f:
            return max(1, int(f.read()))
    except (OSError, ValueError):
        return 1 << 20


class ReplicationError(RuntimeError):
    """Replication cannot start as configured (the daemon refuses to run half-configured)."""


class Replication:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sync = cfg.sync
        self.log = log.get(node=cfg.node.name, component="sync")
        self.daemon: Daemon | None = None
        self.session: SyncSession | None = None
        self.sock: SyncSocket | None = None
        self.events: EventSocket | None = None
        self.injector: Injector | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conntrack")
        # Its own thread: a takeover never queues behind a long kernel dump.
        self._commit_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
        self._timer: asyncio.TimerHandle | None = None
        self._dumping = False
        self._resync_wanted = False  # an overrun seen: dump once the event queue is drained
        self._committing = False
        self._held: list[FlowEvent] = []
        self._held_dropped = False
        self._dump_retry = DUMP_RETRY_MIN
        self._dump_retry_at: float | None = None
        self._fail_next_dump = False  # test hook (INVICTUSD_TEST_HOOKS)
        self._hold_since: float | None = None
        self._hold_logged = 0.0
        self._link_up = True
        self._sync_ifindex: int | None = None
        self._started = 0.0
        self.mark_rule_installed = False
        self.overruns = 0
        self.dumps = 0
        self.dump_failures = 0
        self.last_commit: dict[str, Any] | None = None
        self._rates: dict[str, float] = {}
        self._rate_base: tuple[float, dict[str, int]] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._epoch = int.from_bytes(os.urandom(8), "big") | 1
        self._entry_size: tuple[float, int] | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self, daemon: Daemon) -> None:
        self.daemon = daemon
        loop = asyncio.get_running_loop()
        now = loop.time()
        infos, ifindex, link_up = await daemon.links.snapshot()
        peer = self.sync.peer_address
        assert peer is not None
        local = next(a.ip for a in infos[self.sync.interface].addresses if peer in a.network)
        self._sync_ifindex = ifindex[self.sync.interface]
        self._link_up = link_up.get(self.sync.interface, False)

        if self.sync.install_mark_rule:
            daemon.installed.installing_table(MARK_TABLE)
            try:
                await loop.run_in_executor(self._pool, install_mark_rule, self.sync.mark_bit)
            except MarkRuleError as e:
                # Running on with nothing marked would replicate nothing, silently.
                raise ReplicationError(f"mark rule not installed: {e}") from None
            self.mark_rule_installed = True
            self.log.info("mark rule installed", table="inet invictusd",
                          mark=f"0x{1 << self.sync.mark_bit:08x}")
        previous = await loop.run_in_executor(self._pool, set_conntrack_events, 1)
        if previous != 1:
            self.log.info("nf_conntrack_events set to 1", previous=previous)

        ours, theirs = node_ids(local, peer)
        self.session = SyncSession(
            SessionConfig(
                node_id=ours,
                key=self.sync.key,
                flush_delay=self.sync.flush_ms / 1000,
                peer_node_id=theirs,
                mark_mask=self.sync.mark_mask,
                zones=self.sync.zones,
                families=self.sync.families,
                peer_capacity=await loop.run_in_executor(self._pool, peer_capacity),
            ),
            epoch=self._epoch,
            now=now,
        )
        self.session.link_changed(self._link_up, now)
        self.sock = SyncSocket(self.sync.interface, local, peer, self.sync.port)
        loop.add_reader(self.sock.fileno(), self._on_datagrams)
        self.events = EventSocket(rcvbuf_bytes=self.sync.rcvbuf_mb << 20, mark_bit=self.sync.mark_bit)
        loop.add_reader(self.events.fileno(), self._on_events)
        self.injector = await loop.run_in_executor(
            self._pool, lambda: Injector(default_timeout=self.sync.commit_timeout_min)
        )
        self._started = now
        daemon.set_demoted(True, "waiting for the peer's connection table")
        self._spawn(self._resync_from_kernel("start"))
        self._spawn(self._periodic())
        self.log.info("replication started", interface=self.sync.interface, local=str(local),
                      peer=str(peer), port=self.sync.port, key=self.sync.key_source,
                      mark_bit=self.sync.mark_bit)
        self._pump()

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
        for t in self._tasks:
            t.cancel()
        if self.session is not None and self.sock is not None:
            # Flush what is queued so the peer holds our latest table.
            for d in self.session.datagrams_to_send(loop.time()):
                self.sock.send(d)
        for s in (self.sock, self.events):
            if s is not None:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(s.fileno())
                s.close()
        if self.injector is not None:
            self.injector.close()
        if self.sync.install_mark_rule:
            await loop.run_in_executor(self._pool, remove_mark_rule)
            if self.daemon is not None:
                self.daemon.installed.removed_table(MARK_TABLE)
        self._pool.shutdown(wait=True)
        self._commit_pool.shutdown(wait=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- inputs ------------------------------------------------------------------------

    def _on_events(self) -> None:
        assert self.events is not None and self.session is not None
        if self._committing:
            self.events.skip()
            return
        try:
            batch = self.events.read(max_datagrams=READ_BUDGET)
        except Overrun as e:
            self.overruns += 1
            self.log.warning("conntrack event overrun: events were lost; resyncing by dump",
                             overruns=self.overruns)
            self._feed(e.events)
            # After ENOBUFS the kernel drops every event, reporting nothing more, until our
            # queue has been drained: a dump taken now misses what is lost after it (seen:
            # 13k of a 20k burst never replicated). Dump once the queue is empty.
            self._resync_wanted = True
            # libuv has just stopped watching the socket (its poll saw the error): watch it
            # again now, not at the next periodic re-arm, or the queue overflows again.
            asyncio.get_running_loop().call_soon(self._rearm_events)
        else:
            self._feed(batch)
        self._resync_if_drained()

    def _resync_if_drained(self) -> None:
        if not self._resync_wanted or self._dumping or self.events is None:
            return
        if select.select([self.events.fileno()], [], [], 0)[0]:
            return  # more queued: the reader runs again
        self._resync_wanted = False
        self._spawn(self._resync_from_kernel("netlink overrun"))

    def _rearm_events(self) -> None:
        """uvloop (libuv) stops watching a socket that polls with an error, silently: an
        ENOBUFS on the event socket did that, and no event was read again. Re-arm each tick."""
        if self.events is None:
            return
        loop = asyncio.get_running_loop()
        fd = self.events.fileno()
        loop.remove_reader(fd)
        loop.add_reader(fd, self._on_events)
        self._on_events()

    def _feed(self, batch: list[FlowEvent]) -> None:
        assert self.session is not None
        if not batch:
            return
        if self._dumping:
            # Newer than the dump under way: applied after it, or the dump would undo them.
            if len(self._held) + len(batch) > HELD_MAX:
                # Bounded: drop them and dump once more afterwards, which reads their effect.
                self._held.clear()
                self._held_dropped = True
            else:
                self._held.extend(batch)
            return
        self.session.local_events(batch, asyncio.get_running_loop().time())
        self._pump()

    async def _resync_from_kernel(self, why: str) -> None:
        if self._dumping:
            return
        assert self.session is not None
        loop = asyncio.get_running_loop()
        self._dumping = True
        self._dump_retry_at = None
        t0 = time.perf_counter()
        try:
            if self._fail_next_dump:
                self._fail_next_dump = False
                raise NetlinkError("dump", 0, "failure injected by a test hook")
            flows = await loop.run_in_executor(self._pool, dump, self.sync.mark_bit)
        except Exception as e:  # any failure: OSError, NetlinkError, a kernel error reply ...
            # End the dump state (events flow again), say so, and try again with back-off.
            self.dump_failures += 1
            held, self._held, self._dumping = self._held, [], False
            if held:
                self.session.local_events(held, loop.time())
            self._dump_retry_at = loop.time() + self._dump_retry
            self.log.error("conntrack dump failed; retrying", reason=why, error=repr(e),
                           retry_in=self._dump_retry, failures=self.dump_failures)
            self._dump_retry = min(self._dump_retry * 2, DUMP_RETRY_MAX)
            self._pump()
            return
        self._dump_retry = DUMP_RETRY_MIN
        self.dumps += 1
        now = loop.time()
        self.session.local_resync(flows, now)
        held, self._held, self._dumping = self._held, [], False
        if held:
            self.session.local_events(held, now)
        if self._held_dropped:
            self._held_dropped = False
            self._resync_wanted = True
        self.log.info("local table read from the kernel", reason=why, entries=len(flows),
                      seconds=round(time.perf_counter() - t0, 3))
        self._pump()
        self._resync_if_drained()  # an overrun (or dropped held events) during the dump

    def _on_datagrams(self) -> None:
        assert self.sock is not None and self.session is not None
        batch = self.sock.recv(SYNC_READ_BUDGET)
        if not batch:
            return
        now = asyncio.get_running_loop().time()
        for data in batch:
            self.session.datagram_received(data, now)
        self._pump()

    def link_changed(self, ifindex: int, up: bool) -> None:
        if ifindex != self._sync_ifindex or up == self._link_up or self.session is None:
            return
        self._link_up = up
        self.log.warning("sync link " + ("up" if up else "down"), interface=self.sync.interface)
        self.session.link_changed(up, asyncio.get_running_loop().time())
        self._pump()

    # ---- outputs -----------------------------------------------------------------------

    def _pump(self) -> None:
        assert self.session is not None and self.sock is not None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for d in self.session.datagrams_to_send(now):
            self.sock.send(d)
        for ev in self.session.pop_events():
            self._on_session_event(ev.kind, ev.detail)
        self._update_demotion(now)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.session.next_deadline()
        if deadline is not None:
            self._timer = loop.call_at(max(deadline, now), self._on_timer)

    def _on_timer(self) -> None:
        assert self.session is not None
        self._timer = None
        self.session.timer(asyncio.get_running_loop().time())
        self._pump()

    def _on_session_event(self, kind: SessionEventKind, detail: str) -> None:
        quiet = {SessionEventKind.RESYNC_SENT, SessionEventKind.PEER_RESYNC_STARTED}
        bad = {SessionEventKind.DIVERGENCE, SessionEventKind.OVERFLOW, SessionEventKind.PEER_DEAD}
        fn = self.log.debug if kind in quiet else self.log.warning if kind in bad else self.log.info
        fn("sync " + kind.value.replace("_", " "), detail=detail or None,
           peer_entries=self.session.peer_count if self.session else None)

    def _update_demotion(self, now: float) -> None:
        """pfsync's lesson: never take mastership back without the peer's table. Preemption
        is held while the sync link is down and until the peer's bulk table is complete
        (however long that takes: a wrong key, a slow link, a huge table), unless
        ``preempt_hold_max`` bounds it. Taking over from a dead master is never held."""
        assert self.session is not None and self.daemon is not None
        if not self._link_up:
            want, why = True, f"sync link {self.sync.interface} is down"
        elif not self.session.synced:
            want, why = True, "waiting for the peer's connection table"
        else:
            want, why = False, ""
        if want:
            if self._hold_since is None:
                self._hold_since = now
            limit = self.sync.preempt_hold_max
            if limit and now - self._hold_since >= limit:
                want, why = False, ""
                if self._hold_logged != -1.0:
                    self._hold_logged = -1.0
                    self.log.error("preemption no longer held: preempt_hold_max reached without "
                                   "the peer's table", seconds=limit)
            elif now - self._hold_logged >= HOLD_LOG_EVERY:
                self._hold_logged = now
                self.log.warning("preemption held", reason=why,
                                 seconds=round(now - self._hold_since, 1),
                                 peer_entries=self.session.peer_count,
                                 peer_alive=self.session.peer_alive)
        else:
            self._hold_since = None
            self._hold_logged = 0.0
        machine = self.daemon.machine
        if machine is not None and (machine.demoted != want or machine.demoted_reason != why):
            self.daemon.set_demoted(want, why)

    async def _periodic(self) -> None:
        """Rates for status, the bulk-hold timeout, and the optional periodic resync."""
        assert self.session is not None
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + self.sync.resync_interval if self.sync.resync_interval else None
        while True:
            await asyncio.sleep(RATE_WINDOW)
            self._rearm_events()
            now = loop.time()
            counters = self.session.status().get("counters", {})
            if self._rate_base is not None:
                t0, base = self._rate_base
                dt = max(now - t0, 1e-6)
                self._rates = {k: round((counters.get(k, 0) - base.get(k, 0)) / dt, 1)
                               for k in ("events", "tx_bytes", "rx_bytes", "tx_datagrams")}
            self._rate_base = (now, dict(counters))
            self._update_demotion(now)
            if self._dump_retry_at is not None and now >= self._dump_retry_at:
                self._spawn(self._resync_from_kernel("retry after a failed dump"))
            if next_resync is not None and now >= next_resync:
                next_resync = now + self.sync.resync_interval
                await self._resync_from_kernel("periodic")

    # ---- takeover ----------------------------------------------------------------------

    async def commit(self) -> dict[str, Any]:
        """Put the peer's replicated table into our kernel; returns what happened."""
        assert self.session is not None and self.injector is not None
        floor = self.sync.commit_timeout_min
        # The peer's timeouts are as of its last event; a live flow refreshes its timer on
        # every packet without an event, so never commit less than the floor.
        flows = [f if f.timeout >= floor else f._replace(timeout=floor)
                 for f in self.session.iter_peer_flows()]
        loop = asyncio.get_running_loop()
        injector = self.injector
        t0 = time.perf_counter()
        # Our own inserts would raise one NEW event each, built by the kernel in the
        # inserting thread and parsed by us for nothing: leave the event groups for the
        # commit and read the resulting table with one dump afterwards, which also catches
        # whatever real traffic changed meanwhile.
        events = self.events
        self._committing = True
        if events is not None:
            events.subscribe(False)
        try:
            result = await loop.run_in_executor(self._commit_pool, injector.commit, flows)
        finally:
            self._committing = False
            if events is not None:
                events.skip(1 << 20)
                events.subscribe(True)
        duration = (time.perf_counter() - t0) * 1000
        self._spawn(self._resync_from_kernel("takeover"))
        self.last_commit = {
            "entries": len(flows), "duration_ms": round(duration, 2),
            "created": result.created, "updated": result.updated, "failed": result.failed,
            "errors": {str(k): v for k, v in result.errors.items()},
        }
        fn = self.log.warning if result.failed else self.log.info
        fn("replica committed to the kernel", **self.last_commit)
        return self.last_commit

    def became_master(self) -> None:
        """Nothing to do here: the commit is an action of its own, ordered before the VIPs."""

    def became_backup(self) -> None:
        """The kernel keeps its entries; they age out or come back with the next takeover."""

    # ---- status ------------------------------------------------------------------------

    def _bytes_per_entry(self) -> int | None:
        """Memory one held peer entry costs: its flow and key tuples, addresses, table slot.

        Sampled from one entry and cached for a while: status must never walk the table.
        """
        if self.session is None or not self.session.peer_count:
            return None
        now = time.monotonic()
        if self._entry_size is not None and now - self._entry_size[0] < 30:
            return self._entry_size[1]
        flow = next(self.session.iter_peer_flows())
        objs: list[Any] = [flow, flow.orig, flow.reply, flow.orig.src, flow.orig.dst]
        objs += [v for v in (flow.orig.sport, flow.orig.dport, flow.ct_id, flow.timeout,
                             flow.mark, flow.status) if not -5 <= v <= 256]
        if flow.reply.src is not flow.orig.dst:
            objs += [flow.reply.src, flow.reply.dst]
        # Entries of two dicts (the table, and ct id -> key) with their index slots, amortised,
        # and the boxed ct id.
        slot = 2 * (3 * 8 + 8) + sys.getsizeof(flow.ct_id)
        size = sum(sys.getsizeof(o) for o in objs) + slot
        self._entry_size = (now, size)
        return size

    async def tables(self) -> dict[str, Any]:
        """Both tables entry by entry (``invictusd tables``; tests compare them across nodes).

        Only the dict copies run on the loop (C speed, ~2 ms per 100k); turning 100k flows
        into JSON takes seconds and runs in a thread.
        """
        assert self.session is not None
        local = list(self.session.local_flows().values())
        peer = list(self.session.peer_flows().values())

        def convert() -> dict[str, Any]:
            return {"local": [flow_json(f) for f in local], "peer": [flow_json(f) for f in peer]}

        return await asyncio.get_running_loop().run_in_executor(None, convert)

    def test_hook(self, request: dict[str, Any]) -> dict[str, Any]:
        """Fault injection for tests (the daemon only calls it with INVICTUSD_TEST_HOOKS=1)."""
        if request.get("what") == "dump":
            self._fail_next_dump = True
            self._spawn(self._resync_from_kernel("test hook"))
            return {"ok": True}
        return {"ok": False, "error": f"unknown fault {request.get('what')!r}"}

    def status(self) -> dict[str, Any]:
        s = self.session.status() if self.session is not None else {}
        counters = dict(s.pop("counters", {}))
        counters.update({
            "netlink_overruns": self.overruns,
            "kernel_dumps": self.dumps,
            "dump_failures": self.dump_failures,
            "foreign_datagrams": self.sock.foreign if self.sock else 0,
            "send_errors": self.sock.send_errors if self.sock else 0,
            "events_overrun": self.events.overruns if self.events else 0,
        })
        peer_entries = self.session.peer_count if self.session else 0
        return {
            **s,
            "peer": str(self.sync.peer_address),
            "interface": self.sync.interface,
            "link_up": self._link_up,
            "epoch": f"{self._epoch:016x}",
            "peer_entries": peer_entries,
            "local_entries": self.session.local_count if self.session else 0,
            "synced": self.session.synced if self.session else False,
            "last_commit": self.last_commit,
            "rates": self._rates,
            "bytes_per_entry": self._bytes_per_entry(),
            "mark_rule": {"managed": self.sync.install_mark_rule,
                          "installed": self.mark_rule_installed, "table": MARK_TABLE},
            # Our marked entries as the kernel reported them (events and dumps).
            "kernel_marked_entries": self.session.local_count if self.session else 0,
            "preemption_held_for": (None if self._hold_since is None
                                    else round(asyncio.get_running_loop().time() - self._hold_since, 1)),
            "socket": self.sock.buffers._asdict() if self.sock else None,
            "netlink_rcvbuf": self.events.rcvbuf if self.events else None,
            "counters": counters,
        }


def _addr(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def flow_json(f: Flow) -> dict[str, Any]:
    o, r = f.orig, f.reply
    return {
        "family": o.family, "proto": o.proto, "zone": o.zone,
        "orig": [_addr(o.src), _addr(o.dst), o.sport, o.dport],
        "reply": [_addr(r.src), _addr(r.dst), r.sport, r.dport],
        "status": f.status, "timeout": f.timeout, "mark": f.mark, "tcp_state": f.tcp_state,
    }
