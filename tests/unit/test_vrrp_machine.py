"""RFC 3768 section 6.4 group state machine with a scripted clock: exact timings, every
(state, input) pair, tie-breaks, preemption, group coupling and a two-node simulation."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invictusd.vrrp.machine import (
    GARP_SECOND_BURST_AFTER,
    Action,
    AddAddresses,
    AdvertReceived,
    Event,
    GroupMachine,
    GroupParams,
    InstanceParams,
    LinkChanged,
    Reconfigure,
    RemoveAddresses,
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
    UnexpectedInput,
    with_priority,
)

A = IPv4Address
T0 = 1000.0  # every time below is a sum of binary fractions, so equality is exact

# Our node: lan0 (lead, VRID 51) and wan0 (VRID 52).
OUR_LAN, OUR_WAN = A("10.0.0.2"), A("192.0.2.2")
PEER_LOW_LAN, PEER_LOW_WAN = A("10.0.0.1"), A("192.0.2.1")
PEER_HIGH_LAN, PEER_HIGH_WAN = A("10.0.0.3"), A("192.0.2.3")


def group(
    priority: int = 100,
    *,
    preempt: bool = False,
    preempt_delay: float = 0.0,
    garp_refresh: float = 0.0,
    interval: int = 1,
    lan: IPv4Address = OUR_LAN,
    wan: IPv4Address = OUR_WAN,
) -> GroupParams:
    return GroupParams(
        instances=(
            InstanceParams("lan0", 51, priority, lan, interval),
            InstanceParams("wan0", 52, priority, wan, interval),
        ),
        preempt=preempt,
        preempt_delay=preempt_delay,
        garp_refresh=garp_refresh,
    )


def states(actions: list[Action]) -> list[tuple[State, State]]:
    return [(a.old, a.new) for a in actions if isinstance(a, Transition)]


def strip_reason(actions: list[Action]) -> list[object]:
    """Actions with Transition reduced to (old, new), for exact list comparisons."""
    return [(a.old, a.new) if isinstance(a, Transition) else a for a in actions]


def backup(params: GroupParams | None = None, now: float = T0) -> GroupMachine:
    m = GroupMachine(params or group())
    m.handle(Startup(), now)
    assert m.state is State.BACKUP
    return m


def master(params: GroupParams | None = None, now: float = T0) -> tuple[GroupMachine, float]:
    """A machine that became master (no peer) at the returned time."""
    m = backup(params, now)
    t = m.next_deadline()
    assert t is not None
    m.handle(Tick(), t)
    assert m.state is State.MASTER
    return m, t


MASTER_ENTRY = [
    (State.BACKUP, State.MASTER),
    SendAdvert(0, 100),
    SendAdvert(1, 100),
    AddAddresses(),
    SendGarp(0),
    SendGarp(1),
]

# ---- RFC arithmetic ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("priority", "interval", "skew", "master_down"),
    [
        (100, 1, 0.609375, 3.609375),
        (254, 1, 0.0078125, 3.0078125),
        (1, 1, 0.99609375, 3.99609375),
        (150, 1, 0.4140625, 3.4140625),
        (100, 3, 0.609375, 9.609375),
    ],
)
def test_skew_and_master_down(priority: int, interval: int, skew: float, master_down: float) -> None:
    p = InstanceParams("lan0", 51, priority, OUR_LAN, interval)
    assert p.skew_time == skew == (256 - priority) / 256
    assert p.master_down_interval == master_down == 3 * interval + skew


# ---- startup -----------------------------------------------------------------------------


def test_startup_goes_backup_with_master_down() -> None:
    m = GroupMachine(group())
    out = m.handle(Startup(), T0)
    assert strip_reason(out) == [(State.INIT, State.BACKUP)]
    assert m.state is State.BACKUP
    assert [v.master_down_at for v in m.instances] == [T0 + 3.609375] * 2
    assert [v.advert_at for v in m.instances] == [None, None]
    assert m.next_deadline() == T0 + 3.609375
    assert m.started_at == T0
    assert m.since == T0
    assert m.transitions == 1


def test_startup_priority_254_master_down() -> None:
    m = backup(group(254))
    assert m.next_deadline() == T0 + 3.0078125


def test_startup_owner_priority_255_goes_master_at_once() -> None:
    m = GroupMachine(group(255))
    out = m.handle(Startup(), T0)
    assert strip_reason(out) == [
        (State.INIT, State.MASTER),
        SendAdvert(0, 255),
        SendAdvert(1, 255),
            AddAddresses(),
        SendGarp(0),
        SendGarp(1),
    ]
    assert m.next_deadline() == T0 + 1


def test_startup_with_a_link_down_goes_fault() -> None:
    m = GroupMachine(group())
    assert m.handle(LinkChanged(1, False), T0) == []
    out = m.handle(Startup(), T0)
    assert strip_reason(out) == [(State.INIT, State.FAULT)]
    assert "wan0" in out[0].reason  # type: ignore[union-attr]
    assert m.next_deadline() is None


def test_next_deadline_at_time_zero_is_not_lost() -> None:
    m = GroupMachine(group())
    m.handle(Startup(), -3.609375)
    assert m.next_deadline() == 0.0


# ---- Master_Down fires -------------------------------------------------------------------


def test_master_down_fires_exactly_at_deadline() -> None:
    m = backup()
    assert m.handle(Tick(), T0 + 3.609375 - 2**-20) == []
    assert m.state is State.BACKUP
    out = m.handle(Tick(), T0 + 3.609375)
    assert strip_reason(out) == MASTER_ENTRY
    assert "lan0" in out[0].reason  # type: ignore[union-attr]
    assert m.since == T0 + 3.609375
    assert [v.master_down_at for v in m.instances] == [None, None]
    assert [v.master_address for v in m.instances] == [OUR_LAN, OUR_WAN]
    assert [v.adverts_sent for v in m.instances] == [1, 1]


def test_master_down_on_the_second_interface_moves_the_whole_group() -> None:
    m = backup()
    # The peer is heard on lan0 only: wan0's Master_Down fires and takes lan0 along.
    m.handle(AdvertReceived(0, PEER_HIGH_LAN, 100), T0 + 3)
    assert m.instances[0].master_down_at == T0 + 3 + 3.609375
    out = m.handle(Tick(), T0 + 3.609375)
    assert strip_reason(out) == MASTER_ENTRY


def test_advert_cadence_and_garp_second_burst() -> None:
    m, t = master()
    assert m.next_deadline() == t + 1
    assert m.handle(Tick(), t + 0.5) == []
    assert m.handle(Tick(), t + 1) == [SendAdvert(0, 100), SendAdvert(1, 100)]
    assert m.next_deadline() == t + 2
    # A late tick neither drifts the cadence nor skips an advert.
    assert m.handle(Tick(), t + 2.25) == [SendAdvert(0, 100), SendAdvert(1, 100)]
    assert m.next_deadline() == t + 3
    m.handle(Tick(), t + 3)
    m.handle(Tick(), t + 4)
    assert m.next_deadline() == t + GARP_SECOND_BURST_AFTER == t + 5
    assert m.handle(Tick(), t + 5) == [
        SendAdvert(0, 100),
        SendAdvert(1, 100),
        SendGarp(0),
        SendGarp(1),
    ]
    # No periodic refresh configured: no more GARP.
    assert m.garp_at is None
    for k in range(6, 40):
        assert SendGarp(0) not in m.handle(Tick(), t + k)
    assert [v.adverts_sent for v in m.instances] == [40, 40]


def test_advert_after_long_stall_is_not_scheduled_in_the_past() -> None:
    m, t = master()
    assert m.handle(Tick(), t + 10.5)[:2] == [SendAdvert(0, 100), SendAdvert(1, 100)]
    assert m.next_deadline() == t + 11


def test_advert_interval_three() -> None:
    m, t = master(group(interval=3))
    assert t == T0 + 9.609375
    assert m.next_deadline() == t + 3
    assert m.handle(Tick(), t + 3) == [SendAdvert(0, 100), SendAdvert(1, 100)]


def test_garp_periodic_refresh() -> None:
    m, t = master(group(garp_refresh=60))
    out = m.handle(Tick(), t + 5)
    assert out[-2:] == [SendGarp(0), SendGarp(1)]
    assert m.garp_at == t + 65
    for k in range(6, 65):
        assert SendGarp(0) not in m.handle(Tick(), t + k)
    assert m.handle(Tick(), t + 65)[-2:] == [SendGarp(0), SendGarp(1)]
    assert m.garp_at == t + 125


# ---- adverts in BACKUP -------------------------------------------------------------------


def test_backup_advert_resets_master_down() -> None:
    m = backup()
    assert m.handle(AdvertReceived(0, PEER_LOW_LAN, 100), T0 + 2) == []
    assert m.instances[0].master_down_at == T0 + 2 + 3.609375
    assert m.instances[1].master_down_at == T0 + 3.609375
    assert m.instances[0].master_address == PEER_LOW_LAN
    assert m.instances[0].master_priority == 100
    assert m.instances[0].adverts_received == 1


def test_backup_priority_zero_sets_master_down_to_skew() -> None:
    m = backup()
    m.handle(AdvertReceived(0, PEER_LOW_LAN, 200), T0 + 1)
    m.handle(AdvertReceived(1, PEER_LOW_WAN, 200), T0 + 1)
    assert m.handle(AdvertReceived(0, PEER_LOW_LAN, 0), T0 + 2) == []
    assert m.instances[0].master_down_at == T0 + 2 + 0.609375
    assert m.next_deadline() == T0 + 2.609375
    assert m.handle(Tick(), T0 + 2.609375 - 2**-20) == []
    assert strip_reason(m.handle(Tick(), T0 + 2.609375)) == MASTER_ENTRY


@pytest.mark.parametrize("preempt", [False, True])
def test_backup_higher_priority_ignores_lower_master_only_with_preempt(preempt: bool) -> None:
    m = backup(group(150, preempt=preempt))
    mdi = 3.4140625
    for k in (1, 2, 3):
        m.handle(AdvertReceived(0, PEER_LOW_LAN, 100), T0 + k)
        m.handle(AdvertReceived(1, PEER_LOW_WAN, 100), T0 + k)
    if preempt:
        # The lower master's adverts do not reset Master_Down: it fires from startup.
        assert m.next_deadline() == T0 + mdi
        assert strip_reason(m.handle(Tick(), T0 + mdi)) == [
            (State.BACKUP, State.MASTER),
            SendAdvert(0, 150),
            SendAdvert(1, 150),
                    AddAddresses(),
            SendGarp(0),
            SendGarp(1),
        ]
    else:
        assert m.next_deadline() == T0 + 3 + mdi
        assert m.handle(Tick(), T0 + mdi) == []
        assert m.state is State.BACKUP


@pytest.mark.parametrize("peer_priority", [150, 200])
def test_backup_with_preempt_never_preempts_equal_or_higher(peer_priority: int) -> None:
    m = backup(group(150, preempt=True))
    m.handle(AdvertReceived(0, PEER_LOW_LAN, peer_priority), T0 + 3)
    assert m.instances[0].master_down_at == T0 + 3 + 3.4140625


def test_preempt_delay() -> None:
    m = backup(group(150, preempt=True, preempt_delay=30))
    mdi = 3.4140625
    t = T0
    while t < T0 + 30:
        t += 1
        for i, src in enumerate((PEER_LOW_LAN, PEER_LOW_WAN)):
            m.handle(AdvertReceived(i, src, 100), t)
        assert m.handle(Tick(), t) == []
    # At T0+30 preemption became allowed: that advert no longer reset Master_Down, which
    # was last reset at T0+29.
    assert t == T0 + 30
    assert m.next_deadline() == T0 + 29 + mdi
    m.handle(AdvertReceived(0, PEER_LOW_LAN, 100), T0 + 31)
    m.handle(AdvertReceived(1, PEER_LOW_WAN, 100), T0 + 31)
    assert m.next_deadline() == T0 + 29 + mdi
    assert states(m.handle(Tick(), T0 + 29 + mdi)) == [(State.BACKUP, State.MASTER)]


def test_demoted_suppresses_preemption_but_not_master_down() -> None:
    m = backup(group(150, preempt=True))
    assert m.handle(SetDemoted(True, "replica incomplete"), T0) == []
    assert m.demoted_reason == "replica incomplete"
    m.handle(AdvertReceived(0, PEER_LOW_LAN, 100), T0 + 1)
    assert m.instances[0].master_down_at == T0 + 1 + 3.4140625  # reset: no preemption
    # The master vanishes: a demoted node still takes over.
    t = m.next_deadline()
    assert t == T0 + 3.4140625  # wan0 never heard anything
    assert states(m.handle(Tick(), t)) == [(State.BACKUP, State.MASTER)]
    assert m.demoted


def test_demoted_still_takes_over_on_priority_zero() -> None:
    m = backup(group(150, preempt=True))
    m.handle(SetDemoted(True, "sync down"), T0)
    m.handle(AdvertReceived(0, PEER_LOW_LAN, 0), T0 + 1)
    assert m.next_deadline() == T0 + 1 + 0.4140625


def test_undemote_restores_preemption() -> None:
    m = backup(group(150, preempt=True))
    m.handle(SetDemoted(True, "x"), T0)
    m.handle(AdvertReceived(0, PEER_LOW_LAN, 100), T0 + 1)
    m.handle(SetDemoted(False), T0 + 1)
    assert m.demoted_reason == ""
    m.handle(AdvertReceived(0, PEER_LOW_LAN, 100), T0 + 2)
    assert m.instances[0].master_down_at == T0 + 1 + 3.4140625


# ---- adverts in MASTER -------------------------------------------------------------------


def test_master_priority_zero_answers_at_once() -> None:
    m, t = master()
    out = m.handle(AdvertReceived(1, PEER_LOW_WAN, 0), t + 0.25)
    assert out == [SendAdvert(1, 100)]
    assert m.instances[1].advert_at == t + 1.25
    assert m.instances[0].advert_at == t + 1
    assert m.state is State.MASTER


def test_master_higher_priority_goes_backup_and_removes_addresses() -> None:
    m, t = master()
    out = m.handle(AdvertReceived(1, PEER_LOW_WAN, 101), t + 0.5)
    assert strip_reason(out) == [(State.MASTER, State.BACKUP), RemoveAddresses()]
    assert m.state is State.BACKUP
    assert [v.master_down_at for v in m.instances] == [t + 0.5 + 3.609375] * 2
    assert [v.advert_at for v in m.instances] == [None, None]
    assert m.garp_at is None
    assert m.instances[1].master_address == PEER_LOW_WAN
    assert m.instances[1].master_priority == 101
    assert m.instances[0].master_address is None  # not us any more, and not yet known
    assert m.next_deadline() == t + 0.5 + 3.609375


def test_master_lower_priority_is_split_brain_in_our_favour_garp() -> None:
    m, t = master()
    # Within 5 s of becoming master the second burst is still due: no extra one.
    assert m.handle(AdvertReceived(0, PEER_HIGH_LAN, 99), t + 1) == []
    m.handle(Tick(), t + 5)  # second burst sent
    out = m.handle(AdvertReceived(0, PEER_HIGH_LAN, 99), t + 5.5)
    assert out == [SendGarp(0), SendGarp(1)]
    assert m.garp_at == t + 5.5 + 5
    assert m.state is State.MASTER
    # Not once per advert: the follow-up burst is pending.
    assert m.handle(AdvertReceived(0, PEER_HIGH_LAN, 99), t + 6.5) == []


@pytest.mark.parametrize(("source", "we_stay"), [(PEER_LOW_LAN, True), (PEER_HIGH_LAN, False)])
def test_equal_priority_tie_break_by_address_on_the_lead(
    source: IPv4Address, we_stay: bool
) -> None:
    m, t = master()
    m.handle(Tick(), t + 5)
    out = m.handle(AdvertReceived(0, source, 100), t + 5.5)
    if we_stay:
        assert m.state is State.MASTER
        assert out == [SendGarp(0), SendGarp(1)]
    else:
        assert strip_reason(out) == [(State.MASTER, State.BACKUP), RemoveAddresses()]
        assert m.instances[0].master_address == source


@pytest.mark.parametrize(
    ("lead_source", "wan_source", "we_stay"),
    [
        (PEER_LOW_LAN, PEER_HIGH_WAN, True),  # the WAN address alone would make us lose
        (PEER_HIGH_LAN, PEER_LOW_WAN, False),  # the WAN address alone would make us win
        (PEER_LOW_LAN, PEER_LOW_WAN, True),
        (PEER_HIGH_LAN, PEER_HIGH_WAN, False),
    ],
)
def test_equal_priority_tie_on_other_interface_follows_the_lead(
    lead_source: IPv4Address, wan_source: IPv4Address, we_stay: bool
) -> None:
    m, t = master()
    m.handle(Tick(), t + 5)
    m.handle(AdvertReceived(0, lead_source, 90), t + 5.25)  # lower: only noted
    out = m.handle(AdvertReceived(1, wan_source, 100), t + 5.5)
    assert m.state is (State.MASTER if we_stay else State.BACKUP)
    if not we_stay:
        assert strip_reason(out) == [(State.MASTER, State.BACKUP), RemoveAddresses()]


def test_equal_priority_tie_on_other_interface_without_lead_info_keeps_master() -> None:
    # Never heard on the lead: no per-interface verdict (it could contradict the peer's).
    m, t = master()
    m.handle(AdvertReceived(1, PEER_HIGH_WAN, 100), t + 0.5)
    assert m.state is State.MASTER
    # The same round's lead advert decides.
    out = m.handle(AdvertReceived(0, PEER_HIGH_LAN, 100), t + 0.5)
    assert states(out) == [(State.MASTER, State.BACKUP)]


def test_tie_break_compares_addresses_as_unsigned_32_bit() -> None:
    # 192.0.2.2 > 10.0.0.2 as an unsigned number (a signed compare would get it wrong
    # for addresses above 128.0.0.0).
    m, t = master(group(lan=A("10.0.0.2"), wan=A("10.0.0.3")))
    out = m.handle(AdvertReceived(0, A("200.0.0.1"), 100), t + 0.5)
    assert states(out) == [(State.MASTER, State.BACKUP)]


# ---- crossed addresses: the lead interface decides ---------------------------------------

# Node X: lan .2, wan .3; node Y: lan .3, wan .2. Per-interface tie-breaks disagree.
X_LAN, X_WAN = A("10.0.0.2"), A("192.0.2.3")
Y_LAN, Y_WAN = A("10.0.0.3"), A("192.0.2.2")


def _both_masters() -> tuple[GroupMachine, GroupMachine, float]:
    x, t = master(group(lan=X_LAN, wan=X_WAN))
    y, t2 = master(group(lan=Y_LAN, wan=Y_WAN))
    assert t == t2
    return x, y, t


@pytest.mark.parametrize(
    "order",
    [
        ("lan", "wan"),
        ("wan", "lan"),
    ],
)
@pytest.mark.parametrize("y_order_differs", [False, True])
def test_crossed_addresses_both_nodes_agree_on_one_winner(
    order: tuple[str, str], y_order_differs: bool
) -> None:
    """Y has the higher lead (LAN) address, so Y wins on both interfaces whatever the
    order in which the two adverts of a round arrive."""
    x, y, t = _both_masters()
    x_adverts = {"lan": AdvertReceived(0, Y_LAN, 100), "wan": AdvertReceived(1, Y_WAN, 100)}
    y_adverts = {"lan": AdvertReceived(0, X_LAN, 100), "wan": AdvertReceived(1, X_WAN, 100)}
    y_order = tuple(reversed(order)) if y_order_differs else order
    now = t + 2**-10
    for name in order:
        if x.state is State.MASTER:
            x.handle(x_adverts[name], now)
    for name in y_order:
        if y.state is State.MASTER:
            y.handle(y_adverts[name], now)
    assert (x.state, y.state) == (State.BACKUP, State.MASTER)
    assert x.transitions == 3  # init->backup->master->backup
    assert y.transitions == 2


def test_lead_peer_decides_a_non_lead_tie_within_master_down_interval() -> None:
    x, t = master(group(lan=X_LAN, wan=X_WAN))
    x.handle(Tick(), t + 5)
    # Y heard on the lead (a lower priority there, so only noted)...
    x.handle(AdvertReceived(0, Y_LAN, 90), t + 5)
    # ...so a tie on wan0 is decided by the lead addresses (Y_LAN > X_LAN) although
    # X_WAN > Y_WAN.
    out = x.handle(AdvertReceived(1, Y_WAN, 100), t + 5 + 3.609375)
    assert states(out) == [(State.MASTER, State.BACKUP)]


def test_lead_peer_info_stale_falls_back_per_interface() -> None:
    x, t = master(group(lan=X_LAN, wan=X_WAN))
    x.handle(AdvertReceived(0, Y_LAN, 90), t)
    x.handle(Tick(), t + 5)
    # Long after: the stale lead info no longer decides; wan0 compares its own addresses.
    out = x.handle(AdvertReceived(1, Y_WAN, 100), t + 5 + 3.609375 + 1)
    assert x.state is State.MASTER
    assert states(out) == []


# ---- StepDown / Resume -------------------------------------------------------------------


def test_step_down_from_master() -> None:
    m, t = master(group(150, preempt=True))
    out = m.handle(StepDown(), t + 2)
    assert strip_reason(out) == [
        SendAdvert(0, 0),
        SendAdvert(1, 0),
        (State.MASTER, State.BACKUP),
        RemoveAddresses(),
    ]
    assert m.stepped_down
    assert m.next_deadline() == t + 2 + 3.4140625
    # The lower-priority peer takes over; we do not preempt it back.
    for k in range(3, 30):
        assert m.handle(AdvertReceived(0, PEER_LOW_LAN, 100), t + k) == []
        assert m.handle(AdvertReceived(1, PEER_LOW_WAN, 100), t + k) == []
        assert m.handle(Tick(), t + k) == []
    assert m.state is State.BACKUP
    # The peer vanishes: we take over again, and the step-down is over.
    last = t + 29
    assert m.next_deadline() == last + 3.4140625
    assert states(m.handle(Tick(), last + 3.4140625)) == [(State.BACKUP, State.MASTER)]
    assert not m.stepped_down


def test_resume_restores_preemption_after_step_down() -> None:
    m, t = master(group(150, preempt=True))
    m.handle(StepDown(), t)
    m.handle(AdvertReceived(0, PEER_LOW_LAN, 100), t + 1)
    assert m.instances[0].master_down_at == t + 1 + 3.4140625
    assert m.handle(Resume(), t + 1.5) == []
    assert not m.stepped_down
    m.handle(AdvertReceived(0, PEER_LOW_LAN, 100), t + 2)
    m.handle(AdvertReceived(1, PEER_LOW_WAN, 100), t + 2)
    assert m.next_deadline() == t + 3.4140625  # wan0 timer from the step down, not reset
    assert states(m.handle(Tick(), t + 3.4140625)) == [(State.BACKUP, State.MASTER)]


def test_step_down_in_backup_only_sets_the_flag() -> None:
    m = backup(group(150, preempt=True))
    assert m.handle(StepDown(), T0) == []
    assert m.stepped_down
    assert m.state is State.BACKUP


# ---- links -------------------------------------------------------------------------------


def test_link_down_in_master_faults_the_group_and_zero_on_live_links() -> None:
    m, t = master()
    out = m.handle(LinkChanged(0, False), t + 0.5)
    assert strip_reason(out) == [SendAdvert(1, 0), RemoveAddresses(), (State.MASTER, State.FAULT)]
    assert "lan0" in out[-1].reason  # type: ignore[union-attr]
    assert m.next_deadline() is None
    assert m.handle(Tick(), t + 10) == []
    assert m.handle(AdvertReceived(1, PEER_LOW_WAN, 100), t + 10) == []
    assert m.instances[1].adverts_received == 1
    out = m.handle(LinkChanged(0, True), t + 11)
    assert strip_reason(out) == [(State.FAULT, State.BACKUP)]
    assert m.next_deadline() == t + 11 + 3.609375


def test_link_down_in_backup_and_both_links() -> None:
    m = backup()
    assert strip_reason(m.handle(LinkChanged(1, False), T0 + 1)) == [
        (State.BACKUP, State.FAULT)
    ]
    assert m.handle(LinkChanged(0, False), T0 + 2) == []
    assert m.handle(LinkChanged(1, True), T0 + 3) == []  # lan0 still down
    assert m.state is State.FAULT
    assert m.handle(LinkChanged(1, True), T0 + 3) == []  # repeated: no change
    assert strip_reason(m.handle(LinkChanged(0, True), T0 + 4)) == [(State.FAULT, State.BACKUP)]


def test_link_up_repeated_is_a_no_op() -> None:
    m, t = master()
    assert m.handle(LinkChanged(0, True), t) == []
    assert m.state is State.MASTER


def test_step_down_while_fault_is_remembered() -> None:
    m = backup()
    m.handle(LinkChanged(0, False), T0)
    assert m.handle(StepDown(), T0) == []
    assert m.stepped_down
    assert m.state is State.FAULT


# ---- shutdown ----------------------------------------------------------------------------


def test_shutdown_from_master() -> None:
    m, t = master()
    out = m.handle(Shutdown(), t + 1.5)
    assert strip_reason(out) == [
        SendAdvert(0, 0),
        SendAdvert(1, 0),
        RemoveAddresses(),
        (State.MASTER, State.INIT),
    ]
    assert m.next_deadline() is None
    assert m.handle(Shutdown(), t + 2) == []


def test_shutdown_from_master_with_a_link_down_skips_it() -> None:
    m, t = master()
    m.handle(LinkChanged(1, False), t)
    out = m.handle(Shutdown(), t + 1)
    assert strip_reason(out) == [(State.FAULT, State.INIT)]


def test_shutdown_from_backup_sends_nothing() -> None:
    m = backup()
    assert strip_reason(m.handle(Shutdown(), T0 + 1)) == [(State.BACKUP, State.INIT)]
    assert m.next_deadline() is None
    # and can start again
    assert states(m.handle(Startup(), T0 + 2)) == [(State.INIT, State.BACKUP)]


# ---- reconfigure -------------------------------------------------------------------------


def test_reconfigure_priority_in_master_without_transition() -> None:
    m, t = master()
    out = m.handle(Reconfigure(with_priority(m.params, 200)), t + 0.5)
    assert out == []
    assert m.state is State.MASTER
    assert m.priority == 200
    assert m.transitions == 2
    assert m.instances[0].master_priority == 200
    assert m.handle(Tick(), t + 1) == [SendAdvert(0, 200), SendAdvert(1, 200)]


def test_reconfigure_priority_in_backup_without_transition() -> None:
    m = backup()
    m.handle(AdvertReceived(0, PEER_LOW_LAN, 120), T0 + 1)
    assert m.handle(Reconfigure(with_priority(m.params, 200)), T0 + 1.5) == []
    assert m.state is State.BACKUP
    assert m.instances[0].master_down_at == T0 + 1 + 3.609375  # timers untouched


def test_reconfigure_enables_garp_refresh_in_master() -> None:
    m, t = master()
    m.handle(Tick(), t + 5)
    assert m.garp_at is None
    m.handle(Reconfigure(replace(m.params, garp_refresh=30.0)), t + 6)
    assert m.garp_at == t + 36


def test_reconfigure_cannot_change_vrids() -> None:
    m = backup()
    other = replace(m.params, instances=(m.params.instances[0],))
    with pytest.raises(ValueError, match="restart"):
        m.handle(Reconfigure(other), T0)


# ---- the table: every (state, input) pair ------------------------------------------------


def _in_state(state: State) -> tuple[GroupMachine, float]:
    if state is State.INIT:
        return GroupMachine(group()), T0
    if state is State.BACKUP:
        return backup(), T0 + 1
    if state is State.MASTER:
        m, t = master()
        return m, t + 0.5
    m = backup()
    m.handle(LinkChanged(1, False), T0 + 1)
    return m, T0 + 1


INPUTS: list[Event] = [
    Startup(),
    Tick(),
    AdvertReceived(0, PEER_LOW_LAN, 100),
    AdvertReceived(1, PEER_HIGH_WAN, 0),
    LinkChanged(0, False),
    LinkChanged(1, True),
    Shutdown(),
    StepDown(),
    Resume(),
    SetDemoted(True, "test"),
    SetDemoted(False),
    Reconfigure(group(120)),
    TrackChanged(("uplink",), 0, "track 'uplink' down"),
    TrackChanged((), -60, "track 'wan1' down"),
    TrackChanged(),
]
NO_ROW = {
    (State.BACKUP, Startup),
    (State.MASTER, Startup),
    (State.FAULT, Startup),
    (State.INIT, StepDown),
}


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", INPUTS, ids=lambda e: repr(e))
def test_every_state_and_input(state: State, event: Event) -> None:
    m, now = _in_state(state)
    assert m.state is state
    before = m.transitions
    if (state, type(event)) in NO_ROW:
        with pytest.raises(UnexpectedInput):
            m.handle(event, now)
        assert m.state is state
        assert m.transitions == before
        return
    out = m.handle(event, now)
    assert isinstance(out, list)
    moves = [a for a in out if isinstance(a, Transition)]
    assert len(moves) <= 1
    assert m.transitions == before + len(moves)
    if moves:
        assert moves[0].old is state
        assert moves[0].new is m.state
        assert moves[0].reason
    else:
        assert m.state is state


def test_table_covers_every_input_type() -> None:
    assert {type(e) for e in INPUTS} == {
        Startup, Tick, AdvertReceived, LinkChanged, Shutdown, StepDown, Resume, SetDemoted,
        Reconfigure, TrackChanged,
    }


def test_startup_twice_is_unexpected() -> None:
    m = backup()
    with pytest.raises(UnexpectedInput, match="Startup"):
        m.handle(Startup(), T0 + 1)


def test_group_needs_an_instance() -> None:
    with pytest.raises(ValueError):
        GroupMachine(GroupParams(instances=()))


events = st.one_of(
    st.just(Startup()),
    st.just(Tick()),
    st.builds(
        AdvertReceived,
        st.integers(0, 1),
        st.sampled_from([PEER_LOW_LAN, PEER_HIGH_LAN, PEER_LOW_WAN, PEER_HIGH_WAN]),
        st.sampled_from([0, 1, 99, 100, 101, 255]),
    ),
    st.builds(LinkChanged, st.integers(0, 1), st.booleans()),
    st.just(Shutdown()),
    st.just(StepDown()),
    st.just(Resume()),
    st.builds(SetDemoted, st.booleans()),
    st.builds(lambda p: Reconfigure(group(p)), st.sampled_from([50, 100, 200])),
    st.builds(lambda f, d: TrackChanged(("check",) if f else (), d, "track"),
              st.booleans(), st.sampled_from([-254, -60, 0, 60, 254])),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3000), events), max_size=40))
def test_any_input_sequence_keeps_invariants(steps: list[tuple[int, Event]]) -> None:
    m = GroupMachine(group(preempt=True))
    now = T0
    addresses_on = False
    for dt, event in steps:
        now += dt / 1024
        deadline = m.next_deadline()
        if isinstance(event, Tick) and deadline is not None:
            now = max(now, deadline)
        old = m.state
        try:
            out = m.handle(event, now)
        except UnexpectedInput:
            assert m.state is old
            continue
        state = old
        for a in out:
            if isinstance(a, Transition):
                assert a.old is state
                state = a.new
            elif isinstance(a, AddAddresses):
                assert state is State.MASTER and not addresses_on
                addresses_on = True
            elif isinstance(a, RemoveAddresses):
                assert addresses_on
                addresses_on = False
        assert state is m.state
        assert addresses_on == (m.state is State.MASTER)
        # Whatever the track weights, what we advertise stays a valid backup priority.
        assert all(1 <= p.priority <= 254 for p in m.params.instances)
        if m.track_faults:
            assert m.state in (State.INIT, State.FAULT)
        if m.state in (State.INIT, State.FAULT):
            assert m.next_deadline() is None
        elif m.state is State.BACKUP:
            assert all(v.master_down_at is not None for v in m.instances)
            assert all(v.advert_at is None for v in m.instances)
        else:
            assert all(v.advert_at is not None for v in m.instances)
            assert all(v.master_down_at is None for v in m.instances)


# ---- two nodes on an in-memory network ---------------------------------------------------


@dataclass
class Node:
    name: str
    params: GroupParams
    machine: GroupMachine = field(init=False)
    alive: bool = False
    links: list[bool] = field(default_factory=lambda: [True, True])
    sent: list[tuple[float, SendAdvert]] = field(default_factory=list)
    garps: list[float] = field(default_factory=list)
    history: list[tuple[float, State, State]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.machine = GroupMachine(self.params)

    def primary(self, index: int) -> IPv4Address:
        return self.params.instances[index].primary


@dataclass(order=True)
class _Queued:
    at: float
    seq: int
    node: Node = field(compare=False)
    event: Event = field(compare=False)


class Network:
    """Both nodes on the same LAN and WAN segments; adverts arrive after a per-link delay."""

    def __init__(self, nodes: list[Node], latency: tuple[float, float] = (2**-10, 2**-10)):
        self.nodes = nodes
        self.latency = latency
        self.now = 0.0
        self.queue: list[_Queued] = []
        self.seq = itertools.count()

    def _feed(self, node: Node, event: Event) -> None:
        out = node.machine.handle(event, self.now)
        for a in out:
            if isinstance(a, Transition):
                node.history.append((self.now, a.old, a.new))
            elif isinstance(a, SendGarp) and a.index == 0:
                node.garps.append(self.now)
            elif isinstance(a, SendAdvert) and node.links[a.index]:
                node.sent.append((self.now, a))
                for peer in self.nodes:
                    if peer is not node:
                        ev = AdvertReceived(a.index, node.primary(a.index), a.priority)
                        at = self.now + self.latency[a.index]
                        heapq.heappush(self.queue, _Queued(at, next(self.seq), peer, ev))

    def start(self, node: Node) -> None:
        if node.machine.state is not State.INIT:
            node.machine = GroupMachine(node.params)
        node.alive = True
        self._feed(node, Startup())

    def kill(self, node: Node) -> None:
        node.alive = False

    def stop(self, node: Node) -> None:
        self._feed(node, Shutdown())
        node.alive = False

    def command(self, node: Node, event: Event) -> None:
        self._feed(node, event)

    def link(self, node: Node, index: int, up: bool) -> None:
        node.links[index] = up
        self._feed(node, LinkChanged(index, up))

    def run_until(self, end: float) -> None:
        while True:
            deadlines = [
                (d, n) for n in self.nodes if n.alive and (d := n.machine.next_deadline()) is not None
            ]
            next_timer = min(deadlines, key=lambda x: x[0]) if deadlines else None
            next_packet = self.queue[0].at if self.queue else None
            candidates = [t for t in (next_packet, next_timer and next_timer[0]) if t is not None]
            if not candidates or min(candidates) > end:
                break
            if next_packet is not None and (next_timer is None or next_packet <= next_timer[0]):
                q = heapq.heappop(self.queue)
                self.now = max(self.now, q.at)
                i = q.event.index  # type: ignore[union-attr]
                if q.node.alive and q.node.links[i]:
                    self._feed(q.node, q.event)
            else:
                assert next_timer is not None
                self.now = max(self.now, next_timer[0])
                self._feed(next_timer[1], Tick())
        self.now = end

    def masters(self) -> list[Node]:
        return [n for n in self.nodes if n.alive and n.machine.state is State.MASTER]

    def assert_one_master_and_views_agree(self) -> Node:
        masters = self.masters()
        assert len(masters) == 1, [(n.name, n.machine.state) for n in self.nodes]
        m = masters[0]
        for n in self.nodes:
            if n is m or not n.alive:
                continue
            assert n.machine.state is State.BACKUP
            # Both of the backup's instances see the same node as master.
            assert [v.master_address for v in n.machine.instances] == [m.primary(0), m.primary(1)]
        return m


def _pair(
    prio_a: int = 150,
    prio_b: int = 100,
    preempt_a: bool = True,
    preempt_b: bool = False,
    a_addrs: tuple[str, str] = ("10.0.0.2", "192.0.2.2"),
    b_addrs: tuple[str, str] = ("10.0.0.3", "192.0.2.3"),
    latency: tuple[float, float] = (2**-10, 2**-10),
) -> tuple[Network, Node, Node]:
    a = Node("a", group(prio_a, preempt=preempt_a, lan=A(a_addrs[0]), wan=A(a_addrs[1])))
    b = Node("b", group(prio_b, preempt=preempt_b, lan=A(b_addrs[0]), wan=A(b_addrs[1])))
    return Network([a, b], latency), a, b


def _transition_times(node: Node, new: State) -> list[float]:
    return [t for t, _, n in node.history if n is new]


def test_two_nodes_election_failover_and_return() -> None:
    net, a, b = _pair()
    net.start(a)
    net.start(b)
    net.run_until(20)
    assert net.assert_one_master_and_views_agree() is a
    assert _transition_times(a, State.MASTER) == [3.4140625]
    assert len(a.history) == 2 and len(b.history) == 1  # no flapping
    # a's adverts every second on both links
    lan_times = [t for t, s in a.sent if s.index == 0]
    assert lan_times[:4] == [3.4140625, 4.4140625, 5.4140625, 6.4140625]

    # a dies (SIGKILL): b takes over Master_Down after the last advert it heard.
    last_advert = max(t for t, _ in a.sent)
    net.kill(a)
    net.run_until(40)
    assert net.assert_one_master_and_views_agree() is b
    takeover = _transition_times(b, State.MASTER)[0]
    assert takeover == last_advert + 2**-10 + 3.609375
    assert b.garps[0] == takeover and b.garps[1] == takeover + 5

    # a comes back with start_as_master semantics (preempt): it takes over again.
    net.start(a)
    restart = 40.0
    net.run_until(60)
    assert net.assert_one_master_and_views_agree() is a
    assert _transition_times(a, State.MASTER)[-1] == restart + 3.4140625
    assert len(b.history) == 3  # init->backup, ->master, ->backup: no flapping


def test_two_nodes_graceful_stop_costs_only_skew() -> None:
    net, a, b = _pair()
    net.start(a)
    net.start(b)
    net.run_until(10)
    net.stop(a)  # priority 0 on both links
    assert a.sent[-2:] == [(10.0, SendAdvert(0, 0)), (10.0, SendAdvert(1, 0))]
    net.run_until(20)
    assert net.assert_one_master_and_views_agree() is b
    assert _transition_times(b, State.MASTER) == [10 + 2**-10 + 0.609375]


def test_two_nodes_link_down_moves_the_whole_group() -> None:
    net, a, b = _pair()
    net.start(a)
    net.start(b)
    net.run_until(10)
    net.link(a, 1, False)  # a's WAN goes down: a sends priority 0 on LAN and goes FAULT
    assert a.machine.state is State.FAULT
    net.run_until(20)
    assert [n.name for n in net.masters()] == ["b"]
    assert _transition_times(b, State.MASTER) == [10 + 2**-10 + 0.609375]
    net.link(a, 1, True)
    net.run_until(40)
    # a returns as backup and preempts back (priority 150 > 100, preempt on).
    assert net.assert_one_master_and_views_agree() is a


def test_two_nodes_step_down_and_resume() -> None:
    net, a, b = _pair()
    net.start(a)
    net.start(b)
    net.run_until(10)
    net.command(a, StepDown())
    net.run_until(30)
    assert net.assert_one_master_and_views_agree() is b
    assert _transition_times(b, State.MASTER) == [10 + 2**-10 + 0.609375]
    net.command(a, Resume())
    net.run_until(40)
    assert net.assert_one_master_and_views_agree() is a


def test_two_nodes_equal_priority_no_preempt_first_up_wins() -> None:
    net, a, b = _pair(100, 100, False, False)
    net.start(b)  # b has the higher addresses but starts later
    net.run_until(1)
    net.start(a)
    net.run_until(30)
    assert net.assert_one_master_and_views_agree() is b
    net2, a2, b2 = _pair(100, 100, False, False)
    net2.start(a2)
    net2.run_until(1)
    net2.start(b2)
    net2.run_until(30)
    assert net2.assert_one_master_and_views_agree() is a2
    assert len(a2.history) == 2 and len(b2.history) == 1


@pytest.mark.parametrize("latency", [(2**-10, 2**-9), (2**-9, 2**-10)])
def test_two_nodes_crossed_addresses_simultaneous_start(latency: tuple[float, float]) -> None:
    net, x, y = _pair(
        100, 100, False, False, ("10.0.0.2", "192.0.2.3"), ("10.0.0.3", "192.0.2.2"), latency
    )
    net.start(x)
    net.start(y)
    net.run_until(30)
    assert net.assert_one_master_and_views_agree() is y  # the higher lead address
    assert len(y.history) == 2
    assert len(x.history) == 3


@settings(max_examples=60, deadline=None)
@given(
    prios=st.one_of(
        st.integers(1, 254).map(lambda p: (p, p)), st.tuples(st.integers(1, 254), st.integers(1, 254))
    ),
    preempts=st.tuples(st.booleans(), st.booleans()),
    lans=st.lists(st.integers(1, 254), min_size=2, max_size=2, unique=True),
    wans=st.lists(st.integers(1, 254), min_size=2, max_size=2, unique=True),
    offsets=st.one_of(st.just((0, 0)), st.tuples(st.integers(0, 64), st.integers(0, 64))),
    latency=st.tuples(st.integers(1, 8), st.integers(1, 8)),
)
def test_two_nodes_always_converge_to_one_master(
    prios: tuple[int, int],
    preempts: tuple[bool, bool],
    lans: list[int],
    wans: list[int],
    offsets: tuple[int, int],
    latency: tuple[int, int],
) -> None:
    net, a, b = _pair(
        prios[0], prios[1], preempts[0], preempts[1],
        (f"10.0.0.{lans[0]}", f"192.0.2.{wans[0]}"),
        (f"10.0.0.{lans[1]}", f"192.0.2.{wans[1]}"),
        (latency[0] / 1024, latency[1] / 1024),
    )
    starts = sorted([(offsets[0] / 16, 0, a), (offsets[1] / 16, 1, b)], key=lambda s: s[:2])
    for at, _, node in starts:
        net.run_until(at)
        net.start(node)
    net.run_until(30)
    winner = net.assert_one_master_and_views_agree()
    for n in (a, b):
        # no flapping: at most init->backup->master->backup
        assert len(n.history) <= 3, n.history
        assert all(t < 20 for t, _, _ in n.history)
    if offsets[0] == offsets[1]:
        if prios[0] != prios[1]:
            assert winner is (a if prios[0] > prios[1] else b)
        else:
            assert winner is (a if lans[0] > lans[1] else b)
    high = a if prios[0] > prios[1] else b
    if prios[0] != prios[1] and preempts[(a, b).index(high)]:
        assert winner is high
    # Then the master dies: the other one takes over within Master_Down_Interval.
    loser = b if winner is a else a
    last = max(t for t, _ in winner.sent)
    net.kill(winner)
    net.run_until(60)
    assert net.assert_one_master_and_views_agree() is loser
    mdi = loser.params.instances[0].master_down_interval
    takeover = _transition_times(loser, State.MASTER)[-1]
    assert last < takeover <= last + max(latency) / 1024 + mdi
