"""Agents (`store.agents`), on a SQLite file and on a real PostgreSQL server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from onprem.control_plane.store import AdvertisedProfile, AgentAlreadyExists, AgentRevoked, Store
from onprem.tunnel.errors import NotFound
from tests.control_plane.store.helpers import BIG_SERIAL, Clock, add_agent, assert_utc

# --- agents -------------------------------------------------------------------------------------------------


def test_added_agent_reads_back_with_its_big_serial_and_utc_times(store: Store, clock: Clock) -> None:
    added = add_agent(store, "agent-1")
    got = store.get_agent("agent-1")
    assert got == added
    assert got.cert_serial == BIG_SERIAL
    assert got.group_name == "plant"
    assert got.enrolled_at == clock.now
    assert got.last_seen_at is None
    assert not got.revoked
    assert got.profiles == ()
    assert_utc(got.enrolled_at)
    assert_utc(got.cert_expires_at)
    assert store.get_agent("agent-unknown") is None


def test_times_given_in_another_zone_read_back_as_the_same_instant_in_utc(store: Store) -> None:
    store.ensure_group("plant")
    plus_five = timezone(timedelta(hours=5))
    expires = datetime(2030, 6, 1, 12, 0, tzinfo=plus_five)
    row = store.add_agent("agent-1", "a1", "plant", "h", "0.1.0", 7, expires)
    assert row.cert_expires_at == expires
    assert row.cert_expires_at.hour == 7
    assert_utc(row.cert_expires_at)


def test_naive_times_are_refused(store: Store) -> None:
    add_agent(store, "agent-1")
    with pytest.raises(ValueError, match="timezone-aware"):
        store.touch_agent("agent-1", datetime(2030, 1, 1))


def test_agent_in_an_unknown_group_is_refused(store: Store) -> None:
    with pytest.raises(NotFound, match="group 'ghost' does not exist"):
        store.add_agent("agent-1", "a1", "ghost", "h", "0.1.0", 1, datetime(2030, 1, 1, tzinfo=UTC))
    assert store.list_agents() == []


def test_agent_ids_are_unique(store: Store) -> None:
    add_agent(store, "agent-1")
    with pytest.raises(AgentAlreadyExists, match="agent-1"):
        add_agent(store, "agent-1", name="other")


def test_agents_are_listed_by_group_then_name_and_filtered_by_group(store: Store) -> None:
    add_agent(store, "agent-3", group="plant", name="zulu")
    add_agent(store, "agent-1", group="plant", name="alpha")
    add_agent(store, "agent-2", group="office", name="mike")
    assert [a.agent_id for a in store.list_agents()] == ["agent-2", "agent-1", "agent-3"]
    assert [a.agent_id for a in store.list_agents("plant")] == ["agent-1", "agent-3"]
    assert store.list_agents("nowhere") == []


def test_record_hello_replaces_the_advertised_profiles_and_marks_the_agent_seen(
    store: Store, clock: Clock
) -> None:
    add_agent(store, "agent-1")
    clock.advance(timedelta(minutes=1))
    first = store.record_hello(
        "agent-1",
        "db01",
        "0.2.0",
        [
            {"name": "erp", "kind": "database", "read_only": True, "dialect": "postgresql"},
            AdvertisedProfile("share", "folder"),
        ],
    )
    assert first.hostname == "db01"
    assert first.version == "0.2.0"
    assert first.last_seen_at == clock.now
    assert first.profiles == (
        AdvertisedProfile("erp", "database", True, "postgresql"),
        AdvertisedProfile("share", "folder", False, ""),
    )
    second = store.record_hello("agent-1", "db01", "0.2.1", [AdvertisedProfile("crm", "app")])
    assert second.profiles == (AdvertisedProfile("crm", "app"),)
    assert store.get_agent("agent-1") == second


def test_record_hello_for_an_unknown_agent_raises_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="agent-ghost"):
        store.record_hello("agent-ghost", "h", "0.1.0", [])


def test_record_hello_refuses_a_profile_without_a_name(store: Store) -> None:
    add_agent(store, "agent-1")
    with pytest.raises(ValueError, match="non-empty name and kind"):
        store.record_hello("agent-1", "h", "0.1.0", [{"name": "", "kind": "database"}])


def test_touch_agent_moves_last_seen_forward_but_never_back(store: Store, clock: Clock) -> None:
    add_agent(store, "agent-1")
    later = clock.now + timedelta(seconds=30)
    store.touch_agent("agent-1", later)
    got = store.get_agent("agent-1")
    assert got is not None
    assert got.last_seen_at == later
    store.touch_agent("agent-1", later - timedelta(seconds=10))
    got = store.get_agent("agent-1")
    assert got is not None
    assert got.last_seen_at == later


def test_revoked_agent_keeps_its_first_revocation(store: Store, clock: Clock) -> None:
    add_agent(store, "agent-1")
    clock.advance(timedelta(hours=1))
    revoked = store.revoke_agent("agent-1", "laptop stolen")
    assert revoked.revoked
    assert revoked.revoked_at == clock.now
    assert revoked.revoked_reason == "laptop stolen"
    clock.advance(timedelta(hours=1))
    again = store.revoke_agent("agent-1", "second thoughts")
    assert again == revoked


def test_revoking_an_unknown_agent_raises_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="agent-ghost"):
        store.revoke_agent("agent-ghost", "why not")


def test_set_certificate_records_a_renewal(store: Store) -> None:
    add_agent(store, "agent-1")
    expires = datetime(2031, 1, 1, tzinfo=UTC)
    renewed = store.set_certificate("agent-1", BIG_SERIAL + 1, expires)
    assert renewed.cert_serial == BIG_SERIAL + 1
    assert renewed.cert_expires_at == expires


def test_a_revoked_agent_cannot_get_a_new_certificate(store: Store) -> None:
    add_agent(store, "agent-1")
    store.revoke_agent("agent-1", "compromised")
    with pytest.raises(AgentRevoked, match="revoked"):
        store.set_certificate("agent-1", 99, datetime(2031, 1, 1, tzinfo=UTC))
    got = store.get_agent("agent-1")
    assert got is not None
    assert got.cert_serial == BIG_SERIAL
    with pytest.raises(NotFound):
        store.set_certificate("agent-ghost", 99, datetime(2031, 1, 1, tzinfo=UTC))


def test_profiles_of_group_unites_live_agents_of_that_group_only(store: Store) -> None:
    for agent_id, group in [
        ("agent-1", "plant"),
        ("agent-2", "plant"),
        ("agent-3", "plant"),
        ("agent-4", "office"),
    ]:
        add_agent(store, agent_id, group=group)
    store.record_hello(
        "agent-1", "h", "1", [AdvertisedProfile("erp", "database"), AdvertisedProfile("share", "folder")]
    )
    store.record_hello(
        "agent-2", "h", "1", [AdvertisedProfile("erp", "database"), AdvertisedProfile("crm", "app")]
    )
    store.record_hello("agent-3", "h", "1", [AdvertisedProfile("secret", "database")])
    store.record_hello("agent-4", "h", "1", [AdvertisedProfile("hr", "database")])
    store.revoke_agent("agent-3", "decommissioned")
    assert store.profiles_of_group("plant") == {("database", "erp"), ("folder", "share"), ("app", "crm")}
    assert store.profiles_of_group("office") == {("database", "hr")}
    assert store.profiles_of_group("nowhere") == set()


def test_count_agents_leaves_out_revoked_agents(store: Store) -> None:
    add_agent(store, "agent-1")
    add_agent(store, "agent-2")
    store.revoke_agent("agent-2", "gone")
    assert store.count_agents("plant") == 1
    assert store.count_agents("nowhere") == 0
