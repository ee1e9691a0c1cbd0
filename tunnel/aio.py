"""The asyncio pieces both ends of the tunnel share.

`protocol` decides what to send; this module owns how it is sent: one writer
task per stream (grpc.aio allows one outstanding write per call), a bounded
byte budget for data frames, and waiting for per-request credit.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import grpc

from onprem.tunnel.budget import BudgetExceeded, Budgets
from onprem.tunnel.errors import RequestGone, StreamClosed

__all__ = ["EOF", "CreditWaiters", "FrameWriter", "RequestGone", "StreamClosed"]

F = TypeVar("F")

#: What grpc.aio's `read()` returns at the end of a stream (missing from grpc-stubs).
EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]

#: Data frames queued for the wire, across all requests of a stream.
DEFAULT_MAX_QUEUED_BYTES = 4 * 1024 * 1024
#: Frames of any kind queued for the wire (see `Budgets.max_queued_frames`).
DEFAULT_MAX_QUEUED_FRAMES = Budgets().max_queued_frames
#: Bounds of one combined message: well under the 8 MiB message limit.
MAX_BATCH_FRAMES = 256
MAX_BATCH_BYTES = 1024 * 1024


class FrameWriter(Generic[F]):
    """The single writer of one stream, fed by a queue bounded in bytes.

    Control frames (credit, cancel, end, ping) go through `send_nowait` and
    never wait: they are small, and the reader loop must never block behind
    data. Data frames go through `send`, which waits while the queue holds
    `max_queued_bytes`; each request's credit already bounds its own share.
    """

    def __init__(
        self,
        write: Callable[[F], Awaitable[object]],
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        *,
        combine: Callable[[list[F]], F] | None = None,
        max_queued_frames: int = DEFAULT_MAX_QUEUED_FRAMES,
        on_overflow: Callable[[BudgetExceeded], None] | None = None,
    ) -> None:
        self._write = write
        # Control frames never wait, so only a count bounds them: a peer that makes us queue
        # `max_queued_frames` (pongs to its pings, say) without reading them is not reading at all.
        self._max_frames = max_queued_frames
        self._on_overflow = on_overflow
        # With `combine`, frames that queued up while the previous write was in flight go
        # out as one message: a gRPC write costs far more than its bytes under load.
        self._combine = combine
        self._max = max_queued_bytes
        self._queue: deque[tuple[F, int]] = deque()
        self._queued_bytes = 0
        self._nonempty = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._empty = asyncio.Event()
        self._empty.set()
        self._closed: BaseException | None = None
        loop = asyncio.get_running_loop()
        self._clock = loop.time
        #: Loop time of the last frame written; heartbeats read it.
        self.last_write = self._clock()
        #: Loop time at which the write in progress began, None between writes: a write that
        #: lasts is a peer that does not read.
        self.writing_since: float | None = None

    @property
    def queued_frames(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def send_nowait(self, frame: F) -> None:
        """Queue a control frame; raises StreamClosed once the writer closed (or overflowed)."""
        if self._closed is not None:
            raise StreamClosed(str(self._closed))
        if len(self._queue) >= self._max_frames:
            overflow = BudgetExceeded(
                "queued frames",
                f"the peer left {len(self._queue)} frames unread (the limit is {self._max_frames}): "
                "it does not read its stream",
            )
            self.close(overflow)
            if self._on_overflow is not None:
                self._on_overflow(overflow)
            raise StreamClosed(str(overflow))
        self._queue.append((frame, 0))
        self._empty.clear()
        self._nonempty.set()

    async def send(self, frame: F, size: int) -> None:
        while self._queued_bytes >= self._max:
            if self._closed is not None:
                raise StreamClosed(str(self._closed))
            self._space.clear()
            await self._space.wait()
        if self._closed is not None:
            raise StreamClosed(str(self._closed))
        self._queued_bytes += size
        self._queue.append((frame, size))
        self._empty.clear()
        self._nonempty.set()

    async def flush(self) -> None:
        """Wait until every queued frame is written (or the writer closed)."""
        await self._empty.wait()

    def close(self, why: BaseException) -> None:
        """Stop accepting frames and wake every waiter; idempotent."""
        if self._closed is None:
            self._closed = why
        self._space.set()
        self._nonempty.set()
        self._empty.set()

    async def run(self) -> None:
        """Write queued frames until closed; a failed write closes the writer and raises."""
        try:
            while True:
                if not self._queue:
                    self._empty.set()
                    if self._closed is not None:
                        return
                    self._nonempty.clear()
                    await self._nonempty.wait()
                    continue
                frame, size = self._queue.popleft()
                if self._combine is not None and self._queue:
                    frames = [frame]
                    while self._queue and len(frames) < MAX_BATCH_FRAMES and size < MAX_BATCH_BYTES:
                        more, more_size = self._queue.popleft()
                        frames.append(more)
                        size += more_size
                    frame = self._combine(frames)
                self.writing_since = self._clock()
                await self._write(frame)
                self.writing_since = None
                self.last_write = self._clock()
                if size:
                    self._queued_bytes -= size
                    if self._queued_bytes < self._max:
                        self._space.set()
        except BaseException as exc:
            self.close(exc)
            raise


class CreditWaiters:
    """Lets senders of many requests wait for credit granted to their own request."""

    def __init__(self) -> None:
        self._events: dict[int, asyncio.Event] = {}

    async def wait_for(self, rid: int, needed: int, credit: Callable[[int], int | None]) -> None:
        """Return once `credit(rid)` covers `needed`; raise RequestGone if it turns None."""
        while True:
            available = credit(rid)
            if available is None:
                raise RequestGone(f"request {rid} ended")
            if available >= needed:
                return
            event = self._events.setdefault(rid, asyncio.Event())
            event.clear()
            await event.wait()

    def wake(self, rid: int) -> None:
        event = self._events.get(rid)
        if event is not None:
            event.set()

    def forget(self, rid: int) -> None:
        """Drop a request's waiter, waking it so it sees the request is gone."""
        event = self._events.pop(rid, None)
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        for event in self._events.values():
            event.set()
