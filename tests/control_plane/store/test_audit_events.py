"""The audit log as the audit API reads it, and its pruning (`store.audit_events`), on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from onprem.control_plane.store import AuditEntry, AuditFilter, AuditScope, Store
from tests.control_plane.store.helpers import Clock
from tests.control_plane.store.test_audit import audit_entry

EVERYTHING = AuditScope(groups=None, groupless=True)


def details(rows: list[AuditEntry]) -> list[str]:
    return [r.detail for r in rows]


def test_rows_come_newest_first_by_time_then_id_whatever_order_they_were_written_in(
        store: Store, clock: Clock) -> None:
    at = clock.now
    store.add_audits([audit_entry(at + timedelta(seconds=2), detail="late"),
                      audit_entry(at, detail="early"),
                      audit_entry(at + timedelta(seconds=2), detail="late, written after")])
    assert details(store.list_audit_events(AuditFilter(), EVERYTHING, limit=10)) == [
        "late, written after", "late", "early"]


def test_a_cursor_continues_below_the_last_row_even_between_rows_of_the_same_time(
        store: Store, clock: Clock) -> None:
    store.add_audits([audit_entry(clock.now, detail=f"row {i}") for i in range(5)])
    first = store.list_audit_events(AuditFilter(), EVERYTHING, limit=2)
    assert first[-1].id is not None
    rest = store.list_audit_events(AuditFilter(), EVERYTHING, limit=10, after=(first[-1].at, first[-1].id))
    assert details(first) + details(rest) == [f"row {i}" for i in (4, 3, 2, 1, 0)]


def test_the_time_range_includes_its_start_and_excludes_its_end(store: Store, clock: Clock) -> None:
    at = clock.now
    store.add_audits([audit_entry(at + timedelta(seconds=s), detail=str(s)) for s in range(4)])
    wanted = AuditFilter(start=at + timedelta(seconds=1), end=at + timedelta(seconds=3))
    assert details(store.list_audit_events(wanted, EVERYTHING, limit=10)) == ["2", "1"]


@pytest.mark.parametrize(("field", "value", "column"), [
    ("token_id", "0123456789abcdef", "token_id"), ("group", "erp", "group_name"), ("agent_id", "agent-2", "agent_id"),
    ("profile", "crm", "profile"), ("kind", "folder", "kind"), ("outcome", "NOT_FOUND", "outcome"),
])
def test_each_filter_keeps_only_its_rows(store: Store, clock: Clock, field: str, value: str, column: str) -> None:
    store.add_audits([audit_entry(clock.now, detail="other"),
                      audit_entry(clock.now, detail="match", **{column: value})])
    wanted: dict[str, Any] = {field: value}
    assert details(store.list_audit_events(AuditFilter(**wanted), EVERYTHING, limit=10)) == ["match"]


def test_a_scope_of_groups_hides_other_groups_and_rows_of_no_group(store: Store, clock: Clock) -> None:
    store.add_audits([audit_entry(clock.now, group_name="plant", detail="plant"),
                      audit_entry(clock.now, group_name="erp", detail="erp"),
                      audit_entry(clock.now, group_name=None, kind="admin", detail="none")])
    plant = AuditScope(groups=frozenset({"plant"}))
    assert details(store.list_audit_events(AuditFilter(), plant, limit=10)) == ["plant"]
    # Asking for another group inside the scope finds nothing: the scope is ANDed with every filter.
    assert store.list_audit_events(AuditFilter(group="erp"), plant, limit=10) == []
    every_group = AuditScope(groups=None, groupless=False)
    assert details(store.list_audit_events(AuditFilter(), every_group, limit=10)) == ["erp", "plant"]
    assert details(store.list_audit_events(AuditFilter(), EVERYTHING, limit=10)) == ["none", "erp", "plant"]


def test_a_scope_hides_its_kinds(store: Store, clock: Clock) -> None:
    store.add_audits([audit_entry(clock.now, kind="database", detail="query"),
                      audit_entry(clock.now, kind="admin", detail="drain")])
    operator = AuditScope(groups=frozenset({"plant"}), hidden_kinds=frozenset({"admin", "enroll"}))
    assert details(store.list_audit_events(AuditFilter(), operator, limit=10)) == ["query"]
    assert store.list_audit_events(AuditFilter(kind="admin"), operator, limit=10) == []


def test_the_limit_is_at_least_one_and_at_most_the_stores_maximum(store: Store, clock: Clock) -> None:
    with pytest.raises(ValueError, match="limit"):
        store.list_audit_events(AuditFilter(), EVERYTHING, limit=0)
    store.add_audits([audit_entry(clock.now)])
    assert len(store.list_audit_events(AuditFilter(), EVERYTHING, limit=10**9)) == 1


# --- pruning ---------------------------------------------------------------------------------------------------


def test_pruning_deletes_only_rows_older_than_the_cut_off_never_one_at_it_or_newer(store: Store, clock: Clock) -> None:
    cut_off = clock.now
    store.add_audits([audit_entry(cut_off - timedelta(microseconds=1), detail="old"),
                      audit_entry(cut_off - timedelta(days=400), detail="ancient"),
                      audit_entry(cut_off, detail="at the cut-off"),
                      audit_entry(cut_off + timedelta(microseconds=1), detail="new")])
    assert store.prune_audit(cut_off) == 2
    assert details(store.list_audit_events(AuditFilter(), EVERYTHING, limit=10)) == ["new", "at the cut-off"]
    assert store.prune_audit(cut_off) == 0


def test_pruning_deletes_a_batch_at_a_time_oldest_first(store: Store, clock: Clock) -> None:
    store.add_audits([audit_entry(clock.now - timedelta(days=10, seconds=i), detail=str(i)) for i in range(5)])
    assert store.prune_audit(clock.now, batch=2) == 2
    assert details(store.list_audit_events(AuditFilter(), EVERYTHING, limit=10)) == ["0", "1", "2"]
    assert [store.prune_audit(clock.now, batch=2) for _ in range(3)] == [2, 1, 0]
