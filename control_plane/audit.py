"""One audit row per operator request, written off the request's path.

Rows are queued and written by one background task in batches (one commit for
all that queued up while the previous batch was written, and for what comes
within `LINGER` of the first row of a batch), so a slow store never slows a
request and a busy control plane does not commit per request: under load, one
commit carries the rows of tens of requests, where the store's per-commit cost
(a write transaction, the WAL) used to be paid by every few.
The queue is bounded: on overflow rows are counted and logged as dropped
rather than holding memory without limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from onprem.control_plane.store import AuditEntry

log = logging.getLogger("onprem.control_plane.audit")

#: The most rows written in one transaction.
BATCH = 500
#: How long the first row of a batch waits for others before the batch is written, seconds.
LINGER = 0.05


class AuditLog:
    def __init__(self, write_many: Callable[[Sequence[AuditEntry]], object],
                 run_blocking: Callable[..., asyncio.Future[object]], max_queued: int = 10_000,
                 linger: float = LINGER) -> None:
        self._write_many = write_many
        self._linger = linger
        self._run_blocking = run_blocking
        self._queue: asyncio.Queue[AuditEntry] = asyncio.Queue(max_queued)
        self.dropped = 0

    def record(self, entry: AuditEntry) -> None:
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped in (1, 100) or self.dropped % 10_000 == 0:
                log.error("audit queue full: %d rows dropped so far", self.dropped)

    async def run(self) -> None:
        """Write rows until cancelled, then flush what is queued."""
        #: Rows taken from the queue and not handed to the store yet: flushed too if cancelled meanwhile.
        batch: list[AuditEntry] = []
        try:
            while True:
                batch = [await self._queue.get()]
                if self._linger > 0 and self._queue.qsize() < BATCH - 1:
                    await asyncio.sleep(self._linger)
                while len(batch) < BATCH and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                writing, batch = batch, []
                try:
                    await self._run_blocking(self._write_many, writing)
                except Exception:
                    log.exception("could not write %d audit rows", len(writing))
        finally:
            rest = batch + [self._queue.get_nowait() for _ in range(self._queue.qsize())]
            try:
                self._write_many(rest)
            except Exception:
                log.exception("could not write %d audit rows at shutdown", len(rest))
