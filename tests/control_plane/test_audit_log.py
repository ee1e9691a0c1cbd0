"""The audit log's background writer: batches, the linger, and nothing lost on shutdown."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from onprem.control_plane.audit import AuditLog
from onprem.control_plane.store import AuditEntry


def entry(n: int) -> AuditEntry:
    return AuditEntry(at=dt.datetime.now(dt.UTC), principal=f"p{n}", role="admin", method="/m", kind="request",
                      code=0, outcome="OK")


class Store:
    """Records each batch the writer hands over."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def write_many(self, entries: Sequence[AuditEntry]) -> None:
        if entries:
            self.batches.append([e.principal for e in entries])


def inline(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(fn(*args))
    return future


async def test_rows_that_come_within_the_linger_are_written_in_one_batch() -> None:
    store = Store()
    log = AuditLog(store.write_many, inline, linger=0.2)
    writer = asyncio.create_task(log.run())
    log.record(entry(1))
    await asyncio.sleep(0.05)  # the first row waits for company
    log.record(entry(2))
    log.record(entry(3))
    await asyncio.sleep(0.4)
    assert store.batches == [["p1", "p2", "p3"]]
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)


async def test_a_row_waiting_in_the_linger_is_written_when_the_writer_is_cancelled() -> None:
    store = Store()
    log = AuditLog(store.write_many, inline, linger=10)
    writer = asyncio.create_task(log.run())
    log.record(entry(1))
    await asyncio.sleep(0.05)
    log.record(entry(2))
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    assert store.batches == [["p1", "p2"]]


async def test_without_a_linger_each_quiet_row_is_written_at_once() -> None:
    store = Store()
    log = AuditLog(store.write_many, inline, linger=0)
    writer = asyncio.create_task(log.run())
    log.record(entry(1))
    await asyncio.sleep(0.05)
    log.record(entry(2))
    await asyncio.sleep(0.05)
    assert store.batches == [["p1"], ["p2"]]
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
