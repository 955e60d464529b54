"""structlog set up once: JSON lines unless on a terminal, journald priorities, rate limits."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import structlog

# syslog priorities for journald's "<N>" line prefix (SyslogLevelPrefix=, on by default).
_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def setup(level: str = "info", stream: Any = None) -> None:
    stream = stream or sys.stdout
    to_journal = bool(os.environ.get("JOURNAL_STREAM"))
    renderer: Any
    if stream.isatty() and not to_journal:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    if to_journal:
        processors.append(_PrefixPriority())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_level_number(level)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


class _PrefixPriority:
    """Prefix the rendered line with <N> so journald files it under the right priority."""

    def __call__(self, _: Any, method: str, rendered: Any) -> Any:
        return f"<{_PRIORITY.get(method, 6)}>{rendered}"


def _level_number(level: str) -> int:
    import logging

    return int(getattr(logging, level.upper(), logging.INFO))


def get(**context: Any) -> Any:
    return structlog.get_logger().bind(**context)


class RateLimit:
    """At most one log line per key every ``period`` seconds; counts what it held back."""

    def __init__(self, period: float = 10.0) -> None:
        self.period = period
        self._last: dict[Any, float] = {}
        self._held: dict[Any, int] = {}

    def allow(self, key: Any, now: float | None = None) -> int | None:
        """None to stay silent, else the number of lines suppressed since the last one."""
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last < self.period:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)
