"""Where the daemon's Python heap grows: tracemalloc on demand, a bounded diagnostic.

``INVICTUSD_TRACEMALLOC=N`` in the daemon's environment starts tracemalloc at start-up,
keeping N frames per allocation (1 names the line and costs least; unset or 0: off). The
control command ``memory`` then answers with the heap tracemalloc sees (``traced``, the
``peak`` since the previous request, and tracemalloc's own ``overhead``): cheap, it takes no
snapshot. Options:

* ``"collect": true``: run the garbage collector first and say how many objects it freed
  (cycles wait for it, and the daemon's thresholds are high).
* ``"top": K``: also the K source lines (at most ``MAX_TOP``) whose live allocations grew
  most since the baseline, and the net growth of all lines (``growth_total``; tracemalloc's
  own snapshots left out). The first such request takes the baseline; ``"baseline": true``
  takes a new one after answering. One snapshot is kept (``traced`` counts it).

A snapshot holds the loop for a moment (about a second per million live blocks), and tracing
slows allocation-heavy code about 2x: an instrument for investigations and the soak test,
not for production. ``invictusd status``'s RSS says *that* memory grows; ``memory`` says
*where*, if it is Python's (allocations of C libraries, uvloop's included, are not traced).
"""

from __future__ import annotations

import gc
import os
import time
import tracemalloc
from typing import Any

ENV = "INVICTUSD_TRACEMALLOC"
MAX_TOP = 100
# Allocations of the tracer and the importer are not the daemon's growth.
_IGNORE = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)


def start_from_env() -> bool:
    """Start tracing if ``INVICTUSD_TRACEMALLOC`` asks for it (a number of frames)."""
    try:
        frames = int(os.environ.get(ENV, "0") or "0")
    except ValueError:
        frames = 0
    if frames > 0 and not tracemalloc.is_tracing():
        tracemalloc.start(min(frames, 64))
    return tracemalloc.is_tracing()


class MemTrace:
    """Answers the ``memory`` control command (see the module docstring)."""

    def __init__(self) -> None:
        self._baseline: tracemalloc.Snapshot | None = None
        self._baseline_at = 0.0

    def report(self, request: dict[str, Any]) -> dict[str, Any]:
        if not tracemalloc.is_tracing():
            return {"ok": False, "error": f"tracemalloc is off: start the daemon with {ENV}=1"}
        out: dict[str, Any] = {"ok": True}
        if request.get("collect") is True:
            out["collected"] = gc.collect()  # cyclic garbage is not what the daemon keeps
        traced, peak = tracemalloc.get_traced_memory()
        out |= {"traced": traced, "peak": peak, "overhead": tracemalloc.get_tracemalloc_memory(),
                "frames": tracemalloc.get_traceback_limit()}
        top = request.get("top", 0)
        if isinstance(top, int) and not isinstance(top, bool) and top > 0:
            self._growth(min(top, MAX_TOP), request.get("baseline") is True, out)
        tracemalloc.reset_peak()  # after the snapshot: the next peak is the daemon's own
        return out

    def _growth(self, top: int, rebase: bool, out: dict[str, Any]) -> None:
        now = time.monotonic()
        snap = tracemalloc.take_snapshot().filter_traces(_IGNORE)
        if self._baseline is None:
            self._baseline, self._baseline_at = snap, now
        stats = snap.compare_to(self._baseline, "lineno")
        stats.sort(key=lambda s: s.size_diff, reverse=True)
        out["since_baseline"] = round(now - self._baseline_at, 1)
        out["growth_total"] = sum(s.size_diff for s in stats)  # net, every line
        out["growth"] = [
            {"where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}",
             "size_diff": s.size_diff, "count_diff": s.count_diff, "size": s.size, "count": s.count}
            for s in stats[:top]
        ]
        if rebase:
            self._baseline, self._baseline_at = snap, now
