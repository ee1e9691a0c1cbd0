"""Audit retention: a background task of the control plane that deletes audit rows older than the retention.

Every `interval` (and once soon after start), rows older than now minus the retention are deleted, a batch
at a time, each batch its own short transaction run off the event loop, with a pause between batches so
that the audit writer and the API get the store (and SQLite's one write lock) in between: a first prune of
years of rows never holds the store for long. A row exactly as old as the retention, or newer, is kept.
Replicas sharing a store all prune; deleting what another already deleted is nothing.

A failure (the store is down) is logged and tried again at the next interval; the task ends only when
cancelled (the server's shutdown), and lets the cancellation through.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("onprem.control_plane.audit")

#: `onprem-control-plane serve --audit-retention-days`' default.
DEFAULT_RETENTION_DAYS = 365
#: Rows deleted per transaction.
BATCH = 1000
#: Seconds between prunes.
INTERVAL = 3600.0
#: Seconds after start before the first prune (start-up has enough to do).
FIRST_DELAY = 60.0
#: Seconds between two batches of one prune.
PAUSE = 0.05


class AuditRetention:
    """Prunes the audit log with `prune(before, batch)` (the store's, run off the loop by `run_blocking`)."""

    def __init__(self, prune: Callable[[dt.datetime, int], int],
                 run_blocking: Callable[..., Awaitable[int]], retention: dt.timedelta, *,
                 interval: float = INTERVAL, first_delay: float = FIRST_DELAY, batch: int = BATCH,
                 pause: float = PAUSE, clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        if retention <= dt.timedelta(0):
            raise ValueError(f"the audit retention must be more than 0, got {retention}")
        self._prune = prune
        self._run_blocking = run_blocking
        self.retention = retention
        self._interval = interval
        self._first_delay = first_delay
        self._batch = batch
        self._pause = pause
        self._clock = clock

    async def prune_once(self) -> int:
        """Delete every row older than the retention, batch by batch; how many were deleted."""
        cut_off = self._clock() - self.retention
        total = 0
        while True:
            deleted = await self._run_blocking(self._prune, cut_off, self._batch)
            total += deleted
            if deleted < self._batch:
                break
            await asyncio.sleep(self._pause)
        if total:
            log.info("audit retention: deleted %d rows older than %s", total, cut_off.isoformat())
        return total

    async def run(self) -> None:
        """Prune every interval until cancelled."""
        await asyncio.sleep(self._first_delay)
        while True:
            try:
                await self.prune_once()
            except Exception:
                log.exception("audit retention: could not prune the audit log; trying again in %.0f s",
                              self._interval)
            await asyncio.sleep(self._interval)
