"""Sans-IO replication session: one per node, sender of our table and receiver of the peer's.

The session never reads a socket, sleeps or calls a clock. Every input takes ``now`` (a
monotonic float in seconds); outputs are the datagrams to send and the next deadline. The
adapter's contract is one loop::

    session.<input>(..., now)               # local_events / local_resync / datagram_received /
                                            # timer / link_changed
    for d in session.datagrams_to_send(now):
        sock.sendto(d, peer)
    rearm the single timer at session.next_deadline()

Protocol summary (the byte tables are in ``docs/sync-protocol.md``):

* Each node has an epoch (random u64 per daemon start). A stream of DATA datagrams is bound
  to the pair (sender epoch, receiver epoch); sequence numbers start at 1 per pair. A
  datagram whose receiver epoch is not ours is dropped (except HELLO, which carries no state),
  so nothing recorded before our restart can be replayed into us.
* A stream always starts with a resync: ``RESYNC_BEGIN(gen)`` on a datagram flagged
  SYNC_POINT, every local entry as a FULL record, then ``RESYNC_END(gen, count, digest)``.
  The receiver drops entries not refreshed between BEGIN and END (lost deletes are repaired)
  and becomes ``synced`` at the END of the first complete resync from the peer's current epoch.
* Reliability: cumulative ACKs (every ``ack_every`` datagrams or after ``ack_delay``,
  piggybacked on DATA), NACK of gaps and of the tail announced by the peer's highest seq,
  resend on timeout with back-off. The sender keeps at most ``retransmit_capacity`` datagrams
  in flight (a window, so unacked data is never evicted); changes that cannot be sent yet are
  coalesced per flow. If that backlog exceeds ``pending_capacity`` the session gives up on
  incremental replication and starts a resync, which discards everything in flight: the
  receiver accepts the SYNC_POINT datagram out of order and skips the gap before it.
* UPDATE and DELETE records name an entry by conntrack id. The sender keeps a mirror of the
  id map the receiver builds from the stream (same rules, same order), and uses the compact
  form only when the mirror says the id names this flow on the receiver; otherwise it sends
  a FULL record or a DELETE_KEY. Ids reused or colliding in the kernel are therefore safe.
* Every ``digest_interval``, when the stream has caught up with the local table, a DIGEST
  (count, XOR of 64-bit key hashes) follows; a receiver that disagrees asks for a resync.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from invictusd.flows import EventKind, Flow, FlowEvent, FlowKey, flow_text
from invictusd.sync import wire
from invictusd.sync.wire import (
    FLAG_SYNC_POINT,
    U32,
    AuthError,
    DatagramBuilder,
    DatagramType,
    Delete,
    DeleteKey,
    Digest,
    Header,
    NackRange,
    Record,
    RequestReason,
    ResyncBegin,
    ResyncEnd,
    ResyncRequest,
    Update,
    WireError,
    decode_datagram,
    encode_datagram,
    encode_delete,
    encode_delete_key,
    encode_full,
    encode_update,
    key_hash,
)

_DESTROY = int(EventKind.DESTROY)
_HALF = 1 << 31
_MAX_NACK_RANGES = 64
_RETIRED_EPOCHS = 64


class SessionConfigError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SessionConfig:
    node_id: int  # u16, distinct on the two nodes
    key: bytes = field(repr=False)  # HMAC key shared by the two nodes, >= 16 bytes
    mtu: int = wire.DEFAULT_MTU  # UDP payload budget per datagram
    flush_delay: float = 0.005  # a partly filled datagram waits at most this long
    ack_every: int = 16  # ack after this many in-order datagrams ...
    ack_delay: float = 0.01  # ... or this long after the first unacked one
    resend_timeout: float = 0.1  # first resend of an unacked datagram (then doubles)
    max_resend_timeout: float = 2.0
    resend_burst: int = 32  # datagrams resent per timeout
    retransmit_capacity: int = 512  # datagrams in flight (sender window)
    reorder_capacity: int = 512  # out-of-order datagrams the receiver buffers
    pending_capacity: int = 262_144  # coalesced unsent changes before falling back to a resync
    hello_interval: float = 1.0
    digest_interval: float = 10.0
    peer_dead_after: float = 3.5
    resync_request_interval: float = 1.0  # at most one resync request per interval
    stall_timeout: float = 3.0  # a gap unrepaired this long makes the receiver ask for a resync
    peer_node_id: int | None = None  # pin the peer's node id (None: any but ours)
    # What an authenticated peer may put in our table (defence in depth: a stolen key must
    # not plant arbitrary state): entries must carry the replication mark bit, a zone and an
    # address family this node uses, and the table holds at most peer_capacity entries.
    mark_mask: int = 0  # 0: no mark check
    zones: frozenset[int] | None = None  # None: any
    families: frozenset[int] | None = None  # None: any
    peer_capacity: int = 1 << 20

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, reason: str) -> None:
            if not ok:
                raise SessionConfigError(name, reason)

        need(0 <= self.node_id <= 0xFFFF, "node_id", f"{self.node_id} is out of range 0..65535")
        need(isinstance(self.key, bytes) and len(self.key) >= 16, "key", "needs >= 16 bytes")
        need(wire.MIN_DATAGRAM + 64 <= self.mtu <= 65507, "mtu", f"{self.mtu} out of range")
        for name in (
            "flush_delay",
            "ack_delay",
            "resend_timeout",
            "max_resend_timeout",
            "hello_interval",
            "digest_interval",
            "peer_dead_after",
            "resync_request_interval",
            "stall_timeout",
        ):
            v = getattr(self, name)
            need(v >= 0 if name in ("flush_delay", "ack_delay") else v > 0, name, f"{v} <= 0")
        need(self.max_resend_timeout >= self.resend_timeout, "max_resend_timeout", "< resend")
        for name in (
            "ack_every",
            "resend_burst",
            "retransmit_capacity",
            "reorder_capacity",
            "pending_capacity",
            "peer_capacity",
        ):
            v = getattr(self, name)
            need(v >= 1, name, f"{v} < 1")
        need(self.retransmit_capacity < _HALF // 4, "retransmit_capacity", "too large for u32 seq")
        if self.peer_node_id is not None:
            need(0 <= self.peer_node_id <= 0xFFFF, "peer_node_id", "out of range 0..65535")
            need(self.peer_node_id != self.node_id, "peer_node_id", "equals node_id")


class SessionEventKind(enum.Enum):
    PEER_LEARNED = "peer_learned"  # first epoch of the peer seen
    PEER_RESTARTED = "peer_restarted"  # a new epoch: the peer restarted; synced is False again
    PEER_DEAD = "peer_dead"
    PEER_ALIVE = "peer_alive"
    RESYNC_STARTED = "resync_started"  # we (re)send our whole table
    RESYNC_SENT = "resync_sent"  # our RESYNC_END went out
    PEER_RESYNC_STARTED = "peer_resync_started"
    PEER_RESYNC_COMPLETED = "peer_resync_completed"  # the peer's table is complete here
    DIVERGENCE = "divergence"  # digest/count mismatch or unknown id: resync requested
    REJECTED = "rejected"  # the peer sent an entry this node does not accept (mark, zone, family)
    PEER_OVERFLOW = "peer_overflow"  # the peer's table exceeds peer_capacity: not all is held
    OVERFLOW = "overflow"  # backlog over pending_capacity: falling back to a resync


@dataclass(frozen=True, slots=True)
class SessionEvent:
    kind: SessionEventKind
    at: float
    detail: str = ""


COUNTERS = (
    "events",
    "tx_datagrams",
    "tx_bytes",
    "tx_records",
    "rx_datagrams",
    "rx_bytes",
    "rx_records",
    "acks_sent",
    "nacks_sent",
    "nacks_received",
    "hellos_sent",
    "hellos_received",
    "hellos_unproven",
    "retransmits",
    "resend_timeouts",
    "resyncs_started",
    "resyncs_sent",
    "peer_resyncs_started",
    "peer_resyncs_completed",
    "resync_requests_sent",
    "resync_requests_received",
    "resync_requests_ignored",
    "overflows",
    "peer_restarts",
    "gaps_skipped",
    "digests_sent",
    "digests_checked",
    "divergences",
    "update_unknown",
    "delete_unknown",
    "drop_malformed",
    "drop_auth",
    "drop_reflected",
    "drop_node",
    "drop_epoch",
    "drop_retired_epoch",
    "drop_duplicate",
    "drop_reorder_full",
    "drop_link_down",
    "rejected_mark",
    "rejected_zone",
    "rejected_family",
    "peer_overflow",
)


def _extend(wire_seq: int, ref: int) -> int:
    """The full sequence number closest to ``ref`` whose low 32 bits are ``wire_seq``."""
    d = (wire_seq - ref) & U32
    if d >= _HALF:
        d -= 1 << 32
    return ref + d


class SyncSession:
    """Both directions of the replication with one peer. See the module docstring."""

    def __init__(self, config: SessionConfig, epoch: int, now: float) -> None:
        if not 0 < epoch <= wire.U64:
            raise SessionConfigError("epoch", "must be a nonzero u64")
        self.config = config
        self.epoch = epoch
        self._key = config.key
        self._now = now
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._events: list[SessionEvent] = []
        self._out: list[bytes] = []
        self._link_up = True

        # peer identity
        self._peer_epoch = 0
        self._peer_node: int | None = None
        self._retired: deque[int] = deque(maxlen=_RETIRED_EPOCHS)
        self._last_heard: float | None = None
        self._peer_alive = False
        self._hello_at = now
        self._last_hello = -1e18
        self._candidate = 0  # an unproven peer epoch that sent a HELLO: answer it

        # sender: our table, the backlog, the mirror of the receiver's id map, the window
        self._local: dict[FlowKey, tuple[Flow, int]] = {}
        self._local_xor = 0
        self._dirty: OrderedDict[FlowKey, None] = OrderedDict()
        self._wire: dict[FlowKey, tuple[int, int]] = {}  # key -> (ct_id, key hash) on the peer
        self._wire_ids: dict[int, FlowKey] = {}
        self._next_seq = 1
        self._inflight: deque[list[Any]] = deque()  # [seq, bytes, first_sent, last_sent]
        self._builder = DatagramBuilder(config.mtu)
        self._flush_at: float | None = None
        self._sync_point_next = False
        self._rto = config.resend_timeout
        self._srtt: float | None = None
        self._resync_pending = True  # every stream starts with a resync
        self._resync_reason = "start"
        self._resync_active = False
        self._resync_gen = 0
        self._resync_keys: list[FlowKey] = []
        self._resync_pos = 0
        self._digest_at = now + config.digest_interval
        self._digest_due = False
        self._max_request_seen = 0

        # receiver: the peer's table and the stream position
        # The peer's table. Its key hashes are not kept (they are key_hash(key), recomputed
        # on update, delete and resync end): 100k entries would hold ~9 MB of them.
        self._peer: dict[FlowKey, Flow] = {}
        self._peer_ids: dict[int, FlowKey] = {}
        self._peer_xor = 0
        self._rx_expect: int | None = None  # None: waiting for a SYNC_POINT
        self._rx_buf: dict[int, tuple[int, tuple[Record, ...]]] = {}
        self._peer_high = 0  # highest seq the peer says it sent
        self._gap_since: float | None = None
        self._refreshed: set[FlowKey] | None = None
        self._peer_gen: int | None = None
        self._synced = False
        self._overflowed = False
        self._ack_count = 0
        self._ack_at: float | None = None
        self._nack_at: float | None = None
        self._nacked_upto = 0
        self._request_id = 0
        self._request_at: float | None = None  # outstanding request sent at
        self._request_due: float | None = None  # a request waiting for its rate limit
        self._request_allowed_at = now
        self._request_backoff = config.resync_request_interval
        self._request_reason = RequestReason.OTHER

    # ---- read side ------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """A complete resync from the peer's current epoch has been applied."""
        return self._synced

    @property
    def peer_alive(self) -> bool:
        return self._peer_alive

    @property
    def link_up(self) -> bool:
        return self._link_up

    @property
    def peer_epoch(self) -> int:
        return self._peer_epoch

    @property
    def local_count(self) -> int:
        return len(self._local)

    @property
    def peer_count(self) -> int:
        return len(self._peer)

    @property
    def idle(self) -> bool:
        """Everything of ours is sent and acked, nothing is buffered from the peer."""
        return not (
            self._dirty
            or self._builder
            or self._inflight
            or self._resync_pending
            or self._resync_active
            or self._rx_buf
        )

    def peer_flows(self) -> dict[FlowKey, Flow]:
        """A copy of the replicated peer table, keyed by original tuple."""
        return dict(self._peer)

    def iter_peer_flows(self) -> Iterator[Flow]:
        """The replicated peer flows without copying the table (do not hold across inputs)."""
        return iter(self._peer.values())

    def local_flows(self) -> dict[FlowKey, Flow]:
        """A copy of our own table as replicated, keyed by original tuple."""
        return {k: v[0] for k, v in self._local.items()}

    def pop_events(self) -> list[SessionEvent]:
        events, self._events = self._events, []
        return events

    def status(self) -> dict[str, Any]:
        c = self.counters
        now = self._now
        return {
            "epoch": self.epoch,
            "peer_epoch": self._peer_epoch,
            "peer_node_id": self._peer_node,
            "link_up": self._link_up,
            "peer_alive": self._peer_alive,
            "last_heard_ago": None if self._last_heard is None else now - self._last_heard,
            "synced": self._synced,
            "local_entries": len(self._local),
            "peer_entries": len(self._peer),
            "queue_depth": len(self._dirty),
            "inflight": len(self._inflight),
            "lag": (now - self._inflight[0][2]) if self._inflight else 0.0,
            "rtt": self._srtt,
            "resync_active": self._resync_pending or self._resync_active,
            "resync_progress": (self._resync_pos / len(self._resync_keys) if self._resync_keys else None),
            "peer_resync_active": self._refreshed is not None,
            "resends": c["retransmits"],
            "resyncs": c["resyncs_started"],
            "peer_resyncs": c["peer_resyncs_completed"],
            "auth_failures": c["drop_auth"],
            "replay_drops": c["drop_duplicate"] + c["drop_epoch"] + c["drop_retired_epoch"],
            "divergences": c["divergences"],
            "counters": dict(c),
        }

    # ---- inputs: our own table ------------------------------------------------------------

    def local_events(self, events: Iterable[FlowEvent], now: float) -> None:
        """Conntrack events of our kernel (already filtered to the replicated flows)."""
        self._now = now
        local = self._local
        dirty = self._dirty
        record = not self._resync_pending  # a pending resync will send everything anyway
        xor = self._local_xor
        n = 0
        for kind, flow in events:
            n += 1
            key = flow.orig
            if kind == _DESTROY:
                old = local.pop(key, None)
                if old is not None:
                    xor ^= old[1]
            else:
                old = local.get(key)
                if old is None:
                    h = key_hash(key)
                    xor ^= h
                    local[key] = (flow, h)
                else:
                    local[key] = (flow, old[1])
            if record:
                dirty[key] = None
        self._local_xor = xor
        self.counters["events"] += n
        if len(dirty) > self.config.pending_capacity:
            self._overflow(now)

    def local_resync(self, flows: Iterable[Flow], now: float) -> None:
        """Our whole table from a kernel dump (at start, or after a netlink overrun).

        Replaces the local table, sends deletes for entries that vanished and resends the rest
        as a full resync (whose sweep on the receiver also removes anything else stale).
        """
        self._now = now
        old = self._local
        new: dict[FlowKey, tuple[Flow, int]] = {}
        xor = 0
        for flow in flows:
            key = flow.orig
            prev = new.get(key) or old.get(key)
            h = prev[1] if prev is not None else key_hash(key)
            if key not in new:
                xor ^= h
            new[key] = (flow, h)
        vanished = [k for k in old if k not in new]
        self._local = new
        self._local_xor = xor
        self._start_resync(now, "local resync")
        for k in vanished:
            self._dirty[k] = None

    # ---- inputs: network, time, link ------------------------------------------------------

    def datagram_received(self, data: bytes, now: float) -> None:
        """A datagram from the sync socket. Bad ones are counted and dropped, never raised."""
        self._now = now
        c = self.counters
        try:
            dg = decode_datagram(data, self._key)
        except AuthError:
            c["drop_auth"] += 1
            return
        except WireError:
            c["drop_malformed"] += 1
            return
        if not self._link_up:
            c["drop_link_down"] += 1
            return
        h = dg.header
        if h.sender_epoch == self.epoch:
            c["drop_reflected"] += 1
            return
        pin = self.config.peer_node_id
        if h.node_id == self.config.node_id or (pin is not None and h.node_id != pin):
            c["drop_node"] += 1
            return
        t = h.type
        bound = h.receiver_epoch == self.epoch
        if h.sender_epoch != self._peer_epoch:
            if h.sender_epoch in self._retired:
                c["drop_retired_epoch"] += 1
                return
            if not bound:
                # An epoch we have not heard bound to ours may be a replay captured before
                # we started: it changes nothing. If it is a HELLO we answer it, addressed
                # to that epoch; a live peer then proves itself with a datagram bound to us.
                if t is DatagramType.HELLO:
                    c["hellos_unproven"] += 1
                    self._candidate = h.sender_epoch
                    self._hello_at = min(self._hello_at, max(now, self._last_hello + 0.05))
                else:
                    c["drop_epoch"] += 1
                return
            self._new_peer_epoch(h.sender_epoch, h.node_id, now)
        elif not bound and t is not DatagramType.HELLO:
            c["drop_epoch"] += 1
            return
        elif self._peer_node is not None and h.node_id != self._peer_node:
            c["drop_node"] += 1
            return
        c["rx_datagrams"] += 1
        c["rx_bytes"] += len(data)
        self._last_heard = now
        if not self._peer_alive:
            self._peer_alive = True
            self._event(SessionEventKind.PEER_ALIVE, now)
        if t is DatagramType.HELLO:
            c["hellos_received"] += 1
            if not bound:
                # the peer does not know our epoch yet: tell it soon
                self._hello_at = min(self._hello_at, max(now, self._last_hello + 0.05))
                return
        self._on_ack(h.ack, now)
        if t is DatagramType.DATA:
            c["rx_records"] += len(dg.records)
            self._rx_data(h, dg.records, now)
            return
        self._on_peer_high(h.seq, now)
        if t is DatagramType.NACK:
            c["nacks_received"] += 1
            self._on_nack(dg.records, now)
        elif t is DatagramType.RESYNC_REQUEST:
            for rec in dg.records:
                if isinstance(rec, ResyncRequest):
                    self._on_resync_request(rec, now)

    def timer(self, now: float) -> None:
        """Run whatever is due at ``now`` (call at ``next_deadline()``; early calls are fine)."""
        self._now = now
        cfg = self.config
        if now >= self._hello_at:
            if self._link_up:
                self._send_control(DatagramType.HELLO, (), now)
                self.counters["hellos_sent"] += 1
                if self._candidate:
                    self._send_hello_to(self._candidate)
                self._last_hello = now
            self._candidate = 0
            self._hello_at = now + cfg.hello_interval
        last = self._last_heard
        if self._peer_alive and last is not None and now >= last + cfg.peer_dead_after:
            self._peer_alive = False
            self._event(SessionEventKind.PEER_DEAD, now)
        if not self._link_up or not self._peer_epoch:
            self._ack_at = self._nack_at = None
            if now >= self._digest_at:
                self._digest_at = now + cfg.digest_interval
            return
        if self._ack_at is not None and now >= self._ack_at:
            self._send_ack(now)
        if self._nack_at is not None and now >= self._nack_at:
            self._send_nack(now)
        inflight = self._inflight
        if inflight and now >= inflight[0][3] + self._rto:
            self.counters["resend_timeouts"] += 1
            rto, sent = self._rto, 0
            for entry in inflight:
                if sent >= cfg.resend_burst:
                    break
                if now >= entry[3] + rto:
                    self._resend(entry, now)
                    sent += 1
            self._rto = min(rto * 2, cfg.max_resend_timeout)
        if now >= self._digest_at:
            self._digest_at = now + cfg.digest_interval
            self._digest_due = True
        if self._request_due is not None and now >= self._request_due:
            self._send_request(self._request_reason, now)
        elif self._request_at is not None and now >= self._request_at + cfg.resync_request_interval:
            self._send_request(self._request_reason, now)  # lost, or the peer was away
        if self._gap_since is not None and now >= self._gap_since + cfg.stall_timeout:
            self._gap_since = now
            self._request_resync(RequestReason.STALLED, now)

    def link_changed(self, up: bool, now: float) -> None:
        """Carrier of the sync interface. While down nothing is sent; changes accumulate."""
        self._now = now
        if up == self._link_up:
            return
        self._link_up = up
        if not up:
            self._out.clear()
            return
        self._hello_at = now
        self._rto = self.config.resend_timeout
        for entry in self._inflight:
            entry[3] = now - self._rto  # due: the timer resends a burst at once
        self.timer(now)

    # ---- outputs --------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Everything to send now, in order. Call after every input."""
        self._now = now
        if self._link_up and self._peer_epoch:
            self._pump(now)
            if self._ack_at is not None and (now >= self._ack_at or self._ack_count >= self.config.ack_every):
                self._send_ack(now)
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        """When ``timer`` must run next (``None``: no deadline)."""
        t = min(self._hello_at, self._digest_at)
        if self._peer_alive and self._last_heard is not None:
            t = min(t, self._last_heard + self.config.peer_dead_after)
        if not (self._link_up and self._peer_epoch):
            return t
        if self._flush_at is not None and len(self._inflight) < self.config.retransmit_capacity:
            t = min(t, self._flush_at)
        if self._ack_at is not None:
            t = min(t, self._ack_at)
        if self._nack_at is not None:
            t = min(t, self._nack_at)
        if self._inflight:
            t = min(t, self._inflight[0][3] + self._rto)
        if self._request_at is not None:
            t = min(t, self._request_at + self.config.resync_request_interval)
        if self._request_due is not None:
            t = min(t, self._request_due)
        if self._gap_since is not None:
            t = min(t, self._gap_since + self.config.stall_timeout)
        return t

    # ---- sender internals -----------------------------------------------------------------

    def _event(self, kind: SessionEventKind, now: float, detail: str = "") -> None:
        self._events.append(SessionEvent(kind, now, detail))

    def _header(self, t: DatagramType, seq: int, flags: int = 0) -> Header:
        ack = (self._rx_expect - 1) & U32 if self._rx_expect is not None else 0
        return Header(t, self.config.node_id, self.epoch, self._peer_epoch, seq & U32, ack, flags)

    def _send_control(self, t: DatagramType, records: tuple[Record, ...], now: float) -> None:
        data = encode_datagram(self._header(t, self._next_seq - 1), records, self._key, None)
        self._out.append(data)
        self.counters["tx_datagrams"] += 1
        self.counters["tx_bytes"] += len(data)
        if self._rx_expect is not None:
            self._ack_at = None
            self._ack_count = 0

    def _send_hello_to(self, epoch: int) -> None:
        """A HELLO naming ``epoch`` as receiver: the answer to a new epoch's HELLO."""
        h = Header(DatagramType.HELLO, self.config.node_id, self.epoch, epoch, (self._next_seq - 1) & U32)
        data = encode_datagram(h, (), self._key, None)
        self._out.append(data)
        self.counters["hellos_sent"] += 1
        self.counters["tx_datagrams"] += 1
        self.counters["tx_bytes"] += len(data)

    def _send_ack(self, now: float) -> None:
        self._send_control(DatagramType.ACK, (), now)
        self.counters["acks_sent"] += 1

    def _overflow(self, now: float) -> None:
        self.counters["overflows"] += 1
        self._event(SessionEventKind.OVERFLOW, now, f"{len(self._dirty)} changes pending")
        self._start_resync(now, "overflow")

    def _start_resync(self, now: float, reason: str) -> None:
        """Drop everything in flight and queued; the next datagram restarts the table."""
        self._inflight.clear()
        self._builder.clear()
        self._flush_at = None
        self._dirty.clear()
        self._wire.clear()
        self._wire_ids.clear()
        self._resync_keys = []
        self._resync_pos = 0
        self._resync_active = False
        self._resync_pending = True
        self._digest_due = False
        self._rto = self.config.resend_timeout
        self._resync_reason = reason  # counted and reported when RESYNC_BEGIN goes out

    def _pump(self, now: float) -> None:
        """Encode pending work into datagrams while the window allows."""
        b = self._builder
        window = self.config.retransmit_capacity
        while len(self._inflight) < window:
            full = self._fill(b, now)
            if not b:
                return
            if full or (self._flush_at is not None and now >= self._flush_at):
                self._send_data(now)
                if not full:
                    return
            else:
                return

    def _fill(self, b: DatagramBuilder, now: float) -> bool:
        """Add records to ``b`` until it is full (True) or there is no more work (False)."""
        if not b:
            self._flush_at = None
        if self._resync_pending:
            self._resync_pending = False
            self._resync_active = True
            self._resync_gen = (self._resync_gen + 1) & U32
            self._resync_keys = list(self._local)
            xor = 0  # recomputed, not trusted from incremental upkeep
            for _, h in self._local.values():
                xor ^= h
            self._local_xor = xor
            self._resync_pos = 0
            self._sync_point_next = True
            b.add(wire.encode_record(ResyncBegin(self._resync_gen)))
            self._flush_at = now
            self.counters["resyncs_started"] += 1
            self._event(
                SessionEventKind.RESYNC_STARTED,
                now,
                f"gen {self._resync_gen}, {len(self._resync_keys)} entries: {self._resync_reason}",
            )
        local = self._local
        dirty = self._dirty
        mirror = self._wire
        mirror_ids = self._wire_ids
        add = b.add
        if dirty:
            popitem = dirty.popitem
            while dirty:
                key = popitem(last=False)[0]
                entry = local.get(key)
                known = mirror.get(key)
                if entry is not None:
                    flow, h = entry
                    cid = flow.ct_id
                    if known is not None and known[0] == cid and mirror_ids.get(cid) == key:
                        rec = encode_update(
                            cid, h & 0xFFFF, flow.status, flow.timeout, flow.mark, flow.tcp_state
                        )
                        if not add(rec):
                            dirty[key] = None
                            dirty.move_to_end(key, last=False)
                            return True
                    else:
                        if not add(encode_full(flow)):
                            dirty[key] = None
                            dirty.move_to_end(key, last=False)
                            return True
                        if known is not None and known[0] != cid and mirror_ids.get(known[0]) == key:
                            del mirror_ids[known[0]]
                        mirror[key] = (cid, h)
                        mirror_ids[cid] = key
                elif known is not None and mirror_ids.get(known[0]) == key:
                    if not add(encode_delete(known[0], known[1] & 0xFFFF)):
                        dirty[key] = None
                        dirty.move_to_end(key, last=False)
                        return True
                    del mirror[key]
                    del mirror_ids[known[0]]
                elif known is not None or self._resync_active:
                    # the peer holds it under an id that names another flow, or may hold it
                    # from before this resync: name it by its tuple
                    if not add(encode_delete_key(key)):
                        dirty[key] = None
                        dirty.move_to_end(key, last=False)
                        return True
                    mirror.pop(key, None)
                # else: the peer never had it
        if self._resync_active:
            keys = self._resync_keys
            pos = self._resync_pos
            n = len(keys)
            while pos < n:
                key = keys[pos]
                entry = local.get(key)
                if entry is None or key in mirror:
                    pos += 1
                    continue
                flow, h = entry
                if not add(encode_full(flow)):
                    self._resync_pos = pos
                    return True
                mirror[key] = (flow.ct_id, h)
                mirror_ids[flow.ct_id] = key
                pos += 1
            self._resync_pos = pos
            end = ResyncEnd(self._resync_gen, len(local), self._local_xor)
            if not add(wire.encode_record(end)):
                return True
            self._resync_active = False
            self._resync_keys = []
            self._resync_pos = 0
            self._flush_at = now
            self.counters["resyncs_sent"] += 1
            self._event(SessionEventKind.RESYNC_SENT, now, f"gen {end.gen}, {end.entries} entries")
        elif self._digest_due and not self._resync_pending:
            if not add(wire.encode_record(Digest(len(local), self._local_xor))):
                return True
            self._digest_due = False
            self._flush_at = now
            self.counters["digests_sent"] += 1
        if b and self._flush_at is None:
            self._flush_at = now + self.config.flush_delay
        return False

    def _send_data(self, now: float) -> None:
        seq = self._next_seq
        self._next_seq += 1
        flags = 0
        if self._sync_point_next:
            flags = FLAG_SYNC_POINT
            self._sync_point_next = False
        b = self._builder
        self.counters["tx_records"] += b.count
        data = b.finish(self._header(DatagramType.DATA, seq, flags), self._key)
        self._flush_at = None
        self._inflight.append([seq, data, now, now])
        self._out.append(data)
        self.counters["tx_datagrams"] += 1
        self.counters["tx_bytes"] += len(data)
        if self._rx_expect is not None:  # the ack rode along
            self._ack_at = None
            self._ack_count = 0

    def _resend(self, entry: list[Any], now: float) -> None:
        entry[3] = now
        self._out.append(entry[1])
        self.counters["retransmits"] += 1
        self.counters["tx_datagrams"] += 1
        self.counters["tx_bytes"] += len(entry[1])

    def _on_ack(self, ack_wire: int, now: float) -> None:
        inflight = self._inflight
        if not inflight:
            return
        highest = self._next_seq - 1
        ack = _extend(ack_wire, highest)
        if ack > highest or ack < inflight[0][0]:
            return
        last: list[Any] | None = None
        while inflight and inflight[0][0] <= ack:
            last = inflight.popleft()
        if last is not None:
            if last[2] == last[3]:  # never resent: a clean RTT sample
                sample = now - last[2]
                self._srtt = sample if self._srtt is None else 0.875 * self._srtt + 0.125 * sample
            self._rto = self.config.resend_timeout

    def _on_nack(self, records: tuple[Record, ...], now: float) -> None:
        inflight = self._inflight
        if not inflight:
            return
        base = inflight[0][0]
        highest = self._next_seq - 1
        min_gap = self.config.resend_timeout / 4
        budget = self.config.retransmit_capacity
        for rec in records[:_MAX_NACK_RANGES]:
            if not isinstance(rec, NackRange):
                continue
            first = max(_extend(rec.first, highest), base)
            last = min(_extend(rec.last, highest), highest)
            for seq in range(first, last + 1):
                entry = inflight[seq - base]
                if now - entry[3] >= min_gap and budget > 0:
                    self._resend(entry, now)
                    budget -= 1

    def _on_resync_request(self, rec: ResyncRequest, now: float) -> None:
        c = self.counters
        c["resync_requests_received"] += 1
        if rec.request_id <= self._max_request_seen:
            c["resync_requests_ignored"] += 1  # a replay, or one we already answered
            return
        self._max_request_seen = rec.request_id
        if self._resync_pending or self._resync_active:
            c["resync_requests_ignored"] += 1  # the resync under way answers it
            return
        try:
            reason = RequestReason(rec.reason).name.lower()
        except ValueError:
            reason = str(rec.reason)
        self._start_resync(now, f"requested by peer ({reason})")

    # ---- receiver internals ---------------------------------------------------------------

    def _new_peer_epoch(self, epoch: int, node: int, now: float) -> None:
        old = self._peer_epoch
        if old:
            self._retired.append(old)
            self.counters["peer_restarts"] += 1
            self._event(SessionEventKind.PEER_RESTARTED, now, f"epoch {old:#x} -> {epoch:#x}")
        else:
            self._event(SessionEventKind.PEER_LEARNED, now, f"epoch {epoch:#x} node {node}")
        self._peer_epoch = epoch
        self._peer_node = node
        # receive side: a new stream, starting at its SYNC_POINT
        self._rx_expect = None
        self._rx_buf.clear()
        self._peer_high = 0
        self._gap_since = None
        self._peer_ids.clear()
        self._refreshed = None
        self._peer_gen = None
        self._synced = False
        self._ack_at = self._nack_at = None
        self._ack_count = 0
        self._nacked_upto = 0
        self._request_at = self._request_due = None
        self._request_id = 0
        self._request_allowed_at = now
        self._request_backoff = self.config.resync_request_interval
        # send side: a new stream to the new epoch, starting with our whole table
        self._next_seq = 1
        self._max_request_seen = 0
        self._start_resync(now, "new peer epoch")
        self._hello_at = now

    def _rx_data(self, h: Header, records: tuple[Record, ...], now: float) -> None:
        c = self.counters
        expect = self._rx_expect
        sync = h.flags & FLAG_SYNC_POINT
        if expect is None:
            s = _extend(h.seq, 1)
            if sync and s >= 1:
                self._rx_jump(s, records, now)
            elif s in self._rx_buf:
                c["drop_duplicate"] += 1
            elif len(self._rx_buf) >= self.config.reorder_capacity:
                c["drop_reorder_full"] += 1
            else:
                self._rx_buf[s] = (h.flags, records)
                if self._gap_since is None:
                    self._gap_since = now
            return
        s = _extend(h.seq, expect)
        if s < expect:
            c["drop_duplicate"] += 1
            self._ack_at = now  # our ack may have been lost: repeat it now
            return
        if s == expect:
            self._apply(records, now)
            self._rx_expect = s + 1
            self._ack_count += 1
            self._drain(now)
        elif sync:
            self._rx_jump(s, records, now)
        elif s in self._rx_buf:
            c["drop_duplicate"] += 1
            return
        elif len(self._rx_buf) >= self.config.reorder_capacity:
            c["drop_reorder_full"] += 1
        else:
            self._rx_buf[s] = (h.flags, records)
            if self._gap_since is None:
                self._gap_since = now
            if s > self._nacked_upto:
                self._nack_at = now
        self._schedule_ack(now)

    def _rx_jump(self, s: int, records: tuple[Record, ...], now: float) -> None:
        """A SYNC_POINT: whatever was missing before ``s`` is superseded by this resync."""
        if self._rx_expect is not None and s > self._rx_expect:
            self.counters["gaps_skipped"] += 1
        buf = self._rx_buf
        for old in [q for q in buf if q < s]:
            del buf[old]
        self._apply(records, now)
        self._rx_expect = s + 1
        self._ack_count += 1
        self._drain(now)
        self._schedule_ack(now)

    def _drain(self, now: float) -> None:
        buf = self._rx_buf
        expect = self._rx_expect
        assert expect is not None
        while buf:
            item = buf.pop(expect, None)
            if item is None:
                break
            self._apply(item[1], now)
            expect += 1
            self._ack_count += 1
        self._rx_expect = expect
        if not buf:
            self._gap_since = None
            self._nack_at = None
            if self._peer_high >= expect:
                self._nack_at = now  # tail still missing
        else:
            for q in [q for q in buf if q < expect]:
                del buf[q]

    def _schedule_ack(self, now: float) -> None:
        if self._ack_count >= self.config.ack_every:
            self._ack_at = now
        elif self._ack_at is None:
            self._ack_at = now + self.config.ack_delay

    def _on_peer_high(self, seq_wire: int, now: float) -> None:
        expect = self._rx_expect
        if expect is None:
            return
        high = _extend(seq_wire, expect)
        if high >= expect and high > self._peer_high:
            self._peer_high = high
            if high > self._nacked_upto:
                self._nack_at = now

    def _send_nack(self, now: float) -> None:
        expect = self._rx_expect
        self._nack_at = None
        if expect is None:
            return
        buf = self._rx_buf
        top = max(max(buf) if buf else 0, self._peer_high)
        if top < expect:
            return
        # Walk the buffered seqs (at most reorder_capacity), never the span: a peer's seq may
        # be up to 2**31 ahead, and a loop over that span froze the event loop.
        ranges: list[Record] = []
        prev = expect - 1
        for q in sorted(q for q in buf if q >= expect):
            if q > prev + 1:
                ranges.append(NackRange((prev + 1) & U32, (q - 1) & U32))
                if len(ranges) >= _MAX_NACK_RANGES:
                    break
            prev = q
        if top > prev and len(ranges) < _MAX_NACK_RANGES:
            ranges.append(NackRange((prev + 1) & U32, top & U32))
        if not ranges:
            return
        self._send_control(DatagramType.NACK, tuple(ranges), now)
        self.counters["nacks_sent"] += 1
        self._nacked_upto = top
        self._nack_at = now + self.config.resend_timeout  # again if still missing

    def _request_resync(self, reason: RequestReason, now: float) -> None:
        """Ask the peer for a resync: one outstanding at a time, rate-limited with back-off
        (a divergence that a resync does not cure must not turn into a resync storm)."""
        if self._request_at is not None or self._request_due is not None:
            return
        self._request_reason = reason
        if now >= self._request_allowed_at:
            self._send_request(reason, now)
        else:
            self._request_due = self._request_allowed_at

    def _send_request(self, reason: RequestReason, now: float) -> None:
        self._request_id = (self._request_id + 1) & U32
        self._request_reason = reason
        self._request_at = now
        self._request_due = None
        self._request_allowed_at = now + self._request_backoff
        if self._link_up and self._peer_epoch:
            rec = ResyncRequest(self._request_id, int(reason))
            self._send_control(DatagramType.RESYNC_REQUEST, (rec,), now)
            self.counters["resync_requests_sent"] += 1

    def _divergence(self, reason: RequestReason, now: float, detail: str) -> None:
        self.counters["divergences"] += 1
        if self._request_at is None:
            self._event(SessionEventKind.DIVERGENCE, now, detail)
        self._request_resync(reason, now)

    def _apply(self, records: tuple[Record, ...], now: float) -> None:
        """Apply one in-order datagram's records to the peer table."""
        peer = self._peer
        ids = self._peer_ids
        refreshed = self._refreshed
        cfg = self.config
        mask = cfg.mark_mask
        for rec in records:
            if isinstance(rec, Update):
                if mask and not rec.mark & mask:
                    self._reject("rejected_mark", now, f"update of id {rec.ct_id}: mark {rec.mark:#x}")
                    continue
                ukey = ids.get(rec.ct_id)
                f = peer.get(ukey) if ukey is not None else None
                if ukey is None or f is None or key_hash(ukey) & 0xFFFF != rec.check:
                    self.counters["update_unknown"] += 1
                    self._divergence(RequestReason.UNKNOWN_ID, now, f"update of id {rec.ct_id}")
                    continue
                peer[ukey] = Flow(f.orig, f.reply, rec.ct_id, rec.status, rec.timeout, rec.mark,
                                  rec.tcp_state)
            elif isinstance(rec, Flow):
                key = rec.orig
                why = self._refused(rec)
                if why:
                    self._reject(why, now, f"{why.removeprefix('rejected_')} of {flow_text(rec)}")
                    continue
                cid = rec.ct_id
                old = peer.get(key)
                if old is None:
                    if len(peer) >= cfg.peer_capacity:
                        self._peer_full(now)
                        continue
                    self._peer_xor ^= key_hash(key)
                else:
                    oid = old.ct_id
                    if oid != cid and ids.get(oid) == key:
                        del ids[oid]
                peer[key] = rec
                ids[cid] = key
                if refreshed is not None:
                    refreshed.add(key)
            elif isinstance(rec, Delete):
                dkey = ids.get(rec.ct_id)
                h = key_hash(dkey) if dkey is not None and dkey in peer else None
                if dkey is None or h is None or h & 0xFFFF != rec.check:
                    self.counters["delete_unknown"] += 1
                    self._divergence(RequestReason.UNKNOWN_ID, now, f"delete of id {rec.ct_id}")
                    continue
                del peer[dkey]
                del ids[rec.ct_id]
                self._peer_xor ^= h
            elif isinstance(rec, DeleteKey):
                gone = peer.pop(rec.key, None)
                if gone is None:
                    self.counters["delete_unknown"] += 1  # normal during a resync
                    continue
                self._peer_xor ^= key_hash(rec.key)
                if ids.get(gone.ct_id) == rec.key:
                    del ids[gone.ct_id]
            elif isinstance(rec, ResyncBegin):
                ids.clear()
                refreshed = self._refreshed = set()
                self._peer_gen = rec.gen
                self._request_at = None
                self.counters["peer_resyncs_started"] += 1
                self._event(SessionEventKind.PEER_RESYNC_STARTED, now, f"gen {rec.gen}")
            elif isinstance(rec, ResyncEnd):
                self._resync_end(rec, now)
                refreshed = None
            elif isinstance(rec, Digest):
                self.counters["digests_checked"] += 1
                if (len(peer), self._peer_xor) != (rec.entries, rec.digest):
                    self._divergence(
                        RequestReason.DIGEST_MISMATCH,
                        now,
                        f"digest: {len(peer)} entries here, {rec.entries} on the peer",
                    )
            else:  # NACK_RANGE/RESYNC_REQUEST never decode inside DATA
                raise AssertionError(f"record {rec!r} in a DATA datagram")

    def _refused(self, flow: Flow) -> str:
        """The counter naming why ``flow`` may not enter our table ("" if it may)."""
        cfg = self.config
        if cfg.mark_mask and not flow.mark & cfg.mark_mask:
            return "rejected_mark"
        if cfg.families is not None and flow.orig.family not in cfg.families:
            return "rejected_family"
        if cfg.zones is not None and (flow.orig.zone not in cfg.zones or flow.reply.zone not in cfg.zones):
            return "rejected_zone"
        return ""

    def _reject(self, counter: str, now: float, detail: str) -> None:
        self.counters[counter] += 1
        self._event(SessionEventKind.REJECTED, now, detail)

    def _peer_full(self, now: float) -> None:
        """More peer entries than we may hold: a divergence (never memory growth). We hold
        what fits, are no longer ``synced``, and ask for resyncs (backing off) until the
        peer's table fits again."""
        self.counters["peer_overflow"] += 1
        if self._synced or not self._overflowed:
            self._event(SessionEventKind.PEER_OVERFLOW, now,
                        f"the peer's table exceeds peer_capacity {self.config.peer_capacity}")
        self._overflowed = True
        self._synced = False
        if self._refreshed is None:  # during a resync its END check asks again, backing off
            self._divergence(RequestReason.OTHER, now, "peer table over capacity")

    def _resync_end(self, rec: ResyncEnd, now: float) -> None:
        refreshed = self._refreshed
        if refreshed is None or rec.gen != self._peer_gen:
            self._divergence(RequestReason.OTHER, now, f"RESYNC_END gen {rec.gen} unexpected")
            return
        peer = self._peer
        stale: list[FlowKey] = []
        xor = 0  # recomputed, not trusted from incremental upkeep
        for k in peer:
            if k in refreshed:
                xor ^= key_hash(k)
            else:
                stale.append(k)
        for k in stale:
            del peer[k]
        self._peer_xor = xor
        self._refreshed = None
        self._peer_gen = None
        if (len(peer), xor) != (rec.entries, rec.digest):
            self._request_backoff = min(self._request_backoff * 2, 64 * self.config.resync_request_interval)
            self._divergence(
                RequestReason.DIGEST_MISMATCH,
                now,
                f"after resync: {len(peer)} entries here, {rec.entries} on the peer",
            )
            return
        self.counters["peer_resyncs_completed"] += 1
        self._request_backoff = self.config.resync_request_interval
        self._overflowed = False
        self._synced = True
        self._event(
            SessionEventKind.PEER_RESYNC_COMPLETED,
            now,
            f"gen {rec.gen}: {len(peer)} entries, {len(stale)} stale removed",
        )
