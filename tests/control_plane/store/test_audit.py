"""The audit log (`store.audit`), on a SQLite file and on a real PostgreSQL server."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from onprem.control_plane.store import AuditEntry, Store
from tests.control_plane.store.helpers import Clock, assert_utc

# --- audit --------------------------------------------------------------------------------------------------


def audit_entry(at: datetime, **overrides: Any) -> AuditEntry:
    values: dict[str, Any] = {
        "at": at,
        "principal": "ci",
        "role": "operator",
        "method": "/onprem.v1.DatabaseService/Query",
        "group_name": "plant",
        "agent_id": "agent-1",
        "profile": "erp",
        "kind": "database",
        "code": 0,
        "outcome": "OK",
        "bytes_out": 5_000_000_000,
        "duration_ms": 12,
        "detail": "3 rows",
    }
    values.update(overrides)
    return AuditEntry(**values)


def test_audit_rows_read_back_newest_first_with_every_field(store: Store, clock: Clock) -> None:
    first_id = store.add_audit(audit_entry(clock.now))
    second = audit_entry(
        clock.now + timedelta(seconds=1),
        principal="admin",
        role="admin",
        method="/onprem.v1.AgentService/RevokeAgent",
        group_name=None,
        agent_id=None,
        profile=None,
        kind="admin",
        code=5,
        outcome="NOT_FOUND",
        bytes_out=0,
        detail="no agent has the id 'x'",
    )
    second_id = store.add_audit(second)
    assert second_id > first_id
    rows = store.list_audit()
    assert [r.id for r in rows] == [second_id, first_id]
    assert rows[0] == AuditEntry(**{**second.__dict__, "id": second_id})
    assert rows[1] == audit_entry(clock.now, id=first_id)
    assert_utc(rows[1].at)


def test_list_audit_honours_its_limit(store: Store, clock: Clock) -> None:
    ids = [store.add_audit(audit_entry(clock.now + timedelta(seconds=i))) for i in range(5)]
    assert [r.id for r in store.list_audit(limit=2)] == ids[:-3:-1]
    with pytest.raises(ValueError, match="limit"):
        store.list_audit(limit=0)


def test_audit_rows_written_as_a_batch_all_arrive_in_order(store: Store, clock: Clock) -> None:
    entries = [audit_entry(clock.now + timedelta(milliseconds=i), detail=f"row {i}") for i in range(50)]
    store.add_audits(entries)
    store.add_audits([])
    rows = store.list_audit(limit=100)
    assert [r.detail for r in reversed(rows)] == [f"row {i}" for i in range(50)]


def test_audit_detail_is_cut_short_rather_than_refused(store: Store, clock: Clock) -> None:
    store.add_audit(audit_entry(clock.now, detail="x" * 10_000))
    (row,) = store.list_audit()
    assert row.detail == "x" * 500
