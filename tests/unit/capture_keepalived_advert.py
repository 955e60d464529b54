"""Capture one VRRPv2 advertisement sent by keepalived, for the golden vector in
``test_vrrp_packet.py`` (which pins the hex so the unit suite never needs keepalived).

Run as root from the repository root:

    python3 -m tests.unit.capture_keepalived_advert

It builds a throwaway namespace with a veth pair (10.77.0.2/24 on one end), starts keepalived
(Debian package) with VRID 51, priority 100, advert_int 1, PASS auth "secret" and virtual
address 10.77.0.1/24, captures adverts with ``tcpdump -w`` and prints the VRRP message (IP
payload) and the TTL/source of the first one. The namespace is removed even on failure.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import nsutil

KEEPALIVED_CONF = """\
global_defs {
    router_id capture
    enable_script_security
}
vrrp_instance CAPTURE {
    state BACKUP
    interface veth0
    virtual_router_id 51
    priority 100
    advert_int 1
    authentication {
        auth_type PASS
        auth_pass secret
    }
    virtual_ipaddress {
        10.77.0.1/24
    }
}
"""


def _pcap_packets(data: bytes) -> list[bytes]:
    """Frames of a classic pcap file (Ethernet link type)."""
    magic = struct.unpack_from("<I", data)[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack_from(f"{endian}I", data, 20)[0]
    if linktype != 1:
        raise RuntimeError(f"unexpected pcap link type {linktype}")
    frames, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack_from(f"{endian}I", data, off + 8)[0]
        frames.append(data[off + 16 : off + 16 + incl])
        off += 16 + incl
    return frames


def vrrp_from_frame(frame: bytes) -> tuple[str, int, bytes] | None:
    """(source, ttl, VRRP message) of an Ethernet/IPv4/proto-112 frame, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    if ip[9] != 112:
        return None
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack_from("!H", ip, 2)[0]
    source = ".".join(str(b) for b in ip[12:16])
    return source, ip[8], ip[ihl:total]


def capture(seconds: float = 6.0) -> list[tuple[str, int, bytes]]:
    with tempfile.TemporaryDirectory() as tmp, nsutil.netns("kacap") as ns:
        d = Path(tmp)
        nsutil.ns_exec(ns, "ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
        nsutil.ns_exec(ns, "ip", "addr", "add", "10.77.0.2/24", "dev", "veth0")
        nsutil.ns_exec(ns, "ip", "link", "set", "veth0", "up")
        nsutil.ns_exec(ns, "ip", "link", "set", "veth1", "up")
        (d / "keepalived.conf").write_text(KEEPALIVED_CONF)
        pcap = d / "vrrp.pcap"
        dump = subprocess.Popen(
            ["ip", "netns", "exec", ns, "tcpdump", "-i", "veth0", "-U", "-n", "-w", str(pcap),
             "ip proto 112"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        ka = None
        try:
            time.sleep(1.0)
            ka = subprocess.Popen(
                ["ip", "netns", "exec", ns, "/usr/sbin/keepalived", "-n", "-l", "-D",
                 "-f", str(d / "keepalived.conf"), "--pid", str(d / "ka.pid"),
                 "--vrrp_pid", str(d / "vrrp.pid"), "--checkers_pid", str(d / "chk.pid")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            # Alone on the link it becomes master after Master_Down (about 3.6 s), then sends
            # one advert a second.
            time.sleep(seconds)
        finally:
            if ka is not None:
                ka.terminate()
                ka.wait(timeout=10)
            time.sleep(0.3)
            dump.terminate()
            dump.wait(timeout=10)
        frames = _pcap_packets(pcap.read_bytes())
    return [v for v in map(vrrp_from_frame, frames) if v is not None]


def main() -> int:
    adverts = capture()
    if not adverts:
        print("no VRRP packet captured", file=sys.stderr)
        return 1
    for source, ttl, msg in adverts:
        print(f"source={source} ttl={ttl} vrrp={msg.hex()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
