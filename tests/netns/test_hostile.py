"""Hostile input in the lab: floods of bad adverts and sync datagrams, and secrets kept secret.

The floods run at thousands of packets per second for a bounded time (``FLOOD_SECONDS``)
from raw sockets (IP_HDRINCL: any source, any TTL) in the client namespace (VRRP, and sync
datagrams arriving on the wrong interface) and on the sync link itself (forged, truncated,
replayed, wrong-key datagrams spoofing the peer's address and port). The daemons must drop and
count each under its reason, keep advertising on time (measured on the wire at the backup),
never fail over, and leave the replica exactly as it was.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import itertools
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from invictusd import control
from invictusd.lab.configs import LAN_VRID, PASSWORD, control_socket
from invictusd.lab.topology import Lab
from invictusd.sync import wire
from invictusd.vrrp import packet
from tests.netns.daemons import Pair, lab_pair, pcap_frames, udp_datagrams, wait_for
from tests.netns.test_replication import _assert_converged, _churn, _start_synced, kernel_marked, tables

FLOOD_SECONDS = float(os.environ.get("INVICTUSD_FLOOD_SECONDS", "10"))
VRRP_PPS = int(os.environ.get("INVICTUSD_FLOOD_VRRP_PPS", "6000"))
SYNC_PPS = int(os.environ.get("INVICTUSD_FLOOD_SYNC_PPS", "3000"))
MD_100 = 3 + (256 - 100) / 256  # the backup's Master_Down_Interval
SYNC_PORT = 3781

# Sends prebuilt IPv4 packets (header included) round-robin over categories at a fixed total
# rate, for a bounded time and count. Prints {"sent": {category: n}, "seconds": s}.
FLOOD = r"""
import json, socket, sys, time
spec = json.load(open(sys.argv[1]))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_SOCKET, 25, spec["iface"].encode())
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
cats = [(name, [(bytes.fromhex(p), d) for p, d in pkts]) for name, pkts in spec["packets"].items()]
sent = {name: 0 for name, _ in cats}
errors = 0
rate, limit = spec["rate"], int(spec["rate"] * spec["seconds"])
t0 = time.monotonic()
total, i = 0, 0
while total < limit and time.monotonic() - t0 < spec["seconds"] + 2:
    due = t0 + total / rate
    now = time.monotonic()
    if now < due:
        time.sleep(due - now)
    for name, pkts in cats:
        p, dst = pkts[i % len(pkts)]
        try:
            s.sendto(p, (dst, 0))
            sent[name] += 1
        except OSError:
            errors += 1
        total += 1
    i += 1
print(json.dumps({"sent": sent, "errors": errors, "seconds": round(time.monotonic() - t0, 3)}))
"""


def _ip(src: str, dst: str, proto: int, payload: bytes, ttl: int = 255) -> bytes:
    """An IPv4 header (the kernel fills in the checksum and the id) and ``payload``."""
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, 20 + len(payload), 0, 0, ttl, proto, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return head + payload


def _udp(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    # UDP checksum 0: "not computed", valid for IPv4.
    return _ip(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload, 64)


class Flood:
    """One flood process in a namespace; ``result()`` waits for it and returns its counts."""

    def __init__(self, lab: Lab, node: str, iface: str, rate: int,
                 packets: dict[str, list[tuple[bytes, str]]]) -> None:
        spec = {"iface": iface, "rate": rate, "seconds": FLOOD_SECONDS,
                "packets": {k: [(p.hex(), d) for p, d in v] for k, v in packets.items()}}
        path = lab.write_file(f"flood-{node}-{time.monotonic_ns()}.json", json.dumps(spec))
        script = lab.write_file("flood.py", FLOOD)
        self.proc = lab.python(node, str(script), str(path), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)

    def result(self) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=FLOOD_SECONDS + 30)
        assert self.proc.returncode == 0, err
        return dict(json.loads(out.strip().splitlines()[-1]))


def _vrrp_packets(lab: Lab, rng: random.Random) -> dict[str, list[tuple[bytes, str]]]:
    c = lab.config
    vip = (ipaddress.IPv4Address(c.lan_vip),)
    group = packet.VRRP_GROUP
    pw = PASSWORD.encode()

    def adv(**kw: Any) -> bytes:
        args: dict[str, Any] = {"vrid": LAN_VRID, "priority": 254, "addresses": vip, "auth_data": pw}
        args.update(kw)
        return packet.encode(packet.Advertisement(**args))

    def ip(payload: bytes, ttl: int = 255) -> tuple[bytes, str]:
        return _ip(c.client_ip, group, packet.VRRP_PROTO, payload, ttl), group

    good = adv()
    bad_sum = bytearray(good)
    bad_sum[7] ^= 0x5A
    return {
        "garbage": [ip(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64))))
                    for _ in range(256)],
        "truncated": [ip(good[:n]) for n in range(0, len(good))],
        "checksum": [ip(bytes(bad_sum))],
        # A perfect advert with priority 254 that would take mastership if TTL were not checked.
        "ttl": [ip(good, ttl) for ttl in (1, 64, 128, 254)],
        "auth_fail": [ip(adv(auth_data=p)) for p in (b"s3cre", b"S3cret", b"s3cret!", b"x")],
        "interval": [ip(adv(advert_interval=i)) for i in (2, 3, 255)],
    }


# What each VRRP flood category must be counted as.
VRRP_REASONS = {
    "truncated": {"truncated", "length"},
    "checksum": {"checksum"},
    "ttl": {"ttl"},
    "auth_fail": {"auth_fail"},
    "interval": {"interval"},
}


def _sync_packets(real: list[bytes], src: str, dst: str, rng: random.Random,
                  ) -> dict[str, list[tuple[bytes, str]]]:
    wrong_key = bytes(32)

    def udp(payload: bytes, sport: int = SYNC_PORT) -> tuple[bytes, str]:
        return _udp(src, sport, dst, SYNC_PORT, payload), dst

    def flip(d: bytes) -> bytes:
        b = bytearray(d)
        b[rng.randrange(3, len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)

    def reseal(d: bytes) -> bytes:
        body = d[: -wire.MAC_LEN]
        return body + hmac.digest(wrong_key, body, hashlib.sha256)[: wire.MAC_LEN]

    data = [d for d in real if d[3] == wire.DatagramType.DATA]
    cats: dict[str, list[tuple[bytes, str]]] = {
        "garbage": [udp(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300))))
                    for _ in range(256)],
        "truncated": [udp(d[: rng.randrange(0, len(d))]) for d in real for _ in range(3)],
        "flipped": [udp(flip(d)) for d in real for _ in range(3)],
        "wrong_key": [udp(reseal(d)) for d in real],
        "foreign_port": [udp(d, sport=SYNC_PORT + 1000) for d in real],
    }
    if data:
        cats["replayed"] = [udp(d) for d in data]
    return cats


def _drops(pair: Pair, node: str) -> dict[str, int]:
    return dict(pair.status(node)["vrrp"][0]["counters"]["drops"])


def _sync_counters(pair: Pair, node: str) -> dict[str, int]:
    return dict(pair.status(node)["sync"]["counters"])


def _proc_net(lab: Lab, node: str, table: str, local_port: int) -> int:
    """Sum of the kernel's drop counter of ``node``'s sockets in /proc/net/<table> on a port."""
    total = 0
    for line in lab.exec(node, "cat", f"/proc/net/{table}").splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == local_port:
            total += int(f[-1])
    return total


def _udp_noports(lab: Lab, node: str) -> int:
    lines = [line.split() for line in lab.exec(node, "cat", "/proc/net/snmp").splitlines()
             if line.startswith("Udp:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["NoPorts"])


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in after
            if int(after.get(k, 0)) != int(before.get(k, 0))}


def test_floods_are_dropped_by_reason_without_failover_lag_or_forged_state(measure: Any) -> None:
    rng = random.Random(5)
    with lab_pair() as pair:
        lab = pair.lab
        c = lab.config
        _start_synced(pair)
        _churn(pair, "fw1", "--create", "300", "--seed", "5")
        _assert_converged(pair, "fw1", "fw2", 15)
        # Real datagrams of both directions, to replay and to forge from.
        cap = lab.start_capture("fw2", c.sync_if, "udp")
        _churn(pair, "fw1", "--create", "100", "--delete", "50", "--seed", "6")
        time.sleep(1.5)
        real = udp_datagrams(cap.stop())
        to_fw2 = [p for s, port, p in real if s == c.sync_ips[0] and port == SYNC_PORT]
        to_fw1 = [p for s, port, p in real if s == c.sync_ips[1] and port == SYNC_PORT]
        assert any(d[3] == wire.DatagramType.DATA for d in to_fw2), "no DATA datagram captured"
        assert to_fw1, "nothing captured from fw2"
        n = _assert_converged(pair, "fw1", "fw2", 15)

        # Packets for fw2's sync address arriving on its LAN interface: route them there.
        lab.exec("client", "ip", "route", "add", f"{c.sync_ips[1]}/32", "via", c.fw_lan_ips[1])
        other_if = [(_udp(c.sync_ips[0], SYNC_PORT, c.sync_ips[1], SYNC_PORT, d), c.sync_ips[1])
                    for d in to_fw2]

        before = {
            "tables": {node: tables(pair, node) for node in ("fw1", "fw2")},
            "status": {node: pair.status(node) for node in ("fw1", "fw2")},
            "drops": {node: _drops(pair, node) for node in ("fw1", "fw2")},
            "sync": {node: _sync_counters(pair, node) for node in ("fw1", "fw2")},
            "raw_drops": {node: _proc_net(lab, node, "raw", packet.VRRP_PROTO) for node in ("fw1", "fw2")},
            "udp_drops": {node: _proc_net(lab, node, "udp", SYNC_PORT) for node in ("fw1", "fw2")},
            "noports": _udp_noports(lab, "fw2"),
        }
        adverts = lab.start_capture("fw2", c.lan_if, f"proto 112 and src host {c.fw_lan_ips[0]}")
        time.sleep(3.5)  # a few quiet intervals first: the baseline

        flood_start = time.time()
        vrrp_packets = _vrrp_packets(lab, rng)
        floods = {
            "client": Flood(lab, "client", c.host_if, VRRP_PPS,
                            {**vrrp_packets, "other_if": other_if}),
            "fw1": Flood(lab, "fw1", c.sync_if, SYNC_PPS,
                         _sync_packets(to_fw2, c.sync_ips[0], c.sync_ips[1], rng)),
            "fw2": Flood(lab, "fw2", c.sync_if, SYNC_PPS,
                         _sync_packets(to_fw1, c.sync_ips[1], c.sync_ips[0], rng)),
        }
        sent = {node: f.result() for node, f in floods.items()}
        flood_end = time.time()
        time.sleep(1.2)
        pcap = adverts.stop()
        time.sleep(0.5)

        # ---- the master advertised on time: gaps between its adverts, seen at the backup ----
        times = [t for t, _ in pcap_frames(pcap)]
        quiet = [b - a for a, b in itertools.pairwise(times) if b < flood_start]
        gaps = [b - a for a, b in itertools.pairwise(times) if b > flood_start and a < flood_end]
        assert len(gaps) >= FLOOD_SECONDS - 1, f"only {len(gaps)} advert gaps in the flood window"
        worst = max(gaps)
        after_status = {node: pair.status(node) for node in ("fw1", "fw2")}
        vrrp_total = sum(sent["client"]["sent"][k] for k in vrrp_packets)
        sync_total = sum(sum(s["sent"].values()) for n, s in sent.items() if n != "client")
        measure("flood: VRRP adverts / sync datagrams / wrong-interface datagrams sent",
                f"{vrrp_total} / {sync_total} / {sent['client']['sent']['other_if']} in "
                f"{sent['client']['seconds']}s ({vrrp_total / sent['client']['seconds']:.0f} + "
                f"{sync_total / sent['fw1']['seconds']:.0f} pkt/s)")
        measure("flood: master's advert interval at the backup (max gap / timer lag)",
                f"{worst:.3f}s / {max(0.0, worst - 1):.3f}s over {len(gaps)} gaps (quiet before: "
                f"{max(quiet, default=0):.3f}s); loop max lag "
                f"fw1 {after_status['fw1']['loop']['max_lag_ms']} ms, "
                f"fw2 {after_status['fw2']['loop']['max_lag_ms']} ms")
        # The protocol bound: a gap reaching the backup's Master_Down_Interval is a failover.
        assert worst < MD_100, f"the master was silent for {worst:.2f}s under the flood"

        # ---- no false failover ----
        for node in ("fw1", "fw2"):
            assert (after_status[node]["group"]["transitions"]
                    == before["status"][node]["group"]["transitions"]), node
        assert pair.master() == "fw1"

        # ---- every VRRP packet dropped and counted under its reason, on both daemons ----
        for node in ("fw1", "fw2"):
            d = _delta(_drops(pair, node), before["drops"][node])
            kernel = _proc_net(lab, node, "raw", packet.VRRP_PROTO) - before["raw_drops"][node]
            counted = sum(v for k, v in d.items() if k != "own_packet")
            measure(f"flood: {node} VRRP drops by reason",
                    f"{d}; socket buffer drops {kernel}; counted {counted}/{vrrp_total}")
            assert counted + kernel >= vrrp_total, (node, d, kernel, vrrp_total)
            for cat, reasons in VRRP_REASONS.items():
                got = sum(d.get(r, 0) for r in reasons)
                assert got >= sent["client"]["sent"][cat] - kernel, (node, cat, got, d)

        # ---- every forged sync datagram dropped and counted ----
        for node, flooder in (("fw2", "fw1"), ("fw1", "fw2")):
            d = _delta(_sync_counters(pair, node), before["sync"][node])
            s = sent[flooder]["sent"]
            kernel = _proc_net(lab, node, "udp", SYNC_PORT) - before["udp_drops"][node]
            measure(f"flood: {node} sync counters moved", f"{d}; socket buffer drops {kernel}")
            auth = d.get("drop_auth", 0)
            malformed = d.get("drop_malformed", 0)
            replay = d.get("drop_duplicate", 0) + d.get("drop_epoch", 0) + d.get("drop_retired_epoch", 0)
            assert auth >= s["wrong_key"] + s["flipped"] - kernel, (node, d, s)
            assert auth + malformed >= s["wrong_key"] + s["flipped"] + s["garbage"] + s["truncated"] - kernel
            assert d.get("foreign_datagrams", 0) >= s["foreign_port"] - kernel, (node, d, s)
            if "replayed" in s:
                assert replay >= s["replayed"] - kernel, (node, d, s)
        # Datagrams for the sync address that arrived on the LAN never reached the session.
        noports = _udp_noports(lab, "fw2") - before["noports"]
        measure("flood: sync datagrams on the wrong interface refused by the kernel (NoPorts)",
                f"{noports}/{sent['client']['sent']['other_if']}")
        assert noports >= sent["client"]["sent"]["other_if"] * 0.9

        # ---- the replicas are exactly what they were: nothing forged got in ----
        for node in ("fw1", "fw2"):
            assert tables(pair, node) == before["tables"][node], node
        assert tables(pair, "fw2")["peer"] == kernel_marked(lab, "fw1")
        assert len(kernel_marked(lab, "fw1")) == n
        # And replication still works after the flood.
        _churn(pair, "fw1", "--create", "50", "--seed", "9")
        _assert_converged(pair, "fw1", "fw2", 15)
        for node in ("fw1", "fw2"):
            assert pair.procs[node].poll() is None, f"{node} died"


# ---- secrets ------------------------------------------------------------------------------

VRRP_SECRET = "Zq8-pw7x"  # 8 bytes: the most VRRP auth carries
SYNC_KEY = b"invictusd-test-sync-key-" + bytes.fromhex("a1b2c3d4e5f60718293a4b5c6d7e8f90")


def _secret_forms() -> list[str]:
    return [VRRP_SECRET, VRRP_SECRET.encode().hex(), SYNC_KEY.hex(), SYNC_KEY.hex().upper(),
            SYNC_KEY[:24].decode(), repr(SYNC_KEY)[2:-1]]


def _secret_config(pair: Pair, node: str) -> tuple[Path, Path, Path]:
    """``node``'s config with the password in a file (0640) and the sync key in a file (0644):
    both readable by others, as an administrator might leave them."""
    lab = pair.lab
    pw = lab.write_file(f"{node}-vrrp.pw", VRRP_SECRET + "\n")
    pw.chmod(0o640)
    key = lab.write_file(f"{node}-sync.key", SYNC_KEY)
    key.chmod(0o644)
    path = pair.configure(node, start_as_master=node == "fw1", sync=True,
                          sync_extra={"key_file": str(key)})
    text = path.read_text().replace(f'password = "{PASSWORD}"', f'password_file = "{pw}"')
    path.write_text(text)
    return path, pw, key


def test_secrets_from_files_never_leak_and_loose_files_are_refused(measure: Any) -> None:
    with lab_pair() as pair:
        lab = pair.lab
        c = lab.config
        _, pw1, key1 = _secret_config(pair, "fw1")
        # fw2 keeps its password inline, in a config readable by others.
        path, pw2, key2 = _secret_config(pair, "fw2")
        text = path.read_text()
        text = text.replace(f'password_file = "{pw2}"', f'password = "{VRRP_SECRET}"')
        path.write_text(text)
        path.chmod(0o644)
        # Issue 8 item 4: loose secret files are refused (they used to be only warned about):
        # each daemon exits at once naming the file, never the secret.
        for node, culprit in (("fw1", pw1), ("fw2", path)):
            pair.start(node, wait_ready=False)
            assert pair.procs[node].wait(10) == 2, pair.log(node)
            assert str(culprit) in pair.log(node) and "refusing" in pair.log(node)
        pw1.chmod(0o600)
        assert (pair.start("fw1", wait_ready=False), pair.procs["fw1"].wait(10))[1] == 2
        assert str(key1) in pair.log("fw1").splitlines()[-1]
        for f in (key1, key2, path):
            f.chmod(0o600)
        pair.start("fw1")
        pair.start("fw2")
        wait_for(lambda: pair.master() == "fw1", 12, what="fw1 master")
        wait_for(lambda: pair.status("fw2")["sync"]["synced"], 10, what="fw2 synced")
        _churn(pair, "fw1", "--create", "50", "--seed", "2")
        _assert_converged(pair, "fw1", "fw2", 10)
        assert pair.status("fw2")["sync"]["counters"]["drop_auth"] == 0  # same key both sides

        # Everything that prints state: status, tables, the SIGUSR2 dump, a reload, a
        # failover and back, and a wrong-password advert (logged as a drop).
        outputs = []
        for node in ("fw1", "fw2"):
            outputs.append(json.dumps(pair.status(node)))
            outputs.append(json.dumps(control.request(control_socket(lab, node), "tables", timeout=10)))
            pair.signal(node, signal.SIGUSR2)
            pair.signal(node, signal.SIGHUP)
        wrong = packet.encode(packet.Advertisement(LAN_VRID, 254, (ipaddress.IPv4Address(c.lan_vip),),
                                                   auth_data=VRRP_SECRET[:7].encode()))
        code = ("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_RAW,112)\n"
                "s.setsockopt(socket.IPPROTO_IP,socket.IP_MULTICAST_TTL,255)\n"
                f"s.sendto(bytes.fromhex('{wrong.hex()}'),('224.0.0.18',0))\n")
        lab.exec("client", sys.executable, "-c", code)
        pair.signal("fw1", signal.SIGUSR1)
        wait_for(lambda: pair.master() == "fw2", 5, what="fw2 master after step-down")
        assert control.request(control_socket(lab, "fw1"), "resume")["ok"]
        wait_for(lambda: pair.master() == "fw1", 10, what="fw1 back")
        wait_for(lambda: all(any(e.get("event") == "status dump" for e in pair.log_events(n))
                             for n in ("fw1", "fw2")), 5, what="SIGUSR2 dumps")
        wait_for(lambda: all(sum(e.get("event") == "reloaded" for e in pair.log_events(n)) >= 1
                             for n in ("fw1", "fw2")), 5, what="reloads")
        wait_for(lambda: any(e.get("reason") == "auth_fail" for e in pair.log_events("fw2")), 5,
                 what="the wrong-password advert logged")
        for node in ("fw1", "fw2"):
            outputs.append(json.dumps(pair.status(node)))
            outputs.append(pair.log(node))
        blob = "\n".join(outputs)
        measure("secrets: bytes of logs, status, tables and dumps searched",
                f"{len(blob)} for {len(_secret_forms())} forms of the password and key")
        for form in _secret_forms():
            assert form not in blob, f"secret leaked: {form!r}"
        # The key source is named (so an operator can tell), the key itself is not.
        assert any(e.get("key") == "key_file" for e in pair.log_events("fw1")
                   if e.get("event") == "replication started")
