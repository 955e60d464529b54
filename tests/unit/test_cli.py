"""The command line and the systemd unit, without a running daemon."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from invictusd import __version__
from invictusd.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOOD = """
[[vrrp]]
interface = "lan0"
virtual_address = "10.0.0.1/24"
virtual_id = 51
password = "secret"
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "invictusd.toml"
    p.write_text(text)
    p.chmod(0o600)
    return p


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"invictusd {__version__}"


def test_check_accepts_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(_write(tmp_path, GOOD))]) == 0
    assert "OK: group of 1: lan0 (VRID 51)" in capsys.readouterr().out


def test_check_names_file_line_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, GOOD.replace('"secret"', '"much-too-long"'))
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:6: vrrp[0].password:" in err and "at most 8" in err


def test_check_refuses_a_world_readable_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 8 item 4: a config file holding a password that others can read is refused."""
    path = _write(tmp_path, GOOD)
    path.chmod(0o644)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:6: vrrp[0].password:" in err and "readable or writable by group or others" in err
    assert "secret" not in err


def test_check_refuses_sync_without_a_key_and_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 8 item 1: the VRRP password (public on the LAN) is never the sync key."""
    text = GOOD + '\n[sync]\nenabled = true\ninterface = "sync0"\npeer_address = "10.9.0.2"\n'
    path = _write(tmp_path, text)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sync.key_file: is required" in err and "invictusd keygen" in err


def test_keygen_writes_a_private_random_key_that_check_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "etc" / "sync.key"
    assert main(["keygen", "--output", str(key)]) == 0
    out = capsys.readouterr().out
    data = key.read_bytes()
    assert key.stat().st_mode & 0o777 == 0o600
    assert len(data) == 65 and int(data[:64], 16) > 0
    assert data.strip().decode() not in out  # the key itself is never printed
    assert "scp" in out and "key_file" in out
    # A second run does not overwrite it (the peer holds a copy) unless forced.
    assert main(["keygen", "--output", str(key)]) == 1
    assert key.read_bytes() == data
    assert main(["keygen", "--output", str(key), "--force"]) == 0
    assert key.read_bytes() != data and key.stat().st_mode & 0o777 == 0o600
    text = GOOD + ('\n[sync]\nenabled = true\ninterface = "sync0"\npeer_address = "10.9.0.2"\n'
                   f'key_file = "{key}"\n')
    assert main(["check", "--config", str(_write(tmp_path, text))]) == 0


def test_status_of_a_missing_daemon_exits_3(tmp_path: Path) -> None:
    assert main(["status", "--socket", str(tmp_path / "nothing.sock")]) == 3


def test_entry_point_runs_as_a_module() -> None:
    out = subprocess.run([sys.executable, "-m", "invictusd", "--version"], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == f"invictusd {__version__}"


def test_systemd_unit_verifies_clean(tmp_path: Path) -> None:
    """systemd-analyze verify, with the ExecStart path pointed at this environment's binary."""
    exe = shutil.which("invictusd")
    assert exe, "invictusd is not installed (pip install -e .)"
    unit = (ROOT / "systemd/invictusd.service").read_text().replace("/usr/local/bin/invictusd", exe)
    path = tmp_path / "invictusd.service"
    path.write_text(unit)
    proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "invictusd.service" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr


def test_check_reports_every_error_in_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = GOOD.replace("virtual_id = 51", "virtual_id = 300") + "start_as_mastr = true\n"
    path = _write(tmp_path, text)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"invictusd: configuration error: {path}:5: vrrp[0].virtual_id: 300 is out of range 1..255",
        f"invictusd: configuration error: {path}:7: vrrp[0].start_as_mastr: unknown key; "
        'did you mean "start_as_master"?',
        "invictusd: 2 errors",
    ]


def test_metrics_of_a_missing_daemon_exits_3(tmp_path: Path) -> None:
    assert main(["metrics", "--socket", str(tmp_path / "nothing.sock")]) == 3


def test_status_text_shows_every_check_and_the_hooks() -> None:
    from invictusd.cli import format_status

    s = {
        "version": "0.1.0", "node": "fw1", "pid": 1, "uptime": 5,
        "group": {"state": "fault", "stepped_down": False, "demoted": False, "demoted_reason": "",
                  "preempt": True, "transitions": 3, "priority": 90, "base_priority": 150},
        "vrrp": [],
        "track": {"priority_delta": -60, "faults": ["uplink"], "checks": [
            {"name": "uplink", "kind": "command", "command": ["/usr/local/sbin/check-uplink"],
             "state": "down", "weight": "fault", "last_detail": "exit 1", "last_duration_ms": 12.0,
             "last_output": "no route"},
            {"name": "wan1", "kind": "interface", "interface": "wan1", "state": "down",
             "weight": "-60", "last_detail": "carrier or admin state down",
             "last_duration_ms": 0.0, "last_output": None},
        ]},
        "hooks": {"queued": 0, "on_master": {"argv": ["/x"], "runs": 2, "failures": 1,
                                             "last_result": "exit 1", "last_duration_ms": 30.0}},
    }
    text = format_status(s)
    assert "track    priority 90 (configured 150, delta -60), FAULT by uplink" in text
    assert ("uplink       DOWN    weight fault last exit 1 in 12 ms: no route  "
            "[/usr/local/sbin/check-uplink]") in text
    assert "wan1         DOWN    weight -60   last carrier or admin state down  [interface wan1]" in text
    assert "hooks    on_master ran 2x, 1 failed, last exit 1 in 30 ms" in text


def test_systemd_unit_keeps_secrets_out_of_core_dumps() -> None:
    """Issue 8 item 4: a core dump would hold the password and the sync key."""
    unit = (ROOT / "systemd/invictusd.service").read_text().splitlines()
    assert "LimitCORE=0" in unit
    assert any(line.startswith("ExecStopPost=") and " cleanup " in line for line in unit)


def test_node_ids_cannot_collide_on_wide_subnets() -> None:
    """Issue 8 item 12: the low 16 bits of the sync address collided beyond /16."""
    from ipaddress import IPv4Address as A

    from invictusd.replication import node_ids

    a, b = A("10.0.0.1"), A("10.1.0.1")  # same low 16 bits
    assert node_ids(a, b) == (1, 2) and node_ids(b, a) == (2, 1)
    assert node_ids(a, b)[0] == node_ids(b, a)[1]
