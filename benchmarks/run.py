"""invictusd vs keepalived + conntrackd, side by side: ``python3 -m benchmarks.run [--quick]``.

Needs root (network namespaces), keepalived, conntrackd, conntrack, nft, and matplotlib
(``pip install -e .[bench]``). Writes ``latest.md``, ``latest.json`` and PNG plots to
``--out`` (default ``benchmarks/results``) and the table into README.md between the
``<!-- bench:start -->`` / ``<!-- bench:end -->`` markers. An invalid run (a stack did not start,
entries missing, a commit short) exits 2 and writes no figure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks import scenarios as S
from benchmarks.stacks import FAULTS, STACKS, Stack
from invictusd.lab import netns
from invictusd.lab.topology import Lab, LabConfig

ROOT = Path(__file__).resolve().parent.parent
CT_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"


def plan(quick: bool, reps: int | None) -> dict[str, Any]:
    if quick:
        cfg = {"sizes": [10_000, 100_000], "reps": 2, "failover_reps": 1, "lag_probes": 60,
               "lag_reps": 1, "idle_seconds": 10.0}
    else:
        cfg = {"sizes": [10_000, 100_000, 500_000], "reps": 5, "failover_reps": 3, "lag_probes": 300,
               "lag_reps": 3, "idle_seconds": 60.0}
    if reps:
        cfg["reps"] = reps
        cfg["failover_reps"] = min(cfg["failover_reps"], reps)
    cfg.update(quick=quick, faults=list(FAULTS), lag_rate=2000.0)
    return cfg


def preflight() -> None:
    if os.geteuid() != 0:
        raise SystemExit("benchmarks.run needs root (network namespaces)")
    missing = [t for t in ("ip", "nft", "conntrack", "keepalived", "/usr/sbin/conntrackd")
               if shutil.which(t) is None]
    if missing:
        raise S.Invalid(f"missing tools: {', '.join(missing)}")
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise S.Invalid("matplotlib is missing: pip install -e '.[bench]'") from e


@contextlib.contextmanager
def conntrack_max(lab: Lab, want: int) -> Iterator[None]:
    """Raise nf_conntrack_max (a namespace may not exceed the initial namespace's value)."""
    old = int(Path(CT_MAX).read_text()) if Path(CT_MAX).exists() else None
    try:
        if old is not None and old < want:
            Path(CT_MAX).write_text(str(want))
        for node in ("fw1", "fw2"):
            lab.exec(node, "sysctl", "-qw", f"net.netfilter.nf_conntrack_max={want}")
        yield
    finally:
        if old is not None and old < want:
            Path(CT_MAX).write_text(str(old))


def order(rep: int) -> list[str]:
    """Alternate which stack goes first, so drift on the machine hits both alike."""
    return ["invictusd", "baseline"] if rep % 2 == 0 else ["baseline", "invictusd"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cfg: dict[str, Any], smoke: bool = False) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "config": cfg, "machine": report.machine(), "generator_alone": [], "replication": [],
        "lag": [], "failover": [], "idle": [],
    }
    with Lab(LabConfig(ipv6=False, conntrack_events=1)) as lab, \
            conntrack_max(lab, max(262_144, 2 * max(cfg["sizes"]) + 50_000)):
        def mk(name: str) -> Stack:
            return STACKS[name](lab)

        for rep in range(cfg["reps"]):
            for size in cfg["sizes"]:
                raw["generator_alone"].append(S.generator_alone(lab, size))
            for size in cfg["sizes"]:
                for name in order(rep):
                    log(f"rep {rep + 1}/{cfg['reps']}: replication {size} entries, {name}")
                    r = S.replication(lab, mk(name), size, update_delete=size == cfg["sizes"][0])
                    r["rep"] = rep
                    raw["replication"].append(r)
                    log(f"  {r['events_per_s']:,.0f} events/s, takeover {r['takeover_s'] * 1000:.0f} ms")
        for rep in range(cfg["lag_reps"]):
            for name in order(rep):
                log(f"lag, {name}")
                raw["lag"].append(S.lag(lab, mk(name), cfg["lag_probes"], rate=cfg["lag_rate"]))
        for rep in range(cfg["failover_reps"]):
            for kind in cfg["faults"]:
                for name in order(rep):
                    log(f"rep {rep + 1}: failover {kind}, {name}")
                    f = S.failover(lab, mk(name), kind)
                    f["rep"] = rep
                    raw["failover"].append(f)
                    if not smoke and f["gap_s"] is None:
                        lost = {k: v["error"] for k, v in f["streams"].items() if not v["survived"]}
                        log(f"  {name}: no echo after the fault on {lost}")
        for name in order(0):
            log(f"idle CPU, {name}")
            raw["idle"].append(S.idle_cpu(lab, mk(name), cfg["idle_seconds"]))
    return raw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="10k and 100k only, fewer repetitions (~5 min)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 2 quick, 5 full)")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md",
                   help="README whose bench section is replaced (skipped if the file does not exist)")
    p.add_argument("--no-readme", action="store_true")
    a = p.parse_args(argv)
    netns.exit_on_signals()
    t0 = time.monotonic()
    try:
        preflight()
        netns.sweep_stale()
        cfg = plan(a.quick, a.reps)
        raw = run(cfg)
    except S.Invalid as e:
        print(f"\nINVALID RUN, no figures: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        import traceback

        traceback.print_exc()
        print(f"\nINVALID RUN (benchmark error), no figures: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    raw["wall_seconds"] = round(time.monotonic() - t0, 1)
    md, _ = report.write(raw, a.out, None if a.no_readme else a.readme)
    print(md)
    log(f"done in {raw['wall_seconds']:.0f} s; results in {a.out}")
    if not a.no_readme and not a.readme.exists():
        log(f"{a.readme} does not exist: the table is only in {a.out / 'latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
