"""Operator and enrollment tokens (`store.tokens`), on a SQLite file and on a real PostgreSQL server.

Creation, authentication and secrets; expiry and defaults, revocation with its change counter, last-used
times and pages (issue 12); enrollment tokens checked without being spent, consumed once, and revoked."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from onprem.control_plane.store import (
    ENROLLMENT_TTL_MAX,
    EnrollmentTokenExpired,
    EnrollmentTokenInvalid,
    EnrollmentTokenRevoked,
    EnrollmentTokenRow,
    EnrollmentTokenUsed,
    Store,
    UsedEnrollmentTokenNotRevocable,
    parse_token_id,
)
from onprem.tunnel.errors import NotFound
from tests.control_plane.store.helpers import Clock, assert_utc, raw_rows, run_together

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


# --- operator tokens: lifetimes, the change counter, last use, pages ----------------------------------------


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


# --- enrollment tokens: checked, revoked, listed ------------------------------------------------------------


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
