"""The receiving half of a replication session: the peer's stream, in order. Sans-IO.

DATA datagrams are put back in order (a bounded reorder buffer), gaps are NACKed, and every
in-order datagram's records are handed to the adapter (``deliveries``), which applies them
to the kernel and says so (``applied``). Acknowledgements run ahead of the application by
at most ``apply_slack`` datagrams: a long kernel operation (a sweep after a resync) holds
the peer's window instead of queueing without bound here. A datagram travels as its
records' bytes (``Delivery``), checked but never decoded here: the adapter transcodes them
straight into kernel requests.

A stream starts at a SYNC_POINT (the first datagram of a resync); one above the expected
sequence number supersedes whatever was missing before it. The replica is ``synced`` once
the adapter has applied the RESYNC_END of a resync of the peer's current epoch.

Divergence (a digest that does not match, entries the kernel refused, a gap that stays
unrepaired, more entries than we may hold) is counted and answered with a resync request:
one outstanding at a time, repeated until a resync begins, and backing off while resyncs
do not cure it, so a divergence never becomes a resync storm.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from invictusd.sync.sender import extend_seq
from invictusd.sync.wire import U32, NackRange, Record, RequestReason, ResyncRequest, decode_records

MAX_NACK_RANGES = 64


class Phase(enum.Enum):
    WAITING = "waiting"  # no stream position: waiting for a SYNC_POINT
    STREAMING = "streaming"


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    reorder_capacity: int = 512  # out-of-order datagrams buffered
    ack_every: int = 16  # ack after this many datagrams ...
    ack_delay: float = 0.01  # ... or this long after the first unacked one
    nack_interval: float = 0.1  # a gap is NACKed again this often
    stall_timeout: float = 3.0  # a gap unrepaired this long makes us ask for a resync
    request_interval: float = 1.0  # an outstanding resync request is repeated this often
    max_backoff: float = 64.0  # resync requests back off up to this many intervals
    apply_slack: int = 1024  # datagrams acknowledged ahead of their application, at most


@dataclass(frozen=True, slots=True)
class Delivery:
    """One in-order DATA datagram's records, as their (authenticated, checked) bytes.

    Decoded, a datagram's records would take about 15 times its bytes (a tuple, bytes and
    ints per record: ~22 KB for a 1.4 KB datagram) and cost more than injecting them: the
    adapter builds kernel requests from the bytes (``invictusd.io.transcode``); ``records``
    decodes them for whoever needs the objects.
    """

    seq: int
    payload: bytes  # the records' bytes (a datagram's, already authenticated and checked)

    @property
    def records(self) -> tuple[Record, ...]:
        return tuple(decode_records(self.payload))


@dataclass(slots=True)
class ReceiverCounters:
    datagrams: int = 0
    records: int = 0
    duplicates: int = 0
    reorder_full: int = 0
    gaps_skipped: int = 0
    acks_sent: int = 0
    nacks_sent: int = 0
    resync_requests_sent: int = 0
    divergences: int = 0


@dataclass(slots=True)
class Receiver:
    config: ReceiverConfig
    phase: Phase = Phase.WAITING
    counters: ReceiverCounters = field(default_factory=ReceiverCounters)
    synced: bool = False
    expect: int = 0  # next in-order seq (valid while STREAMING)
    applied_upto: int = 0  # last seq the adapter applied
    deliveries: deque[Delivery] = field(default_factory=deque)
    _buffer: dict[int, tuple[int, Delivery]] = field(default_factory=dict)  # seq: (records, delivery)
    _peer_high: int = 0
    _gap_since: float | None = None
    _ack_due: float | None = None
    _unacked: int = 0
    _acked: int = 0
    _nack_due: float | None = None
    _nacked_upto: int = 0
    _request_id: int = 0
    _request_reason: RequestReason = RequestReason.OTHER
    _request_sent_at: float | None = None  # outstanding
    _request_due: float | None = None  # waiting for the back-off to allow it
    _request_allowed_at: float = 0.0
    _backoff: float = 0.0
    _resyncs_begun: int = 0  # in this stream (epoch)
    _requests: bool = True

    def __post_init__(self) -> None:
        self._backoff = self.config.request_interval

    def reset(self, now: float) -> None:
        """A new peer epoch: a new stream, from its first SYNC_POINT."""
        self.phase = Phase.WAITING
        self.synced = False
        self.expect = self.applied_upto = self._acked = 0
        self.deliveries.clear()
        self._buffer.clear()
        self._peer_high = 0
        self._gap_since = self._ack_due = self._nack_due = None
        self._unacked = self._nacked_upto = 0
        self._request_id = 0
        self._request_sent_at = self._request_due = None
        self._request_allowed_at = now
        self._backoff = self.config.request_interval
        self._resyncs_begun = 0

    # ---- the stream --------------------------------------------------------------------------

    def data(self, seq_wire: int, sync_point: bool, records: int, payload: bytes, now: float) -> None:
        """A DATA datagram: how many records it holds, and their bytes."""
        c = self.counters
        if self.phase is Phase.WAITING:
            s = extend_seq(seq_wire, 1)
            if sync_point and s >= 1:
                self._jump(Delivery(s, payload), records, now)
            elif s in self._buffer:
                c.duplicates += 1
            elif len(self._buffer) >= self.config.reorder_capacity:
                c.reorder_full += 1
            else:
                self._buffer[s] = (records, Delivery(s, payload))
                if self._gap_since is None:
                    self._gap_since = now
            return
        s = extend_seq(seq_wire, self.expect)
        if s < self.expect:
            c.duplicates += 1
            self._ack_due = now  # our ack may have been lost: repeat it now
            return
        if s == self.expect:
            self._deliver(Delivery(s, payload), records)
            self._drain(now)
        elif sync_point:
            self._jump(Delivery(s, payload), records, now)
        elif s in self._buffer:
            c.duplicates += 1
            return
        elif len(self._buffer) >= self.config.reorder_capacity:
            c.reorder_full += 1
        else:
            self._buffer[s] = (records, Delivery(s, payload))
            if self._gap_since is None:
                self._gap_since = now
            if s > self._nacked_upto:
                self._nack_due = now
        self._schedule_ack(now)

    def peer_high(self, seq_wire: int, now: float) -> None:
        """The peer's highest DATA seq, from any of its datagrams: a missing tail shows."""
        if self.phase is not Phase.STREAMING:
            return
        high = extend_seq(seq_wire, self.expect)
        if high >= self.expect and high > self._peer_high:
            self._peer_high = high
            if high > self._nacked_upto:
                self._nack_due = now

    def take_deliveries(self) -> list[Delivery]:
        out = list(self.deliveries)
        self.deliveries.clear()
        return out

    def applied(self, seq: int, now: float) -> None:
        """The adapter has applied everything up to ``seq``."""
        if seq > self.applied_upto:
            self.applied_upto = seq
            if self._acked < self._ackable():
                self._schedule_ack(now)

    def resync_begun(self, now: float) -> None:
        """The adapter applied a RESYNC_BEGIN: any request of ours is answered."""
        self._resyncs_begun += 1
        self._request_sent_at = self._request_due = None

    def resync_completed(self, now: float, complete: bool) -> None:
        """The adapter applied a RESYNC_END (and swept what it did not refresh). ``complete``
        is False when some entries could not be held (capacity, kernel refusals)."""
        if complete and self._resyncs_begun:
            self.synced = True
            self._backoff = self.config.request_interval
        elif not complete:
            self.synced = False
            self._backoff = min(self._backoff * 2, self.config.max_backoff * self.config.request_interval)
            self.divergence(RequestReason.APPLY_FAILED, now)

    def set_requests(self, enabled: bool) -> None:
        """Only a backup asks for resyncs (a master owns its table; its peer sends nothing).
        A node becoming master also forgets the peer's unfinished stream: what is missing
        of it will never come, and a new one starts with a SYNC_POINT."""
        self._requests = enabled
        if not enabled:
            self._request_sent_at = self._request_due = None
            self._buffer.clear()
            self._gap_since = self._nack_due = None
            self.phase = Phase.WAITING

    def divergence(self, reason: RequestReason, now: float) -> None:
        """Something the stream cannot repair: ask for a resync (backing off)."""
        self.counters.divergences += 1
        if not self._requests or self._request_sent_at is not None or self._request_due is not None:
            return
        self._request_reason = reason
        self._request_due = max(now, self._request_allowed_at)

    def digest_mismatch(self, now: float) -> None:
        self._backoff = min(self._backoff * 2, self.config.max_backoff * self.config.request_interval)
        self.divergence(RequestReason.DIGEST_MISMATCH, now)

    # ---- output --------------------------------------------------------------------------

    @property
    def ack_value(self) -> int:
        return self._ackable() & U32

    def due(self, now: float, link_up: bool) -> list[tuple[str, tuple[Record, ...]]]:
        """Control datagrams to send now: ("ack"|"nack"|"request", records)."""
        out: list[tuple[str, tuple[Record, ...]]] = []
        if not link_up:
            return out
        if self._nack_due is not None and now >= self._nack_due:
            ranges = self._nack_ranges()
            self._nack_due = now + self.config.nack_interval if ranges else None
            if ranges:
                out.append(("nack", ranges))
                self.counters.nacks_sent += 1
        sent = self._request_sent_at
        if self._request_due is not None and now >= self._request_due:
            out.append(("request", (self._request(now),)))
        elif sent is not None and now >= sent + self.config.request_interval:
            out.append(("request", (self._request(now),)))  # lost, or the peer was away
        if self._gap_since is not None and now >= self._gap_since + self.config.stall_timeout:
            self._gap_since = now
            self.divergence(RequestReason.STALLED, now)
        if self._ack_due is not None and (now >= self._ack_due or self._unacked >= self.config.ack_every):
            out.append(("ack", ()))
        return out

    def sent_ack(self, explicit: bool) -> None:
        """Any datagram of ours carries the ack: none is due any more."""
        self._acked = self._ackable()
        self._ack_due = None
        self._unacked = 0
        if explicit:
            self.counters.acks_sent += 1

    def next_deadline(self) -> float | None:
        times = [t for t in (self._ack_due, self._nack_due, self._request_due) if t is not None]
        if self._request_sent_at is not None:
            times.append(self._request_sent_at + self.config.request_interval)
        if self._gap_since is not None:
            times.append(self._gap_since + self.config.stall_timeout)
        return min(times) if times else None

    @property
    def gap(self) -> bool:
        return bool(self._buffer)

    # ---- internals -------------------------------------------------------------------------

    def _ackable(self) -> int:
        if self.phase is not Phase.STREAMING:
            return 0
        return min(self.expect - 1, self.applied_upto + self.config.apply_slack)

    def _deliver(self, d: Delivery, records: int) -> None:
        self.deliveries.append(d)
        self.expect = d.seq + 1
        self._unacked += 1
        self.counters.datagrams += 1
        self.counters.records += records

    def _jump(self, d: Delivery, records: int, now: float) -> None:
        s = d.seq
        if self.phase is Phase.STREAMING and s > self.expect:
            self.counters.gaps_skipped += 1
        self.phase = Phase.STREAMING
        for old in [q for q in self._buffer if q < s]:
            del self._buffer[old]
        self._deliver(d, records)
        if self.applied_upto < s - 1:
            self.applied_upto = s - 1  # nothing before a sync point will be delivered
        self._drain(now)
        self._schedule_ack(now)

    def _drain(self, now: float) -> None:
        buf = self._buffer
        while buf:
            item = buf.pop(self.expect, None)
            if item is None:
                break
            self._deliver(item[1], item[0])
        if not buf:
            self._gap_since = None
            self._nack_due = now if self._peer_high >= self.expect else None
        else:
            for q in [q for q in buf if q < self.expect]:
                del buf[q]

    def _schedule_ack(self, now: float) -> None:
        if self._unacked >= self.config.ack_every:
            self._ack_due = now
        elif self._ack_due is None:
            self._ack_due = now + self.config.ack_delay

    def _nack_ranges(self) -> tuple[Record, ...]:
        expect = self.expect
        buf = self._buffer
        top = max(max(buf) if buf else 0, self._peer_high)
        if self.phase is not Phase.STREAMING or top < expect:
            return ()
        # Walk the buffered seqs (at most reorder_capacity), never the span: a peer's seq may
        # be up to 2**31 ahead.
        ranges: list[Record] = []
        prev = expect - 1
        for q in sorted(q for q in buf if q >= expect):
            if q > prev + 1:
                ranges.append(NackRange((prev + 1) & U32, (q - 1) & U32))
                if len(ranges) >= MAX_NACK_RANGES:
                    break
            prev = q
        if top > prev and len(ranges) < MAX_NACK_RANGES:
            ranges.append(NackRange((prev + 1) & U32, top & U32))
        self._nacked_upto = top
        return tuple(ranges)

    def _request(self, now: float) -> Record:
        self._request_id = (self._request_id + 1) & U32
        self._request_sent_at = now
        self._request_due = None
        self._request_allowed_at = now + self._backoff
        self.counters.resync_requests_sent += 1
        return ResyncRequest(self._request_id, int(self._request_reason))
