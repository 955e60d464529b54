"""Health checks: the tracker's rise/fall/weight logic with a scripted clock, the priority
bounds, and how the VRRP group machine (alone and as a pair) responds to its verdicts."""

from __future__ import annotations

import pytest

from invictusd.track import (
    CheckKind,
    CheckSpec,
    CheckState,
    Result,
    Tracker,
    Verdict,
    bounded_priority,
)
from invictusd.vrrp.machine import (
    AddAddresses,
    AdvertReceived,
    GroupMachine,
    LinkChanged,
    RemoveAddresses,
    SendAdvert,
    Startup,
    State,
    Tick,
    TrackChanged,
    Transition,
)
from tests.unit.test_vrrp_machine import (
    PEER_HIGH_LAN,
    PEER_LOW_LAN,
    T0,
    Network,
    Node,
    _pair,
    _transition_times,
    backup,
    group,
    master,
)

OK, FAIL = Result(True, "exit 0"), Result(False, "exit 1", "no route to 192.0.2.9")


def cmd(name: str = "uplink", weight: int | None = None, interval: float = 2.0, fall: int = 2,
        rise: int = 2) -> CheckSpec:
    return CheckSpec(name, CheckKind.COMMAND, weight, interval, fall, rise)


def iface(name: str = "wan1", weight: int | None = -60) -> CheckSpec:
    return CheckSpec(name, CheckKind.INTERFACE, weight)


# ---- the tracker -------------------------------------------------------------------------


def test_first_result_decides_then_fall_and_rise_need_consecutive_runs() -> None:
    t = Tracker((cmd(fall=2, rise=3),))
    assert t.views[0].state is CheckState.UNKNOWN and not t.settled()
    ch = t.result(0, OK, T0)
    assert ch is not None and (ch.old, ch.new) == (CheckState.UNKNOWN, CheckState.UP)
    assert t.settled() and t.verdict() == Verdict()
    # One failure is not enough with fall = 2; a success in between starts the count again.
    assert t.result(0, FAIL, T0 + 2) is None
    assert t.result(0, OK, T0 + 4) is None
    assert t.result(0, FAIL, T0 + 6) is None
    ch = t.result(0, FAIL, T0 + 8)
    assert ch is not None and ch.new is CheckState.DOWN
    assert ch.verdict == Verdict(faults=("uplink",), delta=0, down=("uplink",))
    assert ch.reason == "track 'uplink' down: exit 1"
    # Back up only after rise = 3 successes in a row.
    assert t.result(0, OK, T0 + 10) is None
    assert t.result(0, OK, T0 + 12) is None
    assert t.result(0, FAIL, T0 + 14) is None
    assert t.result(0, OK, T0 + 16) is None
    assert t.result(0, OK, T0 + 18) is None
    ch = t.result(0, OK, T0 + 20)
    assert ch is not None and ch.new is CheckState.UP and ch.verdict == Verdict()
    v = t.views[0]
    assert (v.runs, v.failed_runs, v.since) == (11, 4, T0 + 20)


def test_first_result_failing_is_down_at_once() -> None:
    t = Tracker((cmd(fall=5),))
    ch = t.result(0, FAIL, T0)
    assert ch is not None and ch.new is CheckState.DOWN
    assert t.verdict().faults == ("uplink",)


def test_weights_add_up_and_faults_are_listed_separately() -> None:
    t = Tracker((cmd("dns", weight=-30, fall=1, rise=1), iface("wan1", -60),
                 cmd("vpn", weight=None, fall=1, rise=1), iface("backup-isp", 20)))
    for i in range(4):
        t.result(i, OK, T0)
    assert t.verdict() == Verdict()
    t.result(0, FAIL, T0 + 1)
    t.result(1, Result(False, "carrier down"), T0 + 1)
    assert t.verdict() == Verdict((), -90, ("dns", "wan1"))
    t.result(3, FAIL, T0 + 2)
    assert t.verdict() == Verdict((), -70, ("dns", "wan1", "backup-isp"))
    ch = t.result(2, FAIL, T0 + 3)
    assert ch is not None and ch.verdict == Verdict(("vpn",), -70, ("dns", "wan1", "vpn",
                                                                      "backup-isp"))


def test_schedule_is_start_to_start_and_one_run_at_a_time() -> None:
    t = Tracker((cmd(interval=2.0), cmd("other", interval=5.0), iface()))
    assert t.next_deadline() is None  # nothing before start
    t.start(T0)
    assert t.next_deadline() == T0
    assert t.due(T0) == [0, 1]  # interface checks are never "due": events drive them
    assert t.due(T0) == []  # running: not due again
    assert t.next_deadline() is None
    t.result(0, Result(True, duration=0.25), T0 + 0.25)
    assert t.views[0].due_at == T0 + 2.0
    assert t.next_deadline() == T0 + 2.0
    assert t.due(T0 + 1.99) == []
    assert t.due(T0 + 2.0) == [0]
    # A run that overran its slot (hung until its timeout) is followed at once.
    t.result(0, Result(False, "timed out", duration=3.0), T0 + 5.0)
    assert t.views[0].due_at == T0 + 5.0


def test_interface_results_ignore_the_schedule() -> None:
    t = Tracker((iface(),))
    t.start(T0)
    assert t.next_deadline() is None
    ch = t.result(0, Result(False, "carrier down"), T0 + 1)
    assert ch is not None and ch.verdict.delta == -60
    assert t.views[0].due_at is None


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="weight"):
        cmd(weight=255)
    with pytest.raises(ValueError, match="fall"):
        cmd(fall=0)
    with pytest.raises(ValueError, match="interval"):
        CheckSpec("x", CheckKind.COMMAND, None, 0.0)
    with pytest.raises(ValueError, match="unique"):
        Tracker((cmd(), cmd()))


def test_status_reports_every_check() -> None:
    t = Tracker((cmd(), iface()))
    t.result(0, Result(False, "exit 3", "ping: connect: Network is unreachable", 0.0125), T0)
    rows = t.status(T0 + 1)
    assert rows[0] == {
        "name": "uplink", "kind": "command", "weight": "fault", "state": "down", "since": 1.0,
        "last_result": "fail", "last_detail": "exit 3",
        "last_output": "ping: connect: Network is unreachable", "last_duration_ms": 12.5,
        "runs": 1, "failed_runs": 1, "consecutive_failures": 1, "consecutive_successes": 0,
    }
    assert rows[1]["state"] == "unknown" and rows[1]["weight"] == "-60"
    assert rows[1]["last_result"] is None


# ---- priority bounds ---------------------------------------------------------------------


@pytest.mark.parametrize(("base", "delta", "want"), [
    (100, 0, 100), (100, -60, 40), (100, -99, 1), (100, -100, 1), (100, -254, 1),
    (100, 154, 254), (100, 254, 254), (1, -1, 1), (254, 1, 254), (150, 60, 210),
    (255, -254, 255),  # the address owner keeps 255
])
def test_bounded_priority(base: int, delta: int, want: int) -> None:
    assert bounded_priority(base, delta) == want


def test_machine_advertises_the_bounded_priority_and_its_timers_use_it() -> None:
    m, t = master()
    assert m.handle(TrackChanged((), -150, "track 'wan1' down"), t + 0.5) == []
    assert m.priority == 1 and m.base is not None and m.base.instances[0].priority == 100
    assert m.handle(Tick(), t + 1) == [SendAdvert(0, 1), SendAdvert(1, 1)]
    assert [v.master_priority for v in m.instances] == [1, 1]
    m.handle(TrackChanged((), 400), t + 1.5)  # beyond the weights' range: still bounded
    assert m.priority == 254
    m.handle(TrackChanged((), 0), t + 1.75)
    assert m.handle(Tick(), t + 2) == [SendAdvert(0, 100), SendAdvert(1, 100)]
    # Skew_Time follows the advertised priority (RFC 3768: "Priority" of this router).
    b = backup()
    b.handle(TrackChanged((), -60), T0)
    b.handle(AdvertReceived(0, PEER_LOW_LAN, 100), T0 + 1)
    assert b.instances[0].master_down_at == T0 + 1 + 3 + (256 - 40) / 256


def test_reconfigure_keeps_the_track_delta() -> None:
    from invictusd.vrrp.machine import Reconfigure, with_priority

    m, t = master()
    m.handle(TrackChanged((), -60), t + 0.25)
    m.handle(Reconfigure(with_priority(group(), 200)), t + 0.5)
    assert m.priority == 140
    assert m.base is not None and m.base.instances[0].priority == 200


# ---- the machine's response --------------------------------------------------------------


def test_fault_check_in_master_leaves_like_a_lost_link_and_names_the_check() -> None:
    m, t = master()
    out = m.handle(TrackChanged(("uplink",), 0, "track 'uplink' down: exit 1"), t + 0.5)
    assert out == [
        SendAdvert(0, 0), SendAdvert(1, 0), RemoveAddresses(),
        Transition(State.MASTER, State.FAULT, "track 'uplink' down: exit 1"),
    ]
    assert m.state is State.FAULT and m.next_deadline() is None
    # Adverts from the new master change nothing while the check is down.
    assert m.handle(AdvertReceived(0, PEER_LOW_LAN, 100), t + 1) == []
    # A link flap does not end the fault either.
    m.handle(LinkChanged(1, False), t + 2)
    assert m.handle(LinkChanged(1, True), t + 3) == []
    assert m.state is State.FAULT
    # The check comes back: initialize, as after a link comes back.
    out = m.handle(TrackChanged((), 0, "track 'uplink' up: exit 0"), t + 4)
    assert out == [Transition(State.FAULT, State.BACKUP, "track 'uplink' up: exit 0")]
    assert m.instances[0].master_down_at == t + 4 + 3.609375


def test_fault_check_in_backup_goes_fault_without_adverts() -> None:
    m = backup()
    out = m.handle(TrackChanged(("vpn",), 0, "track 'vpn' down: timed out after 1.0s"), T0 + 1)
    assert out == [Transition(State.BACKUP, State.FAULT, "track 'vpn' down: timed out after 1.0s")]
    assert m.next_deadline() is None


def test_fault_check_and_a_lost_link_both_must_clear() -> None:
    m = backup()
    m.handle(LinkChanged(0, False), T0 + 1)
    assert m.handle(TrackChanged(("uplink",), 0, "x"), T0 + 2) == []
    assert m.handle(TrackChanged((), 0, "track 'uplink' up"), T0 + 3) == []  # link still down
    out = m.handle(LinkChanged(0, True), T0 + 4)
    assert [(a.old, a.new) for a in out if isinstance(a, Transition)] == [
        (State.FAULT, State.BACKUP)]


def test_fault_before_startup_starts_in_fault() -> None:
    m = GroupMachine(group())
    assert m.handle(TrackChanged(("uplink",), -10, "track 'uplink' down"), T0) == []
    out = m.handle(Startup(), T0)
    assert out == [Transition(State.INIT, State.FAULT, "track down: uplink")]
    assert m.priority == 90


def test_weight_change_is_never_a_transition_by_itself() -> None:
    m, t = master()
    for delta in (-60, -99, 50, 0):
        assert m.handle(TrackChanged((), delta), t + 0.5) == []
    assert m.state is State.MASTER
    b = backup()
    b.handle(AdvertReceived(0, PEER_HIGH_LAN, 100), T0 + 1)
    assert b.handle(TrackChanged((), 100), T0 + 1.5) == []
    assert b.state is State.BACKUP


def test_master_with_lowered_priority_yields_to_a_higher_advert() -> None:
    m, t = master()
    m.handle(TrackChanged((), -60), t + 0.25)
    out = m.handle(AdvertReceived(0, PEER_LOW_LAN, 100), t + 0.5)
    assert out[0] == Transition(
        State.MASTER, State.BACKUP, f"{PEER_LOW_LAN} on lan0 is master with priority 100 (ours 40)")
    assert RemoveAddresses() in out


def test_preempting_backup_whose_priority_rises_takes_over_at_master_down() -> None:
    m = backup(group(100, preempt=True))
    m.handle(AdvertReceived(0, PEER_LOW_LAN, 120), T0 + 1)
    m.handle(AdvertReceived(1, PEER_LOW_LAN, 120), T0 + 1)
    m.handle(TrackChanged((), 50), T0 + 1.5)  # now 150 > 120
    # The master's adverts no longer reset Master_Down: it fires one interval after the
    # last advert that counted.
    m.handle(AdvertReceived(0, PEER_LOW_LAN, 120), T0 + 2)
    m.handle(AdvertReceived(1, PEER_LOW_LAN, 120), T0 + 2)
    deadline = m.next_deadline()
    assert deadline == T0 + 1 + 3 + (256 - 100) / 256
    out = m.handle(Tick(), deadline)
    assert m.state is State.MASTER and AddAddresses() in out
    assert out[1] == SendAdvert(0, 150)


# ---- two nodes ---------------------------------------------------------------------------


def _weighted_pair(preempt_b: bool) -> tuple[Network, Node, Node]:
    net, a, b = _pair(prio_a=150, prio_b=120, preempt_a=True, preempt_b=preempt_b)
    net.start(a)
    net.start(b)
    net.run_until(20)
    assert net.assert_one_master_and_views_agree() is a
    return net, a, b


@pytest.mark.parametrize("preempt_b", [True, False])
def test_two_nodes_weight_below_the_backup_moves_only_a_preempting_backup(
    preempt_b: bool,
) -> None:
    net, a, b = _weighted_pair(preempt_b)
    net.command(a, TrackChanged((), -60, "track 'wan1' down"))  # 150 - 60 = 90 < 120
    net.run_until(40)
    winner = net.assert_one_master_and_views_agree()
    if preempt_b:
        assert winner is b
        took = _transition_times(b, State.MASTER)[0] - 20
        assert took <= 3 + (256 - 120) / 256  # within b's Master_Down
        # a yielded to b's first advert, without flapping
        assert [(o, n) for _, o, n in a.history][-1] == (State.MASTER, State.BACKUP)
    else:
        assert winner is a
        assert len(b.history) == 1
    # The check recovers: a (preempting, 150 again) takes mastership back in both cases.
    net.command(a, TrackChanged((), 0, "track 'wan1' up"))
    net.run_until(60)
    assert net.assert_one_master_and_views_agree() is a


def test_two_nodes_weight_not_below_the_backup_moves_nothing() -> None:
    net, a, b = _weighted_pair(True)
    net.command(a, TrackChanged((), -30, "track 'wan1' down"))  # 120 = 120: a keeps it
    net.run_until(40)
    assert net.assert_one_master_and_views_agree() is a
    assert len(a.history) == 2 and len(b.history) == 1


def test_two_nodes_fault_check_moves_the_group_in_skew_time() -> None:
    net, a, b = _weighted_pair(False)
    net.command(a, TrackChanged(("uplink",), 0, "track 'uplink' down"))
    net.run_until(40)
    assert net.masters() == [b]
    assert a.machine.state is State.FAULT
    took = _transition_times(b, State.MASTER)[0] - 20
    assert took == 2**-10 + (256 - 120) / 256  # priority 0 -> Skew_Time
    # Healthy again: a returns as backup, then preempts (150 > 120).
    net.command(a, TrackChanged((), 0, "track 'uplink' up"))
    net.run_until(60)
    assert net.assert_one_master_and_views_agree() is a
