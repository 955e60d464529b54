"""How long the event loop was blocked, measured where it is blocked.

A periodic probe only sees how late *it* woke up, which is short of the stall by up to its
period (a 2 s stall showed as 1.79 s with a 0.25 s probe). So every callback and every task
step the daemon runs is timed here, and the probe reports the longest of them together with
its own lateness: the stall itself, and what caused it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


class LoopMonitor:
    def __init__(self) -> None:
        self._worst = 0.0
        self._culprit = ""

    def note(self, seconds: float, what: str) -> None:
        if seconds > self._worst:
            self._worst, self._culprit = seconds, what

    def take(self) -> tuple[float, str]:
        """The longest step since the last call, and what it was; resets."""
        worst, culprit = self._worst, self._culprit
        self._worst, self._culprit = 0.0, ""
        return worst, culprit

    def wrap(self, fn: Callable[..., T], what: str) -> Callable[..., T]:
        """``fn`` timed (for ``add_reader``/``call_at`` callbacks)."""

        def timed(*args: Any) -> T:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.note(time.perf_counter() - t0, what)

        return timed

    def task_factory(self, loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        """``loop.set_task_factory(monitor.task_factory)``: every task step is timed."""
        return asyncio.Task(_Timed(coro, self), loop=loop, **kw)


class _Timed(Coroutine[Any, Any, Any]):
    """Drives a coroutine step by step, timing each step (what one loop callback runs)."""

    __slots__ = ("_coro", "_monitor", "_name")

    def __init__(self, coro: Any, monitor: LoopMonitor) -> None:
        self._coro = coro
        self._monitor = monitor
        self._name = getattr(coro, "__qualname__", type(coro).__name__)

    def send(self, value: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._coro.send(value)
        finally:
            self._monitor.note(time.perf_counter() - t0, self._name)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        t0 = time.perf_counter()
        try:
            if val is None and tb is None:
                return self._coro.throw(typ)
            return self._coro.throw(typ, val, tb)
        finally:
            self._monitor.note(time.perf_counter() - t0, self._name)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._coro.__await__()  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:  # cr_frame, cr_code ... for task repr
        return getattr(self._coro, name)
