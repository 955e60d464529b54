"""Running a health check or a hook: an argv (never a shell), bounded in time and output.

The program gets its own session (process group), so that killing it at its timeout also
kills what it started (a script's ``sleep``, ``ping``...), which would otherwise keep the
output pipe open. Output (stdout and stderr together) is read as it comes, cut into lines
of at most ``MAX_LINE`` characters; at most ``MAX_OUTPUT`` bytes are looked at per run (the
rest is drained and dropped), and the last line is kept for status.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

MAX_LINE = 400  # characters kept of one output line
MAX_OUTPUT = 64 * 1024  # bytes of output looked at per run
# After the program exits, how long a child it left running may keep the pipe open before
# we stop reading (a hook that starts a daemon without redirecting its output).
PIPE_GRACE = 0.2


@dataclass(frozen=True, slots=True)
class ProcResult:
    exit_code: int | None  # None: killed at the timeout, or could not start
    signal: int | None = None  # killed by this signal (not by us)
    timed_out: bool = False
    duration: float = 0.0  # start to exit (or kill), seconds
    last_line: str = ""
    lines: int = 0
    error: str = ""  # could not start: why

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def detail(self) -> str:
        if self.error:
            return f"cannot run: {self.error}"
        if self.timed_out:
            return f"timed out after {self.duration:.1f}s (killed)"
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        return f"exit {self.exit_code}"


def _close_transport(proc: asyncio.subprocess.Process) -> None:
    """Close our end of the pipe now: a child the program left running may hold the other end
    for ever, and the transport would otherwise live (one fd) until garbage collection,
    possibly after its loop is gone. asyncio has no public call for it."""
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run(
    argv: Sequence[str],
    timeout: float,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> ProcResult:
    """Run ``argv`` for at most ``timeout`` seconds; ``on_line`` sees each output line.

    Cancelling the caller kills the program (and its process group) too.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=dict(env) if env is not None else None,
            start_new_session=True, close_fds=True,
        )
    except OSError as e:
        return ProcResult(None, duration=loop.time() - start, error=e.strerror or str(e))
    out = _Output(on_line)
    assert proc.stdout is not None
    reader = asyncio.ensure_future(out.read(proc.stdout))
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        timed_out = True
        _kill_group(proc.pid)
        await proc.wait()
    except asyncio.CancelledError:
        _kill_group(proc.pid)
        reader.cancel()
        _close_transport(proc)
        raise
    duration = loop.time() - start
    try:
        await asyncio.wait_for(asyncio.shield(reader), PIPE_GRACE)
    except TimeoutError:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    _close_transport(proc)
    code = proc.returncode
    if timed_out:
        return ProcResult(None, None, True, duration, out.last, out.count)
    if code is not None and code < 0:
        return ProcResult(None, -code, False, duration, out.last, out.count)
    return ProcResult(code, None, False, duration, out.last, out.count)


class _Output:
    def __init__(self, on_line: Callable[[str], None] | None) -> None:
        self.on_line = on_line
        self.last = ""
        self.count = 0
        self.seen = 0
        self._partial = b""

    async def read(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(4096):
            if self.seen >= MAX_OUTPUT:
                continue  # drained, not looked at
            chunk = chunk[: MAX_OUTPUT - self.seen]
            self.seen += len(chunk)
            data = self._partial + chunk
            *complete, self._partial = data.split(b"\n")
            if len(self._partial) > MAX_LINE * 4:  # a very long line: take what we have
                complete.append(self._partial)
                self._partial = b""
            for raw in complete:
                self._line(raw)
        if self._partial:
            self._line(self._partial)
            self._partial = b""

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        text = "".join(c if c.isprintable() else "?" for c in text[:MAX_LINE])
        if not text.strip():
            return
        self.count += 1
        self.last = text
        if self.on_line is not None:
            self.on_line(text)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment for a child, without what is ours alone (the sd_notify
    socket, the watchdog, socket activation, credentials), plus ``extra``."""
    private = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
               "LISTEN_FDNAMES", "CREDENTIALS_DIRECTORY", "INVICTUSD_TEST_HOOKS")
    env = {k: v for k, v in os.environ.items() if k not in private}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(extra or {})
    return env
