"""The namespace lab: client -- br-lan -- fw1/fw2 -- br-wan -- server, plus a sync link.

::

    client eth0 10.10.0.100 ─┐                       ┌─ eth0 10.20.0.100 server
                             br-lan   (sw)   br-wan
           fw1 lan0 .2 ──────┤                       ├────── wan0 .2 fw1
           fw2 lan0 .3 ──────┘                       └────── wan0 .3 fw2
           fw1 sync0 10.9.0.1 ─────────────────────────── sync0 10.9.0.2 fw2

The virtual addresses (LAN 10.10.0.1 / fd10::1, WAN 10.20.0.1 / fd20::1) are on no firewall
at start: the daemon under test claims them (or a test does, with ``add_vip``). The client
routes through the LAN VIP, the server back through the WAN VIP.

Both firewalls run a stateful ruleset that drops a mid-stream TCP packet without conntrack
state, so a failover without replicated state really breaks connections (see
``firewall_ruleset`` and the meaningfulness test in ``tests/netns/test_lab.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import invictusd
from invictusd.atomicfile import write_atomic
from invictusd.lab import netns
from invictusd.lab.traffic import FlowResult

NODES = ("client", "fw1", "fw2", "server", "sw")
FIREWALLS = ("fw1", "fw2")

# The command that starts the daemon, after ``python3``; ``{config}`` is replaced by the path.
DAEMON_ARGV: tuple[str, ...] = ("-m", "invictusd", "run", "--config", "{config}")

# Where ``python3 -m invictusd...`` finds this package inside a namespace.
_PACKAGE_ROOT = str(Path(invictusd.__file__).resolve().parent.parent)


@dataclasses.dataclass(frozen=True)
class LabConfig:
    """Everything a test or benchmark may want to vary. Addresses are fixed by default."""

    ipv6: bool = True
    host_if: str = "eth0"
    lan_if: str = "lan0"
    wan_if: str = "wan0"
    sync_if: str = "sync0"
    sync_link: bool = True

    client_ip: str = "10.10.0.100"
    server_ip: str = "10.20.0.100"
    lan_vip: str = "10.10.0.1"
    wan_vip: str = "10.20.0.1"
    fw_lan_ips: tuple[str, str] = ("10.10.0.2", "10.10.0.3")
    fw_wan_ips: tuple[str, str] = ("10.20.0.2", "10.20.0.3")
    sync_ips: tuple[str, str] = ("10.9.0.1", "10.9.0.2")
    prefix4: int = 24

    client_ip6: str = "fd10::100"
    server_ip6: str = "fd20::100"
    lan_vip6: str = "fd10::1"
    wan_vip6: str = "fd20::1"
    fw_lan_ips6: tuple[str, str] = ("fd10::2", "fd10::3")
    fw_wan_ips6: tuple[str, str] = ("fd20::2", "fd20::3")
    sync_ips6: tuple[str, str] = ("fd09::1", "fd09::2")
    prefix6: int = 64

    plain_port: int = 9001  # TCP and UDP, forwarded untouched
    snat_port: int = 9002  # TCP and UDP, source-NATed to the WAN VIP
    dnat_port: int = 8080  # TCP to the LAN VIP, destination-NATed to the server ...
    dnat_target_port: int = 9003  # ... on this port

    # nft text loaded on both firewalls; None means ``firewall_ruleset(config)``.
    ruleset: str | None = None
    tcp_loose: int = 0
    # net.netfilter.nf_conntrack_events on the firewalls; None leaves the kernel default
    # (the daemon is expected to set it).
    conntrack_events: int | None = None
    # ARP locktime (seconds) on the client and server; None leaves the kernel default (1 s),
    # during which a gratuitous ARP for a freshly updated entry is ignored.
    arp_locktime: float | None = None
    fw_sysctls: Mapping[str, str] = dataclasses.field(default_factory=dict)
    keep_workdir: bool = False

    def vips(self) -> list[tuple[str, str]]:
        """(interface, address/prefix) of every virtual address."""
        out = [
            (self.lan_if, f"{self.lan_vip}/{self.prefix4}"),
            (self.wan_if, f"{self.wan_vip}/{self.prefix4}"),
        ]
        if self.ipv6:
            out += [
                (self.lan_if, f"{self.lan_vip6}/{self.prefix6}"),
                (self.wan_if, f"{self.wan_vip6}/{self.prefix6}"),
            ]
        return out


def firewall_ruleset(cfg: LabConfig, *, drop_non_syn_new: bool = True, nat: bool = True) -> str:
    """The stateful nftables ruleset of both firewalls.

    ``drop_non_syn_new`` is what makes failover tests able to fail: without it (and with
    ``tcp_loose=0``) a plain TCP connection is picked up mid-stream by a node with no state.
    """
    lan, wan = cfg.lan_if, cfg.wan_if
    non_syn = (
        "        tcp flags & (syn | ack | fin | rst) != syn ct state new drop\n" if drop_non_syn_new else ""
    )
    text = (
        "table inet filter {\n"
        "    chain forward {\n"
        "        type filter hook forward priority filter; policy drop;\n"
        "        ct state established,related accept\n"
        "        ct state invalid drop\n"
        f"{non_syn}"
        "        meta l4proto { icmp, ipv6-icmp } accept\n"
        f'        iifname "{lan}" oifname "{wan}" accept\n'
        "    }\n"
        "}\n"
    )
    if nat:
        text += (
            "table ip nat {\n"
            "    chain prerouting {\n"
            "        type nat hook prerouting priority dstnat; policy accept;\n"
            f'        iifname "{lan}" ip daddr {cfg.lan_vip} tcp dport {cfg.dnat_port} '
            f"dnat to {cfg.server_ip}:{cfg.dnat_target_port}\n"
            "    }\n"
            "    chain postrouting {\n"
            "        type nat hook postrouting priority srcnat; policy accept;\n"
            f'        oifname "{wan}" tcp dport {cfg.snat_port} snat to {cfg.wan_vip}\n'
            f'        oifname "{wan}" udp dport {cfg.snat_port} snat to {cfg.wan_vip}\n'
            "    }\n"
            "}\n"
        )
    return text


class CtEntry(NamedTuple):
    """One conntrack entry as ``conntrack -L -o extended`` shows it."""

    family: int  # 4 or 6
    proto: str  # "tcp", "udp", "icmp", ...
    orig: tuple[str, str, int, int]  # src, dst, sport, dport (ICMP: id, type << 8 | code)
    reply: tuple[str, str, int, int]
    state: str  # TCP state, "" for other protocols
    flags: frozenset[str]  # ASSURED, UNREPLIED, ...
    mark: int
    zone: int
    timeout: int

    @property
    def key(self) -> tuple[int, str, tuple[str, str, int, int], tuple[str, str, int, int]]:
        """What two firewalls must agree on for a flow to survive failover."""
        return (self.family, self.proto, self.orig, self.reply)

    @property
    def _icmp(self) -> bool:
        return self.proto in ("icmp", "icmpv6")

    @property
    def is_snat(self) -> bool:
        if self._icmp:
            return self.reply[1] != self.orig[0] or self.reply[2] != self.orig[2]
        return self.reply[1] != self.orig[0] or self.reply[3] != self.orig[2]

    @property
    def is_dnat(self) -> bool:
        if self._icmp:
            return self.reply[0] != self.orig[1]
        return self.reply[0] != self.orig[1] or self.reply[2] != self.orig[3]


def parse_conntrack(text: str) -> list[CtEntry]:
    """Parse ``conntrack -L -o extended`` output."""
    entries = []
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) < 5 or tokens[0] not in ("ipv4", "ipv6"):
            continue
        family = 4 if tokens[0] == "ipv4" else 6
        proto, timeout = tokens[2], int(tokens[4])
        state = ""
        flags: set[str] = set()
        sides: list[dict[str, str]] = [{}, {}]
        extra: dict[str, str] = {}
        for tok in tokens[5:]:
            if tok.startswith("[") and tok.endswith("]"):
                flags.add(tok[1:-1])
            elif "=" in tok:
                k, v = tok.split("=", 1)
                if k in ("src", "dst", "sport", "dport", "type", "code", "id"):
                    side = sides[0] if k not in sides[0] else sides[1]
                    side[k] = v
                else:
                    extra[k] = v
            elif tok.isupper():
                state = tok

        def tup(d: dict[str, str]) -> tuple[str, str, int, int]:
            if "type" in d:
                return (d["src"], d["dst"], int(d["id"]), int(d["type"]) << 8 | int(d["code"]))
            return (d["src"], d["dst"], int(d.get("sport", 0)), int(d.get("dport", 0)))

        entries.append(
            CtEntry(
                family,
                proto,
                tup(sides[0]),
                tup(sides[1]),
                state,
                frozenset(flags),
                int(extra.get("mark", "0")),
                int(extra.get("zone", "0")),
                timeout,
            )
        )
    return entries


class Stream:
    """A traffic client running in a namespace; ``stop()`` returns its ``FlowResult``."""

    def __init__(self, lab: Lab, proc: subprocess.Popen[str], out: Path, label: str) -> None:
        self.lab = lab
        self.proc = proc
        self.out = out
        self.label = label
        self.local = ""
        self.local_port = 0
        self._last_snapshot = 0

    def _read(self) -> FlowResult | None:
        try:
            data = json.loads(self.out.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        data["acks"] = [tuple(a) for a in data.get("acks", [])]
        return FlowResult(**data)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def snapshot(self, timeout: float = 3.0) -> FlowResult:
        """The result so far, without stopping the flow."""
        if not self.running:
            return self.stop()
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self._read()
            if r is not None and (r.snapshot > self._last_snapshot or r.final):
                self._last_snapshot = r.snapshot
                return r
            time.sleep(0.01)
        raise TimeoutError(f"stream {self.label}: no snapshot within {timeout} s")

    def stop(self, timeout: float = 5.0) -> FlowResult:
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        r = self._read()
        if r is None:
            raise RuntimeError(f"stream {self.label} wrote no result (exit {self.proc.returncode})")
        return r

    def wait_error(self, timeout: float) -> FlowResult:
        """Wait until the client gives up on its own (e.g. ``timeout``); raise if it does not."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"stream {self.label} still alive after {timeout} s") from None
        return self.stop()


class Capture:
    """A tcpdump writing a pcap in a namespace until ``stop()``."""

    def __init__(self, proc: subprocess.Popen[str], path: Path) -> None:
        self.proc = proc
        self.path = path

    def stop(self) -> Path:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.path

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_line(proc: subprocess.Popen[str], stream: IO[str] | None, timeout: float) -> str:
    """One line from ``stream`` (a pipe of ``proc``) within ``timeout``, or raise."""
    assert stream is not None
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"{proc.args!r}: no output within {timeout} s")
    line = stream.readline()
    if not line:
        proc.wait(1)
        raise RuntimeError(f"{proc.args!r} exited {proc.returncode} before it was ready")
    return line


class Lab:
    """The namespace lab. Use as a context manager; teardown always runs.

    >>> with Lab() as lab:                                      # doctest: +SKIP
    ...     lab.add_vips("fw1")
    ...     s = lab.start_stream("tcp", lab.config.snat_port)
    ...     print(s.stop().worst_gap)
    """

    def __init__(self, config: LabConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or LabConfig(), **overrides)
        self.names: dict[str, str] = {}
        self.workdir = Path(netns.make_workdir())
        self._procs: list[subprocess.Popen[Any]] = []
        self._server: subprocess.Popen[str] | None = None
        self._closed = False
        self._stream_count = 0
        self.build_seconds = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        t0 = time.monotonic()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self.build_seconds = time.monotonic() - t0

    def close(self) -> None:
        """Stop every process started here and remove the namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_procs()
        finally:
            netns.delete_many(list(self.names.values()))
            if not self.config.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_procs(self) -> None:
        running = [p for p in self._procs if p.poll() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        for p in running:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for p in self._procs:
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()

    def _build(self) -> None:
        c = self.config
        self.names = {node: netns.unique_name(node) for node in NODES}
        netns.create_many(self.names.values(), lo_up=False)

        # Sysctls that must hold before interfaces exist: no DAD, so addresses work at once.
        common = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        fw = [
            *common,
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            # The VIP is a secondary address moved between nodes: answer ARP only for
            # addresses of the receiving interface, and source requests from the primary.
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.default.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
            "net.ipv4.conf.default.arp_announce=2",
        ]
        host = [*common]
        if not c.ipv6:
            host += ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
            fw += ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        sw = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        self._parallel(
            [
                ("sw", ["sysctl", "-q", "-w", *sw], None),
                ("client", ["sysctl", "-q", "-w", *host], None),
                ("server", ["sysctl", "-q", "-w", *host], None),
                ("fw1", ["sysctl", "-q", "-w", *fw], None),
                ("fw2", ["sysctl", "-q", "-w", *fw], None),
            ]
        )

        n = self.names
        # Each veth is created with both ends already in their namespaces.
        links = [
            ("client", c.host_if, "c-lan"),
            ("fw1", c.lan_if, "f1-lan"),
            ("fw2", c.lan_if, "f2-lan"),
            ("fw1", c.wan_if, "f1-wan"),
            ("fw2", c.wan_if, "f2-wan"),
            ("server", c.host_if, "s-wan"),
        ]
        # Both ends of every veth get distinct ifindexes: the kernel treats a veth whose
        # index equals its peer's (in another namespace) as a plain device and delays its
        # carrier by up to a second (linkwatch rate limit), dropping every frame meanwhile.
        root = [
            f"link add {ifname} netns {n[node]} index {10 + i} type veth "
            f"peer name {port} netns {n['sw']} index {100 + i}"
            for i, (node, ifname, port) in enumerate(links)
        ]
        if c.sync_link:
            root.append(
                f"link add {c.sync_if} netns {n['fw1']} index 30 type veth "
                f"peer name {c.sync_if} netns {n['fw2']} index 31"
            )
        netns.ip_batch(None, root)

        batches: dict[str, list[str]] = {node: ["link set lo up"] for node in NODES}
        bridge = "type bridge stp_state 0 forward_delay 0 mcast_snooping 0"
        batches["sw"] += [
            f"link add br-lan {bridge}",
            f"link add br-wan {bridge}",
            *(
                f"link set {port} master {'br-lan' if port.endswith('lan') else 'br-wan'}"
                for _, _, port in links
            ),
            *(f"link set {port} up" for _, _, port in links),
            "link set br-lan up",
            "link set br-wan up",
        ]
        h = c.host_if
        batches["client"] += [
            f"addr add {c.client_ip}/{c.prefix4} dev {h}",
            f"link set {h} up",
            f"route add default via {c.lan_vip} dev {h}",
        ]
        batches["server"] += [
            f"addr add {c.server_ip}/{c.prefix4} dev {h}",
            f"link set {h} up",
            f"route add {self._net4(c.client_ip)} via {c.wan_vip} dev {h}",
        ]
        if c.ipv6:
            batches["client"] += [
                f"addr add {c.client_ip6}/{c.prefix6} dev {h} nodad",
                f"route add ::/0 via {c.lan_vip6} dev {h}",
            ]
            batches["server"] += [
                f"addr add {c.server_ip6}/{c.prefix6} dev {h} nodad",
                f"route add {self._net6(c.client_ip6)} via {c.wan_vip6} dev {h}",
            ]
        for i, fw_node in enumerate(FIREWALLS):
            cmds = [
                f"addr add {c.fw_lan_ips[i]}/{c.prefix4} dev {c.lan_if}",
                f"addr add {c.fw_wan_ips[i]}/{c.prefix4} dev {c.wan_if}",
                f"link set {c.lan_if} up",
                f"link set {c.wan_if} up",
            ]
            if c.sync_link:
                cmds += [
                    f"addr add {c.sync_ips[i]}/{c.prefix4} dev {c.sync_if}",
                    f"link set {c.sync_if} up",
                ]
            if c.ipv6:
                cmds += [
                    f"addr add {c.fw_lan_ips6[i]}/{c.prefix6} dev {c.lan_if} nodad",
                    f"addr add {c.fw_wan_ips6[i]}/{c.prefix6} dev {c.wan_if} nodad",
                ]
                if c.sync_link:
                    cmds.append(f"addr add {c.sync_ips6[i]}/{c.prefix6} dev {c.sync_if} nodad")
            batches[fw_node] += cmds
        # The switch ports come up last: a veth whose peer is already up gets its carrier at
        # once, while the other order can leave a port without carrier (and dropping frames)
        # for up to a second.
        switch = batches.pop("sw")
        self._parallel(
            [(node, ["ip", "-batch", "-"], "\n".join(cmds) + "\n") for node, cmds in batches.items()]
        )
        netns.ip_batch(n["sw"], switch)
        self._wait_links_up()

        # The ruleset loads conntrack in the namespace; its sysctls only then apply.
        after = [f"net.netfilter.nf_conntrack_tcp_loose={c.tcp_loose}"]
        if c.conntrack_events is not None:
            after.append(f"net.netfilter.nf_conntrack_events={c.conntrack_events}")
        after += [f"{k}={v}" for k, v in c.fw_sysctls.items()]
        ruleset = c.ruleset if c.ruleset is not None else firewall_ruleset(c)
        script = f"nft -f - && sysctl -q -w {' '.join(after)}"
        steps: list[tuple[str, list[str], str | None]] = [
            (fw_node, ["sh", "-c", script], ruleset) for fw_node in FIREWALLS
        ]
        if c.arp_locktime is not None:
            ticks = round(c.arp_locktime * 100)
            lock = ["sysctl", "-q", "-w", f"net.ipv4.neigh.{h}.locktime={ticks}"]
            steps += [("client", lock, None), ("server", lock, None)]
        self._parallel(steps)

    def _wait_links_up(self, timeout: float = 3.0) -> None:
        """Wait until every veth of the lab has carrier (operstate UP)."""
        pending = dict(self.names)

        def all_up() -> bool:
            for node, name in list(pending.items()):
                links = json.loads(netns.run("ip", "-n", name, "-j", "link", "show").stdout)
                if all(
                    link["operstate"] == "UP"
                    for link in links
                    if link["ifname"] != "lo" and not str(link["ifname"]).startswith("br-")
                ):
                    del pending[node]
            return not pending

        netns.wait_for(all_up, timeout, interval=0.01, what=f"links up in {sorted(pending)}")

    def _parallel(self, steps: Sequence[tuple[str, list[str], str | None]]) -> None:
        """Run one command in each of several namespaces at once; raise if any fails."""
        procs = []
        for node, argv, stdin in steps:
            p = subprocess.Popen(
                netns.ns_argv(self.names[node], argv),
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append((node, argv, stdin, p))
        errors = []
        for node, argv, stdin, p in procs:
            try:
                _, err = p.communicate(stdin, timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            if p.returncode != 0:
                errors.append(f"{node}: {' '.join(argv)} exited {p.returncode}: {err.strip()}")
        if errors:
            raise RuntimeError("lab build failed:\n" + "\n".join(errors))

    def _net4(self, ip: str) -> str:
        return str(ipaddress.ip_network(f"{ip}/{self.config.prefix4}", strict=False))

    def _net6(self, ip: str) -> str:
        return str(ipaddress.ip_network(f"{ip}/{self.config.prefix6}", strict=False))

    # -- running things ----------------------------------------------------------------------

    def ns(self, node: str) -> str:
        """The namespace name of ``node`` (client, fw1, fw2, server, sw)."""
        return self.names[node]

    def exec(
        self,
        node: str,
        *argv: str,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
    ) -> str:
        """Run ``argv`` in ``node``; return stdout; raise with stderr on failure."""
        return netns.ns_exec(self.names[node], *argv, check=check, timeout=timeout, input=input)

    def popen(self, node: str, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``node``; the process is terminated at teardown."""
        env = dict(kw.pop("env", None) or os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = f"{_PACKAGE_ROOT}:{path}" if path else _PACKAGE_ROOT
        kw.setdefault("stdin", subprocess.DEVNULL)
        p: subprocess.Popen[Any] = subprocess.Popen(netns.ns_argv(self.names[node], argv), env=env, **kw)
        self._procs.append(p)
        return p

    def python(self, node: str, *args: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start ``python3 args...`` in ``node`` (with this package importable)."""
        return self.popen(node, sys.executable, *args, **kw)

    def _tool(self, node: str, *args: str, **kw: Any) -> subprocess.Popen[Any]:
        # -S: the traffic tools need only the standard library; skipping site-packages
        # halves the interpreter's start-up time.
        return self.popen(node, sys.executable, "-S", "-m", "invictusd.lab.traffic", *args, **kw)

    def write_file(self, name: str, content: str | bytes) -> Path:
        """Write ``content`` to ``name`` in the lab's work directory (visible in all nodes)."""
        path = self.workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # In one step: several helpers may write the same script while one of them already runs
        # it, and a reader of a file being rewritten can see it empty.
        write_atomic(path, content if isinstance(content, bytes) else content.encode(), mode=0o644)
        return path

    def start_daemon(
        self,
        node: str,
        config: str | Path,
        *extra: str,
        argv: Sequence[str] = DAEMON_ARGV,
        log: str | None = None,
    ) -> subprocess.Popen[Any]:
        """Start the daemon in ``node`` with ``config``; stdout+stderr go to ``<node>.log``.

        ``argv`` is what follows ``python3`` (``{config}`` is replaced by the config path).
        """
        logpath = self.workdir / (log or f"{node}.log")
        with open(logpath, "ab") as logf:
            return self.python(
                node,
                *(a.replace("{config}", str(config)) for a in argv),
                *extra,
                stdout=logf,
                stderr=subprocess.STDOUT,
            )

    # -- addresses, links, neighbours ----------------------------------------------------------

    def _vip_spec(self, address: str, dev: str | None) -> tuple[str, str]:
        c = self.config
        if "/" not in address:
            v6 = ipaddress.ip_address(address).version == 6
            address = f"{address}/{c.prefix6 if v6 else c.prefix4}"
        if dev is None:
            ip = address.split("/")[0]
            lan = (c.lan_vip, c.lan_vip6, *c.fw_lan_ips, *c.fw_lan_ips6)
            in_lan = any(
                ipaddress.ip_address(ip) in ipaddress.ip_interface(f"{a}/{address.split('/')[1]}").network
                for a in lan
                if ipaddress.ip_address(a).version == ipaddress.ip_address(ip).version
            )
            dev = c.lan_if if in_lan else c.wan_if
        return address, dev

    def add_vip(self, node: str, address: str, dev: str | None = None, announce: bool = True) -> None:
        """Add a virtual address by hand (what the daemon does as master)."""
        address, dev = self._vip_spec(address, dev)
        nodad = " nodad" if ":" in address else ""
        netns.ip_batch(self.names[node], [f"addr replace {address} dev {dev}{nodad}"])
        if announce:
            self.announce(node, [(dev, address.split("/")[0])])

    def del_vip(self, node: str, address: str, dev: str | None = None) -> None:
        address, dev = self._vip_spec(address, dev)
        self.exec(node, "ip", "addr", "del", address, "dev", dev, check=False)

    def add_vips(self, node: str, announce: bool = True) -> None:
        """Add every configured VIP (LAN and WAN, IPv4 and IPv6) on ``node``."""
        vips = self.config.vips()
        nodad = {a: (" nodad" if ":" in a else "") for _, a in vips}
        netns.ip_batch(self.names[node], [f"addr replace {a} dev {d}{nodad[a]}" for d, a in vips])
        if announce:
            self.announce(node, [(d, a.split("/")[0]) for d, a in vips])

    def del_vips(self, node: str) -> None:
        netns.run(
            "ip",
            "-n",
            self.names[node],
            "-force",
            "-batch",
            "-",
            input="".join(f"addr del {a} dev {d}\n" for d, a in self.config.vips()),
            check=False,
        )

    def move_vips(self, src: str, dst: str) -> None:
        """A manual failover: VIPs off ``src``, onto ``dst``, announced from ``dst``."""
        self.del_vips(src)
        self.add_vips(dst)

    def announce(self, node: str, pairs: Iterable[tuple[str, str]], count: int = 1) -> None:
        """Gratuitous ARP / unsolicited NA from ``node`` for (interface, address) pairs."""
        args = [f"{d}={a}" for d, a in pairs]
        p = self._tool(
            node,
            "announce",
            "--count",
            str(count),
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, err = p.communicate(timeout=10)
        if p.returncode != 0:
            raise RuntimeError(f"announce in {node} failed: {err.strip()}")

    def link_set(self, node: str, ifname: str, up: bool) -> None:
        self.exec(node, "ip", "link", "set", ifname, "up" if up else "down")

    def mac(self, node: str, ifname: str) -> str:
        data = json.loads(self.exec(node, "ip", "-j", "link", "show", ifname))
        return str(data[0]["address"])

    def addresses(self, node: str, ifname: str) -> list[str]:
        """Addresses (without prefix) on ``ifname``, link-local ones excluded."""
        data = json.loads(self.exec(node, "ip", "-j", "addr", "show", "dev", ifname))
        return [str(a["local"]) for a in data[0].get("addr_info", []) if a.get("scope") != "link"]

    def link_local(self, node: str, ifname: str) -> str:
        """The IPv6 link-local address of ``ifname`` (the source of VRRPv3 IPv6 adverts)."""
        data = json.loads(self.exec(node, "ip", "-j", "-6", "addr", "show", "dev", ifname,
                                    "scope", "link"))
        for a in data[0].get("addr_info", []) if data else []:
            if "local" in a:  # filtered-out addresses show as {}
                return str(a["local"])
        raise RuntimeError(f"{node} {ifname} has no IPv6 link-local address")

    def arp_entry(self, node: str, ip: str) -> str | None:
        """The MAC ``node`` has for ``ip`` in its neighbour table, or None."""
        data = json.loads(self.exec(node, "ip", "-j", "neigh", "show", ip))
        for entry in data:
            if "lladdr" in entry and "FAILED" not in entry.get("state", []):
                return str(entry["lladdr"])
        return None

    def neigh_flush(self, node: str) -> None:
        self.exec(node, "ip", "neigh", "flush", "all")

    def ping(self, src: str, dst: str, count: int = 1, timeout: float = 2.0) -> bool:
        """Whether ``src`` gets an echo reply from ``dst`` (IPv4 or IPv6)."""
        argv = ["ping", "-n", "-q", "-c", str(count), "-W", str(timeout)]
        if count > 1:
            argv += ["-i", "0.05"]
        proc = netns.run(
            *netns.ns_argv(self.names[src], [*argv, dst]), check=False, timeout=timeout * count + 5
        )
        return proc.returncode == 0

    # -- conntrack -----------------------------------------------------------------------------

    def ct_list(self, node: str) -> list[CtEntry]:
        """The conntrack table of ``node`` (IPv4 and IPv6)."""
        return parse_conntrack(self.exec(node, "conntrack", "-L", "-o", "extended"))

    def ct_flush(self, node: str) -> None:
        self.exec(node, "conntrack", "-F", check=False)

    def ct_insert(self, node: str, entry: CtEntry, timeout: int | None = None) -> None:
        """Create ``entry`` in ``node``'s table with the conntrack CLI (a poor man's sync).

        NAT is encoded as conntrackd does: the reply is the inverse of the original, plus a
        source/destination NAT to the real reply's addresses (see kernel-notes.md).
        """
        if entry.proto not in ("tcp", "udp"):
            raise ValueError(f"ct_insert handles TCP and UDP, not {entry.proto}")
        src, dst, sport, dport = entry.orig
        rsrc, rdst, rsport, rdport = entry.reply
        argv = [
            "conntrack",
            "-I",
            "-p",
            entry.proto,
            "-s",
            src,
            "-d",
            dst,
            "-t",
            str(timeout or max(entry.timeout, 60)),
        ]
        argv += ["--sport", str(sport), "--dport", str(dport)]
        if entry.state:
            argv += ["--state", entry.state]
        status = sorted(entry.flags & {"ASSURED", "SEEN_REPLY"} | {"SEEN_REPLY"})
        argv += ["-u", ",".join(status)]
        if entry.mark:
            argv += ["-m", str(entry.mark)]
        if entry.is_snat:
            argv += ["--src-nat", f"{rdst}:{rdport}" if entry.family == 4 else rdst]
        if entry.is_dnat:
            argv += ["--dst-nat", f"{rsrc}:{rsport}" if entry.family == 4 else rsrc]
        self.exec(node, *argv)

    # -- faults and captures -------------------------------------------------------------------

    def sync_loss(self, percent: int, nodes: Sequence[str] = FIREWALLS, port: int | None = None) -> None:
        """Drop ``percent``% of UDP arriving on the sync interface (0 removes the rule)."""
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be 0..100, not {percent}")
        c = self.config
        match = f"udp dport {port}" if port is not None else "meta l4proto udp"
        text = "table inet ivdlab_loss {}\ndelete table inet ivdlab_loss\n"
        chance = f"numgen random mod 100 < {percent} " if percent < 100 else ""
        if percent:
            text += (
                "table inet ivdlab_loss {\n"
                "    chain input {\n"
                "        type filter hook input priority -300; policy accept;\n"
                f'        iifname "{c.sync_if}" {match} {chance}drop\n'
                "    }\n"
                "}\n"
            )
        for node in nodes:
            self.exec(node, "nft", "-f", "-", input=text)

    def start_capture(self, node: str, ifname: str, bpf: str = "", name: str | None = None) -> Capture:
        """Start ``tcpdump -w`` on ``ifname`` in ``node``; ``stop()`` returns the pcap path."""
        path = self.workdir / (name or f"{node}-{ifname}-{time.monotonic_ns()}.pcap")
        argv = ["tcpdump", "-n", "-U", "-Z", "root", "-i", ifname, "-w", str(path)]
        if bpf:
            argv.append(bpf)
        proc = self.popen(node, *argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # tcpdump says "listening on ..." once its filter is attached.
        line = _read_line(proc, proc.stderr, 5.0)
        if "listening" not in line:
            line += _read_line(proc, proc.stderr, 5.0)
        return Capture(proc, path)

    def capture_for(self, node: str, ifname: str, seconds: float, bpf: str = "") -> Path:
        with self.start_capture(node, ifname, bpf) as cap:
            time.sleep(seconds)
        return cap.path

    # -- traffic -------------------------------------------------------------------------------

    def start_server(self) -> None:
        """Start the echo server in ``server`` (idempotent; streams start it as needed)."""
        if self._server is not None and self._server.poll() is None:
            return
        c = self.config
        tcp = f"{c.plain_port},{c.snat_port},{c.dnat_target_port}"
        udp = f"{c.plain_port},{c.snat_port}"
        args = ["server", "--tcp", tcp, "--udp", udp]
        if not c.ipv6:
            args.append("--no-ipv6")
        self._server = self._tool("server", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = _read_line(self._server, self._server.stdout, 10.0)
        if line.strip() != "READY":
            raise RuntimeError(f"traffic server said {line!r}")

    def start_stream(
        self,
        proto: str = "tcp",
        port: int | None = None,
        dst: str | None = None,
        *,
        node: str = "client",
        interval: float = 0.01,
        dead_after: float = 5.0,
        duration: float = 0.0,
        label: str | None = None,
        wait_ready: float = 5.0,
    ) -> Stream:
        """Start one flow (TCP connection or UDP 5-tuple) from ``node`` to the server.

        Returns once the first echo came back. ``dst`` defaults to the server's IPv4 address,
        ``port`` to the plain port. Use ``snat_port`` for the SNATed flow, or ``dst=lan_vip``
        with ``dnat_port`` for the DNATed one.
        """
        c = self.config
        self.start_server()
        port = c.plain_port if port is None else port
        dst = c.server_ip if dst is None else dst
        self._stream_count += 1
        label = label or f"{proto}-{port}-{self._stream_count}"
        out = self.workdir / f"stream-{label}.json"
        args = [
            "client",
            proto,
            dst,
            str(port),
            "--out",
            str(out),
            "--interval",
            str(interval),
            "--dead-after",
            str(dead_after),
            "--duration",
            str(duration),
        ]
        proc = self._tool(node, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stream = Stream(self, proc, out, label)
        line = _read_line(proc, proc.stdout, wait_ready)
        info = json.loads(line)
        if not info.get("ready"):
            r = stream.stop()
            raise RuntimeError(f"stream {label} did not start: {r.error} {r.error_detail}")
        stream.local, stream.local_port = info["local"], int(info["local_port"])
        return stream

    def start_streams(self, proto: str = "tcp", **kw: Any) -> dict[str, Stream]:
        """One plain and one SNATed flow, the pair every failover test should watch."""
        c = self.config
        return {
            "plain": self.start_stream(proto, c.plain_port, label=f"{proto}-plain", **kw),
            "snat": self.start_stream(proto, c.snat_port, label=f"{proto}-snat", **kw),
        }

    def flow_entries(self, node: str, stream: Stream) -> list[CtEntry]:
        """The conntrack entries on ``node`` that belong to ``stream``."""
        return [e for e in self.ct_list(node) if e.orig[0] == stream.local and e.orig[2] == stream.local_port]
