"""Dependencies run one way: the cores and codecs never import I/O.

The protocol cores (VRRP, sync, the flow types, the config) and the pure codecs take their
inputs and the time as arguments; a socket, an event loop or pyroute2 reaching them would
make them untestable without a kernel and would let I/O creep into the state machines.
Checked in a fresh interpreter per module, so transitive imports count too.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import invictusd

ROOT = Path(invictusd.__file__).resolve().parent
CORE_PACKAGES = ("invictusd.vrrp", "invictusd.sync")
CORE_MODULES = ("invictusd.flows", "invictusd.config", "invictusd.cbpf")
CODECS = ("invictusd.io.ctnetlink", "invictusd.io.transcode")
FORBIDDEN = ("asyncio", "socket", "selectors", "uvloop", "pyroute2", "structlog")
# invictusd modules that hold sockets, loops or the daemon: never under a core.
ADAPTERS = ("invictusd.io", "invictusd.daemon", "invictusd.replication", "invictusd.applier",
            "invictusd.control", "invictusd.worker", "invictusd.loopmon", "invictusd.installed")


def _modules() -> list[str]:
    out = list(CORE_MODULES) + list(CODECS)
    for pkg in CORE_PACKAGES:
        path = ROOT / pkg.split(".")[1]
        out += [f"{pkg}.{m.name}" for m in pkgutil.iter_modules([str(path)])]
    return sorted(out)


@pytest.mark.parametrize("module", _modules())
def test_core_module_imports_no_io(module: str) -> None:
    code = ("import sys, json; import " + module + "; "
            "print(json.dumps(sorted(m for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent)
    loaded = set(json.loads(out.stdout))
    bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN)
    assert not bad, f"{module} imports {bad}"
    if module not in CODECS:
        adapters = sorted(m for m in loaded if any(m == a or m.startswith(a + ".") for a in ADAPTERS))
        assert not adapters, f"{module} imports {adapters}"


def test_the_check_can_fail() -> None:
    """The test above would see a forbidden import (it is not vacuous)."""
    code = "import sys, json; import invictusd.replication; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent)
    assert "asyncio" in json.loads(out.stdout)
