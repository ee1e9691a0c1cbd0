"""The control plane's store, on a SQLite file and on a real PostgreSQL server."""

from __future__ import annotations

import hashlib
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url, text

from onprem.control_plane.store import (
    ENROLLMENT_TTL_MAX,
    AdvertisedProfile,
    AgentAlreadyExists,
    AgentRevoked,
    AgentRow,
    AuditEntry,
    EnrollmentTokenExpired,
    EnrollmentTokenInvalid,
    EnrollmentTokenRow,
    EnrollmentTokenUsed,
    Store,
    default_url,
    validate_agent_name,
    validate_group_name,
)
from onprem.tunnel.errors import NotFound
from tests.support.postgres import PostgresServer

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


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'control-plane.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    # A database per test keeps tests independent without cleaning tables up.
    name = f"store_{uuid.uuid4().hex[:16]}"
    server.create_database(name)
    return server.url(name)


@pytest.fixture
def store(store_url: str, clock: Clock) -> Iterator[Store]:
    with Store(store_url, clock=clock) as s:
        s.create_schema()
        yield s


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


# --- schema and connection ----------------------------------------------------------------------------------


def test_create_schema_twice_keeps_data_and_a_new_store_sees_it(store_url: str, clock: Clock) -> None:
    with Store(store_url, clock=clock) as first:
        first.create_schema()
        first.ensure_group("plant")
    with Store(store_url, clock=clock) as second:
        second.create_schema()
        assert [g.name for g in second.list_groups()] == ["plant"]


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'cp.db'}") as store:
        store.create_schema()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 1000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_repr_names_the_database_but_hides_its_password(store_url: str) -> None:
    url = make_url(store_url)
    with Store(store_url) as store:
        shown = repr(store)
    assert url.database is not None
    assert url.database in shown
    if url.password:
        assert str(url.password) not in shown


def test_default_url_is_a_sqlite_file_in_the_state_directory(tmp_path: Path) -> None:
    with Store(default_url(tmp_path)) as store:
        store.create_schema()
        store.ensure_group("plant")
    assert (tmp_path / "control-plane.db").is_file()


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


@pytest.mark.parametrize("name", ["a", "plant-7", "EU_west", "x" * 63])
def test_valid_group_names_are_accepted(name: str) -> None:
    assert validate_group_name(name) == name


def test_agent_names_may_be_host_names_but_not_arbitrary_text() -> None:
    assert validate_agent_name("db01.frankfurt.example.com") == "db01.frankfurt.example.com"
    with pytest.raises(ValueError, match="agent name"):
        validate_agent_name("db01 frankfurt")
    with pytest.raises(ValueError):
        validate_agent_name("")


# --- operator tokens ----------------------------------------------------------------------------------------


def test_api_token_authenticates_and_carries_its_role_and_groups(store: Store) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant", "office", "plant"])
    assert token.startswith(f"onp_{row.token_id}_")
    assert row.groups == ("plant", "office")
    authed = store.authenticate_api_token(token)
    assert authed == row
    assert authed is not None
    assert authed.role == "operator"
    assert not authed.revoked
    assert_utc(authed.created_at)


def test_every_api_token_is_distinct(store: Store) -> None:
    tokens = {store.create_api_token(f"t{i}", "admin", ["*"])[0] for i in range(20)}
    assert len(tokens) == 20


def test_api_token_with_a_wrong_secret_is_rejected(store: Store) -> None:
    token, _row = store.create_api_token("ci", "admin", ["*"])
    wrong_last = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert store.authenticate_api_token(wrong_last) is None
    other, _ = store.create_api_token("other", "admin", ["*"])
    # The right id with another token's (valid) secret must not pass either.
    prefix, token_id, _secret = token.split("_", 2)
    spliced = f"{prefix}_{token_id}_{other.split('_', 2)[2]}"
    assert store.authenticate_api_token(spliced) is None


def test_api_token_with_an_unknown_id_is_rejected(store: Store) -> None:
    token, _row = store.create_api_token("ci", "admin", ["*"])
    unknown = "onp_" + "0" * 16 + "_" + token.split("_", 2)[2]
    assert store.authenticate_api_token(unknown) is None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: "",
        lambda t: "onp_",
        lambda t: t + "x",
        lambda t: t[:-1],
        lambda t: " " + t,
        lambda t: "Bearer " + t,
        lambda t: t.replace("onp_", "onpe_", 1),
        lambda t: t.replace("onp_", "ONP_", 1),
        lambda t: t.upper(),
        lambda t: t.replace("_", "-"),
    ],
    ids=[
        "empty",
        "prefix-only",
        "suffix",
        "truncated",
        "leading-space",
        "with-scheme",
        "enrollment-prefix",
        "upper-prefix",
        "upper",
        "dashes",
    ],
)
def test_malformed_api_tokens_are_rejected(store: Store, mangle: Callable[[str], str]) -> None:
    token, _row = store.create_api_token("ci", "admin", ["*"])
    assert store.authenticate_api_token(token) is not None
    assert store.authenticate_api_token(mangle(token)) is None


def test_revoked_api_token_is_rejected_and_keeps_its_first_revocation_time(
    store: Store, clock: Clock
) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant"])
    clock.advance(timedelta(minutes=5))
    revoked = store.revoke_api_token(row.token_id)
    assert revoked.revoked
    assert revoked.revoked_at == clock.now
    assert store.authenticate_api_token(token) is None
    clock.advance(timedelta(minutes=5))
    assert store.revoke_api_token(row.token_id).revoked_at == revoked.revoked_at
    assert [t.revoked_at for t in store.list_api_tokens()] == [revoked.revoked_at]


def test_revoking_an_unknown_api_token_raises_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="no operator token"):
        store.revoke_api_token("0" * 16)


def test_api_tokens_are_listed_oldest_first(store: Store, clock: Clock) -> None:
    _t1, first = store.create_api_token("first", "admin", ["*"])
    clock.advance(timedelta(seconds=1))
    _t2, second = store.create_api_token("second", "operator", [])
    assert store.list_api_tokens() == [first, second]


def test_api_token_secret_is_stored_only_as_its_sha256(store: Store) -> None:
    token, row = store.create_api_token("ci", "admin", ["*"])
    secret = token.split("_", 2)[2]
    (stored,) = raw_rows(store, "api_tokens")
    assert not any(isinstance(v, str) and secret in v for v in stored)
    assert hashlib.sha256(secret.encode()).hexdigest() in stored
    assert row.token_id in stored


@pytest.mark.parametrize(
    ("role", "groups", "message"),
    [
        ("root", ["*"], "invalid role"),
        ("admin", ["bad group"], "invalid group name"),
        ("admin", "plant", "not a single string"),
    ],
)
def test_create_api_token_refuses_bad_roles_and_groups(
    store: Store, role: Any, groups: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        store.create_api_token("ci", role, groups)
    assert store.list_api_tokens() == []


def test_create_api_token_needs_a_name(store: Store) -> None:
    with pytest.raises(ValueError, match="token name"):
        store.create_api_token("  ", "admin", ["*"])


# --- enrollment tokens --------------------------------------------------------------------------------------


def test_enrollment_token_creates_its_group_and_expires_after_its_ttl(store: Store, clock: Clock) -> None:
    assert store.get_group("plant") is None
    token, row = store.create_enrollment_token("plant", timedelta(minutes=30), "db01 in Frankfurt")
    assert token.startswith(f"onpe_{row.token_id}_")
    assert store.get_group("plant") is not None
    assert row.group_name == "plant"
    assert row.description == "db01 in Frankfurt"
    assert row.created_at == clock.now
    assert row.expires_at == clock.now + timedelta(minutes=30)
    assert row.used_at is None
    assert row.used_by_agent is None
    assert_utc(row.expires_at)
    assert store.list_enrollment_tokens() == [row]


def test_enrollment_token_for_an_existing_group_leaves_the_group_alone(store: Store, clock: Clock) -> None:
    group = store.ensure_group("plant")
    clock.advance(timedelta(hours=2))
    store.create_enrollment_token("plant")
    assert store.list_groups() == [group]


def test_enrollment_token_is_consumed_once_and_names_the_agent_that_used_it(
    store: Store, clock: Clock
) -> None:
    token, _row = store.create_enrollment_token("plant", timedelta(hours=1))
    used = store.consume_enrollment_token(token, "agent-1", clock.now + timedelta(minutes=1))
    assert used.used_by_agent == "agent-1"
    assert used.used_at == clock.now + timedelta(minutes=1)
    with pytest.raises(EnrollmentTokenUsed, match="already used by agent agent-1") as caught:
        store.consume_enrollment_token(token, "agent-2", clock.now + timedelta(minutes=2))
    assert caught.value.agent_id == "agent-1"
    assert store.list_enrollment_tokens()[0].used_by_agent == "agent-1"


def test_enrollment_token_is_refused_at_and_after_its_expiry(store: Store, clock: Clock) -> None:
    token, row = store.create_enrollment_token("plant", timedelta(minutes=10))
    with pytest.raises(EnrollmentTokenExpired, match=re.escape("expired at 2030-01-02T03:14:05.678901Z")) as caught:
        store.consume_enrollment_token(token, "agent-1", row.expires_at)
    assert caught.value.expired_at == row.expires_at
    with pytest.raises(EnrollmentTokenExpired):
        store.consume_enrollment_token(token, "agent-1", row.expires_at + timedelta(days=1))
    # A refused attempt must not spend the token.
    assert store.list_enrollment_tokens()[0].used_at is None


def test_enrollment_token_is_accepted_just_before_its_expiry(store: Store) -> None:
    token, row = store.create_enrollment_token("plant", timedelta(minutes=10))
    used = store.consume_enrollment_token(token, "agent-1", row.expires_at - timedelta(microseconds=1))
    assert used.used_by_agent == "agent-1"


def test_consume_uses_the_store_clock_when_no_time_is_given(store: Store, clock: Clock) -> None:
    token, _row = store.create_enrollment_token("plant", timedelta(minutes=10))
    clock.advance(timedelta(minutes=11))
    with pytest.raises(EnrollmentTokenExpired):
        store.consume_enrollment_token(token, "agent-1")


def test_a_wrong_secret_says_invalid_even_for_a_used_or_expired_token(store: Store, clock: Clock) -> None:
    token, row = store.create_enrollment_token("plant", timedelta(minutes=10))
    store.consume_enrollment_token(token, "agent-1", clock.now)
    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
    with pytest.raises(EnrollmentTokenInvalid, match=r"^the enrollment token is not valid$"):
        store.consume_enrollment_token(wrong, "agent-2", clock.now)
    with pytest.raises(EnrollmentTokenInvalid):
        store.consume_enrollment_token(wrong, "agent-2", row.expires_at + timedelta(hours=1))


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: "",
        lambda t: "onpe_",
        lambda t: t + "x",
        lambda t: t.replace("onpe_", "onp_", 1),
        lambda t: "onpe_" + "0" * 16 + "_" + t.split("_", 2)[2],
    ],
    ids=["empty", "prefix-only", "suffix", "api-token-prefix", "unknown-id"],
)
def test_malformed_or_unknown_enrollment_tokens_are_invalid(
    store: Store, clock: Clock, mangle: Callable[[str], str]
) -> None:
    token, _row = store.create_enrollment_token("plant")
    with pytest.raises(EnrollmentTokenInvalid):
        store.consume_enrollment_token(mangle(token), "agent-1", clock.now)
    assert store.list_enrollment_tokens()[0].used_at is None


def test_an_operator_token_is_not_an_enrollment_token(store: Store, clock: Clock) -> None:
    api_token, _ = store.create_api_token("ci", "admin", ["*"])
    with pytest.raises(EnrollmentTokenInvalid):
        store.consume_enrollment_token(api_token, "agent-1", clock.now)
    enrollment_token, _ = store.create_enrollment_token("plant")
    assert store.authenticate_api_token(enrollment_token) is None


def test_concurrent_enrollments_with_one_token_have_exactly_one_winner(store: Store, clock: Clock) -> None:
    # Several rounds, because one race can be won by luck.
    for round_ in range(4):
        token, _row = store.create_enrollment_token("plant")

        def enroll(i: int, token: str = token, round_: int = round_) -> EnrollmentTokenRow:
            return store.consume_enrollment_token(token, f"agent-{round_}-{i}", clock.now)

        results = run_together(8, enroll)
        winners = [r for r in results if isinstance(r, EnrollmentTokenRow)]
        losers = [r for r in results if not isinstance(r, EnrollmentTokenRow)]
        assert len(winners) == 1, results
        assert all(isinstance(r, EnrollmentTokenUsed) for r in losers), losers
        assert {r.agent_id for r in losers if isinstance(r, EnrollmentTokenUsed)} <= {winners[0].used_by_agent}


def test_enrollment_token_secret_is_stored_only_as_its_sha256(store: Store) -> None:
    token, _row = store.create_enrollment_token("plant")
    secret = token.split("_", 2)[2]
    (stored,) = raw_rows(store, "enrollment_tokens")
    assert not any(isinstance(v, str) and secret in v for v in stored)
    assert hashlib.sha256(secret.encode()).hexdigest() in stored


@pytest.mark.parametrize(
    "ttl", [timedelta(0), timedelta(seconds=-1), ENROLLMENT_TTL_MAX + timedelta(seconds=1)]
)
def test_enrollment_token_lifetime_must_be_positive_and_bounded(store: Store, ttl: timedelta) -> None:
    with pytest.raises(ValueError, match="lifetime"):
        store.create_enrollment_token("plant", ttl)
    assert store.list_enrollment_tokens() == []


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
