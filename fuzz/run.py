"""Run every fuzz target (or some) for a while: ``python3 -m fuzz.run --seconds 60``.

Each target runs in its own process (libFuzzer exits the process when it stops) with a
memory limit (``-rss_limit_mb``, ``-malloc_limit_mb``) and a per-input timeout, from a corpus
seeded with valid inputs. Crash inputs are written to the artifacts directory and the run
exits non-zero. Prints one JSON line per target (inputs executed, seconds, outcome).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuzz.targets import TARGETS, seeds

ROOT = Path(__file__).resolve().parent.parent


def run_target(name: str, seconds: int, rss_mb: int, corpus: Path, artifacts: Path,
               timeout_s: int = 10) -> dict[str, object]:
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds(name)):
        (corpus / f"seed-{i}").write_bytes(seed)
    argv = [
        sys.executable, "-m", "fuzz.one", name,
        f"-max_total_time={seconds}", f"-rss_limit_mb={rss_mb}", f"-malloc_limit_mb={rss_mb}",
        f"-timeout={timeout_s}", "-max_len=4096", "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/{name}-", str(corpus),
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}".rstrip(":")}
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=seconds + 120)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    execs = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    rss = re.search(r"stat::peak_rss_mb:\s*(\d+)", out)
    result: dict[str, object] = {
        "target": name,
        "ok": proc.returncode == 0,
        "returncode": proc.returncode,
        "inputs": int(execs.group(1)) if execs else None,
        "peak_rss_mb": int(rss.group(1)) if rss else None,
        "seconds": round(elapsed, 1),
        "corpus": len(list(corpus.iterdir())),
    }
    if proc.returncode != 0:
        result["output"] = out[-4000:]
        result["artifacts"] = sorted(str(p) for p in artifacts.glob(f"{name}-*"))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help=f"comma-separated subset of {','.join(TARGETS)}")
    ap.add_argument("--rss-mb", type=int, default=1024, help="memory limit per target process")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep corpora and crash artifacts here (default: a temporary directory)")
    a = ap.parse_args(argv)
    names = [n for n in a.targets.split(",") if n]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {list(TARGETS)}")
    with tempfile.TemporaryDirectory(prefix="invictusd-fuzz-") as tmp:
        work = a.workdir or Path(tmp)
        failed = 0
        for name in names:
            r = run_target(name, a.seconds, a.rss_mb, work / "corpus" / name, work / "artifacts")
            failed += not r["ok"]
            print(json.dumps(r), flush=True)
        if failed and a.workdir is None:
            print(f"{failed} target(s) failed; rerun with --workdir DIR to keep the crash inputs",
                  file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
