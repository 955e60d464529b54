"""Network namespaces for tests: unique per run, always removed.

The one implementation lives in ``invictusd.lab.netns`` (it ships with the package, for the
demo); this module re-exports it for the tests.
"""

from __future__ import annotations

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
    "exists",
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
