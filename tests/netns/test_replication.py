"""Conntrack replication with real daemons and a real kernel.

The firewalls drop mid-stream TCP without state (non-SYN new), so a connection whose state
did not reach the new master really dies: ``test_without_replication_connections_break``
proves these tests can fail.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from invictusd import control
from invictusd.lab.configs import control_socket
from invictusd.lab.topology import Lab, LabConfig, firewall_ruleset
from tests.netns.daemons import Pair, lab_pair, wait_for

MARK = 1 << 30
REPLICA = 1 << 29  # [sync] replica_bit: entries a backup holds for its peer
MD_100 = 3 + (256 - 100) / 256
PROTO = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "icmpv6": 58, "sctp": 132}

Key = tuple[int, int, tuple[str, str, int, int], tuple[str, str, int, int]]


def _start_synced(pair: Pair, sync: bool = True, env1: dict[str, str] | None = None,
                  **kw: Any) -> None:
    """fw1 master (with ``env1`` in its environment), fw2 backup, both in sync."""
    pair.configure("fw1", start_as_master=True, sync=sync, **kw)
    pair.configure("fw2", sync=sync, **kw)
    pair.start("fw1", env=env1)
    pair.start("fw2")
    wait_for(lambda: pair.master() == "fw1", 12, what="fw1 master")
    if sync:
        wait_for(lambda: pair.status("fw2")["sync"]["synced"], 10, what="fw2 synced")
        wait_for(lambda: pair.status("fw1")["sync"]["synced"], 10, what="fw1 synced")


def _keys(lab: Lab, node: str, want_replica: bool | None) -> set[Key]:
    return {(e.family, PROTO.get(e.proto, -1), e.orig, e.reply) for e in lab.ct_list(node)
            if e.mark & MARK and (want_replica is None or bool(e.mark & REPLICA) == want_replica)}


def kernel_marked(lab: Lab, node: str) -> set[Key]:
    """Every marked entry of ``node``'s kernel: its own and those it holds for the peer."""
    return _keys(lab, node, None)


def kernel_owned(lab: Lab, node: str) -> set[Key]:
    """The marked entries ``node`` owns (what it replicates while master)."""
    return _keys(lab, node, False)


def kernel_replica(lab: Lab, node: str) -> set[Key]:
    """The replica entries ``node``'s kernel holds for its peer."""
    return _keys(lab, node, True)


def tables(pair: Pair, node: str) -> dict[str, set[Key]]:
    """``invictusd tables``: the daemon's view of both, read from its kernel."""
    reply = control.request(control_socket(pair.lab, node), "tables", timeout=30)
    assert reply["ok"], reply

    def keys(entries: list[dict[str, Any]]) -> set[Key]:
        return {(e["family"], e["proto"], tuple(e["orig"]), tuple(e["reply"]))  # type: ignore[misc]
                for e in entries}

    return {"local": keys(reply["local"]), "peer": keys(reply["peer"])}


def _converged(pair: Pair, src: str, dst: str) -> bool:
    want = kernel_owned(pair.lab, src)
    return bool(want) and kernel_replica(pair.lab, dst) == want


def _assert_converged(pair: Pair, src: str, dst: str, timeout: float) -> int:
    """``dst``'s kernel holds exactly ``src``'s entries as replicas, entry by entry."""
    try:
        wait_for(lambda: _converged(pair, src, dst), timeout, step=0.5,
                 what=f"{dst}'s kernel replica to equal {src}'s marked kernel table")
    except AssertionError:
        want = kernel_owned(pair.lab, src)
        have = kernel_replica(pair.lab, dst)
        raise AssertionError(f"{len(want)} on {src}, {len(have)} held by {dst}: "
                             f"{len(want - have)} missing, {len(have - want)} stale; "
                             f"missing e.g. {sorted(want - have)[:3]}, stale e.g. "
                             f"{sorted(have - want)[:3]}") from None
    return len(kernel_owned(pair.lab, src))


def _churn(pair: Pair, node: str, *args: str) -> dict[str, Any]:
    out = pair.lab.exec(node, sys.executable, "-m", "tests.netns.churn", *args, timeout=120)
    return dict(json.loads(out.strip().splitlines()[-1]))


def _crash(pair: Pair, how: str) -> None:
    c = pair.lab.config
    if how in ("sigkill", "node_crash"):
        pair.kill("fw1", cleanup=False)
    if how in ("links_down", "node_crash"):
        pair.lab.link_set("fw1", c.lan_if, False)
        pair.lab.link_set("fw1", c.wan_if, False)


@pytest.mark.parametrize("how", ["node_crash", "sigkill", "links_down"])
def test_tcp_udp_plain_and_snat_survive_failover(how: str, measure: Any) -> None:
    with lab_pair() as pair:
        lab = pair.lab
        c = lab.config
        _start_synced(pair)
        streams = lab.start_streams("tcp", dead_after=8)
        streams["udp"] = lab.start_stream("udp", c.plain_port, label="udp", dead_after=8)
        streams["udp-snat"] = lab.start_stream("udp", c.snat_port, label="udp-snat", dead_after=8)
        # Each flow is held in fw2's kernel before the crash, the SNATed ones with their NAT
        # reply tuple.
        wait_for(lambda: len(kernel_replica(lab, "fw2")) >= 4, 5, what="4 flows replicated")
        peer = kernel_replica(lab, "fw2")
        assert tables(pair, "fw2")["peer"] == peer  # the daemon's view is its kernel
        snat = [k for k in peer if k[2][3] == c.snat_port]
        assert snat and all(k[3][1] == c.wan_vip for k in snat), snat
        t0 = time.monotonic()
        _crash(pair, how)
        wait_for(lambda: pair.state("fw2") == "master", MD_100 + 1, what="fw2 master")
        took = time.monotonic() - t0
        handover = wait_for(lambda: pair.status("fw2")["sync"]["last_handover"], 3, what="hand-over")
        assert handover["entries"] >= 4, handover
        addresses_ms = wait_for(lambda: pair.status("fw2")["group"]["last_takeover"], 3,
                                what="fw2's addresses in place")["addresses_ms"]
        text = lab.exec("fw2", sys.executable, "-m", "invictusd", "status", "--config",
                        str(pair.configs["fw2"]))  # what an administrator reads
        assert f"addresses in {addresses_ms:.1f} ms" in text and "handed over" in text, text
        time.sleep(4)
        # Traffic really goes through fw2 now, on the entries its kernel held already.
        assert lab.arp_entry("client", c.lan_vip) == lab.mac("fw2", c.lan_if)
        results = {name: s.stop() for name, s in streams.items()}
        gaps = {name: round(r.worst_gap, 2) for name, r in results.items()}
        measure(f"failover {how}: takeover / worst stream gap",  # type: ignore[operator]
                f"{took:.2f}s / {max(gaps.values()):.2f}s {gaps}; addresses {addresses_ms} ms after "
                f"the decision; {handover['entries']} entries handed over in {handover['seconds']} s")
        for name, r in results.items():
            assert r.error is None, f"{name} broke: {r.error} {r.error_detail}"
            assert r.seq_ok, name
            if r.proto == "tcp":  # TCP retransmits: every message arrives, in order
                assert r.acked >= r.sent - 2, (name, r.acked, r.sent)
            else:  # UDP loses what was sent during the takeover, then the same flow resumes
                resumed = [a for a in r.acks if a[2] > t0 + took]
                assert len(resumed) > 100, (name, len(resumed))
        assert max(gaps.values()) < MD_100 + 3.5  # takeover plus TCP's retransmission backoff


def test_without_replication_connections_break() -> None:
    """The same node crash with replication off: the stateful ruleset kills the streams."""
    with lab_pair() as pair:
        lab = pair.lab
        _start_synced(pair, sync=False)
        streams = lab.start_streams("tcp", dead_after=6)
        time.sleep(0.5)
        _crash(pair, "node_crash")
        wait_for(lambda: pair.state("fw2") == "master", MD_100 + 1, what="fw2 master")
        results = {name: s.wait_error(12) for name, s in streams.items()}
        for name, r in results.items():
            assert r.error is not None, f"{name} survived without replication: the test is blind"


def test_closed_connection_is_gone_and_unmarked_is_never_replicated() -> None:
    cfg = LabConfig(ipv6=False, fw_sysctls={
        "net.netfilter.nf_conntrack_tcp_timeout_time_wait": "1",
        "net.netfilter.nf_conntrack_tcp_timeout_close_wait": "1",
        "net.netfilter.nf_conntrack_tcp_timeout_fin_wait": "1",
        "net.netfilter.nf_conntrack_tcp_timeout_last_ack": "1",
    })
    with lab_pair(cfg) as pair:
        lab = pair.lab
        c = lab.config
        # Our own marking rule: only the plain port is marked, so SNAT-port flows are not.
        rule = (firewall_ruleset(c) + "table inet mymark {\n chain f {\n"
                "  type filter hook forward priority mangle; policy accept;\n"
                f"  ct state new tcp dport {c.plain_port} ct mark set ct mark or 0x{MARK:08x}\n"
                " }\n}\n")
        for fw in ("fw1", "fw2"):
            lab.exec(fw, "nft", "-f", "-", input=rule)
        _start_synced(pair, sync_extra={"install_mark_rule": False})
        assert "invictusd" not in lab.exec("fw1", "nft", "list", "tables")
        streams = lab.start_streams("tcp", dead_after=6)
        wait_for(lambda: len(kernel_replica(lab, "fw2")) == 1, 5, what="the marked flow replicated")
        (held,) = kernel_replica(lab, "fw2")
        assert held[2][3] == c.plain_port
        time.sleep(1)
        ports = {k[2][3] for k in kernel_replica(lab, "fw2")}
        assert ports == {c.plain_port}, "the unmarked SNAT flow reached the replica"
        assert any(e.orig[3] == c.snat_port for e in lab.ct_list("fw1")), "SNAT flow not tracked?"
        # Close the marked connection: once the kernel destroys the entry, the replica drops it.
        r = streams["plain"].stop()
        assert r.error is None
        wait_for(lambda: not kernel_marked(lab, "fw1"), 20, step=0.5, what="fw1 to destroy it")
        wait_for(lambda: not kernel_replica(lab, "fw2"), 3, what="the replica to drop it")
        streams["snat"].stop()


def test_churn_under_ten_percent_loss_converges_entry_by_entry(measure: Any) -> None:
    with lab_pair() as pair:
        lab = pair.lab
        _start_synced(pair)
        lab.sync_loss(10)
        res = _churn(pair, "fw1", "--create", "4000", "--delete", "1500", "--batch", "250",
                     "--pause", "0.02", "--seed", "7")
        assert res["failed"] == 0 and res["deleted"] == 1500, res
        n = _assert_converged(pair, "fw1", "fw2", 30)
        s = pair.status("fw2")["sync"]
        s1 = pair.status("fw1")["sync"]
        measure("10% sync loss: converged entries / retransmits",  # type: ignore[operator]
                f"{n} / {s1['counters']['retransmits']}, fw2 nacks {s['counters']['nacks_sent']}")
        assert n == 2500
        assert s1["counters"]["retransmits"] > 0  # loss really happened and was repaired
        lab.sync_loss(0)


def test_peer_restart_gets_the_bulk_table_and_converges() -> None:
    with lab_pair() as pair:
        _start_synced(pair)
        _churn(pair, "fw1", "--create", "3000", "--delete", "500", "--seed", "3")
        _assert_converged(pair, "fw1", "fw2", 20)
        pair.stop("fw2")
        # Changes while the backup is away: it must learn them from the bulk resync.
        _churn(pair, "fw1", "--create", "1000", "--delete", "700", "--seed", "11")
        pair.start("fw2")
        n = _assert_converged(pair, "fw1", "fw2", 20)
        # And the master restarting: the backup takes over (its kernel holds everything
        # already), the master comes back, receives the bulk from fw2 and preempts only once
        # it holds the table.
        live = kernel_owned(pair.lab, "fw1")
        pair.kill("fw1")
        handover = wait_for(lambda: pair.status("fw2")["sync"]["last_handover"], MD_100 + 3,
                            what="fw2 to take the entries over")
        assert handover["entries"] == n, handover
        assert kernel_owned(pair.lab, "fw2") == live
        pair.start("fw1")
        wait_for(lambda: pair.state("fw1") == "master", 15, what="fw1 preempting back")
        handover = wait_for(lambda: pair.status("fw1")["sync"]["last_handover"], 3, what="hand-over")
        assert handover["entries"] == n, handover
        # It waited for fw2's bulk table before preempting: the log says so, in that order.
        log = pair.log_events("fw1")
        last_start = max(i for i, e in enumerate(log) if e.get("event") == "started")
        run = log[last_start:]
        allowed = next(i for i, e in enumerate(run) if e.get("event") == "preemption allowed")
        master = next(i for i, e in enumerate(run)
                      if e.get("event") == "state change" and e.get("new") == "master")
        assert allowed < master
        _assert_converged(pair, "fw1", "fw2", 20)


def test_a_resync_dumps_the_table_again_only_for_entries_that_can_be_stale() -> None:
    """A re-mark and a sweep each read the whole replicated table by dump (seconds at a
    million entries, the stream waiting). A backup that started with an empty table and a
    master that stepped down (its hand-over made every replica its own) hold no entry of an
    older generation, and resync without either; a backup restarted over the replica it
    held still sweeps what it missed, entry by entry."""
    with lab_pair() as pair:
        _start_synced(pair)
        _churn(pair, "fw1", "--create", "3000", "--seed", "7")
        _assert_converged(pair, "fw1", "fw2", 20)

        def scans(node: str) -> tuple[int, int]:
            c = pair.status(node)["sync"]["counters"]
            return c["remark_scans"], c["sweep_scans"]

        assert scans("fw2") == (0, 0)  # it started empty: nothing could be stale
        # Deletes fw2 misses: its daemon away, its kernel keeps the replica. At start it
        # counts one generation there: the resync sweeps it, and re-marks nothing.
        pair.stop("fw2")
        _churn(pair, "fw1", "--create", "500", "--delete", "700", "--seed", "11")
        pair.start("fw2")
        _assert_converged(pair, "fw1", "fw2", 20)
        wait_for(lambda: scans("fw2") == (0, 1), 10, what="fw2's one sweep")
        # fw1 steps down: fw2 hands the entries over and sends them back; fw1, whose entries
        # were all its own, resyncs without reading its table again.
        pair.signal("fw1", signal.SIGUSR1)
        wait_for(lambda: pair.master() == "fw2", 3, what="fw2 master after the step-down")
        wait_for(lambda: pair.status("fw2")["sync"]["last_handover"], 10, what="fw2's hand-over")
        _assert_converged(pair, "fw2", "fw1", 20)
        wait_for(lambda: pair.status("fw1")["sync"]["counters"]["resyncs_applied"] >= 1, 10,
                 what="fw1 to apply fw2's resync")
        assert scans("fw1") == (0, 0)
        assert len(kernel_owned(pair.lab, "fw1")) == 0  # all fw2's now: fw1 holds replicas
        # And back: fw1 resumes and preempts. fw2 held replicas before its takeover; its
        # hand-over made them all its own, so its resync as backup again reads nothing.
        applied = pair.status("fw2")["sync"]["counters"]["resyncs_applied"]
        assert control.request(control_socket(pair.lab, "fw1"), "resume")["ok"]
        wait_for(lambda: pair.master() == "fw1", 10, what="fw1 master after resume")
        _assert_converged(pair, "fw1", "fw2", 20)
        wait_for(lambda: pair.status("fw2")["sync"]["counters"]["resyncs_applied"] > applied, 10,
                 what="fw2 to apply fw1's resync")
        assert scans("fw2") == (0, 1)


def test_a_bulk_into_an_empty_table_creates_each_entry_once(measure: Any) -> None:
    """A rebooted backup (empty kernel table) receives the master's table as UPSERTs, which
    the applier tried as updates first (right for the resync of a table it holds): into an
    empty table every update failed and was sent again as a create, twice the kernel's work.
    The applier learns from a batch's answers which to try first, both ways."""
    with lab_pair() as pair:
        _start_synced(pair, env1={"INVICTUSD_TEST_HOOKS": "1"})
        _churn(pair, "fw1", "--create", "3000", "--seed", "5")
        _assert_converged(pair, "fw1", "fw2", 20)
        # A reboot of fw2: daemon stopped, kernel table empty.
        pair.stop("fw2")
        pair.lab.exec("fw2", "conntrack", "-F", check=False)
        pair.start("fw2")
        n = _assert_converged(pair, "fw1", "fw2", 20)
        c = pair.status("fw2")["sync"]["counters"]
        measure("bulk of 3000 entries into an empty table: created / updated / sent twice",
                f"{c['applied_created']} / {c['applied_updated']} / {c['applied_retried']}")
        assert n == 3000 and c["applied_created"] >= 3000, c
        # What the first datagram's records taught it (~40), not one retry per entry.
        assert c["applied_retried"] <= 100, c
        # And back: a resync of the table fw2 now holds (fw1's next dump fails, the resync
        # retries it) is tried as updates again after a batch.
        resyncs = c["resyncs_applied"]
        assert control.request(control_socket(pair.lab, "fw1"), "fault", what="dump")["ok"]
        wait_for(lambda: pair.status("fw2")["sync"]["counters"]["resyncs_applied"] > resyncs, 15,
                 what="fw2 to apply the resync")
        after = pair.status("fw2")["sync"]["counters"]
        measure("resync of 3000 entries fw2 holds, after that bulk: updated / sent twice",
                f"{after['applied_updated'] - c['applied_updated']} / "
                f"{after['applied_retried'] - c['applied_retried']}")
        assert after["applied_updated"] - c["applied_updated"] >= 3000 - 100, after
        assert after["applied_retried"] - c["applied_retried"] <= 100, after
        assert _assert_converged(pair, "fw1", "fw2", 10) == 3000


def test_a_bulk_beyond_the_replica_cap_is_refused_and_counted() -> None:
    """``max_replica_entries`` bounds what a peer may create here. A bulk arrives as
    UPSERTs, not as new entries: the cap must hold for the creates they turn into."""
    with lab_pair() as pair:
        pair.configure("fw1", start_as_master=True, sync=True)
        pair.configure("fw2", sync=True, sync_extra={"max_replica_entries": 1000})
        pair.start("fw1")
        wait_for(lambda: pair.state("fw1") == "master", 12, what="fw1 master")
        _churn(pair, "fw1", "--create", "1500", "--seed", "7")
        pair.start("fw2")  # it receives the 1500 by bulk
        wait_for(lambda: pair.status("fw2")["sync"]["counters"]["over_capacity"] >= 500, 15,
                 what="fw2 to refuse what is over its cap")
        time.sleep(1)
        held = kernel_marked(pair.lab, "fw2")
        assert len(held) == 1000, len(held)
        assert pair.status("fw2")["sync"]["peer_entries"] == 1000


def _send_udp_from(lab: Lab, node: str, src: tuple[str, int], dst: tuple[str, int],
                   payloads: list[bytes]) -> None:
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"s.bind(({src[0]!r},{src[1]}))\n"
        f"for p in {[p.hex() for p in payloads]!r}:\n"
        f"    s.sendto(bytes.fromhex(p),({dst[0]!r},{dst[1]}))\n"
    )
    lab.exec(node, sys.executable, "-c", code)


def test_forged_replayed_and_foreign_datagrams_are_rejected_and_counted() -> None:
    with lab_pair() as pair:
        lab = pair.lab
        c = lab.config
        _start_synced(pair)
        _churn(pair, "fw1", "--create", "200", "--seed", "5")
        _assert_converged(pair, "fw1", "fw2", 10)
        # Record real datagrams fw1 sends while it replicates more entries.
        cap = lab.start_capture("fw2", c.sync_if, "udp and src host 10.9.0.1")
        time.sleep(0.5)
        _churn(pair, "fw1", "--create", "100", "--seed", "6")
        time.sleep(1)
        pcap = cap.stop()
        datagrams = _udp_payloads(pcap)
        assert len(datagrams) >= 2
        before = kernel_replica(lab, "fw2")
        c0 = pair.status("fw2")["sync"]["counters"]
        port = 3781
        # Replayed byte for byte, from the peer's own address and port.
        _send_udp_from(lab, "fw1", ("10.9.0.1", port), ("10.9.0.2", port), datagrams)
        # Forged: random bytes, and a real datagram with one bit flipped.
        flipped = bytearray(datagrams[-1])
        flipped[len(flipped) // 2] ^= 0x01
        _send_udp_from(lab, "fw1", ("10.9.0.1", port), ("10.9.0.2", port),
                       [bytes(range(200)), b"IV" + bytes(100), bytes(flipped)])
        # From the right address but another port: not the configured peer.
        _send_udp_from(lab, "fw1", ("10.9.0.1", 4000), ("10.9.0.2", port), datagrams[:3])

        def counted() -> bool:
            c1 = pair.status("fw2")["sync"]["counters"]

            def d(k: str) -> int:
                return int(c1.get(k, 0)) - int(c0.get(k, 0))

            replay = d("drop_duplicate") + d("drop_epoch") + d("drop_retired_epoch")
            return (replay >= len(datagrams) - 1 and d("drop_auth") + d("drop_malformed") >= 3
                    and d("foreign_datagrams") >= 3)

        wait_for(counted, 5, what="replays, forgeries and foreign datagrams counted")
        assert kernel_replica(lab, "fw2") == before == kernel_owned(lab, "fw1")


def _ct_insert(lab: Lab, node: str, src: str, dst: str, sport: int, *, zone: int = 0) -> None:
    """A marked, established TCP entry through conntrack(8) (it raises a NEW event)."""
    lab.exec(node, "conntrack", "-I", "-p", "tcp", "-s", src, "-d", dst, "--sport", str(sport),
             "--dport", "9001", "--state", "ESTABLISHED", "-u", "SEEN_REPLY,ASSURED", "-t", "3600",
             "-m", str(MARK), "-w", str(zone))


def test_entries_outside_what_the_backup_replicates_never_reach_its_kernel() -> None:
    """Nodes configured apart (another mark bit; wider zones and families on the master):
    the backup keeps nothing outside its own ``[sync]`` scope, counts each refusal by
    reason and converges once its configuration agrees; the master sends nothing outside
    its own."""
    with lab_pair(LabConfig(ipv6=True)) as pair:
        lab = pair.lab
        wide = {"zones": [0, 7], "families": ["ipv4", "ipv6"]}
        pair.configure("fw1", start_as_master=True, sync=True, sync_extra=wide)
        pair.configure("fw2", sync=True, sync_extra={"families": ["ipv4"], "mark_bit": 27})
        pair.start("fw1")
        pair.start("fw2")
        wait_for(lambda: pair.master() == "fw1", 12, what="fw1 master")
        _ct_insert(lab, "fw1", "10.10.1.1", "10.20.0.100", 4001)  # in both scopes
        _ct_insert(lab, "fw1", "10.10.1.2", "10.20.0.100", 4002, zone=7)  # fw1's zones only
        _ct_insert(lab, "fw1", "fd10::13", "fd20::100", 4003)  # fw1's families only
        _ct_insert(lab, "fw1", "10.10.1.4", "10.20.0.100", 4004, zone=9)  # nobody's zones

        def counters(node: str) -> dict[str, int]:
            return dict(pair.status(node)["sync"]["counters"])

        wait_for(lambda: counters("fw2").get("rejected_mark", 0) >= 1
                 and counters("fw2").get("rejected_zone", 0) >= 1
                 and counters("fw2").get("rejected_family", 0) >= 1, 10,
                 what="fw2 refusing the three entries fw1 sends, one reason each")
        assert counters("fw1")["out_of_scope"] >= 1  # zone 9: not sent at all
        assert not [e for e in lab.ct_list("fw2") if 4001 <= e.orig[2] <= 4004]

        # The administrator fixes fw2's mark bit: the replica converges to what both replicate.
        pair.stop("fw2")
        pair.configure("fw2", sync=True, sync_extra={"families": ["ipv4"]})
        pair.start("fw2")
        wait_for(lambda: {k[2][0] for k in kernel_replica(lab, "fw2")} == {"10.10.1.1"}, 10,
                 what="fw2 holding the one entry both nodes replicate")
        c2 = counters("fw2")
        assert c2["rejected_zone"] >= 1 and c2["rejected_family"] >= 1 and c2["rejected_mark"] == 0, c2
        time.sleep(1)  # nothing else arrives later
        assert {k[2][0] for k in kernel_marked(lab, "fw2")} == {"10.10.1.1"}


def _udp_payloads(pcap: Any) -> list[bytes]:
    """UDP payloads of an Ethernet pcap (little parser: no scapy import needed)."""
    with open(pcap, "rb") as f:
        data = f.read()
    out, off = [], 24
    while off + 16 <= len(data):
        incl = int.from_bytes(data[off + 8 : off + 12], "little")
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
            continue
        ihl = (frame[14] & 0x0F) * 4
        udp = frame[14 + ihl :]
        length = int.from_bytes(udp[4:6], "big")
        out.append(bytes(udp[8:length]))
    return out





def test_ipv6_tcp_stream_and_its_gateway_address_survive_a_node_crash() -> None:
    """IPv6 gateway addresses move with the group (announced by unsolicited NA)."""
    with lab_pair(LabConfig(ipv6=True)) as pair:
        lab = pair.lab
        c = lab.config
        _start_synced(pair)
        assert c.lan_vip6 in {a.split("/")[0] for a in lab.addresses("fw1", c.lan_if)}
        s6 = lab.start_stream("tcp", c.plain_port, dst=c.server_ip6, label="tcp6", dead_after=8)
        s4 = lab.start_stream("tcp", c.snat_port, label="tcp4-snat", dead_after=8)
        wait_for(lambda: {k[0] for k in kernel_replica(lab, "fw2")} == {4, 6}, 5,
                 what="the IPv6 and the IPv4 flow replicated")
        _crash(pair, "node_crash")
        wait_for(lambda: pair.state("fw2") == "master", MD_100 + 1, what="fw2 master")
        wait_for(lambda: c.wan_vip6 in {a.split("/")[0] for a in lab.addresses("fw2", c.wan_if)},
                 3, what="fw2 holding the IPv6 WAN address")
        time.sleep(4)
        for s in (s6, s4):
            r = s.stop()
            assert r.error is None and r.seq_ok, (s.label, r.error, r.error_detail)
            assert r.acked >= r.sent - 2


# ---- the two hazards of a replica in the backup's kernel (issue 9) ------------------------


def test_replica_entries_expiring_on_the_backup_are_never_announced() -> None:
    """Ownership: a replica that expires on the backup raises a DESTROY there (port id 0). A
    backup announcing it would make the master delete its live connection. Only the master
    sends its table; the backup's own injections and expiries never leave it."""
    with lab_pair() as pair:
        lab = pair.lab
        _start_synced(pair)
        _churn(pair, "fw1", "--create", "200", "--seed", "91")
        n = _assert_converged(pair, "fw1", "fw2", 15)
        live = kernel_owned(lab, "fw1")
        sent0 = pair.status("fw2")["sync"]["counters"]["data_datagrams_sent"]
        # Every replica on the backup times out in a second (as if the master's DESTROY
        # never came and the long replica timeout ran out).
        _set_timeouts(lab, "fw2", REPLICA, 1)
        wait_for(lambda: not kernel_replica(lab, "fw2"), 10, step=0.5, what="the replicas to expire")
        time.sleep(2)
        assert kernel_owned(lab, "fw1") == live, "the backup's expiries reached the master"
        assert len(live) == n
        assert pair.status("fw2")["sync"]["counters"]["data_datagrams_sent"] == sent0 == 0


def _set_timeouts(lab: Lab, node: str, mark: int, timeout: int) -> None:
    """Give every entry with ``mark`` in ``node``'s kernel ``timeout`` (conntrack -U cannot)."""
    code = ("from invictusd.io import conntrack as C\n"
            "from invictusd.io import ctnetlink as ct\n"
            f"flows = [f for f in C.dump(None) if f.mark & {mark}]\n"
            "with C.Injector() as inj:\n"
            "    base = inj.next_seqs(len(flows))\n"
            f"    msgs = [ct.build_create(f._replace(timeout={timeout}), base + i, create=False,\n"
            "                            with_status=False, ack=False) for i, f in enumerate(flows)]\n"
            "    assert not inj.run(msgs, base)\n")
    p = lab.python(node, "-c", code, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err


def test_a_replica_outlives_the_masters_timeout_while_traffic_refreshes_it(measure: Any) -> None:
    """Liveness: traffic refreshes the master's entry without any event. A replica injected
    with the master's timeout would expire on the backup while the flow lives; it gets a long
    one instead, and the flow survives a takeover long after the master's timeout."""
    cfg = LabConfig(ipv6=False, fw_sysctls={"net.netfilter.nf_conntrack_udp_timeout_stream": "6",
                                            "net.netfilter.nf_conntrack_udp_timeout": "4"})
    with lab_pair(cfg) as pair:
        lab = pair.lab
        c = lab.config
        _start_synced(pair)
        s = lab.start_stream("udp", c.plain_port, label="udp-long", interval=0.05, dead_after=8)
        wait_for(lambda: len(kernel_replica(lab, "fw2")) == 1, 5, what="the flow replicated")
        time.sleep(12)  # twice the master's timeout, refreshed by packets only
        (mine,) = [e for e in lab.ct_list("fw1") if e.orig[3] == c.plain_port]
        (held,) = [e for e in lab.ct_list("fw2") if e.orig[3] == c.plain_port]
        assert mine.timeout <= 6 and held.timeout > 3600, (mine.timeout, held.timeout)
        t0 = time.monotonic()
        _crash(pair, "node_crash")
        wait_for(lambda: pair.state("fw2") == "master", MD_100 + 1, what="fw2 master")
        time.sleep(2)
        r = s.stop()
        resumed = [a for a in r.acks if a[2] > t0]
        measure("UDP flow 12 s old (master's timeout 6 s) across a node crash: echoes after it",
                str(len(resumed)))
        assert r.error is None and len(resumed) > 10, (r.error, len(resumed))
        # After the takeover the inherited entry has the kernel's timeout again, not days.
        (taken,) = [e for e in lab.ct_list("fw2") if e.orig[3] == c.plain_port]
        assert taken.timeout <= 6 and not taken.mark & REPLICA
