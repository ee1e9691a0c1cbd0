"""Audit retention (`control_plane.audit_retention`): what it deletes, how, and how it stops."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from onprem.control_plane.audit_retention import DEFAULT_RETENTION_DAYS, AuditRetention
from onprem.control_plane.cli import build_parser
from onprem.control_plane.store import AuditEntry, AuditFilter, AuditScope, Store

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)
RETENTION = dt.timedelta(days=30)


async def inline(fn: Callable[..., int], *args: Any) -> int:
    return fn(*args)


def entry(at: dt.datetime, detail: str) -> AuditEntry:
    return AuditEntry(at=at, principal="ci", role="operator", method="/onprem.v1.DatabaseService/Query",
                      kind="database", code=0, outcome="OK", group_name="plant", detail=detail)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'cp.db'}")
    s.create_schema()
    return s


def kept(store: Store) -> list[str]:
    return [r.detail for r in store.list_audit_events(AuditFilter(), AuditScope(None, groupless=True), limit=100)]


async def test_a_prune_never_deletes_a_row_as_old_as_the_retention_or_newer(store: Store) -> None:
    limit = NOW - RETENTION
    store.add_audits([entry(limit - dt.timedelta(days=400), "ancient"), entry(limit - dt.timedelta(microseconds=1), "old"),
                      entry(limit, "exactly the retention"), entry(limit + dt.timedelta(microseconds=1), "newer"),
                      entry(NOW, "now")])
    retention = AuditRetention(store.prune_audit, inline, RETENTION, clock=lambda: NOW)
    assert await retention.prune_once() == 2
    assert kept(store) == ["now", "newer", "exactly the retention"]


async def test_a_prune_deletes_batch_after_batch_until_none_is_left(store: Store) -> None:
    store.add_audits([entry(NOW - dt.timedelta(days=60, seconds=i), f"old {i}") for i in range(7)])
    store.add_audits([entry(NOW, "new")])
    batches: list[int] = []

    def prune(before: dt.datetime, batch: int) -> int:
        deleted = store.prune_audit(before, batch)
        batches.append(deleted)
        return deleted

    retention = AuditRetention(prune, inline, RETENTION, batch=3, pause=0, clock=lambda: NOW)
    assert await retention.prune_once() == 7
    assert batches == [3, 3, 1]
    assert kept(store) == ["new"]


async def test_the_task_prunes_each_interval_survives_a_store_failure_and_ends_when_cancelled() -> None:
    calls: list[dt.datetime] = []
    pruned = asyncio.Event()

    def prune(before: dt.datetime, _batch: int) -> int:
        calls.append(before)
        if len(calls) == 1:
            raise OSError("the store is down")
        if len(calls) == 3:
            pruned.set()
        return 0

    retention = AuditRetention(prune, inline, RETENTION, interval=0.01, first_delay=0, clock=lambda: NOW)
    task = asyncio.create_task(retention.run())
    await asyncio.wait_for(pruned.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls[:3] == [NOW - RETENTION] * 3


def test_a_retention_of_zero_or_less_is_refused() -> None:
    with pytest.raises(ValueError, match="more than 0"):
        AuditRetention(lambda _b, _n: 0, inline, dt.timedelta(0))


def test_serve_keeps_a_year_by_default_and_zero_keeps_every_row() -> None:
    parser = build_parser()
    assert parser.parse_args(["serve"]).audit_retention_days == DEFAULT_RETENTION_DAYS == 365
    assert parser.parse_args(["serve", "--audit-retention-days", "0"]).audit_retention_days == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--audit-retention-days", "-1"])
