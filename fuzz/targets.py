"""Fuzz targets: one function per decoder, taking raw bytes.

Each target returns normally when the input decodes or is refused with the decoder's typed
error; anything else escaping (IndexError, struct.error, AssertionError, a ValueError that is
not the typed one, a hang) is a bug and atheris reports it as a crash. The targets do not
import atheris, so tests can call them with plain bytes too.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable

from invictusd import config
from invictusd import flows as F
from invictusd.io import ctnetlink, rtnl, transcode
from invictusd.sync import wire
from invictusd.sync.session import SessionConfig, SyncSession
from invictusd.vrrp import packet, receive, v3

KEY = bytes(range(32))
WRONG_KEY = bytes(range(1, 33))
OUR_EPOCH = 0x1111_2222_3333_4445
PEER_EPOCH = 0x5555_6666_7777_8889
VIP = ipaddress.IPv4Address("10.10.0.1")
EXPECT = packet.Expect(vrid=51, advert_interval=1, addresses=frozenset({VIP}),
                       auth_type=packet.AUTH_PASSWORD, password=b"s3cret")
# Configs never name a real directory: relative secret files resolve to nothing.
CONFIG_PATH = "/nonexistent-invictusd-fuzz/invictusd.toml"


# ---- VRRP -------------------------------------------------------------------------------


def vrrp(data: bytes) -> None:
    """An IPv4 packet as the raw socket delivers it, then the bare VRRP message."""
    try:
        _source, ttl, adv = packet.decode_ip(data)
        packet.validate(ttl, adv, EXPECT)
    except packet.PacketError:
        pass
    try:
        adv = packet.decode(data)
    except packet.PacketError:
        return
    # What decodes must re-encode to a message that decodes to the same advertisement
    # (addresses and auth data are the only variable-length parts).
    if adv.auth_type == packet.AUTH_PASSWORD and adv.advert_interval >= 1 and adv.vrid:
        again = packet.decode(packet.encode(adv))
        assert again == adv, (adv, again)


VIP6 = ipaddress.IPv6Address("fd10::1")
RECEIVERS = (
    receive.Receiver(3, ipaddress.IPv4Address("10.10.0.2"), frozenset(),
                     expect3=v3.ExpectV3(51, frozenset({VIP}))),
    receive.Receiver(3, ipaddress.IPv4Address("10.10.0.2"),
                     frozenset({ipaddress.IPv4Address("10.10.0.3")}),
                     expect3=v3.ExpectV3(51, frozenset({VIP}))),
    receive.Receiver(2, ipaddress.IPv4Address("10.10.0.2"), frozenset(), expect2=EXPECT),
)
RECEIVER6 = receive.Receiver(3, ipaddress.IPv6Address("fe80::2"), frozenset(),
                             expect3=v3.ExpectV3(51, frozenset({VIP6})))
ENDS6 = (ipaddress.IPv6Address("fe80::3"), v3.GROUP6)


def vrrp3(data: bytes) -> None:
    """VRRPv3: an IPv4 packet through every receive pipeline, then the bare message as an
    IPv4 and as an IPv6 payload (the pseudo-header from fixed addresses)."""
    for r in RECEIVERS:
        with contextlib.suppress(packet.PacketError):
            receive.receive_ip4(r, data)
    with contextlib.suppress(packet.PacketError):
        receive.receive_ip6(RECEIVER6, data, *ENDS6, 255)
    for src, dst in ((ipaddress.IPv4Address("10.10.0.3"), v3.GROUP4), ENDS6):
        try:
            adv = v3.decode(data, src, dst)
        except packet.PacketError:
            continue
        if adv.vrid == 0:
            continue  # decoded (validate refuses it as `vrid`), but never sent: encode refuses it
        # Symmetric: what decodes re-encodes to the bytes it came from, but for the
        # checksum's two zeros (RFC 1071): a received 0xffff verifies where we send 0x0000.
        n = v3.HEADER_LEN + len(adv.addresses) * (4 if src.version == 4 else 16)
        again = v3.encode(adv, src, dst)
        if data[6:8] == b"\xff\xff" and again[6:8] == b"\0\0":
            again = again[:6] + b"\xff\xff" + again[8:]
        assert again == data[:n], (adv, data[:n].hex(), again.hex())


# ---- sync datagrams ---------------------------------------------------------------------


def _flow(i: int, nat: bool = False, v6: bool = False) -> F.Flow:
    if v6:
        src, dst = bytes(15) + bytes([i % 250 + 1]), bytes(15) + b"\xfe"
        key = F.FlowKey(6, F.IPPROTO_UDP, src, dst, 1000 + i, 53, 0)
    else:
        key = F.FlowKey(4, F.IPPROTO_TCP, bytes([10, 10, 0, i % 250 + 1]), bytes([10, 20, 0, 100]),
                        1024 + i, 9001, 0)
    reply = F.inverse(key)
    if nat:
        reply = reply._replace(dst=bytes([10, 20, 0, 1]), dport=40000 + i)
    return F.Flow(key, reply, 1000 + i, F.IPS_SEEN_REPLY | F.IPS_ASSURED, 3600, 1 << 30,
                  F.TCP_ESTABLISHED if key.proto == F.IPPROTO_TCP else 0)


def _entry(i: int, nat: bool = False, v6: bool = False, new: bool = True) -> wire.Entry:
    return wire.entry_from_flow(_flow(i, nat, v6), new)


def valid_datagrams(key: bytes = KEY) -> list[bytes]:
    """Real datagrams of every type, sealed with ``key``: seeds, and bases for bit flips."""
    def h(t: wire.DatagramType, seq: int = 1, flags: int = 0) -> wire.Header:
        return wire.Header(t, 2, PEER_EPOCH, OUR_EPOCH, seq, 0, flags)

    data = wire.DatagramType.DATA
    out = [
        wire.encode_datagram(h(data, 1, wire.FLAG_SYNC_POINT),
                             [wire.ResyncBegin(1), _entry(1), _entry(2, nat=True), _entry(3, v6=True),
                              wire.ResyncEnd(1, 3)], key),
        wire.encode_datagram(h(data, 2), [_entry(1, new=False),
                                          wire.delete_from_key(_flow(2).orig),
                                          wire.delete_from_key(_flow(3, v6=True).orig),
                                          wire.Digest(2, 99)], key),
        wire.encode_datagram(h(wire.DatagramType.ACK, 2), [], key),
        wire.encode_datagram(h(wire.DatagramType.NACK, 2), [wire.NackRange(1, 2)], key),
        wire.encode_datagram(h(wire.DatagramType.HELLO, 0), [], key),
        wire.encode_datagram(h(wire.DatagramType.RESYNC_REQUEST, 0),
                             [wire.ResyncRequest(1, wire.RequestReason.DIGEST_MISMATCH)], key),
    ]
    return out


_VALID = valid_datagrams()


def sync_decode(data: bytes) -> None:
    """Unauthenticated bytes (what an attacker on the link sends), with the right key."""
    with contextlib.suppress(wire.WireError):
        wire.decode_datagram(data, KEY)
    with contextlib.suppress(wire.WireError):
        wire.decode_header(data)


def sync_sealed(data: bytes) -> None:
    """Bytes sealed with the right key (a compromised or buggy peer): the record parser."""
    sealed = wire.seal(data, KEY)
    try:
        dg = wire.decode_datagram(sealed, KEY)
    except wire.AuthError:
        raise AssertionError("a datagram sealed with the key failed its MAC") from None
    except wire.WireError:
        return
    # Whatever decodes re-encodes to the same bytes (the codec is symmetric).
    again = wire.encode_datagram(dg.header, dg.records, KEY, mtu=None)
    assert wire.decode_datagram(again, KEY) == dg


def sync_flipped(data: bytes) -> None:
    """Valid datagrams with bits flipped and bytes cut: always refused, mostly as AuthError."""
    if not data:
        return
    base = bytearray(_VALID[data[0] % len(_VALID)])
    rest = data[1:]
    for i in range(0, len(rest) - 1, 2):
        pos, bit = rest[i], rest[i + 1]
        base[(pos * 7 + bit) % len(base)] ^= 1 << (bit % 8)
    if len(rest) % 2:
        base = base[: rest[-1] % (len(base) + 1)]
    for key in (KEY, WRONG_KEY):
        try:
            wire.decode_datagram(bytes(base), key)
        except wire.WireError:
            continue


class _SessionBox:
    """A receiving session fed sealed datagrams; replaced every N inputs (bounded memory)."""

    EVERY = 2000

    def __init__(self) -> None:
        self.count = 0
        self.now = 0.0
        self.session = self._new()

    def _new(self) -> SyncSession:
        return SyncSession(SessionConfig(node_id=1, key=KEY, peer_node_id=2), OUR_EPOCH, self.now)

    def feed(self, data: bytes) -> None:
        self.count += 1
        if self.count % self.EVERY == 0:
            self.session = self._new()
        s = self.session
        self.now += 0.013
        s.datagram_received(data, self.now)
        for d in s.take_deliveries():  # what the applier does, minus the kernel
            s.applied(d.seq, self.now)
        s.timer(self.now)
        s.datagrams_to_send(self.now)
        s.pop_events()
        s.status()


_BOX: _SessionBox | None = None


def sync_session(data: bytes) -> None:
    """A session receiving authenticated datagrams whose header names it (epoch, node):
    the receiver's sequencing, acknowledgement and request logic under any sequence."""
    global _BOX
    if _BOX is None:
        _BOX = _SessionBox()
    if len(data) < 4:
        return
    mode, t, flags = data[0], data[1], data[2]
    raw_seq = data[3:4] if mode & 1 else data[3:7].ljust(4, b"\0")
    seq = int.from_bytes(raw_seq, "big")
    ack = data[7] if len(data) > 7 else 0
    head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, t % 6 if mode & 2 else t,
                            flags & 1 if mode & 4 else flags, 0, 2, PEER_EPOCH,
                            OUR_EPOCH if not mode & 8 else 0, seq, ack)
    _BOX.feed(wire.seal(head + data[8:], KEY))


# ---- config -----------------------------------------------------------------------------


def config_text(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    with contextlib.suppress(config.ConfigError):
        config.parse(text, CONFIG_PATH)


# ---- netlink ----------------------------------------------------------------------------


def netlink(data: bytes) -> None:
    """ctnetlink events, dump chunks and acks, and rtnetlink link/address messages."""
    mask = (1 << (data[0] % 32)) if data and data[0] & 0x80 else 0
    for fn in (ctnetlink.parse_messages, ctnetlink.parse_acks):
        with contextlib.suppress(ctnetlink.NetlinkError):
            fn(data) if fn is ctnetlink.parse_acks else fn(data, None, mask)
    with contextlib.suppress(ctnetlink.NetlinkError):
        ctnetlink.parse_dump(bytearray(data), None, mask)
    ctnetlink.parse_ack1(data, len(data))
    with contextlib.suppress(rtnl.RtnlError):
        rtnl.parse(data)


_TRANSCODER = transcode.EventTranscoder(30, (1 << 29) | (1 << 28))


def ct_transcode(data: bytes) -> None:
    """Conntrack events and dump chunks straight into wire records (the master's hot path):
    a batch of records that decode, or a clean NetlinkError."""
    with contextlib.suppress(ctnetlink.NetlinkError):
        batch = _TRANSCODER.transcode(data, len(data), dump=bool(data and data[0] & 1))
        assert len(batch.keys) == len(batch.records)
        wire.decode_records(b"".join(batch.records))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "vrrp": vrrp,
    "vrrp3": vrrp3,
    "sync_decode": sync_decode,
    "sync_sealed": sync_sealed,
    "sync_flipped": sync_flipped,
    "sync_session": sync_session,
    "config": config_text,
    "netlink": netlink,
    "ct_transcode": ct_transcode,
}


# ---- seeds ------------------------------------------------------------------------------


SEED_CONFIG = """\
[node]
name = "fw1"
control_socket = "/run/invictusd/x.sock"

[[vrrp]]
interface = "lan0"
real_address = "10.10.0.2"
virtual_address = "10.10.0.1/24"
virtual_id = 51
password = "s3cret"
start_as_master = true
advert_interval = 1
garp_refresh = 60.5

[[vrrp]]
interface = "wan0"
virtual_addresses = ["10.20.0.1", "10.20.0.5/24"]
virtual_id = 52
password = "s3cret"
start_as_master = true

[sync]
enabled = true
interface = "sync0"
peer_address = "10.9.0.2"
mark_bit = 30
rcvbuf_mb = 1
flush_ms = 2.5
"""


def _ip_header(payload: bytes, ttl: int = 255) -> bytes:
    import struct

    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, 20 + len(payload), 0, 0, ttl, 112, 0,
                       bytes([10, 10, 0, 3]), bytes([224, 0, 0, 18]))
    return head + payload


def seeds(target: str) -> list[bytes]:
    """A small starting corpus per target (valid inputs the mutator can start from)."""
    if target == "vrrp":
        good = packet.encode(packet.Advertisement(51, 100, (VIP,), auth_data=b"s3cret"))
        two = packet.encode(packet.Advertisement(52, 254, (VIP, ipaddress.IPv4Address("10.10.0.9")),
                                                 advert_interval=3, auth_data=b"x"))
        return [good, two, _ip_header(good), _ip_header(two, ttl=1), _ip_header(good)[:30]]
    if target == "vrrp3":
        src, dst = ipaddress.IPv4Address("10.10.0.3"), v3.GROUP4
        good = v3.encode(v3.AdvertisementV3(51, 100, (VIP,), 10), src, dst)
        six = v3.encode(v3.AdvertisementV3(51, 254, (VIP6,), 5), *ENDS6)
        return [good, six, _ip_header(good), _ip_header(good, ttl=64), _ip_header(good)[:25]]
    if target in ("sync_decode", "sync_flipped"):
        return [*_VALID, bytes([0, 1, 2, 3, 4, 5])]
    if target in ("sync_sealed", "sync_session"):
        return [d[: -wire.MAC_LEN] for d in _VALID]
    if target == "config":
        return [SEED_CONFIG.encode(), b"[[vrrp]]\ninterface = 1\n", b'[node]\nname = "x"\n']
    if target in ("netlink", "ct_transcode"):
        out = [ctnetlink.build_create(_flow(1), 1), ctnetlink.build_create(_flow(2, nat=True), 2),
               ctnetlink.build_create(_flow(3, v6=True), 3, create=False),
               ctnetlink.build_delete(_flow(1), 4), ctnetlink.build_dump_request(5, mark=1, mark_mask=1)]
        try:  # kernel-captured events, when the test suite is importable
            from tests.unit.test_ctnetlink_codec import VEC

            out += list(VEC.values())
        except Exception:  # seeds only: the target works without them
            pass
        return out
    raise KeyError(target)
