"""The sender's resend timeout follows the peer's measured ack delay (RFC 6298), scripted clock.

A backup that applies a burst holds its acks (at most apply_slack datagrams ahead of what it
applied): with a fixed 100 ms timeout the master resent about a third of a 100k burst's
datagrams as duplicates. Resends for real loss still come from NACKs and from the timer.
"""

from __future__ import annotations

import os

from invictusd.sync import wire
from invictusd.sync.sender import Sender, SenderConfig

KEY = os.urandom(32)
HEADER = wire.Header(wire.DatagramType.DATA, 1, 5, 6)


def _entry(i: int) -> bytes:
    a = bytes([10, 1, i >> 8 & 255, i & 255])
    return wire.encode_entry(wire.Entry(True, 4, 6, a, bytes([10, 2, 0, 1]), 1024 + i, 443, 0,
                                        bytes([10, 2, 0, 1]), a, 443, 1024 + i, 0, 6, 600, 1 << 30, 3))


def _streaming(cfg: SenderConfig) -> Sender:
    s = Sender(cfg)
    s.activate("test")
    s.begin_resync(0.0)
    s.end_resync(0.0)
    out: list[bytes] = []
    s.pump(0.0, HEADER, KEY, out)
    s.acked(s.next_seq - 1, 0.001)
    return s


def _run(s: Sender, ack_delay: float, rounds: int) -> int:
    """Send one datagram every 10 ms, each acked ``ack_delay`` later; returns the resends."""
    now, sent_at = 0.01, {}
    out: list[bytes] = []
    for i in range(rounds):
        s.records([_entry(i) * 1], [bytes([i & 255, i >> 8 & 255])])
        s.pump(now, HEADER, KEY, out)
        sent_at[s.next_seq - 1] = now
        for seq, t in sorted(sent_at.items()):
            if t + ack_delay <= now:
                s.acked(seq, now)
                del sent_at[seq]
        s.timer(now, out)
        now += 0.01
    return s.counters.retransmits


def test_acks_held_longer_than_the_least_timeout_cause_no_resends_once_measured() -> None:
    s = _streaming(SenderConfig())
    resent = _run(s, ack_delay=0.3, rounds=300)
    assert s.srtt is not None and 0.28 <= s.srtt <= 0.32
    assert s.base_rto > 0.3
    assert resent <= 40  # only while the first samples come in: one resend burst or so
    before = s.counters.retransmits
    _run(s, ack_delay=0.3, rounds=300)
    assert s.counters.retransmits == before


def test_a_fast_peer_keeps_the_least_timeout() -> None:
    s = _streaming(SenderConfig())
    assert _run(s, ack_delay=0.001, rounds=100) == 0
    assert s.base_rto == SenderConfig().resend_timeout


def test_the_timeout_is_bounded_and_reset_with_the_stream() -> None:
    cfg = SenderConfig(max_resend_timeout=0.5)
    s = _streaming(cfg)
    _run(s, ack_delay=1.0, rounds=200)  # every datagram is resent before its ack: no sample
    assert s.rto == 0.5  # backed off to the bound, and kept there
    s.begin_resync(10.0)  # a new stream (perhaps a new peer): nothing measured yet
    assert s.srtt is None and s.rto == s.base_rto == cfg.resend_timeout
