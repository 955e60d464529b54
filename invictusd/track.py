"""Health checks of the node (``[[track]]``), sans-IO.

A ``Tracker`` turns the results of each check (a command's exit status, an interface's
carrier and admin state) into an up/down state with keepalived's rise/fall hysteresis, and
the states of all checks into one ``Verdict``: the checks that fault the group and the sum
of the integer weights of the checks that are down. The daemon hands that verdict to the
VRRP machine as a ``TrackChanged`` input.

Like the machines, the tracker never reads a clock, sleeps or runs anything: it takes
``now``, says which command checks are due (``due``) and when the next one will be
(``next_deadline``); the adapter (``invictusd.io.checks``) runs them and reports back with
``result``.

The first result of a check decides its state at once (there is no history to smooth);
after that ``fall`` consecutive failures take an up check down and ``rise`` consecutive
successes bring a down check back up.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

# The weight that takes the group out of mastership while the check is down.
FAULT = "fault"

MIN_WEIGHT, MAX_WEIGHT = -254, 254
# An advertised priority stays in 1..254 whatever the weights (0 means "leaving", 255 "owner").
MIN_PRIORITY, MAX_PRIORITY = 1, 254


class CheckKind(enum.StrEnum):
    COMMAND = "command"
    INTERFACE = "interface"


class CheckState(enum.StrEnum):
    UNKNOWN = "unknown"  # no result yet
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class CheckSpec:
    name: str
    kind: CheckKind
    weight: int | None  # None: "fault"
    interval: float = 0.0  # command checks only: seconds between the starts of two runs
    fall: int = 1
    rise: int = 1

    def __post_init__(self) -> None:
        if self.weight is not None and not MIN_WEIGHT <= self.weight <= MAX_WEIGHT:
            raise ValueError(f"check {self.name!r}: weight {self.weight} is out of range "
                             f"{MIN_WEIGHT}..{MAX_WEIGHT}")
        if self.fall < 1 or self.rise < 1:
            raise ValueError(f"check {self.name!r}: fall and rise must be at least 1")
        if self.kind is CheckKind.COMMAND and self.interval <= 0:
            raise ValueError(f"check {self.name!r}: a command check needs an interval")

    @property
    def weight_text(self) -> str:
        return FAULT if self.weight is None else f"{self.weight:+d}"


@dataclass(frozen=True, slots=True)
class Result:
    """One run of a check, as the adapter saw it."""

    ok: bool
    detail: str = ""  # "exit 1", "timed out after 1.0s", "carrier down", ...
    output: str = ""  # the last line the command printed (bounded by the adapter)
    duration: float = 0.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the checks mean for the group."""

    faults: tuple[str, ...] = ()  # checks with weight "fault" that are down
    delta: int = 0  # sum of the weights of the down checks with an integer weight
    down: tuple[str, ...] = ()  # every down check, fault or weighted


@dataclass(frozen=True, slots=True)
class Change:
    """A check changed state; ``verdict`` is the group's verdict after it."""

    name: str
    old: CheckState
    new: CheckState
    result: Result
    verdict: Verdict

    @property
    def reason(self) -> str:
        why = f": {self.result.detail}" if self.result.detail else ""
        return f"track {self.name!r} {self.new.value}{why}"


@dataclass(slots=True)
class CheckView:
    """Runtime data of one check (read by status; mutated only by the tracker)."""

    state: CheckState = CheckState.UNKNOWN
    since: float | None = None
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive
    runs: int = 0
    failed_runs: int = 0
    last: Result | None = None
    last_at: float | None = None
    due_at: float | None = None
    running: bool = False


def bounded_priority(base: int, delta: int) -> int:
    """The priority to advertise: ``base`` plus the weights, kept in 1..254.

    An address owner (255) is always 255: it owns the address whatever its health.
    """
    if base == 255:
        return base
    return max(MIN_PRIORITY, min(MAX_PRIORITY, base + delta))


@dataclass(slots=True)
class Tracker:
    specs: tuple[CheckSpec, ...]
    views: list[CheckView] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"check names must be unique: {names}")
        self.views = [CheckView() for _ in self.specs]

    def index(self, name: str) -> int:
        for i, s in enumerate(self.specs):
            if s.name == name:
                return i
        raise KeyError(name)

    # ---- scheduling of command checks --------------------------------------------------

    def start(self, now: float) -> None:
        """Every command check is due at once."""
        for s, v in zip(self.specs, self.views, strict=True):
            if s.kind is CheckKind.COMMAND:
                v.due_at = now

    def due(self, now: float) -> list[int]:
        """Command checks to run now; each is marked running until its ``result``."""
        out = []
        for i, v in enumerate(self.views):
            if v.due_at is not None and v.due_at <= now and not v.running:
                v.running = True
                out.append(i)
        return out

    def next_deadline(self) -> float | None:
        times = [v.due_at for v in self.views if v.due_at is not None and not v.running]
        return min(times) if times else None

    # ---- results -----------------------------------------------------------------------

    def result(self, index: int, result: Result, now: float) -> Change | None:
        """Record one result; returns the change of state it caused, if any."""
        spec, v = self.specs[index], self.views[index]
        v.runs += 1
        v.last, v.last_at = result, now
        if spec.kind is CheckKind.COMMAND and v.running:
            v.running = False
            started = now - result.duration
            # The cadence is start to start; a run that overran its slot is followed at once.
            v.due_at = max(started + spec.interval, now)
        if result.ok:
            v.successes += 1
            v.failures = 0
        else:
            v.failed_runs += 1
            v.failures += 1
            v.successes = 0
        old = v.state
        if old is CheckState.UNKNOWN:
            new = CheckState.UP if result.ok else CheckState.DOWN
        elif old is CheckState.UP and v.failures >= spec.fall:
            new = CheckState.DOWN
        elif old is CheckState.DOWN and v.successes >= spec.rise:
            new = CheckState.UP
        else:
            return None
        v.state, v.since = new, now
        return Change(spec.name, old, new, result, self.verdict())

    def verdict(self) -> Verdict:
        faults: list[str] = []
        down: list[str] = []
        delta = 0
        for s, v in zip(self.specs, self.views, strict=True):
            if v.state is not CheckState.DOWN:
                continue
            down.append(s.name)
            if s.weight is None:
                faults.append(s.name)
            else:
                delta += s.weight
        return Verdict(tuple(faults), delta, tuple(down))

    def settled(self) -> bool:
        """Every check has had a first result."""
        return all(v.state is not CheckState.UNKNOWN for v in self.views)

    def status(self, now: float) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for s, v in zip(self.specs, self.views, strict=True):
            last = v.last
            out.append({
                "name": s.name,
                "kind": s.kind.value,
                "weight": s.weight_text,
                "state": v.state.value,
                "since": None if v.since is None else round(now - v.since, 3),
                "last_result": None if last is None else ("ok" if last.ok else "fail"),
                "last_detail": None if last is None else last.detail,
                "last_output": None if last is None else last.output,
                "last_duration_ms": None if last is None else round(last.duration * 1000, 1),
                "runs": v.runs,
                "failed_runs": v.failed_runs,
                "consecutive_failures": v.failures,
                "consecutive_successes": v.successes,
            })
        return out


def specs_summary(specs: Sequence[CheckSpec]) -> str:
    return ", ".join(f"{s.name} ({s.kind.value}, weight {s.weight_text})" for s in specs)
