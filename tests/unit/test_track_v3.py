"""Issue 11's health checks, hooks and configuration errors meet VRRPv3 (issue 10).

A track weight changes what every instance advertises, the IPv4 and IPv6 instances of a v3
table alike, down to the bytes on the wire; Skew_Time under v3 follows the advertised
priority and the master's interval; a hook's INVICTUSD_VIPS holds the IPv6 addresses of the
v3 instances; and the v3 keys go through the error-collecting reader: every error of a file
in one run, with its line, and the closest known key for a misspelt one."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from invictusd.config import ConfigError, check_system, parse
from invictusd.daemon import Daemon
from invictusd.vrrp import plan, v3
from invictusd.vrrp.machine import (
    AdvertReceived,
    GroupMachine,
    Reconfigure,
    RemoveAddresses,
    SendAdvert,
    Shutdown,
    Startup,
    State,
    Tick,
    TrackChanged,
    Transition,
)
from tests.unit.test_config import LINKS, edit, line_of
from tests.unit.test_config_v3 import LINKS6, V3, V3_WAN
from tests.unit.test_vrrp_machine_v3 import (
    HIGH4,
    HIGH6,
    HIGH_WAN,
    LOW4,
    LOW6,
    LOW_WAN,
    T0,
    Network,
    Node,
    backup,
    master,
    md,
    v3group,
)

A4, A6 = IPv4Address, IPv6Address
PATH = "/etc/invictusd.toml"
SYSTEM = {**LINKS6, "wan0": LINKS["wan0"]}
TRACK = '\n[[track]]\ninterface = "wan1"\nweight = -60\n'


def adverts(actions: list[object]) -> list[SendAdvert]:
    return [a for a in actions if isinstance(a, SendAdvert)]


# ---- the advertised priority, on the wire ----------------------------------------------------


def test_v3_track_weight_is_what_both_families_advertise_on_the_wire() -> None:
    text = (edit(V3, "virtual_id = 51", "virtual_id = 51\nstart_as_master = true")
            + edit(V3_WAN, "virtual_id = 52", "virtual_id = 52\nstart_as_master = true")
            + TRACK)
    cfg = check_system(parse(text, PATH), SYSTEM)
    assert cfg.track[0].weight == -60 and cfg.vrrp[0].priority == 150
    specs = plan.instances(cfg)
    assert [(s.interface, s.family) for s in specs] == [("lan0", 4), ("lan0", 6), ("wan0", 4)]
    m, t = master(plan.group_params(cfg))

    def on_the_wire(actions: list[object]) -> list[tuple[int, int, int]]:
        """(family, priority, interval in centiseconds) of each advert, as encoded."""
        out = []
        for a in adverts(actions):
            spec = specs[a.index]
            for message, destination in plan.advert(cfg, spec, a.priority):
                adv = v3.decode(message, spec.source, destination)
                out.append((spec.family, adv.priority, adv.interval_cs))
        return out

    def tick() -> list[tuple[int, int, int]]:
        due = m.next_deadline()
        assert due is not None
        return on_the_wire(m.handle(Tick(), due))

    assert tick() == [(4, 150, 10), (6, 150, 10), (4, 150, 10)]
    # wan1 goes down: nothing is sent at once (no re-election by itself)...
    assert m.handle(TrackChanged((), -60, "track 'wan1' down: carrier down"), t + 0.15) == []
    assert m.state is State.MASTER and m.priority == 90
    assert m.base is not None and [p.priority for p in m.base.instances] == [150] * 3
    # ...the next adverts of every instance, IPv4 and IPv6, carry 150 - 60.
    assert tick() == [(4, 90, 10), (6, 90, 10), (4, 90, 10)]
    assert [v.master_priority for v in m.instances] == [90] * 3
    # Back up: the configured priority again.
    m.handle(TrackChanged((), 0, "track 'wan1' up"), t + 0.25)
    assert tick() == [(4, 150, 10), (6, 150, 10), (4, 150, 10)]
    # The goodbye is priority 0 whatever the delta.
    m.handle(TrackChanged((), -60), t + 0.35)
    assert on_the_wire(m.handle(Shutdown(), t + 0.36)) == [(4, 0, 10), (6, 0, 10), (4, 0, 10)]


def test_v3_weight_is_bounded_and_an_owner_keeps_255() -> None:
    m, t = master(v3group(0.05, 200))
    m.handle(TrackChanged((), 200), t + 0.01)
    assert {a.priority for a in adverts(m.handle(Tick(), t + 0.05))} == {254}
    m.handle(TrackChanged((), -254), t + 0.06)
    assert {a.priority for a in adverts(m.handle(Tick(), t + 0.1))} == {1}
    owner = GroupMachine(v3group(0.05, 255))
    owner.handle(TrackChanged((), -100), T0)
    out = owner.handle(Startup(), T0)
    assert owner.state is State.MASTER and {a.priority for a in adverts(out)} == {255}


def test_v3_skew_follows_the_advertised_priority_and_the_masters_interval() -> None:
    b = backup(v3group(1.0, 100))
    b.handle(TrackChanged((), -60), T0)
    # The master advertises every 0.05 s: adopted, and Skew_Time at priority 40 of it.
    b.handle(AdvertReceived(1, HIGH6, 150, 0.05), T0 + 1)
    assert b.instances[1].master_down_at == pytest.approx(T0 + 1 + md(0.05, 40))
    b.handle(AdvertReceived(0, HIGH4, 150, 0.05), T0 + 1.5)
    b.handle(AdvertReceived(0, HIGH4, 0, 0.05), T0 + 2)  # priority 0: Skew_Time only
    assert b.instances[0].master_down_at == pytest.approx(T0 + 2 + (256 - 40) * 0.05 / 256)


def test_v3_fault_check_says_goodbye_on_both_families() -> None:
    m, t = master(v3group(0.1, 150))
    out = m.handle(TrackChanged(("uplink",), 0, "track 'uplink' down: exit 1"), t + 0.05)
    assert out == [SendAdvert(0, 0), SendAdvert(1, 0), SendAdvert(2, 0), RemoveAddresses(),
                   Transition(State.MASTER, State.FAULT, "track 'uplink' down: exit 1")]
    out = m.handle(TrackChanged((), 0, "track 'uplink' up: exit 0"), t + 1)
    assert out == [Transition(State.FAULT, State.BACKUP, "track 'uplink' up: exit 0")]
    # Master_Down at the configured v3 interval, from the (undiminished) priority.
    assert m.instances[1].master_down_at == pytest.approx(t + 1 + md(0.1, 150))


def test_v3_reload_keeps_the_delta_and_takes_the_new_interval() -> None:
    m, t = master(v3group(0.1, 150))
    m.handle(TrackChanged((), -60), t + 0.01)
    assert m.handle(Reconfigure(v3group(0.05, 200)), t + 0.02) == []
    assert m.priority == 140
    assert [(p.priority, p.advert_interval) for p in m.params.instances] == [(140, 0.05)] * 3
    assert m.base is not None and {p.priority for p in m.base.instances} == {200}
    # A version change is still refused with a delta in place.
    v2 = replace(v3group(1, 200), instances=tuple(
        replace(p, version=2, advert_interval=1) for p in v3group(1, 200).instances[::2]))
    with pytest.raises(ValueError):
        m.handle(Reconfigure(v2), t + 0.03)


def test_two_v3_nodes_a_weight_hands_both_families_to_the_preempting_peer() -> None:
    """a (150) is master at 0.1 s; b (100) preempts. a's uplink check drops it to 90: b takes
    over on every instance, IPv4 and IPv6, once its Master_Down passes; back up, a (which
    preempts too) takes the group back."""
    a = Node("a", v3group(0.1, 150, preempt=True, lan4=LOW4, lan6=LOW6, wan=LOW_WAN))
    b = Node("b", v3group(0.1, 100, preempt=True, lan4=HIGH4, lan6=HIGH6, wan=HIGH_WAN))
    net = Network([a, b])
    net.start(a)
    net.start(b)
    net.run_until(3)
    assert net.masters() == [a]
    net._feed(a, TrackChanged((), -60, "track 'wan1' down"))
    changed = net.now
    net.run_until(5)
    assert net.masters() == [b]
    took = next(t for t, _, s in b.history if s is State.MASTER) - changed
    # a's next advert (at most an interval away) at 90 starts b's Master_Down (b preempts).
    assert took <= 0.1 + md(0.1, 100) + 0.01
    sent = [(t, s) for t, s in a.sent if t > changed and s.priority]
    assert sent and {s.priority for _, s in sent} == {90}
    assert {s.index for _, s in sent} == {0, 1, 2}  # IPv4 lan, IPv6 lan, IPv4 wan
    net._feed(a, TrackChanged((), 0, "track 'wan1' up"))
    net.run_until(7)
    assert net.masters() == [a]
    assert all(v.master_address in (LOW4, LOW6, LOW_WAN) for v in b.machine.instances)


# ---- hooks: every address of the group ----------------------------------------------------------


def test_hook_environment_lists_the_v3_ipv6_addresses(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o700)
    text = (V3 + V3_WAN + f'\n[node]\nruntime_dir = "{tmp_path}"\n'
            + f'\n[hooks]\non_master = ["{hook}"]\n')
    cfg = check_system(parse(text, PATH), SYSTEM)

    async def go() -> dict[str, str]:
        d = Daemon(cfg)
        d.machine = GroupMachine(plan.group_params(cfg))
        job = d._hook_job(Transition(State.BACKUP, State.MASTER, "master down"))
        assert job is not None and job.argv == (str(hook),)
        return dict(job.env)

    env = asyncio.run(go())
    assert env["INVICTUSD_VIPS"].split() == ["10.0.0.1/24", "fd00::1/64", "192.0.2.1/24"]
    assert env["INVICTUSD_INTERFACES"] == "lan0 wan0" and env["INVICTUSD_VRIDS"] == "51 52"
    assert env["INVICTUSD_STATE"] == "master"


# ---- configuration: the v3 keys in the error-collecting reader ----------------------------------


def errors(text: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as info:
        parse(text, PATH)
    return [(e.key, e.line, e.message) for e in info.value.errors]


def test_v3_errors_come_with_every_other_error_of_the_file_in_one_run() -> None:
    text = (edit(V3, "advert_interval = 0.1", "advert_interval = 0.015")
            + 'unicast_peer = ["10.0.0.3", "fe80::3"]\n'
            + edit(V3_WAN, "version = 3", "version = 4")
            + '\n[[track]]\ninterface = "wan1"\nweight = 300\n'
            + '\n[metrics]\nlisten = "localhost"\n')
    found = errors(text)
    assert [(k, line) for k, line, _ in found] == [
        ("vrrp[0].advert_interval", line_of(text, "0.015")),
        ("vrrp[0].unicast_peer", line_of(text, "unicast_peer")),
        ("vrrp[1].version", line_of(text, "version = 4")),
        ("track[0].weight", line_of(text, "weight = 300")),
        ("metrics.listen", line_of(text, "localhost")),
    ]
    msgs = [m for _, _, m in found]
    assert "whole number of centiseconds" in msgs[0]
    assert msgs[1] == 'unknown key; did you mean "unicast_peers"?'
    assert "2 or 3" in msgs[2]


def test_every_v3_check_of_one_table_is_reported() -> None:
    text = (edit(V3, "advert_interval = 0.1", "advert_interval = 41")
            + 'unicast_peers = ["10.0.0.3", "fd00::3"]\npriority = 0\nversio = 3\n')
    assert [k for k, _, _ in errors(text)] == [
        "vrrp[0].advert_interval", "vrrp[0].unicast_peers", "vrrp[0].priority",
        "vrrp[0].versio"]
    assert 'did you mean "version"?' in errors(text)[-1][2]


@pytest.mark.parametrize("version", ["4", '"3"', "3.0"])
def test_a_bad_version_is_one_error_not_a_cascade_of_v2_rules(version: str) -> None:
    # With a version nobody wrote, the rules that depend on it (v2: a password, whole
    # seconds, IPv4 peers only) are not applied: the version is the one error.
    text = edit(V3, "version = 3", f"version = {version}") + 'unicast_peers = ["10.0.0.3", "fe80::3"]\n'
    assert [k for k, _, _ in errors(text)] == ["vrrp[0].version"]


def test_v3_rules_of_addresses_and_peers_without_follow_on_errors() -> None:
    # A broken address list is its error; the peers are not also said to lack an IPv6 peer.
    text = edit(V3, '"fd00::1/64"', '"fd00::1"') + 'unicast_peers = ["10.0.0.3"]\n'
    found = errors(text)
    assert [k for k, _, _ in found] == ["vrrp[0].virtual_addresses"]
    assert "needs its prefix" in found[0][2]
    # Under v2 an IPv6-only table and an IPv6 peer are two errors of two keys.
    v2 = (edit(edit(V3, '["10.0.0.1/24", "fd00::1/64"]', '["fd00::1/64"]'),
               "version = 3\nadvert_interval = 0.1\n", 'password = "pw"\nadvert_interval = 0.5\n')
          .replace('real_address = "10.0.0.2"\n', "") + 'unicast_peers = ["fe80::3"]\n')
    assert [k for k, _, _ in errors(v2)] == [
        "vrrp[0].virtual_addresses", "vrrp[0].advert_interval", "vrrp[0].unicast_peers"]


def test_v3_version_disagreement_is_reported_with_other_tables_errors() -> None:
    v2_wan = edit(V3_WAN, "version = 3\nadvert_interval = 0.1\n", 'password = "pw"\n')
    text = V3 + v2_wan + edit(V3_WAN, "virtual_id = 52", "virtual_id = 53").replace(
        "wan0", "wan1").replace("192.0.2.1/24", "192.0.2.300/24")
    found = errors(text)
    assert [k for k, _, _ in found] == ["vrrp[1].version", "vrrp[2].virtual_address"]
    assert "one VRRP version" in found[0][2]


def test_check_system_reports_every_v3_problem() -> None:
    text = (V3 + 'unicast_peers = ["10.0.0.3", "fe80::3"]\n'
            + edit(V3_WAN, "virtual_id = 52", 'virtual_id = 52\nunicast_peers = ["198.51.100.9"]'))
    links = {**SYSTEM, "lan0": replace(LINKS6["lan0"], addresses6=LINKS6["lan0"].addresses6[:1])}
    with pytest.raises(ConfigError) as info:
        check_system(parse(text, PATH), links)
    assert [(e.key, e.line) for e in info.value.errors] == [
        ("vrrp[0].interface", line_of(text, 'interface = "lan0"')),
        ("vrrp[1].unicast_peers", line_of(text, "198.51.100.9")),
    ]
    assert "link-local" in info.value.errors[0].message
    assert "TTL 255" in info.value.errors[1].message
