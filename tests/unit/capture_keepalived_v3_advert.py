"""Capture VRRPv3 advertisements sent by keepalived, for the golden vectors in
``test_vrrp_v3.py`` (which pins the hex so the unit suite never needs keepalived).

Run as root from the repository root:

    python3 -m tests.unit.capture_keepalived_v3_advert

It builds two throwaway namespaces joined by a veth pair: keepalived's side (veth0,
10.77.0.2/24, link-local fe80::2) and a peer (veth1, 10.77.0.3/24, link-local fe80::3; the
unicast adverts need someone to resolve the destination). Link-locals are set by hand
(``addrgenmode none``) so that the pseudo-header of every capture is reproducible. keepalived
(Debian package) runs four ``version 3`` instances, no authentication:

| instance | VRID | family, destination | advert_int | virtual address |
|---|---|---|---|---|
| V4M | 51 | IPv4 multicast 224.0.0.18 | 1 | 10.77.0.1/24 |
| V6M | 52 | IPv6 multicast ff02::12 | 0.5 | fd77::1/64 |
| V4U | 53 | IPv4 unicast to 10.77.0.3 | 0.1 | 10.77.0.11/24 |
| V6U | 54 | IPv6 unicast to fe80::3, unicast_ttl 255 | 0.25 | fd77::11/64 |

``tcpdump -w`` on veth0 records the adverts and, after SIGTERM, the priority-0 ones. For each
family/VRID/priority the first packet is printed with its source, destination, TTL or hop
limit and the VRRP message (the IP payload). The namespaces are removed even on failure.
"""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import nsutil
from tests.unit.capture_keepalived_advert import _pcap_packets

KEEPALIVED_CONF = """\
global_defs {
    router_id capture3
    enable_script_security
    vrrp_garp_master_delay 0
}
vrrp_instance V4M {
    version 3
    state BACKUP
    interface veth0
    virtual_router_id 51
    priority 100
    advert_int 1
    virtual_ipaddress {
        10.77.0.1/24
    }
}
vrrp_instance V6M {
    version 3
    state BACKUP
    interface veth0
    virtual_router_id 52
    priority 100
    advert_int 0.5
    virtual_ipaddress {
        fd77::1/64
    }
}
vrrp_instance V4U {
    version 3
    state BACKUP
    interface veth0
    virtual_router_id 53
    priority 200
    advert_int 0.1
    unicast_src_ip 10.77.0.2
    unicast_peer {
        10.77.0.3
    }
    virtual_ipaddress {
        10.77.0.11/24
    }
}
vrrp_instance V6U {
    version 3
    state BACKUP
    interface veth0
    virtual_router_id 54
    priority 254
    advert_int 0.25
    unicast_ttl 255
    unicast_peer {
        fe80::3
    }
    virtual_ipaddress {
        fd77::11/64
    }
}
"""

Advert = tuple[str, str, int, bytes]  # source, destination, TTL or hop limit, VRRP message


def vrrp_from_frame(frame: bytes) -> Advert | None:
    """(source, destination, TTL/hop limit, VRRP message) of an Ethernet frame, else None."""
    if len(frame) < 14:
        return None
    ethertype = frame[12:14]
    ip = frame[14:]
    if ethertype == b"\x08\x00" and len(ip) >= 20 and ip[9] == 112:
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        return (str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20])),
                ip[8], ip[ihl:total])
    if ethertype == b"\x86\xdd" and len(ip) >= 40 and ip[6] == 112:
        length = struct.unpack_from("!H", ip, 4)[0]
        return (str(ipaddress.IPv6Address(ip[8:24])), str(ipaddress.IPv6Address(ip[24:40])),
                ip[7], ip[40 : 40 + length])
    return None


def _setup(a: str, b: str) -> None:
    nsutil.ns_exec(a, "ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
                   "netns", b)
    for ns, dev, v4, ll in ((a, "veth0", "10.77.0.2/24", "fe80::2/64"),
                            (b, "veth1", "10.77.0.3/24", "fe80::3/64")):
        nsutil.ns_exec(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0",
                       "net.ipv6.conf.default.accept_dad=0")
        nsutil.ns_exec(ns, "ip", "link", "set", dev, "addrgenmode", "none")
        nsutil.ns_exec(ns, "ip", "addr", "add", v4, "dev", dev)
        nsutil.ns_exec(ns, "ip", "addr", "add", ll, "dev", dev, "nodad")
        nsutil.ns_exec(ns, "ip", "link", "set", dev, "up")


def capture(seconds: float = 6.0) -> list[Advert]:
    with tempfile.TemporaryDirectory() as tmp, nsutil.netns("ka3a") as a, nsutil.netns("ka3b") as b:
        d = Path(tmp)
        _setup(a, b)
        (d / "keepalived.conf").write_text(KEEPALIVED_CONF)
        pcap = d / "vrrp.pcap"
        dump = subprocess.Popen(
            ["ip", "netns", "exec", a, "tcpdump", "-i", "veth0", "-U", "-n", "-w", str(pcap),
             "ip proto 112 or ip6 proto 112"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        ka = None
        try:
            time.sleep(1.0)
            ka = subprocess.Popen(
                ["ip", "netns", "exec", a, "/usr/sbin/keepalived", "-n", "-l", "-D",
                 "-f", str(d / "keepalived.conf"), "--pid", str(d / "ka.pid"),
                 "--vrrp_pid", str(d / "vrrp.pid"), "--checkers_pid", str(d / "chk.pid")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            # Alone on the link each instance becomes master after its Master_Down.
            time.sleep(seconds)
        finally:
            if ka is not None:
                ka.terminate()
                ka.wait(timeout=10)
            time.sleep(0.5)
            dump.terminate()
            dump.wait(timeout=10)
        frames = _pcap_packets(pcap.read_bytes())
    return [v for v in map(vrrp_from_frame, frames) if v is not None]


def main() -> int:
    adverts = capture()
    if not adverts:
        print("no VRRP packet captured", file=sys.stderr)
        return 1
    seen: set[tuple[str, int, int]] = set()
    for source, destination, ttl, msg in adverts:
        key = (destination, msg[1], msg[2])  # destination, VRID, priority
        if key in seen:
            continue
        seen.add(key)
        print(f"source={source} destination={destination} ttl={ttl} vrrp={msg.hex()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
