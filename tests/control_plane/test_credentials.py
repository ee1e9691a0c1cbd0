"""The token authority: every call checked against the store's change counter, open calls ended on revocation.

A real SQLite store; a second `Store` on the same file plays the other process (the local CLI, another
replica). The authority's clock is set by the tests, so expiry is exact to the microsecond.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from onprem.control_plane.auth import Principal
from onprem.control_plane.credentials import SqliteCounter, StoreCounter, TokenAuthority, TokenRefused
from onprem.control_plane.store import ApiTokenRow, Store
from onprem.tunnel.errors import Unauthenticated


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


class CountingStore(Store):
    """Counts the reads of token rows, to tell a cache hit from a miss."""

    finds = 0

    def find_api_token(self, token: str) -> ApiTokenRow | None:
        self.finds += 1
        return super().find_api_token(token)


async def run_blocking(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'control-plane.db'}"


@pytest.fixture
def store(url: str) -> Iterator[CountingStore]:
    s = CountingStore(url)
    try:
        s.create_schema()
        yield s
    finally:
        s.close()


@pytest.fixture
def other(url: str, store: Store) -> Iterator[Store]:
    with Store(url) as s:
        yield s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def authority(store: Store, clock: Clock) -> Iterator[TokenAuthority]:
    authority = TokenAuthority(store, run_blocking, clock=clock, watch_interval=0.05)
    yield authority
    authority.close()


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def test_a_token_is_accepted_with_its_groups_role_and_expiry(authority: TokenAuthority, store: Store) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant"], timedelta(days=1))
    principal = await authority.authenticate(bearer(token))
    assert principal == Principal(row.token_id, "ci", "operator", frozenset({"plant"}), row.expires_at)
    assert principal.label == f"'ci' (onp_{row.token_id})"


async def test_a_repeat_call_is_answered_without_reading_the_token_again(
    authority: TokenAuthority, store: CountingStore
) -> None:
    token, _ = store.create_api_token("ci", "operator", ["plant"])
    for _ in range(5):
        await authority.authenticate(bearer(token))
    assert store.finds == 1


async def test_a_revocation_by_another_process_is_seen_on_the_very_next_call(
    authority: TokenAuthority, store: CountingStore, other: Store
) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant"])
    await authority.authenticate(bearer(token))
    other.revoke_api_token(row.token_id, by="local CLI (ops)", reason="rotated")
    with pytest.raises(TokenRefused) as info:
        await authority.authenticate(bearer(token))
    assert info.value.reason == "TOKEN_REVOKED"
    assert info.value.message.startswith(f"token 'ci' (onp_{row.token_id}) was revoked at ")
    assert info.value.message.endswith(" by local CLI (ops) (rotated); ask an admin for a new one")
    assert (info.value.name, info.value.token_id) == ("ci", row.token_id)


async def test_a_revocation_of_another_token_costs_a_cached_token_one_read_and_nothing_else(
    authority: TokenAuthority, store: CountingStore, other: Store
) -> None:
    token, _ = store.create_api_token("ci", "operator", ["plant"])
    _, unrelated = store.create_api_token("old", "operator", ["plant"])
    await authority.authenticate(bearer(token))
    other.revoke_api_token(unrelated.token_id)
    await authority.authenticate(bearer(token))
    await authority.authenticate(bearer(token))
    assert store.finds == 2


async def test_the_screen_lets_through_only_a_token_already_held_as_valid(
    authority: TokenAuthority, store: CountingStore
) -> None:
    token, _ = store.create_api_token("ci", "operator", ["plant"])
    assert authority.screen(bearer(token)) is None  # never seen: authenticate in full
    principal = await authority.authenticate(bearer(token))
    assert authority.screen(bearer(token)) == principal
    assert authority.screen(bearer(token[:-1] + ("A" if token[-1] != "A" else "B"))) is None
    assert authority.screen([]) is None
    assert authority.screen(bearer("not-a-token")) is None
    assert store.finds == 1


async def test_the_screen_refers_a_revoked_or_expired_token_to_authenticate(
    authority: TokenAuthority, store: Store, other: Store, clock: Clock
) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant"], timedelta(hours=1))
    await authority.authenticate(bearer(token))
    expires = row.expires_at
    assert expires is not None
    clock.now = expires
    assert authority.screen(bearer(token)) is None
    clock.now = expires - timedelta(seconds=1)
    other.revoke_api_token(row.token_id)
    # Revoked by another process: the screen cannot know, and authenticate, which binds the call, refuses.
    assert authority.screen(bearer(token)) is not None
    with pytest.raises(TokenRefused) as info:
        await authority.authenticate(bearer(token))
    assert info.value.reason == "TOKEN_REVOKED"
    # Once seen revoked, the screen refers it too.
    assert authority.screen(bearer(token)) is None


async def test_the_right_id_with_a_wrong_secret_learns_nothing_about_the_token(
    authority: TokenAuthority, store: Store
) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant"])
    store.revoke_api_token(row.token_id)
    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
    with pytest.raises(Unauthenticated) as info:
        await authority.authenticate(bearer(wrong))
    assert not isinstance(info.value, TokenRefused)
    assert (info.value.reason, info.value.message) == (
        "BAD_TOKEN", "the bearer token is not valid (unknown, revoked or mistyped)")


async def test_a_token_works_until_the_instant_it_expires_and_never_after(
    authority: TokenAuthority, store: Store, clock: Clock
) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant"], timedelta(hours=1))
    assert row.expires_at is not None
    clock.now = row.expires_at - timedelta(microseconds=1)
    await authority.authenticate(bearer(token))
    clock.now = row.expires_at
    with pytest.raises(TokenRefused) as info:
        await authority.authenticate(bearer(token))
    assert info.value.reason == "TOKEN_EXPIRED"
    assert info.value.message == (f"token 'ci' (onp_{row.token_id}) expired at "
                                  f"{row.expires_at.isoformat().replace('+00:00', 'Z')}; ask an admin for a new one")


async def test_no_token_and_a_malformed_one_are_refused_without_a_store_read(
    authority: TokenAuthority, store: CountingStore
) -> None:
    with pytest.raises(Unauthenticated) as missing:
        await authority.authenticate([])
    with pytest.raises(Unauthenticated) as malformed:
        await authority.authenticate(bearer("onp_not-a-token"))
    assert (missing.value.reason, malformed.value.reason, store.finds) == ("MISSING_TOKEN", "BAD_TOKEN", 0)


# --- open calls ---------------------------------------------------------------------------------------------------


async def open_call_task(authority: TokenAuthority, principal: Principal) -> tuple[asyncio.Task[None], Any]:
    opened: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def serve() -> None:
        opened.set_result(authority.open_call(principal, "/onprem.v1.FileService/Write", "ipv4:10.0.0.7:1"))
        await asyncio.Event().wait()

    task = asyncio.create_task(serve())
    return task, await opened


async def test_revoking_a_token_ends_its_open_calls_and_no_others(authority: TokenAuthority, store: Store) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant"])
    other_token, _ = store.create_api_token("web", "operator", ["plant"])
    task, call = await open_call_task(authority, await authority.authenticate(bearer(token)))
    kept, kept_call = await open_call_task(authority, await authority.authenticate(bearer(other_token)))
    assert authority.revoked(store.revoke_api_token(row.token_id)) == 1
    with pytest.raises(asyncio.CancelledError):
        await task
    assert call.error is not None and call.error.reason == "TOKEN_REVOKED"
    assert not kept.done() and kept_call.error is None
    kept.cancel()


async def test_the_call_that_revokes_its_own_token_is_spared_so_that_it_can_answer(
    authority: TokenAuthority, store: Store
) -> None:
    token, row = store.create_api_token("root", "admin", ["*"])
    principal = await authority.authenticate(bearer(token))
    other_task, _ = await open_call_task(authority, principal)
    revoking = authority.open_call(principal, "/onprem.v1.TokenService/RevokeToken", "ipv4:10.0.0.7:2")
    assert authority.revoked(store.revoke_api_token(row.token_id), sparing=revoking) == 1
    assert revoking.error is None
    with pytest.raises(asyncio.CancelledError):
        await other_task
    authority.close_call(revoking)


async def test_an_ended_call_that_already_responded_is_stopped_never_cancelled(
    authority: TokenAuthority, store: Store
) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant"])
    task, call = await open_call_task(authority, await authority.authenticate(bearer(token)))
    call.responded = True
    stopped: list[str] = []
    call.add_stopper(lambda error: stopped.append(error.reason))
    authority.revoked(store.revoke_api_token(row.token_id))
    await asyncio.sleep(0)
    assert (stopped, task.done()) == (["TOKEN_REVOKED"], False)
    task.cancel()


async def test_the_watcher_ends_the_calls_of_a_token_another_process_revoked(
    authority: TokenAuthority, store: Store, other: Store
) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant"])
    task, call = await open_call_task(authority, await authority.authenticate(bearer(token)))
    watcher = asyncio.create_task(authority.run())
    other.revoke_api_token(row.token_id)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert call.error is not None and call.error.reason == "TOKEN_REVOKED"
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)


async def test_an_open_call_ends_when_its_token_expires(authority: TokenAuthority, store: Store, clock: Clock) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant"], timedelta(hours=1))
    assert row.expires_at is not None
    principal = await authority.authenticate(bearer(token))
    clock.now = row.expires_at - timedelta(milliseconds=50)  # its timer fires 50 ms from now
    task, call = await open_call_task(authority, principal)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert call.error is not None and call.error.reason == "TOKEN_EXPIRED"


async def test_a_closed_call_is_forgotten(authority: TokenAuthority, store: Store) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant"])
    task, call = await open_call_task(authority, await authority.authenticate(bearer(token)))
    authority.close_call(call)
    assert authority.open_calls(row.token_id) == 0
    assert authority.revoked(store.revoke_api_token(row.token_id)) == 0
    task.cancel()


# --- the counter and last use -------------------------------------------------------------------------------------


async def test_the_sqlite_counter_reads_what_the_store_says(store: Store) -> None:
    counter = SqliteCounter(str(store.sqlite_path), StoreCounter(store, run_blocking))
    try:
        _, row = store.create_api_token("ci", "operator", ["plant"])
        before = await counter.read()
        store.revoke_api_token(row.token_id)
        assert (before, await counter.read()) == (store.change_counter() - 1, store.change_counter())
    finally:
        counter.close()


async def test_the_sqlite_counter_reads_a_store_whose_path_has_uri_characters(tmp_path: Path) -> None:
    folder = tmp_path / "state?#%"
    folder.mkdir()
    with Store(f"sqlite:///{folder / 'control-plane.db'}") as odd:
        odd.create_schema()
        fallback_reads: list[int] = []

        class Recording(StoreCounter):
            async def read(self) -> int:
                fallback_reads.append(1)
                return await super().read()

        counter = SqliteCounter(str(odd.sqlite_path), Recording(odd, run_blocking))
        try:
            assert (await counter.read(), fallback_reads) == (0, [])
        finally:
            counter.close()


async def test_the_sqlite_counter_falls_back_to_the_store_when_it_cannot_read_the_file(
    store: Store, tmp_path: Path
) -> None:
    counter = SqliteCounter(str(tmp_path / "missing.db"), StoreCounter(store, run_blocking))
    try:
        assert await counter.read() == store.change_counter()
    finally:
        counter.close()


async def test_last_used_times_are_written_in_one_batch(authority: TokenAuthority, store: Store,
                                                       clock: Clock) -> None:
    token, row = store.create_api_token("ci", "operator", ["plant"])
    await authority.authenticate(bearer(token))
    assert store.get_api_token(row.token_id).last_used_at is None  # type: ignore[union-attr]
    await authority.flush_used()
    assert store.get_api_token(row.token_id).last_used_at == clock.now  # type: ignore[union-attr]
