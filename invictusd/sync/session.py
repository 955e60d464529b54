"""A replication session with one peer: identity, then the sender and the receiver. Sans-IO.

The session never reads a socket, sleeps or calls a clock. Every input takes ``now`` (a
monotonic float in seconds); outputs are the datagrams to send, the next deadline, events
for the log, and what the adapter must do (apply the peer's records, start a resync).

* Identity: each node has an epoch (random u64 per daemon start). DATA and control
  datagrams are bound to the pair (sender epoch, receiver epoch): one whose receiver epoch is
  not ours is dropped, so nothing recorded before our start can be replayed into us. A new
  peer epoch is adopted only once a datagram from it names *our* epoch (proof that it is
  live now): a HELLO replayed from an old epoch changes nothing; a HELLO from an unproven
  epoch is answered, addressed to it. The replaced epoch is retired for good.
* ``Sender`` (``invictusd.sync.sender``): our table, only while we are master.
* ``Receiver`` (``invictusd.sync.receiver``): the peer's stream, in order, to be applied.

Byte tables and rules: ``docs/sync-protocol.md``.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from invictusd.sync import wire
from invictusd.sync.receiver import Delivery, Receiver, ReceiverConfig
from invictusd.sync.sender import Sender, SenderConfig
from invictusd.sync.wire import (
    FLAG_SYNC_POINT,
    U32,
    AuthError,
    DatagramType,
    Header,
    Record,
    RequestReason,
    ResyncRequest,
    WireError,
    decode_payload,
    encode_datagram,
    open_datagram,
    validate_records,
)

RETIRED_EPOCHS = 64


class SessionConfigError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SessionConfig:
    node_id: int  # u16, distinct on the two nodes
    key: bytes = field(repr=False)  # HMAC key shared by the two nodes, >= 16 bytes
    peer_node_id: int | None = None  # pin the peer's node id (None: any but ours)
    sender: SenderConfig = field(default_factory=SenderConfig)
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    hello_interval: float = 1.0
    peer_dead_after: float = 3.5

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, reason: str) -> None:
            if not ok:
                raise SessionConfigError(name, reason)

        need(0 <= self.node_id <= 0xFFFF, "node_id", f"{self.node_id} is out of range 0..65535")
        need(isinstance(self.key, bytes) and len(self.key) >= 16, "key", "needs >= 16 bytes")
        s, r = self.sender, self.receiver
        need(wire.MIN_DATAGRAM + 64 <= s.mtu <= 65507, "sender.mtu", f"{s.mtu} out of range")
        for name, v in (("sender.flush_delay", s.flush_delay), ("receiver.ack_delay", r.ack_delay)):
            need(v >= 0, name, f"{v} < 0")
        for name, v in (("sender.resend_timeout", s.resend_timeout),
                        ("receiver.nack_interval", r.nack_interval),
                        ("receiver.stall_timeout", r.stall_timeout),
                        ("receiver.request_interval", r.request_interval),
                        ("hello_interval", self.hello_interval),
                        ("peer_dead_after", self.peer_dead_after)):
            need(v > 0, name, f"{v} <= 0")
        need(s.max_resend_timeout >= s.resend_timeout, "sender.max_resend_timeout", "< resend_timeout")
        for name, n in (("sender.window", s.window), ("sender.resend_burst", s.resend_burst),
                        ("sender.backlog_capacity", s.backlog_capacity),
                        ("sender.coalesce_capacity", s.coalesce_capacity),
                        ("receiver.reorder_capacity", r.reorder_capacity),
                        ("receiver.ack_every", r.ack_every), ("receiver.apply_slack", r.apply_slack)):
            need(n >= 1, name, f"{n} < 1")
        need(s.window < (1 << 29), "sender.window", "too large for u32 sequence numbers")
        if self.peer_node_id is not None:
            need(0 <= self.peer_node_id <= 0xFFFF, "peer_node_id", "out of range 0..65535")
            need(self.peer_node_id != self.node_id, "peer_node_id", "equals node_id")


class SessionEventKind(enum.Enum):
    PEER_LEARNED = "peer_learned"  # first epoch of the peer proven
    PEER_RESTARTED = "peer_restarted"  # a new epoch replaced the known one
    PEER_DEAD = "peer_dead"
    PEER_ALIVE = "peer_alive"
    REQUEST_IGNORED = "request_ignored"  # a resync request while we are not master


@dataclass(frozen=True, slots=True)
class SessionEvent:
    kind: SessionEventKind
    at: float
    detail: str = ""


@dataclass(slots=True)
class IdentityCounters:
    hellos_sent: int = 0
    hellos_received: int = 0
    hellos_unproven: int = 0
    rx_datagrams: int = 0
    rx_bytes: int = 0
    tx_datagrams: int = 0
    tx_bytes: int = 0
    drop_malformed: int = 0
    drop_auth: int = 0
    drop_reflected: int = 0
    drop_node: int = 0
    drop_epoch: int = 0
    drop_retired_epoch: int = 0
    drop_link_down: int = 0
    peer_restarts: int = 0
    resync_requests_received: int = 0
    resync_requests_ignored: int = 0


class SyncSession:
    """Both directions of the replication with one peer. See the module docstring."""

    def __init__(self, config: SessionConfig, epoch: int, now: float) -> None:
        if not 0 < epoch <= wire.U64:
            raise SessionConfigError("epoch", "must be a nonzero u64")
        self.config = config
        self.epoch = epoch
        self._key = config.key
        self._now = now
        self.counters = IdentityCounters()
        self.sender = Sender(config.sender)
        self.receiver = Receiver(config.receiver)
        self.receiver.reset(now)
        self._events: list[SessionEvent] = []
        self._out: list[bytes] = []
        self._link_up = True
        self._peer_epoch = 0
        self._peer_node: int | None = None
        self._retired: deque[int] = deque(maxlen=RETIRED_EPOCHS)
        self._candidate = 0  # an unproven epoch that said HELLO: answer it
        self._last_heard: float | None = None
        self._peer_alive = False
        self._hello_at = now
        self._last_hello = -1e18
        self._max_request_seen = 0

    # ---- read side ------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self.receiver.synced

    @property
    def peer_alive(self) -> bool:
        return self._peer_alive

    @property
    def peer_epoch(self) -> int:
        return self._peer_epoch

    @property
    def link_up(self) -> bool:
        return self._link_up

    @property
    def idle(self) -> bool:
        return self.sender.idle and not self.receiver.gap and not self.receiver.deliveries

    def pop_events(self) -> list[SessionEvent]:
        events, self._events = self._events, []
        return events

    def take_deliveries(self) -> list[Delivery]:
        return self.receiver.take_deliveries()

    def status(self) -> dict[str, Any]:
        s, r, c = self.sender, self.receiver, self.counters
        lag = s.lag
        return {
            "epoch": f"{self.epoch:016x}",
            "peer_epoch": f"{self._peer_epoch:016x}" if self._peer_epoch else None,
            "peer_node_id": self._peer_node,
            "peer_alive": self._peer_alive,
            "last_heard_ago": None if self._last_heard is None else round(self._now - self._last_heard, 3),
            "sending": s.phase.value,
            "receiving": r.phase.value,
            "synced": r.synced,
            "queue_depth": s.queued,
            "inflight": len(s.inflight),
            "lag": 0.0 if lag is None else round(self._now - lag, 4),
            "rtt": s.srtt,
            "resync_gen": s.resync_gen,
            "resends": s.counters.retransmits,
            "resyncs": s.counters.resyncs_started,
            "auth_failures": c.drop_auth,
            "replay_drops": r.counters.duplicates + c.drop_epoch + c.drop_retired_epoch,
            "divergences": r.counters.divergences,
            "counters": self.counters_flat(),
        }

    def counters_flat(self) -> dict[str, int]:
        out = _fields(self.counters)
        out.update({_SENDER_NAMES[k]: v for k, v in _fields(self.sender.counters).items()})
        out.update({_RECEIVER_NAMES[k]: v for k, v in _fields(self.receiver.counters).items()})
        # Every datagram, ours and resent, as the interface sees them.
        out["tx_datagrams"] += out["data_datagrams_sent"] + out["retransmits"]
        out["tx_bytes"] += out["data_bytes_sent"]
        return out

    # ---- inputs ---------------------------------------------------------------------------

    def set_role(self, master: bool, now: float) -> None:
        """Only the master sends its table (a backup never announces what it holds)."""
        self._now = now
        self.receiver.set_requests(not master)
        if master:
            self.sender.activate("became master")
        else:
            self.sender.deactivate()

    def datagram_received(self, data: bytes, now: float) -> None:
        """A datagram from the sync socket. Bad ones are counted and dropped, never raised."""
        self._now = now
        c = self.counters
        try:
            h = open_datagram(data, self._key)
            end = len(data) - wire.MAC_LEN
            if h.type is DatagramType.DATA:
                records: tuple[Record, ...] = ()
                count = validate_records(data, wire.HEADER_LEN, end, h.type)
            else:
                records = tuple(decode_payload(data, wire.HEADER_LEN, end, h.type))
        except AuthError:
            c.drop_auth += 1
            return
        except WireError:
            c.drop_malformed += 1
            return
        if not self._link_up:
            c.drop_link_down += 1
            return
        if h.sender_epoch == self.epoch:
            c.drop_reflected += 1
            return
        pin = self.config.peer_node_id
        if h.node_id == self.config.node_id or (pin is not None and h.node_id != pin):
            c.drop_node += 1
            return
        t = h.type
        bound = h.receiver_epoch == self.epoch
        if h.sender_epoch != self._peer_epoch:
            if h.sender_epoch in self._retired:
                c.drop_retired_epoch += 1
                return
            if not bound:
                # An epoch we have not heard bound to ours may be a replay captured before
                # we started: it changes nothing. A HELLO is answered, addressed to it; a
                # live peer then proves itself with a datagram bound to us.
                if t is DatagramType.HELLO:
                    c.hellos_unproven += 1
                    self._candidate = h.sender_epoch
                    self._hello_at = min(self._hello_at, max(now, self._last_hello + 0.05))
                else:
                    c.drop_epoch += 1
                return
            self._new_peer_epoch(h.sender_epoch, h.node_id, now)
        elif not bound and t is not DatagramType.HELLO:
            c.drop_epoch += 1
            return
        elif self._peer_node is not None and h.node_id != self._peer_node:
            c.drop_node += 1
            return
        c.rx_datagrams += 1
        c.rx_bytes += len(data)
        self._last_heard = now
        if not self._peer_alive:
            self._peer_alive = True
            self._event(SessionEventKind.PEER_ALIVE, now)
        if t is DatagramType.HELLO:
            c.hellos_received += 1
            if not bound:  # the peer does not know our epoch yet: tell it soon
                self._hello_at = min(self._hello_at, max(now, self._last_hello + 0.05))
                return
        self.sender.acked(h.ack, now)
        if t is DatagramType.DATA:
            self.receiver.data(h.seq, bool(h.flags & FLAG_SYNC_POINT), count,
                               bytes(data[wire.HEADER_LEN : end]), now)
            return
        self.receiver.peer_high(h.seq, now)
        if t is DatagramType.NACK:
            self.sender.nacked(records, now, self._out)
        elif t is DatagramType.RESYNC_REQUEST:
            for rec in records:
                if isinstance(rec, ResyncRequest):
                    self._on_request(rec, now)

    def timer(self, now: float) -> None:
        """Run whatever is due at ``now`` (call at ``next_deadline()``; early calls are fine)."""
        self._now = now
        cfg = self.config
        if now >= self._hello_at:
            if self._link_up:
                self._send_control(DatagramType.HELLO, ())
                self.counters.hellos_sent += 1
                if self._candidate:
                    self._send_hello_to(self._candidate)
                self._last_hello = now
            self._candidate = 0
            self._hello_at = now + cfg.hello_interval
        last = self._last_heard
        if self._peer_alive and last is not None and now >= last + cfg.peer_dead_after:
            self._peer_alive = False
            self._event(SessionEventKind.PEER_DEAD, now)
        if self._link_up and self._peer_epoch:
            self.sender.timer(now, self._out)

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
        self.sender.link_up(now)
        self.timer(now)

    # sender passthrough: records from the kernel and the resync the adapter drives

    def records(self, records: Sequence[bytes], keys: Sequence[bytes]) -> None:
        self.sender.records(records, keys)

    def digest(self, entries: int, digest: int, now: float) -> None:
        self.sender.digest(entries, digest, now)

    # receiver passthrough: what the adapter reports after applying

    def applied(self, seq: int, now: float) -> None:
        self.receiver.applied(seq, now)

    def divergence(self, reason: RequestReason, now: float) -> None:
        self.receiver.divergence(reason, now)

    # ---- outputs --------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Everything to send now, in order. Call after every input."""
        self._now = now
        if self._link_up and self._peer_epoch:
            before = len(self._out)
            self.sender.pump(now, self._header(DatagramType.DATA, 0), self._key, self._out)
            if len(self._out) > before:
                self.receiver.sent_ack(explicit=False)  # DATA carries the ack
            for kind, records in self.receiver.due(now, self._link_up):
                t = {"ack": DatagramType.ACK, "nack": DatagramType.NACK,
                     "request": DatagramType.RESYNC_REQUEST}[kind]
                self._send_control(t, records)
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float:
        """When ``timer`` must run next."""
        t = self._hello_at
        if self._peer_alive and self._last_heard is not None:
            t = min(t, self._last_heard + self.config.peer_dead_after)
        if self._link_up and self._peer_epoch:
            for d in (self.sender.next_deadline(), self.receiver.next_deadline()):
                if d is not None:
                    t = min(t, d)
        return t

    # ---- internals ------------------------------------------------------------------------

    def _event(self, kind: SessionEventKind, now: float, detail: str = "") -> None:
        self._events.append(SessionEvent(kind, now, detail))

    def _header(self, t: DatagramType, seq: int) -> Header:
        return Header(t, self.config.node_id, self.epoch, self._peer_epoch, seq & U32,
                      self.receiver.ack_value, 0)

    def _send_control(self, t: DatagramType, records: tuple[Record, ...]) -> None:
        data = encode_datagram(self._header(t, self.sender.highest_seq), records, self._key, None)
        self._out.append(data)
        self.counters.tx_datagrams += 1
        self.counters.tx_bytes += len(data)
        self.receiver.sent_ack(explicit=t is DatagramType.ACK)

    def _send_hello_to(self, epoch: int) -> None:
        h = Header(DatagramType.HELLO, self.config.node_id, self.epoch, epoch,
                   self.sender.highest_seq & U32, 0, 0)
        data = encode_datagram(h, (), self._key, None)
        self._out.append(data)
        self.counters.hellos_sent += 1
        self.counters.tx_datagrams += 1
        self.counters.tx_bytes += len(data)

    def _new_peer_epoch(self, epoch: int, node: int, now: float) -> None:
        old = self._peer_epoch
        if old:
            self._retired.append(old)
            self.counters.peer_restarts += 1
            self._event(SessionEventKind.PEER_RESTARTED, now, f"epoch {old:#x} -> {epoch:#x}")
        else:
            self._event(SessionEventKind.PEER_LEARNED, now, f"epoch {epoch:#x} node {node}")
        self._peer_epoch = epoch
        self._peer_node = node
        self._max_request_seen = 0
        self.receiver.reset(now)
        if self.sender.active:
            # A new receiver: a new stream to it, starting with our whole table.
            self.sender.deactivate()
            self.sender.activate("new peer epoch")
        self._hello_at = now

    def _on_request(self, rec: ResyncRequest, now: float) -> None:
        c = self.counters
        c.resync_requests_received += 1
        if rec.request_id <= self._max_request_seen:
            c.resync_requests_ignored += 1  # a replay, or one we already answered
            return
        self._max_request_seen = rec.request_id
        if not self.sender.active:
            c.resync_requests_ignored += 1
            self._event(SessionEventKind.REQUEST_IGNORED, now, "we are not master")
            return
        try:
            reason = RequestReason(rec.reason).name.lower()
        except ValueError:
            reason = str(rec.reason)
        self.sender.want_resync(f"requested by the peer ({reason})")


def _fields(obj: Any) -> dict[str, int]:
    return {k: getattr(obj, k) for k in obj.__slots__}


# The flat names of status()["counters"] (a stable interface; see README).
_SENDER_NAMES = {"records": "records_sent", "bulk_records": "bulk_records_sent",
                 "datagrams": "data_datagrams_sent", "bytes": "data_bytes_sent",
                 "retransmits": "retransmits", "resend_timeouts": "resend_timeouts",
                 "nacks_received": "nacks_received", "resyncs_started": "resyncs_started",
                 "resyncs_sent": "resyncs_sent", "digests_sent": "digests_sent",
                 "backlog_overflows": "overflows", "coalesced": "coalesced"}
_RECEIVER_NAMES = {"datagrams": "data_datagrams_received", "records": "rx_records",
                   "duplicates": "drop_duplicate", "reorder_full": "drop_reorder_full",
                   "gaps_skipped": "gaps_skipped", "acks_sent": "acks_sent", "nacks_sent": "nacks_sent",
                   "resync_requests_sent": "resync_requests_sent", "divergences": "divergences"}
