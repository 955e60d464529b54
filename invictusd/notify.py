"""systemd notification protocol (sd_notify) without libsystemd."""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    def __init__(self) -> None:
        path = os.environ.get("NOTIFY_SOCKET", "")
        self.sock: socket.socket | None = None
        self.address = "\0" + path[1:] if path.startswith("@") else path
        if path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval: float | None = int(usec) / 1e6 if wanted else None

    def send(self, **fields: str) -> None:
        if self.sock is None:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        # systemd went away (or never listened): nothing useful to do about it.
        with contextlib.suppress(OSError):
            self.sock.sendto(message, self.address)

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def stopping(self) -> None:
        self.send(STOPPING="1")
