"""The ``memory`` diagnostic: off unless asked for, and it names the line that grows."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import pytest

from invictusd import memtrace


@pytest.fixture
def tracing() -> Iterator[None]:
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start(1)
    try:
        yield
    finally:
        if not was:
            tracemalloc.stop()


def test_off_unless_started_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    if tracemalloc.is_tracing():
        pytest.skip("the test run itself is traced")
    monkeypatch.delenv(memtrace.ENV, raising=False)
    assert memtrace.start_from_env() is False
    monkeypatch.setenv(memtrace.ENV, "not a number")
    assert memtrace.start_from_env() is False
    reply = memtrace.MemTrace().report({"cmd": "memory", "top": 5})
    assert reply["ok"] is False and memtrace.ENV in reply["error"]


def test_growth_since_the_baseline_names_the_line(tracing: None) -> None:
    m = memtrace.MemTrace()
    first = m.report({"cmd": "memory", "top": 5})
    assert first["ok"] and first["traced"] > 0 and first["growth"] is not None
    keep = [bytearray(1000) for _ in range(2000)]  # the growth
    line = f"{__file__}:{test_growth_since_the_baseline_names_the_line.__code__.co_firstlineno + 4}"
    second = m.report({"cmd": "memory", "top": 500, "baseline": True})
    assert len(second["growth"]) <= memtrace.MAX_TOP
    top = second["growth"][0]
    assert top["where"] == line and top["size_diff"] >= 2_000_000 and top["count_diff"] >= 2000
    assert second["growth_total"] >= 2_000_000
    # A new baseline: what was there is no longer growth.
    third = m.report({"cmd": "memory", "top": 5})
    assert all(g["where"] != line or g["size_diff"] < 100_000 for g in third["growth"])
    assert len(keep) == 2000
    cheap = m.report({"cmd": "memory"})
    assert "growth" not in cheap and "collected" not in cheap and cheap["traced"] > 0
    for _ in range(100):  # cycles: only the collector frees them
        cycle: list[object] = []
        cycle.append(cycle)
    del cycle
    assert m.report({"cmd": "memory", "collect": True})["collected"] >= 100
