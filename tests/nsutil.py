"""Network namespaces for tests: unique per run, always removed.

The one implementation lives in ``invictusd.lab.netns`` (it ships with the package, for the
demo); this module re-exports it for the tests, and runs test code inside a namespace.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from invictusd.lab.netns import (
    PREFIX,
    create,
    create_many,
    delete,
    delete_all_created,
    delete_many,
    exists,
    ip_batch,
    listed,
    netns,
    ns_argv,
    ns_exec,
    run,
    sweep_stale,
    unique_name,
    wait_for,
)

__all__ = [
    "PREFIX",
    "create",
    "create_many",
    "delete",
    "delete_all_created",
    "delete_many",
    "enter",
    "exists",
    "in_netns",
    "ip_batch",
    "listed",
    "netns",
    "ns_argv",
    "ns_exec",
    "run",
    "sweep_stale",
    "unique_name",
    "wait_for",
]

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


def enter(ns: str) -> None:
    """Move the calling process (a child, never pytest itself) into namespace ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)  # os.setns exists only from Python 3.12
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def in_netns(ns: str, fn: Callable[..., T], *args: Any, timeout_s: int = 60) -> T:
    """Run ``fn(*args)`` in a forked child that joined ``ns``; its result (pickled) or an
    AssertionError with the child's traceback. The child never returns into pytest."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            signal.alarm(timeout_s)
            enter(ns)
            payload = pickle.dumps(("ok", fn(*args)))
        except BaseException:
            payload = pickle.dumps(("error", traceback.format_exc()))
        try:
            with os.fdopen(w, "wb") as f:
                f.write(payload)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise AssertionError(f"netns child died (wait status {status})")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise AssertionError(f"in netns {ns}:\n{value}")
    return value  # type: ignore[no-any-return]
