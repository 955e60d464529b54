"""The namespace lab itself, without the daemon: topology, helpers, cleanup, and the proof
that a failover test built on it can fail (a connection without state on the new master
dies; with state copied, it lives)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from invictusd.lab import Lab, Stream, parse_conntrack
from invictusd.lab.netns import listed

LIVE_GAP = 0.5  # worst silence (s) of a flow on a quiet lab with nothing moving


def _gone(names: dict[str, str]) -> list[str]:
    present = set(listed())
    return [n for n in names.values() if n in present]


@pytest.mark.netns
def test_lab_builds_and_tears_down_completely() -> None:
    with Lab() as lab:
        names = dict(lab.names)
        assert set(names) == {"client", "fw1", "fw2", "server", "sw"}
        assert not set(names.values()) - set(listed())
        assert lab.build_seconds < 3.0, lab.build_seconds
        sleeper = lab.popen("fw1", "sleep", "60")
        workdir = lab.workdir
        # The firewalls got what the failover tests rely on.
        assert lab.exec("fw1", "sysctl", "-n", "net.netfilter.nf_conntrack_tcp_loose").strip() == "0"
        assert lab.exec("fw2", "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"
        assert "ct state new drop" in lab.exec("fw2", "nft", "list", "table", "inet", "filter")
        assert lab.addresses("fw1", "sync0") == ["10.9.0.1", "fd09::1"]
        assert lab.ping("fw1", "10.9.0.2")
    assert _gone(names) == []
    assert sleeper.poll() is not None
    assert not workdir.exists()


@pytest.mark.netns
def test_teardown_on_exception_and_interrupt() -> None:
    seen: list[dict[str, str]] = []
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        seen.append(dict(lab.names))
        lab.start_server()
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), Lab() as lab:
        seen.append(dict(lab.names))
        raise KeyboardInterrupt
    # A build that fails half-way cleans up too.
    broken = Lab(ruleset="table inet filter { this is not nft }")
    with pytest.raises(RuntimeError, match="lab build failed"):
        broken.start()
    seen.append(dict(broken.names))
    for names in seen:
        assert len(names) == 5
        assert _gone(names) == []


def _assert_flowing(stream: Stream, min_acked: int = 40) -> None:
    r = stream.stop()
    assert r.error is None, (stream.label, r.error, r.error_detail)
    assert r.seq_ok, stream.label
    assert r.acked >= min_acked, (stream.label, r.acked, r.sent)
    assert r.worst_gap < LIVE_GAP, (stream.label, r.max_gap, r.tail_gap)


@pytest.mark.netns
def test_forwarding_nat_and_helpers_with_manual_vips() -> None:
    with Lab() as lab:
        c = lab.config
        assert not lab.ping("client", c.server_ip, timeout=0.3)  # no VIP anywhere yet
        lab.add_vips("fw1")
        assert lab.ping("client", c.server_ip)
        assert lab.ping("client", c.server_ip6)
        assert lab.arp_entry("client", c.lan_vip) == lab.mac("fw1", c.lan_if)

        cap = lab.start_capture("fw1", c.wan_if, "tcp port 9002")
        streams = lab.start_streams("tcp")
        streams["dnat"] = lab.start_stream("tcp", c.dnat_port, dst=c.lan_vip, label="dnat")
        streams["v6"] = lab.start_stream("tcp", c.plain_port, dst=c.server_ip6, label="v6")
        streams.update({f"udp-{k}": s for k, s in lab.start_streams("udp").items()})
        time.sleep(0.8)

        table = lab.ct_list("fw1")
        snat = [e for e in lab.flow_entries("fw1", streams["snat"]) if e.proto == "tcp"]
        assert len(snat) == 1 and snat[0].is_snat and snat[0].reply[1] == c.wan_vip
        plain = lab.flow_entries("fw1", streams["plain"])
        assert len(plain) == 1 and not plain[0].is_snat and plain[0].state == "ESTABLISHED"
        assert "ASSURED" in plain[0].flags
        dnat = lab.flow_entries("fw1", streams["dnat"])
        assert len(dnat) == 1 and dnat[0].is_dnat and dnat[0].reply[0] == c.server_ip
        assert any(e.family == 6 and e.orig[3] == c.plain_port for e in table)
        udp = lab.flow_entries("fw1", streams["udp-snat"])
        assert len(udp) == 1 and udp[0].proto == "udp" and udp[0].is_snat
        assert lab.ct_list("fw2") == []  # nothing went through the backup

        for stream in streams.values():
            _assert_flowing(stream)
        pcap = cap.stop()
        assert pcap.stat().st_size > 200  # SNATed packets were captured on the WAN side
        out = lab.exec("fw1", "tcpdump", "-n", "-r", str(pcap), "-c", "1")
        assert f"{c.wan_vip}." in out


@pytest.mark.netns
def test_sync_loss_drops_udp_on_the_sync_link() -> None:
    recv = (
        "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        "s.bind(('10.9.0.1',4000));s.settimeout(0.3);print('ready',flush=True);n=0\n"
        "try:\n while True: s.recv(100); n+=1\nexcept OSError: print(n)"
    )
    send = (
        "import socket,time;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "for i in range(200): s.sendto(b'x',('10.9.0.1',4000)); time.sleep(0.0005)"
    )

    def delivered(lab: Lab) -> int:
        p = lab.popen("fw1", sys.executable, "-S", "-c", recv, stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        lab.exec("fw2", sys.executable, "-S", "-c", send)
        out, _ = p.communicate(timeout=10)
        return int(out.strip())

    with Lab() as lab:
        assert delivered(lab) == 200
        lab.sync_loss(100)
        assert delivered(lab) == 0
        lab.sync_loss(50)
        assert 40 < delivered(lab) < 160
        lab.sync_loss(0)
        assert delivered(lab) == 200
        assert "ivdlab_loss" not in lab.exec("fw1", "nft", "list", "tables")


@pytest.mark.netns
@pytest.mark.parametrize("copy_state", [False, True], ids=["no-state", "state-copied"])
def test_failover_test_is_meaningful(copy_state: bool) -> None:
    """Moving the VIPs to a node without the flows' conntrack state must kill the flows;
    moving them after copying the state must not. Otherwise no failover test can fail."""
    # locktime 0: the client and server take the gratuitous ARP even for a fresh entry.
    with Lab(arp_locktime=0) as lab:
        lab.add_vips("fw1")
        streams = lab.start_streams("tcp", dead_after=1.5)
        time.sleep(0.4)
        entries = [e for s in streams.values() for e in lab.flow_entries("fw1", s)]
        assert len(entries) == 2 and any(e.is_snat for e in entries)
        if copy_state:
            for e in entries:
                lab.ct_insert("fw2", e)
            assert {e.key for e in lab.ct_list("fw2")} == {e.key for e in entries}
        lab.move_vips("fw1", "fw2")
        moved = time.monotonic()
        assert lab.arp_entry("client", lab.config.lan_vip) == lab.mac("fw2", "lan0")
        assert lab.arp_entry("server", lab.config.wan_vip) == lab.mac("fw2", "wan0")

        if not copy_state:
            for name, stream in streams.items():
                r = stream.wait_error(timeout=5.0)
                assert r.error == "timeout", (name, r.error, r.error_detail)
                assert r.last_ack is not None and r.last_ack < moved + 0.1, name
            # fw2 saw the mid-stream packets and refused to create state for them.
            assert not [e for e in lab.ct_list("fw2") if e.proto == "tcp"]
        else:
            time.sleep(1.0)
            for name, stream in streams.items():
                r = stream.stop()
                assert r.error is None, (name, r.error, r.error_detail)
                assert r.last_ack is not None and r.last_ack > moved + 0.8, name
                assert r.worst_gap < 1.0, (name, r.max_gap)
                assert r.seq_ok


def test_parse_conntrack_extended_output() -> None:
    text = (
        "ipv4     2 tcp      6 299 ESTABLISHED src=10.10.0.100 dst=10.20.0.100 sport=42512 "
        "dport=9002 src=10.20.0.100 dst=10.20.0.1 sport=9002 dport=42512 [ASSURED] mark=7 "
        "zone=3 use=1\n"
        "ipv6     10 icmpv6   58 29 src=fd10::100 dst=fd20::100 type=128 code=0 id=5469 "
        "src=fd20::100 dst=fd10::100 type=129 code=0 id=5469 mark=0 use=1\n"
        "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been shown.\n"
    )
    tcp, icmp = parse_conntrack(text)
    assert tcp.family == 4 and tcp.proto == "tcp" and tcp.state == "ESTABLISHED"
    assert tcp.orig == ("10.10.0.100", "10.20.0.100", 42512, 9002)
    assert tcp.reply == ("10.20.0.100", "10.20.0.1", 9002, 42512)
    assert tcp.is_snat and not tcp.is_dnat
    assert tcp.flags == {"ASSURED"} and tcp.mark == 7 and tcp.zone == 3 and tcp.timeout == 299
    assert icmp.family == 6 and icmp.orig == ("fd10::100", "fd20::100", 5469, 128 << 8)
    assert icmp.reply[3] == 129 << 8 and not icmp.is_snat and icmp.state == ""
