"""invictusd vs keepalived + conntrackd, side by side: ``python3 -m benchmarks.run [--quick]``.

Needs root (network namespaces), keepalived, conntrackd, conntrack, nft, tcpdump, and
matplotlib for the plots (``pip install -e .[bench]``). Writes ``latest.md``, ``latest.json``
and PNG plots to ``--out`` (default ``benchmarks/results``) and the tables into README.md
between the ``<!-- bench:start -->`` / ``<!-- bench:end -->`` markers. An invalid run (a
stack did not start, entries missing, a takeover short) exits 2 and writes no figure.

Modes: full (default: 10k, 100k and 1M entries; ~20 min on 2 cores), ``--quick`` (10k and
100k; ~10 min), ``--tiny`` (2000 entries, every figure once; what the CI smoke test runs,
~2 min).
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
from benchmarks.stacks import (
    FAILOVER_FAULTS,
    FAILOVER_STACKS,
    FAULTS,
    SAME_JOB_STACK,
    STACKS,
    ConntrackdKernelReplica,
    Stack,
)
from invictusd.lab import netns
from invictusd.lab.topology import Lab, LabConfig

ROOT = Path(__file__).resolve().parent.parent
CT_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"
CT_BUCKETS = "/proc/sys/net/netfilter/nf_conntrack_buckets"

# Seconds every conntrack entry of a sample may live: the generator's entries, and the lab
# firewalls' UDP/TCP timeouts (what a hand-over gives an inherited entry), so that nothing
# expires during a sample, a million entries included.
CT_TIMEOUT = 7200
TIMEOUT_SYSCTLS = (
    "nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream", "nf_conntrack_tcp_timeout_syn_sent",
    "nf_conntrack_tcp_timeout_syn_recv", "nf_conntrack_tcp_timeout_fin_wait",
    "nf_conntrack_tcp_timeout_close_wait", "nf_conntrack_tcp_timeout_last_ack",
    "nf_conntrack_tcp_timeout_time_wait", "nf_conntrack_tcp_timeout_close",
    "nf_conntrack_tcp_timeout_unacknowledged", "nf_conntrack_icmp_timeout",
)


def plan(mode: str, reps: int | None = None) -> dict[str, Any]:
    if mode == "tiny":
        cfg: dict[str, Any] = {
            "sizes": [2000], "reps": 1, "reps_large": 1, "failover_reps": 1, "window": 2.5,
            "lag_probes": 10, "lag_reps": 1, "idle_seconds": 2.0, "timing": [[0.05, 2000]],
            "flood_seconds": 2.0, "hold_seconds": 0.5}
    elif mode == "quick":
        cfg = {"sizes": [10_000, 100_000], "reps": 2, "reps_large": 2, "failover_reps": 2, "window": 3.0,
               "lag_probes": 60, "lag_reps": 1, "idle_seconds": 10.0, "timing": [[0.05, 100_000]],
               "flood_seconds": 5.0, "hold_seconds": 2.0}
    else:
        cfg = {"sizes": [10_000, 100_000, 1_000_000], "reps": 3, "reps_large": 2, "failover_reps": 5,
               "window": 3.0, "lag_probes": 200, "lag_reps": 2, "idle_seconds": 60.0,
               "timing": [[0.1, 100_000], [0.05, 100_000], [0.1, 1_000_000], [0.05, 1_000_000]],
               "flood_seconds": 8.0, "hold_seconds": 3.0}
    if reps:
        cfg["reps"] = reps
        cfg["reps_large"] = min(cfg["reps_large"], reps)
        cfg["failover_reps"] = min(cfg["failover_reps"], reps)
    cfg.update(mode=mode, quick=mode != "full", faults=list(FAULTS), lag_rate=2000.0, ct_timeout=CT_TIMEOUT)
    return cfg


def preflight(plots: bool = True) -> None:
    if os.geteuid() != 0:
        raise SystemExit("benchmarks.run needs root (network namespaces)")
    missing = [t for t in ("ip", "nft", "conntrack", "keepalived", "/usr/sbin/conntrackd", "tcpdump")
               if shutil.which(t) is None]
    if missing:
        raise S.Invalid(f"missing tools: {', '.join(missing)}")
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise S.Invalid("matplotlib is missing: pip install -e '.[bench]'") from e


@contextlib.contextmanager
def conntrack_limits(want: int) -> Iterator[dict[str, Any]]:
    """Raise nf_conntrack_max (a namespace may not exceed the initial namespace's value) and,
    for a million entries per node, the hash table's buckets, in the initial namespace; both
    restored afterwards (unless someone else changed them meanwhile)."""
    changed: list[tuple[str, int, int]] = []
    buckets = 1 << 20 if want > 1_000_000 else 0
    try:
        for path, value in ((CT_MAX, want), (CT_BUCKETS, buckets)):
            p = Path(path)
            if not p.exists() or not value:
                continue
            old = int(p.read_text())
            if old < value:
                p.write_text(str(value))
                changed.append((path, old, value))
        yield {Path(p).name: (old, new) for p, old, new in changed}
    finally:
        for path, old, new in reversed(changed):
            p = Path(path)
            with contextlib.suppress(OSError, ValueError):
                if int(p.read_text()) == new:
                    p.write_text(str(old))


def lab_config(cfg: dict[str, Any], ct_max: int) -> LabConfig:
    sysctls = {f"net.netfilter.{name}": str(cfg["ct_timeout"]) for name in TIMEOUT_SYSCTLS}
    sysctls["net.netfilter.nf_conntrack_max"] = str(ct_max)
    return LabConfig(ipv6=False, conntrack_events=1, fw_sysctls=sysctls)


def order(rep: int) -> list[str]:
    """Alternate which stack goes first, so drift on the machine hits both alike."""
    return ["invictusd", "baseline"] if rep % 2 == 0 else ["baseline", "invictusd"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quiet": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "config": cfg, "machine": report.machine(), "kernel_object_bytes": S.conntrack_object_bytes(),
        "generator_alone": [], "hold": [], "same_job": [], "lag": [], "failover": [], "timing": [],
        "idle": [],
    }
    sizes = cfg["sizes"]
    ct_max = max(262_144, 2 * max(sizes) + 100_000)
    with conntrack_limits(ct_max) as changed, Lab(lab_config(cfg, ct_max)) as lab:
        raw["sysctls_changed"] = changed

        def mk(name: str) -> Stack:
            return STACKS[name](lab)

        for rep in range(cfg["reps"]):
            for size in sizes:
                if size == max(sizes) and rep >= cfg["reps_large"]:
                    continue
                raw["generator_alone"].append(S.generator_alone(lab, size, cfg["ct_timeout"]))
                for name in order(rep):
                    log(f"rep {rep + 1}/{cfg['reps']}: {size} entries held, {name}")
                    r = S.hold(lab, mk(name), size, update_delete=size == sizes[0],
                               ct_timeout=cfg["ct_timeout"], hold_s=cfg["hold_seconds"])
                    r["rep"] = rep
                    raw["hold"].append(r)
                    log(f"  {r['events_per_s']:,.0f} entries/s, takeover {r['takeover_s'] * 1000:.1f} ms, "
                        f"bulk {r['bulk']['seconds']:.2f} s, adverts worst "
                        f"{max((a['worst_s'] or 0) for a in r['adverts'].values()):.3f} s")
                log(f"rep {rep + 1}/{cfg['reps']}: {size} entries burst, {SAME_JOB_STACK} (the same job)")
                j = S.burst_cost(lab, ConntrackdKernelReplica(lab), size, cfg["ct_timeout"])
                j["rep"] = rep
                raw["same_job"].append(j)
                log(f"  {j['events_per_s']:,.0f} entries/s")
        for rep in range(cfg["failover_reps"]):
            for kind in cfg["faults"]:
                names = [n for n in FAILOVER_STACKS if kind in FAILOVER_FAULTS[n]]
                if rep % 2:
                    names.reverse()
                for name in names:
                    log(f"rep {rep + 1}: failover {kind}, {name}")
                    f = S.failover(lab, FAILOVER_STACKS[name](lab), kind, cfg["window"])
                    f["rep"] = rep
                    raw["failover"].append(f)
                    log(f"  addresses {f['vip_s']:.3f} s, worst gap {f['gap_s']} s, survived {f['survived']}")
        for interval, size in cfg["timing"]:
            log(f"advert timing at {interval} s under load, {size} entries")
            t = S.timing(lab, interval, size, flood_s=cfg["flood_seconds"], ct_timeout=cfg["ct_timeout"])
            raw["timing"].append(t)
            for name, ph in t["phases"].items():
                log(f"  {name}: worst advert {ph['adverts']['worst_s']} s, margin {ph.get('margin_s')} s, "
                    f"false failovers {ph['false_failovers']}")
        for rep in range(cfg["lag_reps"]):
            for name in order(rep):
                log(f"lag, {name}")
                raw["lag"].append(S.lag(lab, mk(name), cfg["lag_probes"], rate=cfg["lag_rate"]))
        for name in order(0):
            log(f"idle CPU, {name}")
            raw["idle"].append(S.idle_cpu(lab, mk(name), cfg["idle_seconds"]))
    return raw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.run", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="10k and 100k entries, fewer repetitions (~10 min)")
    g.add_argument("--tiny", action="store_true", help="2000 entries, every figure once (~2 min)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 1 tiny, 2 quick, 3 full)")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md",
                   help="README whose bench section is replaced (skipped if the file does not exist)")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--no-plots", action="store_true", help="do not require matplotlib")
    a = p.parse_args(argv)
    netns.exit_on_signals()
    t0 = time.monotonic()
    mode = "tiny" if a.tiny else "quick" if a.quick else "full"
    try:
        preflight(plots=not a.no_plots)
        netns.sweep_stale()
        cfg = plan(mode, a.reps)
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
