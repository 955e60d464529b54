"""Transcoding against the real kernel, each test in fresh network namespaces.

* The event filter attached to a ctnetlink event socket passes exactly the replicated events:
  marked, not replica-marked, not caused by our own injector socket.
* Round trip without packets: entries made over ctnetlink in namespace A (plain, SNAT, DNAT,
  UDP, ICMP, IPv6, zones), their events and a dump transcoded into wire records, sent through
  sealed datagrams, rebuilt with ``build_entry``/``build_entry_delete`` and injected into
  namespace B; ``conntrack -L -o extended`` and a raw dump of both must agree.

The work runs in forked children that join a namespace with ``setns``; results come back
pickled. Sockets are made here, not with ``invictusd.io.conntrack`` (being rewritten).
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from invictusd import flows as F
from invictusd.flows import Flow, FlowKey
from invictusd.io import ctnetlink as ct
from invictusd.io import transcode as T
from invictusd.io.sockopt import attach_filter
from invictusd.sync import wire
from tests import nsutil
from tests.nsutil import in_netns

pytestmark = pytest.mark.netns

MARK_BIT = 30
MARK = 1 << MARK_BIT
REPLICA = 0x01000000  # the bit the backup adds to its replica
REPLICA_TIMEOUT = 7200
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
EST = F.IPS_SEEN_REPLY | F.IPS_ASSURED
V4 = socket.inet_aton
KEY = b"k" * 32


def V6(s: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, s)


# --- plumbing ----------------------------------------------------------------------------------
@pytest.fixture
def two_ns() -> Iterator[tuple[str, str]]:
    names = [nsutil.unique_name("tca"), nsutil.unique_name("tcb")]
    nsutil.create_many(names)
    try:
        yield names[0], names[1]
    finally:
        nsutil.delete_many(names)


def nl_socket(rcvbuf: int = 8 << 20) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    sock.bind((0, 0))
    sock.settimeout(5)
    return sock


def event_socket() -> socket.socket:
    sock = nl_socket(32 << 20)
    for group in (1, 2, 3):
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    return sock


def port_id(sock: socket.socket) -> int:
    return int(sock.getsockname()[0])


def enable_events() -> None:
    """``nf_conntrack_events=1`` in this namespace (a dump first loads conntrack here)."""
    with nl_socket() as s:
        s.send(ct.build_dump_request(1))
        while not ct.parse_dump(s.recv(1 << 16))[1]:
            pass
    with open("/proc/sys/net/netfilter/nf_conntrack_events", "w") as f:
        f.write("1\n")


def request(sock: socket.socket, msg: bytes) -> int:
    """Send one acked request; the errno of its answer (0: done)."""
    sock.send(msg)
    while True:
        for _seq, err in ct.parse_acks(sock.recv(1 << 16)):
            return err


def drain(sock: socket.socket, settle_s: float = 0.3) -> list[bytes]:
    """Every datagram queued on ``sock`` until it stays quiet for ``settle_s``."""
    out = []
    while select.select([sock], [], [], settle_s)[0]:
        out.append(sock.recv(1 << 16))
    return out


def cli_lines() -> list[str]:
    proc = subprocess.run(["conntrack", "-L", "-o", "extended"], capture_output=True, text=True,
                          timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"conntrack -L: {proc.stderr.strip()}")
    return sorted(line for line in proc.stdout.splitlines() if line.strip())


def raw_dump() -> list[Flow]:
    with nl_socket(16 << 20) as s:
        s.send(ct.build_dump_request(2))
        out: list[Flow] = []
        while True:
            flows, done = ct.parse_dump(s.recv(1 << 20))
            out.extend(flows)
            if done:
                return out


def parse_cli(line: str) -> dict[str, Any]:
    """One ``conntrack -L -o extended`` line: tuples, state, flags, mark, zones, timeout."""
    words = line.split()
    out: dict[str, Any] = {"family": words[0], "proto": int(words[3]), "timeout": int(words[4]),
                           "state": None, "flags": set(), "orig": {}, "reply": {}, "other": {}}
    side = "orig"
    for w in words[5:]:
        if "=" in w:
            k, v = w.split("=", 1)
            if k in ("src", "dst", "sport", "dport", "type", "code", "id"):
                if k == "src" and out[side]:
                    side = "reply"
                out[side][k] = v
            else:
                out["other"][k] = v
        elif w.startswith("["):
            out["flags"].add(w.strip("[]"))
        else:
            out["state"] = w
    return out


# --- the entries made in namespace A --------------------------------------------------------------
def tcp(src: str, dst: str, sport: int, dport: int, zone: int = 0) -> FlowKey:
    return FlowKey(4, 6, V4(src), V4(dst), sport, dport, zone)


def plain(key: FlowKey, **kw: Any) -> Flow:
    return Flow(key, F.inverse(key), **kw)


FLOWS: dict[str, Flow] = {
    "tcp": plain(tcp("10.0.0.1", "10.0.0.2", 40000, 80), status=EST, timeout=300, mark=MARK,
                 tcp_state=F.TCP_ESTABLISHED),
    "tcp_synsent": plain(tcp("10.0.0.1", "10.0.0.2", 40001, 80), status=0, timeout=100, mark=MARK | 7,
                         tcp_state=F.TCP_SYN_SENT),
    "udp": plain(FlowKey(4, 17, V4("10.0.1.1"), V4("10.0.0.2"), 5353, 53), status=F.IPS_SEEN_REPLY,
                 timeout=30, mark=MARK | 5),
    "icmp": plain(FlowKey(4, 1, V4("10.0.1.1"), V4("10.0.0.2"), 77, 8 << 8), timeout=30, mark=MARK),
    "tcp6": plain(FlowKey(6, 6, V6("fd00::1"), V6("fd00::2"), 40000, 443), status=EST, timeout=300,
                  mark=MARK, tcp_state=F.TCP_ESTABLISHED),
    "udp6": plain(FlowKey(6, 17, V6("fd00::1"), V6("fd00::2"), 5000, 53), status=F.IPS_SEEN_REPLY,
                  timeout=30, mark=MARK),
    "icmp6": plain(FlowKey(6, 58, V6("fd00::1"), V6("fd00::2"), 123, 128 << 8), timeout=30, mark=MARK),
    "snat": Flow(tcp("192.168.1.10", "10.0.0.2", 33333, 80), tcp("10.0.0.2", "10.9.9.9", 80, 40001),
                 status=EST, timeout=300, mark=MARK, tcp_state=F.TCP_ESTABLISHED),
    "snat_addr_only": Flow(FlowKey(4, 17, V4("192.168.1.11"), V4("10.0.0.2"), 6000, 53),
                           FlowKey(4, 17, V4("10.0.0.2"), V4("10.9.9.9"), 53, 6000),
                           status=F.IPS_SEEN_REPLY, timeout=30, mark=MARK),
    "dnat": Flow(tcp("10.0.0.5", "10.0.0.100", 44444, 80), tcp("192.168.1.20", "10.0.0.5", 8080, 44444),
                 status=EST, timeout=300, mark=MARK, tcp_state=F.TCP_ESTABLISHED),
    "dnat_udp": Flow(FlowKey(4, 17, V4("10.0.0.5"), V4("10.0.0.100"), 4444, 53),
                     FlowKey(4, 17, V4("192.168.1.20"), V4("10.0.0.5"), 5353, 4444),
                     status=F.IPS_SEEN_REPLY, timeout=30, mark=MARK),
    "snat6": Flow(FlowKey(6, 6, V6("fd01::10"), V6("fd00::2"), 33333, 80),
                  FlowKey(6, 6, V6("fd00::2"), V6("fd00::99"), 80, 40002),
                  status=EST, timeout=300, mark=MARK, tcp_state=F.TCP_ESTABLISHED),
    "zone": plain(tcp("10.0.0.1", "10.0.0.2", 1000, 22, zone=5), status=EST, timeout=300, mark=MARK,
                  tcp_state=F.TCP_ESTABLISHED),
    "dirzone_snat": Flow(FlowKey(4, 17, V4("10.0.0.1"), V4("10.0.0.2"), 1000, 53, 6),
                         FlowKey(4, 17, V4("10.0.0.2"), V4("10.0.0.9"), 53, 1000, 0),
                         status=F.IPS_SEEN_REPLY, timeout=30, mark=MARK),
    "gone": plain(tcp("10.0.0.1", "10.0.0.3", 40000, 80), status=EST, timeout=300, mark=MARK,
                  tcp_state=F.TCP_ESTABLISHED),
    # not replicated: unmarked, other mark, already a replica
    "unmarked": plain(tcp("10.0.0.7", "10.0.0.8", 1, 2), status=EST, timeout=300, mark=0,
                      tcp_state=F.TCP_ESTABLISHED),
    "other_mark": plain(tcp("10.0.0.7", "10.0.0.8", 3, 4), status=EST, timeout=300, mark=5,
                        tcp_state=F.TCP_ESTABLISHED),
    "replica": plain(tcp("10.0.0.7", "10.0.0.8", 5, 6), status=EST, timeout=300, mark=MARK | REPLICA,
                     tcp_state=F.TCP_ESTABLISHED),
    # a directional zone without NAT: it travels in the NAT form (its reply tuple and zone)
    "dirzone_plain": Flow(FlowKey(4, 17, V4("10.0.0.1"), V4("10.0.0.2"), 2000, 53, 6),
                          FlowKey(4, 17, V4("10.0.0.2"), V4("10.0.0.1"), 53, 2000, 0),
                          status=F.IPS_SEEN_REPLY, timeout=30, mark=MARK),
}
REPLICATED = {n for n, f in FLOWS.items()
              if f.mark & MARK and not f.mark & REPLICA and n != "gone"}


# --- kernel filter ------------------------------------------------------------------------------
def _filter_scenario() -> dict[str, Any]:
    enable_events()
    filtered = event_socket()
    everything = event_socket()
    own = nl_socket()
    other = nl_socket()
    attach_filter(filtered, T.event_filter(MARK_BIT, REPLICA, port_id(own)))
    seq = iter(range(1, 1 << 20))
    results = []
    steps: list[tuple[socket.socket, str, str]] = [
        (other, "create", "tcp"),  # NEW passes
        (other, "update", "tcp"),  # UPDATE passes
        (other, "create", "unmarked"),  # mark 0: dropped
        (other, "create", "other_mark"),  # mark without the bit: dropped
        (other, "create", "replica"),  # replica bit: dropped
        (own, "create", "udp"),  # our own injector: dropped
        (own, "update", "udp"),  # dropped
        (other, "delete", "udp"),  # DESTROY by another socket: passes
        (other, "delete", "unmarked"),  # DESTROY without CTA_MARK: dropped
        (own, "delete", "tcp"),  # DESTROY by us: dropped
        (other, "delete", "replica"),  # dropped
        (other, "create", "snat"),  # passes
        (other, "delete", "snat"),  # passes
    ]
    for sock, what, name in steps:
        flow = FLOWS[name]
        if what == "create":
            msg = ct.build_create(flow, next(seq))
        elif what == "update":
            msg = ct.build_create(flow._replace(timeout=1000), next(seq), create=False)
        else:
            msg = ct.build_delete(flow, next(seq))
        results.append(request(sock, msg))
    # a packet-made entry (nlmsg_pid 0) marked by nft: passes
    nft = ("table ip t {\n chain out {\n  type filter hook output priority -150;\n"
           "  ip daddr 127.0.0.1 udp dport 9 ct mark set 0x40000000\n }\n}\n")
    subprocess.run(["nft", "-f", "-"], input=nft, text=True, check=True, capture_output=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("127.0.0.1", 9))
    got = drain(filtered)
    seen_all = drain(everything)
    return {"acks": results, "filtered": got, "all": seen_all, "own": port_id(own),
            "other": port_id(other)}


def _events(datagrams: list[bytes]) -> list[tuple[int, FlowKey, int]]:
    out = []
    for d in datagrams:
        off = 0
        while off < len(d):
            mlen, _mtype, _flags, _seq, pid = struct.unpack_from("=IHHII", d, off)
            for ev in ct.parse_messages(d[off : off + mlen]):
                out.append((int(ev.kind), ev.flow.orig, pid))
            off += (mlen + 3) & ~3
    return out


def test_event_filter_in_the_kernel() -> None:
    with nsutil.netns("tcf") as ns:
        res = in_netns(ns, _filter_scenario)
    assert res["acks"] == [0] * len(res["acks"])
    got = [(kind, key) for kind, key, _pid in _events(res["filtered"])]
    NEW, UPD, DEL = F.EventKind.NEW, F.EventKind.UPDATE, F.EventKind.DESTROY
    pkt = FlowKey(4, 17, V4("127.0.0.1"), V4("127.0.0.1"), 0, 9)
    want = [(NEW, FLOWS["tcp"].orig), (UPD, FLOWS["tcp"].orig), (DEL, FLOWS["udp"].orig),
            (NEW, FLOWS["snat"].orig), (DEL, FLOWS["snat"].orig)]
    assert got[: len(want)] == want
    (last,) = got[len(want):]
    assert last[0] == NEW and last[1]._replace(sport=0) == pkt
    pids = [pid for *_, pid in _events(res["filtered"])]
    assert res["own"] not in pids and pids[-1] == 0
    # the unfiltered socket saw what was dropped (the filter is not vacuous)
    assert len(_events(res["all"])) > len(got) + 6
    assert res["own"] in [pid for *_, pid in _events(res["all"])]


# --- round trip -------------------------------------------------------------------------------------
def _master(names: list[str]) -> dict[str, Any]:
    """Namespace A: make the entries, change and delete some, transcode events and a dump.

    Accounting and timestamps are on: DESTROY events and dump replies then carry
    CTA_COUNTERS_ORIG/REPLY and CTA_TIMESTAMP, layouts the transcoder must take in its stride.
    """
    enable_events()
    for knob in ("nf_conntrack_acct", "nf_conntrack_timestamp"):
        with open(f"/proc/sys/net/netfilter/{knob}", "w") as f:
            f.write("1\n")
    ev = event_socket()
    inj = nl_socket()
    attach_filter(ev, T.event_filter(MARK_BIT, REPLICA, 0))
    acks = []
    for i, name in enumerate(names):
        acks.append(request(inj, ct.build_create(FLOWS[name], 100 + i)))
    # an update (mark and state change) and a delete, seen as UPDATE and DESTROY events
    changed = FLOWS["tcp_synsent"]._replace(status=EST, tcp_state=F.TCP_ESTABLISHED, mark=MARK | 9)
    acks.append(request(inj, ct.build_create(changed, 500, create=False)))
    acks.append(request(inj, ct.build_delete(FLOWS["gone"], 501)))
    tr = T.EventTranscoder(MARK_BIT, REPLICA)
    raw = drain(ev)
    batches = [tr.transcode(d, len(d)) for d in raw]
    batches += [tr.transcode(d, len(d)) for d in raw]  # again: now by the compiled layouts
    tops = set()
    for d in raw:
        a = 20
        while a + 4 <= len(d):
            alen, atype = struct.unpack_from("=HH", d, a)
            tops.add(atype & 0x3FFF)
            a += (alen + 3) & ~3
    with nl_socket(16 << 20) as s:
        s.send(ct.build_dump_request(3, ct.AF_UNSPEC, MARK, MARK))
        dump_batches = []
        while True:
            buf = s.recv(1 << 20)
            b = tr.transcode(buf, len(buf), dump=True)
            dump_batches.append(b)
            if b.done:
                break
    return {"acks": acks, "events": batches[: len(raw)], "again": batches[len(raw):], "dump": dump_batches,
            "cli": cli_lines(), "flows": raw_dump(), "fast": tr.fast, "generic": tr.generic,
            "attr_types": tops}


def _through_datagrams(records: list[bytes]) -> list[wire.Record]:
    """Records sealed into DATA datagrams and decoded again, as the backup receives them."""
    out: list[wire.Record] = []
    for seq, group in enumerate(wire.pack_records(records), 1):
        b = wire.DatagramBuilder()
        for r in group:
            assert b.add(r)
        dgram = b.finish(wire.Header(wire.DatagramType.DATA, 1, 7, 9, seq), KEY)
        out.extend(wire.decode_datagram(dgram, KEY).records)
    return out


def _backup(records: list[wire.Record]) -> dict[str, Any]:
    """Namespace B: apply the records the way the engine will (create/update, then fall back)."""
    enable_events()
    inj = nl_socket()
    quiet = event_socket()  # events of our own injections: the filter must drop them all
    attach_filter(quiet, T.event_filter(MARK_BIT, REPLICA, port_id(inj)))
    outcomes = []
    seq = 1000
    for rec in records:
        seq += 1
        if isinstance(rec, wire.Delete):
            outcomes.append(("delete", request(inj, T.build_entry_delete(rec, seq, ack=True))))
            continue
        assert isinstance(rec, wire.Entry)
        kw: dict[str, Any] = {"mark": rec.mark | REPLICA, "timeout": REPLICA_TIMEOUT, "ack": True}
        first = rec.new
        err = request(inj, T.build_entry(rec, seq, create=first, **kw))
        if err in (errno.EEXIST, errno.ENOENT):
            err = request(inj, T.build_entry(rec, seq, create=not first, **kw))
        if err == errno.EBUSY:  # a status bit the entry has and the record lacks
            err = request(inj, T.build_entry(rec, seq, create=False, with_status=False, **kw))
        outcomes.append(("upsert", err))
    time.sleep(0.1)
    return {"outcomes": outcomes, "cli": cli_lines(), "flows": raw_dump(), "quiet": drain(quiet, 0.2)}


def _comparable(line: dict[str, Any], replica: bool) -> tuple[Any, ...]:
    other = dict(line["other"])
    for local in ("use", "packets", "bytes", "delta-time"):  # the master has accounting on
        other.pop(local, None)
    mark = int(other.pop("mark", "0"))
    return (line["family"], line["proto"], line["state"], frozenset(line["flags"]),
            tuple(sorted(line["orig"].items())), tuple(sorted(line["reply"].items())),
            tuple(sorted(other.items())), mark | (REPLICA if replica else 0))


def test_round_trip_through_records(two_ns: tuple[str, str]) -> None:
    a, b = two_ns
    names = [n for n in FLOWS if n != "dirzone_plain"] + ["dirzone_plain"]
    master = in_netns(a, _master, names)
    assert all(err == 0 for err in master["acks"]), master["acks"]
    records = [r for batch in master["events"] for r in batch.records]
    assert sum(batch.deleted for batch in master["events"]) == 1  # gone
    assert master["fast"] >= len(master["again"])
    assert master["again"] == master["events"]
    assert {9, 10, 20} <= master["attr_types"]  # CTA_COUNTERS_ORIG/REPLY, CTA_TIMESTAMP
    decoded = _through_datagrams(records)
    kinds = [wire.record_type_of(r) for r in decoded]
    assert kinds.count(wire.RecordType.UPSERT_NEW) == len(REPLICATED) + 1  # + gone
    assert wire.RecordType.UPSERT in kinds and wire.RecordType.DELETE in kinds

    backup = in_netns(b, _backup, decoded)
    assert all(err == 0 for _, err in backup["outcomes"]), backup["outcomes"]
    assert backup["quiet"] == [], "events of our own replica injections leaked through the filter"

    # conntrack's own view: the same entries, tuples, flags, state and zones; the replica mark
    a_lines = [parse_cli(x) for x in master["cli"]]
    a_rep = sorted(_comparable(x, True) for x in a_lines
                   if int(x["other"].get("mark", 0)) & MARK and not int(x["other"].get("mark", 0)) & REPLICA)
    b_all = sorted(_comparable(parse_cli(x), False) for x in backup["cli"])
    assert len(a_rep) == len(REPLICATED)
    assert b_all == a_rep
    for x in backup["cli"]:
        assert 0 < parse_cli(x)["timeout"] <= REPLICA_TIMEOUT

    # our dump of both: NAT status bits set by the kernel, same tuples (zones included)
    a_flows = {f.orig: f for f in master["flows"] if f.mark & MARK and not f.mark & REPLICA}
    b_flows = {f.orig: f for f in backup["flows"]}
    assert set(b_flows) == set(a_flows)
    nat_bits = F.IPS_SRC_NAT | F.IPS_DST_NAT | F.IPS_SEEN_REPLY | F.IPS_ASSURED
    for key, fa in a_flows.items():
        fb = b_flows[key]
        assert fb.reply == fa.reply, key
        assert fb.status & nat_bits == fa.status & nat_bits, key
        assert fb.mark == fa.mark | REPLICA, key
        assert fb.tcp_state == fa.tcp_state, key
    assert b_flows[FLOWS["snat"].orig].status & F.IPS_SRC_NAT
    assert b_flows[FLOWS["dnat"].orig].status & F.IPS_DST_NAT

    # the dump path: UPSERT records of every replicated entry, applied again (idempotent)
    dump_records = [r for batch in master["dump"] for r in batch.records]
    assert master["dump"][-1].done
    dumped = _through_datagrams(dump_records)
    assert all(wire.record_type_of(r) == wire.RecordType.UPSERT for r in dumped)
    assert {wire.entry_key(r) for r in dumped if isinstance(r, wire.Entry)} == {
        wire.key_bytes(*k) for k in a_flows
    }
    again = in_netns(b, _backup, dumped)
    assert all(err == 0 for _, err in again["outcomes"]), again["outcomes"]
    assert sorted(_comparable(parse_cli(x), False) for x in again["cli"]) == a_rep


# --- runs: a burst's events and a dump, transcoded across messages ---------------------------------
def _burst_scenario() -> dict[str, Any]:
    """Namespace A: 300 + 40 + 40 entries of three layouts (plain TCP, SNAT'd TCP, IPv6 UDP),
    made group by group as a burst makes them; the events read as the master reads them (many
    datagrams to a buffer, 4-aligned) and a dump."""
    enable_events()
    ev = event_socket()
    inj = nl_socket()
    attach_filter(ev, T.event_filter(MARK_BIT, REPLICA, 0))
    acks = []
    seq = 1000
    for i in range(300):
        f = plain(tcp("10.2.0.1", "10.0.0.2", 20000 + i, 80), status=EST, timeout=300, mark=MARK | 0x100,
                  tcp_state=F.TCP_ESTABLISHED)
        seq += 1
        acks.append(request(inj, ct.build_create(f, seq)))
    for i in range(40):
        f = Flow(tcp("192.168.5.10", "10.0.0.2", 30000 + i, 80), tcp("10.0.0.2", "10.9.9.9", 80, 50000 + i),
                 0, EST | F.IPS_SRC_NAT | F.IPS_SRC_NAT_DONE, 300, MARK, F.TCP_ESTABLISHED)
        seq += 1
        acks.append(request(inj, ct.build_create(f, seq)))
    for i in range(40):
        f = plain(FlowKey(6, 17, V6(f"fd00::{i + 1:x}"), V6("fd00::2"), 5000 + i, 53),
                  status=F.IPS_SEEN_REPLY, timeout=60, mark=MARK)
        seq += 1
        acks.append(request(inj, ct.build_create(f, seq)))
    buf = bytearray()
    for d in drain(ev):
        buf += d + bytes(-len(d) % 4)
    dumps = []
    # All of them (in the hash table's order: the layouts mixed), then one layout alone.
    for mark, mask in ((MARK, MARK), (MARK | 0x100, 0xFFFFFFFF)):
        with nl_socket(16 << 20) as s:
            s.send(ct.build_dump_request(3, ct.AF_UNSPEC, mark, mask))
            dump = []
            while True:
                chunk = s.recv(1 << 20)
                dump.append(chunk)
                if T.EventTranscoder(MARK_BIT, REPLICA).transcode(chunk, len(chunk), dump=True).done:
                    break
        dumps.append(dump)
    return {"acks": acks, "events": bytes(buf), "dumps": dumps}


def test_runs_of_real_events_and_dumps_are_the_per_message_path(two_ns: tuple[str, str]) -> None:
    res = in_netns(two_ns[0], _burst_scenario)
    assert all(err == 0 for err in res["acks"]), res["acks"]
    buf = res["events"]
    tr = T.EventTranscoder(MARK_BIT, REPLICA)
    got = tr.transcode(buf, len(buf))
    want = T.EventTranscoder(MARK_BIT, REPLICA).transcode(buf, len(buf), runs=False)
    assert got == want
    assert len(got.records) == 380
    assert tr.in_runs >= 370  # each layout's first message teaches it: the rest in 3 runs
    nat = [r for r in wire.decode_records(b"".join(got.records))
           if isinstance(r, wire.Entry) and r.is_nat]
    assert len(nat) == 40
    # A dump comes in chunks of the kernel's choosing (4-32 KB), runs within each.
    # The dumps, as the bulk reads them (chunks, one transcoder throughout).
    for dump, entries in zip(res["dumps"], (380, 300), strict=True):
        tr = T.EventTranscoder(MARK_BIT, REPLICA)
        dumped = [tr.transcode(c, len(c), dump=True) for c in dump]
        plain_dump = [T.EventTranscoder(MARK_BIT, REPLICA).transcode(c, len(c), dump=True, runs=False)
                      for c in dump]
        assert [b.records for b in dumped] == [b.records for b in plain_dump]
        assert [b.keys for b in dumped] == [b.keys for b in plain_dump]
        assert sum(len(b.records) for b in dumped) == entries
    assert tr.in_runs >= T.EVENT_RUN_MIN  # one layout alone: a run
