"""CI proof that the atheris fuzz targets (fuzz/) run: every target for a couple of seconds.

The long run is ``python3 -m fuzz.run --seconds 600`` (see fuzz/README.md). Without atheris
installed, the targets are still exercised here with random bytes and their seeds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.targets import TARGETS, seeds

ROOT = Path(__file__).resolve().parents[2]
SECONDS = int(os.environ.get("INVICTUSD_FUZZ_CI_SECONDS", "2"))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_targets_accept_seeds_and_random_bytes(name: str) -> None:
    rng = random.Random(name)
    fn = TARGETS[name]
    for data in seeds(name):
        fn(data)
    for _ in range(300):
        fn(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300))))


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None and os.environ.get("CI") != "true",
                    reason="atheris not installed (the test extra installs it; CI always runs this)")
def test_atheris_short_run_of_every_target(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fuzz.run", "--seconds", str(SECONDS), "--rss-mb", "1024",
         "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60 + 20 * SECONDS * len(TARGETS),
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["target"] for r in results} == set(TARGETS), proc.stdout + proc.stderr
    bad = [r for r in results if not r["ok"]]
    assert not bad, json.dumps(bad, indent=1)[:6000]
    assert all((r["inputs"] or 0) > 100 for r in results), results
