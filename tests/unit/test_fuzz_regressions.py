"""Inputs the fuzzers (fuzz/) found, kept as regression tests."""

from __future__ import annotations

from invictusd.sync import wire
from invictusd.sync.session import SessionConfig, SyncSession
from tests.timeouts import no_hang

KEY = bytes(range(32))
OURS, PEERS = 0x1111, 0x2222


def _dg(t: wire.DatagramType, seq: int, records: list[wire.Record], flags: int = 0) -> bytes:
    return wire.encode_datagram(wire.Header(t, 2, PEERS, OURS, seq, 0, flags), records, KEY)


def test_peer_seq_far_ahead_does_not_freeze_the_nack_loop() -> None:
    """A peer announcing a seq 2**31 - 1 ahead: the NACK was built by looping over the whole
    span (2 billion iterations on the event loop). Found by ``fuzz.run`` target sync_session."""
    s = SyncSession(SessionConfig(node_id=1, key=KEY, peer_node_id=2), OURS, 0.0)
    s.datagram_received(_dg(wire.DatagramType.DATA, 1, [wire.ResyncBegin(1)], wire.FLAG_SYNC_POINT), 0.0)
    far = (1 + (1 << 31) - 1) & wire.U32
    s.datagram_received(_dg(wire.DatagramType.DATA, 5, [wire.Digest(0, 0)]), 0.01)
    s.datagram_received(_dg(wire.DatagramType.ACK, far, []), 0.02)
    for d in s.take_deliveries():
        s.applied(d.seq, 0.02)
    with no_hang(5):
        s.timer(0.05)
        sent = s.datagrams_to_send(0.05)
    nacks = [wire.decode_datagram(d, KEY) for d in sent]
    nacks = [d for d in nacks if d.header.type is wire.DatagramType.NACK]
    assert nacks, "the gaps were not NACKed"
    ranges = [r for d in nacks for r in d.records]
    assert ranges[0] == wire.NackRange(2, 4)  # the hole before the buffered seq 5
    assert ranges[-1] == wire.NackRange(6, far)  # and the announced tail
