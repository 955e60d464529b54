"""Session-wide test policy.

Tests marked ``netns`` need root and network namespaces. In CI (``CI=true``) a missing
capability is a failure, never a silent skip; on a developer laptop without root they skip
with the reason.

Tests marked ``slow`` (the long fault and soak variants) are skipped unless asked for with
``--run-slow``, ``INVICTUSD_RUN_SLOW=1`` or a ``-m`` expression that names ``slow``
(e.g. ``-m slow``).
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from tests import nsutil


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2"
    return None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (long fault and soak variants)")


def _slow_wanted(config: pytest.Config) -> bool:
    return bool(config.getoption("--run-slow") or os.environ.get("INVICTUSD_RUN_SLOW") == "1"
                or "slow" in (config.getoption("-m") or ""))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _slow_wanted(config):
        skip = pytest.mark.skip(reason="slow: run with --run-slow, INVICTUSD_RUN_SLOW=1 or -m slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
    reason = _netns_unavailable()
    if reason is None:
        return
    needing = [i for i in items if "netns" in i.keywords or "/netns/" in str(i.fspath)]
    if needing and os.environ.get("CI") == "true":
        raise pytest.UsageError(f"{len(needing)} namespace tests cannot run here ({reason}); "
                                "CI must run them, not skip them")
    for item in needing:
        item.add_marker(pytest.mark.skip(reason=reason))


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionstart(session: pytest.Session) -> None:
    # SIGTERM (a CI timeout, kill) ends Python without unwinding: the namespaces of the
    # running test would stay. As an interrupt, the test's labs are torn down and the
    # session stops.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupted)
    if os.geteuid() == 0 and shutil.which("ip"):
        nsutil.sweep_stale()
