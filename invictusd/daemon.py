"""Wiring: sockets and timers feed the sans-IO machines; their actions are carried out here.

One asyncio loop (uvloop) runs everything. Adverts go out inline the moment the machine asks
for them; everything slower (address changes through pyroute2, the replica commit, ARP) is
done by the ``ActionWorker``, in order and without piling up, so "commit, then addresses,
then gratuitous ARP" holds without a lock and a slow commit never delays an advert. Every
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

from invictusd import __version__, control, log, memtrace
from invictusd.config import Config, ConfigError, IPv4If, IPv6If, LinkInfo, check_system, load
from invictusd.installed import Installed, RecordError, read
from invictusd.io.garp import GarpSocket, NeighbourAdvertiser
from invictusd.io.links import Links
from invictusd.io.markrule import MarkRuleError, remove_table
from invictusd.io.rtnl import AddrEvent, LinkEvent, RtnlMonitor
from invictusd.io.vrrp_socket import VrrpSocket
from invictusd.loopmon import LoopMonitor
from invictusd.notify import Notifier
from invictusd.replication import ReplicaEnv
from invictusd.vrrp import packet
from invictusd.vrrp.filter import LaneSpec
from invictusd.vrrp.machine import (
    Action,
    AddAddresses,
    AdvertReceived,
    GroupMachine,
    GroupParams,
    InstanceParams,
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
    Transition,
)
from invictusd.worker import ActionWorker

HEARTBEAT = 0.25  # event-loop lag probe period (s); lateness, not the period, reveals a stall
STALL_WARN = 0.25  # a stall longer than this is logged
# Packets read per wake-up. The fast lane holds only genuine-looking adverts; the slow lane
# (everything else) is also rate-limited, so a flood costs a bounded share of a core and
# the kernel drops (and counts) the rest.
FAST_BUDGET = 64
SLOW_BUDGET = 64
SLOW_RATE = 20_000  # packets per second decoded from the slow lane, at most
RTNL_BUDGET = 64  # rtnetlink datagrams per wake-up


class Replica(Protocol):
    """What the daemon needs of conntrack replication (``invictusd.replication``); the
    engine reaches back only through the ``ReplicaEnv`` it is started with."""

    async def start(self, env: ReplicaEnv) -> None: ...
    def set_role(self, master: bool) -> None: ...
    def link_changed(self, ifindex: int, up: bool) -> None: ...
    def status(self) -> dict[str, Any]: ...
    async def tables(self) -> dict[str, Any]: ...
    def test_hook(self, request: dict[str, Any]) -> dict[str, Any]: ...
    async def stop(self) -> None: ...


class StartError(RuntimeError):
    """The daemon cannot run as configured (the message says why)."""


def group_params(cfg: Config) -> GroupParams:
    instances = []
    for v in cfg.vrrp:
        assert v.real_address is not None, "check_system fills real_address"
        instances.append(
            InstanceParams(v.interface, v.virtual_id, v.priority, v.real_address, v.advert_interval)
        )
    first = cfg.vrrp[0]
    refreshes = [v.garp_refresh for v in cfg.vrrp if v.garp_refresh > 0]
    return GroupParams(
        instances=tuple(instances),
        preempt=first.preempt,
        preempt_delay=max(v.preempt_delay for v in cfg.vrrp),
        garp_refresh=min(refreshes) if refreshes else 0.0,
    )


def _expect(cfg: Config, i: int) -> packet.Expect:
    v = cfg.vrrp[i]
    return packet.Expect(
        vrid=v.virtual_id,
        advert_interval=v.advert_interval,
        addresses=frozenset(a.ip for a in v.virtual_addresses),
        auth_type=packet.AUTH_PASSWORD,
        password=v.password,
    )


def _lane_spec(cfg: Config, i: int) -> LaneSpec:
    v = cfg.vrrp[i]
    return LaneSpec(v.virtual_id, len(v.virtual_addresses), packet.AUTH_PASSWORD, v.password,
                    v.advert_interval)


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
    index: int
    ifname: str
    ifindex: int
    sock: VrrpSocket
    garp: GarpSocket
    na: NeighbourAdvertiser
    expect: packet.Expect
    slow: _Budget = field(default_factory=lambda: _Budget(SLOW_RATE, SLOW_BUDGET))
    slow_paused: bool = False
    drops: Counter[str] = field(default_factory=Counter)
    garps_sent: int = 0
    addresses_restored: int = 0


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
        self._by_ifindex: dict[int, int] = {}
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
        self.memtrace = memtrace.MemTrace()

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
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
        self._apply(self.machine.handle(Shutdown(), loop.time()))
        if not await self.worker.drain(10):
            self.log.error("shutdown: address removal did not finish in 10 s")
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

        for i, v in enumerate(self.cfg.vrrp):
            assert v.real_address is not None
            sock = VrrpSocket(v.interface, ifindex[v.interface], v.real_address, _lane_spec(self.cfg, i))
            garp = GarpSocket(v.interface)
            na = NeighbourAdvertiser(v.interface, ifindex[v.interface])
            inst = Instance(i, v.interface, ifindex[v.interface], sock, garp, na, _expect(self.cfg, i))
            self.instances.append(inst)
            self._by_ifindex[inst.ifindex] = i
            loop.add_reader(sock.fast.fileno(), self._on_fast_readable, inst)
            loop.add_reader(sock.slow.fileno(), self._on_slow_readable, inst)
        self._rtnl = RtnlMonitor()
        loop.add_reader(self._rtnl.fileno(), self._on_rtnl_readable)

        self.machine = GroupMachine(group_params(self.cfg))
        for i, v in enumerate(self.cfg.vrrp):
            if not link_up.get(v.interface, False):
                self._apply(self.machine.handle(LinkChanged(i, False), loop.time()))

        if self.cfg.sync.enabled and self._replica_factory is not None:
            self.replica = self._replica_factory(self.cfg)
            assert self.replica is not None
            env = ReplicaEnv(links=self.links.snapshot, demote=self.set_demoted,
                             record_table=self._record_table)
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
        if hasattr(self, "_heartbeat_task"):
            self._heartbeat_task.cancel()
        if self.replica is not None:
            await self.replica.stop()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.cfg.node.control_socket)
        # Belt and braces: whatever happened before, no virtual address outlives a clean stop.
        for inst in self.instances:
            try:
                await self._remove(inst, self._wanted(inst.index) + self._recorded(inst))
            except Exception as e:
                self.log.error("stop: could not remove addresses", interface=inst.ifname, error=repr(e))
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

    def _on_packet(self, inst: Instance, data: bytes) -> None:
        assert self.machine is not None
        try:
            source, ttl, adv = packet.decode_ip(data)
            if source == inst.sock.source:
                raise packet.PacketError(packet.DropReason.OWN, "our own advertisement")
            packet.validate(ttl, adv, inst.expect)
        except packet.PacketError as e:
            inst.drops[e.reason.value] += 1
            if e.reason is not packet.DropReason.OWN:
                held = self._drop_log.allow((inst.index, e.reason))
                if held is not None:
                    self.log.warning(
                        "advert dropped", interface=inst.ifname,
                        vrid=inst.expect.vrid, reason=e.reason.value, detail=e.detail,
                        source=_source(data), suppressed=held,
                    )
            return
        now = asyncio.get_running_loop().time()
        self._apply(self.machine.handle(AdvertReceived(inst.index, source, adv.priority), now))

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
                    if self.replica is not None:
                        self.replica.link_changed(ev.ifindex, ev.up)
                    i = self._by_ifindex.get(ev.ifindex)
                    if i is not None:
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
        i = self._by_ifindex.get(ev.ifindex)
        if i is None or self.machine.state is not State.MASTER:
            return
        if any(a.ip == ev.address for a in self._wanted(i)):
            self.instances[i].addresses_restored += 1
            self.log.warning(
                "virtual address removed behind our back; restoring",
                interface=self.instances[i].ifname, address=str(ev.address),
            )
            self.worker.submit(AddAddresses())
            self.worker.submit(SendGarp(i))

    # ---- actions -----------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, SendAdvert):
                self._send_advert(a.index, a.priority)
            elif isinstance(a, Transition):
                self._on_transition(a)
            else:
                self.worker.submit(a)
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
            self._apply(self.machine.handle(Tick(), asyncio.get_running_loop().time()))

    def _send_advert(self, index: int, priority: int) -> None:
        v = self.cfg.vrrp[index]
        adv = packet.Advertisement(
            vrid=v.virtual_id, priority=priority,
            addresses=tuple(a.ip for a in v.virtual_addresses),
            advert_interval=v.advert_interval, auth_type=packet.AUTH_PASSWORD,
            auth_data=v.password,
        )
        try:
            self.instances[index].sock.send(packet.encode(adv))
        except OSError as e:
            # A link going down makes sends fail before the link event arrives.
            self.instances[index].drops["send_error"] += 1
            held = self._drop_log.allow((index, "send"))
            if held is not None:
                self.log.warning("advert not sent", interface=v.interface, error=e.strerror)

    def _on_transition(self, t: Transition) -> None:
        assert self.machine is not None
        level = self.log.warning if t.new in (State.FAULT,) or t.old is State.MASTER else (
            self.log.info)
        for v in self.cfg.vrrp:
            level("state change", old=t.old.value, new=t.new.value, reason=t.reason,
                  interface=v.interface, vrid=v.virtual_id)
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
        """Master: the configured addresses on every interface (and none of an older
        configuration); otherwise: none of them. Recorded before adding, after removing."""
        for inst in self.instances:
            wanted = self._wanted(inst.index)
            if present:
                keep = {str(a) for a in wanted}
                stale = [a for a in self._recorded(inst) if str(a) not in keep]
                if stale:
                    await self._remove(inst, stale)
                self.installed.adding(inst.ifname, [str(a) for a in wanted])
                await self.links.add(inst.ifindex, wanted)
            else:
                await self._remove(inst, wanted + self._recorded(inst))
        if present and self._took_over_at is not None:
            # From the decision to the last address in place: the replica waits for nothing.
            self.last_takeover = {"addresses_ms": round((time.perf_counter() - self._took_over_at) * 1000, 2)}
            self._took_over_at = None

    async def _remove(self, inst: Instance, addrs: list[IPv4If | IPv6If]) -> None:
        unique = list({str(a): a for a in addrs}.values())
        if unique:
            await self.links.remove(inst.ifindex, unique)
            self.installed.removed(inst.ifname, [str(a) for a in unique])

    def _recorded(self, inst: Instance) -> list[IPv4If | IPv6If]:
        return [_parse_addr(a) for a in self.installed.addresses_of(inst.ifname)]

    async def announce(self, index: int) -> None:
        v = self.cfg.vrrp[index]
        inst = self.instances[index]
        inst.garps_sent += inst.garp.announce([a.ip for a in v.virtual_addresses], repeat=v.garp_repeat)
        if v.virtual_addresses6:
            inst.garps_sent += inst.na.announce(
                [a.ip for a in v.virtual_addresses6], inst.garp.mac, repeat=v.garp_repeat
            )

    async def resnapshot(self) -> None:
        """After an rtnetlink overrun: read link state again, and put back any address of
        ours that went missing while we could not see it."""
        assert self.machine is not None
        _, _, link_up = await self.links.snapshot()
        now = asyncio.get_running_loop().time()
        for inst in self.instances:
            self._apply(self.machine.handle(LinkChanged(inst.index, link_up.get(inst.ifname, False)), now))
        if self.machine.state is State.MASTER:
            self.worker.submit(AddAddresses())

    def action_failed(self, what: str, error: BaseException) -> None:
        self.log.error("action failed", action=what, error=repr(error))

    def _wanted(self, index: int) -> list[IPv4If | IPv6If]:
        v = self.cfg.vrrp[index]
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
        for inst in self.instances:
            inst.expect = _expect(new, inst.index)
            inst.sock.update(_lane_spec(new, inst.index))
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
        if cmd == "tables":
            if self.replica is None:
                return {"ok": False, "error": "replication is not enabled ([sync] enabled = false)"}
            return {"ok": True, **await self.replica.tables()}
        if cmd == "memory":
            return self.memtrace.report(request)
        if os.environ.get("INVICTUSD_TEST_HOOKS") == "1":
            if cmd == "stall":
                # Test hook: block the event loop to prove stall detection and the watchdog.
                time.sleep(float(request.get("seconds", 2.0)))
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
            v, p, view = self.cfg.vrrp[inst.index], m.params.instances[inst.index], m.instances[
                inst.index]
            fast, slow = inst.sock.overflows()
            drops = dict(inst.drops)
            if slow:
                drops["overflow"] = slow
            if fast:
                drops["overflow_fast_lane"] = fast
            vrrp.append({
                "interface": v.interface,
                "virtual_id": v.virtual_id,
                "state": m.state.value,
                "priority": p.priority,
                "real_address": str(p.primary),
                "virtual_addresses": [str(a) for a in v.virtual_addresses],
                "virtual_addresses6": [str(a) for a in v.virtual_addresses6],
                "master_address": str(view.master_address) if view.master_address else None,
                "master_priority": view.master_priority,
                "link_up": view.link_up,
                "advert_interval": v.advert_interval,
                "master_down_interval": p.master_down_interval,
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
            "loop": {"stalls": self.loop_stalls, "max_lag_ms": round(self.max_loop_lag * 1000, 1),
                     "last_stall": self.last_stall, "callback_errors": self.callback_errors},
        }


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


def _source(data: bytes) -> str:
    return ".".join(str(b) for b in data[12:16]) if len(data) >= 20 else "?"


def _needs_restart(old: Config, new: Config) -> str:
    def shape(c: Config) -> Any:
        return (
            [(v.interface, v.virtual_id, v.real_address) for v in c.vrrp],
            c.sync, c.node.control_socket, c.node.runtime_dir,
        )

    if shape(old) != shape(new):
        return ("interfaces, VRIDs, real addresses, the control socket, the runtime directory "
                "or [sync] changed; these need a restart (systemctl restart invictusd)")
    return ""


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
