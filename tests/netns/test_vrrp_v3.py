"""VRRPv3 with real daemons: elections over IPv4 and IPv6, centisecond failover, interval
adoption, unicast peers, mixed versions, what tcpdump and tshark make of our adverts, and a
TCP stream through the virtual addresses surviving a box death at 0.1 s and 0.05 s.

Timing bounds are RFC 5798's Master_Down_Interval, 3 x interval + (256 - priority) x
interval / 256, plus a documented margin (``MARGIN``) for what the RFC does not count:
scheduling on a loaded 2-core machine, the address change through netlink and the test's own
polling.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from invictusd.lab.configs import LAN_VRID, PASSWORD
from invictusd.lab.monitor import IpMonitor
from invictusd.lab.topology import Lab, LabConfig
from invictusd.vrrp import packet, v3
from tests.netns.daemons import Pair, lab_pair, pcap_frames, udp_datagrams, wait_for
from tests.netns.test_hostile import (
    FLOOD_SECONDS,
    SYNC_PORT,
    SYNC_PPS,
    VRRP_PPS,
    Flood,
    _ip,
    _sync_packets,
)
from tests.netns.test_replication import _churn

# What a takeover may take beyond the RFC's Master_Down_Interval in these tests: the event
# loop's timer (millisecond resolution under uvloop), the address change in the netlink
# thread, and polling. The bar for a dead box at 0.1 s is the RFC bound + 40 ms.
MARGIN = 0.04
TCP_RTO_MIN = 0.2  # Linux's floor for TCP's retransmission timeout (TCP_RTO_MIN)


def md(interval: float, priority: int = 100) -> float:
    """RFC 5798 Master_Down_Interval."""
    return 3 * interval + (256 - priority) * interval / 256


def skew(interval: float, priority: int = 100) -> float:
    return (256 - priority) * interval / 256


def v3_config(pair: Pair, node: str, interval: float = 0.1, **kw: Any) -> None:
    extra = {"version": 3, "advert_interval": interval, **kw.pop("vrrp_extra", {})}
    pair.configure(node, password=None, vrrp_extra=extra, **kw)


def sync_key(lab: Lab) -> str:
    """A sync key file, mode 600: a v3 pair has no password to derive one from."""
    path = lab.workdir / "sync.key"
    if not path.exists():
        lab.write_file("sync.key", os.urandom(32).hex() + "\n")
        path.chmod(0o600)
    return str(path)


def vips(lab: Lab, node: str, family: int = 0) -> set[str]:
    """The virtual addresses (LAN and WAN, of ``family`` or both) that ``node`` holds."""
    c = lab.config
    want = [(c.lan_if, c.lan_vip, 4), (c.wan_if, c.wan_vip, 4)]
    if c.ipv6:
        want += [(c.lan_if, c.lan_vip6, 6), (c.wan_if, c.wan_vip6, 6)]
    have = {ifn: set(lab.addresses(node, ifn)) for ifn in (c.lan_if, c.wan_if)}
    return {a for ifn, a, fam in want if family in (0, fam) and a in have[ifn]}


def all_vips(lab: Lab, family: int = 0) -> set[str]:
    c = lab.config
    out = {c.lan_vip, c.wan_vip} if family in (0, 4) else set()
    if c.ipv6 and family in (0, 6):
        out |= {c.lan_vip6, c.wan_vip6}
    return out


def sole_holder(lab: Lab, family: int = 0) -> str | None:
    h = {n: vips(lab, n, family) for n in ("fw1", "fw2")}
    for a, b in (("fw1", "fw2"), ("fw2", "fw1")):
        if h[a] == all_vips(lab, family) and not h[b]:
            return a
    return None


def first(events: list[tuple[float, str]], *needles: str) -> float:
    return next(t for t, text in events if all(n in text for n in needles))


def adverts_on_wire(path: Any) -> list[tuple[float, str, int]]:
    """(time, source address, priority) of every VRRP frame of a pcap, IPv4 or IPv6."""
    out = []
    for t, f in pcap_frames(path):
        if f[12:14] == b"\x08\x00" and len(f) >= 34 and f[23] == 112:
            ihl = (f[14] & 0x0F) * 4
            out.append((t, str(ipaddress.IPv4Address(f[26:30])), f[14 + ihl + 2]))
        elif f[12:14] == b"\x86\xdd" and len(f) >= 62 and f[20] == 112:
            out.append((t, str(ipaddress.IPv6Address(f[22:38])), f[56]))
    return out


def silence_before_takeover(path: Any, dead: str | tuple[str, ...], heir: str | tuple[str, ...],
                            goodbye: bool = False) -> float:
    """From the dead master's last advert to the heir's first one after it, on the wire:
    the heir's Master_Down_Interval as it really ran (RFC 5798 6.4.2); with ``goodbye``, from
    the leaving master's priority-0 advert (then it is the heir's Skew_Time).

    With several instances (``dead`` and ``heir`` give each one's source address), the group
    moves when the first of them times out: the one whose last advert came first. A master
    killed between the IPv4 and the IPv6 advert of one round leaves the IPv6 instance an
    interval behind, and the IPv4 silence alone would look an interval short."""
    seen = adverts_on_wire(path)
    deads = (dead,) if isinstance(dead, str) else dead
    heirs = (heir,) if isinstance(heir, str) else heir
    lasts = [max(t for t, src, prio in seen if src == d and (prio == 0) == goodbye) for d in deads]
    return min(t for t, src, _ in seen if src in heirs and t > max(lasts)) - min(lasts)


# ---- elections and failover ------------------------------------------------------------------


def test_v3_election_over_ipv4_and_ipv6_failover_and_preemption(measure: Any) -> None:
    with lab_pair(LabConfig(ipv6=True)) as pair:
        lab, c = pair.lab, pair.lab.config
        v3_config(pair, "fw1", start_as_master=True)
        v3_config(pair, "fw2")
        pair.start("fw1")
        pair.start("fw2")
        wait_for(lambda: sole_holder(lab) == "fw1", 5, what="fw1 holding every VIP, v4 and v6")
        s = pair.status("fw2")
        assert [(v["interface"], v["family"], v["version"]) for v in s["vrrp"]] == [
            (c.lan_if, 4, 3), (c.lan_if, 6, 3), (c.wan_if, 4, 3), (c.wan_if, 6, 3)]
        wait_for(lambda: all(v["master_address"] for v in pair.status("fw2")["vrrp"]), 2,
                 what="fw2 to know the master on every instance")
        s = pair.status("fw2")
        assert [v["master_address"] for v in s["vrrp"]] == [
            c.fw_lan_ips[0], lab.link_local("fw1", c.lan_if),
            c.fw_wan_ips[0], lab.link_local("fw1", c.wan_if)]
        assert all(v["master_advert_interval"] == 0.1 for v in s["vrrp"])
        assert all(v["master_down_interval"] == pytest.approx(md(0.1)) for v in s["vrrp"])
        assert lab.ping("client", c.server_ip) and lab.ping("client", c.server_ip6)
        assert lab.ping("client", c.lan_vip6)
        # The IPv6 neighbours of the client point at fw1 (unsolicited NA with override).
        assert lab.arp_entry("client", c.lan_vip6) == lab.mac("fw1", c.lan_if)

        before = {n: pair.status(n)["group"]["transitions"] for n in ("fw1", "fw2")}
        time.sleep(2)  # 20 advert intervals, no transition
        assert {n: pair.status(n)["group"]["transitions"] for n in ("fw1", "fw2")} == before

        cap = lab.start_capture("fw2", c.lan_if, "ip proto 112 or ip6 proto 112")
        time.sleep(0.3)
        pair.kill("fw1", cleanup=False)
        wait_for(lambda: vips(lab, "fw2") == all_vips(lab), 3, step=0.01, what="fw2 holding every VIP")
        pair.lab.exec("fw1", sys.executable, "-m", "invictusd", "cleanup", "--config",
                      str(pair.configs["fw1"]))  # what systemd's ExecStopPost does
        assert sole_holder(lab) == "fw2"
        time.sleep(1.5)  # tcpdump hands packets over in blocks
        path = cap.stop()
        sources = {n: (c.fw_lan_ips[i], lab.link_local(n, c.lan_if)) for i, n in enumerate(("fw1", "fw2"))}
        took = silence_before_takeover(path, sources["fw1"], sources["fw2"])
        measure("v3 0.1 s: master SIGKILLed -> backup's first advert (IPv4 and IPv6 instances)",  # type: ignore[operator]
                f"{took:.3f}s on the wire (RFC Master_Down {md(0.1):.3f}s)")
        assert md(0.1) - 0.01 <= took <= md(0.1) + MARGIN
        wait_for(lambda: lab.ping("client", c.server_ip6, timeout=1), 3, what="IPv6 via fw2")
        assert lab.arp_entry("client", c.lan_vip6) == lab.mac("fw2", c.lan_if)
        pair.start("fw1")
        wait_for(lambda: sole_holder(lab) == "fw1", 3, what="fw1 preempting back")
        assert pair.state("fw2") == "backup"


def test_v3_link_flap_moves_the_group_and_ipv6_adverts_resume_after_it() -> None:
    """A link going down takes the group to the peer (priority 0 on the live link); back up,
    the kernel has re-created the link-local address our IPv6 adverts leave from, and the
    preferred node takes everything back over IPv4 and IPv6."""
    with lab_pair(LabConfig(ipv6=True)) as pair:
        lab, c = pair.lab, pair.lab.config
        v3_config(pair, "fw1", start_as_master=True)
        v3_config(pair, "fw2")
        pair.start("fw1")
        pair.start("fw2")
        wait_for(lambda: sole_holder(lab) == "fw1", 5, what="fw1 holding every VIP")
        lab.link_set("fw1", c.wan_if, False)
        wait_for(lambda: sole_holder(lab) == "fw2", 3, what="fw2 holding every VIP")
        assert pair.state("fw1") == "fault"
        drops = pair.status("fw1")["vrrp"][0]["counters"]["drops"]
        assert "send_error" not in drops, drops
        lab.link_set("fw1", c.wan_if, True)
        wait_for(lambda: sole_holder(lab) == "fw1", 5, what="fw1 back with every VIP")
        # fw2 hears fw1's IPv6 adverts on the flapped link again, from its link-local address.
        wait_for(lambda: pair.status("fw2")["vrrp"][3]["master_address"]
                 == lab.link_local("fw1", c.wan_if), 2, what="fw2 hearing fw1 over IPv6 on wan0")
        assert lab.ping("client", c.server_ip6)


def test_v3_backup_adopts_a_faster_masters_interval(measure: Any) -> None:
    with lab_pair() as pair:
        lab = pair.lab
        v3_config(pair, "fw1", 0.05, start_as_master=True)
        v3_config(pair, "fw2", 1.0)
        pair.start("fw1")
        pair.start("fw2")
        wait_for(lambda: sole_holder(lab) == "fw1", 5, what="fw1 master")
        wait_for(lambda: all(v["master_advert_interval"] == 0.05
                             for v in pair.status("fw2")["vrrp"]), 2, what="fw2 adopting 0.05 s")
        s = pair.status("fw2")["vrrp"][0]
        assert s["advert_interval"] == 1.0
        assert s["master_down_interval"] == pytest.approx(md(0.05))
        mon = IpMonitor(lab, "fw2", "address")
        t_cut = time.time()
        lab.exec("fw1", "ip", "-batch", "-", input=f"link set {lab.config.lan_if} down\n"
                 f"link set {lab.config.wan_if} down\n")
        wait_for(lambda: sole_holder(lab) == "fw2", 3, step=0.01, what="fw2 master")
        took = first(mon.stop(), lab.config.lan_vip) - t_cut
        measure("v3: backup at 1 s adopting the master's 0.05 s: links cut -> LAN VIP on fw2",  # type: ignore[operator]
                f"{took:.3f}s (RFC bound {md(0.05):.3f}s; its own would be {md(1.0):.3f}s)")
        assert took <= md(0.05) + MARGIN


def test_v3_reload_changes_the_interval_live_and_refuses_a_version_change() -> None:
    with lab_pair() as pair:
        lab = pair.lab
        v3_config(pair, "fw1", 0.1, start_as_master=True)
        v3_config(pair, "fw2", 0.1)
        pair.start("fw1")
        pair.start("fw2")
        wait_for(lambda: sole_holder(lab) == "fw1", 5, what="fw1 master")
        before = {n: pair.status(n)["group"]["transitions"] for n in ("fw1", "fw2")}
        v3_config(pair, "fw1", 0.05, start_as_master=True)
        pair.signal("fw1", signal.SIGHUP)
        # The backup follows the master's new interval without any reconfiguration.
        wait_for(lambda: all(v["master_advert_interval"] == 0.05
                             for v in pair.status("fw2")["vrrp"]), 3, what="fw2 adopting 0.05 s")
        assert pair.status("fw2")["vrrp"][0]["master_down_interval"] == pytest.approx(md(0.05))
        # Back to version 2 needs a restart: refused, the running configuration stays.
        pair.configure("fw1", start_as_master=True)
        pair.signal("fw1", signal.SIGHUP)
        wait_for(lambda: any(e.get("event", "").startswith("reload refused")
                             for e in pair.log_events("fw1")), 3, what="reload refused")
        refused = [e for e in pair.log_events("fw1") if e.get("event", "").startswith("reload refused")]
        assert "version" in refused[-1]["error"]
        time.sleep(1)
        assert pair.status("fw1")["vrrp"][0]["version"] == 3
        assert {n: pair.status(n)["group"]["transitions"] for n in ("fw1", "fw2")} == before
        assert sole_holder(lab) == "fw1"


# ---- adverts on the wire ------------------------------------------------------------------------


def test_tcpdump_and_tshark_decode_our_v3_adverts_cleanly() -> None:
    with lab_pair(LabConfig(ipv6=True)) as pair:
        lab, c = pair.lab, pair.lab.config
        v3_config(pair, "fw1", 0.1, interfaces=("lan",))
        pair.start("fw1")
        wait_for(lambda: pair.state("fw1") == "master", 3, what="fw1 master")
        out = lab.exec("client", "timeout", "5", "tcpdump", "-vv", "-n", "-c", "6", "-i",
                       c.host_if, "ip proto 112 or ip6 proto 112", timeout=10)
        assert "bad" not in out.lower() and "[|vrrp]" not in out, out
        v4 = [line for line in out.splitlines() if "VRRPv3" in line and "intvl 10cs" in line]
        assert len(v4) == 6, out
        assert any(f"vrid {LAN_VRID}, prio 100, intvl 10cs, length 12, addrs: {c.lan_vip}" in line
                   for line in v4), out
        assert any(f"addrs: {c.lan_vip6}" in line and "length 24" in line for line in v4), out
        assert "ttl 255" in out and "hlim 255" in out, out
        ll = lab.link_local("fw1", c.lan_if)
        assert f"{ll} > ff02::12" in out, out
        for flt in ("ip proto 112", "ip6 proto 112"):
            tshark = lab.exec("client", "timeout", "5", "tshark", "-c", "2", "-i", c.host_if,
                              "-f", flt, "-V", "-o", "vrrp.v3_checksum_as_in_v2:FALSE",
                              timeout=15, check=False)
            assert "Virtual Router Redundancy Protocol" in tshark, tshark
            assert tshark.count("[Checksum Status: Good]") == 2, tshark
            assert "VRRP protocol version: 3" in tshark and "= Adver Int: 10" in tshark, tshark
            assert tshark.count("[correct]") == 2, tshark


# ---- unicast peers and mixed versions ------------------------------------------------------------


def _forge_v3(lab: Lab, src: str, dst: str, priority: int, count: int = 20, ttl: int = 255) -> None:
    """VRRPv3 adverts for the LAN VRID from the client, with a forged source (IP_HDRINCL)."""
    s, d = ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst)
    msg = v3.encode(v3.AdvertisementV3(LAN_VRID, priority, (ipaddress.IPv4Address(
        lab.config.lan_vip),), 10), s, d)
    code = (
        "import socket,struct,time\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW)\n"
        f"m=bytes.fromhex('{msg.hex()}')\n"
        f"h=struct.pack('!BBHHHBBH4s4s',0x45,0xc0,20+len(m),0,0,{ttl},112,0,"
        f"socket.inet_aton('{src}'),socket.inet_aton('{dst}'))\n"
        f"for _ in range({count}):\n"
        f"    s.sendto(h+m,('{dst}',0)); time.sleep(0.01)\n"
    )
    lab.exec("client", sys.executable, "-c", code)


def _peers(lab: Lab, node: str, families: tuple[int, ...] = (4, 6)) -> dict[str, dict[str, Any]]:
    c = lab.config
    other = "fw2" if node == "fw1" else "fw1"
    j = 1 if node == "fw1" else 0
    out: dict[str, dict[str, Any]] = {}
    for which, ifn, ip4 in (("lan", c.lan_if, c.fw_lan_ips[j]), ("wan", c.wan_if, c.fw_wan_ips[j])):
        peers = [ip4] if 4 in families else []
        if c.ipv6 and 6 in families:
            peers.append(lab.link_local(other, ifn))
        out[which] = {"unicast_peers": peers}
    return out


@pytest.mark.parametrize("version", [2, 3])
def test_unicast_peers_elect_fail_over_and_refuse_strangers(version: int, measure: Any) -> None:
    cfg = LabConfig(ipv6=version == 3)
    with lab_pair(cfg) as pair:
        lab, c = pair.lab, pair.lab.config
        for node in ("fw1", "fw2"):
            kw: dict[str, Any] = {"start_as_master": node == "fw1",
                                  "table_extra": _peers(lab, node)}
            if version == 3:
                v3_config(pair, node, 0.1, **kw)
            else:
                pair.configure(node, **kw)
        # Adverts must reach the peer by unicast only: nobody joins 224.0.0.18.
        cap = lab.start_capture("client", c.host_if, "ip proto 112 or ip6 proto 112")
        pair.start("fw1")
        pair.start("fw2")
        bound = md(0.1, 150) + 1 if version == 3 else 3 + (256 - 150) / 256 + 2
        wait_for(lambda: sole_holder(lab) == "fw1", bound + 3, what="fw1 master")
        wait_for(lambda: pair.status("fw2")["vrrp"][0]["master_address"] == c.fw_lan_ips[0], 3,
                 what="fw2 hearing fw1 by unicast")
        frames = pcap_frames(cap.stop())
        multicast = [f for _, f in frames if f[0] & 1]  # group bit of the destination MAC
        assert not multicast, f"{len(multicast)} VRRP frames to a multicast MAC"
        assert pair.status("fw1")["vrrp"][0]["unicast_peers"] == [c.fw_lan_ips[1]]
        # A stranger (the client) forging a better advert to fw2's address, TTL 255, right
        # checksum: dropped as "source", no takeover.
        before = pair.status("fw2")["group"]["transitions"]
        if version == 3:
            _forge_v3(lab, c.client_ip, c.fw_lan_ips[1], 254)
        else:
            msg = packet.encode(packet.Advertisement(LAN_VRID, 254, (ipaddress.IPv4Address(
                c.lan_vip),), auth_data=PASSWORD.encode()))
            code = ("import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_RAW,112)\n"
                    "s.setsockopt(socket.IPPROTO_IP,socket.IP_TTL,255)\n"
                    f"for _ in range(20): s.sendto(bytes.fromhex('{msg.hex()}'),"
                    f"('{c.fw_lan_ips[1]}',0)); time.sleep(0.01)\n")
            lab.exec("client", sys.executable, "-c", code)
        wait_for(lambda: pair.status("fw2")["vrrp"][0]["counters"]["drops"].get("source", 0) >= 20,
                 3, what="the stranger's adverts counted as source")
        time.sleep(0.5)
        assert pair.status("fw2")["group"]["transitions"] == before
        assert sole_holder(lab) == "fw1"
        # The peers still fail over (by unicast) when the master dies.
        cap = lab.start_capture("fw2", c.lan_if, "ip proto 112 or ip6 proto 112")
        time.sleep(0.3 if version == 3 else 1.2)
        pair.kill("fw1", cleanup=False)
        wait_for(lambda: pair.state("fw2") == "master", 5, step=0.01, what="fw2 master")
        time.sleep(1.5)  # tcpdump hands packets over in blocks
        # Under v3 the lab has IPv6: an IPv6 instance beside the IPv4 one.
        sources = {n: (c.fw_lan_ips[i], *([lab.link_local(n, c.lan_if)] if version == 3 else []))
                   for i, n in enumerate(("fw1", "fw2"))}
        took = silence_before_takeover(cap.stop(), sources["fw1"], sources["fw2"])
        limit = md(0.1) if version == 3 else 3 + (256 - 100) / 256
        measure(f"unicast v{version}: master SIGKILLed -> backup's first advert",  # type: ignore[operator]
                f"{took:.3f}s on the wire (RFC Master_Down {limit:.3f}s)")
        assert limit - 0.01 <= took <= limit + MARGIN


def test_mixed_versions_are_refused_counted_and_never_flap() -> None:
    with lab_pair() as pair:
        lab = pair.lab
        pair.configure("fw1", vrrp_extra={"advert_interval": 1})
        v3_config(pair, "fw2", 1.0)
        pair.start("fw1")
        pair.start("fw2")
        # Each hears only the other version: both drop everything under "version"...
        wait_for(lambda: all(pair.status(n)["vrrp"][0]["counters"]["drops"].get("version", 0) >= 3
                             for n in ("fw1", "fw2")), 8, what="version drops on both")
        # ...and say why, at error level, once per 10 s.
        for node, theirs in (("fw1", 3), ("fw2", 2)):
            lines = [e for e in pair.log_events(node) if e.get("event") == "advert dropped"
                     and e.get("reason") == "version" and e.get("interface") == lab.config.lan_if]
            assert len(lines) == 1 and lines[0]["level"] == "error", lines
            assert f"version {theirs}" in lines[0]["detail"] and "`version`" in lines[0]["detail"]
        # Nothing of the other is ever heard, so nothing moves: each is master on its own
        # (a misconfiguration the logs name), and neither flaps.
        wait_for(lambda: pair.state("fw1") == "master" and pair.state("fw2") == "master", 8,
                 what="both settled")
        time.sleep(4)
        for node in ("fw1", "fw2"):
            s = pair.status(node)
            assert s["group"]["transitions"] == 2, s["group"]  # init -> backup -> master
            assert s["vrrp"][0]["counters"]["adverts_received"] == 0
        assert vips(lab, "fw1") == vips(lab, "fw2") == all_vips(lab)


# ---- a TCP stream through the VIPs survives a box death at sub-second intervals ------------------


def _box_death(pair: Pair, node: str) -> tuple[float, float]:
    """``node`` dies: its daemon freezes, then every link is cut (one ip process).

    Freezing first is what makes it a death: a running daemon notices the first link going
    down within a millisecond and says goodbye (priority 0) on a link that is still up, which
    is a graceful handover, measured elsewhere. Returns when, as (wall clock, for ``ip -ts
    monitor``; monotonic, for the streams' echoes).
    """
    c = pair.lab.config
    wall, mono = time.time(), time.monotonic()
    pair.signal(node, signal.SIGSTOP)
    pair.lab.exec(node, "ip", "-batch", "-", input="".join(
        f"link set {ifn} down\n" for ifn in (c.lan_if, c.wan_if, c.sync_if)))
    return wall, mono


@pytest.mark.parametrize("interval", [0.1, 0.05])
def test_tcp_stream_survives_a_box_death_with_replication(interval: float, measure: Any) -> None:
    with lab_pair(LabConfig(ipv6=False)) as pair:
        lab = pair.lab
        for node in ("fw1", "fw2"):
            v3_config(pair, node, interval, start_as_master=node == "fw1", sync=True,
                      sync_extra={"key_file": sync_key(lab)})
        pair.start("fw1")
        pair.start("fw2")
        wait_for(lambda: sole_holder(lab) == "fw1", 5, what="fw1 master")
        wait_for(lambda: pair.status("fw2")["sync"]["synced"], 10, what="fw2 synced")
        streams = lab.start_streams("tcp", dead_after=8)
        wait_for(lambda: pair.status("fw2")["sync"]["peer_entries"] >= 2, 5,
                 what="both streams replicated")
        time.sleep(1.0)
        mon = IpMonitor(lab, "fw2", "address")
        t_cut, t_cut_mono = _box_death(pair, "fw1")
        wait_for(lambda: vips(lab, "fw2") == all_vips(lab), 3, step=0.01, what="fw2 holding the VIPs")
        time.sleep(2.0)  # TCP's retransmissions (0.2 s, then 0.6 s after a loss) get through
        pair.kill("fw1", cleanup=False)  # the frozen corpse
        events = mon.stop()
        t_vips = max(first(events, vip) for vip in all_vips(lab)) - t_cut
        results = {name: s.stop() for name, s in streams.items()}
        gaps = {}
        for name, r in results.items():
            assert r.error is None, f"{name} broke: {r.error} {r.error_detail}"
            assert r.seq_ok and r.acked >= r.sent - 2, (name, r.acked, r.sent)
            times = sorted(a[2] for a in r.acks)
            gaps[name] = max(b - a for a, b in itertools.pairwise(times) if b > t_cut_mono)
        worst = max(gaps.values())
        change = [e for e in pair.log_events("fw2") if e.get("event") == "state change"
                  and e.get("new") == "master"][-1]
        st = pair.status("fw2")
        handover, takeover = st["sync"]["last_handover"], st["group"]["last_takeover"]
        measure(f"v3 {interval} s, box dead (links cut), replication on: all VIPs on fw2 / "  # type: ignore[operator]
                "worst TCP gap",
                f"{t_vips:.3f}s (RFC bound {md(interval):.3f}s) / {worst:.3f}s "
                f"{ {k: round(v, 3) for k, v in gaps.items()} }; addresses {takeover['addresses_ms']} ms "
                f"after the decision, {handover['entries']} entries handed over in {handover['seconds']} s")
        assert handover["entries"] >= 2, handover  # the streams' entries were in fw2's kernel
        # A real death, not a goodbye: the backup's Master_Down fired.
        assert "no advert for" in change["reason"], change
        assert t_vips <= md(interval) + MARGIN, t_vips
        # A stream (TCP_NODELAY, a message every 10 ms) recovers with its first transmission
        # after the addresses moved: new data, usually (gap = t_vips), unless its retransmission
        # timer (RFC 6298; Linux: 200 ms + RTT) fired while the box was silent, which leaves the
        # connection waiting for the backed-off retry, 2 x 200 ms later. Bound: the addresses
        # by the RFC bound + MARGIN, plus that retry, plus 50 ms for the echo to come back.
        # At 0.05 s the addresses move before the first retry can fire (0.2 s): the issue's
        # bar of 0.3 s holds.
        assert worst <= md(interval) + MARGIN + 2 * TCP_RTO_MIN + 0.05, gaps
        if interval <= 0.05:
            assert worst <= 0.3, gaps


# ---- keepalived 2.2.7 `version 3` in the same VRID ----------------------------------------------
#
# invictusd runs on fw1 with the LAN table only, keepalived on fw2, advert_int 0.1 on both.
# Four ways to meet: IPv4 or IPv6 (from the link-local address to ff02::12), multicast or
# unicast. keepalived sends IPv6 unicast adverts with hop limit 64 unless told `unicast_ttl
# 255` (RFC 5798 7.1 says to drop them; so do we): the configuration below says it.

KA_MODES = ["ipv4-multicast", "ipv6-multicast", "ipv4-unicast", "ipv6-unicast"]
KA_INTERVAL = 0.1


def _family(mode: str) -> int:
    return 6 if mode.startswith("ipv6") else 4


def _lan_vip(lab: Lab, mode: str) -> str:
    return lab.config.lan_vip6 if _family(mode) == 6 else lab.config.lan_vip


def _ka_conf(lab: Lab, mode: str, priority: int) -> str:
    c = lab.config
    fam = _family(mode)
    vip = f"{c.lan_vip6}/{c.prefix6}" if fam == 6 else f"{c.lan_vip}/{c.prefix4}"
    unicast = ""
    if mode.endswith("unicast"):
        peer = lab.link_local("fw1", c.lan_if) if fam == 6 else c.fw_lan_ips[0]
        src = "" if fam == 6 else f"    unicast_src_ip {c.fw_lan_ips[1]}\n"
        unicast = f"{src}    unicast_peer {{\n        {peer}\n    }}\n    unicast_ttl 255\n"
    return f"""
global_defs {{
    router_id kafw2
    enable_script_security
    vrrp_garp_master_delay 1
}}
vrrp_instance LAN {{
    version 3
    state BACKUP
    interface {c.lan_if}
    virtual_router_id {LAN_VRID}
    priority {priority}
    advert_int {KA_INTERVAL}
{unicast}    virtual_ipaddress {{
        {vip}
    }}
}}
"""


def _ka_start(pair: Pair, mode: str, priority: int) -> subprocess.Popen[bytes]:
    lab = pair.lab
    conf = lab.write_file("keepalived.conf", _ka_conf(lab, mode, priority))
    d = lab.workdir
    with open(d / "keepalived.log", "ab") as logf:
        return lab.popen("fw2", "keepalived", "-n", "-l", "-D", "-f", str(conf),
                         "-p", str(d / "ka.pid"), "-r", str(d / "ka-vrrp.pid"),
                         stdout=logf, stderr=subprocess.STDOUT)


def _ka_kill(pair: Pair, mode: str, ka: subprocess.Popen[bytes]) -> None:
    """SIGKILL keepalived's parent and VRRP child (a dead box), then clear its VIP."""
    d = pair.lab.workdir
    pids = []
    # The VRRP child first: killed after its parent, it would leave gracefully (priority 0).
    for name in ("ka-vrrp.pid", "ka.pid"):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int((d / name).read_text().strip()))
    pids.append(ka.pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    ka.wait(10)

    def gone() -> bool:
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split()[2] != "Z":
                        return False
            except OSError:
                pass
        return True

    wait_for(gone, 5, what="keepalived processes gone")
    for name in ("ka.pid", "ka-vrrp.pid"):
        (d / name).unlink(missing_ok=True)
    c = pair.lab.config
    vip = f"{c.lan_vip6}/{c.prefix6}" if _family(mode) == 6 else f"{c.lan_vip}/{c.prefix4}"
    pair.lab.exec("fw2", "ip", "addr", "del", vip, "dev", c.lan_if, check=False)


def _ka_invictusd(pair: Pair, mode: str, **kw: Any) -> None:
    lab = pair.lab
    table: dict[str, dict[str, Any]] = {}
    if mode.endswith("unicast"):
        c = lab.config
        peer = lab.link_local("fw2", c.lan_if) if _family(mode) == 6 else c.fw_lan_ips[1]
        table = {"lan": {"unicast_peers": [peer]}}
    v3_config(pair, "fw1", KA_INTERVAL, interfaces=("lan",), families=(_family(mode),),
              table_extra=table, **kw)


def _lan_holders(pair: Pair, mode: str) -> set[str]:
    c = pair.lab.config
    vip = _lan_vip(pair.lab, mode)
    return {n for n in ("fw1", "fw2") if vip in pair.lab.addresses(n, c.lan_if)}


def _ka_lab(mode: str) -> LabConfig:
    return LabConfig(ipv6=_family(mode) == 6)


def _fw2_source(lab: Lab, mode: str) -> str:
    c = lab.config
    return lab.link_local("fw2", c.lan_if) if _family(mode) == 6 else c.fw_lan_ips[1]


@pytest.mark.parametrize("mode", KA_MODES)
def test_keepalived_v3_higher_priority_is_master_and_fails_over_both_ways(
    mode: str, measure: Any
) -> None:
    """keepalived 150 vs invictusd 100: keepalived master; killed, invictusd takes over in
    Master_Down; back, keepalived preempts."""
    with lab_pair(_ka_lab(mode)) as pair:
        _ka_invictusd(pair, mode)
        ka = _ka_start(pair, mode, 150)
        pair.start("fw1")
        wait_for(lambda: _lan_holders(pair, mode) == {"fw2"} and pair.state("fw1") == "backup",
                 3, what="keepalived master, invictusd backup")
        wait_for(lambda: pair.status("fw1")["vrrp"][0]["master_address"]
                 == _fw2_source(pair.lab, mode), 2, what="invictusd hearing keepalived")
        s = pair.status("fw1")["vrrp"][0]
        assert (s["family"], s["master_priority"], s["master_advert_interval"]) == (
            _family(mode), 150, KA_INTERVAL)
        time.sleep(1)  # ten of keepalived's intervals: no transition
        assert pair.status("fw1")["group"]["transitions"] == 1
        cap = pair.lab.start_capture("fw1", pair.lab.config.lan_if, "ip proto 112 or ip6 proto 112")
        time.sleep(0.3)
        _ka_kill(pair, mode, ka)
        wait_for(lambda: pair.state("fw1") == "master", 3, step=0.01, what="invictusd master")
        time.sleep(1.5)  # tcpdump hands packets over in blocks (up to a second late)
        ours = (pair.lab.link_local("fw1", pair.lab.config.lan_if) if _family(mode) == 6
                else pair.lab.config.fw_lan_ips[0])
        took = silence_before_takeover(cap.stop(), _fw2_source(pair.lab, mode), ours)
        measure(f"keepalived v3 interop {mode}: keepalived's last advert -> invictusd's first",  # type: ignore[operator]
                f"{took:.3f}s on the wire (RFC Master_Down {md(KA_INTERVAL):.3f}s)")
        # A real death (no priority 0 from keepalived), detected no earlier than the RFC says.
        assert md(KA_INTERVAL) - 0.01 <= took <= md(KA_INTERVAL) + MARGIN
        wait_for(lambda: _lan_holders(pair, mode) == {"fw1"}, 2, what="VIP on invictusd's node")
        ka = _ka_start(pair, mode, 150)  # keepalived preempts by default
        wait_for(lambda: pair.state("fw1") == "backup", 5, what="keepalived preempting")
        wait_for(lambda: _lan_holders(pair, mode) == {"fw2"}, 3, what="VIP on keepalived's node only")
        drops = pair.status("fw1")["vrrp"][0]["counters"]["drops"]
        assert set(drops) <= {"own_packet"}, drops
        assert ka.poll() is None


@pytest.mark.parametrize("mode", KA_MODES)
def test_keepalived_v3_lower_priority_stays_backup_and_takes_over_on_priority_zero(
    mode: str, measure: Any
) -> None:
    """invictusd 100 master; keepalived 50 stays backup; invictusd's SIGTERM (priority 0)
    hands over in keepalived's Skew_Time; invictusd back without preemption stays backup."""
    with lab_pair(_ka_lab(mode)) as pair:
        _ka_invictusd(pair, mode)
        pair.start("fw1")
        wait_for(lambda: pair.state("fw1") == "master", 3, what="invictusd master")
        ka = _ka_start(pair, mode, 50)
        time.sleep(2)  # keepalived would have taken over by now if it did not hear us
        assert _lan_holders(pair, mode) == {"fw1"}
        assert pair.status("fw1")["group"]["transitions"] == 2
        ours = (pair.lab.link_local("fw1", pair.lab.config.lan_if) if _family(mode) == 6
                else pair.lab.config.fw_lan_ips[0])
        cap = pair.lab.start_capture("fw2", pair.lab.config.lan_if, "ip proto 112 or ip6 proto 112")
        time.sleep(0.3)
        pair.stop("fw1")
        wait_for(lambda: _lan_holders(pair, mode) == {"fw2"}, 3, step=0.01,
                 what="keepalived taking over")
        time.sleep(1.5)  # tcpdump hands packets over in blocks
        took = silence_before_takeover(cap.stop(), ours, _fw2_source(pair.lab, mode), goodbye=True)
        measure(f"keepalived v3 interop {mode}: invictusd's priority 0 -> keepalived's first advert",  # type: ignore[operator]
                f"{took:.3f}s on the wire (keepalived's Skew_Time {skew(KA_INTERVAL, 50):.3f}s)")
        assert skew(KA_INTERVAL, 50) - 0.01 <= took <= skew(KA_INTERVAL, 50) + MARGIN
        _ka_invictusd(pair, mode)
        pair.start("fw1")
        time.sleep(md(KA_INTERVAL) * 4)
        assert pair.state("fw1") == "backup"
        assert _lan_holders(pair, mode) == {"fw2"}
        assert pair.status("fw1")["vrrp"][0]["master_priority"] == 50
        # Preferring mastership (priority 150, preempt) it takes over from keepalived...
        pair.stop("fw1")
        _ka_invictusd(pair, mode, start_as_master=True)
        pair.start("fw1")
        wait_for(lambda: _lan_holders(pair, mode) == {"fw1"}, 3, what="invictusd preempting")
        # ...and when it dies, keepalived (priority 50) takes over after its Master_Down,
        # computed from the interval we advertise.
        cap = pair.lab.start_capture("fw2", pair.lab.config.lan_if, "ip proto 112 or ip6 proto 112")
        time.sleep(0.3)
        pair.kill("fw1", cleanup=False)
        wait_for(lambda: "fw2" in _lan_holders(pair, mode), 3, step=0.01, what="keepalived master")
        time.sleep(1.5)  # tcpdump hands packets over in blocks
        took = silence_before_takeover(cap.stop(), ours, _fw2_source(pair.lab, mode))
        measure(f"keepalived v3 interop {mode}: invictusd's last advert -> keepalived's first",  # type: ignore[operator]
                f"{took:.3f}s on the wire (RFC Master_Down {md(KA_INTERVAL, 50):.3f}s)")
        assert md(KA_INTERVAL, 50) - 0.01 <= took <= md(KA_INTERVAL, 50) + MARGIN
        assert ka.poll() is None


@pytest.mark.parametrize("mode", KA_MODES)
def test_keepalived_v3_equal_priority_split_brain_resolves_by_address(mode: str) -> None:
    """Both masters while VRRP is blocked on fw1; unblocked, the higher primary address wins
    (RFC 5798 6.4.3; the link-local address over IPv6), and nobody flaps afterwards."""
    with lab_pair(_ka_lab(mode)) as pair:
        lab = pair.lab
        c = lab.config
        # Both ways: whichever address is higher, neither hears the other.
        block = ("table inet vrrpblock {\n"
                 " chain in {\n  type filter hook input priority -300;\n  meta l4proto 112 drop\n }\n"
                 " chain out {\n  type filter hook output priority -300;\n  meta l4proto 112 drop\n }\n"
                 "}\n")
        lab.exec("fw1", "nft", "-f", "-", input=block)
        _ka_invictusd(pair, mode)
        _ka_start(pair, mode, 100)
        pair.start("fw1")
        wait_for(lambda: pair.state("fw1") == "master" and _lan_holders(pair, mode) == {"fw1", "fw2"},
                 5, what="split brain: both masters")
        ours = lab.link_local("fw1", c.lan_if) if _family(mode) == 6 else c.fw_lan_ips[0]
        theirs = _fw2_source(lab, mode)
        winner = "fw2" if int(ipaddress.ip_address(theirs)) > int(ipaddress.ip_address(ours)) else "fw1"
        lab.exec("fw1", "nft", "delete", "table", "inet", "vrrpblock")
        wait_for(lambda: _lan_holders(pair, mode) == {winner}, 3, what=f"only {winner} holding the VIP")
        assert pair.state("fw1") == ("master" if winner == "fw1" else "backup")
        transitions = pair.status("fw1")["group"]["transitions"]
        time.sleep(2)  # twenty intervals: no flapping
        assert pair.status("fw1")["group"]["transitions"] == transitions
        assert _lan_holders(pair, mode) == {winner}
        if winner == "fw2":
            changes = [e for e in pair.log_events("fw1") if e.get("event") == "state change"]
            assert changes[-1]["new"] == "backup" and theirs in changes[-1]["reason"]


# ---- advert timing under floods --------------------------------------------------------------------


def test_v3_adverts_keep_time_at_0_05_s_under_vrrp_and_sync_floods(measure: Any) -> None:
    """The hostile floods of test_hostile.py (forged VRRP from the LAN at 6000/s, forged sync
    datagrams both ways at 3000/s) against a pair at 0.05 s with replication on: every forged
    advert dropped under its reason, and the master's adverts, seen at the backup, never late
    enough to reach the backup's Master_Down (0.18 s)."""
    interval = 0.05
    rng = random.Random(10)
    with lab_pair() as pair:
        lab, c = pair.lab, pair.lab.config
        key = sync_key(lab)
        for node in ("fw1", "fw2"):
            v3_config(pair, node, interval, start_as_master=node == "fw1", sync=True,
                      sync_extra={"key_file": key})
        pair.start("fw1")
        pair.start("fw2")
        wait_for(lambda: sole_holder(lab) == "fw1", 5, what="fw1 master")
        wait_for(lambda: pair.status("fw2")["sync"]["synced"], 10, what="fw2 synced")
        cap = lab.start_capture("fw2", c.sync_if, "udp")
        _churn(pair, "fw1", "--create", "200", "--seed", "3")
        time.sleep(1.5)
        to_fw2 = [p for s, port, p in udp_datagrams(cap.stop())
                  if s == c.sync_ips[0] and port == SYNC_PORT][:50]
        assert to_fw2, "no sync datagram captured"

        src, grp = ipaddress.IPv4Address(c.client_ip), v3.GROUP4
        vip = (ipaddress.IPv4Address(c.lan_vip),)

        def adv(**kw: Any) -> bytes:
            a = {"vrid": LAN_VRID, "priority": 254, "addresses": vip, "interval_cs": 5, **kw}
            return v3.encode(v3.AdvertisementV3(**a), src, grp)

        def ip(payload: bytes, ttl: int = 255) -> tuple[bytes, str]:
            return _ip(c.client_ip, str(grp), 112, payload, ttl), str(grp)

        good = adv()
        v2 = packet.encode(packet.Advertisement(LAN_VRID, 254, vip, auth_data=PASSWORD.encode()))
        floods_vrrp = {
            "garbage": [ip(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 40))))
                        for _ in range(128)],
            "checksum": [ip(good[:6] + bytes([good[6] ^ 0x5A]) + good[7:])],
            "ttl": [ip(good, ttl) for ttl in (1, 64, 254)],  # would take over if TTL passed
            "version": [ip(v2)],
            "addresses": [ip(adv(addresses=(ipaddress.IPv4Address("10.10.0.99"),)))],
            "vrid": [ip(adv(vrid=99))],
        }
        before = {n: pair.status(n) for n in ("fw1", "fw2")}
        adverts = lab.start_capture("fw2", c.lan_if, f"proto 112 and src host {c.fw_lan_ips[0]}")
        time.sleep(1.5)
        t_start = time.time()
        floods = {
            "client": Flood(lab, "client", c.host_if, VRRP_PPS, floods_vrrp),
            "fw1": Flood(lab, "fw1", c.sync_if, SYNC_PPS,
                         _sync_packets(to_fw2, c.sync_ips[0], c.sync_ips[1], rng)),
        }
        sent = {n: f.result() for n, f in floods.items()}
        t_end = time.time()
        time.sleep(1.5)
        times = [t for t, _ in pcap_frames(adverts.stop())]
        gaps = [b - a for a, b in itertools.pairwise(times) if b > t_start and a < t_end]
        quiet = [b - a for a, b in itertools.pairwise(times) if b < t_start]
        assert len(gaps) >= FLOOD_SECONDS / interval * 0.9, len(gaps)
        worst = max(gaps)
        after = {n: pair.status(n) for n in ("fw1", "fw2")}
        drops = after["fw2"]["vrrp"][0]["counters"]["drops"]
        total = sum(sent["client"]["sent"].values())
        measure("v3 0.05 s under floods: master's worst advert interval at the backup / margin "  # type: ignore[operator]
                "to Master_Down",
                f"{worst * 1000:.1f} ms / {(md(interval) - worst) * 1000:.1f} ms over {len(gaps)} "
                f"intervals (quiet: {max(quiet) * 1000:.1f} ms; {total} forged adverts + "
                f"{sum(sent['fw1']['sent'].values())} sync datagrams in {sent['client']['seconds']} s; "
                f"loop max lag fw1 {after['fw1']['loop']['max_lag_ms']} ms, "
                f"fw2 {after['fw2']['loop']['max_lag_ms']} ms)")
        measure("v3 0.05 s under floods: fw2 VRRP drops by reason", str(drops))  # type: ignore[operator]
        for node in ("fw1", "fw2"):
            assert after[node]["group"]["transitions"] == before[node]["group"]["transitions"], node
        assert sole_holder(lab) == "fw1"
        # The protocol bound: a silence reaching the backup's Master_Down is a failover.
        assert worst < md(interval), worst
        for reason in ("checksum", "ttl", "version", "addresses", "vrid"):
            assert drops.get(reason, 0) >= sent["client"]["sent"][reason] * 0.99, (reason, drops)
