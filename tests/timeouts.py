"""A guard for tests of code that must terminate (decoders, loaders): a hang fails the test."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def no_hang(seconds: int, what: str = "the code under test") -> Iterator[None]:
    def fire(_sig: int, _frame: object) -> None:
        raise TimeoutError(f"{what} still running after {seconds}s: an unbounded loop")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
