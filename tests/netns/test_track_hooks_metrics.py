"""Issue 11 with real daemons: health checks move the group, hooks run on the right node
after the addresses are in place, a hanging hook is killed while adverts stay on time, and
the metrics endpoint agrees with ``status --json``.

Checks are ``/usr/bin/test ! -e FLAG`` (an argv, no shell): a test makes a node's check fail
by creating its flag file.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from invictusd.lab.configs import LAN_VRID
from invictusd.lab.topology import LabConfig
from invictusd.vrrp import packet
from tests.netns.daemons import Pair, lab_pair, pcap_frames, wait_for
from tests.netns.test_replication import tables

ROOT = Path(__file__).resolve().parents[2]
SKEW_100 = (256 - 100) / 256
MD_100 = 3 + SKEW_100
MD_120 = 3 + (256 - 120) / 256
MD_150 = 3 + (256 - 150) / 256
MARGIN = 0.5  # scheduling, process start, ARP: what a test allows beyond the computed figure


def check_toml(flag: Path, weight: str, *, name: str = "uplink", interval: float = 1,
               timeout: float = 0.5, fall: int = 2, rise: int = 2) -> str:
    return (f'[[track]]\nname = "{name}"\ncommand = ["/usr/bin/test", "!", "-e", "{flag}"]\n'
            f"interval = {interval}\ntimeout = {timeout}\nfall = {fall}\nrise = {rise}\n"
            f"weight = {weight}\n")


def all_vips(pair: Pair) -> set[str]:
    return {pair.lab.config.lan_vip, pair.lab.config.wan_vip}


def changes(pair: Pair, node: str) -> list[dict[str, Any]]:
    return [e for e in pair.log_events(node) if e.get("event") == "state change"]


# ---- health checks move the group ---------------------------------------------------------


def test_failing_check_moves_the_group_within_fall_x_interval_plus_skew_and_tcp_survives(
    measure: Any,
) -> None:
    with lab_pair() as pair:
        lab = pair.lab
        flag = lab.workdir / "fail-fw1"
        fall, interval = 2, 1.0
        pair.configure("fw1", start_as_master=True, sync=True,
                       extra=check_toml(flag, '"fault"', fall=fall, interval=interval))
        pair.configure("fw2", sync=True, extra=check_toml(lab.workdir / "fail-fw2", '"fault"'))
        pair.start("fw1")
        pair.start("fw2")
        wait_for(lambda: pair.master() == "fw1", 12, what="fw1 master")
        wait_for(lambda: pair.status("fw2")["sync"]["synced"], 10, what="fw2 synced")
        streams = lab.start_streams("tcp", dead_after=8)
        wait_for(lambda: len(tables(pair, "fw2")["peer"]) >= 2, 5, what="flows replicated")
        assert pair.status("fw1")["track"]["checks"][0]["state"] == "up"

        t0 = time.monotonic()
        flag.touch()
        bound = fall * interval + SKEW_100
        wait_for(lambda: pair.vips_on("fw2") == all_vips(pair), bound + 3, step=0.01,
                 what="fw2 to hold every VIP")
        took = time.monotonic() - t0
        measure("failover by a failing check (fall 2 x 1 s + Skew_Time)",
                f"{took:.3f}s (bound {bound:.3f}s)")
        assert took <= bound + MARGIN
        wait_for(lambda: pair.vips_on("fw1") == set(), 2, what="fw1 to release every VIP")
        s = pair.status("fw1")
        assert s["group"]["state"] == "fault" and s["track"]["faults"] == ["uplink"]
        check = s["track"]["checks"][0]
        assert (check["state"], check["last_result"], check["last_detail"]) == (
            "down", "fail", "exit 1")
        # The transition names the check, on both interfaces' log lines.
        to_fault = [e for e in changes(pair, "fw1") if e["new"] == "fault"]
        assert len(to_fault) == 2 and all("'uplink'" in e["reason"] for e in to_fault)

        time.sleep(3)  # the streams run through fw2 on the committed entries
        for name, r in {n: st.stop() for n, st in streams.items()}.items():
            assert r.error is None, f"{name} broke: {r.error} {r.error_detail}"
            assert r.acked >= r.sent - 2, (name, r.acked, r.sent)

        # Healthy again after rise successes: fw1 returns and, preferring mastership, preempts.
        flag.unlink()
        wait_for(lambda: pair.master() == "fw1", 2 * interval + MD_150 + 8, what="fw1 back")


@pytest.mark.parametrize("preempt", [True, False], ids=["preempting", "non-preempting"])
def test_integer_weight_below_the_backup_moves_only_a_preempting_backup(
    preempt: bool, measure: Any,
) -> None:
    with lab_pair() as pair:
        flag = pair.lab.workdir / "fail-fw1"
        pair.configure("fw1", start_as_master=True,  # priority 150, preempt
                       extra=check_toml(flag, "-60", interval=0.5, timeout=0.4, fall=1, rise=1))
        pair.configure("fw2", vrrp_extra={"priority": 120, "preempt": preempt})
        pair.start("fw1")
        pair.start("fw2")
        wait_for(lambda: pair.master() == "fw1", 10, what="fw1 master")
        before = pair.status("fw2")["group"]["transitions"]

        t0 = time.monotonic()
        flag.touch()
        wait_for(lambda: pair.status("fw1")["group"]["priority"] == 90, 2, what="fw1 at 90")
        wait_for(lambda: pair.status("fw2")["vrrp"][0]["master_priority"] == 90, 2,
                 what="fw2 to hear priority 90")
        if preempt:
            wait_for(lambda: pair.master() == "fw2", MD_120 + 0.5 + 3, what="fw2 preempting")
            took = time.monotonic() - t0
            measure("preemption after a weight drop (150 - 60 < 120)", f"{took:.3f}s")
            assert took <= 0.5 + MD_120 + MARGIN  # one check interval + fw2's Master_Down
            assert pair.state("fw1") == "backup"  # lower priority, not a fault
            last = changes(pair, "fw1")[-1]
            assert last["new"] == "backup" and "(ours 90)" in last["reason"]
            assert last["tracks_down"] == ["uplink"]
            prio = [e for e in pair.log_events("fw1") if e.get("event") == "priority changed"]
            assert prio[0]["old"] == 150 and prio[0]["new"] == 90 and prio[0]["check"] == "uplink"
        else:
            time.sleep(MD_120 + 1)  # longer than fw2's Master_Down: it never preempts
            assert pair.master() == "fw1"
            assert pair.status("fw2")["group"]["transitions"] == before
            assert pair.state("fw2") == "backup"

        # The check recovers: fw1 (150, preempting) is master again in both cases.
        flag.unlink()
        wait_for(lambda: pair.status("fw1")["group"]["priority"] == 150, 2, what="fw1 at 150")
        wait_for(lambda: pair.master() == "fw1", MD_150 + 3, what="fw1 master again")


def test_tracked_non_vrrp_interface_down_moves_the_group_to_a_preempting_backup(
    measure: Any,
) -> None:
    with lab_pair() as pair:
        lab = pair.lab

        def make_uplink() -> None:
            # A veth pair inside fw1: taking the far end down takes the carrier of uplink9.
            lab.exec("fw1", "ip", "link", "add", "uplink9", "type", "veth", "peer", "name", "far9")
            lab.exec("fw1", "ip", "link", "set", "far9", "up")
            lab.exec("fw1", "ip", "link", "set", "uplink9", "up")

        def detail() -> str:
            return str(pair.status("fw1")["track"]["checks"][0]["last_detail"])

        make_uplink()
        pair.configure("fw1", start_as_master=True,
                       extra='[[track]]\ninterface = "uplink9"\nweight = -60\n')
        pair.configure("fw2", vrrp_extra={"priority": 120, "preempt": True})
        pair.start("fw1")
        pair.start("fw2")
        wait_for(lambda: pair.master() == "fw1", 10, what="fw1 master")
        check = pair.status("fw1")["track"]["checks"][0]
        assert (check["name"], check["kind"], check["state"]) == ("uplink9", "interface", "up")

        t0 = time.monotonic()
        lab.exec("fw1", "ip", "link", "set", "far9", "down")  # carrier lost, admin still up
        wait_for(lambda: pair.master() == "fw2", MD_120 + 3, what="fw2 preempting")
        took = time.monotonic() - t0
        measure("preemption after a tracked interface lost carrier", f"{took:.3f}s")
        assert took <= MD_120 + MARGIN
        s = pair.status("fw1")
        assert s["group"]["priority"] == 90 and s["group"]["state"] == "backup"
        assert detail() == "carrier or admin state down"

        # Carrier back, then admin down: the check is down again either way.
        lab.exec("fw1", "ip", "link", "set", "far9", "up")
        wait_for(lambda: pair.status("fw1")["group"]["priority"] == 150, 2, what="fw1 at 150")
        lab.exec("fw1", "ip", "link", "set", "uplink9", "down")
        wait_for(lambda: pair.status("fw1")["group"]["priority"] == 90, 2, what="admin down seen")
        # Deleted, it stays down; created again and up, fw1 (150) preempts back.
        lab.exec("fw1", "ip", "link", "del", "uplink9")
        wait_for(lambda: detail() == "no such interface", 2, what="deleted interface seen")
        make_uplink()
        wait_for(lambda: pair.status("fw1")["group"]["priority"] == 150, 2, what="fw1 at 150")
        wait_for(lambda: pair.master() == "fw1", MD_150 + 3, what="fw1 master again")


# ---- hooks ---------------------------------------------------------------------------------

HOOK_SCRIPT = """#!/bin/sh
# Records what a hook sees: its start time, its environment, its arguments, the addresses.
started=$(date +%s.%N)
out="{dir}/hook-$1-$INVICTUSD_TRANSITION-$INVICTUSD_STATE.txt"
{{ echo "STARTED=$started"; env | grep '^INVICTUSD_' | sort; echo "ARGV=$*"; ip -o addr show; }} \\
    > "$out.tmp"
mv "$out.tmp" "$out"
echo "hook $INVICTUSD_STATE on $1"
[ "$INVICTUSD_STATE" = backup ] && exit 3
exit 0
"""


def _hook_records(workdir: Path, node: str) -> list[dict[str, Any]]:
    out = []
    for path in workdir.glob(f"hook-{node}-*.txt"):
        text = path.read_text()
        env = dict(line.split("=", 1) for line in text.splitlines()
                   if line.startswith(("INVICTUSD_", "STARTED=", "ARGV=")))
        env["ADDRESSES"] = text
        out.append(env)
    return sorted(out, key=lambda e: int(e["INVICTUSD_TRANSITION"]))


def _has_vip(record: dict[str, Any], vip: str) -> bool:
    return re.search(rf"inet {re.escape(vip)}/", record["ADDRESSES"]) is not None


def test_hooks_run_on_the_right_node_in_order_with_the_environment_after_the_addresses(
    measure: Any,
) -> None:
    with lab_pair() as pair:
        lab, c = pair.lab, pair.lab.config
        script = lab.write_file("hook.sh", HOOK_SCRIPT.format(dir=lab.workdir))
        script.chmod(0o755)

        def hooks(node: str) -> str:
            argv = json.dumps([str(script), node])
            return (f"[hooks]\non_master = {argv}\non_backup = {argv}\non_stop = {argv}\n"
                    "timeout = 5\n")

        pair.configure("fw1", start_as_master=True, extra=hooks("fw1"))
        pair.configure("fw2", extra=hooks("fw2"))
        pair.start("fw1")
        pair.start("fw2")
        wait_for(lambda: pair.master() == "fw1", 10, what="fw1 master")
        wait_for(lambda: len(_hook_records(lab.workdir, "fw1")) == 2
                 and len(_hook_records(lab.workdir, "fw2")) == 1, 5, what="first hooks")
        backup1, master1 = _hook_records(lab.workdir, "fw1")
        (backup2,) = _hook_records(lab.workdir, "fw2")
        vips = f"{c.lan_vip}/{c.prefix4} {c.wan_vip}/{c.prefix4}"
        assert {k: v for k, v in master1.items() if k not in ("ADDRESSES", "STARTED")} | {
            "INVICTUSD_REASON": "", "INVICTUSD_TRANSITION_TIME": ""} == {
            "INVICTUSD_HOOK": "on_master", "INVICTUSD_STATE": "master",
            "INVICTUSD_OLD_STATE": "backup", "INVICTUSD_NODE": "fw1", "INVICTUSD_VIPS": vips,
            "INVICTUSD_INTERFACES": f"{c.lan_if} {c.wan_if}", "INVICTUSD_VRIDS": "51 52",
            "INVICTUSD_PRIORITY": "150", "INVICTUSD_TRACK_DOWN": "", "INVICTUSD_TRANSITION": "2",
            "INVICTUSD_REASON": "", "INVICTUSD_TRANSITION_TIME": "", "ARGV": "fw1",
        }
        assert master1["INVICTUSD_REASON"].startswith("master down on")
        # on_master ran with both virtual addresses already on fw1's interfaces.
        assert _has_vip(master1, c.lan_vip) and _has_vip(master1, c.wan_vip)
        assert backup1["INVICTUSD_STATE"] == "backup" and backup1["INVICTUSD_OLD_STATE"] == "init"
        assert backup2["INVICTUSD_NODE"] == "fw2" and not _has_vip(backup2, c.lan_vip)
        assert float(backup1["STARTED"]) < float(master1["STARTED"])
        # The backup hook exits 3: counted and logged, and it changed nothing.
        h = pair.status("fw1")["hooks"]
        assert (h["on_backup"]["runs"], h["on_backup"]["failures"],
                h["on_backup"]["last_exit_code"]) == (1, 1, 3)
        assert (h["on_master"]["runs"], h["on_master"]["failures"]) == (1, 0)
        assert pair.state("fw1") == "master"
        logged = [e for e in pair.log_events("fw1") if e.get("event") == "hook output"]
        assert [e["line"] for e in logged] == ["hook backup on fw1", "hook master on fw1"]

        # fw1 stops: on_stop on fw1, on_master on fw2, each after its own addresses moved.
        pair.stop("fw1")
        wait_for(lambda: len(_hook_records(lab.workdir, "fw2")) == 2, 5, what="fw2 on_master")
        master2 = _hook_records(lab.workdir, "fw2")[1]
        stop1 = _hook_records(lab.workdir, "fw1")[2]
        assert master2["INVICTUSD_STATE"] == "master" and master2["INVICTUSD_NODE"] == "fw2"
        assert _has_vip(master2, c.lan_vip) and _has_vip(master2, c.wan_vip)
        assert "left with priority 0" in master2["INVICTUSD_REASON"]
        assert stop1["INVICTUSD_STATE"] == "stop" and stop1["INVICTUSD_OLD_STATE"] == "master"
        assert not _has_vip(stop1, c.lan_vip) and not _has_vip(stop1, c.wan_vip)
        delay = float(master2["STARTED"]) - float(master2["INVICTUSD_TRANSITION_TIME"])
        status_delay = pair.status("fw2")["hooks"]["on_master"]["last_delay_ms"]
        measure("on_master hook start after the transition (addresses, GARP, spawn)",
                f"{delay * 1000:.1f} ms (daemon: {status_delay} ms to spawn)")
        assert 0 < delay < 1.0


def test_a_hanging_hook_is_killed_and_adverts_stay_on_time(measure: Any) -> None:
    with lab_pair() as pair:
        lab, c = pair.lab, pair.lab.config
        marker = f"1000.{random.randint(10**6, 10**7)}"  # sleep's argument: unique to this run
        hang = json.dumps(["/bin/sh", "-c", f"trap '' TERM; echo hanging; sleep {marker}"])
        pair.configure("fw1", extra=f"[hooks]\non_master = {hang}\ntimeout = 2\n")
        with lab.start_capture("client", c.host_if, "proto 112") as cap:
            pair.start("fw1")
            wait_for(lambda: pair.state("fw1") == "master", MD_100 + 2, what="fw1 master")
            wait_for(lambda: pair.status("fw1")["hooks"]["on_master"]["timeouts"] == 1, 4,
                     what="the hook killed at its timeout")
            # The capture loses its last second or so (libpcap hands packets over in batches
            # and tcpdump drops the pending one at SIGINT; measured): keep capturing well past
            # the hang so that every advert sent during it is written.
            time.sleep(2.5)
        adverts = [t for t, frame in pcap_frames(cap.path)
                   if len(frame) >= 34 and frame[23] == 112
                   and ".".join(map(str, frame[26:30])) == c.fw_lan_ips[0]]
        gaps = [b - a for a, b in itertools.pairwise(adverts)]
        measure("advert gaps while a hook hung (interval 1 s)",
                f"max {max(gaps):.3f}s over {len(gaps)}")
        assert len(adverts) >= 4  # the first one, those during the 2 s hang, one after it
        assert all(0.75 < g < 1.25 for g in gaps), gaps
        h = pair.status("fw1")["hooks"]["on_master"]
        assert h["last_result"].startswith("timed out after 2.")
        assert 2.0 <= h["last_duration_ms"] / 1000 < 2.5
        assert h["last_output"] == "hanging"
        assert pair.state("fw1") == "master"
        # The whole process group died: no sleep is left behind.
        left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
        assert left.stdout == "", left.stdout
        killed = [e for e in pair.log_events("fw1") if e.get("event") == "hook killed at its timeout"]
        assert len(killed) == 1 and killed[0]["hook"] == "on_master"
        assert pair.status("fw1")["loop"]["stalls"] == 0


# ---- metrics -------------------------------------------------------------------------------

SCRAPE = """
import json, sys, time, urllib.request
t = time.monotonic()
with urllib.request.urlopen("http://127.0.0.1:9842/metrics", timeout=5) as r:
    body = r.read().decode()
    kind = r.headers.get("Content-Type")
print(json.dumps({"seconds": time.monotonic() - t, "text": body, "content_type": kind}))
"""


def documented_metrics() -> tuple[set[str], set[str]]:
    """(every name in the README's table, those served only once they have a value)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- metrics:start -->")[1].split("<!-- metrics:end -->")[0]
    names, conditional = set(), set()
    for row in block.splitlines():
        found = set(re.findall(r"`(invictusd_[a-z_]+)`", row))
        names |= found
        if "(once there is one)" in row:
            conditional |= found
    return names, conditional


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return got[(name, tuple(sorted(labels.items())))]


def test_metrics_endpoint_serves_the_documented_names_with_status_values(measure: Any) -> None:
    with lab_pair() as pair:
        lab = pair.lab
        extra = ('[[track]]\ninterface = "sync0"\nweight = -20\n'
                 + '[[track]]\ninterface = "absent0"\nweight = -10\n'  # down: 150 - 10
                 + check_toml(lab.workdir / "never", '"fault"', name="always-ok")
                 + '[metrics]\nlisten = "127.0.0.1:9842"\n')
        pair.configure("fw1", start_as_master=True, sync=True, extra=extra)
        pair.configure("fw2", sync=True, extra=extra)
        pair.start("fw1")
        pair.start("fw2")
        wait_for(lambda: pair.master() == "fw1", 12, what="fw1 master")
        wait_for(lambda: pair.status("fw1")["sync"]["synced"], 10, what="fw1 synced")

        before = pair.status("fw1")
        scrape = json.loads(lab.exec("fw1", sys.executable, "-c", SCRAPE))
        after = pair.status("fw1")
        measure("metrics scrape (HTTP, in the namespace)", f"{scrape['seconds'] * 1000:.1f} ms, "
                f"{len(scrape['text'])} bytes")
        assert scrape["seconds"] < 1.0
        assert scrape["content_type"].startswith("text/plain")
        got = samples(scrape["text"])

        # Every documented name is served and every served name is documented.
        served = {name for name, _ in got}
        documented, conditional = documented_metrics()
        assert served <= documented, served - documented
        assert documented - served <= conditional, documented - served - conditional

        # Values: exact for what cannot move between two status calls, bounded for counters.
        for v_b, v_a in zip(before["vrrp"], after["vrrp"], strict=True):
            lv = {"interface": v_b["interface"], "vrid": str(v_b["virtual_id"]),
                  "family": str(v_b["family"])}
            assert value(got, "invictusd_vrrp_state", state="master", **lv) == 1
            assert value(got, "invictusd_vrrp_master", **lv) == 1
            assert value(got, "invictusd_vrrp_priority", **lv) == v_a["priority"] == 140
            assert value(got, "invictusd_vrrp_link_up", **lv) == 1
            assert value(got, "invictusd_vrrp_info", version=str(v_a["version"]), **lv) == 1
            assert (value(got, "invictusd_vrrp_master_down_interval_seconds", **lv)
                    == v_a["master_down_interval"])
            for key in ("adverts_sent", "adverts_received", "transitions", "garp_sent"):
                x = value(got, f"invictusd_vrrp_{key}_total", **lv)
                assert v_b["counters"][key] <= x <= v_a["counters"][key], key
        g = after["group"]
        assert value(got, "invictusd_group_state", state="master") == 1
        assert value(got, "invictusd_group_state", state="backup") == 0
        assert value(got, "invictusd_group_priority") == g["priority"] == 140
        assert value(got, "invictusd_group_base_priority") == g["base_priority"] == 150
        assert value(got, "invictusd_group_transitions_total") == g["transitions"]
        assert value(got, "invictusd_track_priority_delta") == after["track"]["priority_delta"]
        states = {c["name"]: c["state"] for c in after["track"]["checks"]}
        assert states == {"sync0": "up", "absent0": "down", "always-ok": "up"}
        for name, state in states.items():
            assert value(got, "invictusd_track_up", check=name) == (state == "up")
            assert value(got, "invictusd_track_state", check=name, state=state) == 1
        s_b, s_a = before["sync"], after["sync"]
        assert value(got, "invictusd_sync_synced") == 1
        assert value(got, "invictusd_sync_local_entries") == s_a["local_entries"]
        assert (s_b["counters"]["tx_bytes"] <= value(got, "invictusd_sync_tx_bytes_total")
                <= s_a["counters"]["tx_bytes"])
        assert (s_b["resends"] <= value(got, "invictusd_sync_resends_total") <= s_a["resends"])
        assert value(got, "invictusd_hook_runs_total", hook="on_master") == 0
        assert value(got, "invictusd_loop_stalls_total") == after["loop"]["stalls"]

        # `invictusd metrics` gives the same over the control socket.
        out = lab.exec("fw1", sys.executable, "-m", "invictusd", "metrics", "--config",
                       str(pair.configs["fw1"]))
        assert {name for name, _ in samples(out)} == served

        # The running daemon holds the port: check --system knows it is its own.
        ok = lab.exec("fw1", sys.executable, "-m", "invictusd", "check", "--system", "--config",
                      str(pair.configs["fw1"]), check=False)
        assert "OK" in ok, ok


def test_metrics_listen_address_that_cannot_be_bound_is_refused_naming_the_key() -> None:
    with lab_pair() as pair:
        path = pair.configure("fw1", extra='[metrics]\nlisten = "10.99.0.1:9842"\n')
        check = pair.lab.python("fw1", "-m", "invictusd", "check", "--system", "--config",
                                str(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = check.communicate(timeout=30)
        assert check.returncode == 2, err
        assert "metrics.listen: cannot listen on 10.99.0.1:9842" in err
        pair.start("fw1", wait_ready=False)
        assert pair.procs["fw1"].wait(15) == 2
        refused = [e for e in pair.log_events("fw1") if e.get("event") == "cannot start"]
        assert "metrics.listen" in refused[0]["error"]
        assert pair.vips_on("fw1") == set()


def test_sigterm_runs_on_stop_before_exit_and_stop_is_prompt() -> None:
    with lab_pair() as pair:
        lab = pair.lab
        done = lab.workdir / "stopped"
        stop = json.dumps(["/bin/sh", "-c", f"sleep 0.3; touch {done}"])
        pair.configure("fw1", extra=f"[hooks]\non_stop = {stop}\n")
        pair.start("fw1")
        wait_for(lambda: pair.state("fw1") == "master", MD_100 + 2, what="fw1 master")
        pair.signal("fw1", signal.SIGTERM)
        assert pair.procs["fw1"].wait(10) == 0
        assert done.exists()  # the daemon waited for its on_stop hook


def test_advert_priority_on_the_wire_follows_the_weight() -> None:
    with lab_pair() as pair:
        lab, c = pair.lab, pair.lab.config
        flag = lab.workdir / "fail-fw1"
        flag.touch()
        pair.configure("fw1", extra=check_toml(flag, "-99", interval=0.5, timeout=0.4, fall=1,
                                                rise=1))
        pair.start("fw1")
        wait_for(lambda: pair.state("fw1") == "master", MD_100 + 2, what="fw1 master")
        path = lab.capture_for("client", c.host_if, 3.5, "proto 112")  # its last ~1 s is lost
        prios = {packet.decode_ip(frame[14:])[2].priority for _, frame in pcap_frames(path)
                 if len(frame) > 34 and frame[23] == 112}
        assert prios == {1}  # 100 - 99


# ---- under VRRPv3 (issue 10) -------------------------------------------------------------------


def test_v3_weight_moves_both_families_hooks_list_ipv6_and_metrics_keep_families_apart(
    measure: Any,
) -> None:
    """VRRPv3 at 0.1 s with IPv4 and IPv6 addresses: a tracked interface losing carrier lowers
    what fw1 advertises on its IPv4 and its IPv6 instances alike (seen on the wire), the
    preempting fw2 takes every address of both families, its on_master hook finds them in
    INVICTUSD_VIPS and on the interfaces, and the metrics keep a VRID's two instances apart."""
    from tests.netns.test_vrrp_v3 import adverts_on_wire, md, sole_holder

    with lab_pair(LabConfig(ipv6=True)) as pair:
        lab, c = pair.lab, pair.lab.config
        script = lab.write_file("hook.sh", HOOK_SCRIPT.format(dir=lab.workdir))
        script.chmod(0o755)
        lab.exec("fw1", "ip", "link", "add", "uplink9", "type", "veth", "peer", "name", "far9")
        lab.exec("fw1", "ip", "link", "set", "far9", "up")
        lab.exec("fw1", "ip", "link", "set", "uplink9", "up")
        v3 = {"version": 3, "advert_interval": 0.1}
        pair.configure("fw1", start_as_master=True, password=None, vrrp_extra=v3,
                       extra='[[track]]\ninterface = "uplink9"\nweight = -60\n')
        pair.configure("fw2", password=None, vrrp_extra={**v3, "priority": 120, "preempt": True},
                       extra=f"[hooks]\non_master = {json.dumps([str(script), 'fw2'])}\n")
        pair.start("fw1")
        pair.start("fw2")
        wait_for(lambda: sole_holder(lab) == "fw1", 5, what="fw1 holding every VIP, v4 and v6")
        ll1 = lab.link_local("fw1", c.lan_if)
        cap = lab.start_capture("fw2", c.lan_if, "ip proto 112 or ip6 proto 112")
        time.sleep(0.5)

        t0 = time.monotonic()
        lab.exec("fw1", "ip", "link", "set", "far9", "down")
        wait_for(lambda: sole_holder(lab) == "fw2", 3, step=0.01, what="fw2 holding every VIP")
        took = time.monotonic() - t0
        measure("v3 0.1 s: preemption after a tracked interface lost carrier (150 - 60 < 120)",
                f"{took:.3f}s (fw2's Master_Down {md(0.1, 120):.3f}s)")
        assert took <= md(0.1, 120) + MARGIN
        s1 = pair.status("fw1")
        assert (s1["group"]["state"], s1["group"]["priority"], s1["group"]["base_priority"]) == (
            "backup", 90, 150)
        assert [(v["family"], v["priority"]) for v in s1["vrrp"]] == [
            (4, 90), (6, 90), (4, 90), (6, 90)]
        time.sleep(1.5)  # tcpdump hands packets over in blocks
        seen = adverts_on_wire(cap.stop())
        for source in (c.fw_lan_ips[0], ll1):  # fw1's IPv4 and IPv6 instances on the LAN
            prios = [p for _, src, p in seen if src == source]
            assert prios[0] == 150 and 90 in prios, (source, prios)
            # 150 until the carrier went, then 90 (and at most a goodbye, never 150 again).
            assert set(prios[prios.index(90):]) <= {90}, (source, prios)

        # fw2's on_master hook: every address of both families, in its environment and in place.
        wait_for(lambda: _hook_records(lab.workdir, "fw2"), 5, what="fw2's on_master hook")
        record = _hook_records(lab.workdir, "fw2")[-1]
        assert record["INVICTUSD_STATE"] == "master"
        assert record["INVICTUSD_VIPS"].split() == [
            f"{c.lan_vip}/{c.prefix4}", f"{c.lan_vip6}/{c.prefix6}",
            f"{c.wan_vip}/{c.prefix4}", f"{c.wan_vip6}/{c.prefix6}"]
        for vip in (c.lan_vip6, c.wan_vip6):
            assert re.search(rf"inet6 {re.escape(vip)}/", record["ADDRESSES"]), vip

        # Metrics: the IPv4 and IPv6 instances of the LAN VRID are two series each.
        got = samples(lab.exec("fw2", sys.executable, "-m", "invictusd", "metrics", "--config",
                               str(pair.configs["fw2"])))
        lan = {"interface": c.lan_if, "vrid": str(LAN_VRID)}
        for family in ("4", "6"):
            assert value(got, "invictusd_vrrp_master", family=family, **lan) == 1
            assert value(got, "invictusd_vrrp_info", family=family, version="3", **lan) == 1
            assert value(got, "invictusd_vrrp_master_advert_interval_seconds", family=family,
                         **lan) == 0.1
        got1 = samples(lab.exec("fw1", sys.executable, "-m", "invictusd", "metrics", "--config",
                                str(pair.configs["fw1"])))
        assert value(got1, "invictusd_vrrp_priority", family="6", **lan) == 90
        assert value(got1, "invictusd_group_base_priority") == 150
