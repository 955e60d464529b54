"""The real daemon in the namespace lab: election, failover, signals, hostile adverts.

Every test builds client -- LAN -- fw1/fw2 -- WAN -- server, runs real invictusd processes
in fw1 and fw2, and removes everything afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from invictusd.lab.configs import LAN_VRID, PASSWORD, WAN_VRID
from invictusd.vrrp import packet
from tests.netns.daemons import Pair, lab_pair, wait_for

# RFC 3768: Master_Down_Interval = 3 * Advert_Interval + (256 - priority) / 256
MD_100 = 3 + (256 - 100) / 256  # 3.609 s
SKEW_100 = (256 - 100) / 256  # 0.609 s
MARGIN = 0.5  # scheduling, process start, ARP: what a test allows beyond the RFC figure


def _fw1_preferred_master(pair: Pair) -> None:
    """fw1 with start_as_master, fw2 default; both running, fw1 holding every VIP."""
    pair.configure("fw1", start_as_master=True)
    pair.start("fw1")
    pair.start("fw2")
    wait_for(lambda: pair.master() == "fw1", 8, what="fw1 master")


def _one_master(pair: Pair, timeout: float = MD_100 + 3) -> str:
    node = wait_for(pair.master, timeout, what="exactly one node holding every VIP")
    other = "fw2" if node == "fw1" else "fw1"
    wait_for(lambda: pair.state(node) == "master" and pair.state(other) == "backup", 3,
             what="states to agree")
    return str(node)


def _takeover_time(pair: Pair, new_master: str, action: object, timeout: float = 8) -> float:
    """Seconds from ``action()`` until ``new_master`` holds every VIP."""
    t0 = time.monotonic()
    action()  # type: ignore[operator]
    wait_for(lambda: pair.vips_on(new_master) == {pair.lab.config.lan_vip, pair.lab.config.wan_vip},
             timeout, step=0.01, what=f"{new_master} to hold the VIPs")
    return time.monotonic() - t0


def test_election_without_start_as_master_gives_one_master_and_no_preemption() -> None:
    with lab_pair() as pair:
        pair.start("fw1")
        pair.start("fw2")
        master = _one_master(pair)
        backup = "fw2" if master == "fw1" else "fw1"
        s = pair.status(backup)
        # The backup knows who the master is, on both interfaces of the group.
        master_ips = {v["master_address"] for v in s["vrrp"]}
        c = pair.lab.config
        i = 0 if master == "fw1" else 1
        assert master_ips == {c.fw_lan_ips[i], c.fw_wan_ips[i]}
        assert pair.lab.ping("client", c.lan_vip)
        assert pair.lab.ping("client", c.server_ip)
        # Restarting the backup does not move anything (no preemption by default).
        pair.stop(backup)
        pair.start(backup)
        time.sleep(MD_100 + 0.5)
        assert pair.master() == master
        assert pair.status(master)["group"]["transitions"] == 2  # init->backup->master


def test_start_as_master_wins_and_preempts_on_return(measure: object) -> None:
    with lab_pair() as pair:
        pair.configure("fw1", start_as_master=True)
        pair.start("fw2")
        wait_for(lambda: pair.master() == "fw2", MD_100 + 2, what="fw2 master while alone")
        pair.start("fw1")
        # fw1 has priority 150 and preempts fw2 (priority 100) after its Master_Down.
        wait_for(lambda: pair.master() == "fw1", 3 + (256 - 150) / 256 + 3, what="fw1 preempting")
        assert pair.state("fw2") == "backup"
        # Kill it, then bring it back: it takes the addresses back.
        pair.kill("fw1")
        wait_for(lambda: pair.master() == "fw2", MD_100 + 2, what="fw2 taking over")
        pair.start("fw1")
        wait_for(lambda: pair.master() == "fw1", 3 + 2 + 3, what="fw1 preempting again")


def test_sigkill_of_master_fails_over_within_master_down(measure: object) -> None:
    with lab_pair() as pair:
        _fw1_preferred_master(pair)
        c = pair.lab.config
        assert pair.lab.ping("client", c.lan_vip)
        assert pair.lab.arp_entry("client", c.lan_vip) == pair.lab.mac("fw1", c.lan_if)
        took = _takeover_time(pair, "fw2", lambda: pair.kill("fw1", cleanup=False))
        measure("failover SIGKILL (VIPs on fw2)", f"{took:.3f}s (RFC bound {MD_100:.3f}s)")  # type: ignore[operator]
        assert took <= MD_100 + MARGIN
        # The client's gateway works again and its ARP entry points at fw2.
        wait_for(lambda: pair.lab.ping("client", c.lan_vip, timeout=1), 5, what="gateway ping")
        wait_for(lambda: pair.lab.arp_entry("client", c.lan_vip) == pair.lab.mac("fw2", c.lan_if),
                 3, what="client ARP entry pointing at fw2")
        assert pair.lab.ping("client", c.server_ip)
        # SIGKILL left fw1's addresses behind; a restart removes them before anything else.
        assert pair.vips_on("fw1")
        pair.start("fw1")
        wait_for(lambda: pair.master() == "fw1", 8, what="fw1 back as master")


def test_sigterm_hands_over_in_skew_time_and_removes_addresses(measure: object) -> None:
    with lab_pair() as pair:
        pair.start("fw1")
        time.sleep(0.3)
        pair.start("fw2")
        master = _one_master(pair)
        backup = "fw2" if master == "fw1" else "fw1"
        took = _takeover_time(pair, backup, lambda: pair.signal(master, signal.SIGTERM))
        measure("failover SIGTERM (priority 0)", f"{took:.3f}s (Skew_Time {SKEW_100:.3f}s)")  # type: ignore[operator]
        assert took <= SKEW_100 + MARGIN
        assert pair.procs[master].wait(10) == 0
        assert pair.vips_on(master) == set()
        events = pair.log_events(master)
        assert any(e.get("event") == "stopped" for e in events)


def test_link_down_on_one_interface_moves_the_whole_group(measure: object) -> None:
    with lab_pair() as pair:
        _fw1_preferred_master(pair)
        c = pair.lab.config
        took = _takeover_time(pair, "fw2", lambda: pair.lab.link_set("fw1", c.wan_if, False))
        measure("failover link down (WAN of master)", f"{took:.3f}s (Skew_Time {SKEW_100:.3f}s)")  # type: ignore[operator]
        # Going to FAULT sends priority 0 on the live LAN; the WAN peer times out with
        # Master_Down. The group moves on whichever comes first.
        assert took <= MD_100 + MARGIN
        wait_for(lambda: pair.vips_on("fw1") == set(), 3, what="fw1 to drop the LAN VIP too")
        assert pair.state("fw1") == "fault"
        assert pair.lab.ping("client", c.server_ip)
        # Link back: fw1 returns and, preferring mastership, preempts.
        pair.lab.link_set("fw1", c.wan_if, True)
        wait_for(lambda: pair.master() == "fw1", 8, what="fw1 back after link up")


def test_sigusr1_steps_down_and_stays_backup() -> None:
    with lab_pair() as pair:
        _fw1_preferred_master(pair)
        pair.signal("fw1", signal.SIGUSR1)
        wait_for(lambda: pair.master() == "fw2", 2, what="fw2 master after step-down")
        time.sleep(3 + 1)  # longer than fw1's Master_Down: it must not preempt back
        assert pair.master() == "fw2"
        assert pair.status("fw1")["group"]["stepped_down"] is True
        # Told otherwise (resume), it preempts again.
        from invictusd import control
        from invictusd.lab.configs import control_socket

        assert control.request(control_socket(pair.lab, "fw1"), "resume")["ok"]
        wait_for(lambda: pair.master() == "fw1", 6, what="fw1 master after resume")


def test_sighup_reload_changes_priority_without_reelection_and_rejects_bad_files() -> None:
    with lab_pair() as pair:
        _fw1_preferred_master(pair)
        before = {n: pair.status(n)["group"]["transitions"] for n in ("fw1", "fw2")}
        pair.configure("fw1", start_as_master=True, vrrp_extra={"priority": 200})
        pair.signal("fw1", signal.SIGHUP)
        wait_for(lambda: pair.status("fw1")["vrrp"][0]["priority"] == 200, 3, what="new priority")
        # The backup's view of the master's priority follows from the next adverts.
        wait_for(lambda: pair.status("fw2")["vrrp"][0]["master_priority"] == 200, 3,
                 what="fw2 to see priority 200")
        # Raise the backup above the master and reload it: fw2 does not preempt, so nothing
        # moves.
        pair.configure("fw2", vrrp_extra={"priority": 250})
        pair.signal("fw2", signal.SIGHUP)
        time.sleep(4.5)
        assert pair.master() == "fw1"
        after = {n: pair.status(n)["group"]["transitions"] for n in ("fw1", "fw2")}
        assert after == before
        # A broken file is refused and the running configuration stays.
        pair.configs["fw1"].write_text("bogus_key = 1\n" + pair.configs["fw1"].read_text())
        pair.signal("fw1", signal.SIGHUP)
        wait_for(lambda: any(e.get("event", "").startswith("reload refused")
                             for e in pair.log_events("fw1")), 3, what="reload refused log")
        refused = [e for e in pair.log_events("fw1") if e.get("event", "").startswith("reload refused")]
        assert "bogus_key" in refused[-1]["error"]
        assert pair.status("fw1")["vrrp"][0]["priority"] == 200
        assert pair.master() == "fw1"


def _forge(lab: object, payload: bytes, ttl: int = 255, count: int = 5) -> None:
    """Send VRRP packets from the client namespace onto the LAN."""
    code = (
        "import socket,sys,time\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_RAW,112)\n"
        f"s.setsockopt(socket.IPPROTO_IP,socket.IP_MULTICAST_TTL,{ttl})\n"
        f"p=bytes.fromhex('{payload.hex()}')\n"
        f"for _ in range({count}):\n"
        "    s.sendto(p,('224.0.0.18',0)); time.sleep(0.01)\n"
    )
    lab.exec("client", "python3", "-c", code)  # type: ignore[attr-defined]


def test_forged_adverts_are_dropped_and_counted_by_reason() -> None:
    with lab_pair() as pair:
        _fw1_preferred_master(pair)
        c = pair.lab.config
        vip = packet.Advertisement
        import ipaddress

        addrs = (ipaddress.IPv4Address(c.lan_vip),)
        cases = {
            "auth_fail": packet.encode(vip(LAN_VRID, 254, addrs, auth_data=b"xyzzy42")),
            "vrid": packet.encode(vip(99, 254, addrs, auth_data=PASSWORD.encode())),
            "interval": packet.encode(vip(LAN_VRID, 254, addrs, advert_interval=2,
                                          auth_data=PASSWORD.encode())),
            "addresses": packet.encode(vip(LAN_VRID, 254, (ipaddress.IPv4Address("10.10.0.99"),),
                                           auth_data=PASSWORD.encode())),
            "checksum": bytes([*packet.encode(vip(LAN_VRID, 254, addrs,
                                                  auth_data=PASSWORD.encode()))[:6], 0, 0,
                               *packet.encode(vip(LAN_VRID, 254, addrs,
                                                  auth_data=PASSWORD.encode()))[8:]]),
            "truncated": b"\x21\x33",
        }
        for payload in cases.values():
            _forge(pair.lab, payload)
        # A perfect advert but with TTL 1: the only anti-spoofing check VRRPv2 has.
        _forge(pair.lab, packet.encode(vip(LAN_VRID, 254, addrs, auth_data=PASSWORD.encode())),
               ttl=1)

        def counted() -> bool:
            return all(
                all(pair.status(n)["vrrp"][0]["counters"]["drops"].get(r, 0) >= 5
                    for r in [*cases, "ttl"])
                for n in ("fw1", "fw2")
            )

        wait_for(counted, 5, what="every forged advert counted under its reason")
        time.sleep(MD_100)
        assert pair.master() == "fw1"
        assert pair.status("fw1")["group"]["transitions"] == 2
        # Logging is rate-limited: five packets of one reason make one line, not five.
        lines = [e for e in pair.log_events("fw1") if e.get("event") == "advert dropped"
                 and e.get("reason") == "auth_fail"]
        assert len(lines) == 1
        assert PASSWORD not in pair.log("fw1") and "xyzzy42" not in pair.log("fw1")


def test_tcpdump_decodes_our_adverts_cleanly() -> None:
    with lab_pair() as pair:
        pair.start("fw1")
        wait_for(lambda: pair.state("fw1") == "master", MD_100 + 2, what="fw1 master")
        c = pair.lab.config
        out = pair.lab.exec("client", "timeout", "5", "tcpdump", "-vv", "-n", "-c", "3", "-i",
                            c.host_if, "proto", "112", timeout=10)
        lines = [line for line in out.splitlines() if "VRRPv2" in line]
        assert len(lines) == 3, out
        for line in lines:
            assert f"vrid {LAN_VRID}, prio 100, authtype simple, intvl 1s, length 20" in line, line
            assert f"addrs: {c.lan_vip}" in line
        assert "bad" not in out.lower() and "[|vrrp]" not in out
        assert "ttl 255" in out
        tshark = pair.lab.exec("client", "timeout", "5", "tshark", "-c", "2", "-i", c.host_if,
                               "-f", "proto 112", "-V", "-o", "vrrp.v3_checksum_as_in_v2:TRUE",
                               timeout=15, check=False)
        if "Virtual Router Redundancy Protocol" in tshark:
            assert "[correct]" in tshark.lower() or "good" in tshark.lower() or \
                "Checksum Status: Good" in tshark, tshark


def _keepalived_conf(lab: object, priority: int, state: str = "BACKUP") -> str:
    c = lab.config  # type: ignore[attr-defined]
    return f"""
global_defs {{
    router_id kafw2
    enable_script_security
    vrrp_garp_master_delay 1
}}
vrrp_instance LAN {{
    state {state}
    interface {c.lan_if}
    virtual_router_id {LAN_VRID}
    priority {priority}
    advert_int 1
    authentication {{
        auth_type PASS
        auth_pass {PASSWORD}
    }}
    virtual_ipaddress {{
        {c.lan_vip}/{c.prefix4}
    }}
}}
"""


def _start_keepalived(pair: Pair, priority: int) -> subprocess.Popen[bytes]:
    lab = pair.lab
    conf = lab.write_file("keepalived.conf", _keepalived_conf(lab, priority))
    d = lab.workdir
    with open(d / "keepalived.log", "ab") as logf:
        return lab.popen("fw2", "keepalived", "-n", "-l", "-D", "-f", str(conf),
                         "-p", str(d / "ka.pid"), "-r", str(d / "ka-vrrp.pid"),
                         stdout=logf, stderr=subprocess.STDOUT)


def _lan_holder(pair: Pair) -> set[str]:
    c = pair.lab.config
    return {n for n in ("fw1", "fw2")
            if any(a.split("/")[0] == c.lan_vip for a in pair.lab.addresses(n, c.lan_if))}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _stop_keepalived(pair: Pair, ka: subprocess.Popen[bytes], sig: int) -> None:
    """Signal keepalived's parent and its VRRP child (a SIGKILLed parent alone lets the child
    leave gracefully), then clear what a killed keepalived leaves behind."""
    d = pair.lab.workdir
    pids = [ka.pid]
    for name in ("ka.pid", "ka-vrrp.pid"):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int((d / name).read_text().strip()))
    for pid in set(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    ka.wait(10)
    wait_for(lambda: not any(_alive(p) for p in pids), 5, what="keepalived processes gone")
    for name in ("ka.pid", "ka-vrrp.pid"):
        (d / name).unlink(missing_ok=True)
    if sig == signal.SIGKILL:
        c = pair.lab.config
        pair.lab.exec("fw2", "ip", "addr", "del", f"{c.lan_vip}/{c.prefix4}", "dev", c.lan_if,
                      check=False)


def test_keepalived_higher_priority_is_master_and_fails_over_both_ways() -> None:
    """keepalived 150 vs invictusd 100 in one VRID with PASS auth."""
    with lab_pair() as pair:
        pair.configure("fw1", interfaces=("lan",))
        ka = _start_keepalived(pair, 150)
        pair.start("fw1")
        wait_for(lambda: _lan_holder(pair) == {"fw2"}, MD_100 + 3, what="keepalived master")
        wait_for(lambda: pair.state("fw1") == "backup", 2, what="invictusd backup")
        assert pair.status("fw1")["vrrp"][0]["master_address"] == pair.lab.config.fw_lan_ips[1]
        _stop_keepalived(pair, ka, signal.SIGKILL)
        t0 = time.monotonic()
        wait_for(lambda: pair.state("fw1") == "master", MD_100 + 2, what="invictusd master")
        assert time.monotonic() - t0 <= MD_100 + MARGIN
        ka = _start_keepalived(pair, 150)  # keepalived preempts by default
        wait_for(lambda: pair.state("fw1") == "backup", 3 + 3 + 3, what="keepalived preempting")
        wait_for(lambda: _lan_holder(pair) == {"fw2"}, 3, what="VIP on keepalived's node only")
        drops = pair.status("fw1")["vrrp"][0]["counters"]["drops"]
        assert set(drops) <= {"own_packet"}, drops


def test_keepalived_lower_priority_stays_backup_and_takes_over_on_priority_zero() -> None:
    """invictusd 100 master; keepalived 50 stays backup; SIGTERM hands over in Skew_Time."""
    with lab_pair() as pair:
        pair.configure("fw1", interfaces=("lan",))
        pair.start("fw1")
        wait_for(lambda: pair.state("fw1") == "master", MD_100 + 2, what="invictusd master")
        ka = _start_keepalived(pair, 50)
        time.sleep(3 + (256 - 50) / 256 + 1)
        assert _lan_holder(pair) == {"fw1"}
        t0 = time.monotonic()
        pair.stop("fw1")
        wait_for(lambda: _lan_holder(pair) == {"fw2"}, 3, what="keepalived taking over")
        took = time.monotonic() - t0
        assert took <= (256 - 50) / 256 + 1.0  # keepalived's Skew_Time for priority 50
        # invictusd comes back with the higher priority but no preemption: it stays backup.
        pair.start("fw1")
        time.sleep(MD_100 + 1)
        assert pair.state("fw1") == "backup"
        assert _lan_holder(pair) == {"fw2"}
        assert ka.poll() is None


def test_keepalived_equal_priority_split_brain_resolves_by_address() -> None:
    """Both masters while VRRP is blocked; unblocked, the higher address (fw2) wins (RFC 6.4.3)."""
    with lab_pair() as pair:
        lab = pair.lab
        block = ("table inet vrrpblock {\n chain in {\n  type filter hook input priority -300;\n"
                 "  ip protocol 112 drop\n }\n}\n")
        lab.exec("fw1", "nft", "-f", "-", input=block)
        pair.configure("fw1", interfaces=("lan",))
        _start_keepalived(pair, 100)
        pair.start("fw1")
        wait_for(lambda: pair.state("fw1") == "master" and _lan_holder(pair) == {"fw1", "fw2"},
                 MD_100 + 3, what="split brain: both masters")
        lab.exec("fw1", "nft", "delete", "table", "inet", "vrrpblock")
        wait_for(lambda: pair.state("fw1") == "backup", 3, what="invictusd (lower address) yielding")
        wait_for(lambda: _lan_holder(pair) == {"fw2"}, 2, what="only keepalived holding the VIP")
        changes = [e for e in pair.log_events("fw1") if e.get("event") == "state change"]
        assert changes[-1]["new"] == "backup" and lab.config.fw_lan_ips[1] in changes[-1]["reason"]
        time.sleep(3)
        assert pair.state("fw1") == "backup"  # no flapping


def test_wrong_vrid_from_keepalived_is_ignored_and_counted() -> None:
    with lab_pair() as pair:
        pair.configure("fw1", interfaces=("lan",))
        conf = _keepalived_conf(pair.lab, 200).replace(
            f"virtual_router_id {LAN_VRID}", f"virtual_router_id {WAN_VRID + 10}")
        lab = pair.lab
        path = lab.write_file("keepalived.conf", conf)
        d = lab.workdir
        lab.popen("fw2", "keepalived", "-n", "-l", "-D", "-f", str(path),
                  "-p", str(d / "ka.pid"), "-r", str(d / "ka-vrrp.pid"),
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pair.start("fw1")
        wait_for(lambda: pair.state("fw1") == "master", MD_100 + 3, what="invictusd master anyway")
        wait_for(lambda: pair.status("fw1")["vrrp"][0]["counters"]["drops"].get("vrid", 0) >= 2, 5,
                 what="vrid drops counted")


def test_address_removed_behind_our_back_is_restored_and_sigusr2_dumps_state() -> None:
    with lab_pair() as pair:
        pair.configure("fw1", start_as_master=True)
        pair.start("fw1")
        wait_for(lambda: pair.state("fw1") == "master", 8, what="fw1 master")
        c = pair.lab.config
        pair.lab.exec("fw1", "ip", "addr", "del", f"{c.wan_vip}/{c.prefix4}", "dev", c.wan_if)
        wait_for(lambda: pair.vips_on("fw1") == {c.lan_vip, c.wan_vip}, 3, what="VIP restored")
        wan = pair.status("fw1")["vrrp"][1]
        assert wan["interface"] == c.wan_if and wan["counters"]["addresses_restored"] == 1
        pair.signal("fw1", signal.SIGUSR2)
        dump = wait_for(lambda: [e for e in pair.log_events("fw1") if e.get("event") == "status dump"],
                        3, what="status dump in the log")[-1]
        assert dump["group"]["state"] == "master" and len(dump["vrrp"]) == 2
        # The JSON of `invictusd status --json` is a stable interface for scripts.
        out = pair.lab.exec("fw1", sys.executable, "-m", "invictusd", "status", "--json",
                            "--config", str(pair.configs["fw1"]))
        s = json.loads(out)
        for v in s["vrrp"]:
            assert set(v) >= {"interface", "virtual_id", "state", "priority", "virtual_addresses",
                              "master_address", "counters"}
            assert v["state"] == "master" and v["priority"] == 150
        assert s["sync"] is None
