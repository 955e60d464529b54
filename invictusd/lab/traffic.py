"""Traffic tools for the lab, run inside a namespace as ``python3 -m invictusd.lab.traffic``.

``server``   echo server on TCP and UDP ports (IPv4 and IPv6), checking each flow's sequence.
``client``   one long-lived flow (one TCP connection or one UDP 5-tuple) sending a small
             numbered message every ``--interval`` seconds and timing each echo. It writes a
             JSON result to ``--out`` on exit, on SIGTERM/SIGINT, and as a snapshot on SIGUSR1.
``announce`` gratuitous ARP (IPv4) or unsolicited neighbour advertisement (IPv6) for
             addresses on an interface, for tests that move a virtual address by hand.

The question a failover test asks of a flow is: did it survive, and how long was the worst
silence? So the result names the error that ended the flow (``reset``, ``closed``,
``timeout``, ...) or ``null``, and the largest gap between successive echoes, counting the
silence at the end of the run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import select
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from invictusd.atomicfile import write_atomic

MAGIC = b"IVDL"
# magic, sequence number, send time (CLOCK_MONOTONIC, shared by all namespaces), flag, padding
MESSAGE = struct.Struct("!4sQdB11x")
FLAG_SEQ_ERROR = 1  # the server saw this flow's sequence jump or repeat

READY = "READY"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


# ---------------------------------------------------------------------------------------------
# server


def _serve_tcp_conn(conn: socket.socket) -> None:
    expected: int | None = None
    buf = bytearray()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            out = bytearray()
            while len(buf) >= MESSAGE.size:
                magic, seq, sent, flag = MESSAGE.unpack_from(buf)
                del buf[: MESSAGE.size]
                if magic != MAGIC:
                    return  # not our client; drop the connection
                if expected is not None and seq != expected:
                    flag |= FLAG_SEQ_ERROR
                expected = seq + 1
                out += MESSAGE.pack(MAGIC, seq, sent, flag)
            try:
                conn.sendall(out)
            except OSError:
                return


def _serve_tcp(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_tcp_conn, args=(conn,), daemon=True).start()


def _serve_udp(sock: socket.socket) -> None:
    last: dict[Any, int] = {}
    while True:
        data, peer = sock.recvfrom(65536)
        if len(data) < MESSAGE.size:
            continue
        magic, seq, sent, flag = MESSAGE.unpack_from(data)
        if magic != MAGIC:
            continue
        # UDP may lose datagrams (a gap is fine) but must never repeat or reorder them.
        if peer in last and seq <= last[peer]:
            flag |= FLAG_SEQ_ERROR
        last[peer] = seq
        with contextlib.suppress(OSError):
            sock.sendto(MESSAGE.pack(MAGIC, seq, sent, flag), peer)


def _listeners(tcp_ports: list[int], udp_ports: list[int], ipv6: bool) -> list[socket.socket]:
    socks: list[socket.socket] = []
    families = [socket.AF_INET, socket.AF_INET6] if ipv6 else [socket.AF_INET]
    for fam in families:
        host = "::" if fam == socket.AF_INET6 else "0.0.0.0"
        for port in tcp_ports:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            s.listen(128)
            socks.append(s)
        for port in udp_ports:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            socks.append(s)
    return socks


def serve(tcp_ports: list[int], udp_ports: list[int], ipv6: bool = True) -> None:
    socks = _listeners(tcp_ports, udp_ports, ipv6)
    for s in socks:
        target = _serve_tcp if s.type == socket.SOCK_STREAM else _serve_udp
        threading.Thread(target=target, args=(s,), daemon=True).start()
    print(READY, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


# ---------------------------------------------------------------------------------------------
# client


@dataclass
class FlowResult:
    """What a client reports. Times are CLOCK_MONOTONIC seconds (comparable across namespaces)."""

    proto: str
    dst: str
    port: int
    local: str = ""
    local_port: int = 0
    started: float = 0.0
    ended: float = 0.0
    sent: int = 0
    acked: int = 0
    bytes_ok: int = 0
    error: str | None = None
    error_detail: str = ""
    seq_ok: bool = True
    max_gap: float = 0.0  # largest interval between successive echoes
    tail_gap: float = 0.0  # from the last echo (or the start) to the end of the run
    first_ack: float | None = None
    last_ack: float | None = None
    snapshot: int = 0
    final: bool = False
    # [seq, sent, acked] per echoed message
    acks: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def worst_gap(self) -> float:
        return max(self.max_gap, self.tail_gap)


class _Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.result = FlowResult(proto=args.proto, dst=args.dst, port=args.port)
        self.stop = False
        self.sent_at: dict[int, float] = {}
        self.next_ack = 0  # TCP: the sequence number the next echo must carry

    def write(self, final: bool = False) -> None:
        r = self.result
        if r.error is None and not r.final:
            r.ended = time.monotonic()
            r.tail_gap = r.ended - (r.last_ack if r.last_ack is not None else r.started)
        r.final = r.final or final
        r.snapshot += 1
        write_atomic(self.args.out, json.dumps(asdict(r)).encode(), mode=0o644)

    def on_echo(self, data: bytes | bytearray, now: float) -> None:
        magic, seq, _sent, flag = MESSAGE.unpack_from(data)
        r = self.result
        if magic != MAGIC:
            r.seq_ok = False
            return
        if flag & FLAG_SEQ_ERROR:
            r.seq_ok = False
        if self.args.proto == "tcp":
            if seq != self.next_ack:
                r.seq_ok = False
            self.next_ack = seq + 1
        elif r.acks and seq <= r.acks[-1][0]:
            r.seq_ok = False
        if r.last_ack is not None:
            r.max_gap = max(r.max_gap, now - r.last_ack)
        else:
            r.first_ack = now
        r.last_ack = now
        r.acked += 1
        r.bytes_ok += MESSAGE.size
        r.acks.append((seq, self.sent_at.pop(seq, 0.0), now))

    def fail(self, error: str, detail: str = "") -> None:
        if self.result.error is None:
            self.result.error = error
            self.result.error_detail = detail
            self.result.ended = time.monotonic()
            last = self.result.last_ack
            self.result.tail_gap = self.result.ended - (last if last is not None else self.result.started)

    def ready(self) -> None:
        r = self.result
        print(json.dumps({"ready": True, "local": r.local, "local_port": r.local_port}), flush=True)

    def run(self) -> None:
        a = self.args
        fam = _family(a.dst)
        kind = socket.SOCK_STREAM if a.proto == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(fam, kind)
        if a.sport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", a.sport))
        sock.settimeout(a.connect_timeout)
        self.result.started = time.monotonic()
        try:
            sock.connect((a.dst, a.port))
        except OSError as e:
            self.fail("connect", f"{type(e).__name__}: {e}")
            print(json.dumps({"ready": False, "error": str(e)}), flush=True)
            self.write(final=True)
            return
        if a.proto == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if a.user_timeout:
                # TCP_USER_TIMEOUT: the kernel gives up on unacknowledged data after this long.
                sock.setsockopt(socket.IPPROTO_TCP, 18, int(a.user_timeout * 1000))
        local = sock.getsockname()
        self.result.local, self.result.local_port = local[0], local[1]
        sock.setblocking(False)
        try:
            self._loop(sock)
        finally:
            sock.close()
        self.write(final=True)

    def _loop(self, sock: socket.socket) -> None:
        a = self.args
        r = self.result
        seq = 0
        out = bytearray()
        inbuf = bytearray()
        next_send = time.monotonic()
        deadline = r.started + a.duration if a.duration else None
        announced = False
        while not self.stop and r.error is None:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if now >= next_send:
                self.sent_at[seq] = now
                msg = MESSAGE.pack(MAGIC, seq, now, 0)
                seq += 1
                r.sent = seq
                next_send += a.interval
                if next_send < now:  # we were descheduled; do not burst to catch up
                    next_send = now + a.interval
                if a.proto == "tcp":
                    out += msg
                else:
                    try:
                        sock.send(msg)
                    except ConnectionRefusedError:
                        r.error_detail = "ICMP port unreachable seen"
                    except BlockingIOError:
                        pass
            if out:
                try:
                    n = sock.send(out)
                    del out[:n]
                except BlockingIOError:
                    pass
                except OSError as e:
                    self._socket_error(e)
                    break
            # The oldest unanswered message says whether the flow is dead.
            if self.sent_at:
                oldest = self.sent_at[min(self.sent_at)] if a.proto == "tcp" else None
                if a.proto == "tcp" and oldest is not None and now - oldest > a.dead_after:
                    self.fail("timeout", f"no echo for {now - oldest:.2f} s")
                    break
            wait = max(0.0, next_send - time.monotonic())
            try:
                readable, _, _ = select.select([sock], [], [], wait)
            except InterruptedError:
                continue
            if not readable:
                continue
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionRefusedError:
                if a.proto == "udp":
                    r.error_detail = "ICMP port unreachable seen"
                    continue
                self.fail("refused")
                break
            except OSError as e:
                self._socket_error(e)
                break
            now = time.monotonic()
            if a.proto == "udp":
                if len(data) >= MESSAGE.size:
                    self.on_echo(data, now)
                    # UDP loses datagrams; forget what can no longer be echoed in order.
                    for old in [s for s in self.sent_at if s < r.acks[-1][0]]:
                        del self.sent_at[old]
            else:
                if not data:
                    self.fail("closed", "peer closed the connection")
                    break
                inbuf += data
                while len(inbuf) >= MESSAGE.size:
                    self.on_echo(inbuf[: MESSAGE.size], now)
                    del inbuf[: MESSAGE.size]
            if not announced and r.acked:
                announced = True
                self.ready()
        if not announced:
            print(json.dumps({"ready": False, "error": r.error}), flush=True)

    def _socket_error(self, e: OSError) -> None:
        name = {
            errno.ECONNRESET: "reset",
            errno.EPIPE: "closed",
            errno.ETIMEDOUT: "timeout",
            errno.EHOSTUNREACH: "unreachable",
            errno.ENETUNREACH: "unreachable",
            errno.ECONNREFUSED: "refused",
        }.get(e.errno or 0, "error")
        self.fail(name, f"{type(e).__name__}: {e}")


def client(args: argparse.Namespace) -> None:
    c = _Client(args)

    def on_stop(_sig: int, _frame: object) -> None:
        c.stop = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, lambda *_: c.write())
    c.run()


# ---------------------------------------------------------------------------------------------
# announce


def _arp_frame(mac: bytes, ip: bytes) -> bytes:
    eth = b"\xff" * 6 + mac + b"\x08\x06"
    # Gratuitous ARP request: sender and target address are both the announced address.
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, b"\0" * 6, ip)
    return (eth + arp).ljust(60, b"\0")


def _unsolicited_na(mac: bytes, ip: bytes) -> bytes:
    # type 136, code 0, checksum (the kernel fills it in), flags Router|Override
    return struct.pack("!BBHB3x16sBB6s", 136, 0, 0, 0xA0, ip, 2, 1, mac)


def announce(pairs: list[tuple[str, str]], count: int = 1, interval: float = 0.05) -> None:
    for i in range(count):
        if i:
            time.sleep(interval)
        for dev, addr in pairs:
            ip = ipaddress.ip_address(addr)
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806)) as p:
                p.bind((dev, 0x0806))
                mac = p.getsockname()[4]
                if ip.version == 4:
                    p.send(_arp_frame(mac, ip.packed))
                    continue
            with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
                ifindex = socket.if_nametoindex(dev)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
                s.bind((addr, 0, 0, ifindex))
                s.sendto(_unsolicited_na(mac, ip.packed), ("ff02::1", 0, 0, ifindex))


# ---------------------------------------------------------------------------------------------


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m invictusd.lab.traffic")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--tcp", type=_ports, default=[], help="comma-separated TCP ports")
    s.add_argument("--udp", type=_ports, default=[], help="comma-separated UDP ports")
    s.add_argument("--no-ipv6", action="store_true")
    c = sub.add_parser("client")
    c.add_argument("proto", choices=["tcp", "udp"])
    c.add_argument("dst")
    c.add_argument("port", type=int)
    c.add_argument("--out", required=True)
    c.add_argument("--interval", type=float, default=0.01)
    c.add_argument("--duration", type=float, default=0.0, help="0: until SIGTERM")
    c.add_argument("--dead-after", type=float, default=5.0, help="TCP: give up after this silence")
    c.add_argument("--connect-timeout", type=float, default=3.0)
    c.add_argument("--user-timeout", type=float, default=0.0)
    c.add_argument("--sport", type=int, default=0)
    n = sub.add_parser("announce")
    n.add_argument("pairs", nargs="+", help="DEV=ADDRESS")
    n.add_argument("--count", type=int, default=1)
    n.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args(argv)
    if args.cmd == "server":
        serve(args.tcp, args.udp, ipv6=not args.no_ipv6)
    elif args.cmd == "client":
        client(args)
    else:
        pairs = [tuple(p.split("=", 1)) for p in args.pairs]
        announce([(d, a) for d, a in pairs], count=args.count, interval=args.interval)


if __name__ == "__main__":
    main()
