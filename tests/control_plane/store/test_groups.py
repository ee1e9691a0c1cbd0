"""Groups (`store.groups`), on a SQLite file and on a real PostgreSQL server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from onprem.control_plane.store import Store, validate_group_name
from tests.control_plane.store.helpers import Clock, assert_utc, run_together

# --- groups -------------------------------------------------------------------------------------------------


def test_ensure_group_creates_once_and_keeps_the_first_creation_time(store: Store, clock: Clock) -> None:
    first = store.ensure_group("plant")
    clock.advance(timedelta(hours=1))
    again = store.ensure_group("plant")
    assert again == first
    assert store.get_group("plant") == first
    assert store.get_group("nowhere") is None
    assert_utc(first.created_at)
    assert first.created_at == datetime(2030, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)


def test_groups_are_listed_by_name(store: Store) -> None:
    for name in ["zeta", "alpha", "mid-1"]:
        store.ensure_group(name)
    assert [g.name for g in store.list_groups()] == ["alpha", "mid-1", "zeta"]


def test_concurrent_ensure_group_creates_the_group_exactly_once(store: Store) -> None:
    results = run_together(8, lambda _i: store.ensure_group("racy"))
    assert not [r for r in results if isinstance(r, Exception)]
    assert [g.name for g in store.list_groups()] == ["racy"]


@pytest.mark.parametrize("name", ["", "has space", "dot.ted", "slash/", "x" * 64, "émoji"])
def test_invalid_group_names_are_refused_with_the_rule(store: Store, name: str) -> None:
    with pytest.raises(ValueError, match="letters, digits, '-' or '_'"):
        validate_group_name(name)
    with pytest.raises(ValueError):
        store.ensure_group(name)
    with pytest.raises(ValueError):
        store.create_enrollment_token(name)
