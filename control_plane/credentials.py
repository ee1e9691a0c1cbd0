"""Operator tokens at run time: who is calling, on every call, and ending the calls of a token
that may no longer be used.

Every call is authenticated afresh, with no window in which a revoked token still works:

- `authenticate` reads the store's `api_tokens` change counter (every revocation bumps it
  in its own transaction), hashes the token and looks it up in a cache whose entries
  remember the counter value they were read under. An entry is trusted only if the
  counter has not moved since, so a revocation by any process (another replica, the
  local CLI) is seen on the very next call. Expiry needs no store at all: the cached row
  carries `expires_at`, compared with the clock on every call.
- On SQLite the counter read is a primary-key read on a read-only connection of its own,
  done on the event loop: a few microseconds, less than the thread hop that any store
  call off the loop costs (~100 us of CPU). A busy database makes that read fail at once
  rather than wait, and the read is then done off the loop like any other. On other
  databases the counter is read off the loop. Replicas sharing a PostgreSQL store keep
  the counter in memory while their change feed listens (`NotifiedCounter`): every
  revocation is announced after it commits, which makes the next call re-read it, and
  the value is trusted only within one unbroken listening connection.
- While the store cannot be reached, no revocation can commit anywhere, so the last
  counter read stays true: tokens already known go on working; a token never seen
  before is refused UNAVAILABLE (`STORE_UNAVAILABLE`) until the store is back.

Open calls are tracked per token. A call whose token is revoked in this process ends at
once; one revoked elsewhere ends within `watch_interval` (the watcher reads the counter
that often, and at once when a call notices it moved); one whose token expires ends at
its expiry (a timer per call). Ending a call fails its request to the agent (which stops
the work there) and makes the caller's stream end with UNAUTHENTICATED; a call that is
not waiting on an agent is cancelled and ended with the same status by the API's guard.
A stream whose reader stopped reading ends when it next reads: nothing more is produced
for it meanwhile.

Free of gRPC: the API layer (`control_plane.api.guard`) maps these to calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from onprem.control_plane.auth import Principal, parse_bearer
from onprem.control_plane.store import ApiTokenRow, Store, api_token_id, iso_utc
from onprem.tunnel.errors import RequestError, Unauthenticated, Unavailable

log = logging.getLogger("onprem.control_plane.credentials")

T = TypeVar("T")
RunBlocking = Callable[..., Awaitable[Any]]

#: The call the current task serves, set by the API's guard for the call's whole life.
current_call: ContextVar[OpenCall | None] = ContextVar("onprem_current_call", default=None)

#: How many authenticated tokens are remembered; past it the cache starts again (a miss costs one read).
CACHE_MAX = 10_000


def _utcnow() -> datetime:
    return datetime.now(UTC)


class TokenRefused(Unauthenticated):
    """A token with the right secret that may not be used any more; names the token, for the audit."""

    def __init__(self, message: str, *, reason: str, token_id: str, name: str, role: str) -> None:
        super().__init__(message, reason=reason)
        self.token_id = token_id
        self.name = name
        self.role = role


def missing_token() -> Unauthenticated:
    return Unauthenticated("missing or malformed credentials: send the metadata 'authorization: Bearer <token>'",
                           reason="MISSING_TOKEN")


def bad_token() -> Unauthenticated:
    # Says nothing about which part was wrong, so that guessing learns nothing.
    return Unauthenticated("the bearer token is not valid (unknown, revoked or mistyped)", reason="BAD_TOKEN")


def revoked_error(row: ApiTokenRow) -> TokenRefused:
    assert row.revoked_at is not None
    by = f" by {row.revoked_by}" if row.revoked_by else ""
    why = f" ({row.revoke_reason})" if row.revoke_reason else ""
    return TokenRefused(f"token {row.label} was revoked at {iso_utc(row.revoked_at)}{by}{why}; "
                        "ask an admin for a new one", reason="TOKEN_REVOKED",
                        token_id=row.token_id, name=row.name, role=row.role)


def expired_error(principal: Principal) -> TokenRefused:
    assert principal.expires_at is not None
    return TokenRefused(f"token {principal.label} expired at {iso_utc(principal.expires_at)}; "
                        "ask an admin for a new one", reason="TOKEN_EXPIRED",
                        token_id=principal.token_id, name=principal.name, role=principal.role)


# --- the change counter ---------------------------------------------------------------------------------------


class CounterSource(Protocol):
    """Where `authenticate` reads the store's `api_tokens` change counter."""

    async def read(self) -> int: ...

    async def refresh(self) -> int:
        """Read the counter from the store itself, whatever is kept in memory (the watcher's check)."""
        ...

    def close(self) -> None: ...


class StoreCounter:
    """Reads the counter through the store, off the event loop (any database)."""

    def __init__(self, store: Store, run_blocking: RunBlocking) -> None:
        self._store = store
        self._run_blocking = run_blocking

    async def read(self) -> int:
        return int(await self._run_blocking(self._store.change_counter))

    async def refresh(self) -> int:
        return await self.read()

    def close(self) -> None:
        pass


class SqliteCounter:
    """Reads the counter of a SQLite store on the event loop, from a read-only connection of its own.

    Under WAL a reader never waits for writers; `busy_timeout=0` makes the rare read that
    would wait (a checkpoint, a recovering writer) fail at once, and that read is then
    done off the loop by `fallback`.
    """

    _QUERY = "SELECT value FROM change_counters WHERE name = 'api_tokens'"

    def __init__(self, path: str, fallback: CounterSource) -> None:
        self._path = path
        self._fallback = fallback
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(f"file:{urllib.parse.quote(self._path)}?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=0")
            self._conn = conn
        return self._conn

    async def read(self) -> int:
        try:
            row = self._connect().execute(self._QUERY).fetchone()
        except sqlite3.Error as exc:
            log.debug("reading the change counter on the loop failed (%s); reading it off the loop", exc)
            return await self._fallback.read()
        return int(row[0]) if row else 0

    async def refresh(self) -> int:
        return await self.read()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class NotifiedCounter:
    """The counter of a store shared by replicas, kept in memory while the change feed listens.

    `listening()` gives the feed's connection epoch, or None while it is not connected; a value is
    trusted only under the epoch it was read in, so that changes announced while the listener was
    away are never missed. `invalidate` (a token change was announced) makes the next read go to
    the store.
    """

    def __init__(self, fallback: CounterSource, listening: Callable[[], int | None]) -> None:
        self._fallback = fallback
        self._listening = listening
        self._value: tuple[int, int] | None = None  # (epoch, counter)

    async def read(self) -> int:
        epoch = self._listening()
        if epoch is not None and self._value is not None and self._value[0] == epoch:
            return self._value[1]
        value = await self._fallback.read()
        self._value = (epoch, value) if epoch is not None else None
        return value

    async def refresh(self) -> int:
        # The periodic check: a notification lost after its change committed is caught here.
        epoch = self._listening()
        value = await self._fallback.refresh()
        self._value = (epoch, value) if epoch is not None else None
        return value

    def invalidate(self) -> None:
        self._value = None

    def close(self) -> None:
        self._fallback.close()


def store_unavailable() -> RequestError:
    return Unavailable("the control plane cannot reach its store to check this token; retry shortly",
                       reason="STORE_UNAVAILABLE")


def counter_source(store: Store, run_blocking: RunBlocking) -> CounterSource:
    fallback = StoreCounter(store, run_blocking)
    path = store.sqlite_path
    return SqliteCounter(path, fallback) if path is not None else fallback


# --- open calls -----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class OpenCall:
    """One operator call in progress, as far as its credentials go."""

    principal: Principal
    method: str
    peer: str
    task: asyncio.Task[Any] | None
    #: Set once a response message went out: from then on the call is never cancelled (grpc would be
    #: left without a status); its request is failed instead, and the stream ends on its next message.
    responded: bool = False
    #: Why the call was ended early (its token was revoked or expired); None while it may go on.
    error: RequestError | None = None
    _stoppers: list[Callable[[RequestError], None]] = field(default_factory=list)
    _timer: asyncio.TimerHandle | None = None

    def add_stopper(self, stop: Callable[[RequestError], None]) -> Callable[[], None]:
        """Have `stop(error)` called when the call is ended (instead of cancelling its task)."""
        self._stoppers.append(stop)
        if self.error is not None:
            stop(self.error)
        return lambda: self._stoppers.remove(stop) if stop in self._stoppers else None

    def end(self, error: RequestError) -> None:
        """End the call with `error`; the first error wins."""
        if self.error is not None:
            return
        self.error = error
        log.info("ending %s of token %s: %s", self.method, self.principal.label, error.reason)
        if self._stoppers:
            for stop in list(self._stoppers):
                stop(error)
        elif self.task is not None and not self.responded and not self.task.done():
            self.task.cancel()


# --- the authority --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cached:
    counter: int
    row: ApiTokenRow
    principal: Principal


class TokenAuthority:
    """Authenticates operator calls and ends the calls of tokens revoked or expired meanwhile."""

    def __init__(self, store: Store, run_blocking: RunBlocking, *, counter: CounterSource | None = None,
                 clock: Callable[[], datetime] = _utcnow, watch_interval: float = 1.0,
                 used_flush_interval: float = 10.0) -> None:
        self._store = store
        self._run_blocking = run_blocking
        self._counter = counter or counter_source(store, run_blocking)
        self._clock = clock
        self.watch_interval = watch_interval
        self._used_flush_interval = used_flush_interval
        self._cache: dict[bytes, _Cached] = {}
        self._calls: dict[str, set[OpenCall]] = {}
        self._last_counter = -1
        self._checked_counter = -1
        self._changed = asyncio.Event()
        #: Last uses not written yet, and the latest use of each token seen by this process (for lists).
        self._used: dict[str, datetime] = {}
        self._seen: dict[str, datetime] = {}

    def close(self) -> None:
        self._counter.close()

    # -- per call --
    def screen(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal | None:
        """A first look at a call whose principal `authenticate` binds later, when its handler starts.

        The principal of a token this process already holds as valid (cached, not revoked, not
        expired), without reading the change counter; None when the call must be authenticated in
        full now. The look only decides whether grpc may read the request message: a token revoked
        elsewhere since passes it, and is refused by `authenticate` before the call does any work.
        """
        token = parse_bearer(metadata)
        if token is None or api_token_id(token) is None:
            return None
        cached = self._cache.get(hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest())
        if cached is None or cached.row.revoked_at is not None:
            return None
        if cached.row.expires_at is not None and self._clock() >= cached.row.expires_at:
            return None
        return cached.principal

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal:
        """The principal of the call's bearer token; raises Unauthenticated (TokenRefused: revoked, expired)."""
        token = parse_bearer(metadata)
        if token is None:
            raise missing_token()
        if api_token_id(token) is None:
            raise bad_token()  # malformed: not worth a store read
        try:
            counter = await self._counter.read()
        except Exception as exc:
            if self._last_counter < 0:
                raise store_unavailable() from exc
            # No revocation can commit while the store is unreachable: the last value read still holds.
            log.debug("the change counter cannot be read (%s); using the last value, %d", exc, self._last_counter)
            counter = self._last_counter
        if counter != self._last_counter:
            self._last_counter = counter
            self._changed.set()  # the watcher checks the open calls now, not at its next tick
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache.get(key)
        if cached is None or cached.counter != counter:
            try:
                row = await self._run_blocking(self._store.find_api_token, token)
            except Exception as exc:
                raise store_unavailable() from exc
            if row is None:
                raise bad_token()
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            # Tagged with the counter read *before* the row: if a revocation commits in between, the
            # row shows it, or the counter has moved and the entry is never trusted.
            cached = self._cache[key] = _Cached(counter, row, Principal.from_api_token(row))
        row = cached.row
        if row.revoked_at is not None:
            raise revoked_error(row)
        now = self._clock()
        if row.expires_at is not None and now >= row.expires_at:
            raise expired_error(cached.principal)
        self._used[row.token_id] = now
        if len(self._seen) >= CACHE_MAX:
            self._seen.clear()
        self._seen[row.token_id] = now
        return cached.principal

    def open_call(self, principal: Principal, method: str, peer: str) -> OpenCall:
        """Track a call of `principal` until `close_call`, ending it if its token stops being valid."""
        call = OpenCall(principal, method, peer, asyncio.current_task())
        self._calls.setdefault(principal.token_id, set()).add(call)
        if principal.expires_at is not None:
            delay = (principal.expires_at - self._clock()).total_seconds()
            call._timer = asyncio.get_running_loop().call_later(
                max(delay, 0.0), lambda: call.end(expired_error(principal)))
        return call

    def close_call(self, call: OpenCall) -> None:
        if call._timer is not None:
            call._timer.cancel()
        calls = self._calls.get(call.principal.token_id)
        if calls is not None:
            calls.discard(call)
            if not calls:
                del self._calls[call.principal.token_id]

    def last_used(self, row: ApiTokenRow) -> datetime | None:
        """The token's last use: the store's, or a later one this process has not written yet."""
        seen = self._seen.get(row.token_id)
        if seen is None or (row.last_used_at is not None and row.last_used_at >= seen):
            return row.last_used_at
        return seen

    def open_calls(self, token_id: str) -> int:
        return len(self._calls.get(token_id, ()))

    def revoked(self, row: ApiTokenRow, *, sparing: OpenCall | None = None) -> int:
        """A token was revoked by this process: end its open calls now; returns how many.

        `sparing` is the call that revoked it, which may be one of the token's own (an admin token
        revoking itself): that call finishes, so that its caller learns the revocation happened.
        """
        calls = [c for c in self._calls.get(row.token_id, ()) if c is not sparing]
        for call in calls:
            call.end(revoked_error(row))
        return len(calls)

    # -- in the background --
    async def check_open_calls(self) -> None:
        """End the open calls of tokens revoked since the last check (by any process)."""
        counter = await self._counter.refresh()
        if counter != self._last_counter:
            self._last_counter = counter
        if counter == self._checked_counter:
            return
        ids = list(self._calls)
        rows: list[ApiTokenRow] = await self._run_blocking(self._store.get_api_tokens, ids) if ids else []
        self._checked_counter = counter
        for row in rows:
            if row.revoked:
                self.revoked(row)

    async def flush_used(self) -> None:
        """Write the tokens' last-used times (batched: one write per flush, not one per call)."""
        used, self._used = self._used, {}
        if used:
            await self._run_blocking(self._store.touch_api_tokens, used)

    def poke(self) -> None:
        """Check open calls now (another replica announced a token change)."""
        self._changed.set()

    async def run(self) -> None:
        """Watch for revocations and write last-used times, until cancelled (then flush)."""
        loop = asyncio.get_running_loop()
        next_flush = loop.time() + self._used_flush_interval
        failing = False
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.watch_interval):
                        await self._changed.wait()
                self._changed.clear()
                try:
                    await self.check_open_calls()
                    if loop.time() >= next_flush:
                        next_flush = loop.time() + self._used_flush_interval
                        await self.flush_used()
                except Exception as exc:
                    # Once per outage of the store, not every second.
                    if not failing:
                        log.error("checking open calls for revoked tokens failed (%s); retrying", exc)
                    failing = True
                else:
                    if failing:
                        log.info("checking open calls for revoked tokens works again")
                    failing = False
        finally:
            try:
                self._store.touch_api_tokens(self._used)
            except Exception:
                log.exception("could not write the tokens' last-used times at shutdown")
