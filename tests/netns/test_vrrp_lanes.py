"""The receive lanes in the real kernel: VRRPv3 over IPv4 and IPv6, multicast and unicast, and
VRRPv2 with unicast peers.

``tests/unit/test_vrrp_filter.py`` proves in a cBPF VM that the programs split packets as the
receive checks would; this proves the kernel runs them on the data the VM assumes:

* an IPv4 raw socket's filter sees the packet from the IPv4 header;
* an IPv6 raw socket's filter sees the VRRP payload at offset 0 (after any extension header,
  ``ld len`` its length) and the IPv6 header through ``SKF_NET_OFF`` (hop limit, source,
  destination), so the hop limit and the pseudo-header checksum are checked in the kernel;
* a filter on an IPv6 raw socket does not make the kernel verify the checksum itself: a
  corrupt advert still arrives (on the slow lane), to be counted;
* unicast receivers never see the group's packets, even when another socket of the host
  joined the group (``IP_MULTICAST_ALL``/``IPV6_MULTICAST_ALL`` off).

Every packet is crafted with its full IP header (``IPPROTO_RAW``) in fw1 and sent on the LAN
to fw2, where one socket set per case reports which lane each packet reached (by the
priority byte, a marker unique per packet).
"""

from __future__ import annotations

import ipaddress
import json
import struct
import subprocess
from typing import Any

from invictusd.lab.configs import LAN_VRID, PASSWORD
from invictusd.lab.topology import Lab, LabConfig
from invictusd.vrrp import packet, v3

A4, A6 = ipaddress.IPv4Address, ipaddress.IPv6Address

RECEIVER = r"""
import ipaddress, json, socket, sys, time
from invictusd.io.vrrp6_socket import Vrrp6Socket
from invictusd.io.vrrp_socket import VrrpSocket
from invictusd.vrrp.filter import LaneSpec

cfg = json.load(open(sys.argv[1]))
ifindex = socket.if_nametoindex(cfg["ifname"])
socks = {}
for name, s in cfg["cases"].items():
    own = ipaddress.ip_address(s["own"])
    peers = tuple(ipaddress.ip_address(p) for p in s["peers"])
    spec = LaneSpec(s["vrid"], s["count"], password=s["password"].encode(), version=s["version"],
                    family=own.version, own=own, peers=peers)
    cls = VrrpSocket if own.version == 4 else Vrrp6Socket
    socks[name] = (own.version, cls(cfg["ifname"], ifindex, own, spec, unicast=bool(peers)))
print("ready", flush=True)
sys.stdin.readline()
time.sleep(0.5)
out = {}
for name, (family, sk) in socks.items():
    out[name] = {}
    for lane in ("fast", "slow"):
        marks = []
        for p in sk.recv(getattr(sk, lane), 10000):
            payload = p[(p[0] & 15) * 4:] if family == 4 else p.payload
            marks.append(payload[2] if len(payload) > 2 else -1)
        out[name][lane] = sorted(marks)
print(json.dumps(out), flush=True)
"""

SENDER = r"""
import json, socket, sys
cfg = json.load(open(sys.argv[1]))
ifindex = socket.if_nametoindex(cfg["ifname"])
s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IPV6_HDRINCL
for s in (s4, s6):
    s.setsockopt(socket.SOL_SOCKET, 25, cfg["ifname"].encode())
for family, dst, data in cfg["packets"]:
    if family == 4:
        s4.sendto(bytes.fromhex(data), (dst, 0))
    else:
        s6.sendto(bytes.fromhex(data), (dst, 0, 0, ifindex))
"""


def ip4(src: str, dst: str, payload: bytes, ttl: int = 255, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0xC0, 4 * ihl + len(payload), 0, 0, ttl, 112, 0,
                       A4(src).packed, A4(dst).packed) + options + payload


def ip6(src: str, dst: str, payload: bytes, hop_limit: int = 255, hop_by_hop: bool = False) -> bytes:
    if hop_by_hop:  # next header VRRP, PadN over the 6 option bytes
        payload = bytes([112, 0, 1, 4, 0, 0, 0, 0]) + payload
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), 0 if hop_by_hop else 112, hop_limit,
                       A6(src).packed, A6(dst).packed) + payload


def _v3(mark: int, src: str, dst: str, addresses: tuple[Any, ...], vrid: int = LAN_VRID,
        word: int = 10) -> bytes:
    """A VRRPv3 advert with the right checksum; ``word`` is the 16 bits of reserved bits and
    interval, so that it can also say what ``v3.encode`` refuses to (an interval of 0)."""
    body = b"".join(a.packed for a in addresses)
    head = struct.pack("!BBBBHH", 0x31, vrid, mark, len(addresses), word, 0)
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    csum = packet.checksum(v3.pseudo_header(s, d, len(head) + len(body)) + head + body)
    return head[:6] + struct.pack("!H", csum) + body


def _spoil(msg: bytes, at: int, value: int) -> bytes:
    return msg[:at] + bytes([value]) + msg[at + 1:]


def _bad_checksum(msg: bytes) -> bytes:
    """``msg`` with its checksum's low byte inverted: always wrong. (Setting it to 0 left
    the checksum right whenever it already ended in 0, 1 run in 256 with the random
    link-local addresses of the IPv6 cases.)"""
    return _spoil(msg, 7, msg[7] ^ 0xFF)


def test_lanes_in_the_kernel_v3_ipv4_and_ipv6_multicast_and_unicast_v2_unicast() -> None:
    with Lab(LabConfig(ipv6=True)) as lab:
        c = lab.config
        fw1, fw2, stranger = c.fw_lan_ips[0], c.fw_lan_ips[1], c.client_ip
        ll1, ll2 = lab.link_local("fw1", c.lan_if), lab.link_local("fw2", c.lan_if)
        ll_stranger = "fe80::99"
        g4, g6 = str(v3.GROUP4), str(v3.GROUP6)
        vip4, vip6 = (A4(c.lan_vip),), (A6(c.lan_vip6),)
        cases: dict[str, dict[str, Any]] = {
            "m4": {"own": fw2, "peers": []},
            "u4": {"own": fw2, "peers": [fw1]},
            "m6": {"own": ll2, "peers": []},
            "u6": {"own": ll2, "peers": [ll1]},
            "u2": {"own": fw2, "peers": [fw1], "version": 2, "password": PASSWORD},
        }
        for case in cases.values():
            case.setdefault("version", 3)
            case.setdefault("password", "")
            case.update(vrid=LAN_VRID, count=1)
        # (marker, family, destination, packet, the cases whose fast lane takes it). Every
        # other case of the family receives it on its slow lane, but for the unicast ones,
        # which never receive what goes to the group.
        plan: list[tuple[int, int, str, bytes, set[str]]] = []

        def add(mark: int, dst: str, data: bytes, *fast: str) -> None:
            plan.append((mark, ipaddress.ip_address(dst).version, dst, data, set(fast)))

        v2 = packet.encode(packet.Advertisement(LAN_VRID, 8, vip4, auth_data=PASSWORD.encode()))
        add(1, g4, ip4(fw1, g4, _v3(1, fw1, g4, vip4)), "m4")
        add(2, fw2, ip4(fw1, fw2, _v3(2, fw1, fw2, vip4)), "m4", "u4")
        add(3, fw2, ip4(fw1, fw2, _v3(3, fw1, fw2, vip4), ttl=254))
        add(4, fw2, ip4(fw1, fw2, _bad_checksum(_v3(4, fw1, fw2, vip4))))
        add(5, fw2, ip4(fw1, fw2, _v3(5, fw1, fw2, vip4, word=0x1000)))  # interval 0
        add(6, fw2, ip4(fw1, fw2, _v3(6, fw1, fw2, vip4, word=0xF00A)), "m4", "u4")  # reserved
        add(7, fw2, ip4(stranger, fw2, _v3(7, stranger, fw2, vip4)), "m4")
        add(8, fw2, ip4(fw1, fw2, v2), "u2")
        add(9, fw2, ip4(fw1, fw2, _v3(9, fw1, fw2, (*vip4, A4("10.10.0.77")))))
        add(10, fw2, ip4(fw1, fw2, _v3(10, fw1, g4, vip4)))  # checksum for another destination
        add(11, fw2, ip4(fw1, fw2, _v3(11, fw1, fw2, vip4, vrid=LAN_VRID + 1)))
        add(12, fw2, ip4(fw1, fw2, _v3(12, fw1, fw2, vip4), options=b"\x94\x04\x00\x00"))
        add(13, fw2, ip4(fw1, fw2, _spoil(v2, 2, 13)))  # another priority: checksum wrong
        add(14, fw2, ip4(stranger, fw2, packet.encode(packet.Advertisement(
            LAN_VRID, 14, vip4, auth_data=PASSWORD.encode()))))  # a stranger, for u2
        add(21, g6, ip6(ll1, g6, _v3(21, ll1, g6, vip6)), "m6")
        add(22, ll2, ip6(ll1, ll2, _v3(22, ll1, ll2, vip6)), "m6", "u6")
        add(23, ll2, ip6(ll1, ll2, _v3(23, ll1, ll2, vip6), hop_limit=254))
        add(24, ll2, ip6(ll1, ll2, _bad_checksum(_v3(24, ll1, ll2, vip6))))
        add(25, ll2, ip6(ll1, ll2, _v3(25, ll1, ll2, vip6, word=0x1000)))
        add(26, ll2, ip6(ll_stranger, ll2, _v3(26, ll_stranger, ll2, vip6)), "m6")
        add(27, ll2, ip6(ll1, ll2, _v3(27, ll1, ll2, vip6), hop_by_hop=True), "m6", "u6")
        add(28, ll2, ip6(ll1, ll2, _spoil(_v3(28, ll1, ll2, vip6), 0, 0x21)))
        add(29, ll2, ip6(ll1, ll2, _v3(29, ll1, g6, vip6)))  # checksum for another destination
        add(30, g6, ip6(ll1, g6, _v3(30, ll1, g6, vip6), hop_limit=1))

        rx_cfg = lab.write_file("lanes-rx.json", json.dumps({"ifname": c.lan_if, "cases": cases}))
        tx_cfg = lab.write_file("lanes-tx.json", json.dumps({"ifname": c.lan_if, "packets": [
            (family, dst, data.hex()) for _, family, dst, data, _ in plan]}))
        rx_script = lab.write_file("lanes-rx.py", RECEIVER)
        tx_script = lab.write_file("lanes-tx.py", SENDER)
        rx = lab.python("fw2", str(rx_script), str(rx_cfg), stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert rx.stdout is not None and rx.stdout.readline().strip() == "ready", rx.stderr
        lab.exec("fw1", "python3", str(tx_script), str(tx_cfg))
        out, err = rx.communicate("go\n", timeout=20)
        got = json.loads(out.strip().splitlines()[-1])
        want: dict[str, dict[str, list[int]]] = {n: {"fast": [], "slow": []} for n in cases}
        for mark, family, dst, _, fast in plan:
            for name, case in cases.items():
                if ipaddress.ip_address(case["own"]).version != family or (
                        case["peers"] and ipaddress.ip_address(dst).is_multicast):
                    continue
                want[name]["fast" if name in fast else "slow"].append(mark)
        assert got == want, (got, want, err)
