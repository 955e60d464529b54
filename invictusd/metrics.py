"""Prometheus/OpenMetrics exposition of the daemon's status (``[metrics] listen``).

Every value is read from one status snapshot (the dict that ``invictusd status --json``
prints), so a scrape and ``status --json`` taken at the same moment agree. The snapshot is
taken on the event loop (the HTTP server's thread asks for it with
``run_coroutine_threadsafe``); building and writing the text happens in the server's thread.
The metric names are listed in the README; each function below says which status field it
reads.
"""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from invictusd.config import Config, ConfigError

STATES = ("init", "backup", "master", "fault")
CHECK_STATES = ("unknown", "up", "down")
Snapshot = Callable[[], Mapping[str, Any]]


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def _gauge(name: str, doc: str, value: Any, unit_scale: float = 1.0) -> Iterator[Metric]:
    v = _num(value)
    if v is not None:
        yield GaugeMetricFamily(name, doc, value=v * unit_scale)


def _counter(name: str, doc: str, value: Any) -> Iterator[Metric]:
    v = _num(value)
    if v is not None:
        yield CounterMetricFamily(name, doc, value=v)


class StatusCollector:
    """A ``prometheus_client`` collector over status snapshots."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return list(families(self.snapshot()))


def families(s: Mapping[str, Any]) -> Iterator[Metric]:
    info = GaugeMetricFamily("invictusd_info", "Node name and version (always 1).",
                             labels=["node", "version"])
    info.add_metric([str(s.get("node", "")), str(s.get("version", ""))], 1)
    yield info
    yield from _gauge("invictusd_uptime_seconds", "Seconds since the daemon started (uptime).",
                      s.get("uptime"))
    yield from _group(s.get("group") or {})
    yield from _vrrp(s.get("vrrp") or [])
    yield from _track(s.get("track") or {})
    yield from _hooks(s.get("hooks") or {})
    sync = s.get("sync")
    if isinstance(sync, Mapping):
        yield from _sync(sync)
    yield from _loop(s.get("loop") or {})


def _group(g: Mapping[str, Any]) -> Iterator[Metric]:
    state = GaugeMetricFamily("invictusd_group_state",
                              "1 for the group's current state (group.state), else 0.",
                              labels=["state"])
    for name in STATES:
        state.add_metric([name], 1.0 if g.get("state") == name else 0.0)
    yield state
    yield from _gauge("invictusd_group_priority",
                      "Priority advertised now: configured plus track weights (group.priority).",
                      g.get("priority"))
    yield from _gauge("invictusd_group_base_priority", "Configured priority (group.base_priority).",
                      g.get("base_priority"))
    yield from _counter("invictusd_group_transitions_total",
                        "State changes of the group (group.transitions).", g.get("transitions"))
    yield from _gauge("invictusd_group_stepped_down", "1 while stepped down (group.stepped_down).",
                      g.get("stepped_down"))
    yield from _gauge("invictusd_group_demoted",
                      "1 while preemption is held, e.g. replica incomplete (group.demoted).",
                      g.get("demoted"))
    takeover = g.get("last_takeover")
    if isinstance(takeover, Mapping):
        yield from _gauge("invictusd_group_last_takeover_seconds",
                          "Decision to take over -> every address in place, the last time "
                          "(group.last_takeover.addresses_ms)", takeover.get("addresses_ms"), 1e-3)


def _vrrp(rows: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
    # Under VRRPv3 an interface's VRID has an IPv4 and an IPv6 instance (two rows of
    # vrrp[]): ``family`` keeps their series apart (4 for every VRRPv2 instance).
    labels = ["interface", "vrid", "family"]
    info = GaugeMetricFamily("invictusd_vrrp_info",
                             "VRRP version of the instance, always 1 (vrrp[].version).",
                             labels=[*labels, "version"])
    state = GaugeMetricFamily("invictusd_vrrp_state", "1 for the current state (vrrp[].state).",
                              labels=[*labels, "state"])
    master = GaugeMetricFamily("invictusd_vrrp_master",
                               "1 if this node is master of the VRID (vrrp[].state).", labels=labels)
    prio = GaugeMetricFamily("invictusd_vrrp_priority", "Advertised priority (vrrp[].priority).",
                             labels=labels)
    link = GaugeMetricFamily("invictusd_vrrp_link_up", "1 if the link is up (vrrp[].link_up).",
                             labels=labels)
    seconds = {
        key: GaugeMetricFamily(f"invictusd_vrrp_{key}_seconds", f"vrrp[].{key}", labels=labels)
        for key in ("advert_interval", "master_advert_interval", "master_down_interval")
    }
    counters = {
        key: CounterMetricFamily(f"invictusd_vrrp_{key}", f"vrrp[].counters.{key}", labels=labels)
        for key in ("adverts_sent", "adverts_received", "transitions", "garp_sent",
                    "addresses_restored")
    }
    drops = CounterMetricFamily("invictusd_vrrp_drops",
                                "Adverts dropped, by reason (vrrp[].counters.drops).",
                                labels=[*labels, "reason"])
    for v in rows:
        lv = [str(v.get("interface")), str(v.get("virtual_id")), str(v.get("family", 4))]
        info.add_metric([*lv, str(v.get("version", 2))], 1.0)
        for name in STATES:
            state.add_metric([*lv, name], 1.0 if v.get("state") == name else 0.0)
        master.add_metric(lv, 1.0 if v.get("state") == "master" else 0.0)
        if (p := _num(v.get("priority"))) is not None:
            prio.add_metric(lv, p)
        if (up := _num(v.get("link_up"))) is not None:
            link.add_metric(lv, up)
        for key, gauge in seconds.items():
            if (x := _num(v.get(key))) is not None:
                gauge.add_metric(lv, x)
        c = v.get("counters") or {}
        for key, fam in counters.items():
            if (n := _num(c.get(key))) is not None:
                fam.add_metric(lv, n)
        for reason, n in sorted((c.get("drops") or {}).items()):
            if (x := _num(n)) is not None:
                drops.add_metric([*lv, str(reason)], x)
    yield from (info, state, master, prio, link, *seconds.values(), *counters.values(), drops)


def _track(t: Mapping[str, Any]) -> Iterator[Metric]:
    yield from _gauge("invictusd_track_priority_delta",
                      "Sum of the weights of the down checks (track.priority_delta).",
                      t.get("priority_delta"))
    yield from _gauge("invictusd_track_faults",
                      "Down checks with weight \"fault\" (len(track.faults)).",
                      len(t.get("faults") or []) if "faults" in t else None)
    labels = ["check"]
    up = GaugeMetricFamily("invictusd_track_up", "1 if the check is up (track.checks[].state).",
                           labels=labels)
    state = GaugeMetricFamily("invictusd_track_state", "1 for the check's state.",
                              labels=[*labels, "state"])
    runs = CounterMetricFamily("invictusd_track_runs", "Results (track.checks[].runs).",
                               labels=labels)
    failed = CounterMetricFamily("invictusd_track_failed_runs",
                                 "Failed results (track.checks[].failed_runs).", labels=labels)
    duration = GaugeMetricFamily("invictusd_track_last_duration_seconds",
                                 "Duration of the last run (track.checks[].last_duration_ms).",
                                 labels=labels)
    for c in t.get("checks") or []:
        lv = [str(c.get("name"))]
        up.add_metric(lv, 1.0 if c.get("state") == "up" else 0.0)
        for name in CHECK_STATES:
            state.add_metric([*lv, name], 1.0 if c.get("state") == name else 0.0)
        if (n := _num(c.get("runs"))) is not None:
            runs.add_metric(lv, n)
        if (n := _num(c.get("failed_runs"))) is not None:
            failed.add_metric(lv, n)
        if (ms := _num(c.get("last_duration_ms"))) is not None:
            duration.add_metric(lv, ms / 1000)
    yield from (up, state, runs, failed, duration)


def _hooks(h: Mapping[str, Any]) -> Iterator[Metric]:
    labels = ["hook"]
    runs = CounterMetricFamily("invictusd_hook_runs", "Runs (hooks.<hook>.runs).", labels=labels)
    failures = CounterMetricFamily("invictusd_hook_failures",
                                   "Non-zero exits, kills, failures to start (hooks.<hook>.failures).",
                                   labels=labels)
    timeouts = CounterMetricFamily("invictusd_hook_timeouts",
                                   "Runs killed at the timeout (hooks.<hook>.timeouts).",
                                   labels=labels)
    code = GaugeMetricFamily("invictusd_hook_last_exit_code",
                             "Exit code of the last run (hooks.<hook>.last_exit_code).",
                             labels=labels)
    duration = GaugeMetricFamily("invictusd_hook_last_duration_seconds",
                                 "hooks.<hook>.last_duration_ms / 1000", labels=labels)
    delay = GaugeMetricFamily("invictusd_hook_last_delay_seconds",
                              "Transition to start of the last run (hooks.<hook>.last_delay_ms).",
                              labels=labels)
    for name, row in sorted(h.items()):
        if not isinstance(row, Mapping):
            continue
        lv = [name]
        for fam, key in ((runs, "runs"), (failures, "failures"), (timeouts, "timeouts"),
                         (code, "last_exit_code")):
            if (n := _num(row.get(key))) is not None:
                fam.add_metric(lv, n)
        for fam, key in ((duration, "last_duration_ms"), (delay, "last_delay_ms")):
            if (n := _num(row.get(key))) is not None:
                fam.add_metric(lv, n / 1000)
    yield from (runs, failures, timeouts, code, duration, delay)
    yield from _gauge("invictusd_hook_queued", "Hooks waiting to run (hooks.queued).",
                      h.get("queued"))


# Replication's status is being reworked; every field is optional here and only numbers
# become metrics. (status key, metric name, help, scale)
SYNC_GAUGES = (
    ("synced", "invictusd_sync_synced", "1 once the peer's table is held (sync.synced)", 1.0),
    ("link_up", "invictusd_sync_link_up", "1 if the sync link is up (sync.link_up)", 1.0),
    ("peer_alive", "invictusd_sync_peer_alive", "1 while the peer is heard (sync.peer_alive)", 1.0),
    ("peer_entries", "invictusd_sync_peer_entries",
     "Connections of the peer held here (sync.peer_entries)", 1.0),
    ("local_entries", "invictusd_sync_local_entries",
     "Our replicated connections (sync.local_entries)", 1.0),
    ("queue_depth", "invictusd_sync_queue_depth", "Entries waiting to be sent (sync.queue_depth)",
     1.0),
    ("inflight", "invictusd_sync_inflight", "Datagrams sent, not acked (sync.inflight)", 1.0),
    ("lag", "invictusd_sync_lag_seconds", "Age of the oldest unacked datagram (sync.lag)", 1.0),
    ("rtt", "invictusd_sync_rtt_seconds", "Smoothed round-trip time (sync.rtt)", 1.0),
    ("last_heard_ago", "invictusd_sync_last_heard_seconds",
     "Seconds since the peer was last heard (sync.last_heard_ago)", 1.0),
)
SYNC_COUNTERS = (
    ("resends", "invictusd_sync_resends_total", "Datagrams sent again (sync.resends)"),
    ("resyncs", "invictusd_sync_resyncs_total", "Full resyncs started (sync.resyncs)"),
    ("auth_failures", "invictusd_sync_auth_failures_total",
     "Datagrams failing authentication (sync.auth_failures)"),
    ("replay_drops", "invictusd_sync_replay_drops_total", "Replayed datagrams (sync.replay_drops)"),
    ("divergences", "invictusd_sync_divergences_total", "Digest mismatches (sync.divergences)"),
)
# Headline counters of sync.counters with names of their own.
SYNC_NAMED = (
    ("events", "invictusd_sync_events_total", "Conntrack events read (sync.counters.events)"),
    ("tx_bytes", "invictusd_sync_tx_bytes_total", "Bytes sent (sync.counters.tx_bytes)"),
    ("rx_bytes", "invictusd_sync_rx_bytes_total", "Bytes received (sync.counters.rx_bytes)"),
)
_LABEL_OK = re.compile(r"^[A-Za-z0-9_]+$")


def _sync(s: Mapping[str, Any]) -> Iterator[Metric]:
    for key, name, doc, scale in SYNC_GAUGES:
        yield from _gauge(name, doc, s.get(key), scale)
    for key, name, doc in SYNC_COUNTERS:
        yield from _counter(name, doc, s.get(key))
    counters = s.get("counters") or {}
    for key, name, doc in SYNC_NAMED:
        yield from _counter(name, doc, counters.get(key))
    every = CounterMetricFamily("invictusd_sync_counter",
                                "Every counter of sync.counters, by name.", labels=["counter"])
    for key, value in sorted(counters.items()):
        if _LABEL_OK.match(str(key)) and (n := _num(value)) is not None:
            every.add_metric([str(key)], n)
    yield every
    rates = GaugeMetricFamily("invictusd_sync_rate", "Per-second rates (sync.rates).",
                              labels=["what"])
    for key, value in sorted((s.get("rates") or {}).items()):
        if (n := _num(value)) is not None:
            rates.add_metric([str(key)], n)
    yield rates
    for key, what in (("last_handover", "inherited entries made ours after the last takeover"),
                      ("last_bulk", "our table sent to the peer, the last time")):
        row = s.get(key)
        if isinstance(row, Mapping):
            yield from _gauge(f"invictusd_sync_{key}_entries", f"Entries of {what} (sync.{key}.entries)",
                              row.get("entries"))
            yield from _gauge(f"invictusd_sync_{key}_seconds", f"Duration of {what} (sync.{key}.seconds)",
                              row.get("seconds"))


def _loop(lp: Mapping[str, Any]) -> Iterator[Metric]:
    yield from _counter("invictusd_loop_stalls_total", "Event-loop stalls (loop.stalls)",
                        lp.get("stalls"))
    yield from _gauge("invictusd_loop_lag_seconds", "Last measured event-loop lag (loop.lag_ms)",
                      lp.get("lag_ms"), 1e-3)
    yield from _gauge("invictusd_loop_max_lag_seconds", "Worst event-loop lag (loop.max_lag_ms)",
                      lp.get("max_lag_ms"), 1e-3)
    yield from _counter("invictusd_loop_callback_errors_total",
                        "Internal errors in callbacks (loop.callback_errors)",
                        lp.get("callback_errors"))


def render(status: Mapping[str, Any]) -> bytes:
    """The Prometheus text exposition of one status snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(lambda: status))
    return generate_latest(registry)


# ---- the listener ----------------------------------------------------------------------------


class MetricsServer:
    """``prometheus_client``'s HTTP server (a daemon thread) over ``snapshot``."""

    def __init__(self, host: str, port: int, snapshot: Snapshot) -> None:
        from prometheus_client import start_http_server

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(snapshot))
        self.httpd, self.thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def bind_error(cfg: Config, in_use_by_us: bool = False) -> ConfigError | None:
    """Whether ``[metrics] listen`` can be bound here (``check --system`` and start-up).

    ``in_use_by_us``: the running daemon already listens there (a reload check).
    """
    m = cfg.metrics
    if not m.listen:
        return None
    family = socket.AF_INET6 if ":" in m.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((m.host, m.port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE and in_use_by_us:
                return None
            return cfg.error("metrics.listen", f"cannot listen on {m.listen}: {e.strerror}")
    return None
