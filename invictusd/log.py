"""structlog set up once: JSON lines unless on a terminal, journald priorities, rate limits."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog

# syslog priorities for journald's "<N>" line prefix (SyslogLevelPrefix=, on by default).
_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def setup(level: str = "info", stream: Any = None, journal: Any = None) -> str:
    """Configure structlog once; returns where logs go: "journal", "json" or "console".

    Under systemd (stdout is the journal stream named by ``JOURNAL_STREAM``) events go to
    journald with native fields through the ``systemd`` binding (Debian's python3-systemd);
    ``journal`` replaces the binding's ``send`` (tests). Otherwise JSON lines, or a console
    format on a terminal.
    """
    stream = stream or sys.stdout
    to_journal = bool(os.environ.get("JOURNAL_STREAM"))
    send = journal or (_journal_send() if on_journal_stream(stream) else None)
    renderer: Any
    where = "json"
    if send is not None:
        renderer, where = JournalFields(send), "journal"
    elif stream.isatty() and not to_journal:
        renderer, where = structlog.dev.ConsoleRenderer(colors=False), "console"
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    if to_journal and send is None:
        processors.append(_PrefixPriority())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_level_number(level)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    if to_journal and send is None and on_journal_stream(stream):
        get().warning("python3-systemd is not installed: journald gets JSON lines, without "
                      "native fields")
    return where


def on_journal_stream(stream: Any) -> bool:
    """``stream`` is the journal stream systemd connected us to (sd_journal_stream_fd(3))."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _journal_send() -> Any:
    try:
        # Debian's python3-systemd (PyPI: systemd-python). Imported by name: the checkout's
        # systemd/ directory (the unit file) would otherwise look like its package to mypy.
        journal = importlib.import_module("systemd.journal")
    except ImportError:
        return None
    return journal.send


_FIELD_BAD = re.compile(r"[^A-Z0-9_]")
# Fields journald or the binding set themselves; ours get a prefix instead.
_RESERVED = frozenset({"MESSAGE", "MESSAGE_ID", "PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC",
                       "SYSLOG_IDENTIFIER", "SYSLOG_FACILITY", "SYSLOG_PID", "ERRNO"})


def journal_field(key: str) -> str:
    """A journald field name for a log key: upper case, [A-Z0-9_], not starting with _ or a
    digit (``vrid`` -> ``VRID``, ``duration-ms`` -> ``DURATION_MS``)."""
    name = _FIELD_BAD.sub("_", key.upper())
    if not name or name[0] in "_0123456789" or name in _RESERVED:
        name = "INVICTUSD_" + name.lstrip("_")
    return name[:64]


def _journal_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float) or value is None:
        return json.dumps(value)
    return json.dumps(value, default=str, separators=(",", ":"))


class JournalFields:
    """Send the event to journald with one native field per key, then drop it.

    ``INVICTUSD_EVENT`` is the event's ``kind`` when given (``transition``), else the event
    text in snake case; ``MESSAGE`` is the event text with its fields, for plain journalctl.
    """

    def __init__(self, send: Callable[..., Any]) -> None:
        self.send = send

    def __call__(self, _: Any, method: str, event: dict[str, Any]) -> Any:
        event = dict(event)
        text = str(event.pop("event", ""))
        level = str(event.pop("level", method))
        event.pop("timestamp", None)
        kind = event.pop("kind", None) or re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
        shown = " ".join(f"{k}={_journal_value(v)}" for k, v in event.items()
                         if k != "exception")
        fields = {journal_field(k): _journal_value(v) for k, v in event.items()}
        fields["INVICTUSD_EVENT"] = kind
        fields["SYSLOG_IDENTIFIER"] = "invictusd"
        self.send(f"{text}: {shown}" if shown else text,
                  PRIORITY=str(_PRIORITY.get(level, 6)), **fields)
        raise structlog.DropEvent


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
