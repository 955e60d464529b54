"""Namespace tests: every test here needs root and builds its own lab."""

from __future__ import annotations

from typing import Any

import pytest

MEASUREMENTS: list[tuple[str, str]] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/netns/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.netns)


@pytest.fixture
def measure() -> Any:
    """Record a figure (failover time, gap...) to print in the session summary."""

    def record(name: str, value: str) -> None:
        MEASUREMENTS.append((name, value))

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MEASUREMENTS:
        terminalreporter.section("measured")
        for name, value in MEASUREMENTS:
            terminalreporter.write_line(f"{name}: {value}")
