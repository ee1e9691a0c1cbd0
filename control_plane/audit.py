"""One audit row per operator request, written off the request's path.

Rows are queued and written by one background task in batches (one commit for
all that queued up while the previous batch was written), so a slow store
never slows a request and a busy control plane does not commit per request.
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


class AuditLog:
    def __init__(self, write_many: Callable[[Sequence[AuditEntry]], object],
                 run_blocking: Callable[..., asyncio.Future[object]], max_queued: int = 10_000) -> None:
        self._write_many = write_many
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
        try:
            while True:
                batch = [await self._queue.get()]
                while len(batch) < BATCH and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                try:
                    await self._run_blocking(self._write_many, batch)
                except Exception:
                    log.exception("could not write %d audit rows", len(batch))
        finally:
            rest = [self._queue.get_nowait() for _ in range(self._queue.qsize())]
            try:
                self._write_many(rest)
            except Exception:
                log.exception("could not write %d audit rows at shutdown", len(rest))
