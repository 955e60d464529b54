"""Decisions of the replication engine that need no I/O, each testable with a scripted clock.

* ``Generations``: which resync generation the backup's kernel entries belong to, so that
  the end of a resync removes exactly the entries it did not refresh (lost deletes).
* ``PreemptionHold``: pfsync's lesson, when a returning node may take mastership back.
* ``Backoff``: retrying a failed kernel dump.
* ``handover_timeout``: the timeout an inherited entry gets when its node becomes master.
* ``ReplicaMarks``: the conntrack mark bits that say who owns an entry.
* ``Scope``: which entries are replicated at all (mark bit, zones, families), on both sides.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from invictusd import flows as F
from invictusd.sync import wire
from invictusd.sync.wire import Delete, Entry

# ---- marks ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaMarks:
    """Three bits of the conntrack mark.

    ``mark_bit``: the connection is replicated (the original tool's meaning; set by the mark
    rule). ``replica_bit``: this node holds the entry for the peer (only the master's entries
    are announced, and only replica entries are swept). ``generation_bit``: which resync last
    refreshed a replica entry.
    """

    mark_bit: int = 30
    replica_bit: int = 29
    generation_bit: int = 28

    @property
    def marked(self) -> int:
        return 1 << self.mark_bit

    @property
    def replica(self) -> int:
        return 1 << self.replica_bit

    @property
    def generation(self) -> int:
        return 1 << self.generation_bit

    @property
    def ours(self) -> int:
        """The bits of ours that never travel on the wire."""
        return self.replica | self.generation

    def replica_masks(self, parity: int) -> tuple[int, int]:
        """(and, or): a replica entry's mark in the backup's kernel is ``mark & and | or``."""
        return ~self.ours & 0xFFFFFFFF, self.marked | self.replica | (self.generation if parity else 0)

    def own_masks(self) -> tuple[int, int]:
        """(and, or): an entry's mark when it is ours (split brain, hand-over)."""
        return ~self.ours & 0xFFFFFFFF, self.marked

    def replica_mark(self, mark: int, parity: int) -> int:
        """The mark a replica entry gets in the backup's kernel."""
        m_and, m_or = self.replica_masks(parity)
        return mark & m_and | m_or

    def parity(self, mark: int) -> int:
        """The resync generation a replica entry's ``mark`` says it was last refreshed by."""
        return 1 if mark & self.generation else 0

    def own_mark(self, mark: int) -> int:
        m_and, m_or = self.own_masks()
        return mark & m_and | m_or

    def filter_replica(self, parity: int | None = None) -> tuple[int, int]:
        """(mark, mask) of a kernel dump filter: replica entries (of ``parity`` if given)."""
        if parity is None:
            return self.marked | self.replica, self.marked | self.replica
        mask = self.marked | self.replica | self.generation
        return self.marked | self.replica | (self.generation if parity else 0), mask

    def filter_own(self) -> tuple[int, int]:
        """(mark, mask): marked entries that are not replicas."""
        return self.marked, self.marked | self.replica

    def filter_marked(self) -> tuple[int, int]:
        return self.marked, self.marked


# ---- what is replicated --------------------------------------------------------------------


class Refusal(enum.Enum):
    """Why an entry is outside the replicated scope (a counter name of each side)."""

    MARK = "mark"  # its mark lacks the replication bit
    ZONE = "zone"  # a conntrack zone (either direction's) not in ``[sync] zones``
    FAMILY = "family"  # an address family not in ``[sync] families``


@dataclass(frozen=True, slots=True)
class Scope:
    """The entries replicated: the mark bit set, every zone in ``zones``, the family in
    ``families``. The master sends nothing outside it; the backup refuses what a peer sends
    outside it (a misconfigured or hostile master must not fill our kernel with entries
    of other zones or families, or with connections the administrator did not mark)."""

    mark_bit: int
    zones: frozenset[int]
    families: frozenset[int]

    def refusal(self, rec: Entry | Delete) -> Refusal | None:
        if rec.family not in self.families:
            return Refusal.FAMILY
        if rec.zone not in self.zones or (type(rec) is Entry and rec.rzone not in self.zones):
            return Refusal.ZONE
        if type(rec) is Entry and not rec.mark >> self.mark_bit & 1:
            return Refusal.MARK
        return None

    def select(self, records: list[bytes], keys: list[bytes]) -> tuple[list[bytes], list[bytes], int]:
        """Encoded entry/delete records (and their keys) inside the scope, and how many were
        not. The flag nibble decides without decoding unless a record carries zones; the
        mark bit needs no check here (the transcoder only passes marked entries)."""
        verdict = self._verdicts()
        if all(verdict[r[0] & 0xF] is True for r in records):
            return records, keys, 0
        out_r: list[bytes] = []
        out_k: list[bytes] = []
        for r, k in zip(records, keys, strict=True):
            v = verdict[r[0] & 0xF]
            if v is None:
                (rec,) = wire.decode_records(r)
                v = isinstance(rec, Entry | Delete) and self.refusal(rec) is None
            if v:
                out_r.append(r)
                out_k.append(k)
        return out_r, out_k, len(records) - len(out_r)

    def _verdicts(self) -> tuple[bool | None, ...]:
        """Per flag nibble: in scope (True), out (False), or decode to tell (None: zones)."""
        return tuple(
            False if (6 if fl & wire.RF_V6 else 4) not in self.families
            else None if fl & wire.RF_ZONE
            else 0 in self.zones
            for fl in range(16))


# ---- resync generations on the receiver -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Remark:
    """Before a new resync: entries of an unfinished one go back to the completed parity."""

    from_parity: int
    to_parity: int


@dataclass(frozen=True, slots=True)
class Sweep:
    """After a resync: remove replica entries of this parity (not refreshed by it)."""

    parity: int


@dataclass(slots=True)
class Generations:
    """Invariant at every RESYNC_BEGIN: all replica entries have parity ``done``.

    BEGIN: injections use the other parity (``current``); END: what still has ``done`` was
    not refreshed and is swept, and ``current`` becomes ``done``. A resync that never ended
    leaves both parities behind; the next BEGIN first re-marks them (``Remark``), so one
    parity bit stays exact whatever the interruptions. At start the parities of entries left
    by a previous run are unknown: the state begins as if a resync were unfinished, until a
    count of the kernel's replica entries (``counted``) says which parities are there.

    ``held`` is the parities replica entries may have in the kernel (a superset: a parity
    leaves it only when the kernel was read or swept). A re-mark or a sweep of a parity no
    entry has is skipped: each is a dump of the whole replicated table, seconds at a million
    entries (a node that was master holds none, however large its table).
    """

    done: int = 0
    current: int = 1
    active: bool = True  # a resync begun and not ended (or unknown state at start)
    begun: bool = False  # a BEGIN has been seen (an END closes only a resync it saw begin)
    held: set[int] = field(default_factory=lambda: {0, 1})

    def begin(self) -> list[Remark]:
        other = 1 - self.done
        steps = [Remark(other, self.done)] if other in self.held else []
        if steps:
            self.held.add(self.done)
        self.current = other
        self.active = self.begun = True
        return steps

    def end(self) -> Sweep | None:
        if not self.active or not self.begun:
            return None
        old = self.done
        self.done = self.current
        self.active = False
        return Sweep(old) if old in self.held else None

    @property
    def parity(self) -> int:
        """The parity of what is injected now."""
        return self.current

    def injected(self) -> None:
        """Replica entries were written (created or refreshed) with ``parity``."""
        self.held.add(self.current)

    def remarked(self, step: Remark) -> None:
        """A re-mark read the whole replica table: none of ``from_parity`` is left, except
        what this resync has injected since (``injected`` adds it back)."""
        self.held.discard(step.from_parity)

    def swept(self, step: Sweep) -> None:
        self.held.discard(step.parity)

    def counted(self, parities: set[int]) -> None:
        """The kernel's replica entries, read while nothing was injected, have ``parities``.
        Before any BEGIN that settles what a previous run left: one parity (or none) means
        no resync was left unfinished, and it becomes the completed one."""
        self.held = set(parities)
        if self.begun:
            return
        if len(parities) < 2:
            self.done = self.current = next(iter(parities), self.done)
            self.active = False

    def emptied(self) -> None:
        """No replica entry is left (a hand-over made them all ours, nothing injected since)."""
        self.held.clear()
        self.current = self.done
        self.active = False


# ---- preemption hold --------------------------------------------------------------------


class HoldWhy(enum.Enum):
    NONE = ""
    LINK_DOWN = "the sync link is down"
    NO_TABLE = "waiting for the peer's connection table"


@dataclass(frozen=True, slots=True)
class HoldDecision:
    demoted: bool
    reason: str
    warn: bool  # log a warning now (at most every ``warn_every`` while holding)
    expired: bool  # hold_max has just run out


@dataclass(slots=True)
class PreemptionHold:
    """A node that is not master does not preempt while the sync link is down or until the
    peer's bulk table is complete, however long that takes, unless ``hold_max`` (> 0)
    bounds it. Taking over from a dead master is never held (that is Master_Down's job)."""

    hold_max: float = 0.0
    warn_every: float = 10.0
    since: float | None = None
    _warned: float | None = None
    _expired: bool = False

    def update(self, now: float, link_up: bool, synced: bool, interface: str = "") -> HoldDecision:
        why = HoldWhy.LINK_DOWN if not link_up else HoldWhy.NO_TABLE if not synced else HoldWhy.NONE
        if why is HoldWhy.NONE:
            self.since = self._warned = None
            self._expired = False
            return HoldDecision(False, "", False, False)
        if self.since is None:
            self.since = now
        reason = why.value
        if interface and why is HoldWhy.LINK_DOWN:
            reason = f"sync link {interface} is down"
        if self.hold_max and now - self.since >= self.hold_max:
            expired = not self._expired
            self._expired = True
            return HoldDecision(False, "", False, expired)
        warn = (self._warned is None and now - self.since >= self.warn_every) or (
            self._warned is not None and now - self._warned >= self.warn_every)
        if warn:
            self._warned = now
        return HoldDecision(True, reason, warn, False)

    def held_for(self, now: float) -> float | None:
        return None if self.since is None else now - self.since


# ---- retrying failed kernel reads -------------------------------------------------------


@dataclass(slots=True)
class Backoff:
    first: float = 1.0
    limit: float = 30.0
    _next: float = 0.0
    failures: int = 0

    def failed(self, now: float) -> float:
        """A failure: returns when to try again."""
        self.failures += 1
        delay = self._next or self.first
        self._next = min(delay * 2, self.limit)
        return now + delay

    def succeeded(self) -> None:
        self._next = 0.0


# ---- timeouts ---------------------------------------------------------------------------

# sysctl names under /proc/sys/net/netfilter by TCP state.
TCP_TIMEOUT_SYSCTLS = {
    F.TCP_SYN_SENT: "nf_conntrack_tcp_timeout_syn_sent",
    F.TCP_SYN_RECV: "nf_conntrack_tcp_timeout_syn_recv",
    F.TCP_ESTABLISHED: "nf_conntrack_tcp_timeout_established",
    F.TCP_FIN_WAIT: "nf_conntrack_tcp_timeout_fin_wait",
    F.TCP_CLOSE_WAIT: "nf_conntrack_tcp_timeout_close_wait",
    F.TCP_LAST_ACK: "nf_conntrack_tcp_timeout_last_ack",
    F.TCP_TIME_WAIT: "nf_conntrack_tcp_timeout_time_wait",
    F.TCP_CLOSE: "nf_conntrack_tcp_timeout_close",
    F.TCP_SYN_SENT2: "nf_conntrack_tcp_timeout_syn_sent",
}
OTHER_TIMEOUT_SYSCTLS = ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream",
                         "nf_conntrack_icmp_timeout", "nf_conntrack_icmpv6_timeout",
                         "nf_conntrack_generic_timeout")
# Kernel defaults (6.x), used where a sysctl cannot be read.
DEFAULT_TIMEOUTS = {
    "nf_conntrack_tcp_timeout_syn_sent": 120, "nf_conntrack_tcp_timeout_syn_recv": 60,
    "nf_conntrack_tcp_timeout_established": 432000, "nf_conntrack_tcp_timeout_fin_wait": 120,
    "nf_conntrack_tcp_timeout_close_wait": 60, "nf_conntrack_tcp_timeout_last_ack": 30,
    "nf_conntrack_tcp_timeout_time_wait": 120, "nf_conntrack_tcp_timeout_close": 10,
    "nf_conntrack_udp_timeout": 30, "nf_conntrack_udp_timeout_stream": 120,
    "nf_conntrack_icmp_timeout": 30, "nf_conntrack_icmpv6_timeout": 30,
    "nf_conntrack_generic_timeout": 600,
}


def handover_timeout(proto: int, tcp_state: int, status: int, table: Mapping[str, int]) -> int:
    """What the kernel would have given the entry at its last packet: a live connection's
    next packet resets it anyway, a dead one expires as it would have on the old master.

    The replica timeout (days) only ever applies while the entry is held for the peer."""
    def get(name: str) -> int:
        return int(table.get(name, DEFAULT_TIMEOUTS[name]))

    if proto == F.IPPROTO_TCP:
        name = TCP_TIMEOUT_SYSCTLS.get(tcp_state)
        return get(name) if name else get("nf_conntrack_tcp_timeout_established")
    if proto == F.IPPROTO_UDP:
        assured = status & F.IPS_ASSURED
        return get("nf_conntrack_udp_timeout_stream" if assured else "nf_conntrack_udp_timeout")
    if proto == F.IPPROTO_ICMP:
        return get("nf_conntrack_icmp_timeout")
    if proto == F.IPPROTO_ICMPV6:
        return get("nf_conntrack_icmpv6_timeout")
    return get("nf_conntrack_generic_timeout")
