"""A kernel dump read from the event loop in bounded steps (the kernel is each node's table).

Bulks to a returning peer, the stale-entry sweep after a resync, the hand-over of inherited
entries, digests and ``invictusd tables`` all read the conntrack table by a dump filtered by
mark in the kernel. ``Scan`` reads it chunk by chunk, transcodes each chunk into wire
records and hands them on; when its consumer has no room (``ready`` is False) it stops
reading and the rest of the dump waits in the kernel until ``resume``. Any failure ends the
scan and is reported, never left half-open.

The kernel produces a dump's chunks inside the ``send`` and ``recv`` calls, walking the
conntrack hash table: with a sparse table (buckets sized for ``nf_conntrack_max``, few
entries) one call walks a million buckets, a quarter of a second measured here. Those calls
therefore run on a thread of their own (``WALKER``; a system call releases the GIL), never
on the event loop, which keeps sending adverts meanwhile. The loop only transcodes.

The kernel walks with softirqs off on its CPU (``local_bh_disable`` in
``ctnetlink_dump_table``) until the chunk is full, so a filter that matches few entries
makes one call walk the whole table: 256-280 ms for a million entries in 2^20 buckets,
measured, during which every packet that CPU was to receive waits (a VRRP advert among
them: a stepped-down node's re-mark dump, matching nothing, made it take over at 0.05 s).
A scan therefore asks the kernel for a *dense* set (``mark``/``mask``: every replicated
entry; a chunk fills after a hundred or so, a call ends within a millisecond) and makes
any narrower choice here (``select``), at the price of transcoding what it drops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from invictusd.io.conntrack import DumpReader
from invictusd.io.transcode import Batch, EventTranscoder, select_entries

# One thread for every dump of the process: dumps take turns chunk by chunk, and nothing
# else (address moves have their own executor) ever waits behind a kernel walk.
WALKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ct-dump")
STALL_SECONDS = 10.0  # a dump call that long has stalled: the scan fails (and is retried)

T = TypeVar("T")


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
        select: tuple[int, int] | None = None,
    ) -> None:
        self.name = name
        self.mark, self.mask = mark, mask
        self.select = select  # (mark, mask) of the entries handed on; None: all the kernel's
        self.transcoder = transcoder
        self.on_batch, self.on_done, self.on_error, self.ready = on_batch, on_done, on_error, ready
        self.entries = 0
        self.started = 0.0
        self.seconds = 0.0
        self.paused = False
        self.finished = False
        self._task: asyncio.Task[None] | None = None
        self._room: asyncio.Future[None] | None = None

    def start(self) -> None:
        self.started = time.perf_counter()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"scan {self.name}")

    async def _run(self) -> None:
        try:
            reader = DumpReader(timeout=STALL_SECONDS)
        except OSError as e:
            self._fail(e)
            return
        # The reader is closed once no walker call uses it any more, even after a cancel
        # (a call already running in the walker cannot be stopped; it ends on its own).
        pending: list[Future[object]] = []
        try:
            await self._walk(pending, reader.start, self.mark, self.mask)
            while True:
                if not self.ready():
                    self.paused = True
                    self._room = asyncio.get_running_loop().create_future()
                    await self._room
                    self.paused = False
                view, n = await self._walk(pending, reader.read)
                batch = self.transcoder.transcode(view, n, dump=True)
                self.entries += len(batch.records) + batch.skipped
                if self.select is not None:
                    batch = select_entries(batch, *self.select)
                self.on_batch(batch)
                if batch.done:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a kernel error reply, a malformed message, ENOBUFS, a stall
            self._fail(e)
            return
        finally:
            if pending:
                pending[-1].add_done_callback(lambda _: reader.close())  # at once if done
            else:
                reader.close()
        self.finished = True
        self.seconds = time.perf_counter() - self.started
        self.on_done(self)

    async def _walk(self, pending: list[Future[object]], fn: Callable[..., T], *args: object) -> T:
        fut: Future[T] = WALKER.submit(fn, *args)
        pending[:] = [fut]  # type: ignore[list-item]
        return await asyncio.wrap_future(fut)

    def resume(self) -> None:
        """Read on, if the consumer has room again (call after it made room)."""
        if self._room is not None and not self._room.done() and self.ready():
            self._room.set_result(None)

    def cancel(self) -> None:
        self.finished = True
        if self._task is not None:
            self._task.cancel()

    def _fail(self, e: BaseException) -> None:
        self.finished = True
        self.on_error(self, e)
