"""Network namespaces for tests, the demo and benchmarks: unique per run, always removed.

Every namespace created here is named ``ivd<pid>-<hex>-<tag>``. Cleanup happens three ways:
the context manager's ``finally``; an ``atexit`` hook for an interrupted run; and
``sweep_stale()`` (at the start of a test session or a demo), which removes namespaces whose
creating process no longer exists (a run killed with SIGKILL).

This module ships with the package so that ``invictusd demo`` works when installed; the
daemon itself never imports it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

PREFIX = "ivd"
_NAME = re.compile(rf"^{PREFIX}(\d+)-")
_created: set[str] = set()


def run(
    *args: str, check: bool = True, timeout: float = 30, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in the current namespace; with ``check``, raise with stderr on failure."""
    proc = subprocess.run(
        list(args), check=False, capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


def ns_exec(ns: str, *args: str, check: bool = True, timeout: float = 30, input: str | None = None) -> str:
    """Run a command inside ``ns``; return stdout. Raises with stderr on failure."""
    proc = run(*ns_argv(ns, args), check=False, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"in netns {ns}: {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def ip_batch(ns: str | None, commands: Sequence[str], timeout: float = 30) -> None:
    """Run many ``ip`` commands in one process (``ip -batch``), in ``ns`` or the current one.

    One process instead of one per command is what keeps a lab build well under a second.
    """
    if not commands:
        return
    argv = ["ip", "-n", ns] if ns else ["ip"]
    run(*argv, "-batch", "-", input="\n".join(commands) + "\n", timeout=timeout)


def unique_name(tag: str) -> str:
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}-{tag}"


def create(tag: str) -> str:
    name = unique_name(tag)
    # Registered before creation so that an interruption in between still cleans up.
    _created.add(name)
    run("ip", "netns", "add", name)
    run("ip", "-n", name, "link", "set", "lo", "up")
    return name


def create_many(names: Iterable[str], lo_up: bool = True) -> None:
    """Create several namespaces (names from ``unique_name``) in one ``ip`` process."""
    names = list(names)
    _created.update(names)
    run("ip", "-batch", "-", input="".join(f"netns add {n}\n" for n in names))
    if lo_up:
        procs = [
            (n, subprocess.Popen(["ip", "-n", n, "link", "set", "lo", "up"], stderr=subprocess.PIPE))
            for n in names
        ]
        for n, p in procs:
            _, err = p.communicate(timeout=30)
            if p.returncode != 0:
                raise RuntimeError(f"ip -n {n} link set lo up: {err.decode().strip()}")


def _kill_pids(name: str) -> None:
    pids = run("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)


def delete(name: str) -> None:
    """Remove ``name``, first killing whatever still runs inside (or it lingers)."""
    _kill_pids(name)
    run("ip", "netns", "del", name, check=False)
    _created.discard(name)


def delete_many(names: Sequence[str]) -> None:
    for name in names:
        _kill_pids(name)
    if names:
        # `ip -batch` keeps going after a failing line with -force.
        run(
            "ip",
            "-force",
            "-batch",
            "-",
            input="".join(f"netns del {n}\n" for n in names),
            check=False,
        )
    for name in names:
        _created.discard(name)


def delete_all_created() -> None:
    delete_many(sorted(_created))


atexit.register(delete_all_created)


@contextlib.contextmanager
def netns(tag: str) -> Iterator[str]:
    name = create(tag)
    try:
        yield name
    finally:
        delete(name)


def exit_on_signals() -> None:
    """Make SIGTERM and SIGHUP raise ``SystemExit``, so ``finally`` blocks and ``atexit`` run.

    For programs that build a lab and may be stopped by a signal (the demo, benchmarks):
    by default those signals end Python without any cleanup. Signals that already have a
    handler are left alone. Call from the main thread.
    """

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _exit)


def exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def listed() -> list[str]:
    """Names from ``ip netns list`` (all of them, not only ours)."""
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()]


WORKDIR_PREFIX = "ivdlab-"


def make_workdir() -> str:
    """A temporary directory named after this process, so ``sweep_stale`` can find it."""
    return tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")


def sweep_stale() -> list[str]:
    """Remove namespaces (and lab work directories) left by runs whose process is gone."""
    removed = []
    tmp = tempfile.gettempdir()
    for entry in os.listdir(tmp):
        m = re.match(rf"^{WORKDIR_PREFIX}(\d+)-", entry)
        if m and int(m.group(1)) != os.getpid() and not os.path.exists(f"/proc/{m.group(1)}"):
            shutil.rmtree(os.path.join(tmp, entry), ignore_errors=True)
    for name in listed():
        m = _NAME.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            delete(name)
            removed.append(name)
    return removed


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 5.0,
    interval: float = 0.02,
    what: str = "condition",
) -> None:
    """Poll ``predicate()`` until it is true; raise ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)
