"""write_atomic: readers never see a half-written file, failures leave no temporary behind."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from invictusd.atomicfile import write_atomic


def test_a_reader_never_sees_the_file_empty_while_it_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "script.py"
    content = b"print('hello')\n" * 4096
    write_atomic(path, content)
    stop = threading.Event()

    def rewrite() -> None:
        while not stop.is_set():
            write_atomic(path, content, mode=0o644)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        seen = {len(path.read_bytes()) for _ in range(3000)}
    finally:
        stop.set()
        writer.join()
    assert seen == {len(content)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["script.py"]


def test_mode_and_content(tmp_path: Path) -> None:
    path = tmp_path / "key"
    write_atomic(path, b"secret\n", durable=True)
    assert path.read_bytes() == b"secret\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    write_atomic(path, b"old")
    os.mkdir(tmp_path / "blocker")
    with pytest.raises(OSError):
        write_atomic(tmp_path / "blocker", b"new")  # rename over a directory fails
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "record.json"]
