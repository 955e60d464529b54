"""Wiring: sockets and timers feed the sans-IO machines; their actions are carried out here.

One asyncio loop (uvloop) runs everything. Adverts go out inline the moment the machine asks
for them; everything slower (address changes through pyroute2, ARP) is done by the
``ActionWorker``, in order and without piling up, so "addresses, then gratuitous ARP"
holds without a lock and a slow address change never delays an advert. The replica needs
nothing at takeover: it is in the kernel already (``replication.py``). Every
reader is bounded per wake-up, so no input keeps the loop from its timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from invictusd import __version__, control, log, memtrace, metrics
from invictusd.config import (
    Config,
    ConfigError,
    IPv4If,
    IPv6,
    IPv6If,
    LinkInfo,
    VrrpConfig,
    check_system,
    load,
)
from invictusd.hooks import HookJob, HookRunner, environment
from invictusd.installed import Installed, RecordError, read
from invictusd.io.checks import CheckRunner
from invictusd.io.garp import GarpSocket, NeighbourAdvertiser
from invictusd.io.links import Links
from invictusd.io.markrule import MarkRuleError, remove_table
from invictusd.io.rtnl import AddrEvent, LinkEvent, RtnlMonitor
from invictusd.io.vrrp6_socket import Received6, Vrrp6Socket
from invictusd.io.vrrp_socket import VrrpSocket
from invictusd.loopmon import LoopMonitor
from invictusd.notify import Notifier
from invictusd.replication import ReplicaEnv
from invictusd.track import Change
from invictusd.vrrp import packet, plan, receive
from invictusd.vrrp.machine import (
    Action,
    AddAddresses,
    AdvertReceived,
    GroupMachine,
    GroupParams,
    LinkChanged,
    Reconfigure,
    Resume,
    SendAdvert,
    SendGarp,
    SetDemoted,
    Shutdown,
    Startup,
    State,
    StepDown,
    Tick,
    TrackChanged,
    Transition,
)
from invictusd.worker import ActionWorker

# Group state -> the [hooks] key run on entering it (INIT is only entered by a stop).
HOOK_FOR = {State.MASTER: "on_master", State.BACKUP: "on_backup", State.FAULT: "on_fault",
            State.INIT: "on_stop"}

STOP_HOOKS_MAX = 10.0  # seconds a stop waits for on_stop (and hooks queued before it)
HEARTBEAT = 0.25  # event-loop lag probe period (s); lateness, not the period, reveals a stall
STALL_WARN = 0.25  # a stall longer than this is logged
# Packets read per wake-up. The fast lane holds only genuine-looking adverts; the slow lane
# (everything else) is also rate-limited, so a flood costs a bounded share of a core and
# the kernel drops (and counts) the rest.
FAST_BUDGET = 64
SLOW_BUDGET = 64
SLOW_RATE = 20_000  # packets per second decoded from an interface's slow lanes, at most
RTNL_BUDGET = 64  # rtnetlink datagrams per wake-up


class Replica(Protocol):
    """What the daemon needs of conntrack replication (``invictusd.replication``); the
    engine reaches back only through the ``ReplicaEnv`` it is started with."""

    async def start(self, env: ReplicaEnv) -> None: ...
    def set_role(self, master: bool) -> None: ...
    def addresses_in_place(self) -> None: ...
    def link_changed(self, ifindex: int, up: bool) -> None: ...
    def status(self) -> dict[str, Any]: ...
    async def tables(self) -> dict[str, Any]: ...
    def test_hook(self, request: dict[str, Any]) -> dict[str, Any]: ...
    async def stop(self) -> None: ...


class StartError(RuntimeError):
    """The daemon cannot run as configured (the message says why)."""


def group_params(cfg: Config) -> GroupParams:
    # One machine instance per plan.instances(cfg) entry (per table, and per family under v3).
    return plan.group_params(cfg)


class _Budget:
    """Token bucket: at most ``rate`` items per second, in bursts of at most ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.at = time.monotonic()

    def take(self, want: int) -> int:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        got = min(want, int(self.tokens))
        self.tokens -= got
        return got

    def wait(self) -> float:
        """Seconds until one item may be taken."""
        return max(0.0, (1 - self.tokens) / self.rate)


@dataclass
class Instance:
    """One machine instance: ``spec.table`` is its [[vrrp]] table (two share one under v3)."""

    index: int
    ifname: str
    ifindex: int
    sock: VrrpSocket | Vrrp6Socket
    garp: GarpSocket
    na: NeighbourAdvertiser
    spec: plan.InstanceSpec
    receiver: receive.Receiver
    # The slow lane's rate limit, one per interface: under VRRPv3 its IPv4 and IPv6
    # instances share it, so a flood costs what it costs under VRRPv2, whatever it targets.
    slow: _Budget = field(default_factory=lambda: _Budget(SLOW_RATE, SLOW_BUDGET))
    slow_paused: bool = False
    drops: Counter[str] = field(default_factory=Counter)
    garps_sent: int = 0
    addresses_restored: int = 0
    # Encoded adverts per priority (each a message per destination): built once, not per send.
    adverts: dict[int, list[tuple[bytes, str]]] = field(default_factory=dict)


class Daemon:
    def __init__(self, cfg: Config, replica_factory: Any = None) -> None:
        self.cfg = cfg
        self.log = log.get(node=cfg.node.name)
        self.notifier = Notifier()
        self.links = Links()
        self.installed = Installed(cfg.node.runtime_dir)
        self.monitor = LoopMonitor()
        self.worker = ActionWorker(self)
        self.instances: list[Instance] = []
        self.machine: GroupMachine | None = None
        self.replica: Replica | None = None
        self._replica_factory = replica_factory
        self._by_ifindex: dict[int, list[int]] = {}  # ifindex -> machine instances on it
        self._table_ifindex: dict[int, int] = {}  # [[vrrp]] table -> ifindex
        self._stop = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._drop_log = log.RateLimit(10.0)
        self._rtnl: RtnlMonitor | None = None
        self._server: asyncio.AbstractServer | None = None
        self._started_wall = time.time()
        self.loop_stalls = 0
        self.callback_errors = 0
        self.max_loop_lag = 0.0
        self.last_stall: dict[str, Any] | None = None
        self.last_takeover: dict[str, Any] | None = None
        self._took_over_at: float | None = None
        self.last_loop_lag = 0.0
        self.checks: CheckRunner | None = None
        self.hooks = HookRunner(self.log)
        self._hook_task: asyncio.Future[None] | None = None
        self._metrics: metrics.MetricsServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.memtrace = memtrace.MemTrace()

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        loop.set_exception_handler(self._on_loop_error)
        loop.set_task_factory(self.monitor.task_factory)
        try:
            await self._start(loop)
        except (ConfigError, StartError, OSError) as e:
            self.log.error("cannot start", error=str(e))
            await self._close()
            return 2 if isinstance(e, ConfigError) else 1
        await self._stop.wait()

        self.notifier.stopping()
        assert self.machine is not None
        if self.checks is not None:
            await self.checks.stop()
        self._apply(self.machine.handle(Shutdown(), loop.time()))
        if not await self.worker.drain(10):
            self.log.error("shutdown: address removal did not finish in 10 s")
        # on_stop (and any hook still queued) runs before we exit, within its timeout but
        # inside the unit's TimeoutStopSec (15 s); what is still running then is killed.
        if not await self.hooks.drain(min(self.cfg.hooks.timeout + 1, STOP_HOOKS_MAX)):
            self.log.warning("hooks still running at exit; killed", queued=self.hooks.queue.qsize())
        await self._close()
        self.log.info("stopped")
        return 0

    async def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        infos, ifindex, link_up = await self.links.snapshot()
        self.cfg = check_system(self.cfg, infos)
        for w in self.cfg.warnings:
            self.log.warning("config warning", detail=w)
        await self._undo_previous_run(ifindex, infos)
        self.installed.start()

        for t, v in enumerate(self.cfg.vrrp):
            self._table_ifindex[t] = ifindex[v.interface]
        for i, spec in enumerate(plan.instances(self.cfg)):
            inst = self._open_instance(i, spec, ifindex[spec.interface])
            self.instances.append(inst)
            self._by_ifindex.setdefault(inst.ifindex, []).append(i)
            loop.add_reader(inst.sock.fast.fileno(), self._on_fast_readable, inst)
            loop.add_reader(inst.sock.slow.fileno(), self._on_slow_readable, inst)
        self._rtnl = RtnlMonitor()
        loop.add_reader(self._rtnl.fileno(), self._on_rtnl_readable)

        self.machine = GroupMachine(group_params(self.cfg))
        for inst in self.instances:
            if not link_up.get(inst.ifname, False):
                self._apply(self.machine.handle(LinkChanged(inst.index, False), loop.time()))
        m = self.cfg.metrics
        if m.listen:
            try:
                self._metrics = metrics.MetricsServer(m.host, m.port, self._snapshot_from_thread)
            except OSError as e:
                raise self.cfg.error("metrics.listen",
                                     f"cannot listen on {m.listen}: {e.strerror}") from None
        self._hook_task = asyncio.ensure_future(self.hooks.run())
        if self.cfg.track:
            # Every check reports once before the group starts: a node whose uplink check
            # fails at boot starts in FAULT instead of becoming master for a moment.
            self.checks = CheckRunner(self.cfg.track, self._on_check_change, self.log)
            self.checks.start(link_up)
            await self.checks.first_results(max(t.timeout for t in self.cfg.track) + 0.5)

        if self.cfg.sync.enabled and self._replica_factory is not None:
            self.replica = self._replica_factory(self.cfg)
            assert self.replica is not None
            env = ReplicaEnv(links=self.links.snapshot, demote=self.set_demoted,
                             record_table=self._record_table, timed=self.monitor.wrap)
            try:
                await self.replica.start(env)
            except Exception as e:
                raise StartError(f"replication: {e}") from e

        self._server = await control.serve(self.cfg.node.control_socket, self._control)
        for sig, fn in (
            (signal.SIGTERM, self.stop),
            (signal.SIGINT, self.stop),
            (signal.SIGHUP, lambda: asyncio.ensure_future(self.reload())),
            (signal.SIGUSR1, self.step_down),
            (signal.SIGUSR2, self.dump),
        ):
            loop.add_signal_handler(sig, fn)
        self.worker.start()
        self._heartbeat_task = asyncio.ensure_future(self._heartbeat())

        self._apply(self.machine.handle(Startup(), loop.time()))
        self.log.info(
            "started", version=__version__, interfaces=[v.interface for v in self.cfg.vrrp],
            state=self.machine.state.value, priority=self.machine.priority,
            preempt=self.machine.params.preempt, sync=self.cfg.sync.enabled,
            runtime_dir=self.cfg.node.runtime_dir,
        )
        self.notifier.ready(self._status_line())

    def _open_instance(self, index: int, spec: plan.InstanceSpec, ifindex: int) -> Instance:
        """The sockets of one instance: sender and receive lanes (IPv4 or IPv6), ARP, NA."""
        sock: VrrpSocket | Vrrp6Socket
        lane, unicast = plan.lane(self.cfg, spec), bool(spec.peers)
        if isinstance(spec.source, IPv6):
            sock = Vrrp6Socket(spec.interface, ifindex, spec.source, lane, unicast)
        else:
            sock = VrrpSocket(spec.interface, ifindex, spec.source, lane, unicast)
        try:
            garp = GarpSocket(spec.interface)
            try:
                na = NeighbourAdvertiser(spec.interface, ifindex)
            except OSError:
                garp.close()
                raise
        except OSError:
            sock.close()
            raise
        shared = next((i.slow for i in self.instances if i.ifindex == ifindex), None)
        inst = Instance(index, spec.interface, ifindex, sock, garp, na, spec,
                        plan.receiver(self.cfg, spec))
        if shared is not None:
            inst.slow = shared
        return inst

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A bug of ours in a callback: log it loudly (it would otherwise go to stderr only)."""
        self.callback_errors += 1
        exc = context.get("exception")
        self.log.error("internal error in a callback", message=context.get("message"),
                       error=repr(exc) if exc else None, exc_info=exc)

    def stop(self) -> None:
        self.log.info("stop requested")
        self._stop.set()

    async def _close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer:
            self._timer.cancel()
        await self.worker.stop()
        if self.checks is not None:
            await self.checks.stop()
        if self._hook_task is not None:
            self._hook_task.cancel()
        if self._metrics is not None:
            await loop.run_in_executor(None, self._metrics.close)
            self._metrics = None
        if hasattr(self, "_heartbeat_task"):
            self._heartbeat_task.cancel()
        if self.replica is not None:
            await self.replica.stop()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.cfg.node.control_socket)
        # Belt and braces: whatever happened before, no virtual address outlives a clean stop.
        for t, ifindex in self._table_ifindex.items():
            ifname = self.cfg.vrrp[t].interface
            try:
                await self._remove(ifname, ifindex, self._wanted(t) + self._recorded(ifname))
            except Exception as e:
                self.log.error("stop: could not remove addresses", interface=ifname, error=repr(e))
        for inst in self.instances:
            for fd in (inst.sock.fast.fileno(), inst.sock.slow.fileno()):
                loop.remove_reader(fd)
            inst.sock.close()
            inst.garp.close()
            inst.na.close()
        if self._rtnl is not None:
            loop.remove_reader(self._rtnl.fileno())
            self._rtnl.close()
        if self.installed.state.empty:
            self.installed.discard()
        self.links.close()

    async def _undo_previous_run(self, ifindex: dict[str, int], infos: dict[str, LinkInfo]) -> None:
        """A previous run killed with SIGKILL leaves what it installed: remove it first (its
        record, and any of our configured addresses); we start as backup."""
        try:
            previous = read(self.cfg.node.runtime_dir)
        except RecordError as e:
            self.log.error("ignoring an unreadable record of a previous run", error=str(e))
            previous = None
        leftovers: dict[str, set[str]] = {}
        if previous is not None:
            for ifname, addrs in previous.addresses.items():
                leftovers.setdefault(ifname, set()).update(addrs)
        for i, v in enumerate(self.cfg.vrrp):
            info = infos[v.interface]
            present = {a.ip for a in info.addresses} | {a.ip for a in info.addresses6}
            leftovers.setdefault(v.interface, set()).update(
                str(a) for a in self._wanted(i) if a.ip in present)
        for ifname, stale in leftovers.items():
            if not stale or ifname not in ifindex:
                continue
            removed = await self.links.remove(ifindex[ifname], [_parse_addr(a) for a in sorted(stale)])
            if removed:
                self.log.warning("removed virtual addresses left by a previous run",
                                 interface=ifname, addresses=removed)
        for table in previous.nft_tables if previous is not None else ():
            try:
                await asyncio.get_running_loop().run_in_executor(None, remove_table, table)
                self.log.warning("removed an nft table left by a previous run", table=table)
            except MarkRuleError as e:
                self.log.error("could not remove an nft table left by a previous run",
                               table=table, error=str(e))

    # ---- inputs ------------------------------------------------------------------------

    def _on_fast_readable(self, inst: Instance) -> None:
        with self._timed("vrrp fast lane"):
            for data in inst.sock.recv(inst.sock.fast, FAST_BUDGET):
                self._on_packet(inst, data)

    def _on_slow_readable(self, inst: Instance) -> None:
        with self._timed("vrrp slow lane"):
            grant = inst.slow.take(SLOW_BUDGET)
            if grant:
                for data in inst.sock.recv(inst.sock.slow, grant):
                    self._on_packet(inst, data)
            if grant < SLOW_BUDGET:
                # Rate limit reached: stop reading this lane for a moment; the kernel queues
                # (and past its limit drops and counts) what arrives meanwhile.
                loop = asyncio.get_running_loop()
                loop.remove_reader(inst.sock.slow.fileno())
                inst.slow_paused = True
                loop.call_later(max(inst.slow.wait(), 0.01), self._resume_slow, inst)

    def _resume_slow(self, inst: Instance) -> None:
        if inst.slow_paused and inst.sock.slow.fileno() >= 0:
            inst.slow_paused = False
            asyncio.get_running_loop().add_reader(inst.sock.slow.fileno(), self._on_slow_readable, inst)

    def _on_packet(self, inst: Instance, data: bytes | Received6) -> None:
        assert self.machine is not None
        try:
            if isinstance(data, Received6):
                heard = receive.receive_ip6(inst.receiver, data.payload, data.source,
                                            data.destination, data.hop_limit)
            else:
                heard = receive.receive_ip4(inst.receiver, data)
        except packet.PacketError as e:
            inst.drops[e.reason.value] += 1
            if e.reason is not packet.DropReason.OWN:
                held = self._drop_log.allow((inst.index, e.reason))
                if held is not None:
                    # Another VRRP version is a misconfigured pair (both end up master): an
                    # error, not the usual noise of a shared segment.
                    level = (self.log.error if e.reason is packet.DropReason.VERSION
                             else self.log.warning)
                    level(
                        "advert dropped", interface=inst.ifname,
                        vrid=inst.spec.vrid, family=inst.spec.family, reason=e.reason.value,
                        detail=e.detail, source=_source(data), suppressed=held,
                    )
            return
        now = asyncio.get_running_loop().time()
        self._apply(self.machine.handle(
            AdvertReceived(inst.index, heard.source, heard.priority, heard.interval), now))

    def _on_rtnl_readable(self) -> None:
        assert self._rtnl is not None and self.machine is not None
        with self._timed("rtnetlink"):
            try:
                events = self._rtnl.read(RTNL_BUDGET)
            except OverflowError:
                self.log.warning("rtnetlink overrun: link or address changes were lost; "
                                 "re-reading link and address state")
                # libuv stops watching a socket whose poll reported an error: watch it again.
                asyncio.get_running_loop().call_soon(self._rearm_rtnl)
                self.worker.resnapshot()
                return
            except ValueError as e:
                self.log.error("rtnetlink message not understood", error=str(e))
                return
            now = asyncio.get_running_loop().time()
            for ev in events:
                if isinstance(ev, LinkEvent):
                    if self.checks is not None and ev.name:
                        self.checks.link(ev.name, None if ev.deleted else ev.up, now)
                    if self.replica is not None:
                        self.replica.link_changed(ev.ifindex, ev.up)
                    for i in self._by_ifindex.get(ev.ifindex, ()):
                        self._apply(self.machine.handle(LinkChanged(i, ev.up), now))
                elif isinstance(ev, AddrEvent) and ev.deleted:
                    self._address_deleted(ev)

    def _rearm_rtnl(self) -> None:
        if self._rtnl is None:
            return
        loop = asyncio.get_running_loop()
        fd = self._rtnl.fileno()
        loop.remove_reader(fd)
        loop.add_reader(fd, self._on_rtnl_readable)
        self._on_rtnl_readable()

    def _address_deleted(self, ev: AddrEvent) -> None:
        assert self.machine is not None
        on_link = self._by_ifindex.get(ev.ifindex)
        if not on_link or self.machine.state is not State.MASTER:
            return
        first = self.instances[on_link[0]]
        if any(a.ip == ev.address for a in self._wanted(first.spec.table)):
            first.addresses_restored += 1
            self.log.warning(
                "virtual address removed behind our back; restoring",
                interface=first.ifname, address=str(ev.address),
            )
            self.worker.submit(AddAddresses())
            for i in on_link:
                self.worker.submit(SendGarp(i))

    # ---- actions -----------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        hooks: list[HookJob] = []
        for a in actions:
            if isinstance(a, SendAdvert):
                self._send_advert(a.index, a.priority)
            elif isinstance(a, Transition):
                self._on_transition(a)
                job = self._hook_job(a)
                if job is not None:
                    hooks.append(job)
            else:
                self.worker.submit(a)
        # After the transition's own work was handed to the worker: each hook waits for the
        # worker to finish it (see _hook_job).
        for job in hooks:
            self.hooks.submit(job)
        self._arm_timer()

    def _arm_timer(self) -> None:
        assert self.machine is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.machine.next_deadline()
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        assert self.machine is not None
        with self._timed("vrrp timer"):
            self._timer = None
            if self.machine.state is State.BACKUP:
                # The loop runs due timers before it polls its sockets: after this process
                # was held (a stall, no CPU for a moment), Master_Down would fire while the
                # master's adverts wait unread in the fast lane. Read them first.
                for inst in self.instances:
                    if inst.sock.fast.fileno() >= 0:  # not closed by a stop under way
                        self._on_fast_readable(inst)
            self._apply(self.machine.handle(Tick(), asyncio.get_running_loop().time()))

    def _send_advert(self, index: int, priority: int) -> None:
        inst = self.instances[index]
        adverts = inst.adverts.get(priority)
        if adverts is None:
            adverts = [(m, str(d)) for m, d in plan.advert(self.cfg, inst.spec, priority)]
            inst.adverts[priority] = adverts
        for message, destination in adverts:
            try:
                inst.sock.send(message, destination)
            except OSError as e:
                # A link going down makes sends fail before the link event arrives.
                inst.drops["send_error"] += 1
                held = self._drop_log.allow((index, "send"))
                if held is not None:
                    self.log.warning("advert not sent", interface=inst.ifname,
                                     destination=destination, error=e.strerror)

    def _on_transition(self, t: Transition) -> None:
        assert self.machine is not None
        level = self.log.warning if t.new in (State.FAULT,) or t.old is State.MASTER else (
            self.log.info)
        extra: dict[str, Any] = {"priority": self.machine.priority}
        if self.machine.track_faults or self.machine.track_delta:
            extra["tracks_down"] = list(self.checks.tracker.verdict().down) if self.checks else []
        for v in self.cfg.vrrp:
            level("state change", old=t.old.value, new=t.new.value, reason=t.reason,
                  interface=v.interface, vrid=v.virtual_id, kind="transition", **extra)
        if t.new is State.MASTER:
            self._took_over_at = time.perf_counter()
        if self.replica is not None and (t.new is State.MASTER or t.old is State.MASTER):
            self.replica.set_role(t.new is State.MASTER)
        self.notifier.status(self._status_line())

    # ---- what the worker does (ActionWorker's Target) -------------------------------------

    def is_master(self) -> bool:
        return self.machine is not None and self.machine.state is State.MASTER

    def _record_table(self, table: str, installed: bool) -> None:
        if installed:
            self.installed.installing_table(table)
        else:
            self.installed.removed_table(table)

    async def set_addresses(self, present: bool) -> None:
        """Master: the configured addresses of every table (both families, whatever instance
        advertises them) on its interface, and none of an older configuration; otherwise:
        none of them. Recorded per interface, before adding, after removing."""
        for t, ifindex in self._table_ifindex.items():
            ifname = self.cfg.vrrp[t].interface
            wanted = self._wanted(t)
            if present:
                keep = {str(a) for a in wanted}
                stale = [a for a in self._recorded(ifname) if str(a) not in keep]
                if stale:
                    await self._remove(ifname, ifindex, stale)
                self.installed.adding(ifname, [str(a) for a in wanted])
                await self.links.add(ifindex, wanted)
            else:
                await self._remove(ifname, ifindex, wanted + self._recorded(ifname))
        if present and self._took_over_at is not None:
            # From the decision to the last address in place: the replica waits for nothing.
            self.last_takeover = {"addresses_ms": round((time.perf_counter() - self._took_over_at) * 1000, 2)}
            self._took_over_at = None
        if present and self.replica is not None:
            self.replica.addresses_in_place()  # kernel walks may start now, not before

    async def _remove(self, ifname: str, ifindex: int, addrs: list[IPv4If | IPv6If]) -> None:
        unique = list({str(a): a for a in addrs}.values())
        if unique:
            await self.links.remove(ifindex, unique)
            self.installed.removed(ifname, [str(a) for a in unique])

    def _recorded(self, ifname: str) -> list[IPv4If | IPv6If]:
        return [_parse_addr(a) for a in self.installed.addresses_of(ifname)]

    async def announce(self, index: int) -> None:
        inst = self.instances[index]
        v = self.cfg.vrrp[inst.spec.table]
        if inst.spec.garp:
            inst.garps_sent += inst.garp.announce(list(inst.spec.garp), repeat=v.garp_repeat)
        if inst.spec.neighbour:
            # RFC 5798 6.4.2: a VRRPv3 master's NAs carry the Router flag.
            inst.garps_sent += inst.na.announce(
                list(inst.spec.neighbour), inst.garp.mac, repeat=v.garp_repeat,
                router=inst.spec.version == 3,
            )

    async def resnapshot(self) -> None:
        """After an rtnetlink overrun: read link state again, and put back any address of
        ours that went missing while we could not see it."""
        assert self.machine is not None
        _, _, link_up = await self.links.snapshot()
        now = asyncio.get_running_loop().time()
        if self.checks is not None:
            for t in self.cfg.track:
                if t.interface:
                    self.checks.link(t.interface, link_up.get(t.interface), now)
        for inst in self.instances:
            self._apply(self.machine.handle(LinkChanged(inst.index, link_up.get(inst.ifname, False)), now))
        if self.machine.state is State.MASTER:
            self.worker.submit(AddAddresses())

    def action_failed(self, what: str, error: BaseException) -> None:
        self.log.error("action failed", action=what, error=repr(error))

    # ---- health checks and hooks --------------------------------------------------------

    def _on_check_change(self, change: Change) -> None:
        assert self.machine is not None
        before = self.machine.priority
        v = change.verdict
        now = asyncio.get_running_loop().time()
        self._apply(self.machine.handle(TrackChanged(v.faults, v.delta, change.reason), now))
        if self.machine.priority != before:
            self.log.warning(
                "priority changed", old=before, new=self.machine.priority, reason=change.reason,
                check=change.name, tracks_down=list(v.down), kind="priority")

    def _hook_job(self, t: Transition) -> HookJob | None:
        assert self.machine is not None
        hook = HOOK_FOR.get(t.new)
        argv: tuple[str, ...] = getattr(self.cfg.hooks, hook) if hook else ()
        if hook is None or not argv:
            return None
        m = self.machine
        env = environment(
            hook=hook, state="stop" if t.new is State.INIT else t.new.value,
            old_state=t.old.value, reason=t.reason, node=self.cfg.node.name,
            # Every table's addresses, both families (under VRRPv3 the IPv6 ones are
            # advertised by instances of their own, but they move with the group all the same).
            vips=[str(a) for table in range(len(self.cfg.vrrp)) for a in self._wanted(table)],
            interfaces=[v.interface for v in self.cfg.vrrp],
            vrids=[v.virtual_id for v in self.cfg.vrrp], priority=m.priority,
            track_down=self.checks.tracker.verdict().down if self.checks else (),
            sequence=m.transitions,
        )
        return HookJob(hook, argv, env, self.cfg.hooks.timeout,
                       asyncio.get_running_loop().time(), ready=self._transition_work_done)

    async def _transition_work_done(self) -> None:
        """A hook starts once the worker has done what its transition asked (addresses,
        gratuitous ARP): ``on_master`` finds the addresses in place."""
        await self.worker.drain(self.cfg.hooks.timeout)

    def _wanted(self, table: int) -> list[IPv4If | IPv6If]:
        """Every virtual address of the [[vrrp]] table ``table`` (both families)."""
        v = self.cfg.vrrp[table]
        return [*v.virtual_addresses, *v.virtual_addresses6]

    # ---- commands ----------------------------------------------------------------------

    def step_down(self) -> None:
        assert self.machine is not None
        self.log.info("step down requested")
        self._apply(self.machine.handle(StepDown(), asyncio.get_running_loop().time()))

    def resume(self) -> None:
        assert self.machine is not None
        self.log.info("resume requested")
        self._apply(self.machine.handle(Resume(), asyncio.get_running_loop().time()))

    def set_demoted(self, demoted: bool, reason: str) -> None:
        assert self.machine is not None
        if demoted != self.machine.demoted:
            self.log.info("preemption " + ("held" if demoted else "allowed"), reason=reason)
        now = asyncio.get_running_loop().time()
        self._apply(self.machine.handle(SetDemoted(demoted, reason), now))

    async def reload(self) -> dict[str, Any]:
        assert self.machine is not None
        self.log.info("reload requested", config=self.cfg.path)
        try:
            new = load(self.cfg.path)
            infos, _, _ = await self.links.snapshot()
            new = check_system(new, infos)
        except ConfigError as e:
            self.log.error("reload refused; keeping the running configuration", error=str(e))
            return {"ok": False, "error": str(e)}
        why = _needs_restart(self.cfg, new)
        if why:
            self.log.error("reload refused; keeping the running configuration", error=why)
            return {"ok": False, "error": why}
        moved = [v.interface for old, v in zip(self.cfg.vrrp, new.vrrp, strict=True)
                 if (old.virtual_addresses, old.virtual_addresses6)
                 != (v.virtual_addresses, v.virtual_addresses6)]
        self.cfg = new
        for inst, spec in zip(self.instances, plan.instances(new), strict=True):
            inst.spec = spec
            inst.receiver = plan.receiver(new, spec)
            inst.adverts.clear()
            inst.sock.update(plan.lane(new, spec))
        now = asyncio.get_running_loop().time()
        self._apply(self.machine.handle(Reconfigure(group_params(new)), now))
        if moved and self.machine.state is State.MASTER:
            # Old addresses off, new ones on (recorded either way), then announced.
            self.worker.submit(AddAddresses())
            for inst in self.instances:
                if inst.ifname in moved:
                    self.worker.submit(SendGarp(inst.index))
        self.log.info("reloaded", priority=self.machine.priority, preempt=self.machine.params.preempt,
                      addresses_changed=moved or None)
        return {"ok": True}

    def dump(self) -> None:
        self.log.info("status dump", **self.status())

    async def _control(self, cmd: str, request: dict[str, Any]) -> dict[str, Any]:
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "step-down":
            self.step_down()
            return {"ok": True}
        if cmd == "resume":
            self.resume()
            return {"ok": True}
        if cmd == "reload":
            return await self.reload()
        if cmd == "metrics":
            return {"ok": True, "text": metrics.render(self.status()).decode()}
        if cmd == "tables":
            if self.replica is None:
                return {"ok": False, "error": "replication is not enabled ([sync] enabled = false)"}
            return {"ok": True, **await self.replica.tables()}
        if cmd == "memory":
            return self.memtrace.report(request)
        if os.environ.get("INVICTUSD_TEST_HOOKS") == "1":
            if cmd == "stall":
                # Test hook: block the event loop to prove stall detection and the watchdog;
                # "in": "io" blocks it inside an I/O callback, after which the loop runs its
                # due timers before it polls the sockets again.
                seconds = float(request.get("seconds", 2.0))
                if request.get("in") == "io":
                    await _stall_in_io_callback(seconds)
                else:
                    time.sleep(seconds)
                return {"ok": True}
            if cmd == "fault" and self.replica is not None:
                return self.replica.test_hook(request)
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # ---- status ------------------------------------------------------------------------

    def _timed(self, what: str) -> _Timer:
        return _Timer(self.monitor, what)

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.notifier.watchdog_interval
        next_ping = loop.time()
        expected = loop.time() + HEARTBEAT
        while True:
            await asyncio.sleep(HEARTBEAT)
            now = loop.time()
            lag = now - expected
            expected = now + HEARTBEAT
            step, culprit = self.monitor.take()
            stall = max(lag, step)
            self.last_loop_lag = stall
            self.max_loop_lag = max(self.max_loop_lag, stall)
            if stall > STALL_WARN:
                self.loop_stalls += 1
                self.last_stall = {"seconds": round(stall, 3), "culprit": culprit if step >= lag else None}
                self.log.warning("event loop stalled", seconds=round(stall, 3),
                                 culprit=self.last_stall["culprit"], probe_lag=round(lag, 3))
            if interval is not None and now >= next_ping:
                self.notifier.watchdog()
                next_ping = now + interval / 2

    def _status_line(self) -> str:
        assert self.machine is not None
        line = f"{self.machine.state.value}, priority {self.machine.priority}"
        if self.replica is not None:
            s = self.replica.status()
            line += f", sync peer entries {s.get('peer_entries', 0)}"
        return line

    def status(self) -> dict[str, Any]:
        assert self.machine is not None
        m = self.machine
        now = asyncio.get_running_loop().time()
        vrrp = []
        for inst in self.instances:
            spec = inst.spec
            v, p, view = self.cfg.vrrp[spec.table], m.params.instances[inst.index], (
                m.instances[inst.index])
            fast, slow = inst.sock.overflows()
            drops = dict(inst.drops)
            if slow:
                drops["overflow"] = slow
            if fast:
                drops["overflow_fast_lane"] = fast
            vrrp.append({
                "interface": v.interface,
                "virtual_id": v.virtual_id,
                "version": spec.version,
                "family": spec.family,
                "state": m.state.value,
                "priority": p.priority,
                "real_address": str(p.primary),  # the advert's source (IPv6: link-local)
                # What this instance moves: its IPv4 addresses, and its IPv6 ones (under
                # VRRPv2 those ride along unadvertised; under VRRPv3 the IPv6 instance has them).
                "virtual_addresses": [str(a) for a in v.virtual_addresses if a.ip in spec.garp],
                "virtual_addresses6": [str(a) for a in v.virtual_addresses6
                                       if a.ip in spec.neighbour],
                "unicast_peers": [str(a) for a in spec.peers],
                "master_address": str(view.master_address) if view.master_address else None,
                "master_priority": view.master_priority,
                "link_up": view.link_up,
                "advert_interval": v.advert_interval,
                "master_advert_interval": m.master_advert_interval(inst.index),
                "master_down_interval": m.master_down_interval(inst.index),
                "time_in_state": round(now - m.since, 3),
                "socket": {lane: b._asdict() for lane, b in inst.sock.buffers().items()},
                "counters": {
                    "adverts_sent": view.adverts_sent,
                    "adverts_received": view.adverts_received,
                    "drops": drops,
                    "transitions": m.transitions,
                    "garp_sent": inst.garps_sent,
                    "addresses_restored": inst.addresses_restored,
                },
            })
        return {
            "node": self.cfg.node.name,
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.time() - self._started_wall, 3),
            "group": {
                "state": m.state.value,
                "priority": m.priority,
                "base_priority": m.base.instances[m.params.lead].priority if m.base else None,
                "preempt": m.params.preempt,
                "stepped_down": m.stepped_down,
                "demoted": m.demoted,
                "demoted_reason": m.demoted_reason,
                "transitions": m.transitions,
                "last_takeover": self.last_takeover,
            },
            "vrrp": vrrp,
            "sync": self.replica.status() if self.replica is not None else None,
            "installed": {"record": str(self.installed.path),
                          "addresses": self.installed.state.addresses,
                          "nft_tables": self.installed.state.nft_tables},
            "worker": dict(self.worker.counters),
            "track": {
                "priority_delta": m.track_delta,
                "faults": list(m.track_faults),
                "checks": self.checks.status(now) if self.checks is not None else [],
            },
            "hooks": self.hooks.status(self.cfg.hooks),
            "metrics": {"listen": self.cfg.metrics.listen or None},
            "loop": {"stalls": self.loop_stalls, "max_lag_ms": round(self.max_loop_lag * 1000, 1),
                     "lag_ms": round(max(self.last_loop_lag, 0.0) * 1000, 1),
                     "last_stall": self.last_stall, "callback_errors": self.callback_errors},
        }

    async def _status_now(self) -> dict[str, Any]:
        return self.status()

    def _snapshot_from_thread(self) -> dict[str, Any]:
        """A status snapshot for the metrics server's thread, taken on the event loop."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self._status_now(), self._loop).result(timeout=5)


class _Timer:
    """``with daemon._timed("what"):`` times a callback for the loop monitor."""

    __slots__ = ("monitor", "t0", "what")

    def __init__(self, monitor: LoopMonitor, what: str) -> None:
        self.monitor, self.what, self.t0 = monitor, what, 0.0

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.monitor.note(time.perf_counter() - self.t0, self.what)


def _parse_addr(text: str) -> IPv4If | IPv6If:
    return IPv6If(text) if ":" in text else IPv4If(text)


def _source(data: bytes | Received6) -> str:
    if isinstance(data, Received6):
        return str(data.source)
    return ".".join(str(b) for b in data[12:16]) if len(data) >= 20 else "?"


def _needs_restart(old: Config, new: Config) -> str:
    """What a reload cannot apply (the sockets, the machine's instances depend on it), named;
    empty if nothing. Addresses, priorities, intervals and passwords are applied live."""

    def families(v: VrrpConfig) -> tuple[bool, ...]:
        # Under VRRPv3 each family has an instance of its own (own sockets, timers).
        return (bool(v.virtual_addresses), bool(v.virtual_addresses6)) if v.version == 3 else ()

    changed: list[str] = []
    if [v.interface for v in old.vrrp] != [v.interface for v in new.vrrp]:
        changed.append("the [[vrrp]] interfaces")
    else:
        for t, (a, b) in enumerate(zip(old.vrrp, new.vrrp, strict=True)):
            for what, before, after in (
                ("virtual_id", a.virtual_id, b.virtual_id),
                ("real_address", a.real_address, b.real_address),
                ("version", a.version, b.version),
                ("unicast_peers", a.unicast_peers, b.unicast_peers),
                ("link-local address", a.link_local, b.link_local),
                ("address families (VRRPv3 advertises each from an instance of its own)",
                 families(a), families(b)),
            ):
                if before != after:
                    changed.append(f"vrrp[{t}] {what}")
    for what, was, now in (("[sync]", old.sync, new.sync),
                           ("the control socket", old.node.control_socket, new.node.control_socket),
                           ("the runtime directory", old.node.runtime_dir, new.node.runtime_dir),
                           ("[[track]]", old.track, new.track),
                           ("[metrics]", old.metrics, new.metrics)):
        if was != now:
            changed.append(what)
    if changed:
        return (f"{', '.join(changed)} changed; this needs a restart (systemctl restart "
                "invictusd)")
    return ""


async def _stall_in_io_callback(seconds: float) -> None:
    """Block the loop for ``seconds`` from a reader callback (the stall test hook)."""
    import socket

    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    r, w = socket.socketpair()

    def stalled() -> None:
        loop.remove_reader(r.fileno())
        time.sleep(seconds)
        done.set_result(None)

    try:
        loop.add_reader(r.fileno(), stalled)
        w.send(b"x")
        await done
    finally:
        r.close()
        w.close()


def run(cfg: Config, replica_factory: Any = None) -> int:
    import gc

    import uvloop

    # The replica holds one tuple graph per connection; with the default thresholds the
    # collector walks them all every few thousand events (measured: 3x slower decode).
    # Everything alive at start is frozen out of collection; nothing we keep forms cycles.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    memtrace.start_from_env()  # INVICTUSD_TRACEMALLOC: a diagnostic, off by default

    # uvloop.run (not uvloop.install): a global policy breaks pyroute2's threads.
    return uvloop.run(Daemon(cfg, replica_factory).run())
