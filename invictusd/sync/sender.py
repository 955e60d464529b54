"""The sending half of a replication session: our table to the peer, reliably. Sans-IO.

Only the master sends its table (``Phase.SILENT`` otherwise): ownership follows the VRRP
state, so a backup never announces what it holds for the peer. Records arrive already
encoded (``invictusd.io.transcode`` turns conntrack events into wire records); the sender
packs them into datagrams, numbers them, keeps every unacknowledged datagram (``InFlight``)
and resends on NACK or timeout. When the window is full, records wait in a backlog: the
first ``coalesce_capacity`` of them coalesce per entry (the latest state of an entry is what
is sent); past that, a burst's records queue packed in arrival order (``Spill``: ~30 bytes a
record, so a backup that falls a million records behind costs tens of MB, not a resync). A
backlog over ``backlog_capacity`` records gives up on incremental replication: the adapter is
asked for a resync.

A resync is the whole table again: ``begin_resync`` (drops everything in flight and in the
backlog, a SYNC_POINT datagram starting with RESYNC_BEGIN), the adapter streams the kernel
dump with ``bulk`` while ``bulk_room`` allows (flow control: the dump waits in the kernel),
then ``end_resync``. Event records interleave as usual.
"""

from __future__ import annotations

import enum
from array import array
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from invictusd.sync import wire
from invictusd.sync.wire import (
    FLAG_SYNC_POINT,
    U32,
    DatagramBuilder,
    DatagramType,
    Digest,
    Header,
    NackRange,
    Record,
    ResyncBegin,
    ResyncEnd,
)

_HALF = 1 << 31
MAX_NACK_RANGES = 64
COALESCE_CAPACITY = 65_536  # records coalesced per entry while they wait, by default
_BULK_QUEUE = 256  # dump records queued ahead of the datagrams at most
RESYNC_END_TYPE = int(wire.RecordType.RESYNC_END)


class Phase(enum.Enum):
    SILENT = "silent"  # not master: nothing of ours is sent
    RESYNC_PENDING = "resync_pending"  # the next datagram starts a resync; waiting for the adapter
    RESYNCING = "resyncing"  # between RESYNC_BEGIN and RESYNC_END
    STREAMING = "streaming"  # incremental


@dataclass(slots=True)
class InFlight:
    """A DATA datagram sent and not yet acknowledged."""

    seq: int
    data: bytes
    first_sent: float
    last_sent: float


@dataclass(frozen=True, slots=True)
class SenderConfig:
    mtu: int = wire.DEFAULT_MTU
    flush_delay: float = 0.0  # a partly filled datagram waits at most this long
    resend_timeout: float = 0.1  # the least resend timeout (above it: srtt + 4 rttvar; doubles per resend)
    max_resend_timeout: float = 2.0
    resend_burst: int = 32  # datagrams resent per timeout
    window: int = 512  # datagrams in flight
    backlog_capacity: int = COALESCE_CAPACITY  # records waiting for the window, at most (then: a resync)
    coalesce_capacity: int = COALESCE_CAPACITY  # of which coalesced per entry; the rest queue packed


@dataclass(slots=True)
class SenderCounters:
    records: int = 0
    bulk_records: int = 0
    datagrams: int = 0
    bytes: int = 0
    retransmits: int = 0
    resend_timeouts: int = 0
    nacks_received: int = 0
    resyncs_started: int = 0
    resyncs_sent: int = 0
    digests_sent: int = 0
    backlog_overflows: int = 0
    coalesced: int = 0


def extend_seq(wire_seq: int, ref: int) -> int:
    """The full sequence number closest to ``ref`` whose low 32 bits are ``wire_seq``."""
    d = (wire_seq - ref) & U32
    if d >= _HALF:
        d -= 1 << 32
    return ref + d


@dataclass(slots=True)
class Spill:
    """Records past the coalescing backlog, packed in arrival order: each chunk is one
    ``records`` call's records joined, with the end offset of each record, so a datagram
    takes as many as fit in one slice (no per-record work on the way out)."""

    chunks: deque[tuple[bytes, array[int]]] = field(default_factory=deque)
    head: int = 0  # records of chunks[0] already taken
    records: int = 0

    def __len__(self) -> int:
        return self.records

    def append(self, records: Sequence[bytes]) -> None:
        ends = array("I")
        total = 0
        for r in records:
            total += len(r)
            ends.append(total)
        self.chunks.append((b"".join(records), ends))
        self.records += len(records)

    def clear(self) -> None:
        self.chunks.clear()
        self.head = self.records = 0

    def fill(self, b: DatagramBuilder) -> bool:
        """Move records into ``b`` until it is full (True) or the spill is empty (False)."""
        chunks = self.chunks
        while chunks:
            data, ends = chunks[0]
            head = self.head
            start = ends[head - 1] if head else 0
            stop = bisect_right(ends, start + b.room, head)
            if stop > head:
                b.add_packed(data[start:ends[stop - 1]], stop - head)
                self.records -= stop - head
            if stop < len(ends):
                self.head = stop
                return True
            chunks.popleft()
            self.head = 0
        return False


@dataclass(slots=True)
class Sender:
    config: SenderConfig
    phase: Phase = Phase.SILENT
    counters: SenderCounters = field(default_factory=SenderCounters)
    next_seq: int = 1
    inflight: deque[InFlight] = field(default_factory=deque)
    backlog: OrderedDict[bytes, bytes] = field(default_factory=OrderedDict)
    spill: Spill = field(default_factory=Spill)  # queued after ``backlog``, sent after it
    resync_gen: int = 0
    resync_entries: int = 0
    resync_reason: str = ""
    resync_wanted: str = ""  # a reason: the adapter should start a resync (dump) when it can
    rto: float = 0.1
    srtt: float | None = None
    rttvar: float = 0.0
    end_seq: int = 0  # the datagram that carried our last RESYNC_END (0: none yet)
    acked_seq: int = 0
    _builder: DatagramBuilder = field(init=False)
    _flush_at: float | None = None
    _sync_point_next: bool = False
    # Records to send, in stream order (entries, BEGIN/END/DIGEST); short: events go to the
    # backlog once the window is full, and dump records only come while there is room.
    _pending: deque[bytes] = field(default_factory=deque)
    _end_pending: bool = False  # RESYNC_END queued, not yet in a datagram

    def __post_init__(self) -> None:
        self._builder = DatagramBuilder(self.config.mtu)
        self.rto = self.config.resend_timeout

    # ---- role ------------------------------------------------------------------------------

    def activate(self, reason: str) -> None:
        """We are master: our table must be sent, starting with a resync."""
        if self.phase is Phase.SILENT:
            self._drop_stream()
            self.phase = Phase.RESYNC_PENDING
            self.resync_wanted = reason

    def deactivate(self) -> None:
        """No longer master: send nothing more of ours (what is in flight is dropped too:
        the new master's resync supersedes it)."""
        self._drop_stream()
        self.phase = Phase.SILENT
        self.resync_wanted = ""

    @property
    def active(self) -> bool:
        return self.phase is not Phase.SILENT

    def want_resync(self, reason: str) -> None:
        """Ask the adapter for a resync (overrun, peer's request, new stream...)."""
        if self.active and not self.resync_wanted:
            self.resync_wanted = reason

    # ---- inputs from the adapter -------------------------------------------------------------

    def records(self, records: Sequence[bytes], keys: Sequence[bytes]) -> None:
        """Event records (already encoded) with their entry keys, in kernel order."""
        if not self.active or self.phase is Phase.RESYNC_PENDING:
            return  # a resync will send the state anyway
        self.counters.records += len(records)
        if self.backlog or self.spill or len(self.inflight) >= self.config.window:
            self._to_backlog(records, keys)
        else:
            self._pending.extend(records)

    def begin_resync(self, now: float) -> int:
        """The adapter starts a dump: everything queued is superseded. Returns the gen."""
        self._drop_stream()
        self.phase = Phase.RESYNCING
        self.resync_gen = (self.resync_gen + 1) & U32
        self.resync_entries = 0
        self.resync_reason = self.resync_wanted or "resync"
        self.resync_wanted = ""
        self._sync_point_next = True
        self._pending.append(wire.encode_record(ResyncBegin(self.resync_gen)))
        self.counters.resyncs_started += 1
        return self.resync_gen

    @property
    def bulk_room(self) -> bool:
        """Whether more dump records may be given now: the window has room and what was
        given before has gone into datagrams (the dump waits in the kernel meanwhile)."""
        return (self.phase is Phase.RESYNCING and len(self.inflight) < self.config.window
                and not self.backlog and not self.spill and len(self._pending) < _BULK_QUEUE)

    def bulk(self, records: Sequence[bytes]) -> None:
        if self.phase is not Phase.RESYNCING:
            return
        self.counters.bulk_records += len(records)
        self.resync_entries += len(records)
        self._pending.extend(records)

    def end_resync(self, now: float) -> None:
        if self.phase is not Phase.RESYNCING:
            return
        self._pending.append(wire.encode_record(ResyncEnd(self.resync_gen, self.resync_entries)))
        self.phase = Phase.STREAMING
        self.counters.resyncs_sent += 1
        self._end_pending = True

    def abort_resync(self) -> None:
        """The dump failed: the resync is to be started again."""
        if self.phase is Phase.RESYNCING:
            self.phase = Phase.RESYNC_PENDING
            self.resync_wanted = self.resync_reason or "resync"

    def digest(self, entries: int, digest: int, now: float) -> None:
        """A digest of our table taken while nothing changed (see the adapter)."""
        if self.phase is Phase.STREAMING:
            self._pending.append(wire.encode_record(Digest(entries, digest)))
            self.counters.digests_sent += 1

    # ---- feedback from the peer --------------------------------------------------------------

    def acked(self, ack_wire: int, now: float) -> None:
        highest = self.next_seq - 1
        ack = extend_seq(ack_wire, highest)
        if ack > highest:
            return
        self.acked_seq = max(self.acked_seq, ack)
        inflight = self.inflight
        if not inflight or ack < inflight[0].seq:
            return
        last: InFlight | None = None
        while inflight and inflight[0].seq <= ack:
            last = inflight.popleft()
        if last is not None and last.first_sent == last.last_sent:
            # Never resent: a clean RTT sample. An ack of a resent datagram teaches nothing
            # and keeps the backed-off timeout (Karn) until a clean sample comes.
            self._rtt_sample(now - last.first_sent)
            self.rto = self.base_rto

    def _rtt_sample(self, sample: float) -> None:
        """RFC 6298's estimator. The "RTT" includes how long the peer holds its acks while
        it applies (at most apply_slack datagrams ahead): a fixed timeout shorter than
        that resent a third of a burst's datagrams as duplicates, for nothing."""
        if self.srtt is None:
            self.srtt, self.rttvar = sample, sample / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
            self.srtt = 0.875 * self.srtt + 0.125 * sample

    @property
    def base_rto(self) -> float:
        """srtt + 4 rttvar, between ``resend_timeout`` and ``max_resend_timeout``."""
        cfg = self.config
        if self.srtt is None:
            return cfg.resend_timeout
        return min(max(self.srtt + 4 * self.rttvar, cfg.resend_timeout), cfg.max_resend_timeout)

    def nacked(self, records: Iterable[Record], now: float, out: list[bytes]) -> None:
        inflight = self.inflight
        self.counters.nacks_received += 1
        if not inflight:
            return
        base = inflight[0].seq
        highest = self.next_seq - 1
        min_gap = self.config.resend_timeout / 4
        budget = self.config.window
        for n, rec in enumerate(records):
            if n >= MAX_NACK_RANGES or not isinstance(rec, NackRange):
                break
            first = max(extend_seq(rec.first, highest), base)
            last = min(extend_seq(rec.last, highest), highest)
            for seq in range(first, last + 1):
                entry = inflight[seq - base]
                if now - entry.last_sent >= min_gap and budget > 0:
                    self._resend(entry, now, out)
                    budget -= 1

    # ---- output --------------------------------------------------------------------------

    def pump(self, now: float, header: Header, key: bytes, out: list[bytes]) -> None:
        """Encode what is pending into datagrams while the window allows. ``header`` is a
        template: its type, seq and flags are replaced per datagram."""
        if not self.active:
            return
        window = self.config.window
        b = self._builder
        while len(self.inflight) < window:
            full = self._fill(b)
            if not b:
                self._flush_at = None
                return
            if not full:
                if self._flush_at is None:
                    self._flush_at = now + self.config.flush_delay
                if now < self._flush_at:
                    return
            self._send(now, header, key, out)

    def timer(self, now: float, out: list[bytes]) -> None:
        inflight = self.inflight
        if inflight and now >= inflight[0].last_sent + self.rto:
            self.counters.resend_timeouts += 1
            rto, sent = self.rto, 0
            for entry in inflight:
                if sent >= self.config.resend_burst:
                    break
                if now >= entry.last_sent + rto:
                    self._resend(entry, now, out)
                    sent += 1
            self.rto = min(rto * 2, self.config.max_resend_timeout)

    def link_up(self, now: float) -> None:
        self.rto = self.base_rto
        for entry in self.inflight:
            entry.last_sent = now - self.rto  # due: the timer resends a burst at once

    def next_deadline(self) -> float | None:
        t: float | None = None
        if self._flush_at is not None and len(self.inflight) < self.config.window and self.active:
            t = self._flush_at
        if self.inflight:
            r = self.inflight[0].last_sent + self.rto
            t = r if t is None else min(t, r)
        return t

    @property
    def in_sync(self) -> bool:
        """The peer has acknowledged the end of our last resync: it holds our table."""
        return self.phase is Phase.STREAMING and bool(self.end_seq) and self.acked_seq >= self.end_seq

    @property
    def highest_seq(self) -> int:
        return self.next_seq - 1

    @property
    def idle(self) -> bool:
        return not (self.inflight or self.backlog or self.spill or self._builder or self._pending
                    or self.phase in (Phase.RESYNC_PENDING, Phase.RESYNCING))

    @property
    def lag(self) -> float | None:
        """Age of the oldest unacknowledged datagram."""
        return None if not self.inflight else self.inflight[0].first_sent

    # ---- internals -------------------------------------------------------------------------

    def _drop_stream(self) -> None:
        self.end_seq = self.acked_seq = 0
        self._end_pending = False
        self.inflight.clear()
        self.backlog.clear()
        self.spill.clear()
        self._builder.clear()
        self._pending.clear()
        self._flush_at = None
        self.srtt, self.rttvar = None, 0.0  # a new stream, perhaps a new peer
        self.rto = self.config.resend_timeout

    @property
    def queued(self) -> int:
        """Records waiting for the window (coalesced and packed)."""
        return len(self.backlog) + len(self.spill)

    def _to_backlog(self, records: Sequence[bytes], keys: Sequence[bytes]) -> None:
        backlog, spill = self.backlog, self.spill
        if spill or len(backlog) + len(records) > self.config.coalesce_capacity:
            # Once records queue packed, every later one queues behind them: an entry's
            # newer record must never be sent before an older one still waiting.
            spill.append(records)
        else:
            before = len(backlog)
            for k, r in zip(keys, records, strict=True):
                if k in backlog:
                    backlog.move_to_end(k)
                backlog[k] = r
            self.counters.coalesced += len(records) - (len(backlog) - before)
        if len(backlog) + len(spill) > self.config.backlog_capacity:
            self.counters.backlog_overflows += 1
            backlog.clear()
            spill.clear()
            self.phase = Phase.RESYNC_PENDING
            self.resync_wanted = f"backlog over {self.config.backlog_capacity} records"

    def _fill(self, b: DatagramBuilder) -> bool:
        """Add pending then backlog records to ``b`` until full (True) or out of work."""
        pending = self._pending
        add = b.add
        while pending:
            if not add(pending[0]):
                return True
            pending.popleft()
        backlog = self.backlog
        while backlog:
            k, r = backlog.popitem(last=False)
            if not add(r):
                backlog[k] = r
                backlog.move_to_end(k, last=False)
                return True
        return self.spill.fill(b)

    def _send(self, now: float, header: Header, key: bytes, out: list[bytes]) -> None:
        seq = self.next_seq
        self.next_seq += 1
        flags = FLAG_SYNC_POINT if self._sync_point_next else 0
        self._sync_point_next = False
        h = Header(DatagramType.DATA, header.node_id, header.sender_epoch, header.receiver_epoch,
                   seq & U32, header.ack, flags)
        data = self._builder.finish(h, key)
        if self._end_pending and not any(r for r in self._pending if r[0] >> 4 == RESYNC_END_TYPE):
            self._end_pending = False
            self.end_seq = seq
        self._flush_at = None
        self.inflight.append(InFlight(seq, data, now, now))
        out.append(data)
        self.counters.datagrams += 1
        self.counters.bytes += len(data)

    def _resend(self, entry: InFlight, now: float, out: list[bytes]) -> None:
        entry.last_sent = now
        out.append(entry.data)
        self.counters.retransmits += 1
        self.counters.bytes += len(entry.data)
