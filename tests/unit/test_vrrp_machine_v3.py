"""The group machine under VRRPv3 (RFC 5798) with a scripted clock at centisecond intervals
(0.01, 0.05, 0.1 s): skew scaled by the master's interval, interval adoption, Master_Down,
preemption, priority 0, IPv4 + IPv6 instances in one group with a deterministic lead, and
two nodes on an in-memory network."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invictusd.vrrp.machine import (
    Action,
    AdvertReceived,
    Event,
    GroupMachine,
    GroupParams,
    InstanceParams,
    LinkChanged,
    Reconfigure,
    SendAdvert,
    Shutdown,
    Startup,
    State,
    Tick,
    Transition,
)

A4, A6 = IPv4Address, IPv6Address
T0 = 1000.0
INTERVALS = [0.01, 0.05, 0.1]

OUR4, OUR6, OUR_WAN = A4("10.0.0.2"), A6("fe80::2"), A4("192.0.2.2")
LOW4, LOW6, LOW_WAN = A4("10.0.0.1"), A6("fe80::1"), A4("192.0.2.1")
HIGH4, HIGH6, HIGH_WAN = A4("10.0.0.3"), A6("fe80::3"), A4("192.0.2.3")


def v3group(
    interval: float,
    priority: int = 100,
    *,
    preempt: bool = False,
    lan4: IPv4Address = OUR4,
    lan6: IPv6Address = OUR6,
    wan: IPv4Address = OUR_WAN,
) -> GroupParams:
    """lan0 over IPv4 and IPv6 (VRID 51) and wan0 over IPv4 (VRID 52), all version 3."""
    return GroupParams(
        instances=(
            InstanceParams("lan0", 51, priority, lan4, interval, version=3, family=4),
            InstanceParams("lan0", 51, priority, lan6, interval, version=3, family=6),
            InstanceParams("wan0", 52, priority, wan, interval, version=3, family=4),
        ),
        preempt=preempt,
    )


def md(interval: float, priority: int = 100) -> float:
    """RFC 5798: 3 x Master_Adver_Interval + (256 - priority) x Master_Adver_Interval / 256."""
    return 3 * interval + (256 - priority) * interval / 256


def transitions(actions: list[Action]) -> list[tuple[State, State]]:
    return [(a.old, a.new) for a in actions if isinstance(a, Transition)]


def backup(params: GroupParams, now: float = T0) -> GroupMachine:
    m = GroupMachine(params)
    m.handle(Startup(), now)
    assert m.state is State.BACKUP
    return m


def master(params: GroupParams, now: float = T0) -> tuple[GroupMachine, float]:
    m = backup(params, now)
    t = m.next_deadline()
    assert t is not None
    m.handle(Tick(), t)
    assert m.state is State.MASTER
    return m, t


# ---- arithmetic --------------------------------------------------------------------------


@pytest.mark.parametrize("interval", INTERVALS)
@pytest.mark.parametrize("priority", [1, 100, 150, 254])
def test_skew_scales_with_the_interval(interval: float, priority: int) -> None:
    p = InstanceParams("lan0", 51, priority, OUR4, interval, version=3)
    assert p.skew_time == pytest.approx((256 - priority) * interval / 256)
    assert p.master_down_interval == pytest.approx(md(interval, priority))


def test_the_table_of_vrrp_md() -> None:
    # docs: v3, 0.1 s, priority 100 -> skew 0.061 s, master down 0.361 s.
    p = InstanceParams("lan0", 51, 100, OUR4, 0.1, version=3)
    assert round(p.skew_time, 3) == 0.061 and round(p.master_down_interval, 3) == 0.361


def test_version_2_skew_is_unchanged_by_the_interval() -> None:
    p = InstanceParams("lan0", 51, 100, OUR4, 3)
    assert p.skew_time == 0.609375 and p.master_down_interval == 9.609375


# ---- timers at centisecond intervals --------------------------------------------------------


@pytest.mark.parametrize("interval", INTERVALS)
def test_startup_master_down_then_adverts_every_interval(interval: float) -> None:
    m = GroupMachine(v3group(interval))
    m.handle(Startup(), T0)
    assert m.next_deadline() == pytest.approx(T0 + md(interval))
    assert m.handle(Tick(), T0 + md(interval) - 1e-4) == []  # not yet
    t = T0 + md(interval)
    out = m.handle(Tick(), t)
    assert transitions(out) == [(State.BACKUP, State.MASTER)]
    assert [a for a in out if isinstance(a, SendAdvert)] == [SendAdvert(i, 100) for i in range(3)]
    # One second of ticks at each deadline: one advert per interval per instance, no drift.
    sent = 0
    while (d := m.next_deadline()) is not None and d <= t + 1.0 + 1e-9:
        if d >= t + 5:  # the second GARP burst is not an advert deadline
            break
        sent += sum(isinstance(a, SendAdvert) for a in m.handle(Tick(), d))
    assert sent == 3 * round(1.0 / interval)
    assert m.instances[0].advert_at == pytest.approx(t + 1.0 + interval)


@pytest.mark.parametrize("interval", INTERVALS)
def test_late_tick_does_not_drift_or_burst(interval: float) -> None:
    m, t = master(v3group(interval))
    # The loop was late by 40% of an interval: one advert, the next one on the original grid.
    late = t + interval * 1.4
    assert sum(isinstance(a, SendAdvert) for a in m.handle(Tick(), late)) == 3
    assert m.instances[0].advert_at == pytest.approx(t + 2 * interval)
    # Late by ten intervals (a stall): one advert, then half an interval later at the least.
    stall = t + 12 * interval
    assert sum(isinstance(a, SendAdvert) for a in m.handle(Tick(), stall)) == 3
    assert m.instances[0].advert_at == pytest.approx(stall + interval / 2)


# ---- interval adoption (RFC 5798 6.4.2 / 6.4.3) -----------------------------------------------


@pytest.mark.parametrize(("ours", "theirs"), [(0.1, 0.05), (0.05, 0.1), (1.0, 0.01), (0.01, 0.1)])
def test_backup_adopts_the_masters_interval(ours: float, theirs: float) -> None:
    m = backup(v3group(ours))
    now = T0 + 0.01
    m.handle(AdvertReceived(0, HIGH4, 100, theirs), now)
    assert m.master_advert_interval(0) == theirs
    assert m.master_down_interval(0) == pytest.approx(md(theirs))
    assert m.instances[0].master_down_at == pytest.approx(now + md(theirs))
    # The other instances keep theirs until they hear the master too.
    assert m.master_advert_interval(1) == ours
    m.handle(AdvertReceived(1, HIGH6, 100, theirs), now)
    assert m.instances[1].master_down_at == pytest.approx(now + md(theirs))


@pytest.mark.parametrize("interval", INTERVALS)
def test_master_down_fires_after_the_adopted_interval(interval: float) -> None:
    m = backup(v3group(1.0))
    now = T0 + 0.5
    for i, src in enumerate((HIGH4, HIGH6, HIGH_WAN)):
        m.handle(AdvertReceived(i, src, 100, interval), now)
    assert m.next_deadline() == pytest.approx(now + md(interval))
    out = m.handle(Tick(), now + md(interval))
    assert transitions(out) == [(State.BACKUP, State.MASTER)]
    # As master it advertises its own interval (1 s), not the adopted one.
    assert m.instances[0].advert_at == pytest.approx(now + md(interval) + 1.0)


def test_version_2_instance_never_adopts() -> None:
    p = GroupParams((InstanceParams("lan0", 51, 100, OUR4, 1),))
    m = backup(p)
    m.handle(AdvertReceived(0, HIGH4, 100, 0.05), T0 + 1)
    assert m.master_advert_interval(0) == 1
    assert m.instances[0].master_down_at == T0 + 1 + 3.609375


def test_preempting_backup_ignores_a_lower_masters_interval() -> None:
    m = backup(v3group(0.1, 150, preempt=True))
    m.handle(AdvertReceived(0, HIGH4, 100, 0.01), T0 + 0.05)
    assert m.master_advert_interval(0) == 0.1  # not adopted: we preempt it
    assert m.instances[0].master_down_at == pytest.approx(T0 + md(0.1, 150))
    out = m.handle(Tick(), T0 + md(0.1, 150))
    assert transitions(out) == [(State.BACKUP, State.MASTER)]


@pytest.mark.parametrize("interval", INTERVALS)
def test_priority_zero_gives_skew_of_the_masters_interval(interval: float) -> None:
    m = backup(v3group(1.0))
    now = T0 + 0.2
    m.handle(AdvertReceived(0, HIGH4, 100, interval), now)
    m.handle(AdvertReceived(0, HIGH4, 0, interval), now + interval)
    skew = (256 - 100) * interval / 256
    assert m.instances[0].master_down_at == pytest.approx(now + interval + skew)
    out = m.handle(Tick(), now + interval + skew)
    assert transitions(out) == [(State.BACKUP, State.MASTER)]


@pytest.mark.parametrize("interval", INTERVALS)
def test_master_yields_to_higher_priority_and_adopts_its_interval(interval: float) -> None:
    m, t = master(v3group(1.0, 100))
    out = m.handle(AdvertReceived(0, LOW4, 200, interval), t + 0.3)
    assert transitions(out) == [(State.MASTER, State.BACKUP)]
    assert m.master_advert_interval(0) == interval
    assert m.instances[0].master_down_at == pytest.approx(t + 0.3 + md(interval))
    assert m.instances[0].master_address == LOW4
    # The instances that did not hear it wait with their own interval.
    assert m.instances[2].master_down_at == pytest.approx(t + 0.3 + md(1.0))


def test_master_answers_priority_zero_at_once() -> None:
    m, t = master(v3group(0.05))
    out = m.handle(AdvertReceived(1, LOW6, 0, 0.05), t + 0.02)
    assert out == [SendAdvert(1, 100)]
    assert m.instances[1].advert_at == pytest.approx(t + 0.07)


def test_becoming_backup_again_forgets_an_adopted_interval() -> None:
    m = backup(v3group(0.1))
    m.handle(AdvertReceived(0, HIGH4, 100, 0.05), T0)
    m.handle(Tick(), T0 + md(0.05))  # the master died: ours
    assert m.state is State.MASTER
    m.handle(AdvertReceived(2, HIGH_WAN, 200, 0.01), T0 + 1)
    assert m.state is State.BACKUP
    assert m.master_advert_interval(0) == 0.1
    assert m.master_advert_interval(2) == 0.01


def test_shutdown_sends_priority_zero_on_every_instance() -> None:
    m, t = master(v3group(0.05))
    out = m.handle(Shutdown(), t + 1)
    assert [a for a in out if isinstance(a, SendAdvert)] == [SendAdvert(i, 0) for i in range(3)]


# ---- the group over two families ----------------------------------------------------------------


def test_link_down_takes_both_families_of_the_interface_and_says_goodbye_elsewhere() -> None:
    m, t = master(v3group(0.1))
    out = m.handle(LinkChanged(0, False), t + 0.01)  # lan0 (its IPv4 instance reported first)
    assert transitions(out) == [(State.MASTER, State.FAULT)]
    # Priority 0 only where the link is up: wan0, not lan0's IPv6 instance.
    assert [a for a in out if isinstance(a, SendAdvert)] == [SendAdvert(2, 0)]
    assert [v.link_up for v in m.instances] == [False, False, True]
    assert m.handle(LinkChanged(1, False), t + 0.02) == []  # the IPv6 instance's own event
    out = m.handle(LinkChanged(1, True), t + 0.5)  # up again: the group starts over
    assert transitions(out) == [(State.FAULT, State.BACKUP)]
    assert all(v.link_up for v in m.instances)



def test_lead_is_lowest_vrid_then_ipv4() -> None:
    g = v3group(0.1)
    assert g.lead == 0
    shuffled = GroupParams((g.instances[2], g.instances[1], g.instances[0]))
    assert shuffled.lead == 2  # (51, 4), wherever it sits
    only6 = GroupParams((g.instances[2], g.instances[1]))
    assert only6.lead == 1  # (51, 6) before (52, 4)


def test_equal_priority_tie_is_decided_on_the_ipv4_lead() -> None:
    # The peer's IPv6 link-local is lower than ours but its lead (IPv4) address higher.
    m, t = master(v3group(0.1))
    assert m.handle(AdvertReceived(1, LOW6, 100, 0.1), t + 0.01) == []  # lead not heard yet
    out = m.handle(AdvertReceived(0, HIGH4, 100, 0.1), t + 0.02)
    assert transitions(out) == [(State.MASTER, State.BACKUP)]


def test_ipv6_tie_follows_the_lead_heard_recently() -> None:
    m, t = master(v3group(0.1))
    m.handle(AdvertReceived(0, LOW4, 100, 0.1), t + 0.01)  # we win on the lead
    assert m.state is State.MASTER
    # The IPv6 advert of the same peer from a *higher* link-local: the lead decides, we stay.
    m.handle(AdvertReceived(1, HIGH6, 100, 0.1), t + 0.02)
    assert m.state is State.MASTER


def test_ipv6_only_group_ties_on_the_link_local() -> None:
    g = GroupParams((InstanceParams("lan0", 51, 100, OUR6, 0.05, version=3, family=6),))
    m, t = master(g)
    m.handle(AdvertReceived(0, LOW6, 100, 0.05), t + 0.01)
    assert m.state is State.MASTER
    m.handle(AdvertReceived(0, HIGH6, 100, 0.05), t + 0.02)
    assert m.state is State.BACKUP


@pytest.mark.parametrize(
    "bad",
    [
        InstanceParams("lan0", 51, 100, OUR6, 1, version=2, family=6),  # IPv6 needs v3
        InstanceParams("lan0", 51, 100, OUR4, 1, version=3, family=6),  # family vs address
        InstanceParams("lan0", 51, 100, OUR4, 0, version=3),
        InstanceParams("lan0", 51, 100, OUR4, 1, version=4),
    ],
)
def test_impossible_parameters_are_refused(bad: InstanceParams) -> None:
    with pytest.raises(ValueError):
        GroupMachine(GroupParams((bad,)))


def test_duplicate_vrid_and_family_refused() -> None:
    p = InstanceParams("lan0", 51, 100, OUR4, 1, version=3)
    with pytest.raises(ValueError):
        GroupMachine(GroupParams((p, replace(p, interface="wan0"))))


def test_reconfigure_keeps_families_and_version_and_may_change_the_interval() -> None:
    m, t = master(v3group(0.1))
    faster = v3group(0.05)
    assert m.handle(Reconfigure(faster), t + 0.01) == []
    assert m.params.instances[0].advert_interval == 0.05
    with pytest.raises(ValueError):
        m.handle(Reconfigure(GroupParams(faster.instances[:2])), t + 0.02)
    v2 = GroupParams(tuple(replace(p, version=2, family=4, primary=OUR4 if p.family == 6 else
                                   p.primary, advert_interval=1) for p in faster.instances[::2]))
    with pytest.raises(ValueError):
        m.handle(Reconfigure(v2), t + 0.03)


# ---- two nodes on an in-memory network ---------------------------------------------------------


@dataclass
class Node:
    name: str
    params: GroupParams
    machine: GroupMachine = field(init=False)
    alive: bool = False
    sent: list[tuple[float, SendAdvert]] = field(default_factory=list)
    history: list[tuple[float, State, State]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.machine = GroupMachine(self.params)


@dataclass(order=True)
class _Queued:
    at: float
    seq: int
    node: Node = field(compare=False)
    event: Event = field(compare=False)


class Network:
    """Every instance on its own segment; adverts carry the sender's interval (VRRPv3)."""

    def __init__(self, nodes: list[Node], latency: float = 0.0005) -> None:
        self.nodes, self.latency, self.now = nodes, latency, 0.0
        self.queue: list[_Queued] = []
        self.seq = itertools.count()

    def _feed(self, node: Node, event: Event) -> None:
        for a in node.machine.handle(event, self.now):
            if isinstance(a, Transition):
                node.history.append((self.now, a.old, a.new))
            elif isinstance(a, SendAdvert):
                node.sent.append((self.now, a))
                p = node.params.instances[a.index]
                for peer in self.nodes:
                    if peer is not node:
                        ev = AdvertReceived(a.index, p.primary, a.priority, p.advert_interval)
                        heapq.heappush(self.queue, _Queued(self.now + self.latency,
                                                           next(self.seq), peer, ev))

    def start(self, node: Node) -> None:
        node.machine = GroupMachine(node.params)
        node.alive = True
        self._feed(node, Startup())

    def run_until(self, end: float) -> None:
        while True:
            timers = [(d, n) for n in self.nodes
                      if n.alive and (d := n.machine.next_deadline()) is not None]
            timer = min(timers, key=lambda x: x[0]) if timers else None
            pkt = self.queue[0].at if self.queue else None
            if pkt is not None and (timer is None or pkt <= timer[0]) and pkt <= end:
                q = heapq.heappop(self.queue)
                self.now = max(self.now, q.at)
                if q.node.alive:
                    self._feed(q.node, q.event)
            elif timer is not None and timer[0] <= end:
                self.now = max(self.now, timer[0])
                self._feed(timer[1], Tick())
            else:
                break
        self.now = end

    def masters(self) -> list[Node]:
        return [n for n in self.nodes if n.alive and n.machine.state is State.MASTER]


def _pair(interval_a: float, interval_b: float, prio_a: int = 150, prio_b: int = 100,
          preempt_a: bool = True) -> tuple[Network, Node, Node]:
    a = Node("a", v3group(interval_a, prio_a, preempt=preempt_a, lan4=LOW4, lan6=LOW6,
                          wan=LOW_WAN))
    b = Node("b", v3group(interval_b, prio_b, lan4=HIGH4, lan6=HIGH6, wan=HIGH_WAN))
    return Network([a, b]), a, b


@pytest.mark.parametrize("interval", INTERVALS)
def test_two_nodes_failover_within_the_rfc_bound(interval: float) -> None:
    net, a, b = _pair(interval, interval)
    net.start(a)
    net.start(b)
    net.run_until(5)
    assert net.masters() == [a]
    assert len(b.history) == 1  # init -> backup, never master
    last = max(t for t, _ in a.sent)
    a.alive = False  # the box dies
    net.run_until(10)
    assert net.masters() == [b]
    took = next(t for t, _, s in b.history if s is State.MASTER) - last
    assert took == pytest.approx(net.latency + md(interval, 100))
    # Comes back, preempts after its own Master_Down (priority 150, preempt on).
    net.start(a)
    net.run_until(15)
    assert net.masters() == [a]
    assert len(b.history) == 3


def test_two_nodes_with_different_intervals_backup_follows_the_master() -> None:
    # a (master) advertises every 0.05 s; b is configured with 1 s but adopts a's 0.05 s, so
    # it detects a's death in 0.15 s + skew, not 3.6 s.
    net, a, b = _pair(0.05, 1.0)
    net.start(a)
    net.start(b)
    net.run_until(6)
    assert net.masters() == [a]
    assert b.machine.master_advert_interval(0) == 0.05
    last = max(t for t, _ in a.sent)
    a.alive = False
    net.run_until(8)
    took = next(t for t, _, s in b.history if s is State.MASTER) - last
    assert took == pytest.approx(net.latency + md(0.05, 100))


def test_two_nodes_graceful_stop_costs_skew_of_the_masters_interval() -> None:
    net, a, b = _pair(0.1, 0.1)
    net.start(a)
    net.start(b)
    net.run_until(3)
    net._feed(a, Shutdown())
    a.alive = False
    net.run_until(4)
    took = next(t for t, _, s in b.history if s is State.MASTER) - 3
    assert took == pytest.approx(net.latency + (256 - 100) * 0.1 / 256)


@settings(max_examples=40, deadline=None)
@given(
    intervals=st.tuples(st.sampled_from(INTERVALS), st.sampled_from(INTERVALS)),
    prios=st.tuples(st.integers(1, 254), st.integers(1, 254)),
    preempt=st.booleans(),
    offset=st.integers(0, 40),
)
def test_two_nodes_converge_without_flapping(
    intervals: tuple[float, float], prios: tuple[int, int], preempt: bool, offset: int
) -> None:
    net, a, b = _pair(intervals[0], intervals[1], prios[0], prios[1], preempt)
    net.start(a)
    net.run_until(offset / 100)
    net.start(b)
    net.run_until(3)
    assert len(net.masters()) == 1
    for n in (a, b):
        assert len(n.history) <= 3, n.history
    winner = net.masters()[0]
    loser = b if winner is a else a
    assert all(v.master_advert_interval == winner.params.instances[0].advert_interval
               for v in loser.machine.instances)
