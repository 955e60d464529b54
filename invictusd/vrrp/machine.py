"""RFC 3768 / RFC 5798 section 6.4 state machine for one node's group of virtual routers, sans-IO.

One ``GroupMachine`` drives every ``[[vrrp]]`` interface of a node. Each interface keeps its
own RFC timers (Master_Down, Adver_Timer) and sees its own adverts, but the *state* is the
group's: when any interface has to become master, all do; when any has to leave mastership
(a better master, a link down, a step-down), all do. LAN and WAN addresses therefore never
split between the two firewalls.

Equal-priority tie-break (RFC: the higher primary address wins) is taken on the group's
*lead* interface (lowest VRID) whenever the peer has been heard there recently, so two nodes
whose addresses sort differently on LAN and WAN still agree on one winner instead of each
winning one interface and flapping (the keepalived sync-group failure mode).

VRRPv3 (RFC 5798) differs in three places, all per instance (``InstanceParams.version``):
intervals are fractions of a second; Skew_Time scales with the master's interval,
``(256 - priority) x Master_Adver_Interval / 256``; and a backup adopts the interval the
master advertises (``AdvertReceived.advert_interval``) as its Master_Adver_Interval. Under
VRRPv3 an interface carries one instance per address family (IPv4 and IPv6 adverts are
separate); they belong to the group like any other, and the lead is the lowest
(VRID, family), IPv4 first.

The machine never reads a clock, sleeps or touches a socket: ``handle(event, now)`` returns
the actions to perform, in order, and ``next_deadline()`` says when to call ``handle(Tick(),
now)`` next.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from invictusd.track import bounded_priority

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address

# Time after the first GARP burst at which the second one is sent (neighbours that missed or
# ignored the first; keepalived does the same with 5 s).
GARP_SECOND_BURST_AFTER = 5.0


class State(enum.StrEnum):
    INIT = "init"
    BACKUP = "backup"
    MASTER = "master"
    FAULT = "fault"


@dataclass(frozen=True, slots=True)
class InstanceParams:
    interface: str
    vrid: int
    priority: int
    primary: IPv4 | IPv6  # IPv6 (VRRPv3): the interface's link-local address
    advert_interval: float = 1  # seconds (VRRPv2: whole seconds; VRRPv3: centiseconds)
    version: int = 2
    family: int = 4

    def skew_for(self, master_interval: float) -> float:
        """Skew_Time: RFC 3768 ignores the interval, RFC 5798 scales with the master's."""
        if self.version == 3:
            return (256 - self.priority) * master_interval / 256
        return (256 - self.priority) / 256

    def master_down_for(self, master_interval: float) -> float:
        """Master_Down_Interval when the master advertises every ``master_interval`` s."""
        return 3 * master_interval + self.skew_for(master_interval)

    @property
    def skew_time(self) -> float:
        return self.skew_for(self.advert_interval)

    @property
    def master_down_interval(self) -> float:
        return self.master_down_for(self.advert_interval)


@dataclass(frozen=True, slots=True)
class GroupParams:
    instances: tuple[InstanceParams, ...]
    preempt: bool = False
    preempt_delay: float = 0.0
    garp_refresh: float = 0.0  # 0 = no periodic refresh after the two bursts

    @property
    def lead(self) -> int:
        """The tie-break instance: lowest VRID, IPv4 before IPv6 (the same on both nodes)."""
        return min(range(len(self.instances)),
                   key=lambda i: (self.instances[i].vrid, self.instances[i].family))


# ---- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Startup:
    pass


@dataclass(frozen=True, slots=True)
class Tick:
    """Time has passed; fire whatever deadline is due."""


@dataclass(frozen=True, slots=True)
class AdvertReceived:
    """A valid advertisement (all section 7.1 checks passed) on instance ``index``."""

    index: int
    source: IPv4 | IPv6
    priority: int
    # VRRPv3: the interval the sender advertises (seconds), adopted by a backup as its
    # Master_Adver_Interval. None (VRRPv2): the interval equals ours, checked on receipt.
    advert_interval: float | None = None


@dataclass(frozen=True, slots=True)
class LinkChanged:
    index: int
    up: bool


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class StepDown:
    """Hand mastership over now and do not take it back while the peer lives."""


@dataclass(frozen=True, slots=True)
class Resume:
    """Undo ``StepDown``."""


@dataclass(frozen=True, slots=True)
class SetDemoted:
    """While demoted (replica incomplete, sync link down) this node does not preempt."""

    demoted: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Reconfigure:
    """New parameters with the same interfaces and VRIDs; never causes a transition itself."""

    params: GroupParams


@dataclass(frozen=True, slots=True)
class TrackChanged:
    """The node's health checks (``invictusd.track``) say something new.

    ``faults`` names the down checks that take the group out of mastership (FAULT, as a lost
    link does); ``delta`` is added to every configured priority (bounded 1..254), which
    changes what we advertise and so election and preemption, never a transition by itself.
    """

    faults: tuple[str, ...] = ()
    delta: int = 0
    reason: str = ""


Event = (
    Startup
    | Tick
    | AdvertReceived
    | LinkChanged
    | Shutdown
    | StepDown
    | Resume
    | SetDemoted
    | Reconfigure
    | TrackChanged
)

# ---- actions -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendAdvert:
    index: int
    priority: int


@dataclass(frozen=True, slots=True)
class SendGarp:
    index: int


@dataclass(frozen=True, slots=True)
class AddAddresses:
    pass


@dataclass(frozen=True, slots=True)
class RemoveAddresses:
    pass


@dataclass(frozen=True, slots=True)
class Transition:
    old: State
    new: State
    reason: str


Action = SendAdvert | SendGarp | AddAddresses | RemoveAddresses | Transition


class UnexpectedInput(RuntimeError):
    """An (state, input) pair with no row in the table: a bug of ours, never network input."""


@dataclass(slots=True)
class InstanceView:
    """Per-interface runtime data (read by status; mutated only by the machine)."""

    link_up: bool = True
    master_down_at: float | None = None
    master_down_why: str = ""
    advert_at: float | None = None
    # Master_Adver_Interval (RFC 5798): ours until a VRRPv3 master advertises another.
    master_advert_interval: float | None = None
    master_address: IPv4 | IPv6 | None = None
    master_priority: int | None = None
    adverts_sent: int = 0
    adverts_received: int = 0


@dataclass(slots=True)
class _Peer:
    address: IPv4 | IPv6
    seen_at: float


@dataclass(slots=True)
class GroupMachine:
    params: GroupParams
    state: State = State.INIT
    since: float = 0.0
    stepped_down: bool = False
    demoted: bool = False
    demoted_reason: str = ""
    started_at: float | None = None
    garp_at: float | None = None
    garp_second_pending: bool = False
    transitions: int = 0
    instances: list[InstanceView] = field(default_factory=list)
    _lead_peer: _Peer | None = None
    # Health checks: ``params`` holds the priorities we advertise (configured + track delta);
    # ``base`` the configured ones.
    base: GroupParams | None = None
    track_faults: tuple[str, ...] = ()
    track_delta: int = 0

    def __post_init__(self) -> None:
        if not self.params.instances:
            raise ValueError("a group needs at least one instance")
        self.instances = [InstanceView() for _ in self.params.instances]
        self.params = _checked(self.params)
        self.base = self.params

    # ---- public API --------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Action]:
        handler = _TABLE.get((self.state, type(event)))
        if handler is None:
            raise UnexpectedInput(f"no transition for {type(event).__name__} in {self.state}")
        out: list[Action] = []
        handler(self, event, now, out)
        return out

    def next_deadline(self) -> float | None:
        times = [
            t for v in self.instances for t in (v.master_down_at, v.advert_at) if t is not None
        ]
        if self.garp_at is not None:
            times.append(self.garp_at)
        return min(times) if times else None

    @property
    def priority(self) -> int:
        return self.params.instances[self.params.lead].priority

    def master_advert_interval(self, index: int) -> float:
        """The interval this instance expects from the master (adopted under VRRPv3)."""
        v = self.instances[index].master_advert_interval
        return v if v is not None else self.params.instances[index].advert_interval

    def master_down_interval(self, index: int) -> float:
        """Master_Down_Interval now, from the master's interval (RFC 5798) or ours."""
        return self.params.instances[index].master_down_for(self.master_advert_interval(index))

    def preempt_allowed(self, now: float) -> bool:
        if not self.params.preempt or self.stepped_down or self.demoted:
            return False
        started = self.started_at if self.started_at is not None else now
        return now >= started + self.params.preempt_delay

    # ---- transitions -------------------------------------------------------------------

    def _goto(self, new: State, reason: str, now: float, out: list[Action]) -> None:
        out.append(Transition(self.state, new, reason))
        self.state = new
        self.since = now
        self.transitions += 1

    def _become_master(self, reason: str, now: float, out: list[Action]) -> None:
        self._goto(State.MASTER, reason, now, out)
        self.stepped_down = False
        for i, (p, v) in enumerate(zip(self.params.instances, self.instances, strict=True)):
            v.master_down_at = None
            v.master_address = p.primary
            v.master_priority = p.priority
            out.append(SendAdvert(i, p.priority))
            v.adverts_sent += 1
            v.advert_at = now + p.advert_interval
        # The replica is already in the kernel (replication injects it as it arrives): the
        # addresses move at once.
        out.append(AddAddresses())
        self._garp_burst(now, out)

    def _garp_burst(self, now: float, out: list[Action]) -> None:
        out.extend(SendGarp(i) for i in range(len(self.instances)))
        self.garp_at = now + GARP_SECOND_BURST_AFTER
        self.garp_second_pending = True

    def _become_backup(self, reason: str, now: float, out: list[Action]) -> None:
        was_master = self.state is State.MASTER
        self._goto(State.BACKUP, reason, now, out)
        self.garp_at = None
        for p, v in zip(self.params.instances, self.instances, strict=True):
            v.advert_at = None
            v.master_advert_interval = p.advert_interval
            v.master_down_at = now + p.master_down_interval
            v.master_down_why = ""
            if v.master_address == p.primary:
                v.master_address = v.master_priority = None
        if was_master:
            out.append(RemoveAddresses())

    def _leave_with_priority_zero(self, out: list[Action]) -> None:
        for i, v in enumerate(self.instances):
            if v.link_up:
                out.append(SendAdvert(i, 0))
                v.adverts_sent += 1
        out.append(RemoveAddresses())

    def _clear_timers(self) -> None:
        self.garp_at = None
        for v in self.instances:
            v.master_down_at = v.advert_at = None

    # ---- handlers, one per (state, input) row ------------------------------------------

    def _startup(self, ev: Startup, now: float, out: list[Action]) -> None:
        self.started_at = now
        self._initialize("startup", now, out)

    def _initialize(self, reason: str, now: float, out: list[Action]) -> None:
        down = [p.interface for p, v in zip(self.params.instances, self.instances, strict=True)
                if not v.link_up]
        if down:
            self._goto(State.FAULT, f"link down: {', '.join(down)}", now, out)
            self._clear_timers()
        elif self.track_faults:
            self._goto(State.FAULT, _track_down(self.track_faults), now, out)
            self._clear_timers()
        elif all(p.priority == 255 for p in self.params.instances):
            self._become_master(f"{reason}: address owner (priority 255)", now, out)
        else:
            self._become_backup(reason, now, out)

    def _tick_backup(self, ev: Tick, now: float, out: list[Action]) -> None:
        for i, v in enumerate(self.instances):
            if v.master_down_at is not None and v.master_down_at <= now:
                p = self.params.instances[i]
                why = v.master_down_why or f"no advert for {self.master_down_interval(i):.3f}s"
                where = f"{p.interface} IPv6" if p.family == 6 else p.interface
                self._become_master(f"master down on {where} ({why})", now, out)
                return

    def _tick_master(self, ev: Tick, now: float, out: list[Action]) -> None:
        for i, (p, v) in enumerate(zip(self.params.instances, self.instances, strict=True)):
            if v.advert_at is not None and v.advert_at <= now:
                out.append(SendAdvert(i, p.priority))
                v.adverts_sent += 1
                # Re-arm from the deadline, not from now: a late tick does not drift the cadence,
                # but never schedule into the past after a long stall.
                v.advert_at = max(v.advert_at + p.advert_interval, now + p.advert_interval / 2)
        if self.garp_at is not None and self.garp_at <= now:
            out.extend(SendGarp(i) for i in range(len(self.instances)))
            if self.garp_second_pending:
                self.garp_second_pending = False
            refresh = self.params.garp_refresh
            self.garp_at = now + refresh if refresh > 0 else None

    def _tick_idle(self, ev: Tick, now: float, out: list[Action]) -> None:
        """INIT and FAULT have no timers; a tick there is harmless."""

    def _advert_backup(self, ev: AdvertReceived, now: float, out: list[Action]) -> None:
        p, v = self.params.instances[ev.index], self.instances[ev.index]
        v.adverts_received += 1
        self._note_peer(ev, now)
        if ev.priority == 0:
            v.master_down_at = now + p.skew_for(self.master_advert_interval(ev.index))
            v.master_down_why = f"{ev.source} left with priority 0"
            return
        v.master_address, v.master_priority = ev.source, ev.priority
        if not self.preempt_allowed(now) or ev.priority >= p.priority:
            self._adopt_interval(ev)
            v.master_down_at = now + self.master_down_interval(ev.index)
            v.master_down_why = ""
        else:
            v.master_down_why = f"preempting {ev.source} (priority {ev.priority} < {p.priority})"
        # else: a lower-priority master and we preempt: let Master_Down fire.

    def _advert_master(self, ev: AdvertReceived, now: float, out: list[Action]) -> None:
        p, v = self.params.instances[ev.index], self.instances[ev.index]
        v.adverts_received += 1
        self._note_peer(ev, now)
        if ev.priority == 0:
            out.append(SendAdvert(ev.index, p.priority))
            v.adverts_sent += 1
            v.advert_at = now + p.advert_interval
            return
        if ev.priority > p.priority or (
            ev.priority == p.priority and self._peer_wins_tie(ev, now)
        ):
            self._become_backup(
                f"{ev.source} on {p.interface} is master with priority {ev.priority} "
                f"(ours {p.priority})",
                now, out,
            )
            v.master_address, v.master_priority = ev.source, ev.priority
            self._adopt_interval(ev)
            v.master_down_at = now + self.master_down_interval(ev.index)
            return
        # Another master that loses to us: a split brain resolving in our favour. Its
        # neighbours may have learned its MAC for our addresses; announce ourselves again.
        if self.garp_at is None or not self.garp_second_pending:
            self._garp_burst(now, out)

    def _advert_idle(self, ev: AdvertReceived, now: float, out: list[Action]) -> None:
        self.instances[ev.index].adverts_received += 1
        self._note_peer(ev, now)

    def _adopt_interval(self, ev: AdvertReceived) -> None:
        """RFC 5798 6.4.2/6.4.3: Master_Adver_Interval := the advertised interval."""
        if ev.advert_interval is not None and self.params.instances[ev.index].version == 3:
            self.instances[ev.index].master_advert_interval = ev.advert_interval

    def _note_peer(self, ev: AdvertReceived, now: float) -> None:
        if ev.index == self.params.lead:
            self._lead_peer = _Peer(ev.source, now)

    def _peer_wins_tie(self, ev: AdvertReceived, now: float) -> bool:
        lead = self.params.lead
        lp = self._lead_peer
        lead_p = self.params.instances[lead]
        if ev.index != lead:
            if lp is not None and now - lp.seen_at <= self.master_down_interval(lead):
                return int(lp.address) > int(lead_p.primary)
            # Not heard on the lead yet (both became master in the same instant and this
            # interface's advert came first): a per-interface verdict here can contradict the
            # peer's, both step down and they flap. Keep mastership; the lead advert of the
            # same round decides.
            return False
        return int(ev.source) > int(lead_p.primary)

    def _on_same_link(self, index: int) -> list[InstanceView]:
        """Every instance on the interface of ``index`` (IPv4 and IPv6 ones under VRRPv3)."""
        iface = self.params.instances[index].interface
        return [v for p, v in zip(self.params.instances, self.instances, strict=True)
                if p.interface == iface]

    def _link(self, ev: LinkChanged, now: float, out: list[Action]) -> None:
        v = self.instances[ev.index]
        if v.link_up == ev.up:
            return
        # A link is the interface's, whatever the family: no goodbye on a link just lost.
        for same in self._on_same_link(ev.index):
            same.link_up = ev.up
        iface = self.params.instances[ev.index].interface
        if not ev.up and self.state is not State.FAULT:
            if self.state is State.MASTER:
                self._leave_with_priority_zero(out)
            self._goto(State.FAULT, f"link down: {iface}", now, out)
            self._clear_timers()
        elif (ev.up and self.state is State.FAULT and all(x.link_up for x in self.instances)
              and not self.track_faults):
            self._initialize(f"link up: {iface}", now, out)

    def _link_init(self, ev: LinkChanged, now: float, out: list[Action]) -> None:
        for same in self._on_same_link(ev.index):
            same.link_up = ev.up

    def _shutdown(self, ev: Shutdown, now: float, out: list[Action]) -> None:
        if self.state is State.INIT:
            return
        if self.state is State.MASTER:
            self._leave_with_priority_zero(out)
        self._goto(State.INIT, "shutdown", now, out)
        self._clear_timers()

    def _step_down(self, ev: StepDown, now: float, out: list[Action]) -> None:
        self.stepped_down = True
        if self.state is State.MASTER:
            for i, v in enumerate(self.instances):
                out.append(SendAdvert(i, 0))
                v.adverts_sent += 1
            self._become_backup("step down requested", now, out)

    def _resume(self, ev: Resume, now: float, out: list[Action]) -> None:
        self.stepped_down = False

    def _set_demoted(self, ev: SetDemoted, now: float, out: list[Action]) -> None:
        self.demoted = ev.demoted
        self.demoted_reason = ev.reason if ev.demoted else ""

    def _reconfigure(self, ev: Reconfigure, now: float, out: list[Action]) -> None:
        old, new = self.params.instances, _checked(ev.params).instances
        if [(p.interface, p.vrid, p.family, p.version) for p in old] != [
            (p.interface, p.vrid, p.family, p.version) for p in new
        ]:
            raise ValueError(
                "reconfigure cannot change interfaces, VRIDs, families or the VRRP version; "
                "restart instead"
            )
        # The configured priorities; what we advertise adds the track delta to them.
        self.base = ev.params
        self._apply_delta()
        if self.state is State.MASTER and self.garp_at is None and ev.params.garp_refresh > 0:
            self.garp_at = now + ev.params.garp_refresh

    def _apply_delta(self) -> None:
        """``params`` = the configured priorities plus the track delta, bounded 1..254."""
        assert self.base is not None  # set in __post_init__
        self.params = replace(self.base, instances=tuple(
            replace(p, priority=bounded_priority(p.priority, self.track_delta))
            for p in self.base.instances
        ))
        if self.state is State.MASTER:
            for p, v in zip(self.params.instances, self.instances, strict=True):
                v.master_priority = p.priority

    def _track_init(self, ev: TrackChanged, now: float, out: list[Action]) -> None:
        """Before startup: remembered; ``Startup`` goes to FAULT if a check faults us."""
        self.track_faults, self.track_delta = ev.faults, ev.delta
        self._apply_delta()

    def _track(self, ev: TrackChanged, now: float, out: list[Action]) -> None:
        self.track_faults, self.track_delta = ev.faults, ev.delta
        # A new priority is only advertised (next advert); election and preemption follow
        # from the peers' reactions, as for a reload.
        self._apply_delta()
        if ev.faults and self.state is not State.FAULT:
            if self.state is State.MASTER:
                self._leave_with_priority_zero(out)
            self._goto(State.FAULT, ev.reason or _track_down(ev.faults), now, out)
            self._clear_timers()
        elif (not ev.faults and self.state is State.FAULT
              and all(v.link_up for v in self.instances)):
            self._initialize(ev.reason or "track up", now, out)


_Handler = Callable[[GroupMachine, "Event", float, list[Action]], None]
_S = State
_TABLE: dict[tuple[State, type], _Handler] = {}


def _rows(states: tuple[State, ...], event: type, handler: Callable[..., None]) -> None:
    for s in states:
        _TABLE[(s, event)] = handler


_ALL = (_S.INIT, _S.BACKUP, _S.MASTER, _S.FAULT)
_rows((_S.INIT,), Startup, GroupMachine._startup)
_rows((_S.BACKUP,), Tick, GroupMachine._tick_backup)
_rows((_S.MASTER,), Tick, GroupMachine._tick_master)
_rows((_S.INIT, _S.FAULT), Tick, GroupMachine._tick_idle)
_rows((_S.BACKUP,), AdvertReceived, GroupMachine._advert_backup)
_rows((_S.MASTER,), AdvertReceived, GroupMachine._advert_master)
_rows((_S.INIT, _S.FAULT), AdvertReceived, GroupMachine._advert_idle)
_rows((_S.BACKUP, _S.MASTER, _S.FAULT), LinkChanged, GroupMachine._link)
_rows((_S.INIT,), LinkChanged, GroupMachine._link_init)
_rows(_ALL, Shutdown, GroupMachine._shutdown)
_rows((_S.BACKUP, _S.MASTER, _S.FAULT), StepDown, GroupMachine._step_down)
_rows(_ALL, Resume, GroupMachine._resume)
_rows(_ALL, SetDemoted, GroupMachine._set_demoted)
_rows(_ALL, Reconfigure, GroupMachine._reconfigure)
_rows((_S.INIT,), TrackChanged, GroupMachine._track_init)
_rows((_S.BACKUP, _S.MASTER, _S.FAULT), TrackChanged, GroupMachine._track)


def _track_down(faults: tuple[str, ...]) -> str:
    return "track down: " + ", ".join(faults)


def _checked(params: GroupParams) -> GroupParams:
    """Refuse parameters that no configuration can produce (a bug of ours, not input)."""
    for p in params.instances:
        if p.version not in (2, 3) or p.family not in (4, 6) or p.primary.version != p.family:
            raise ValueError(f"instance {p}: version 2|3, family 4|6 matching the primary address")
        if p.family == 6 and p.version != 3:
            raise ValueError(f"instance {p}: VRRP over IPv6 needs version 3")
        if not p.advert_interval > 0:
            raise ValueError(f"instance {p}: advert_interval must be positive")
    keys = [(p.vrid, p.family) for p in params.instances]
    if len(set(keys)) != len(keys):
        raise ValueError(f"instances repeat a (VRID, family): {keys}")
    return params


def with_priority(params: GroupParams, priority: int) -> GroupParams:
    """The same group with every instance at ``priority`` (used by tests and reload)."""
    return replace(params, instances=tuple(replace(p, priority=priority) for p in params.instances))
