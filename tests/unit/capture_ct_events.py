"""Capture real ctnetlink event layouts, for the golden vectors of ``test_transcode.py``
(which pins the hex so the unit suite never needs root).

Run as root from the repository root:

    python3 -m tests.unit.capture_ct_events [--json FILE]

In a throwaway namespace (``nf_conntrack_events=1``) it listens on the NEW/UPDATE/DESTROY
groups with a raw NETLINK_NETFILTER socket and makes entries three ways: injected over
ctnetlink with ``ctnetlink.build_create`` (they carry CTA_SYNPROXY), with the conntrack CLI,
and by real packets on local addresses (ping, UDP, TCP through nft rules that set the mark,
SNAT, DNAT, zones). Every event is printed as ``label<TAB>hex`` with a one-line summary of
its attribute layout. The namespace is removed even on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from invictusd import flows as F
from invictusd.flows import Flow, FlowKey
from invictusd.io import ctnetlink as ct
from tests import nsutil

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_NETFILTER = 12
MARK = 1 << 30
V4 = socket.inet_aton


def V6(s: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, s)


def layout(msg: bytes) -> str:
    """``type flags: attr(len)[nested...] ...`` for a quick look at a message's shape."""

    def walk(start: int, end: int, depth: int) -> str:
        out = []
        a = start
        while a + 4 <= end:
            alen, atype = struct.unpack_from("=HH", msg, a)
            if alen < 4:
                break
            t = atype & 0x3FFF
            if atype & 0x8000 and depth < 3:
                out.append(f"{t}({alen})[{walk(a + 4, a + alen, depth + 1)}]")
            else:
                out.append(f"{t}({alen})")
            a += (alen + 3) & ~3
        return " ".join(out)

    mlen, mtype, mflags, _seq, pid = struct.unpack_from("=IHHII", msg)
    return f"len={mlen} type={mtype:#x} flags={mflags:#x} pid={pid} fam={msg[16]}: {walk(20, mlen, 0)}"


def split(buf: bytes) -> Iterator[bytes]:
    off = 0
    while off + 16 <= len(buf):
        mlen = struct.unpack_from("=I", buf, off)[0]
        if mlen < 16:
            return
        yield buf[off : off + mlen]
        off += (mlen + 3) & ~3


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True, timeout=30)


NFT = """
table inet cap {
    chain raw_out { type filter hook output priority -300;
        ip daddr 10.9.0.50 ct zone set 7
        ip daddr 10.9.0.51 ct original zone set 9
    }
    chain mangle_out { type filter hook output priority -150;
        ip daddr { 10.9.0.1, 10.9.0.100, 10.9.0.50, 10.9.0.51 } ct mark set 0x40000000
        ip6 daddr fd09::1 ct mark set 0x40000000
    }
}
table ip capnat {
    chain out { type nat hook output priority -100;
        ip daddr 10.9.0.100 tcp dport 80 dnat to 10.9.0.1:8080
        ip daddr 10.9.0.100 udp dport 53 dnat to 10.9.0.1
    }
    chain post { type nat hook postrouting priority 100;
        ip daddr 10.9.0.1 udp dport 9999 snat to 10.9.0.9:40000
        ip daddr 10.9.0.1 tcp dport 7777 snat to 10.9.0.9
    }
}
"""


def scenarios(inj: socket.socket) -> list[tuple[str, Callable[[], None]]]:
    seq = iter(range(1, 1 << 30))

    def send(msg: bytes) -> None:
        inj.send(msg)
        acks = ct.parse_acks(inj.recv(65536))
        if any(err for _, err in acks):
            raise RuntimeError(f"kernel refused: {acks}")

    def inject(flow: Flow) -> None:
        send(ct.build_create(flow, next(seq)))

    def update(flow: Flow) -> None:
        send(ct.build_create(flow, next(seq), create=False))

    def delete(flow: Flow) -> None:
        send(ct.build_delete(flow, next(seq)))

    est = F.IPS_SEEN_REPLY | F.IPS_ASSURED
    tcp = Flow(FlowKey(4, 6, V4("10.0.0.1"), V4("10.0.0.2"), 40000, 80),
               FlowKey(4, 6, V4("10.0.0.2"), V4("10.0.0.1"), 80, 40000), 0, est, 300, MARK, 3)
    snat = Flow(FlowKey(4, 6, V4("192.168.1.10"), V4("10.0.0.2"), 33333, 80),
                FlowKey(4, 6, V4("10.0.0.2"), V4("10.9.9.9"), 80, 40001), 0, est, 300, MARK, 3)
    dnat = Flow(FlowKey(4, 17, V4("10.0.0.5"), V4("10.0.0.100"), 4444, 53),
                FlowKey(4, 17, V4("192.168.1.20"), V4("10.0.0.5"), 5353, 4444), 0, 2, 30, MARK, 0)
    udp6 = Flow(FlowKey(6, 17, V6("fd00::1"), V6("fd00::2"), 5000, 53),
                FlowKey(6, 17, V6("fd00::2"), V6("fd00::1"), 53, 5000), 0, 2, 30, MARK | 3, 0)
    tcp6 = Flow(FlowKey(6, 6, V6("fd00::1"), V6("fd00::2"), 40000, 443),
                FlowKey(6, 6, V6("fd00::2"), V6("fd00::1"), 443, 40000), 0, est, 300, MARK, 3)
    icmp = Flow(FlowKey(4, 1, V4("10.0.0.1"), V4("10.0.0.2"), 77, 8 << 8),
                FlowKey(4, 1, V4("10.0.0.2"), V4("10.0.0.1"), 77, 0), 0, 0, 30, MARK, 0)
    zoned = Flow(FlowKey(4, 6, V4("10.0.0.1"), V4("10.0.0.2"), 1000, 22, 5),
                 FlowKey(4, 6, V4("10.0.0.2"), V4("10.0.0.1"), 22, 1000, 5), 0, est, 300, MARK, 3)
    dirzone = Flow(FlowKey(4, 17, V4("10.0.0.1"), V4("10.0.0.2"), 1000, 53, 6),
                   FlowKey(4, 17, V4("10.0.0.2"), V4("10.0.0.9"), 53, 1000, 0), 0, 2, 30, MARK, 0)
    unmarked = tcp._replace(orig=tcp.orig._replace(sport=40001), reply=tcp.reply._replace(dport=40001),
                            mark=0)

    def nl_tcp() -> None:
        inject(tcp)
        update(tcp._replace(timeout=200, mark=MARK | 1))
        delete(tcp)

    def nl_unmarked() -> None:
        inject(unmarked)
        delete(unmarked)

    def nl_each(flow: Flow) -> Callable[[], None]:
        def run() -> None:
            inject(flow)
            delete(flow)
        return run

    def packets_udp() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            r.bind(("10.9.0.1", 5000))
            s.bind(("10.9.0.1", 6000))
            s.sendto(b"x", ("10.9.0.1", 5000))
            r.recvfrom(10)
            r.sendto(b"y", ("10.9.0.1", 6000))
            s.recvfrom(10)
        sh("conntrack -D -p udp --orig-port-dst 5000")

    def packets_tcp(dst: str, port: int) -> Callable[[], None]:
        def run() -> None:
            with socket.socket() as lsock:
                lsock.bind(("10.9.0.1", 8080 if dst == "10.9.0.100" else port))
                lsock.listen()
                c = socket.create_connection((dst, port), timeout=5)
                a, _ = lsock.accept()
                c.send(b"hello")
                a.recv(10)
                a.close()
                c.close()
            time.sleep(0.05)
            sh(f"conntrack -D -p tcp --orig-port-dst {port}")
        return run

    def packets_snat_udp() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            r.bind(("0.0.0.0", 9999))
            s.sendto(b"x", ("10.9.0.1", 9999))
            r.recvfrom(10)
        sh("conntrack -D -p udp --orig-port-dst 9999")

    def packets_dnat_udp() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            r.bind(("10.9.0.1", 53))
            s.sendto(b"x", ("10.9.0.100", 53))
            r.recvfrom(10)
        sh("conntrack -D -p udp --orig-port-dst 53")

    def packets_ping() -> None:
        sh("ping -c1 -W1 10.9.0.1")
        sh("conntrack -D -p icmp")

    def packets_ping6() -> None:
        sh("ping -6 -c1 -W1 fd09::1")
        sh("conntrack -D -f ipv6 -p icmpv6")

    def packets_zone(dst: str) -> Callable[[], None]:
        def run() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"x", (dst, 4242))
            time.sleep(0.05)
            sh(f"conntrack -D -p udp --orig-port-dst 4242 -w {7 if dst.endswith('50') else 9}"
               " || conntrack -D -p udp --orig-port-dst 4242 --orig-zone 9")
        return run

    def cli_tcp() -> None:
        sh("conntrack -I -p tcp -s 10.0.0.1 -d 10.0.0.2 --sport 1 --dport 2 --state ESTABLISHED"
           " -t 100 -u SEEN_REPLY -m 0x40000000")
        sh("conntrack -U -p tcp -s 10.0.0.1 -d 10.0.0.2 --sport 1 --dport 2 -m 0x40000001")
        sh("conntrack -D -p tcp -s 10.0.0.1 -d 10.0.0.2 --sport 1 --dport 2")

    return [
        ("nl_tcp", nl_tcp),
        ("nl_unmarked", nl_unmarked),
        ("nl_snat", nl_each(snat)),
        ("nl_dnat", nl_each(dnat)),
        ("nl_udp6", nl_each(udp6)),
        ("nl_tcp6", nl_each(tcp6)),
        ("nl_icmp", nl_each(icmp)),
        ("nl_zone", nl_each(zoned)),
        ("nl_dirzone", nl_each(dirzone)),
        ("cli_tcp", cli_tcp),
        ("pkt_udp", packets_udp),
        ("pkt_tcp", packets_tcp("10.9.0.1", 7000)),
        ("pkt_tcp_snat", packets_tcp("10.9.0.1", 7777)),
        ("pkt_tcp_dnat", packets_tcp("10.9.0.100", 80)),
        ("pkt_udp_snat", packets_snat_udp),
        ("pkt_udp_dnat", packets_dnat_udp),
        ("pkt_ping", packets_ping),
        ("pkt_ping6", packets_ping6),
        ("pkt_zone", packets_zone("10.9.0.50")),
        ("pkt_dirzone", packets_zone("10.9.0.51")),
    ]


def capture() -> list[tuple[str, str]]:
    sh("sysctl -qw net.netfilter.nf_conntrack_events=1")
    sh("ip link add dummy0 type veth peer name dummy1 && ip link set dummy0 up && ip link set dummy1 up")
    sh("ip addr add 10.9.0.1/24 dev dummy0 && ip addr add 10.9.0.9/24 dev dummy0")
    sh("ip addr add fd09::1/64 dev dummy0 nodad")
    subprocess.run(["nft", "-f", "-"], input=NFT, check=True, text=True, capture_output=True)
    ev = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    ev.bind((0, 0))
    for group in (1, 2, 3):
        ev.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    ev.settimeout(0.3)
    inj = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    inj.bind((0, 0))
    inj.settimeout(5)
    out: list[tuple[str, str]] = []
    for label, run in scenarios(inj):
        run()
        while True:
            try:
                data = ev.recv(65536)
            except TimeoutError:
                break
            out.extend((label, m.hex()) for m in split(data))
    return out


def main() -> int:
    r, w = os.pipe()
    with nsutil.netns("cap") as ns:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                nsutil.enter(ns)
                payload = json.dumps(capture()).encode()
            except BaseException as e:
                payload = json.dumps([["error", repr(e)]]).encode()
                code = 1
            with os.fdopen(w, "wb") as f:
                f.write(payload)
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            events = json.loads(f.read())
        os.waitpid(pid, 0)
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(events, f, indent=0)
    for label, hx in events:
        if label == "error":
            print(hx, file=sys.stderr)
            return 1
        print(f"{label}\t{layout(bytes.fromhex(hx))}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
