"""The benchmark reads conntrackd's own counters (``conntrackd -s``) to know when its
backup holds a burst: with the external cache (``cache external``) and without it
(``external inject``, DisableExternalCache On). Text captured from conntrackd 1.4.7."""

from __future__ import annotations

from benchmarks.baseline import parse_cache_count, parse_injected_count

NO_CACHE = """cache internal:
current active connections:\t           0
connections created:\t\t           0\tfailed:\t           0
connections updated:\t\t           0\tfailed:\t           0
connections destroyed:\t\t           0\tfailed:\t           0

external inject:
connections created:\t\t      100000\tfailed:\t           0
connections updated:\t\t          12\tfailed:\t           0
connections destroyed:\t\t         250\tfailed:\t           3

traffic processed:
                   0 Bytes                         0 Pckts
"""

WITH_CACHE = """cache internal:
current active connections:\t           7
connections created:\t\t           7\tfailed:\t           0

cache external:
current active connections:\t       99994
connections created:\t\t      100000\tfailed:\t           0
connections destroyed:\t\t           6\tfailed:\t           0
"""


def test_injected_count_is_created_minus_destroyed_of_the_inject_block() -> None:
    assert parse_injected_count(NO_CACHE) == 100000 - 250
    # the internal cache's counters (also "connections created") are not the peer's
    assert parse_injected_count(NO_CACHE.replace("external inject:", "other:")) is None
    assert parse_injected_count(WITH_CACHE) is None
    assert parse_injected_count("") is None


def test_cache_count_reads_the_named_block() -> None:
    assert parse_cache_count(WITH_CACHE, "external") == 99994
    assert parse_cache_count(WITH_CACHE, "internal") == 7
    assert parse_cache_count(NO_CACHE, "external") is None
