"""A kernel dump read from the event loop in bounded steps (the kernel is each node's table).

Bulks to a returning peer, the stale-entry sweep after a resync, the hand-over of inherited
entries, digests and ``invictusd tables`` all read the conntrack table by a dump filtered by
mark in the kernel. ``Scan`` reads it a few chunks per wake-up, transcodes each chunk into
wire records and hands them on; when its consumer has no room (``ready`` is False) it stops
reading and the rest of the dump waits in the kernel until ``resume``. Any failure ends the
scan and is reported, never left half-open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from invictusd.io.conntrack import DumpReader
from invictusd.io.transcode import Batch, EventTranscoder

CHUNKS_PER_WAKE = 4  # ~32 KiB of messages each: a few ms of work per wake-up


class Scan:
    def __init__(
        self,
        name: str,
        mark: int,
        mask: int,
        transcoder: EventTranscoder,
        on_batch: Callable[[Batch], None],
        on_done: Callable[[Scan], None],
        on_error: Callable[[Scan, BaseException], None],
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.name = name
        self.mark, self.mask = mark, mask
        self.transcoder = transcoder
        self.on_batch, self.on_done, self.on_error, self.ready = on_batch, on_done, on_error, ready
        self.entries = 0
        self.started = 0.0
        self.seconds = 0.0
        self.paused = False
        self.finished = False
        self._reader: DumpReader | None = None

    def start(self) -> None:
        self.started = time.perf_counter()
        try:
            self._reader = DumpReader()
            self._reader.start(self.mark, self.mask)
        except OSError as e:
            self._fail(e)
            return
        asyncio.get_running_loop().add_reader(self._reader.fileno(), self._step)

    def _step(self) -> None:
        reader = self._reader
        if reader is None:
            return
        for _ in range(CHUNKS_PER_WAKE):
            if not self.ready():
                self._pause()
                return
            try:
                chunk = reader.read()
                if chunk is None:
                    return
                batch = self.transcoder.transcode(chunk[0], chunk[1], dump=True)
            except Exception as e:  # a kernel error reply, a malformed message, ENOBUFS ...
                self._fail(e)
                return
            self.entries += len(batch.records) + batch.skipped
            self.on_batch(batch)
            if batch.done:
                self._close()
                self.finished = True
                self.seconds = time.perf_counter() - self.started
                self.on_done(self)
                return

    def _pause(self) -> None:
        if not self.paused and self._reader is not None:
            asyncio.get_running_loop().remove_reader(self._reader.fileno())
            self.paused = True

    def resume(self) -> None:
        """Read on, if the consumer has room again (call after it made room)."""
        if self.paused and self._reader is not None and self.ready():
            self.paused = False
            asyncio.get_running_loop().add_reader(self._reader.fileno(), self._step)
            self._step()

    def cancel(self) -> None:
        self._close()
        self.finished = True

    def _fail(self, e: BaseException) -> None:
        self._close()
        self.finished = True
        self.on_error(self, e)

    def _close(self) -> None:
        if self._reader is not None:
            if not self.paused:
                asyncio.get_running_loop().remove_reader(self._reader.fileno())
            self._reader.close()
            self._reader = None
