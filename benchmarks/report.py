"""Summaries of the raw samples, the goals of issues 9 and 10, and the outputs: markdown,
JSON, PNG (the plots only when matplotlib is installed: ``pip install -e '.[bench]'``)."""

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
SAME_JOB = "baseline-kernel"  # conntrackd with DisableExternalCache On (stacks.ConntrackdKernelReplica)
LABELS = {"invictusd": "invictusd", "baseline": "keepalived+conntrackd",
          "invictusd-0.1": "invictusd v3 0.1 s", "invictusd-0.05": "invictusd v3 0.05 s",
          "baseline-0.1": "keepalived v3 0.1 s + conntrackd"}
FAILOVER_STACKS = ("invictusd-0.1", "invictusd-0.05", "baseline-0.1")
FAULT_NAMES = {"box_dead": "box dead (daemons frozen, links cut)", "graceful": "graceful stop (SIGTERM)",
               "stepdown": "step-down (SIGUSR1)", "kill": "daemons SIGKILLed, kernel forwarding"}
PHASES = {"burst": "bursts (throughput, CPU)", "hold": "holding the table (RSS)",
          "bulk": "bulks to a returning peer", "takeover": "takeovers and hand-overs (new master)"}
MARK_START = "<!-- bench:start -->"
MARK_END = "<!-- bench:end -->"
MB = 1 << 20


def median(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def worst(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points (None for fewer than two distinct x)."""
    n = len(points)
    if n < 2 or len({x for x, _ in points}) < 2:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx


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


def k(size: int | str) -> str:
    z = int(size)
    return f"{z // 1_000_000}M" if z >= 1_000_000 and z % 1_000_000 == 0 else f"{z / 1000:g}k"


def _node(r: dict[str, Any], key: str, node: str, only: str | None = None) -> float:
    """Sum over the daemons of ``node`` (``only``: that daemon) of ``r[key]`` values."""
    return float(sum(v for name, v in r[key].items() if name.startswith(node + "/")
                     and (only is None or name == f"{node}/{only}")))


def _mem(r: dict[str, Any], when: str, node: str, only: str | None = None, field: str = "rss_mb") -> float:
    return float(sum(m[field] for name, m in r["memory"][when].items() if name.startswith(node + "/")
                     and (only is None or name == f"{node}/{only}")))


def _system_share(r: dict[str, Any], node: str) -> float | None:
    """The kernel's share of a node's daemons' CPU time during the burst."""
    sys_s = _node(r, "cpu_system_s", node)
    return ratio(sys_s, sys_s + _node(r, "cpu_user_s", node))


def bar_sizes(sizes: list[int]) -> list[int]:
    """The sizes the issue's memory goals name (100k and 1M), or the largest measured."""
    big = [z for z in sizes if z >= 100_000]
    return big or [max(sizes)]


def ref_size(sizes: list[int]) -> int:
    """The size of the throughput and CPU goals: 100k, or the largest below it."""
    return 100_000 if 100_000 in sizes else max(z for z in sizes if z <= 100_000) if any(
        z <= 100_000 for z in sizes) else min(sizes)


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    cfg = raw["config"]
    sizes: list[int] = cfg["sizes"]
    hold = raw["hold"]
    s: dict[str, Any] = {"sizes": sizes, "generator": {}, "throughput": {}, "takeover": {}, "memory": {},
                         "slope": {}, "kernel": {}, "cpu": {}, "bulk": {}, "adverts": {}, "bytes": {},
                         "false_takeovers": {}, "lag": {}, "idle": {}, "failover": {}, "timing": []}
    obj = raw.get("kernel_object_bytes")
    s["kernel"]["object_bytes"] = obj
    for size in sizes:
        z = str(size)
        alone = [g["rate"] for g in raw["generator_alone"] if g["size"] == size]
        s["generator"][z] = {"alone_per_s": median(alone)}
        by = {st: [r for r in hold if r["size"] == size and r["stack"] == st] for st in STACKS}
        tp: dict[str, Any] = {st: median([r["events_per_s"] for r in rs]) for st, rs in by.items()}
        tp["ratio"] = ratio(tp["invictusd"], tp["baseline"])
        s["throughput"][z] = tp
        tk: dict[str, Any] = {st: median([r["takeover_s"] * 1000 for r in rs]) for st, rs in by.items()}
        tk["invictusd_worst"] = worst([r["takeover_s"] * 1000 for r in by["invictusd"]])
        tk["ratio"] = ratio(tk["invictusd"], tk["baseline"])
        tk["handover_s"] = median([r["takeover"]["handover"]["seconds"] for r in by["invictusd"]])
        tk["baseline_vips_after_notify_s"] = median([r["takeover"].get("vips_after_notify_s")
                                                     for r in by["baseline"]])
        s["takeover"][z] = tk
        mem: dict[str, Any] = {}
        cpu: dict[str, Any] = {}
        for st, rs in by.items():
            rep = rs[0]["replicator"] if rs else st
            mem[st] = {
                "master_mb": median([_mem(r, "holding", "fw1", rep) for r in rs]),
                "backup_mb": median([_mem(r, "holding", "fw2", rep) for r in rs]),
                "master_peak_mb": median([_mem(r, "holding", "fw1", rep, "hwm_mb") for r in rs]),
                "backup_peak_mb": median([_mem(r, "holding", "fw2", rep, "hwm_mb") for r in rs]),
                "master_all_mb": median([_mem(r, "holding", "fw1") for r in rs]),
                "backup_all_mb": median([_mem(r, "holding", "fw2") for r in rs]),
                "backup_after_bulk_mb": median([_mem(r, "after_bulk", "fw2", rep) for r in rs]),
            }
            cpu[st] = {"master_us": median([_node(r, "cpu_s", "fw1") / size * 1e6 for r in rs]),
                       "backup_us": median([_node(r, "cpu_s", "fw2") / size * 1e6 for r in rs]),
                       "backup_with_takeover_us": median([(_node(r, "cpu_s", "fw2")
                                                            + _node(r, "takeover_cpu_s", "fw2")) / size * 1e6
                                                           for r in rs]),
                       "master_system": median([_system_share(r, "fw1") for r in rs]),
                       "backup_system": median([_system_share(r, "fw2") for r in rs])}
            s["bulk"].setdefault(z, {})[st] = median([r["bulk"]["seconds"] for r in rs])
            s["false_takeovers"].setdefault(z, {})[st] = (
                f"{sum(bool(r.get('false_takeover')) for r in rs)}/{len(rs)}")
        for key in ("master_mb", "backup_mb", "master_all_mb", "backup_all_mb"):
            mem[key + "_ratio"] = ratio(mem["invictusd"][key], mem["baseline"][key])
        for key in ("master_us", "backup_us"):
            cpu[key + "_ratio"] = ratio(cpu["invictusd"][key], cpu["baseline"][key])
        s["memory"][z] = mem
        s["cpu"][z] = cpu
        s["bulk"][z]["invictusd_last_bulk_s"] = median(
            [r["bulk"]["last_bulk"]["seconds"] for r in by["invictusd"] if r["bulk"].get("last_bulk")])
        s["bulk"][z]["ratio"] = ratio(s["bulk"][z]["invictusd"], s["bulk"][z]["baseline"])
        # The kernel's share, apart: the master's table under both stacks, and the replica
        # in the backup's kernel under invictusd (conntrackd keeps it in its own memory).
        kz: dict[str, Any] = {}
        for st, rs in by.items():
            for role, node in (("master", "fw1"), ("backup", "fw2")):
                n = median([r["kernel_entries"][node] for r in rs])
                kz[st] = kz.get(st, {})
                kz[st][role + "_entries"] = n
                kz[st][role + "_mb"] = None if n is None or obj is None else n * obj / MB
        s["kernel"][z] = kz
    for st in STACKS:
        rs = [r for r in hold if r["stack"] == st]
        rep = rs[0]["replicator"] if rs else st
        s["slope"][st] = {}
        for role, node in (("master", "fw1"), ("backup", "fw2")):
            pts = [(r["size"], _mem(r, "holding", node, rep) * MB) for r in rs]
            if len({x for x, _ in pts}) < 2:  # one size only: from the start
                pts += [(0, _mem(r, "start", node, rep) * MB) for r in rs]
            s["slope"][st][role] = slope(pts)
        # The worst advert interval of each phase, over every size and repetition.
        s["adverts"][st] = {ph: worst([r["adverts"].get(ph, {}).get("worst_s") for r in rs]) for ph in PHASES}
    for key in ("bytes_per_new", "bytes_per_update", "bytes_per_destroy"):
        b: dict[str, Any] = {st: median([r[key] for r in hold if r["stack"] == st and key in r])
                             for st in STACKS}
        b["ratio"] = ratio(b["invictusd"], b["baseline"])
        s["bytes"][key] = b
    for st in STACKS:
        ls = [x for x in raw["lag"] if x["stack"] == st]
        s["lag"][st] = {"p50_ms": median([x["p50_ms"] for x in ls]),
                        "p99_ms": median([x["p99_ms"] for x in ls])}
        ids = [x for x in raw["idle"] if x["stack"] == st]
        s["idle"][st] = {"cpu_percent": median([x["total_percent"] for x in ids])}
    for kind in cfg["faults"]:
        row: dict[str, Any] = {}
        for st in FAILOVER_STACKS:
            fs = [f for f in raw["failover"] if f["fault"] == kind and f["stack"] == st]
            if not fs:
                continue
            gaps, vips = [f["gap_s"] for f in fs], [f["vip_s"] for f in fs]
            row[st] = {"gap_s": median(gaps), "gap_worst_s": worst(gaps),
                       "vip_s": median(vips), "vip_worst_s": worst(vips),
                       "survived": f"{sum(f['survived'] for f in fs)}/{len(fs)}",
                       "lost": sum(not f["survived"] for f in fs)}
        s["failover"][kind] = row
    for t in raw["timing"]:
        ph = {}
        for name, p in t["phases"].items():
            ph[name] = {"worst_ms": _ms(p["adverts"]["worst_s"]),
                        "intervals": p["adverts"]["intervals"],
                        "margin_ms": _ms(p.get("margin_s")),
                        "margin_wire_ms": _ms(p.get("margin_wire_s")),
                        "master_down_ms": p["master_down_s"] * 1000,
                        "false_failovers": p["false_failovers"],
                        "complete": (p.get("load") or {}).get("complete", True),
                        "held": (p.get("load") or {}).get("held"),
                        "loop_ms": {n: v["max_lag_ms"] for n, v in p["loop"].items()},
                        "loop_exact": {n: v["exact"] for n, v in p["loop"].items()},
                        "culprit": {n: (v.get("last_stall") or {}).get("culprit")
                                    for n, v in p["loop"].items()}}
        s["timing"].append({"interval": t["interval"], "size": t["size"], "phases": ph,
                            "flood": t.get("flood")})
    s["same_job"] = same_job(raw, s)
    s["bars"] = bars(s)
    return s


def same_job(raw: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    """Per size: the burst of conntrackd doing invictusd's job (its replica injected into
    the backup's kernel as entries arrive), beside invictusd's own burst figures."""
    out: dict[str, Any] = {}
    for size in s["sizes"]:
        rs = [r for r in raw.get("same_job", []) if r["size"] == size]
        if not rs:
            continue
        z = str(size)
        b = {"throughput": median([r["events_per_s"] for r in rs]),
             "master_us": median([_node(r, "cpu_s", "fw1") / size * 1e6 for r in rs]),
             "backup_us": median([_node(r, "cpu_s", "fw2") / size * 1e6 for r in rs]),
             "master_system": median([_system_share(r, "fw1") for r in rs]),
             "backup_system": median([_system_share(r, "fw2") for r in rs])}
        i = {"throughput": s["throughput"][z]["invictusd"], **s["cpu"][z]["invictusd"]}
        out[z] = {"invictusd": i, SAME_JOB: b,
                  "throughput_ratio": ratio(i["throughput"], b["throughput"]),
                  "master_us_ratio": ratio(i["master_us"], b["master_us"]),
                  "backup_us_ratio": ratio(i["backup_us"], b["backup_us"])}
    return out


def bars(s: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def check(issue: int, name: str, value: float | None, limit: float, shown: str, le: bool = True,
              fmt: str = "{:.2f}") -> None:
        ok = None if value is None else (value <= limit if le else value >= limit)
        out.append({"issue": issue, "figure": name, "value": value, "goal": shown, "met": ok, "fmt": fmt})

    sizes = s["sizes"]
    big = bar_sizes(sizes)
    ref = ref_size(sizes)
    # -- issue 9
    for z in sizes:
        check(9, f"addresses after the decision to take over, {k(z)} held (invictusd, ms, worst)",
              s["takeover"][str(z)]["invictusd_worst"], 50, "<= 50 ms, flat in table size", fmt="{:.1f}")
    for z in big:
        m = s["memory"][str(z)]
        for role in ("backup", "master"):
            check(9, f"daemon RSS, {role} holding {k(z)} (invictusd/conntrackd)", m[f"{role}_mb_ratio"], 1.0,
                  "<= 1.0x")
    for role in ("backup", "master"):
        sl = s["slope"]["invictusd"][role]
        check(9, f"RSS slope, {role} (invictusd, bytes per entry, {', '.join(k(z) for z in sizes)})",
              sl, 60, "<= 60 B", fmt="{:.1f}")
    c = s["cpu"][str(ref)]
    check(9, f"CPU per replicated event, master, {k(ref)} burst (invictusd/conntrackd)", c["master_us_ratio"],
          1.5, "<= 1.5x")
    check(9, f"CPU per replicated event, backup, {k(ref)} burst (invictusd/conntrackd)", c["backup_us_ratio"],
          1.5, "<= 1.5x")
    check(9, f"replication throughput, {k(ref)} burst (invictusd/conntrackd)",
          s["throughput"][str(ref)]["ratio"], 1.0, ">= 1.0x", le=False)
    sj = s.get("same_job", {}).get(str(ref))
    if sj is not None:  # context, not a goal: the goals compare with conntrackd as usually run
        for name, key in (("CPU per replicated event, master", "master_us_ratio"),
                          ("CPU per replicated event, backup", "backup_us_ratio"),
                          ("replication throughput", "throughput_ratio")):
            out.append({"issue": 9, "figure": f"{name}, {k(ref)} burst (invictusd/conntrackd doing the "
                        "same job: DisableExternalCache On)", "value": sj[key],
                        "goal": "(context)", "met": None, "fmt": "{:.2f}"})
    top = max(sizes)
    check(9, f"bulk to a returning peer, {k(top)} entries (invictusd, s)", s["bulk"][str(top)]["invictusd"],
          5.0, "<= 5 s")
    for ph, what in PHASES.items():
        check(9, f"max interval of the master's adverts (1 s) during the {what} (invictusd, s)",
              s["adverts"]["invictusd"][ph], 1.05, "<= 1.05 s", fmt="{:.3f}")
    # -- issue 10
    f = s["failover"]
    md01 = 3 * 0.1 + (256 - 100) * 0.1 / 256

    def fo(kind: str, st: str, key: str) -> float | None:
        v = f.get(kind, {}).get(st, {}).get(key)
        return None if v is None else float(v)

    check(10, "box dead at 0.1 s: addresses on the backup (invictusd, s, worst)",
          fo("box_dead", "invictusd-0.1", "vip_worst_s"), round(md01 + 0.04, 3),
          f"<= {md01 + 0.04:.2f} s (RFC {md01:.3f} + 0.04)", fmt="{:.3f}")
    check(10, "box dead at 0.1 s: worst TCP gap (invictusd/keepalived v3+conntrackd, medians)",
          ratio(fo("box_dead", "invictusd-0.1", "gap_s"), fo("box_dead", "baseline-0.1", "gap_s")), 1.0,
          "<= 1.0x")
    check(10, "box dead at 0.05 s: worst TCP gap (invictusd, s, worst)",
          fo("box_dead", "invictusd-0.05", "gap_worst_s"), 0.3, "<= 0.3 s", fmt="{:.3f}")
    for kind in ("graceful", "stepdown"):
        check(10, f"{FAULT_NAMES[kind]}: worst TCP gap (invictusd 0.1 s, s, worst)",
              fo(kind, "invictusd-0.1", "gap_worst_s"), 0.1, "<= 0.1 s", fmt="{:.3f}")
    check(10, "daemon SIGKILL, kernel forwarding: worst TCP gap (invictusd 0.1 s, s, worst)",
          fo("kill", "invictusd-0.1", "gap_worst_s"), 0.1, "no visible gap (<= 0.1 s)", fmt="{:.3f}")
    for t in s["timing"]:
        if t["interval"] != 0.05:
            continue
        for name, p in t["phases"].items():
            check(10, f"false failovers at 0.05 s during the {k(t['size'])} {name}"
                  f" (worst advert interval {_f(p['worst_ms'], '{:.0f}')} ms, backup's margin "
                  f"{_f(p['margin_ms'], '{:.0f}')} ms)", p["false_failovers"], 0, "none", fmt="{:.0f}")
    lost = sum(v["lost"] for row in f.values() for st, v in row.items() if st.startswith("invictusd"))
    check(10, "TCP streams lost across every failover (invictusd)", lost, 0, "none", fmt="{:.0f}")
    return out


def _ctd_version(text: str) -> str:
    m = re.search(r"v(\d+\.\d+\.\d+)", text)
    return f"conntrackd {m.group(1)}" if m else "conntrackd ?"


def _f(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "—" if v is None else fmt.format(v)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.0f}%"


def markdown(raw: dict[str, Any], s: dict[str, Any]) -> str:
    m = raw["machine"]
    cfg = raw["config"]
    sizes = s["sizes"]
    quiet = raw.get("quiet")
    lines = [
        f"Run {raw['started']} ({cfg['mode']} mode: {', '.join(k(z) for z in sizes)} entries, "
        f"{cfg['reps']} repetitions ({cfg['reps_large']} at {k(max(sizes))}), failovers "
        f"{cfg['failover_reps']}x; alternating stacks, medians; ratio = invictusd / keepalived+conntrackd; "
        f"{raw.get('wall_seconds', 0) / 60:.0f} min). Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}; {m['keepalived']}; "
        f"{_ctd_version(m['conntrackd'])}."
        + ("" if quiet is None else f" Load average at the start: {quiet}."),
        "",
        "### Issue 9: replication (VRRPv2, adverts every 1 s)",
        "",
        "| figure | invictusd | keepalived+conntrackd | ratio |",
        "|---|---:|---:|---:|",
    ]

    def row(name: str, a: float | None, b: float | None, fmt: str = "{:,.0f}") -> None:
        lines.append(f"| {name} | {_f(a, fmt)} | {_f(b, fmt)} | {_f(ratio(a, b), '{:.2f}')} |")

    for z in sizes:
        g = s["generator"][str(z)]["alone_per_s"]
        t = s["throughput"][str(z)]
        row(f"replication throughput, {k(z)} burst, entries/s (generator alone {_f(g)}/s)",
            t["invictusd"], t["baseline"])
    for z in sizes:
        t = s["takeover"][str(z)]
        row(f"takeover holding {k(z)}: decision → addresses and table in the kernel, ms",
            t["invictusd"], t["baseline"], "{:,.1f}")
    for z in sizes:
        t = s["takeover"][str(z)]
        lines.append(f"| hand-over of {k(z)} inherited entries after the takeover (background), s | "
                     f"{_f(t['handover_s'], '{:.2f}')} | (none: `conntrackd -c` above) | |")
    for z in sizes:
        mm = s["memory"][str(z)]
        row(f"daemon RSS, backup holding {k(z)}, MB (invictusd / conntrackd)", mm["invictusd"]["backup_mb"],
            mm["baseline"]["backup_mb"], "{:.1f}")
        row(f"daemon RSS, master holding {k(z)}, MB (invictusd / conntrackd)", mm["invictusd"]["master_mb"],
            mm["baseline"]["master_mb"], "{:.1f}")
    for z in sizes:
        mm = s["memory"][str(z)]
        i, b = mm["invictusd"], mm["baseline"]
        lines.append(f"| all daemons' RSS, backup / master holding {k(z)}, MB (keepalived included) | "
                     f"{_f(i['backup_all_mb'], '{:.1f}')} / {_f(i['master_all_mb'], '{:.1f}')} | "
                     f"{_f(b['backup_all_mb'], '{:.1f}')} / {_f(b['master_all_mb'], '{:.1f}')} | "
                     f"{_f(mm['backup_all_mb_ratio'], '{:.2f}')} / "
                     f"{_f(mm['master_all_mb_ratio'], '{:.2f}')} |")
    for role in ("backup", "master"):
        row(f"RSS slope, {role}, bytes per entry (regression over {', '.join(k(z) for z in sizes)})",
            s["slope"]["invictusd"][role], s["slope"]["baseline"][role], "{:,.1f}")
    obj = s["kernel"]["object_bytes"]
    for z in sizes:
        i, b = s["kernel"][str(z)]["invictusd"], s["kernel"][str(z)]["baseline"]
        lines.append(f"| kernel conntrack memory, backup / master holding {k(z)}, MB (entries x {_f(obj)} B, "
                     f"the `nf_conntrack` slab's object) | {_f(i['backup_mb'], '{:.1f}')} / "
                     f"{_f(i['master_mb'], '{:.1f}')} | {_f(b['backup_mb'], '{:.1f}')} / "
                     f"{_f(b['master_mb'], '{:.1f}')} | |")
    for z in sizes:
        c = s["cpu"][str(z)]
        row(f"CPU per replicated event, master, {k(z)} burst, µs (user+system)", c["invictusd"]["master_us"],
            c["baseline"]["master_us"], "{:.2f}")
        row(f"CPU per replicated event, backup, {k(z)} burst, µs (user+system)", c["invictusd"]["backup_us"],
            c["baseline"]["backup_us"], "{:.2f}")
        row(f"CPU per replicated event, backup, {k(z)} burst + takeover (conntrackd commits then), µs",
            c["invictusd"]["backup_with_takeover_us"], c["baseline"]["backup_with_takeover_us"], "{:.2f}")
        lines.append(f"| of which in the kernel (system time), master / backup, {k(z)} burst | "
                     f"{_pct(c['invictusd']['master_system'])} / {_pct(c['invictusd']['backup_system'])} | "
                     f"{_pct(c['baseline']['master_system'])} / {_pct(c['baseline']['backup_system'])} | |")
    for z in sizes:
        b = s["bulk"][str(z)]
        row(f"bulk to a returning peer, {k(z)}: restarted replicator ready → holds all, s "
            f"(invictusd's `last_bulk` {_f(b['invictusd_last_bulk_s'], '{:.2f}')} s)",
            b["invictusd"], b["baseline"], "{:.2f}")
    for ph, what in PHASES.items():
        row(f"max interval of the master's adverts during the {what}, s", s["adverts"]["invictusd"][ph],
            s["adverts"]["baseline"][ph], "{:.3f}")
    for z in sizes:
        ft = s["false_takeovers"][str(z)]
        lines.append(f"| backup became master during the {k(z)} samples | {ft['invictusd']} | "
                     f"{ft['baseline']} | |")
    for q in ("p50_ms", "p99_ms"):
        row(f"lag of single new entries under {cfg['lag_rate']:.0f} updates/s, {q[:3]}, ms",
            s["lag"]["invictusd"][q], s["lag"]["baseline"][q], "{:.1f}")
    for key, name in (("bytes_per_new", "new"), ("bytes_per_update", "updated"),
                      ("bytes_per_destroy", "destroyed")):
        b = s["bytes"][key]
        row(f"sync-link bytes per {name} connection", b["invictusd"], b["baseline"], "{:.1f}")
    row(f"idle CPU, % of a core (both nodes, {cfg['idle_seconds']:.0f} s)",
        s["idle"]["invictusd"]["cpu_percent"], s["idle"]["baseline"]["cpu_percent"], "{:.2f}")

    if s.get("same_job"):
        lines += ["", "### Issue 9: the same job side by side (conntrackd, `DisableExternalCache On`)", "",
                  "The table above compares with conntrackd as it is usually run: its backup keeps the "
                  "master's entries in its own cache and puts them into the kernel only at takeover "
                  "(`conntrackd -c`, the takeover rows). Configured to do what invictusd's backup does, "
                  "inject them into its kernel as they arrive, conntrackd measures (same bursts, one run):",
                  "", "| figure | invictusd | conntrackd, DisableExternalCache | ratio |",
                  "|---|---:|---:|---:|"]
        for z, sj in s["same_job"].items():
            i, b = sj["invictusd"], sj[SAME_JOB]
            zk = k(int(z))
            row(f"replication throughput, {zk} burst, entries/s", i["throughput"], b["throughput"])
            row(f"CPU per replicated event, master, {zk} burst, µs", i["master_us"], b["master_us"], "{:.2f}")
            row(f"CPU per replicated event, backup, {zk} burst, µs", i["backup_us"], b["backup_us"], "{:.2f}")
            lines.append(f"| of which in the kernel, master / backup, {zk} burst | "
                         f"{_pct(i['master_system'])} / {_pct(i['backup_system'])} | "
                         f"{_pct(b['master_system'])} / {_pct(b['backup_system'])} | |")
    lines += ["", "### Issue 10: failover of two TCP streams through the VIPs (VRRPv3)", "",
              "Median (worst) of " + f"{cfg['failover_reps']} per cell; the streams send every 10 ms.", "",
              "| fault | " + " | ".join(LABELS[st] for st in FAILOVER_STACKS) + " |",
              "|---|" + "---:|" * len(FAILOVER_STACKS)]
    for kind, frow in s["failover"].items():
        for key, what in (("gap", "worst TCP gap, s"), ("vip", "addresses on fw2, s")):
            cells = []
            for st in FAILOVER_STACKS:
                v = frow.get(st)
                if v is None:
                    cells.append("")
                    continue
                cell = f"{_f(v[key + '_s'], '{:.3f}')} ({_f(v[key + '_worst_s'], '{:.3f}')})"
                if key == "gap" and v["lost"]:
                    cell += f", lost {v['lost']}"
                cells.append(cell)
            lines.append(f"| {FAULT_NAMES[kind]}: {what} | " + " | ".join(cells) + " |")
    lines += ["", "Advert timing of invictusd VRRPv3 under load (the master's adverts on the wire at the "
              "backup; margin = the backup's Master_Down - the worst interval - the backup's worst "
              "event-loop step, a lower bound):", "",
              "| interval | load | worst advert interval, ms | backup's Master_Down margin, ms | "
              "false failovers | loop worst step fw1 / fw2, ms |", "|---|---|---:|---:|---:|---|"]
    for t in s["timing"]:
        for name, p in t["phases"].items():
            load = f"{k(t['size'])} {name}" if name != "flood" else (
                f"flood ({_f((t.get('flood') or {}).get('vrrp_pps'))} forged adverts/s + sync datagrams)")
            if not p["complete"]:
                load += f" (**incomplete**: fw2 held {_f(p['held'])})"

            def lp(n: str, p: dict[str, Any] = p) -> str:
                v = p["loop_ms"][n]
                return _f(v, "{:.0f}") if p["loop_exact"][n] else f"<= {_f(v, '{:.0f}')}"

            lines.append(f"| {t['interval']:g} s | {load} | {_f(p['worst_ms'], '{:.0f}')} | "
                         f"{_f(p['margin_ms'], '{:.0f}')} of {p['master_down_ms']:.0f} | "
                         f"{p['false_failovers']} | "
                         f"{lp('fw1')} / {lp('fw2')} |")
    lines += ["", "### Goals of issues 9 and 10", "", "| issue | figure | value | goal | met |",
              "|---|---|---:|---|---|"]
    for b in s["bars"]:
        met = "—" if b["met"] is None else ("yes" if b["met"] else "**no**")
        lines.append(f"| {b['issue']} | {b['figure']} | {_f(b['value'], b['fmt'])} | {b['goal']} | {met} |")
    lines += ["", "![replication](throughput.png)", "![failover timelines](failover.png)", ""]
    return "\n".join(lines)


def plots(raw: dict[str, Any], s: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"invictusd": "#1f77b4", "baseline": "#ff7f0e", "invictusd-0.1": "#1f77b4",
              "invictusd-0.05": "#2ca02c", "baseline-0.1": "#ff7f0e"}
    paths = []
    sizes = [str(z) for z in s["sizes"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    width = 0.27
    for i, st in enumerate((*STACKS, "generator")):
        vals = [(s["generator"][z]["alone_per_s"] if st == "generator" else s["throughput"][z][st]) or 0
                for z in sizes]
        ax.bar([x + (i - 1) * width for x in range(len(sizes))], vals, width,
               label="generator alone" if st == "generator" else LABELS[st], color=colors.get(st, "#bbbbbb"))
    ax.set_xticks(range(len(sizes)), [k(z) for z in sizes])
    ax.set_ylabel("entries replicated per second")
    ax.set_title("Replication throughput (higher is better)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, st in enumerate(STACKS):
        vals = [s["takeover"][z][st] or 0 for z in sizes]
        ax.bar([x + (i - 0.5) * 0.4 for x in range(len(sizes))], vals, 0.4, label=LABELS[st],
               color=colors[st])
    ax.set_yscale("log")
    ax.axhline(50, color="red", linewidth=1, linestyle=":")
    ax.set_xticks(range(len(sizes)), [k(z) for z in sizes])
    ax.set_ylabel("ms (log)")
    ax.set_title("Takeover: decision → addresses and table in the kernel", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[2]
    for st in STACKS:
        for role, node, style in (("backup", "fw2", "-"), ("master", "fw1", "--")):
            rs = [r for r in raw["hold"] if r["stack"] == st]
            pts = sorted((r["size"], _mem(r, "holding", node, r["replicator"])) for r in rs)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", color=colors[st],
                        label=f"{LABELS[st]}, {role}")
    ax.set_xscale("log")
    ax.set_xlabel("entries held")
    ax.set_ylabel("daemon RSS, MB")
    ax.set_title("Memory of the replicating daemon", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "throughput.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    kinds = list(s["failover"])
    window = max([f["window_s"] for f in raw["failover"]] or [3.0])
    fig, axes = plt.subplots(len(kinds), 1, figsize=(11, 0.6 + 1.0 * len(FAILOVER_STACKS) * len(kinds)),
                             squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        shown = [st for st in FAILOVER_STACKS
                 if any(f["fault"] == kind and f["stack"] == st for f in raw["failover"])]
        for j, st in enumerate(shown):
            f = next(f for f in raw["failover"] if f["fault"] == kind and f["stack"] == st)
            for name, sr in f["streams"].items():
                xs = [t for t, _ in sr["timeline"]]
                ax.scatter(xs, [j + (0.15 if name == "snat" else -0.15)] * len(xs), s=2, color=colors[st])
            ax.plot([f["vip_s"]] * 2, [j - 0.4, j + 0.4], color=colors[st], linestyle="--", linewidth=1)
        ax.axvline(0, color="red", linewidth=1)
        ax.set_xlim(-0.5, window)
        ax.set_ylim(-0.6, len(shown) - 0.4)
        ax.set_yticks(range(len(shown)), [LABELS[x] for x in shown], fontsize=8)
        ax.set_title(f"{FAULT_NAMES[kind]}: echoes of the client's TCP streams (plain below, SNAT above); "
                     "red = fault, dashed = fw2 holds the VIPs", fontsize=9)
    axes[-1, 0].set_xlabel("seconds after the fault (every stack's streams run the whole window)")
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
    try:
        plots(raw, s, out)
    except ImportError:
        md = md.replace("![replication](throughput.png)\n![failover timelines](failover.png)\n",
                        "(plots skipped: matplotlib is not installed)\n")
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
    section = (f"{MARK_START}\n## Benchmarks\n\n`python3 -m benchmarks.run` (full, ~20 min; "
               f"`--quick` ~10 min; see benchmarks/README.md).\n\n{body}\n{MARK_END}")
    text = readme.read_text()
    if MARK_START in text and MARK_END in text:
        text = re.sub(re.escape(MARK_START) + r".*?" + re.escape(MARK_END), lambda _m: section, text,
                      flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    readme.write_text(text)
