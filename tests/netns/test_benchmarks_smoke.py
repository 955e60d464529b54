"""The benchmark suite works end to end: the smallest replication scenario, both stacks once.

Validity only (every entry replicated, the takeover put them all in the kernel, bytes were
counted), never speed: timings on a shared CI machine say nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks import scenarios as S
from benchmarks.stacks import STACKS
from invictusd.lab import netns
from invictusd.lab.topology import Lab, LabConfig

SIZE = 2000


@pytest.mark.skipif(shutil.which("conntrackd") is None or shutil.which("keepalived") is None,
                    reason="needs conntrackd and keepalived (scripts/setup.sh installs them)")
def test_smallest_replication_scenario_is_valid_for_both_stacks() -> None:
    with Lab(LabConfig(ipv6=False, conntrack_events=1)) as lab:
        for name in ("invictusd", "baseline"):
            r = S.replication(lab, STACKS[name](lab), SIZE, update_delete=True)
            assert r["stack"] == name
            assert r["committed"] >= SIZE
            assert r["events_per_s"] > 0 and r["generator_rate"] > 0
            for key in ("bytes_per_new", "bytes_per_update", "bytes_per_destroy"):
                assert r[key] > 0, (name, key, r)
            assert any(k.startswith("fw2/") for k in r["peak_rss_mb"]), r
        # Torn down: no daemon of either stack left in the firewalls.
        for node in ("fw1", "fw2"):
            pids = netns.run("ip", "netns", "pids", lab.ns(node), check=False).stdout.split()
            comms = {Path(f"/proc/{p}/comm").read_text().strip() for p in pids if p.isdigit()}
            assert not comms & {"conntrackd", "keepalived"}, comms
            assert not any(c.startswith("python") for c in comms), comms
