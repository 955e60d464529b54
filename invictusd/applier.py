"""The peer's records into our kernel, in stream order: the replica lives in the kernel.

Each in-order datagram (a ``Delivery`` of the receiver) is turned into ctnetlink messages
(one template per record kind, ``invictusd.io.transcode``) and injected in batches. While
this node is backup, entries are injected as *replicas*: the replica mark bit (never
announced, only swept), the current resync generation, and a long timeout, so that only the
master's DELETE removes them (traffic refreshes a live entry on the master without an event).
While this node is master (a split brain), the peer's entries are injected as its own.

Stream control records need the kernel table as a whole: RESYNC_BEGIN may first re-mark an
unfinished resync's entries, RESYNC_END sweeps the replica entries the resync did not
refresh (deletes lost anywhere, an overrun on the master, a gap), DIGEST compares our
replica with the master's table. Those are dumps; while one runs, later deliveries wait
(the receiver holds the peer's window meanwhile), so the order of the stream is kept.
"""

from __future__ import annotations

import asyncio
import errno as E
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from invictusd.io.conntrack import Injector
from invictusd.io.scan import Scan
from invictusd.io.transcode import (
    KIND_CREATE,
    KIND_DELETE,
    KIND_UPDATE,
    Batch,
    Built,
    EventTranscoder,
    Injection,
    build_entry,
    build_entry_delete,
    build_records,
)
from invictusd.sync import wire
from invictusd.sync.policy import Generations, Refusal, Remark, ReplicaMarks, Scope, Sweep
from invictusd.sync.receiver import Delivery
from invictusd.sync.session import SyncSession
from invictusd.sync.wire import Delete, Digest, Entry, RequestReason, ResyncBegin, ResyncEnd

BATCH = 512  # requests per injection batch (across deliveries)
# The first batch of a resync is small: its answers teach whether UPSERTs find the entries
# (update first) or not (create first: a bulk into a rebooted peer's empty table), and a
# wrong guess costs every request of that batch a second send. Batches then double.
PROBE_BATCH = 32
# Sequence numbers reserved past BATCH: a delivery's requests are added whole, one request
# per record of at least 14 bytes (a DELETE) in a datagram of at most 64 KiB.
SEQ_SLACK = (1 << 16) // 14 + 1
DELIVERIES_PER_RUN = 64


@dataclass(slots=True)
class _Pending:
    """Requests built and not yet injected: per request, the payload and offset of its
    record and how it was sent (``transcode.KIND_*``); seq = ``base`` + index."""

    msgs: list[bytes] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    kinds: bytearray = field(default_factory=bytearray)
    creates: int = 0
    base: int = 0
    master: bool = False

    def add(self, payload: bytes, built: Built) -> None:
        self.msgs += built.msgs
        self.payloads += [payload] * len(built.msgs)
        self.offsets += built.offsets
        self.kinds += built.kinds
        self.creates += len(built.kinds) - built.kinds.count(KIND_DELETE) - built.kinds.count(KIND_UPDATE)

    def record(self, i: int) -> Entry:
        rec = wire.decode_record_at(self.payloads[i], self.offsets[i])[0]
        assert isinstance(rec, Entry)
        return rec

    def last_of_each_entry(self) -> dict[bytes, int]:
        """Entry (``wire.record_ident``) -> the index of the last request naming it."""
        ident = wire.record_ident
        return {ident(p, o): i for i, (p, o) in enumerate(zip(self.payloads, self.offsets, strict=True))}


@dataclass(slots=True)
class ApplyCounters:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    delete_missing: int = 0  # already gone (normal after a sweep or an expiry)
    failures: Counter[int] = field(default_factory=Counter)  # errno -> count
    over_capacity: int = 0
    retried: int = 0  # messages sent a second time (create <-> update, or without status)
    refused: Counter[Refusal] = field(default_factory=Counter)  # outside our scope
    resyncs_applied: int = 0
    swept: int = 0
    remarked: int = 0
    sweep_scans: int = 0  # dumps of the replica table (skipped when no entry can be stale)
    remark_scans: int = 0
    digests_matched: int = 0
    digests_mismatched: int = 0
    last_sweep_seconds: float = 0.0


class Applier:
    def __init__(
        self,
        session: SyncSession,
        injector: Injector,
        marks: ReplicaMarks,
        scope: Scope,
        transcoder: EventTranscoder,
        *,
        replica_timeout: int,
        capacity: int,
        master: Callable[[], bool],
        progress: Callable[[], None],
        log: Any,
        timed: Callable[[Callable[..., Any], str], Callable[..., Any]] = lambda fn, what: fn,
    ) -> None:
        self.session = session
        self.injector = injector
        self.marks = marks
        self.scope = scope
        self.transcoder = transcoder  # reads replica entries (no replica filter)
        self.replica_timeout = replica_timeout
        self.capacity = capacity
        self.master = master
        self.progress = progress  # the engine sends what applying made due (acks)
        self.log = log
        self._run_later = timed(self._run_and_report, "sync: apply")
        self.gens = Generations()
        self.counters = ApplyCounters()
        self.replica_entries = 0  # replicas in our kernel, as far as we know (see count())
        self._queue: deque[Delivery] = deque()
        self._current: tuple[Delivery, int] | None = None  # a delivery a scan interrupted
        self._blocking: Scan | None = None
        self._resync_clean = True  # nothing refused since the last RESYNC_BEGIN
        # What an UPSERT (an entry the peer may or may not hold) tries first. Update suits a
        # resync of a table we hold; create suits a bulk into an empty one (a rebooted peer),
        # where every update would fail and be sent again. Learnt from each batch's answers.
        self._create_first = False
        self._pending = _Pending()
        self._limit = PROBE_BATCH  # the current batch size (see PROBE_BATCH)

    # ---- the pipeline ------------------------------------------------------------------------

    def feed(self, deliveries: list[Delivery]) -> None:
        """Queue deliveries (each only its bytes: ``Delivery``)."""
        self._queue.extend(deliveries)

    @property
    def busy(self) -> bool:
        return self._blocking is not None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def run(self) -> None:
        """Apply queued deliveries until none is left or a kernel scan must run first.

        Requests are built from the records' bytes (``transcode.build_records``) and
        injected ``BATCH`` at a time across deliveries; a delivery counts as applied once its
        requests are in (the stream-control records flush first: their scans see every
        record before them in the kernel)."""
        loop = asyncio.get_running_loop()
        done: int | None = None
        for _ in range(DELIVERIES_PER_RUN):
            if self._blocking is not None:
                break
            if self._current is None:
                if not self._queue:
                    break
                self._current = (self._queue.popleft(), 0)
            d, pos = self._current
            pos = self._process(d, pos)
            if self._blocking is not None:
                self._current = (d, pos)  # the rest of it runs when the scan is done
                break
            self._current = None
            done = d.seq
        self._flush()
        if done is not None:
            self.session.applied(done, loop.time())
        if self._queue and self._blocking is None:
            loop.call_soon(self._run_later)  # more next turn: the loop stays responsive

    def _run_and_report(self) -> None:
        self.run()
        self.progress()

    def reset(self) -> None:
        """A new peer epoch: what was queued from the old stream is superseded."""
        self._queue.clear()
        if self._blocking is None:
            self._current = None

    def cancel(self) -> None:
        if self._blocking is not None:
            self._blocking.cancel()
            self._blocking = None
        self._queue.clear()
        self._current = None
        self._pending = _Pending()

    # ---- records -------------------------------------------------------------------------

    def _injection(self, master: bool) -> Injection:
        marks = self.marks
        if master:
            mark_and, mark_or = marks.own_masks()
            timeout, room = 0, None
        else:
            mark_and, mark_or = marks.replica_masks(self.gens.parity)
            timeout = self.replica_timeout
            room = self.capacity - self.replica_entries - self._pending.creates
        return Injection(mark_and, mark_or, timeout, room, self._create_first, self.scope)

    def _process(self, d: Delivery, pos: int) -> int:
        """Build ``d``'s records from byte ``pos`` into the pending batch, running the
        stream-control records on the way; returns where it stopped (a scan started)."""
        payload = d.payload
        while True:
            p = self._pending
            if not p.msgs:
                p.master = self.master()
                p.base = self.injector.next_seqs(BATCH + SEQ_SLACK)
            built = build_records(payload, pos, p.base + len(p.msgs), self._injection(p.master))
            if built.over_capacity:
                self.counters.over_capacity += built.over_capacity
                self._resync_clean = False
            for off in built.refused:
                refused = wire.decode_record_at(payload, off)[0]
                assert isinstance(refused, Entry | Delete)
                self._refuse(refused)
            if built.msgs:
                p.add(payload, built)
                if len(p.msgs) >= self._limit:
                    self._flush()
            pos = built.end
            control = built.control
            if control is None:
                return pos
            self._flush()
            if isinstance(control, ResyncBegin):
                self._begin()
            elif isinstance(control, ResyncEnd):
                self._end()
            elif isinstance(control, Digest):
                self._check_digest(control)
            if self._blocking is not None:
                return pos

    def _refuse(self, rec: Entry | Delete) -> None:
        """An entry outside what we replicate: never into our kernel. Logged at the first
        of each kind and every 10 000th after it (a peer configured otherwise sends many)."""
        why = self.scope.refusal(rec)
        assert why is not None
        refused = self.counters.refused
        refused[why] += 1
        if refused[why] % 10_000 == 1:
            self.log.warning("peer sent an entry outside what we replicate; refused",
                             reason=why.value, refused=refused[why], family=rec.family,
                             proto=rec.proto, zone=rec.zone,
                             hint="compare [sync] mark_bit, zones and families on both nodes")

    def _flush(self) -> None:
        """Inject the pending batch and account for every answer."""
        p = self._pending
        if not p.msgs:
            return
        self._pending = _Pending()
        self._limit = min(BATCH, 2 * self._limit)
        if not p.master:
            self.gens.injected()
        failures = self.injector.run(p.msgs, p.base)
        c = self.counters
        kinds = p.kinds
        if not failures:  # the common case: count by kind
            deleted = kinds.count(KIND_DELETE)
            updated = kinds.count(KIND_UPDATE)
            created = len(kinds) - deleted - updated
            c.deleted += deleted
            c.updated += updated
            c.created += created
            if not p.master:
                self.replica_entries += created - deleted
            return
        self._account(p, failures)

    def _account(self, p: _Pending, failures: dict[int, int]) -> None:
        c = self.counters
        master = p.master
        retry: list[tuple[Entry, int]] = []
        last: dict[bytes, int] | None = None  # entry -> its last index in the batch, if needed
        # UPSERTs sent as update / as create, and how many of each found the kernel otherwise.
        updates = creates_sent = missing = existing = 0
        for i, kind in enumerate(p.kinds):
            err = failures.get(i, 0)
            if kind == KIND_DELETE:
                if err == 0:
                    c.deleted += 1
                    if not master:
                        self.replica_entries -= 1
                elif err == E.ENOENT:
                    c.delete_missing += 1
                else:
                    self._failed(err)
                continue
            if kind == KIND_CREATE:
                creates_sent += 1
                existing += err == E.EEXIST
            elif kind == KIND_UPDATE:
                updates += 1
                missing += err == E.ENOENT
            if err == 0:
                if kind == KIND_UPDATE:
                    c.updated += 1
                else:
                    c.created += 1
                    if not master:
                        self.replica_entries += 1
            elif err in (E.EEXIST, E.ENOENT, E.EBUSY):
                # Not if a later record of the batch names the same entry: a retry would
                # apply an older state after a newer one.
                if last is None:
                    last = p.last_of_each_entry()
                if last[wire.record_ident(p.payloads[i], p.offsets[i])] == i:
                    retry.append((p.record(i), err))
            else:
                self._failed(err)
        if 2 * missing > updates > 0:
            self._create_first = True
        elif 2 * existing > creates_sent > 0:
            self._create_first = False
        if retry:
            self._retry(retry, master)

    def _retry(self, retry: list[tuple[Entry, int]], master: bool) -> None:
        """A create that found the entry becomes an update, an update that did not becomes a
        create, and an update refused for a status bit the entry has gets no status."""
        parity = self.gens.parity
        if not master:
            # An update that found nothing becomes a create: the replica's cap holds here too.
            room = self.capacity - self.replica_entries
            kept = []
            for item in retry:
                if item[1] == E.ENOENT:
                    if room <= 0:
                        self.counters.over_capacity += 1
                        self._resync_clean = False
                        continue
                    room -= 1
                kept.append(item)
            retry = kept
            if not retry:
                return
            self.gens.injected()
        base = self.injector.next_seqs(len(retry))
        msgs = []
        for j, (rec, err) in enumerate(retry):
            if master:
                mark, timeout = self.marks.own_mark(rec.mark), rec.timeout
            else:
                mark, timeout = self.marks.replica_mark(rec.mark, parity), self.replica_timeout
            msgs.append(build_entry(rec, base + j, create=err == E.ENOENT, mark=mark, timeout=timeout,
                                    with_status=err != E.EBUSY))
        self.counters.retried += len(msgs)
        failures = self.injector.run(msgs, base)
        again: list[tuple[Entry, int]] = []
        for j, (rec, err) in enumerate(retry):
            f = failures.get(j, 0)
            if f == 0:
                if err == E.ENOENT:
                    self.counters.created += 1
                    if not master:
                        self.replica_entries += 1
                else:
                    self.counters.updated += 1
            elif f == E.EBUSY and err == E.EEXIST:
                again.append((rec, E.EBUSY))
            else:
                self._failed(f)
        if again:
            self._retry(again, master)

    def _failed(self, err: int) -> None:
        self.counters.failures[err] += 1
        self._resync_clean = False

    # ---- stream control ----------------------------------------------------------------------

    def _begin(self) -> None:
        self._limit = PROBE_BATCH
        steps = self.gens.begin()
        self._resync_clean = True
        self.session.receiver.resync_begun(asyncio.get_running_loop().time())
        for step in steps:
            self._remark(step)

    def _end(self) -> None:
        sweep = self.gens.end()
        if sweep is None:
            self._completed()
        else:
            self._sweep(sweep)

    def _completed(self) -> None:
        self.counters.resyncs_applied += 1
        complete = self._resync_clean
        self.session.receiver.resync_completed(asyncio.get_running_loop().time(), complete)
        if not complete:
            self.log.warning("sync: resync applied with entries missing",
                             over_capacity=self.counters.over_capacity,
                             failures={str(k): v for k, v in self.counters.failures.items()})

    def _scan(self, name: str, filt: tuple[int, int], on_batch: Callable[[Batch], None],
              done: Callable[[Scan], None]) -> None:
        def finished(scan: Scan) -> None:
            self._blocking = None
            done(scan)
            self._resume()

        def failed(scan: Scan, e: BaseException) -> None:
            # The stream goes on; what this scan was for is incomplete: ask for a resync.
            self._blocking = None
            self.log.error("sync: kernel dump failed", job=name, error=repr(e))
            self._resync_clean = False
            self.session.divergence(RequestReason.APPLY_FAILED, asyncio.get_running_loop().time())
            self._resume()

        # The kernel is asked for every replicated entry (a dense dump: see io/scan.py), the
        # narrower choice ``filt`` made while reading.
        scan = Scan(name, *self.marks.filter_marked(), self.transcoder, on_batch, finished, failed,
                    select=filt)
        self._blocking = scan
        scan.start()

    def _resume(self) -> None:
        self.run()
        self.progress()

    def _entries(self, batch: Batch) -> list[Entry]:
        """Decode a scan batch's records (our own encoding: they are valid)."""
        data = b"".join(batch.records)
        return [r for r in wire.decode_records(data) if isinstance(r, Entry)]

    def _remark(self, step: Remark) -> None:
        to = step.to_parity
        self.counters.remark_scans += 1

        # Our own kernel's replica entries (no scope to check), in the update form, no status.
        how = Injection(*self.marks.replica_masks(to), self.replica_timeout, None, False, None,
                        with_status=False)

        def on_batch(batch: Batch) -> None:
            base = self.injector.next_seqs(len(batch.records))
            msgs = build_records(b"".join(batch.records), 0, base, how).msgs
            failures = self.injector.run(msgs, base) if msgs else {}
            self.counters.remarked += len(msgs) - len(failures)

        def done(scan: Scan) -> None:
            self.gens.remarked(step)

        self._scan("remark", self.marks.filter_replica(step.from_parity), on_batch, done)

    def _sweep(self, step: Sweep) -> None:
        t0 = time.perf_counter()
        self.counters.sweep_scans += 1

        def on_batch(batch: Batch) -> None:
            entries = self._entries(batch)
            base = self.injector.next_seqs(len(entries))
            msgs = [build_entry_delete(Delete(e.family, e.proto, e.src, e.dst, e.sport, e.dport, e.zone),
                                       base + i) for i, e in enumerate(entries)]
            failures = self.injector.run(msgs, base) if msgs else {}
            gone = len(msgs) - len(failures)
            self.counters.swept += gone
            self.replica_entries -= gone

        def done(scan: Scan) -> None:
            self.counters.last_sweep_seconds = round(time.perf_counter() - t0, 3)
            self.gens.swept(step)
            self._completed()

        self._scan("sweep", self.marks.filter_replica(step.parity), on_batch, done)

    def _check_digest(self, rec: Digest) -> None:
        """Our replica's count and XOR of key hashes, taken at this point of the stream."""
        acc = [0, 0]
        parities: set[int] = set()
        parity = self.marks.parity

        def on_batch(batch: Batch) -> None:
            for e in self._entries(batch):
                acc[0] += 1
                acc[1] ^= wire.key_hash(e.family, e.proto, e.src, e.dst, e.sport, e.dport, e.zone)
                parities.add(parity(e.mark))

        def done(scan: Scan) -> None:
            self.replica_entries = acc[0]  # the kernel's count is the truth
            self.gens.counted(parities)
            if (acc[0], acc[1]) == (rec.entries, rec.digest):
                self.counters.digests_matched += 1
            else:
                self.counters.digests_mismatched += 1
                self.log.warning("sync: digest mismatch: resync requested", here=acc[0],
                                 on_the_peer=rec.entries)
                self.session.receiver.digest_mismatch(asyncio.get_running_loop().time())

        self._scan("digest", self.marks.filter_replica(), on_batch, done)

    def count(self) -> None:
        """Count our replica entries and their parities (at start: what a previous run left
        in the kernel; none after a reboot, and then no resync re-marks or sweeps)."""
        acc = [0]
        parities: set[int] = set()
        parity = self.marks.parity

        def on_batch(batch: Batch) -> None:
            acc[0] += len(batch.records)
            if len(parities) < 2:
                for rec in batch.records:
                    mark = wire.entry_mark(rec)
                    if mark is not None:
                        parities.add(parity(mark))

        def done(scan: Scan) -> None:
            self.replica_entries = acc[0]
            self.gens.counted(parities)

        self._scan("count", self.marks.filter_replica(), on_batch, done)

    def handed_over(self, complete: bool) -> None:
        """This node, master, made every replica entry of its kernel its own (a hand-over;
        ``complete``: none refused). Only a backup creates replica entries, so none is left."""
        self.replica_entries = 0
        if complete:
            self.gens.emptied()
