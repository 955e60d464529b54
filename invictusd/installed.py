"""What the daemon installed on the system, recorded in its runtime directory *as* it installs.

The record is written before an address is added and updated after it is removed, so a
daemon killed at any moment (SIGKILL, OOM, power-cut of the process) leaves a record that
covers everything it may have left behind. ``invictusd cleanup`` (the unit's ExecStopPost)
and the next start undo exactly what the record lists, item by item and best effort,
whatever the configuration on disk says by then (edited since, or no longer valid).

The file is JSON (``installed.json``, mode 600), replaced atomically on every change.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from invictusd.atomicfile import write_atomic

RECORD = "installed.json"
FORMAT = 1


class RecordError(ValueError):
    """The record exists but cannot be read: cleanup says so and does what it can."""


@dataclass(slots=True)
class Snapshot:
    """The record's content: interface -> addresses ("10.0.0.1/24"), nft tables, owner pid."""

    addresses: dict[str, list[str]] = field(default_factory=dict)
    nft_tables: list[str] = field(default_factory=list)
    pid: int = 0

    @property
    def empty(self) -> bool:
        return not any(self.addresses.values()) and not self.nft_tables


def read(directory: str | os.PathLike[str]) -> Snapshot:
    """The record in ``directory`` (an empty one if there is none)."""
    path = Path(directory) / RECORD
    try:
        data: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return Snapshot()
    except (OSError, ValueError) as e:
        raise RecordError(f"{path}: cannot read the record of installed state: {e}") from None
    try:
        if data.get("format") != FORMAT:
            raise RecordError(f"{path}: unknown record format {data.get('format')!r}")
        addresses = {str(k): [str(a) for a in v] for k, v in data["addresses"].items()}
        return Snapshot(addresses, [str(t) for t in data["nft_tables"]], int(data.get("pid", 0)))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise RecordError(f"{path}: malformed record of installed state: {e!r}") from None


class Installed:
    """The live record of one daemon run (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / RECORD
        self._state = Snapshot(pid=os.getpid())

    @property
    def state(self) -> Snapshot:
        return self._state

    def start(self) -> None:
        """Begin a fresh record (call after the previous run's record has been undone)."""
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._state = Snapshot(pid=os.getpid())
        self._write()

    def adding(self, ifname: str, addresses: Iterable[str]) -> None:
        """Call *before* adding addresses."""
        have = self._state.addresses.setdefault(ifname, [])
        new = [a for a in addresses if a not in have]
        if new:
            have.extend(new)
            self._write()

    def removed(self, ifname: str, addresses: Iterable[str]) -> None:
        """Call *after* removing addresses (or finding them gone)."""
        have = self._state.addresses.get(ifname, [])
        gone = set(addresses)
        kept = [a for a in have if a not in gone]
        if len(kept) != len(have):
            if kept:
                self._state.addresses[ifname] = kept
            else:
                del self._state.addresses[ifname]
            self._write()

    def installing_table(self, table: str) -> None:
        if table not in self._state.nft_tables:
            self._state.nft_tables.append(table)
            self._write()

    def removed_table(self, table: str) -> None:
        if table in self._state.nft_tables:
            self._state.nft_tables.remove(table)
            self._write()

    def addresses_of(self, ifname: str) -> list[str]:
        return list(self._state.addresses.get(ifname, []))

    def discard(self) -> None:
        """Nothing is installed any more: remove the file."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _write(self) -> None:
        s = self._state
        data = {"format": FORMAT, "pid": s.pid, "addresses": s.addresses, "nft_tables": s.nft_tables}
        write_atomic(self.path, json.dumps(data).encode())
