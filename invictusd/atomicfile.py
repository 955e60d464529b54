"""Replace a file's content in one step: a reader sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600,
                 durable: bool = False) -> None:
    """Write ``data`` to a temporary file next to ``path`` (``mode``), then rename it over ``path``.

    ``durable`` also flushes the content to the disk before the rename (keys, records that must
    survive a crash). Raises ``OSError``; the temporary file is removed when the write fails.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{id(data):x}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
