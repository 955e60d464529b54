"""Network namespaces for tests: unique per run, always removed.

Every namespace a test creates is named ``ivd<pid>-<tag>``. Cleanup happens three ways:
the context manager's ``finally``; an ``atexit`` hook for an interrupted run; and
``sweep_stale()`` at the start of a session, which removes namespaces whose creating
process no longer exists (a run killed with SIGKILL).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import subprocess
from collections.abc import Iterator

PREFIX = "ivd"
_NAME = re.compile(rf"^{PREFIX}(\d+)-")
_created: set[str] = set()


def run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=timeout)


def ns_exec(ns: str, *args: str, check: bool = True, timeout: float = 30) -> str:
    """Run a command inside ``ns``; return stdout. Raises with stderr on failure."""
    proc = run("ip", "netns", "exec", ns, *args, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"in netns {ns}: {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc.stdout


def unique_name(tag: str) -> str:
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}-{tag}"


def create(tag: str) -> str:
    name = unique_name(tag)
    run("ip", "netns", "add", name)
    _created.add(name)
    ns_exec(name, "ip", "link", "set", "lo", "up")
    return name


def delete(name: str) -> None:
    # Kill anything still running inside first, or the namespace lingers as long as it lives.
    pids = run("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    run("ip", "netns", "del", name, check=False)
    _created.discard(name)


def delete_all_created() -> None:
    for name in list(_created):
        delete(name)


atexit.register(delete_all_created)


@contextlib.contextmanager
def netns(tag: str) -> Iterator[str]:
    name = create(tag)
    try:
        yield name
    finally:
        delete(name)


def sweep_stale() -> list[str]:
    """Remove test namespaces left by runs whose process is gone."""
    removed = []
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            delete(name)
            removed.append(name)
    return removed
