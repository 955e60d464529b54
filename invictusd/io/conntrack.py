"""Conntrack sockets: event subscription, dump and batched injection over raw ctnetlink.

Thin adapters around ``invictusd.io.ctnetlink`` (the pure codec). All sockets act in the
network namespace of the calling thread at the time they are created.

Preconditions: the ``nf_conntrack`` and ``nf_conntrack_netlink`` modules (built in or
loaded). ``nfnetlink`` loads ``nf_conntrack_netlink`` on the first ctnetlink request or group
subscription, which pulls in ``nf_conntrack``; ``set_conntrack_events`` relies on that when
the sysctl is missing, and raises ``ConntrackUnavailable`` when it is still missing.
"""

from __future__ import annotations

import contextlib
import errno as E
import os
import select
import socket
import time
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from invictusd import cbpf
from invictusd.flows import Flow, FlowEvent, FlowKey
from invictusd.io import ctnetlink as ct
from invictusd.io.sockopt import attach_filter, buffers, force_buffers

__all__ = [
    "CommitResult",
    "ConntrackUnavailable",
    "DeleteResult",
    "EventSocket",
    "Injector",
    "Overrun",
    "dump",
    "set_conntrack_events",
]

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
NETLINK_CAP_ACK = 10

NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3

EVENTS_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_events"

# The kernel never queues a netlink datagram larger than this for ctnetlink (events use
# NLMSG_GOODSIZE, dumps at most 32 KiB); keep this much room free before each recv.
_MAX_DATAGRAM = 64 * 1024


class Overrun(Exception):
    """The kernel dropped events (ENOBUFS): the caller must resync by a full dump.

    ``events`` holds what was read before the overrun was reported; they are valid.
    """

    def __init__(self, events: list[FlowEvent]) -> None:
        super().__init__(f"conntrack event socket overrun after {len(events)} events")
        self.events = events


class ConntrackUnavailable(OSError):
    """nf_conntrack is not available in this kernel/namespace."""


def _netlink_socket(rcvbuf: int, sndbuf: int, nonblocking: bool) -> socket.socket:
    kind = socket.SOCK_RAW | socket.SOCK_CLOEXEC
    if nonblocking:
        kind |= socket.SOCK_NONBLOCK
    sock = socket.socket(socket.AF_NETLINK, kind, NETLINK_NETFILTER)
    try:
        # *BUFFORCE ignores rmem_max/wmem_max (we run with CAP_NET_ADMIN); the kernel doubles it.
        force_buffers(sock, rcvbuf, sndbuf)
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


class _Fill(NamedTuple):
    """What one ``EventSocket._fill`` received: the bytes used in the buffer, how many
    datagrams, whether the kernel reported an overrun, whether the socket is empty."""

    end: int
    datagrams: int
    overrun: bool
    drained: bool


class EventSocket:
    """Conntrack NEW/UPDATE/DESTROY events, optionally only flows carrying ``mark_bit``.

    ``program``: a kernel-side filter (``invictusd.io.transcode.event_filter``): what it
    refuses never wakes us and never takes room in the queue.

    Register ``fileno()`` with a reactor and call ``read()`` when readable. ``Overrun`` means
    events were lost (count in ``overruns``): resync with ``dump()``. Each queued event costs
    about 1.3 KB of receive buffer; size ``rcvbuf_bytes`` for the burst to absorb.
    """

    def __init__(
        self,
        rcvbuf_bytes: int = 64 << 20,
        mark_bit: int | None = 30,
        *,
        buffer_bytes: int = 1 << 20,
        program: Sequence[cbpf.Insn] | None = None,
        subscribe: bool = True,
    ) -> None:
        self.mark_mask = 0 if mark_bit is None else 1 << mark_bit
        self.overruns = 0
        self.events = 0
        self._buf = bytearray(max(buffer_bytes, 2 * _MAX_DATAGRAM))
        self._view = memoryview(self._buf)
        self._sock = _netlink_socket(rcvbuf_bytes, 1 << 16, nonblocking=True)
        self.rcvbuf = buffers(self._sock).rcvbuf  # what the kernel granted (doubled)
        self._asked = rcvbuf_bytes  # what we asked for (the kernel grants twice that)
        try:
            # The filter before the groups: nothing unfiltered is ever queued.
            if program is not None:
                attach_filter(self._sock, program)
            if subscribe:
                self.subscribe(True)
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def grow(self, limit_bytes: int) -> int | None:
        """After an overrun: double the receive buffer, up to ``limit_bytes`` asked (as
        conntrackd's ``NetlinkBufferSizeMaxGrowth``). Returns the size the kernel granted,
        or None when the buffer is already at the limit."""
        want = min(2 * self._asked, limit_bytes)
        if want <= self._asked:
            return None
        self.rcvbuf = force_buffers(self._sock, rcvbuf=want).rcvbuf
        self._asked = want
        return self.rcvbuf

    def read_raw(self, max_datagrams: int) -> tuple[memoryview, int, bool]:
        """Up to ``max_datagrams`` datagrams, unparsed, 4-aligned one after the other in an
        internal buffer (valid until the next call): (buffer, bytes used, overrun). An
        overrun (ENOBUFS) means events were lost: the caller must resync by a dump; what
        was read before it is valid."""
        f = self._fill(max_datagrams)
        return self._view, f.end, f.overrun

    def read(self, max_datagrams: int | None = None) -> list[FlowEvent]:
        """Drain the socket without blocking; raises ``Overrun`` on ENOBUFS.

        ``max_datagrams`` bounds the work of one call (a reactor callback should not starve
        the loop during an event storm); the rest stays queued and the fd stays readable.
        """
        budget = max_datagrams
        out: list[FlowEvent] = []
        while budget is None or budget > 0:
            f = self._fill(budget if budget is not None else 1 << 30)
            self._flush(f.end, out)
            if f.overrun:
                raise Overrun(out) from None
            if f.drained:
                break
            if budget is not None:
                budget -= f.datagrams
        return out

    def _fill(self, max_datagrams: int) -> _Fill:
        """Receive up to ``max_datagrams`` datagrams into the buffer, each 4-aligned (as the
        parser steps between messages), until the socket is empty, the buffer is nearly
        full or an overrun (counted) is reported."""
        recv_into = self._sock.recv_into
        view = self._view
        size = len(self._buf)
        limit = size - _MAX_DATAGRAM
        pos = count = 0
        while count < max_datagrams:
            try:
                n = recv_into(view[pos:], 0, socket.MSG_TRUNC)
            except BlockingIOError:
                return _Fill(pos, count, overrun=False, drained=True)
            except OSError as exc:
                if exc.errno == E.ENOBUFS:
                    self.overruns += 1
                    return _Fill(pos, count, overrun=True, drained=False)
                raise
            if n > size - pos:
                # Cannot happen with ctnetlink's datagram sizes; never parse a truncated one.
                raise ct.NetlinkError("datagram", pos, f"truncated: {n} bytes")
            count += 1
            pos = (pos + n + 3) & ~3
            if pos > limit:
                break
        return _Fill(pos, count, overrun=False, drained=False)

    def subscribe(self, on: bool) -> None:
        """Join or leave the event groups. While out, the kernel builds no events for us at
        all (it skips event work when no one listens): a bulk insert of our own then costs
        the kernel only the inserts. Whatever happens meanwhile must be read by a dump."""
        option = NETLINK_ADD_MEMBERSHIP if on else NETLINK_DROP_MEMBERSHIP
        for group in (NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE, NFNLGRP_CONNTRACK_DESTROY):
            self._sock.setsockopt(SOL_NETLINK, option, group)

    def skip(self, max_datagrams: int = 256) -> int:
        """Read and discard queued datagrams without parsing them; returns how many.

        For windows whose events the caller will replace by a dump (our own commit of
        100k entries raises 100k NEW events that say nothing new). An overrun while
        skipping is counted but not raised: the dump that follows covers it.
        """
        recv_into = self._sock.recv_into
        buf = self._buf
        done = 0
        while done < max_datagrams:
            try:
                recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != E.ENOBUFS:
                    raise
                self.overruns += 1
            done += 1
        return done

    def _flush(self, pos: int, out: list[FlowEvent]) -> None:
        if pos:
            events = ct.parse_messages(self._view, pos, self.mark_mask)
            self.events += len(events)
            out.extend(events)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> EventSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def set_conntrack_events(value: int = 1) -> int:
    """Write ``nf_conntrack_events`` of the current namespace; return the previous value.

    The default of 2 only reports entries created while a listener exists; 1 reports all, so
    that entries older than the daemon still send UPDATE and DESTROY.
    """
    try:
        with open(EVENTS_SYSCTL) as f:
            previous = int(f.read())
    except FileNotFoundError:
        # A ctnetlink request makes nfnetlink load nf_conntrack_netlink and so nf_conntrack.
        with contextlib.suppress(OSError):
            dump(None)
        try:
            with open(EVENTS_SYSCTL) as f:
                previous = int(f.read())
        except FileNotFoundError:
            raise ConntrackUnavailable(
                E.ENOENT, "nf_conntrack not loaded (modprobe nf_conntrack)", EVENTS_SYSCTL
            ) from None
    with open(EVENTS_SYSCTL, "w") as f:
        f.write(f"{value}\n")
    return previous


def dump(mark_bit: int | None = 30, *, family: int = ct.AF_UNSPEC, timeout_s: float = 10.0) -> list[Flow]:
    """All conntrack entries (IPv4 and IPv6 by default) carrying ``mark_bit`` (None: all).

    The mark filter runs in the kernel (CTA_MARK/CTA_MARK_MASK).
    """
    mask = 0 if mark_bit is None else 1 << mark_bit
    sock = _netlink_socket(16 << 20, 1 << 16, nonblocking=False)
    try:
        sock.settimeout(timeout_s)
        sock.send(ct.build_dump_request(1, family, mask, mask))
        buf = bytearray(256 * 1024)
        flows: list[Flow] = []
        while True:
            n = sock.recv_into(buf)
            chunk, done = ct.parse_dump(buf, n, mask)
            flows.extend(chunk)
            if done:
                return flows
    finally:
        sock.close()


class DumpReader:
    """A kernel dump read piece by piece, by blocking calls (run them off the event loop:
    the kernel walks its hash table inside them, ``invictusd.io.scan``).

    ``start`` sends the request; ``read()`` returns the next chunk of messages (the caller
    parses them and stops at NLMSG_DONE). A dump that is not read waits in the kernel: a
    slow consumer is flow control, not loss. A call that takes longer than ``timeout``
    raises ``TimeoutError``.
    """

    def __init__(self, rcvbuf: int = 4 << 20, timeout: float = 10.0) -> None:
        self._sock = _netlink_socket(rcvbuf, 1 << 16, nonblocking=False)
        self._sock.settimeout(timeout)
        self._buf = bytearray(256 * 1024)
        self._view = memoryview(self._buf)

    def start(self, mark: int = 0, mask: int = 0, family: int = ct.AF_UNSPEC) -> None:
        """Entries whose ``mark & mask == mark`` (all with mask 0), IPv4 and IPv6."""
        self._sock.send(ct.build_dump_request(1, family, mark, mask))

    def read(self) -> tuple[memoryview, int]:
        """The next chunk (valid until the next call)."""
        n = self._sock.recv_into(self._buf)
        return self._view, n

    def close(self) -> None:
        self._sock.close()


COMMIT_CHUNK = 8192


class CommitResult(NamedTuple):
    created: int
    updated: int
    failed: int
    errors: dict[int, int]  # errno -> count of final failures
    duration_s: float


class DeleteResult(NamedTuple):
    deleted: int
    failed: int
    errors: dict[int, int]  # errno -> count (ENOENT: already gone)
    duration_s: float


class Injector:
    """Persistent ctnetlink socket writing flows into the kernel table in large batches.

    Messages are prebuilt and sent many per ``send`` (up to ``batch_bytes``). Only the last
    message of a batch asks for an ack: the others are answered only when they fail (with
    their sequence number). Deletes follow that; creates and updates are answered one by one
    anyway on 6.18 (measured), so reading answers is part of the commit cost. Outcomes that
    cannot be known (answers lost to ENOBUFS, no barrier ack) count as failures.
    """

    def __init__(
        self,
        *,
        batch_bytes: int = 200_000,
        be_liberal: bool = True,
        default_timeout: int = ct.DEFAULT_TIMEOUT,
        ack_timeout_s: float = 5.0,
    ) -> None:
        self.batch_bytes = batch_bytes
        self.be_liberal = be_liberal
        self.default_timeout = default_timeout
        self.ack_timeout_s = ack_timeout_s
        # An ack skb costs ~1 KB of receive buffer; a batch of ~200 B messages is ~1000 acks.
        rcvbuf = max(8 << 20, batch_bytes * 16)
        self._sock = _netlink_socket(rcvbuf, max(4 << 20, batch_bytes * 4), nonblocking=True)
        # Error acks would otherwise echo the whole request back.
        with contextlib.suppress(OSError):
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self._buf = bytearray(1 << 20)
        self._seq = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        self._lost_errno = E.ETIMEDOUT
        self.overruns = 0  # answers lost to a full receive buffer (outcome unknown)

    @property
    def port_id(self) -> int:
        """Our netlink port id: the kernel names it as the cause of our own changes' events."""
        pid: int = self._sock.getsockname()[0]
        return pid

    def next_seqs(self, count: int) -> int:
        """Reserve ``count`` sequence numbers; the messages of a batch use base + index."""
        base = self._seq
        self._seq = (base + count) & 0xFFFFFFFF
        return base

    def run(self, msgs: Sequence[bytes], base: int) -> dict[int, int]:
        """Send prebuilt ``msgs`` (built without NLM_F_ACK, seq = base + index) in batches.

        Returns index -> errno for every message that did not succeed. Only failures are
        answered, plus the ack of each batch's last message (re-flagged with NLM_F_ACK):
        the kernel handles a batch in order, so that ack means the batch is done.
        """
        failures: dict[int, int] = {}
        send = self._sock.send
        limit = self.batch_bytes
        start = 0
        n = len(msgs)
        while start < n:
            size = 0
            end = start
            while end < n and (end == start or size + len(msgs[end]) <= limit):
                size += len(msgs[end])
                end += 1
            last = end - 1
            send(b"".join([*msgs[start:last], ct.with_ack(msgs[last])]))
            if not self._collect((base + last) & 0xFFFFFFFF, base, failures):
                # No barrier (timeout) or errors lost (ENOBUFS): outcome unknown.
                for i in range(start, end):
                    failures.setdefault(i, self._lost_errno)
            start = end
        return failures

    def _collect(self, barrier_seq: int, base: int, failures: dict[int, int]) -> bool:
        """Read answers until the barrier's; False if it never came or answers were lost."""
        deadline = 0.0
        recv_into = self._sock.recv_into
        parse_ack1 = ct.parse_ack1
        buf = self._buf
        while True:
            try:
                n = recv_into(buf)
            except BlockingIOError:
                # Not expected (the kernel processes a send synchronously); never hang.
                now = time.monotonic()
                if not deadline:
                    deadline = now + self.ack_timeout_s
                elif now >= deadline:
                    self._lost_errno = E.ETIMEDOUT
                    return False
                select.select([self._sock], [], [], deadline - now)
                continue
            except OSError as exc:
                if exc.errno != E.ENOBUFS:
                    raise
                self.overruns += 1
                self._lost_errno = E.ENOBUFS
                self._drain()
                return False
            one = parse_ack1(buf, n)
            for seq, err in (one,) if one is not None else ct.parse_acks(buf, n):
                if err:
                    failures[(seq - base) & 0xFFFFFFFF] = err
                if seq == barrier_seq:
                    return True

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                self._sock.recv_into(self._buf)

    def commit(self, flows: Iterable[Flow], chunk: int = COMMIT_CHUNK) -> CommitResult:
        """Create each flow; an entry that exists (EEXIST) is updated by original tuple.

        Works through ``chunk`` flows at a time so the prebuilt messages of a 100k-entry
        commit never all exist at once (about 17 MB that the process would keep).
        """
        t0 = time.perf_counter()
        flow_list = flows if isinstance(flows, list) else list(flows)
        created = updated = failed = 0
        errors: dict[int, int] = {}
        for i in range(0, len(flow_list), chunk):
            c, u, f, errs = self._commit_chunk(flow_list[i : i + chunk])
            created, updated, failed = created + c, updated + u, failed + f
            for k, v in errs.items():
                errors[k] = errors.get(k, 0) + v
        return CommitResult(created, updated, failed, errors, time.perf_counter() - t0)

    def _commit_chunk(self, flow_list: list[Flow]) -> tuple[int, int, int, dict[int, int]]:
        base = self.next_seqs(len(flow_list))
        build = ct.build_create
        liberal = self.be_liberal
        dflt = self.default_timeout
        msgs = [build(f, base + i, be_liberal=liberal, default_timeout=dflt, ack=False)
                for i, f in enumerate(flow_list)]
        results = self.run(msgs, base)
        created = 0
        failed = 0
        errors: dict[int, int] = {}
        retry: list[Flow] = []
        for i, f in enumerate(flow_list):
            err = results.get(i, 0)
            if err == 0:
                created += 1
            elif err == E.EEXIST:
                retry.append(f)
            else:
                failed += 1
                errors[err] = errors.get(err, 0) + 1
        updated = 0
        if retry:
            base = self.next_seqs(len(retry))
            msgs = [
                build(f, base + i, be_liberal=liberal, create=False, default_timeout=dflt, ack=False)
                for i, f in enumerate(retry)
            ]
            results = self.run(msgs, base)
            keep_status: list[Flow] = []
            for i, f in enumerate(retry):
                err = results.get(i, 0)
                if err == 0:
                    updated += 1
                elif err == E.EBUSY:
                    # The entry has SEEN_REPLY/ASSURED that our (older) state lacks; those
                    # bits can only be set, so update everything but the status.
                    keep_status.append(f)
                else:
                    failed += 1
                    errors[err] = errors.get(err, 0) + 1
            if keep_status:
                base = self.next_seqs(len(keep_status))
                msgs = [
                    build(
                        f, base + i, be_liberal=liberal, create=False,
                        default_timeout=dflt, with_status=False, ack=False,
                    )
                    for i, f in enumerate(keep_status)
                ]  # fmt: skip
                results = self.run(msgs, base)
                for i in range(len(keep_status)):
                    err = results.get(i, 0)
                    if err == 0:
                        updated += 1
                    else:
                        failed += 1
                        errors[err] = errors.get(err, 0) + 1
        return created, updated, failed, errors

    def delete(self, flows: Iterable[Flow | FlowKey]) -> DeleteResult:
        """Delete entries by original tuple (and zone)."""
        t0 = time.perf_counter()
        items = flows if isinstance(flows, list) else list(flows)
        base = self.next_seqs(len(items))
        msgs = [ct.build_delete(f, base + i, ack=False) for i, f in enumerate(items)]
        results = self.run(msgs, base)
        deleted = failed = 0
        errors: dict[int, int] = {}
        for i in range(len(items)):
            err = results.get(i, 0)
            if err == 0:
                deleted += 1
            else:
                failed += 1
                errors[err] = errors.get(err, 0) + 1
        return DeleteResult(deleted, failed, errors, time.perf_counter() - t0)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Injector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
