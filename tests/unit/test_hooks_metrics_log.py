"""Hooks run strictly in order and are bounded; the process adapter; the metrics exposition of
a status snapshot; journald native fields."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from invictusd import log, metrics
from invictusd.config import HooksConfig
from invictusd.hooks import HookJob, HookRunner, environment
from invictusd.io import proc


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def record(event: str, **kw: Any) -> None:
            self.events.append((level, event, kw))

        return record


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---- hooks: order and bounds -------------------------------------------------------------


def test_hooks_run_in_submission_order_one_at_a_time(tmp_path: Path) -> None:
    out = tmp_path / "order"
    script = tmp_path / "hook.sh"
    # Each run appends "start N" and "end N"; the first is the slowest: with any overlap or
    # overtaking the lines would interleave.
    script.write_text(f'#!/bin/sh\necho "start $1" >> {out}\nsleep "$2"\necho "end $1" >> {out}\n')
    script.chmod(0o755)

    async def go() -> HookRunner:
        runner = HookRunner(RecordingLog())
        task = asyncio.ensure_future(runner.run())
        now = asyncio.get_running_loop().time()
        for n, pause in ((1, "0.3"), (2, "0"), (3, "0.1"), (4, "0")):
            hook = "on_master" if n % 2 else "on_backup"
            runner.submit(HookJob(hook, (str(script), str(n), pause), proc.child_env(), 5, now))
        assert await runner.drain(10)
        task.cancel()
        return runner

    runner = run(go())
    assert out.read_text().split("\n")[:-1] == [
        "start 1", "end 1", "start 2", "end 2", "start 3", "end 3", "start 4", "end 4"]
    assert runner.stats["on_master"].runs == 2 and runner.stats["on_backup"].runs == 2
    # The later jobs waited for the first: their delay after submission includes its 0.3 s.
    assert runner.stats["on_backup"].last_delay is not None
    assert runner.stats["on_backup"].last_delay >= 0.3


def test_a_failing_and_a_hanging_hook_are_counted_and_the_next_one_still_runs(
    tmp_path: Path,
) -> None:
    done = tmp_path / "done"
    lg = RecordingLog()

    async def go() -> tuple[HookRunner, float]:
        runner = HookRunner(lg)
        task = asyncio.ensure_future(runner.run())
        now = asyncio.get_running_loop().time()
        env = proc.child_env()
        runner.submit(HookJob("on_fault", ("/bin/sh", "-c", "echo oops; exit 4"), env, 5, now))
        runner.submit(HookJob("on_backup", ("/bin/sleep", "30"), env, 0.3, now))
        runner.submit(HookJob("on_master", ("/nonexistent/hook",), env, 5, now))
        runner.submit(HookJob("on_stop", ("/usr/bin/touch", str(done)), env, 5, now))
        t0 = time.monotonic()
        assert await runner.drain(10)
        task.cancel()
        return runner, time.monotonic() - t0

    runner, took = run(go())
    assert took < 2  # the sleep was killed at 0.3 s
    st = runner.stats
    assert (st["on_fault"].failures, st["on_fault"].last_exit_code, st["on_fault"].last_output) == (
        1, 4, "oops")
    assert (st["on_backup"].timeouts, st["on_backup"].failures) == (1, 1)
    assert st["on_master"].last_result == "cannot run: No such file or directory"
    assert done.exists() and st["on_stop"].failures == 0
    events = [(level, e) for level, e, _ in lg.events]
    assert ("warning", "hook failed") in events
    assert ("error", "hook killed at its timeout") in events
    assert ("info", "hook output") in events
    status = runner.status(HooksConfig(on_master=("/nonexistent/hook",)))
    assert status["on_master"]["argv"] == ["/nonexistent/hook"] and status["on_fault"]["argv"] is None
    assert status["on_backup"]["timeouts"] == 1 and status["queued"] == 0


def test_hook_output_logged_is_bounded(tmp_path: Path) -> None:
    lg = RecordingLog()

    async def go() -> None:
        runner = HookRunner(lg)
        task = asyncio.ensure_future(runner.run())
        job = HookJob("on_master", ("/usr/bin/seq", "1", "500"), proc.child_env(), 5,
                      asyncio.get_running_loop().time())
        runner.submit(job)
        await runner.drain(5)
        task.cancel()

    run(go())
    lines = [kw["line"] for _, e, kw in lg.events if e == "hook output"]
    assert lines == [str(n) for n in range(1, 51)]
    finished = [kw for _, e, kw in lg.events if e == "hook finished"]
    assert finished[0]["lines_not_logged"] == 450


def test_hook_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    before = time.time()
    env = environment(hook="on_master", state="master", old_state="backup", reason="r",
                      node="fw1", vips=["10.0.0.1/24", "fd00::1/64"], interfaces=["lan0", "wan0"],
                      vrids=[51, 52], priority=90, track_down=("uplink",), sequence=7)
    assert "NOTIFY_SOCKET" not in env and "WATCHDOG_USEC" not in env
    assert env["PATH"]
    assert {k: v for k, v in env.items() if k.startswith("INVICTUSD_")} | {
        "INVICTUSD_TRANSITION_TIME": "x"} == {
        "INVICTUSD_HOOK": "on_master", "INVICTUSD_STATE": "master", "INVICTUSD_OLD_STATE": "backup",
        "INVICTUSD_REASON": "r", "INVICTUSD_NODE": "fw1", "INVICTUSD_VIPS": "10.0.0.1/24 fd00::1/64",
        "INVICTUSD_INTERFACES": "lan0 wan0", "INVICTUSD_VRIDS": "51 52", "INVICTUSD_PRIORITY": "90",
        "INVICTUSD_TRACK_DOWN": "uplink", "INVICTUSD_TRANSITION": "7",
        "INVICTUSD_TRANSITION_TIME": "x",
    }
    assert before <= float(env["INVICTUSD_TRANSITION_TIME"]) <= time.time()


# ---- the process adapter -----------------------------------------------------------------


def test_proc_exit_codes_output_and_kill_of_the_whole_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"

    async def go() -> list[proc.ProcResult]:
        lines: list[str] = []
        results = [await proc.run(["/bin/sh", "-c", "echo one; echo two >&2; exit 3"], 2,
                                  on_line=lines.append)]
        assert lines == ["one", "two"]
        # The shell starts a child and waits; at the timeout both die.
        results.append(await proc.run(
            ["/bin/sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], 0.3))
        results.append(await proc.run(["/bin/sh", "-c", "kill -KILL $$"], 2))
        results.append(await proc.run([str(tmp_path)], 2))
        return results

    code3, hung, killed, cannot = run(go())
    assert (code3.ok, code3.exit_code, code3.detail, code3.last_line) == (False, 3, "exit 3", "two")
    assert hung.timed_out and hung.detail.startswith("timed out after 0.3") and 0.3 <= hung.duration < 1
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{child}/stat").read_text().split()
        if stat[2] == "Z":
            break
        time.sleep(0.02)
    assert not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"
    assert killed.signal == 9 and killed.detail == "killed by signal 9"
    assert cannot.exit_code is None and cannot.detail.startswith("cannot run:")


def test_proc_output_is_bounded_and_cleaned() -> None:
    async def go() -> tuple[proc.ProcResult, list[str]]:
        lines: list[str] = []
        r = await proc.run(["/bin/sh", "-c",
                            "printf 'a\\tb\\033[31m\\n'; head -c 300000 /dev/zero | tr '\\0' x"],
                           5, on_line=lines.append)
        return r, lines

    r, lines = run(go())
    assert r.ok
    assert lines[0] == "a?b?[31m"
    assert all(len(line) <= proc.MAX_LINE for line in lines)
    assert sum(len(line) for line in lines) <= proc.MAX_OUTPUT


def test_proc_cancel_kills_the_program(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    async def go() -> None:
        task = asyncio.ensure_future(proc.run(["/bin/sh", "-c", f"echo $$ > {pidfile}; sleep 30"], 60))
        while not pidfile.exists() or not pidfile.read_text().strip():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go())
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            return
        if state == "Z":
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still running after cancel")


# ---- metrics -----------------------------------------------------------------------------

STATUS: dict[str, Any] = {
    "node": "fw1", "version": "0.1.0", "uptime": 12.5,
    "group": {"state": "master", "priority": 90, "base_priority": 150, "transitions": 2,
              "stepped_down": False, "demoted": False, "last_takeover": {"addresses_ms": 12.5}},
    "vrrp": [
        {"interface": "lan0", "virtual_id": 51, "version": 2, "family": 4, "state": "master",
         "priority": 90, "link_up": True, "advert_interval": 1, "master_advert_interval": 1,
         "master_down_interval": 3.4140625,
         "counters": {"adverts_sent": 10, "adverts_received": 3, "transitions": 2, "garp_sent": 20,
                      "addresses_restored": 0, "drops": {"ttl": 4, "auth_fail": 1}}},
        {"interface": "wan0", "virtual_id": 52, "version": 2, "family": 4, "state": "master",
         "priority": 90, "link_up": False,
         "counters": {"adverts_sent": 9, "adverts_received": 3, "transitions": 2, "garp_sent": 20,
                      "addresses_restored": 1, "drops": {}}},
    ],
    "track": {"priority_delta": -60, "faults": [], "checks": [
        {"name": "wan1", "state": "down", "runs": 3, "failed_runs": 1, "last_duration_ms": None},
        {"name": "uplink", "state": "up", "runs": 7, "failed_runs": 0, "last_duration_ms": 12.5},
    ]},
    "hooks": {"queued": 0, "timeout": 30.0,
              "on_master": {"runs": 1, "failures": 0, "timeouts": 0, "last_exit_code": 0,
                            "last_duration_ms": 250.0, "last_delay_ms": 4.0},
              "on_backup": {"runs": 0, "failures": 0, "timeouts": 0, "last_exit_code": None,
                            "last_duration_ms": None, "last_delay_ms": None}},
    "sync": {"synced": True, "link_up": True, "peer_entries": 1000, "local_entries": 5,
             "lag": 0.002, "resends": 3, "resyncs": 1, "auth_failures": 2,
             "last_handover": {"entries": 1000, "seconds": 0.015}, "last_bulk": None,
             "rates": {"events": 100.5}, "counters": {"events": 50000, "tx_bytes": 123456,
                                                      "weird-key": 1, "retransmits": 3},
             "some_new_field": "text"},
    "loop": {"stalls": 1, "max_lag_ms": 300.0, "lag_ms": 1.5, "callback_errors": 0},
}


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_render_values_of_a_snapshot() -> None:
    v = _values(metrics.render(STATUS).decode())

    def get(name: str, **labels: str) -> float:
        return v[(name, tuple(sorted(labels.items())))]

    assert get("invictusd_info", node="fw1", version="0.1.0") == 1
    assert get("invictusd_group_state", state="master") == 1
    assert get("invictusd_group_state", state="fault") == 0
    assert get("invictusd_group_priority") == 90 and get("invictusd_group_base_priority") == 150
    assert get("invictusd_vrrp_priority", interface="lan0", vrid="51", family="4") == 90
    assert get("invictusd_vrrp_link_up", interface="wan0", vrid="52", family="4") == 0
    assert get("invictusd_vrrp_adverts_sent_total", interface="wan0", vrid="52", family="4") == 9
    assert get("invictusd_vrrp_drops_total", interface="lan0", vrid="51", family="4", reason="ttl") == 4
    assert get("invictusd_vrrp_addresses_restored_total", interface="wan0", vrid="52", family="4") == 1
    assert get("invictusd_vrrp_info", interface="lan0", vrid="51", family="4", version="2") == 1
    assert get("invictusd_vrrp_master_down_interval_seconds", interface="lan0", vrid="51",
               family="4") == 3.4140625
    assert ("invictusd_vrrp_advert_interval_seconds",
            (("family", "4"), ("interface", "wan0"), ("vrid", "52"))) not in v  # not in the row
    assert get("invictusd_track_up", check="wan1") == 0 and get("invictusd_track_up", check="uplink") == 1
    assert get("invictusd_track_state", check="wan1", state="down") == 1
    assert get("invictusd_track_priority_delta") == -60 and get("invictusd_track_faults") == 0
    assert get("invictusd_track_last_duration_seconds", check="uplink") == 0.0125
    assert ("invictusd_track_last_duration_seconds", (("check", "wan1"),)) not in v
    assert get("invictusd_hook_last_duration_seconds", hook="on_master") == 0.25
    assert ("invictusd_hook_last_exit_code", (("hook", "on_backup"),)) not in v
    assert get("invictusd_sync_lag_seconds") == 0.002
    assert get("invictusd_sync_last_handover_seconds") == 0.015
    assert get("invictusd_sync_last_handover_entries") == 1000
    assert ("invictusd_sync_last_bulk_entries", ()) not in v  # none yet
    assert get("invictusd_group_last_takeover_seconds") == 0.0125
    assert get("invictusd_sync_events_total") == 50000 and get("invictusd_sync_resends_total") == 3
    assert get("invictusd_sync_counter_total", counter="retransmits") == 3
    assert ("invictusd_sync_counter_total", (("counter", "weird-key"),)) not in v
    assert get("invictusd_sync_rate", what="events") == 100.5
    assert ("invictusd_sync_rtt_seconds", ()) not in v  # absent in the snapshot: no series
    assert get("invictusd_loop_max_lag_seconds") == 0.3 and get("invictusd_loop_stalls_total") == 1


def test_metrics_of_v3_instances_are_apart_by_family() -> None:
    """Under VRRPv3 a table has an IPv4 and an IPv6 instance with the same interface and
    VRID (two rows of status): their series differ by ``family``, and the fields of v3
    (the version, the master's adopted interval) are served."""
    row = {"interface": "lan0", "virtual_id": 51, "version": 3, "state": "backup",
           "priority": 90, "link_up": True, "advert_interval": 1.0,
           "master_advert_interval": 0.05, "master_down_interval": 0.167578125,
           "counters": {"adverts_sent": 0, "adverts_received": 40, "transitions": 1,
                        "garp_sent": 0, "addresses_restored": 0, "drops": {"source": 2}}}
    rows = [{**row, "family": 4}, {**row, "family": 6, "counters": {
        **row["counters"], "adverts_received": 39, "drops": {"source": 3}}}]
    text = metrics.render({**STATUS, "vrrp": rows}).decode()
    v = _values(text)  # a duplicate sample would be lost here: count them in the text too
    assert text.count('invictusd_vrrp_priority{') == 2

    def get(name: str, family: str, **labels: str) -> float:
        key = {"interface": "lan0", "vrid": "51", "family": family, **labels}
        return v[(name, tuple(sorted(key.items())))]

    for family in ("4", "6"):
        assert get("invictusd_vrrp_info", family, version="3") == 1
        assert get("invictusd_vrrp_state", family, state="backup") == 1
        assert get("invictusd_vrrp_master_advert_interval_seconds", family) == 0.05
        assert get("invictusd_vrrp_advert_interval_seconds", family) == 1.0
        assert get("invictusd_vrrp_master_down_interval_seconds", family) == 0.167578125
    assert get("invictusd_vrrp_adverts_received_total", "4") == 40
    assert get("invictusd_vrrp_adverts_received_total", "6") == 39
    assert get("invictusd_vrrp_drops_total", "6", reason="source") == 3


def test_metrics_without_sync_track_or_hooks() -> None:
    bare = {k: v for k, v in STATUS.items() if k not in ("sync", "track", "hooks")}
    names = {name for name, _ in _values(metrics.render({**bare, "sync": None}).decode())}
    assert not any(n.startswith(("invictusd_sync_", "invictusd_hook_last")) for n in names)
    assert "invictusd_vrrp_master" in names


def test_metrics_bind_error_names_the_key() -> None:
    from invictusd.config import parse
    from tests.unit.test_config import MINIMAL

    cfg = parse(MINIMAL + '[metrics]\nlisten = "192.0.2.77:9842"\n', "/etc/i.toml")
    err = metrics.bind_error(cfg)
    assert err is not None and err.key == "metrics.listen" and "cannot listen" in err.message
    assert metrics.bind_error(parse(MINIMAL, "/etc/i.toml")) is None


# ---- journald ----------------------------------------------------------------------------


def test_journal_fields_are_native_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, dict[str, str]]] = []
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    structlog.reset_defaults()
    assert log.setup("info", io.StringIO(), journal=lambda m, **f: sent.append((m, f))) == "journal"
    lg = log.get(node="fw1")
    lg.warning("state change", old="backup", new="master", reason="x y", vrid=51,
               interface="lan0", kind="transition", tracks_down=["uplink"])
    lg.info("hook finished", hook="on_master", **{"duration-ms": 1.5, "message": "m", "_x": 1})
    lg.debug("not shown")
    structlog.reset_defaults()
    (msg, f), (_msg2, f2) = sent
    assert msg == ('state change: node=fw1 old=backup new=master reason=x y vrid=51 interface=lan0 '
                   'tracks_down=["uplink"]')
    assert f["PRIORITY"] == "4" and f["INVICTUSD_EVENT"] == "transition"
    assert (f["VRID"], f["INTERFACE"], f["OLD"], f["NEW"], f["NODE"]) == (
        "51", "lan0", "backup", "master", "fw1")
    assert json.loads(f["TRACKS_DOWN"]) == ["uplink"]
    assert f["SYSLOG_IDENTIFIER"] == "invictusd" and "TIMESTAMP" not in f and "LEVEL" not in f
    assert f2["PRIORITY"] == "6" and f2["INVICTUSD_EVENT"] == "hook_finished"
    assert f2["DURATION_MS"] == "1.5" and f2["INVICTUSD_MESSAGE"] == "m" and f2["INVICTUSD_X"] == "1"


def test_journal_stream_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "out", "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert log.on_journal_stream(f)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not log.on_journal_stream(f)  # stdout redirected elsewhere: not the journal
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not log.on_journal_stream(f)
    assert not log.on_journal_stream(io.StringIO())


def test_json_lines_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    structlog.reset_defaults()
    assert log.setup("info", out) == "json"
    log.get().info("state change", vrid=51, kind="transition")
    structlog.reset_defaults()
    line = json.loads(out.getvalue())
    assert line["event"] == "state change" and line["vrid"] == 51 and line["kind"] == "transition"
