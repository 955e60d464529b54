"""The sender's backlog: coalesced first, then packed in arrival order, then a resync.

A 1M burst ran 65,536 records ahead of the backup (the coalescing backlog's size) and the
sender gave the backlog up for a resync that re-sent ~700k entries. Past the coalescing
part, records now queue packed (``Spill``) up to ``backlog_capacity``; what matters is that
the peer ends with every entry's latest record, in an order that never lets an older record
of an entry overtake a newer one.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from invictusd.sync import wire
from invictusd.sync.sender import Phase, Sender, SenderConfig, Spill
from tests.unit.test_sync_sender_rto import HEADER, KEY, _streaming


def _record(key: int, version: int) -> bytes:
    """An entry record whose port says which entry, whose timeout says which version."""
    a = bytes([10, 1, key >> 8 & 255, key & 255])
    return wire.encode_entry(wire.Entry(False, 4, 17, a, bytes([10, 2, 0, 1]), 1024 + key, 53, 0,
                                        bytes([10, 2, 0, 1]), a, 53, 1024 + key, 0, 8,
                                        100 + version, 1 << 30, 0))


def _entries(datagrams: list[bytes]) -> list[tuple[int, int]]:
    """(entry, version) of every entry record, in stream order."""
    got = []
    for d in datagrams:
        for rec in wire.decode_datagram(d, KEY).records:
            if isinstance(rec, wire.Entry):
                got.append((rec.sport - 1024, rec.timeout - 100))
    return got


def _drain(s: Sender, now: float, out: list[bytes]) -> None:
    for _ in range(100_000):
        s.pump(now, HEADER, KEY, out)
        if not s.inflight:
            return
        s.acked(s.next_seq - 1, now)
    raise AssertionError("the sender never emptied")


batches = st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=60), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(batches=batches, coalesce=st.integers(1, 80), window=st.integers(1, 4),
       acks=st.lists(st.booleans(), min_size=1, max_size=40))
def test_every_entry_ends_at_its_latest_record_and_none_goes_back(
        batches: list[list[int]], coalesce: int, window: int, acks: list[bool]) -> None:
    s = _streaming(SenderConfig(window=window, coalesce_capacity=coalesce, backlog_capacity=10_000))
    out: list[bytes] = []
    start = 0
    version: dict[int, int] = {}
    for n, batch in enumerate(batches):
        recs, keys = [], []
        for k in batch:
            version[k] = version.get(k, 0) + 1
            recs.append(_record(k, version[k]))
            keys.append(k.to_bytes(2, "big"))
        s.records(recs, keys)
        s.pump(0.0, HEADER, KEY, out)
        if acks[n % len(acks)]:
            s.acked(s.next_seq - 1, 0.0)
    _drain(s, 0.0, out)
    assert s.idle and s.queued == 0
    seen: dict[int, int] = {}
    for k, v in _entries(out[start:]):
        assert v > seen.get(k, 0), f"entry {k}: version {v} sent after {seen.get(k)}"
        seen[k] = v
    assert seen == version
    assert s.counters.backlog_overflows == 0


def test_a_burst_past_the_coalescing_backlog_queues_packed_without_a_resync() -> None:
    s = _streaming(SenderConfig(window=2, coalesce_capacity=100, backlog_capacity=5000))
    out: list[bytes] = []
    start = 0
    for i in range(0, 4000, 200):
        ks = range(i, i + 200)
        s.records([_record(k & 0xFFFF, 1) for k in ks], [k.to_bytes(4, "big") for k in ks])
        s.pump(0.0, HEADER, KEY, out)
    assert len(s.backlog) <= 100 and len(s.spill) > 3000
    assert s.queued == 4000 - 200  # the first batch found the window open: sent, not queued
    _drain(s, 0.0, out)
    assert [k for k, _ in _entries(out[start:])] == [k & 0xFFFF for k in range(4000)]
    assert s.phase is Phase.STREAMING and s.counters.backlog_overflows == 0
    # Datagrams of packed records are as full as record by record: one slice per datagram.
    sizes = [len(d) for d in out[start:-1]]
    assert min(sizes) > wire.DEFAULT_MTU - 2 * len(_record(1, 1)) - 28


def test_a_backlog_over_its_capacity_asks_for_a_resync_and_drops_what_waited() -> None:
    s = _streaming(SenderConfig(window=1, coalesce_capacity=10, backlog_capacity=300))
    out: list[bytes] = []
    for i in range(0, 400, 50):
        ks = range(i, i + 50)
        s.records([_record(k, 1) for k in ks], [k.to_bytes(2, "big") for k in ks])
        s.pump(0.0, HEADER, KEY, out)
    assert s.counters.backlog_overflows == 1
    assert s.phase is Phase.RESYNC_PENDING and s.resync_wanted == "backlog over 300 records"
    assert s.queued == 0 and not s.spill.chunks


def test_the_spill_fills_a_datagram_to_the_record_and_resumes_inside_a_chunk() -> None:
    spill = Spill()
    recs = [_record(k, 1) for k in range(100)]
    spill.append(recs[:60])
    spill.append(recs[60:])
    datagrams: list[bytes] = []
    taken = 0
    b = wire.DatagramBuilder(400)
    while spill:
        full = spill.fill(b)
        taken += b.count
        assert b.count > 0 and b.size <= b.capacity
        if full:  # the next record would not have fitted
            assert b.size + len(recs[taken]) > b.capacity
        datagrams.append(b.finish(HEADER, KEY))
    assert taken == 100 and spill.records == 0 and not spill.chunks
    assert [k for k, _ in _entries(datagrams)] == list(range(100))
