"""The daemon under "systemd": its stdout is the journal stream, so its events reach journald
as native fields through the python3-systemd binding.

journald is played by a datagram socket bound at /run/systemd/journal/socket in a private
mount namespace (a tmpfs over /run), inside fw1's network namespace: the binding's
sd_journal_sendv() writes to it exactly what it would write to the real journal.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns.daemons import lab_pair

HARNESS = r'''
import json, os, signal, socket, struct, subprocess, sys, time

def parse(data):
    """One native-protocol datagram: KEY=value lines, or KEY, LE64 length, binary value."""
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:
            k, n = line, struct.unpack("<Q", data[nl + 1 : nl + 9])[0]
            v = data[nl + 9 : nl + 9 + n]
            i = nl + 9 + n + 1
        fields[k.decode()] = v.decode()
    return fields

config, logpath = sys.argv[1], sys.argv[2]
os.makedirs("/run/systemd/journal", exist_ok=True)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("/run/systemd/journal/socket")
sock.settimeout(0.2)
with open(logpath, "wb") as out:
    st = os.fstat(out.fileno())
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    daemon = subprocess.Popen([sys.executable, "-m", "invictusd", "run", "--config", config],
                              stdout=out, stderr=subprocess.STDOUT, env=env)
records, deadline = [], time.monotonic() + 15
try:
    while time.monotonic() < deadline:
        try:
            records.append(parse(sock.recv(1 << 20)))
        except socket.timeout:
            pass
        if any(r.get("INVICTUSD_EVENT") == "transition" and r.get("NEW") == "master"
               for r in records):
            break
finally:
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(15)
while True:  # what it logged while stopping
    try:
        records.append(parse(sock.recv(1 << 20)))
    except socket.timeout:
        break
print(json.dumps({"records": records, "exit": daemon.returncode}))
'''


def test_events_reach_journald_as_native_fields(tmp_path: Path) -> None:
    if importlib.util.find_spec("systemd") is None or importlib.util.find_spec(
            "systemd.journal") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("python3-systemd is missing: scripts/setup.sh installs it")
        pytest.skip("python3-systemd is not installed (scripts/setup.sh installs it)")
    with lab_pair() as pair:
        lab = pair.lab
        config = pair.configure("fw1")
        harness = lab.write_file("journal_harness.py", HARNESS)
        stdout_file = lab.workdir / "fw1-stdout.log"
        proc = lab.popen("fw1", "unshare", "--mount", "--propagation", "private", "sh", "-c",
                         'mount -t tmpfs tmpfs /run && exec "$0" "$@"', sys.executable,
                         str(harness), str(config), str(stdout_file),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        result = json.loads(out)
        assert result["exit"] == 0
        records = result["records"]
        transitions = [r for r in records if r.get("INVICTUSD_EVENT") == "transition"]
        to_master = [r for r in transitions if r["NEW"] == "master"]
        assert {r["VRID"] for r in to_master} == {"51", "52"}
        lan = next(r for r in to_master if r["VRID"] == "51")
        assert lan["INTERFACE"] == lab.config.lan_if and lan["OLD"] == "backup"
        assert lan["PRIORITY"] == "6" and lan["SYSLOG_IDENTIFIER"] == "invictusd"
        assert lan["MESSAGE"].startswith("state change: ") and "new=master" in lan["MESSAGE"]
        assert lan["REASON"].startswith("master down on")
        assert lan["NODE"] == "fw1" and "CODE_FILE" in lan  # the binding adds its own fields
        # Warnings keep their priority (the master leaving at SIGTERM logs one per interface).
        leaving = [r for r in transitions if r["OLD"] == "master"]
        assert leaving and all(r["PRIORITY"] == "4" for r in leaving)
        assert any(r.get("INVICTUSD_EVENT") == "stopped" for r in records)
        # Everything went to the journal: nothing on the stream as JSON lines.
        assert not any(line.startswith(("{", "<")) for line in
                       stdout_file.read_text().splitlines()), stdout_file.read_text()[:500]
