"""Summaries of the raw samples, the bar of issue 4, and the outputs: markdown, JSON, PNG."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

STACKS = ("invictusd", "baseline")
LABELS = {"invictusd": "invictusd", "baseline": "keepalived+conntrackd"}
MARK_START = "<!-- bench:start -->"
MARK_END = "<!-- bench:end -->"
RFC_MASTER_DOWN = 3 * 1.0 + (256 - 100) / 256  # advert 1 s, backup priority 100


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    except OSError:
        mem = 0

    def ver(*argv: str) -> str:
        try:
            p = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else "?"

    return {
        "cpu": model, "cores": os.cpu_count(), "memory_gib": mem,
        "kernel": platform.release(), "python": platform.python_version(),
        "keepalived": ver("keepalived", "-v"), "conntrackd": ver("/usr/sbin/conntrackd", "-v"),
    }


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {"throughput": {}, "takeover": {}, "generator": {}, "failover": {},
                         "bytes": {}, "cpu": {}, "lag": {}, "idle": {}}
    sizes = raw["config"]["sizes"]
    for size in sizes:
        alone = [g["rate"] for g in raw["generator_alone"] if g["size"] == size]
        during = [r["generator_rate"] for r in raw["replication"] if r["size"] == size]
        s["generator"][str(size)] = {"alone_per_s": median(alone), "during_runs_per_s": median(during)}
        row: dict[str, Any] = {}
        tk: dict[str, Any] = {}
        for st in STACKS:
            rs = [r for r in raw["replication"] if r["size"] == size and r["stack"] == st]
            row[st] = median([r["events_per_s"] for r in rs])
            row[st + "_seconds"] = median([r["seconds"] for r in rs])
            tk[st] = median([r["takeover_s"] for r in rs])
        row["ratio"] = ratio(row["invictusd"], row["baseline"])
        tk["ratio"] = ratio(tk["invictusd"], tk["baseline"])
        s["throughput"][str(size)] = row
        s["takeover"][str(size)] = tk
    s["false_takeovers"] = {}
    for size in sizes:
        ft = {}
        for st in STACKS:
            rs = [r for r in raw["replication"] if r["size"] == size and r["stack"] == st]
            ft[st] = f"{sum(bool(r.get('false_takeover')) for r in rs)}/{len(rs)}"
        s["false_takeovers"][str(size)] = ft
    for key in ("bytes_per_new", "bytes_per_update", "bytes_per_destroy"):
        b = {st: median([r[key] for r in raw["replication"] if r["stack"] == st and key in r])
             for st in STACKS}
        b["ratio"] = ratio(b["invictusd"], b["baseline"])
        s["bytes"][key] = b
    # CPU and peak RSS during the bursts of the 100k size (or the largest measured).
    ref = 100_000 if 100_000 in sizes else max(sizes)
    s["cpu"]["size"] = ref
    for st in STACKS:
        rs = [r for r in raw["replication"] if r["size"] == ref and r["stack"] == st]
        def node_sum(r: dict[str, Any], key: str, node: str) -> float:
            return float(sum(v for k, v in r[key].items() if k.startswith(node + "/")))

        s["cpu"][st] = {
            "master_cpu_s": median([node_sum(r, "cpu_s", "fw1") for r in rs]),
            "backup_cpu_s": median([node_sum(r, "cpu_s", "fw2") for r in rs]),
            "backup_peak_rss_mb": median([node_sum(r, "peak_rss_mb", "fw2") for r in rs]),
            "backup_replicator_rss_mb": median([
                max(v for k, v in r["peak_rss_mb"].items() if k in ("fw2/invictusd", "fw2/conntrackd"))
                for r in rs]),
        }
    for k in ("master_cpu_s", "backup_cpu_s", "backup_peak_rss_mb", "backup_replicator_rss_mb"):
        s["cpu"][k + "_ratio"] = ratio(s["cpu"]["invictusd"][k], s["cpu"]["baseline"][k])
    for st in STACKS:
        ls = [x for x in raw["lag"] if x["stack"] == st]
        s["lag"][st] = {"p50_ms": median([x["p50_ms"] for x in ls]),
                        "p99_ms": median([x["p99_ms"] for x in ls])}
        ids = [x for x in raw["idle"] if x["stack"] == st]
        s["idle"][st] = {"cpu_percent": median([x["total_percent"] for x in ids])}
    s["lag"]["p99_ratio"] = ratio(s["lag"]["invictusd"]["p99_ms"], s["lag"]["baseline"]["p99_ms"])
    for kind in raw["config"]["faults"]:
        row = {}
        for st in STACKS:
            fs = [f for f in raw["failover"] if f["fault"] == kind and f["stack"] == st]
            row[st] = {"gap_s": median([f["gap_s"] for f in fs]), "vip_s": median([f["vip_s"] for f in fs]),
                       "survived": f"{sum(f['survived'] for f in fs)}/{len(fs)}"}
        row["gap_ratio"] = ratio(row["invictusd"]["gap_s"], row["baseline"]["gap_s"])
        s["failover"][kind] = row
    s["bar"] = bar(s)
    return s


def bar(s: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def check(name: str, value: float | None, limit: float, shown: str, le: bool = True) -> None:
        ok = None if value is None else (value <= limit if le else value >= limit)
        if ok and shown.startswith("<") and not shown.startswith("<="):
            ok = value is not None and value < limit
        out.append({"figure": name, "value": value, "bar": shown, "met": ok})

    for size, row in s["throughput"].items():
        check(f"replication throughput {int(size) // 1000}k (invictusd/baseline)", row["ratio"], 1.0,
              ">= 1.0x", le=False)
    check("lag p99 (invictusd/baseline)", s["lag"]["p99_ratio"], 1.0, "<= 1.0x")
    if "100000" in s["takeover"]:
        check("takeover 100k (invictusd/conntrackd -c)", s["takeover"]["100000"]["ratio"], 1.0, "<= 1.0x")
    for kind, row in s["failover"].items():
        check(f"failover gap, {kind} (invictusd/baseline)", row["gap_ratio"], 1.0, "<= 1.0x")
    kill = s["failover"].get("kill", {}).get("invictusd", {}).get("gap_s")
    check("failover gap, dead master (invictusd, s)", kill, RFC_MASTER_DOWN + 0.1,
          f"<= {RFC_MASTER_DOWN + 0.1:.2f} s")
    check("bytes per new connection (ratio)", s["bytes"]["bytes_per_new"]["ratio"], 0.5, "<= 0.5x")
    check("bytes per destroyed connection (ratio)", s["bytes"]["bytes_per_destroy"]["ratio"], 0.125,
          "<= 0.125x")
    check(f"peak RSS, backup with {s['cpu']['size'] // 1000}k entries (invictusd/conntrackd)",
          s["cpu"]["backup_replicator_rss_mb_ratio"], 1.5, "<= 1.5x")
    check("idle CPU of invictusd (% of a core, both nodes)", s["idle"]["invictusd"]["cpu_percent"], 1.0,
          "< 1%")
    return out


def _ctd_version(text: str) -> str:
    m = re.search(r"v(\d+\.\d+\.\d+)", text)
    return f"conntrackd {m.group(1)}" if m else "conntrackd ?"


def _f(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "—" if v is None else fmt.format(v)


def markdown(raw: dict[str, Any], s: dict[str, Any]) -> str:
    m = raw["machine"]
    cfg = raw["config"]
    lines = [
        f"Run {raw['started']} ({'quick' if cfg['quick'] else 'full'} mode, {cfg['reps']} repetitions, "
        f"alternating stacks, medians; ratio = invictusd / keepalived+conntrackd). "
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}; {m['keepalived']}; {_ctd_version(m['conntrackd'])}.",
        "",
        "| figure | invictusd | keepalived+conntrackd | ratio |",
        "|---|---:|---:|---:|",
    ]
    for size, row in s["throughput"].items():
        g = s["generator"][size]
        lines.append(f"| replication {int(size) // 1000}k new entries, events/s "
                     f"(generator alone {_f(g['alone_per_s'])}/s) | {_f(row['invictusd'])} | "
                     f"{_f(row['baseline'])} | {_f(row['ratio'], '{:.2f}')} |")
    for size, ft in s.get("false_takeovers", {}).items():
        lines.append(f"| backup became master during the {int(size) // 1000}k burst (samples) | "
                     f"{ft['invictusd']} | {ft['baseline']} | |")
    for q in ("p50_ms", "p99_ms"):
        lines.append(f"| lag of single new entries under {cfg['lag_rate']:.0f} updates/s, {q[:3]} ms | "
                     f"{_f(s['lag']['invictusd'][q], '{:.1f}')} | {_f(s['lag']['baseline'][q], '{:.1f}')} | "
                     f"{_f(ratio(s['lag']['invictusd'][q], s['lag']['baseline'][q]), '{:.2f}')} |")
    for size, row in s["takeover"].items():
        lines.append(f"| takeover {int(size) // 1000}k: table in kernel, ms "
                     "(invictusd commit vs `conntrackd -c`) | "
                     f"{_f(row['invictusd'] and row['invictusd'] * 1000)} | "
                     f"{_f(row['baseline'] and row['baseline'] * 1000)} | {_f(row['ratio'], '{:.2f}')} |")
    for kind, row in s["failover"].items():
        i, b = row["invictusd"], row["baseline"]
        lines.append(f"| failover `{kind}`: client TCP gap, s (survived) | {_f(i['gap_s'], '{:.2f}')} "
                     f"({i['survived']}) | {_f(b['gap_s'], '{:.2f}')} ({b['survived']}) | "
                     f"{_f(row['gap_ratio'], '{:.2f}')} |")
        lines.append(f"| failover `{kind}`: new master owns the VIPs, s | {_f(i['vip_s'], '{:.2f}')} | "
                     f"{_f(b['vip_s'], '{:.2f}')} | {_f(ratio(i['vip_s'], b['vip_s']), '{:.2f}')} |")
    for key, name in (("bytes_per_new", "new"), ("bytes_per_update", "updated"),
                      ("bytes_per_destroy", "destroyed")):
        b = s["bytes"][key]
        lines.append(f"| sync-link bytes per {name} connection | {_f(b['invictusd'], '{:.1f}')} | "
                     f"{_f(b['baseline'], '{:.1f}')} | {_f(b['ratio'], '{:.2f}')} |")
    c = s["cpu"]
    k = c["size"] // 1000
    for key, name in (("master_cpu_s", f"CPU s, master, {k}k burst"),
                      ("backup_cpu_s", f"CPU s, backup, {k}k burst"),
                      ("backup_replicator_rss_mb", f"peak RSS MB, backup replicator with {k}k entries"),
                      ("backup_peak_rss_mb", f"peak RSS MB, all daemons of the backup, {k}k")):
        lines.append(f"| {name} | {_f(c['invictusd'][key], '{:.2f}')} | {_f(c['baseline'][key], '{:.2f}')} | "
                     f"{_f(c[key + '_ratio'], '{:.2f}')} |")
    ii, ib = s["idle"]["invictusd"]["cpu_percent"], s["idle"]["baseline"]["cpu_percent"]
    lines.append(f"| idle CPU, % of a core (both nodes, {cfg['idle_seconds']:.0f} s) | "
                 f"{_f(ii, '{:.2f}')} | {_f(ib, '{:.2f}')} | {_f(ratio(ii, ib), '{:.2f}')} |")
    lines += ["", "The bar of issue 4:", "", "| figure | value | bar | met |", "|---|---:|---|---|"]
    for b in s["bar"]:
        met = "—" if b["met"] is None else ("yes" if b["met"] else "**no**")
        lines.append(f"| {b['figure']} | {_f(b['value'], '{:.2f}')} | {b['bar']} | {met} |")
    lines += ["", "![replication throughput](throughput.png)", "![failover timelines](failover.png)", ""]
    return "\n".join(lines)


def plots(raw: dict[str, Any], s: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"invictusd": "#1f77b4", "baseline": "#ff7f0e"}
    paths = []
    sizes = list(s["throughput"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    width = 0.27
    for i, st in enumerate((*STACKS, "generator")):
        vals = [(s["generator"][z]["alone_per_s"] if st == "generator" else s["throughput"][z][st]) or 0
                for z in sizes]
        ax.bar([x + (i - 1) * width for x in range(len(sizes))], vals, width,
               label="generator alone" if st == "generator" else LABELS[st],
               color=colors.get(st, "#bbbbbb"))
    ax.set_xticks(range(len(sizes)), [f"{int(z) // 1000}k" for z in sizes])
    ax.set_ylabel("entries replicated per second")
    ax.set_title("Replication throughput (higher is better)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, st in enumerate(STACKS):
        vals = [(s["takeover"][z][st] or 0) * 1000 for z in sizes]
        ax.bar([x + (i - 0.5) * 0.4 for x in range(len(sizes))], vals, 0.4, label=LABELS[st],
               color=colors[st])
    ax.set_xticks(range(len(sizes)), [f"{int(z) // 1000}k" for z in sizes])
    ax.set_ylabel("ms")
    ax.set_title("Takeover: replicated table into the kernel (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "throughput.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    kinds = list(s["failover"])
    fig, axes = plt.subplots(len(kinds), 1, figsize=(11, 2.6 * len(kinds)), sharex=True, squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        for j, st in enumerate(STACKS):
            fs = [f for f in raw["failover"] if f["fault"] == kind and f["stack"] == st]
            if not fs:
                continue
            f = fs[0]
            for name, sr in f["streams"].items():
                xs = [t for t, _ in sr["timeline"]]
                ax.scatter(xs, [j + (0.15 if name == "snat" else -0.15)] * len(xs), s=3, color=colors[st],
                           label=f"{LABELS[st]} ({name})" if name == "plain" else None)
            ax.axvline(f["vip_s"], color=colors[st], linestyle="--", linewidth=1)
        ax.axvline(0, color="red", linewidth=1)
        ax.set_yticks([0, 1], [LABELS[x] for x in STACKS])
        ax.set_title(f"{kind}: echoes of the client's TCP streams (plain, SNAT) around the fault "
                     "(red), dashed = new master owns the VIPs", fontsize=9)
    axes[-1, 0].set_xlabel("seconds after the fault")
    fig.tight_layout()
    p = out / "failover.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def write(raw: dict[str, Any], out: Path, readme: Path | None) -> tuple[str, dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    s = summarize(raw)
    md = markdown(raw, s)
    plots(raw, s, out)
    (out / "latest.md").write_text("# Benchmarks: invictusd vs keepalived + conntrackd\n\n" + md)
    (out / "latest.json").write_text(json.dumps({"summary": s, "raw": raw}, indent=1, default=str))
    if readme is not None and readme.exists():
        update_readme(readme, md, out)
    return md, s


def update_readme(readme: Path, md: str, out: Path) -> None:
    """Replace only our section between the markers (others edit the rest of the file)."""
    rel = os.path.relpath(out, readme.parent)
    body = md.replace("](throughput.png)", f"]({rel}/throughput.png)").replace(
        "](failover.png)", f"]({rel}/failover.png)")
    section = (f"{MARK_START}\n## Benchmarks\n\n`python3 -m benchmarks.run` (see benchmarks/README.md).\n\n"
               f"{body}\n{MARK_END}")
    text = readme.read_text()
    if MARK_START in text and MARK_END in text:
        text = re.sub(re.escape(MARK_START) + r".*?" + re.escape(MARK_END), lambda _m: section, text,
                      flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    readme.write_text(text)
