"""One audit row per operator request, written off the request's path.

Rows are queued and written by one background task, so a slow store never
slows a request; the queue is bounded, and on overflow rows are counted and
logged as dropped rather than holding memory without limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from control_plane.store import AuditEntry

log = logging.getLogger("onprem.control_plane.audit")


class AuditLog:
    def __init__(self, write: Callable[[AuditEntry], object], run_blocking: Callable[..., asyncio.Future[object]],
                 max_queued: int = 10_000) -> None:
        self._write = write
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
                entry = await self._queue.get()
                await self._store(entry)
        finally:
            while not self._queue.empty():
                self._write_now(self._queue.get_nowait())

    async def _store(self, entry: AuditEntry) -> None:
        try:
            await self._run_blocking(self._write, entry)
        except Exception:
            log.exception("could not write an audit row for %s", entry.method)

    def _write_now(self, entry: AuditEntry) -> None:
        try:
            self._write(entry)
        except Exception:
            log.exception("could not write an audit row for %s", entry.method)
