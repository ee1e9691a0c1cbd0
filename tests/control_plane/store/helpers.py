"""What the store's tests share: a settable clock, rows read raw, an agent added, threads run together."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from onprem.control_plane.store import AgentRow, Store

# Real CA serials are up to 20 bytes; this one does not fit in any SQL integer.
BIG_SERIAL = 2**159 + 123_456_789


class Clock:
    """A settable clock, so that tests decide what "now" is."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


def raw_rows(store: Store, table: str) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(f"SELECT * FROM {table}")).all()]


def add_agent(store: Store, agent_id: str, group: str = "plant", name: str | None = None) -> AgentRow:
    store.ensure_group(group)
    return store.add_agent(
        agent_id=agent_id,
        name=name or agent_id,
        group_name=group,
        hostname=f"{agent_id}.example.internal",
        version="0.1.0",
        cert_serial=BIG_SERIAL,
        cert_expires_at=datetime(2030, 2, 1, tzinfo=UTC),
    )


def run_together(count: int, work: Callable[[int], object]) -> list[object]:
    """Run `work(i)` in `count` threads released at the same moment; return results or exceptions."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def assert_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)
