"""Runs SQL against the agent's database profiles and streams typed, columnar results.

Every blocking driver call runs in the profile's own bounded thread pool, one
step at a time (connect, execute, fetch a batch, finish), so the event loop
never waits on a database and a result of any size streams in bounded memory.
When the request is cancelled during a step the statement is cancelled on the
server (psycopg `cancel_safe`, sqlite3 `interrupt`, ODBC `SQLCancel`), the step
is awaited, and the connection goes back to the pool rolled back and reset.

The other modules of this package hold the pieces (see its `__init__`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

from onprem.agent.handlers.base import RequestContext
from onprem.agent.handlers.database.checks import run_checks
from onprem.agent.handlers.database.engine import ProfileRuntime, RequestConnection
from onprem.agent.handlers.database.errors import first_lines, map_error, scrub
from onprem.agent.handlers.database.idempotency import IdempotencyTable
from onprem.agent.handlers.database.operations import Batch, Poll, Transaction
from onprem.agent.handlers.database.query import Query
from onprem.agent.handlers.traced import traced
from onprem.agent.profiles.database import DatabaseProfile
from onprem.tunnel.errors import FailedPrecondition, InvalidArgument, NotFound
from onprem.v1 import database_pb2, profiles_pb2, tunnel_pb2

__all__ = ["DatabaseHandler"]

log = logging.getLogger("onprem.agent.handlers.database")
T = TypeVar("T")
#: The operations that may write, whose idempotency key is recorded in the profile's table.
_KEYED_OPERATIONS = ("query", "batch", "transaction")

#: How long a cancelled step may take to notice the server-side cancel.
_CANCEL_GRACE_SECONDS = 10.0
#: How often a cancel is sent again while the cancelled step has not returned.
_CANCEL_RETRY_SECONDS = 0.25


class _ConnectFailed(Exception):
    """Getting a connection failed: mapped as a connection error, not a statement error."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _connect(work: RequestConnection) -> None:
    try:
        work.connect()
    except Exception as exc:
        raise _ConnectFailed(exc) from exc


def _begin_stream(query: Query) -> list[tunnel_pb2.ResponseChunk]:
    """In a pool thread: connect, execute, first batch; finish and close too when that was all."""
    _connect(query)
    query.execute()
    chunks = list(query.first())
    if query.done:
        chunks.append(query.finish())
        query.close()
    return chunks


def _run_keyed(work: Query | Batch | Transaction, table: IdempotencyTable,
               key: tunnel_pb2.Idempotency) -> list[tunnel_pb2.ResponseChunk]:
    """In a pool thread: answer from the key's record, or run the write and record it in its commit."""
    _connect(work)
    conn = work.connection()
    work.begin()
    recorded = table.claim(conn, key.key, key.fingerprint, work.begin)
    if recorded is not None:
        work.close()
        return recorded.chunks
    work.commit_deferred = True
    chunks = work.run_all()
    table.record(conn, key.key, chunks)
    work.commit()
    work.close()
    return chunks


def _run_once(work: Batch | Transaction) -> tunnel_pb2.ResponseChunk:
    _connect(work)
    result = work.run()
    work.close()
    return result


class DatabaseHandler:
    """Runs `DatabaseQuery` payloads against the configured database profiles."""

    def __init__(self, profiles: Mapping[str, DatabaseProfile]) -> None:
        self._profiles = dict(profiles)
        self._runtimes: dict[str, ProfileRuntime] = {}

    def profiles(self) -> list[profiles_pb2.Profile]:
        return [
            profiles_pb2.Profile(
                name=p.name, kind=profiles_pb2.PROFILE_KIND_DATABASE, read_only=p.read_only, dialect=p.dialect
            )
            for p in self._profiles.values()
        ]

    def _runtime(self, name: str) -> ProfileRuntime:
        runtime = self._runtimes.get(name)
        if runtime is None:
            profile = self._profiles.get(name)
            if profile is None:
                raise NotFound(f"database profile '{name}' is not configured on this agent", reason="PROFILE_NOT_FOUND")
            runtime = self._runtimes[name] = ProfileRuntime(profile)
        return runtime

    def handle(
        self, payload: database_pb2.DatabaseQuery, context: RequestContext
    ) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        operation = payload.WhichOneof("operation") or ""

        def attributes() -> dict[str, str | int | bool]:
            name = getattr(payload, operation).profile if operation else ""
            profile = self._profiles.get(name)
            return {"db.system.name": profile.dialect if profile is not None else "", "db.operation.name": operation,
                    "onprem.profile": name}

        return traced(f"db {operation}", attributes, lambda _span: self._handle(payload, context))

    async def _handle(
        self, payload: database_pb2.DatabaseQuery, context: RequestContext
    ) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        operation = payload.WhichOneof("operation")
        if context.idempotency is not None and operation in _KEYED_OPERATIONS:
            runtime = self._runtime(getattr(payload, operation).profile)
            if not runtime.profile.read_only:  # a read-only profile writes nothing: nothing to record
                work = self._work(runtime, payload, context)
                for chunk in await self._keyed(work, context.idempotency):
                    yield chunk
                return
        if operation == "query":
            runtime = self._runtime(payload.query.profile)
            query = Query.from_request(runtime, payload.query, context.max_chunk_bytes)
            async for chunk in self._stream(query):
                yield chunk
        elif operation == "poll_changes":
            runtime = self._runtime(payload.poll_changes.profile)
            async for chunk in self._stream(Poll(runtime, payload.poll_changes, context.max_chunk_bytes)):
                yield chunk
        elif operation == "batch":
            runtime = self._runtime(payload.batch.profile)
            yield await self._once(Batch(runtime, payload.batch))
        elif operation == "transaction":
            runtime = self._runtime(payload.transaction.profile)
            yield await self._once(Transaction(runtime, payload.transaction))
        else:
            raise InvalidArgument(f"unknown database operation {operation!r}", reason="INVALID_PAYLOAD")

    @staticmethod
    def _work(runtime: ProfileRuntime, payload: database_pb2.DatabaseQuery,
              context: RequestContext) -> Query | Batch | Transaction:
        operation = payload.WhichOneof("operation")
        if operation == "query":
            query = Query.from_request(runtime, payload.query, context.max_chunk_bytes)
            # A plain cursor: a server-side one would make PostgreSQL run DML twice (see Query.execute), and
            # the result of a keyed query is held whole anyway, to be recorded.
            query.server_cursor = False
            return query
        if operation == "batch":
            return Batch(runtime, payload.batch)
        return Transaction(runtime, payload.transaction)

    async def _keyed(self, work: Query | Batch | Transaction,
                     key: tunnel_pb2.Idempotency) -> list[tunnel_pb2.ResponseChunk]:
        table = work.runtime.idempotency
        if table is None:
            raise FailedPrecondition(
                f"database profile '{work.profile.name}' records no idempotency keys: set its idempotency_table "
                "(and create the table with 'onprem-agent create-idempotency-table'), or send the write without "
                "an idempotency-key", reason="IDEMPOTENCY_NOT_CONFIGURED")
        await work.runtime.slots.acquire()
        try:
            return await self._step(work, lambda: _run_keyed(work, table, key))
        finally:
            await self._close(work)

    async def _stream(self, query: Query) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        await query.runtime.slots.acquire()
        try:
            # Connect, execute and the first batch in one trip to the thread pool; a result that
            # fits in it also finishes and returns its connection there: a small query costs one hop.
            for chunk in await self._step(query, lambda: _begin_stream(query)):
                yield chunk
            if query.closed:
                return
            while not query.done:
                for chunk in await self._step(query, query.next):
                    yield chunk
            yield await self._step(query, query.finish)
        finally:
            await self._close(query)

    async def _once(self, work: Batch | Transaction) -> tunnel_pb2.ResponseChunk:
        await work.runtime.slots.acquire()
        try:
            return await self._step(work, lambda: _run_once(work))
        finally:
            await self._close(work)

    async def check(self, profile: str) -> list[profiles_pb2.ProfileCheck]:
        """Reachable, credentials, database, dialect, may read: each a ProfileCheck (see checks)."""
        runtime = self._runtime(profile)
        async with runtime.slots:  # like a statement: never wait on pool checkout inside a thread
            return await asyncio.get_running_loop().run_in_executor(runtime.executor, run_checks, runtime)

    async def _step(self, work: RequestConnection, fn: Callable[[], T]) -> T:
        """Run one blocking step in the profile's pool; on cancel, cancel it on the server."""
        runtime = work.runtime
        future = work.busy = runtime.executor.submit(fn)
        waiter = asyncio.wrap_future(future)
        try:
            return await asyncio.shield(waiter)
        except asyncio.CancelledError:
            if not future.cancel():
                await self._interrupt(work, waiter)
            raise
        except _ConnectFailed as exc:
            raise map_error(exc.cause, runtime.profile, runtime.secrets, True) from None
        except Exception as exc:
            raise map_error(exc, runtime.profile, runtime.secrets, False) from None

    async def _interrupt(self, work: RequestConnection, waiter: asyncio.Future[Any]) -> None:
        """Cancel the step's statement on the server, again and again until the step returns.

        Once is not enough: a cancel that reaches the server while the step is between statements
        (connecting, beginning the transaction) cancels nothing, and the statement sent next would run
        to its end. `RequestConnection.interrupt` also flags the request so that no statement starts.
        """
        deadline = asyncio.get_running_loop().time() + _CANCEL_GRACE_SECONDS
        warned = False
        while not waiter.done():
            try:
                await asyncio.to_thread(work.interrupt)
            except Exception as exc:
                if not warned:
                    log.warning("database profile %r: could not cancel a statement: %s", work.profile.name,
                                scrub(first_lines(str(exc)), work.runtime.secrets))
                    warned = True
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            await asyncio.wait({waiter}, timeout=min(_CANCEL_RETRY_SECONDS, remaining))
        if waiter.done() and not waiter.cancelled():
            waiter.exception()  # retrieved: the cancelled statement's error is expected

    async def _close(self, work: RequestConnection) -> None:
        """Close the connection of `work` and give its slot back (once the connection is back)."""
        runtime = work.runtime
        busy = work.busy
        if work.closed and (busy is None or busy.done()):
            runtime.slots.release()  # closed in its last step: no trip to the pool needed
            return
        if busy is not None and not busy.done():
            # The server ignored the cancel: close once the step returns, without waiting here.
            loop = asyncio.get_running_loop()

            def close_later(_: concurrent.futures.Future[Any]) -> None:
                try:
                    work.close()
                finally:
                    loop.call_soon_threadsafe(runtime.slots.release)

            busy.add_done_callback(close_later)
            return
        try:
            closing = runtime.executor.submit(work.close)
        except RuntimeError:  # aclose() already shut the pool down
            work.close()
            runtime.slots.release()
            return
        try:
            await asyncio.shield(asyncio.wrap_future(closing))
        finally:
            runtime.slots.release()

    async def aclose(self) -> None:
        runtimes, self._runtimes = list(self._runtimes.values()), {}
        for runtime in runtimes:
            await asyncio.to_thread(runtime.close)
