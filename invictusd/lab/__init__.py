"""A reusable namespace lab for integration tests, the demo and benchmarks.

Never imported by the daemon. See ``invictusd.lab.topology.Lab``. The names below load
lazily, so that ``python3 -m invictusd.lab.traffic`` (started many times per test) imports
only what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from invictusd.lab.topology import (
        FIREWALLS,
        NODES,
        Capture,
        CtEntry,
        Lab,
        LabConfig,
        Stream,
        firewall_ruleset,
        parse_conntrack,
    )
    from invictusd.lab.traffic import FlowResult

__all__ = [
    "FIREWALLS",
    "NODES",
    "Capture",
    "CtEntry",
    "FlowResult",
    "Lab",
    "LabConfig",
    "Stream",
    "firewall_ruleset",
    "parse_conntrack",
]


def __getattr__(name: str) -> Any:
    if name == "FlowResult":
        return importlib.import_module("invictusd.lab.traffic").FlowResult
    if name in __all__:
        return getattr(importlib.import_module("invictusd.lab.topology"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
