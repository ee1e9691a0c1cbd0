"""The store's token lifecycle (issue 12), on a SQLite file and on a real PostgreSQL server.

Expiry and defaults, revocation with its change counter, last-used times, pages, enrollment tokens checked
without being spent and revoked, and a store from the previous release refused with a message.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from onprem.control_plane.store import (
    EnrollmentTokenExpired,
    EnrollmentTokenInvalid,
    EnrollmentTokenRevoked,
    EnrollmentTokenUsed,
    Store,
    StoreError,
    UsedEnrollmentTokenNotRevocable,
    parse_token_id,
)
from onprem.tunnel.errors import NotFound
from tests.support.postgres import PostgresServer


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'control-plane.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        name = f"tokens_{uuid.uuid4().hex[:16]}"
        server.create_database(name)
        url = server.url(name)
    with Store(url, clock=clock) as s:
        s.create_schema()
        yield s


# --- operator tokens ------------------------------------------------------------------------------------------


def test_an_operator_token_expires_after_its_lifetime(store: Store, clock: Clock) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant"], timedelta(hours=2), created_by="local CLI (x)")
    assert (row.expires_at, row.created_by, row.state(clock.now)) == (
        clock.now + timedelta(hours=2), "local CLI (x)", "active")
    clock.now += timedelta(hours=2)
    assert store.authenticate_api_token(token) is None
    assert store.find_api_token(token) == row  # still found, so that the caller can say it expired
    assert row.state(clock.now) == "expired"


def test_without_a_lifetime_a_token_gets_the_default_which_an_admin_can_change(store: Store, clock: Clock) -> None:
    assert store.default_token_ttl() == timedelta(days=90)
    assert store.create_api_token("a", "operator", ["plant"])[1].expires_at == clock.now + timedelta(days=90)
    store.set_default_token_ttl(timedelta(days=7))
    assert store.default_token_ttl() == timedelta(days=7)
    assert store.create_api_token("b", "operator", ["plant"])[1].expires_at == clock.now + timedelta(days=7)
    store.set_default_token_ttl(timedelta(days=30))  # changing it again updates, not duplicates
    assert store.default_token_ttl() == timedelta(days=30)


def test_only_an_explicit_request_makes_a_token_that_never_expires(store: Store, clock: Clock) -> None:
    token, row = store.create_api_token("boot", "admin", ["*"], no_expiry=True)
    assert row.expires_at is None
    clock.now += timedelta(days=10_000)
    assert store.authenticate_api_token(token) == row


@pytest.mark.parametrize("ttl", [timedelta(0), timedelta(seconds=-1), timedelta(days=367)])
def test_an_operator_token_lifetime_must_be_positive_and_at_most_366_days(store: Store, ttl: timedelta) -> None:
    with pytest.raises(ValueError, match="lifetime must be more than 0 and at most 366 days"):
        store.create_api_token("ci", "operator", ["plant"], ttl)
    with pytest.raises(ValueError, match="lifetime"):
        store.set_default_token_ttl(ttl)


def test_a_revocation_bumps_the_change_counter_once(store: Store) -> None:
    _, row = store.create_api_token("ci", "operator", ["plant"])
    before = store.change_counter()
    revoked = store.revoke_api_token(row.token_id, by="'root' (onp_0000000000000000)", reason="leaked")
    assert (revoked.revoked_by, revoked.revoke_reason) == ("'root' (onp_0000000000000000)", "leaked")
    assert store.change_counter() == before + 1
    again = store.revoke_api_token(row.token_id, by="someone else", reason="again")
    assert (again.revoked_at, again.revoked_by, store.change_counter()) == (
        revoked.revoked_at, revoked.revoked_by, before + 1)


def test_a_revocation_is_counted_even_if_the_counter_row_is_missing(store: Store) -> None:
    from sqlalchemy import delete

    from onprem.control_plane.store.schema import change_counters_table

    _, row = store.create_api_token("ci", "operator", ["plant"])
    with store.engine.begin() as conn:
        conn.execute(delete(change_counters_table))
    store.revoke_api_token(row.token_id)
    assert store.change_counter() == 1


def test_creating_a_token_does_not_move_the_counter(store: Store) -> None:
    before = store.change_counter()
    store.create_api_token("ci", "operator", ["plant"])
    assert store.change_counter() == before


def test_a_revoked_token_is_found_only_with_its_right_secret(store: Store) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant"])
    store.revoke_api_token(row.token_id)
    assert store.find_api_token(token) is not None
    assert store.find_api_token(token[:-1] + ("A" if token[-1] != "A" else "B")) is None


def test_last_used_times_only_move_forward(store: Store, clock: Clock) -> None:
    _, row = store.create_api_token("ci", "operator", ["plant"])
    later, earlier = clock.now + timedelta(minutes=5), clock.now + timedelta(minutes=1)
    store.touch_api_tokens({row.token_id: later})
    store.touch_api_tokens({row.token_id: earlier, "0000000000000000": later})
    assert store.get_api_token(row.token_id).last_used_at == later  # type: ignore[union-attr]


def test_tokens_are_paged_oldest_first_without_gaps_or_repeats(store: Store, clock: Clock) -> None:
    made = []
    for i in range(7):
        made.append(store.create_api_token(f"t{i}", "operator", ["plant"])[1].token_id)
        if i % 2:
            clock.now += timedelta(seconds=1)  # some share a creation time: the id breaks the tie
    seen: list[str] = []
    after = None
    while page := store.list_api_tokens(limit=3, after=after):
        seen += [r.token_id for r in page]
        after = (page[-1].created_at, page[-1].token_id)
    assert sorted(seen) == sorted(made) and len(seen) == 7
    assert seen == [r.token_id for r in store.list_api_tokens()]


def test_revoking_an_unknown_operator_token_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="no operator token has the id '0000000000000000'"):
        store.revoke_api_token("0000000000000000")


@pytest.mark.parametrize(("text", "token_id"), [
    ("0123456789abcdef", "0123456789abcdef"),
    ("onp_0123456789abcdef", "0123456789abcdef"),
    ("tokens/0123456789abcdef", "0123456789abcdef"),
    (" tokens/0123456789abcdef ", "0123456789abcdef"),
    ("ci-bot", None),
    ("onp_0123456789abcdef_secret", None),
    ("", None),
])
def test_a_token_id_is_read_from_what_a_person_pastes(text: str, token_id: str | None) -> None:
    assert parse_token_id(text, "onp") == token_id


# --- enrollment tokens ------------------------------------------------------------------------------------------


def test_checking_an_enrollment_token_spends_nothing(store: Store, clock: Clock) -> None:
    token, row = store.create_enrollment_token("plant", created_by="'root' (onp_0000000000000000)")
    assert store.check_enrollment_token(token) == row
    assert store.check_enrollment_token(token) == row
    assert store.consume_enrollment_token(token, "agent-1").used_by_agent == "agent-1"
    with pytest.raises(EnrollmentTokenUsed):
        store.check_enrollment_token(token)


def test_checking_a_bad_enrollment_token_says_as_little_as_consuming_it(store: Store, clock: Clock) -> None:
    token, row = store.create_enrollment_token("plant", timedelta(minutes=5))
    with pytest.raises(EnrollmentTokenInvalid):
        store.check_enrollment_token(token[:-1] + ("A" if token[-1] != "A" else "B"))
    with pytest.raises(EnrollmentTokenExpired):
        store.check_enrollment_token(token, row.expires_at)


def test_a_revoked_enrollment_token_cannot_be_used_and_says_who_revoked_it(store: Store, clock: Clock) -> None:
    token, row = store.create_enrollment_token("plant")
    revoked = store.revoke_enrollment_token(row.token_id, by="'root' (onp_0000000000000000)", reason="typo")
    assert (revoked.revoked_at, revoked.state(clock.now)) == (clock.now, "revoked")
    for attempt in (store.check_enrollment_token, lambda t: store.consume_enrollment_token(t, "agent-1")):
        with pytest.raises(EnrollmentTokenRevoked, match=r"^the enrollment token was revoked at 2030-01-02T03:04:05\.678901Z by "
                                               r"'root' \(onp_0000000000000000\); ask an administrator for a new one$"):
            attempt(token)
    assert store.get_enrollment_token(row.token_id).used_at is None  # type: ignore[union-attr]


def test_a_used_enrollment_token_cannot_be_revoked(store: Store) -> None:
    token, row = store.create_enrollment_token("plant")
    store.consume_enrollment_token(token, "agent-1")
    with pytest.raises(UsedEnrollmentTokenNotRevocable, match="already used by agent agent-1"):
        store.revoke_enrollment_token(row.token_id)
    assert store.get_enrollment_token(row.token_id).revoked_at is None  # type: ignore[union-attr]


def test_enrollment_tokens_are_listed_per_group_and_paged(store: Store, clock: Clock) -> None:
    rows = [store.create_enrollment_token("plant" if i % 2 else "office")[1] for i in range(5)]
    # All made at the same instant: the id orders them.
    assert [r.token_id for r in store.list_enrollment_tokens(group="plant")] == sorted(r.token_id for r in rows[1::2])
    first = store.list_enrollment_tokens(limit=2)
    rest = store.list_enrollment_tokens(after=(first[-1].created_at, first[-1].token_id))
    assert [r.token_id for r in first + rest] == [r.token_id for r in store.list_enrollment_tokens()]


# --- the schema of the previous release ----------------------------------------------------------------------------

# The api_tokens table as release b333362 made it.
_OLD_API_TOKENS = """CREATE TABLE api_tokens (
    token_id VARCHAR(32) NOT NULL PRIMARY KEY, name VARCHAR(200) NOT NULL, secret_hash VARCHAR(64) NOT NULL,
    role VARCHAR(16) NOT NULL, groups TEXT NOT NULL, created_at DATETIME NOT NULL, revoked_at DATETIME)"""


def test_a_store_made_by_the_previous_release_is_refused_naming_what_it_lacks(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(_OLD_API_TOKENS)
    with Store(f"sqlite:///{path}") as store, pytest.raises(StoreError) as info:
        store.create_schema()
    message = str(info.value)
    assert "was made by an older release of onprem and lacks the columns api_tokens.expires_at, " in message
    assert message.endswith("this version cannot upgrade it in place yet (schema migrations are planned): keep the "
                            "older release for it, or start from a new state folder")
