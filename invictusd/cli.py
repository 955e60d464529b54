"""Command line: run | check | status | metrics | step-down | resume | reload | cleanup | keygen |
demo."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from invictusd import __version__

DEFAULT_CONFIG = "/etc/invictusd/invictusd.toml"
DEFAULT_KEY = "/etc/invictusd/sync.key"

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_UNREACHABLE = 0, 1, 2, 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="invictusd", description=__doc__)
    ap.add_argument("--version", action="version", version=f"invictusd {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon in the foreground (systemd Type=notify)")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    p = sub.add_parser("check", help="validate a configuration file and exit")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG)
    p.add_argument("--system", action="store_true",
                   help="also check interfaces and subnets on this machine")

    for name, text in (
        ("status", "show the daemon's state"),
        ("metrics", "print the Prometheus metrics (as [metrics] listen serves them)"),
        ("step-down", "hand mastership to the peer and stay backup"),
        ("resume", "undo step-down"),
        ("reload", "re-read the configuration (like SIGHUP)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--socket", "-s", default=None, help="control socket path")
        p.add_argument("--config", "-c", default=None,
                       help="take the control socket path from this config")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("cleanup", help="undo what the daemon installed: addresses, the mark rule "
                       "(ExecStopPost; from the record in the runtime directory)")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                   help="only used to find [node] runtime_dir; it need not be valid")
    p.add_argument("--runtime-dir", default=None, help="the runtime directory (overrides --config)")

    p = sub.add_parser("keygen", help="write a new random sync key (mode 600) for [sync] key_file")
    p.add_argument("--output", "-o", default=DEFAULT_KEY, help=f"where to write it (default {DEFAULT_KEY})")
    p.add_argument("--force", action="store_true", help="replace an existing key file")

    p = sub.add_parser("demo", help="build a namespace lab, show an election and a failover")
    p.add_argument("--keep", action="store_true", help="wait for Enter before tearing down")

    args = ap.parse_args(argv)
    handler = {
        "run": _run, "check": _check, "status": _status, "metrics": _metrics, "step-down": _simple,
        "resume": _simple, "reload": _simple, "cleanup": _cleanup, "keygen": _keygen, "demo": _demo,
    }[args.command]
    return handler(args)


def _load(path: str) -> Any:
    from invictusd.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as e:
        _print_errors(e)
        return None


def _print_errors(e: Any) -> None:
    """Every error of a ``ConfigError``, one per line."""
    errors = e.errors
    for one in errors:
        print(f"invictusd: configuration error: {one}", file=sys.stderr)
    if len(errors) > 1:
        print(f"invictusd: {len(errors)} errors", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from invictusd import daemon, log

    log.setup(args.log_level)
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    factory = None
    if cfg.sync.enabled:
        from invictusd.replication import Replication

        factory = Replication
    return daemon.run(cfg, factory)


def _check(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    if args.system:
        import asyncio

        from invictusd.config import ConfigError, check_system
        from invictusd.io.links import Links
        from invictusd.metrics import bind_error

        links = Links()
        errors: list[ConfigError] = []
        try:
            infos, _, _ = asyncio.run(links.snapshot())
            cfg = check_system(cfg, infos)
        except ConfigError as e:
            errors += e.errors
        finally:
            links.close()
        bind = bind_error(cfg, in_use_by_us=_daemon_listens(cfg))
        if bind is not None:
            errors.append(bind)
        if errors:
            _print_errors(ConfigError.of(errors))
            return EXIT_CONFIG
    for w in cfg.warnings:
        print(f"invictusd: warning: {w}", file=sys.stderr)
    groups = ", ".join(f"{v.interface} (VRID {v.virtual_id})" for v in cfg.vrrp)
    print(f"{cfg.path}: OK: group of {len(cfg.vrrp)}: {groups}"
          + (f"; sync on {cfg.sync.interface}" if cfg.sync.enabled else ""))
    return EXIT_OK


def _daemon_listens(cfg: Any) -> bool:
    """The running daemon of this config serves its metrics at the configured address (so
    that address being taken is no error of the file)."""
    from invictusd import control

    try:
        reply = control.request(cfg.node.control_socket, "status", timeout=2)
    except (OSError, ValueError):
        return False
    return bool(reply.get("metrics", {}).get("listen") == cfg.metrics.listen)


def _socket_path(args: argparse.Namespace) -> str | None:
    if args.socket:
        return str(args.socket)
    from invictusd.config import DEFAULT_SOCKET

    if args.config:
        cfg = _load(args.config)
        return None if cfg is None else str(cfg.node.control_socket)
    return DEFAULT_SOCKET


def _ask(args: argparse.Namespace, cmd: str) -> dict[str, Any] | None:
    from invictusd import control

    path = _socket_path(args)
    if path is None:
        return None
    try:
        return control.request(path, cmd)
    except (OSError, ValueError) as e:
        print(f"invictusd: daemon not reachable at {path}: {e}", file=sys.stderr)
        return None


def _simple(args: argparse.Namespace) -> int:
    reply = _ask(args, args.command)
    if reply is None:
        return EXIT_UNREACHABLE
    if not reply.get("ok"):
        print(f"invictusd: {args.command} failed: {reply.get('error')}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{args.command}: ok")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    reply = _ask(args, "status")
    if reply is None:
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(reply, indent=2))
        return EXIT_OK
    print(format_status(reply))
    return EXIT_OK


def _metrics(args: argparse.Namespace) -> int:
    reply = _ask(args, "metrics")
    if reply is None:
        return EXIT_UNREACHABLE
    if not reply.get("ok"):
        print(f"invictusd: metrics failed: {reply.get('error')}", file=sys.stderr)
        return EXIT_ERROR
    sys.stdout.write(str(reply["text"]))
    return EXIT_OK


def format_status(s: dict[str, Any]) -> str:
    g = s["group"]
    flags = [f for f, on in (("stepped down", g["stepped_down"]),
                             (f"demoted: {g['demoted_reason']}", g["demoted"])) if on]
    lines = [f"invictusd {s['version']} on {s['node']} (pid {s['pid']}, up {s['uptime']:.0f}s): "
             f"{g['state'].upper()}" + (f" [{', '.join(flags)}]" if flags else "")
             + f", preempt {'on' if g['preempt'] else 'off'}, {g['transitions']} transitions"]
    for v in s["vrrp"]:
        c = v["counters"]
        drops = ", ".join(f"{k} {n}" for k, n in sorted(c["drops"].items())) or "none"
        proto = f" v{v['version']}/IPv{v['family']}" if v.get("version") == 3 else ""
        vips = " ".join([*v["virtual_addresses"], *v.get("virtual_addresses6", ())])
        lines.append(
            f"  {v['interface']:<8} VRID {v['virtual_id']:<3}{proto} {v['state']:<6} prio {v['priority']:<3}"
            f" {'link up' if v['link_up'] else 'LINK DOWN'}  VIPs {vips}"
            f"  master {v['master_address'] or '-'}  {v['time_in_state']:.1f}s in state"
        )
        lines.append(f"           adverts sent {c['adverts_sent']}, received {c['adverts_received']}"
                     f", drops: {drops}")
    sync = s.get("sync")
    if sync:
        lt, ho = g.get("last_takeover"), sync.get("last_handover")
        takeover = (f"addresses in {lt['addresses_ms']:.1f} ms" if lt else "none") + (
            f", {ho['entries']} inherited entries handed over in {ho['seconds']:.2f} s" if ho else "")
        lines.append(
            f"  sync     peer {sync.get('peer')} link {'up' if sync.get('link_up') else 'DOWN'}"
            f"  {'synced' if sync.get('synced') else 'NOT SYNCED'}"
            f"  peer entries {sync.get('peer_entries')}  local entries {sync.get('local_entries')}"
            f"  last takeover {takeover}"
        )
        counters = {k: v for k, v in sync.get("counters", {}).items() if v}
        if counters:
            lines.append("           " + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))
        rates = sync.get("rates") or {}
        lines.append(
            f"           {rates.get('events', 0)} events/s, {rates.get('tx_bytes', 0)} B/s out, "
            f"queue {sync.get('queue_depth', 0)}, in flight {sync.get('inflight', 0)}, "
            f"lag {sync.get('lag', 0)}s"
        )
    track = s.get("track") or {}
    checks = track.get("checks") or []
    if checks:
        lines.append(f"  track    priority {g.get('priority')} (configured {g.get('base_priority')}, "
                     f"delta {track.get('priority_delta', 0):+d})"
                     + (f", FAULT by {', '.join(track['faults'])}" if track.get("faults") else ""))
        for c in checks:
            what = " ".join(c.get("command") or []) or f"interface {c.get('interface')}"
            ms = c.get("last_duration_ms")
            lines.append(
                f"           {c['name']:<12} {str(c['state']).upper():<7} weight {c['weight']:<5} "
                f"last {c.get('last_detail') or '-'}"
                + (f" in {ms:.0f} ms" if ms is not None and c.get("kind") == "command" else "")
                + (f": {c['last_output']}" if c.get("last_output") else "")
                + f"  [{what}]"
            )
    hooks = s.get("hooks") or {}
    ran = [(k, h) for k, h in hooks.items() if isinstance(h, dict) and h.get("argv")]
    if ran:
        lines.append("  hooks    " + "; ".join(
            f"{k} ran {h['runs']}x, {h['failures']} failed"
            + (f", last {h['last_result']} in {h['last_duration_ms']:.0f} ms"
               if h.get("last_result") else "")
            for k, h in ran))
    loop = s.get("loop", {})
    lines.append(f"  loop     stalls {loop.get('stalls', 0)}, max lag {loop.get('max_lag_ms', 0)} ms")
    return "\n".join(lines)


def _cleanup(args: argparse.Namespace) -> int:
    """Undo what the record in the runtime directory lists (ExecStopPost, after any end)."""
    import asyncio

    from invictusd.config import runtime_dir_of
    from invictusd.installed import RecordError, read
    from invictusd.io.links import Links
    from invictusd.io.markrule import MarkRuleError, remove_table

    rundir = args.runtime_dir or runtime_dir_of(args.config)
    try:
        record = read(rundir)
    except RecordError as e:
        print(f"invictusd: cleanup: {e}", file=sys.stderr)
        return EXIT_ERROR
    done: list[str] = []
    failed: list[str] = []
    links = Links()

    async def addresses() -> None:
        _, ifindex, _ = await links.snapshot()
        for ifname, addrs in record.addresses.items():
            if ifname not in ifindex:
                done.append(f"{ifname} (interface gone)")
                continue
            for a in addrs:  # item by item: one failure never stops the rest
                try:
                    removed = await links.remove(ifindex[ifname], [_interface_address(a)])
                    done.append(f"{a} on {ifname}" + ("" if removed else " (already gone)"))
                except Exception as e:
                    failed.append(f"{a} on {ifname}: {e}")

    try:
        if any(record.addresses.values()):
            asyncio.run(addresses())
    except Exception as e:
        failed.append(f"addresses: {e}")
    finally:
        links.close()
    for table in record.nft_tables:
        try:
            remove_table(table)
            done.append(f"nft table {table}")
        except MarkRuleError as e:
            failed.append(f"nft table {table}: {e}")
    if not failed:
        from pathlib import Path

        (Path(rundir) / "installed.json").unlink(missing_ok=True)
    print("cleanup: removed " + (", ".join(done) if done else "nothing")
          + f" (record {rundir}/installed.json)")
    for f in failed:
        print(f"invictusd: cleanup: could not remove {f}", file=sys.stderr)
    return EXIT_ERROR if failed else EXIT_OK


def _interface_address(text: str) -> Any:
    import ipaddress

    return ipaddress.ip_interface(text)


def _keygen(args: argparse.Namespace) -> int:
    """A fresh 256-bit key as 64 hex characters; the key itself is never printed."""
    import secrets
    from pathlib import Path

    from invictusd.atomicfile import write_atomic

    path = Path(args.output)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists() and not args.force:
            print(f"invictusd: keygen: {path} exists; use --force to replace it "
                  "(and copy the new key to the peer)", file=sys.stderr)
            return EXIT_ERROR
        write_atomic(path, (secrets.token_hex(32) + "\n").encode(), durable=True)
    except OSError as e:
        print(f"invictusd: keygen: cannot write {path}: {e.strerror}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote a new 256-bit sync key to {path} (mode 600)\n"
          "Both firewalls need the same key. Copy it to the peer over a trusted channel, e.g.\n"
          f"    scp -p {path} root@PEER:{path}\n"
          f"and set  key_file = \"{path}\"  in the [sync] table of both configurations.")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from invictusd.lab.demo import main as demo_main

    return demo_main(keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
