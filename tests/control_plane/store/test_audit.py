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


# --- what the console reads: filtered rows, activity per minute ---------------------------------------------


def test_audit_rows_are_filtered_by_groups_group_token_and_outcome(store: Store, clock: Clock) -> None:
    ids = {
        "plant-ok": store.add_audit(audit_entry(clock.now, group_name="plant", token_id="aaaa")),
        "plant-denied": store.add_audit(audit_entry(clock.now, group_name="plant", token_id="bbbb", code=7,
                                                    outcome="PERMISSION_DENIED")),
        "office-ok": store.add_audit(audit_entry(clock.now, group_name="office", token_id="aaaa")),
        "no-group": store.add_audit(audit_entry(clock.now, group_name=None, token_id=None, kind="auth", code=16,
                                                outcome="UNAUTHENTICATED")),
    }

    def listed(**filters: Any) -> list[int | None]:
        return [r.id for r in store.list_audit(**filters)]

    everything = [ids["no-group"], ids["office-ok"], ids["plant-denied"], ids["plant-ok"]]
    assert listed() == everything
    assert listed(groups=None) == everything
    assert listed(groups={"plant"}) == [ids["plant-denied"], ids["plant-ok"]]
    assert listed(groups=set()) == []
    assert listed(group="office") == [ids["office-ok"]]
    assert listed(groups={"plant"}, group="office") == []
    assert listed(token_id="aaaa") == [ids["office-ok"], ids["plant-ok"]]
    assert listed(outcome="PERMISSION_DENIED") == [ids["plant-denied"]]
    assert listed(group="plant", token_id="aaaa", outcome="OK") == [ids["plant-ok"]]
    assert listed(limit=2) == everything[:2]


def test_activity_counts_requests_and_errors_per_group_and_minute(store: Store, clock: Clock) -> None:
    minute = clock.now.replace(second=0, microsecond=0)
    since = minute - timedelta(minutes=1)
    store.add_audits([
        audit_entry(since - timedelta(seconds=1)),  # before the window
        audit_entry(minute + timedelta(seconds=1)),
        audit_entry(minute + timedelta(seconds=59, microseconds=999_999), code=14, outcome="UNAVAILABLE"),
        audit_entry(minute + timedelta(seconds=30), code=1, outcome="CANCELLED"),  # the caller left: no error
        audit_entry(minute + timedelta(minutes=2), kind="folder", code=5, outcome="NOT_FOUND"),
        audit_entry(minute, group_name="office", kind="app"),
        audit_entry(minute, kind="admin"),  # not a data request
        audit_entry(minute, group_name=None, kind="database"),
    ])
    activity = store.audit_activity(since, {"database", "folder", "app"})
    assert [(a.group_name, a.minute, a.requests, a.errors) for a in activity] == [
        ("office", minute, 1, 0),
        ("plant", minute, 3, 1),
        ("plant", minute + timedelta(minutes=2), 1, 1),
    ]
    assert_utc(activity[0].minute)
    assert [a.group_name for a in store.audit_activity(since, {"database", "app"}, groups={"office"})] == ["office"]
    assert store.audit_activity(since, {"database"}, groups=set()) == []
