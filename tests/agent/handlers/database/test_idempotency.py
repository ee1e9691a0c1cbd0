"""Keyed writes on database profiles: the record is committed with the write, and answers every retry.

SQLite for the table's logic (no sockets), PostgreSQL for two attempts with one key at once.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from onprem.agent.handlers.base import RequestContext
from onprem.agent.handlers.database import DatabaseHandler
from onprem.agent.handlers.database.idempotency import IdempotencyTable
from onprem.agent.profiles import DatabaseProfile
from onprem.tunnel import idempotency
from onprem.tunnel.errors import Code, FailedPrecondition, RequestError
from onprem.v1 import database_pb2, tunnel_pb2, values_pb2
from tests.agent.handlers.database.test_operations import batch, request, transaction
from tests.support.postgres import PostgresServer

V = values_pb2.Value
TABLE = "onprem_idempotency"


def keyed(start: tunnel_pb2.RequestStart, key: str) -> RequestContext:
    """The context of `start` sent with `key`, fingerprinted as the control plane does."""
    operation = start.database_query.WhichOneof("operation")
    message = getattr(start.database_query, operation)
    fp = idempotency.fingerprint(f"/onprem.v1.DatabaseService/{operation}", message.profile, message)
    return RequestContext(request_id=1, body=None, idempotency=tunnel_pb2.Idempotency(key=key, fingerprint=fp))


async def run(handler: DatabaseHandler, start: tunnel_pb2.RequestStart, key: str) -> list[tunnel_pb2.ResponseChunk]:
    return [c async for c in handler.handle(start.database_query, keyed(start, key))]


def insert(profile: str, sku: str, qty: int = 1) -> tunnel_pb2.RequestStart:
    return batch(profile, "INSERT INTO stock VALUES (:s, :q)", {"s": V(string_value=sku), "q": V(int64_value=qty)})


def table_of(handler: DatabaseHandler, profile: str) -> IdempotencyTable:
    table = handler._runtime(profile).idempotency
    assert table is not None
    return table


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Path:
    path = tmp_path / "shop.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE stock (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL CHECK (qty >= 0))")
    return path


@pytest.fixture
async def lite(sqlite_file: Path) -> AsyncIterator[DatabaseHandler]:
    url = f"sqlite:///{sqlite_file}"
    handler = DatabaseHandler({
        "shop": DatabaseProfile(name="shop", url=url, idempotency_table=TABLE, idempotency_ttl_seconds=3600),
        "shop-unkeyed": DatabaseProfile(name="shop-unkeyed", url=url),
        "shop-ro": DatabaseProfile(name="shop-ro", url=url, read_only=True, idempotency_table=TABLE),
    })
    runtime = handler._runtime("shop")
    with runtime.engine().begin() as conn:
        assert runtime.idempotency is not None and runtime.idempotency.create(conn)
    yield handler
    await handler.aclose()


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return list(conn.execute(sql))


async def test_a_keyed_batch_is_recorded_with_its_outcome_in_the_same_database(
        lite: DatabaseHandler, sqlite_file: Path) -> None:
    [chunk] = await run(lite, insert("shop", "a"), "order-1")
    assert chunk.batch == database_pb2.ExecuteBatchResponse(rows_affected=1, sets_applied=1)
    [(key, outcome)] = rows(sqlite_file, f"SELECT idempotency_key, outcome FROM {TABLE}")
    assert key == "order-1"
    assert idempotency.decode_chunks(outcome) == [chunk]


async def test_a_retry_with_the_same_key_gets_the_first_outcome_without_running_again(
        lite: DatabaseHandler, sqlite_file: Path) -> None:
    first = await run(lite, insert("shop", "b"), "order-2")
    # Were it run again, the primary key of stock would refuse it: the retry must not reach it.
    again = await run(lite, insert("shop", "b"), "order-2")
    assert again == first
    assert rows(sqlite_file, "SELECT sku FROM stock WHERE sku = 'b'") == [("b",)]


async def test_the_same_key_with_another_request_is_refused_naming_the_key(lite: DatabaseHandler) -> None:
    await run(lite, insert("shop", "c"), "order-3")
    with pytest.raises(FailedPrecondition, match="idempotency key 'order-3' was already used") as info:
        await run(lite, insert("shop", "c", qty=2), "order-3")
    assert info.value.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_a_failed_write_leaves_no_record_so_its_retry_runs(lite: DatabaseHandler, sqlite_file: Path) -> None:
    with pytest.raises(FailedPrecondition):
        await run(lite, insert("shop", "d", qty=-1), "order-4")  # the CHECK refuses it
    assert rows(sqlite_file, f"SELECT count(*) FROM {TABLE}") == [(0,)]
    with sqlite3.connect(sqlite_file) as conn:
        conn.execute("ALTER TABLE stock RENAME TO stock_old")
        conn.execute("CREATE TABLE stock (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL)")
    [chunk] = await run(lite, insert("shop", "d", qty=-1), "order-4")
    assert chunk.batch.sets_applied == 1


async def test_a_keyed_transaction_records_every_statement_result(lite: DatabaseHandler, sqlite_file: Path) -> None:
    start = transaction("shop", ("INSERT INTO stock VALUES ('t1', 1)", {}), ("UPDATE stock SET qty = 5", {}))
    first = await run(lite, start, "tx-1")
    assert [r.rows_affected for r in first[0].transaction.results] == [1, 1]
    assert await run(lite, start, "tx-1") == first
    assert rows(sqlite_file, "SELECT sku, qty FROM stock") == [("t1", 5)]


async def test_a_keyed_dml_query_answers_its_retry_with_the_recorded_summary(
        lite: DatabaseHandler, sqlite_file: Path) -> None:
    start = request(query=database_pb2.QueryRequest(profile="shop", sql="INSERT INTO stock VALUES ('q', 1)"))
    first = await run(lite, start, "query-1")
    assert first[-1].query.summary.rows_affected == 1
    assert await run(lite, start, "query-1") == first
    assert rows(sqlite_file, "SELECT count(*) FROM stock") == [(1,)]


async def test_an_expired_record_no_longer_answers_and_is_pruned(lite: DatabaseHandler, sqlite_file: Path) -> None:
    table = table_of(lite, "shop")
    await run(lite, insert("shop", "e"), "old-key")
    later = table.clock() + 3600 + 61  # past the record's TTL and the pruning interval
    table.clock = lambda: later
    await run(lite, insert("shop", "f"), "new-key")
    assert rows(sqlite_file, f"SELECT idempotency_key FROM {TABLE}") == [("new-key",)]


async def test_an_expired_key_may_be_used_again(lite: DatabaseHandler, sqlite_file: Path) -> None:
    table = table_of(lite, "shop")
    await run(lite, insert("shop", "g"), "reused-later")
    later = table.clock() + 3601
    table.clock = lambda: later
    [chunk] = await run(lite, insert("shop", "h"), "reused-later")
    assert chunk.batch.sets_applied == 1
    assert rows(sqlite_file, "SELECT sku FROM stock ORDER BY sku") == [("g",), ("h",)]


async def test_a_keyed_write_to_a_profile_without_a_table_is_refused(lite: DatabaseHandler) -> None:
    with pytest.raises(FailedPrecondition, match="idempotency_table") as info:
        await run(lite, insert("shop-unkeyed", "i"), "k")
    assert info.value.reason == "IDEMPOTENCY_NOT_CONFIGURED"


async def test_a_keyed_write_whose_table_is_missing_says_how_to_create_it(tmp_path: Path) -> None:
    handler = DatabaseHandler({"p": DatabaseProfile(name="p", url=f"sqlite:///{tmp_path / 'x.db'}",
                                                    idempotency_table="missing_table")})
    try:
        with pytest.raises(FailedPrecondition, match="create-idempotency-table") as info:
            await run(handler, insert("p", "j"), "k")
        assert info.value.reason == "IDEMPOTENCY_TABLE_MISSING"
    finally:
        await handler.aclose()


async def test_a_keyed_request_on_a_read_only_profile_is_refused_by_the_read_only_guard(
        lite: DatabaseHandler, sqlite_file: Path) -> None:
    with pytest.raises(RequestError) as info:
        await run(lite, insert("shop-ro", "k"), "ro-key")
    assert (info.value.code, info.value.reason) == (Code.FAILED_PRECONDITION, "READ_ONLY_PROFILE")
    assert rows(sqlite_file, f"SELECT count(*) FROM {TABLE}") == [(0,)]


# -- PostgreSQL: two attempts with one key at once --

@pytest.fixture(scope="module")
def once_db(postgres: PostgresServer) -> Iterator[PostgresServer]:
    postgres.create_database("onprem_once")
    server = PostgresServer(postgres.host, postgres.port, postgres.user, postgres.password, "onprem_once")
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL)")
    yield server


@pytest.fixture
async def pg(once_db: PostgresServer) -> AsyncIterator[DatabaseHandler]:
    handler = DatabaseHandler({"pg": DatabaseProfile(name="pg", url=once_db.url(), pool_size=3,
                                                     idempotency_table="once.keys")})
    with psycopg.connect(once_db.dsn(), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS once")
    runtime = handler._runtime("pg")
    with runtime.engine().begin() as conn:
        assert runtime.idempotency is not None
        runtime.idempotency.create(conn)
    yield handler
    await handler.aclose()


async def waiting_on_locks(server: PostgresServer, count: int) -> None:
    """Until `count` backends of the database wait on a lock."""
    while True:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                               " AND wait_event_type = 'Lock'").fetchone()
        if row is not None and row[0] >= count:
            return
        await asyncio.sleep(0.05)


async def test_pg_two_attempts_with_one_key_at_once_run_the_write_once(
        pg: DatabaseHandler, once_db: PostgresServer) -> None:
    start = transaction("pg", ("INSERT INTO stock VALUES ('race', 1)", {}))
    with psycopg.connect(once_db.dsn()) as blocker:
        blocker.execute("LOCK TABLE stock IN ACCESS EXCLUSIVE MODE")  # the first attempt stops at its INSERT
        first = asyncio.create_task(run(pg, start, "race-key"))
        await asyncio.wait_for(waiting_on_locks(once_db, 1), 60)
        second = asyncio.create_task(run(pg, start, "race-key"))  # stops on the first's key row
        await asyncio.wait_for(waiting_on_locks(once_db, 2), 60)
        blocker.commit()
    outcomes = await asyncio.wait_for(asyncio.gather(first, second), 60)
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0].transaction.results[0].rows_affected == 1
    with psycopg.connect(once_db.dsn()) as conn:
        assert conn.execute("SELECT count(*) FROM stock WHERE sku = 'race'").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM once.keys WHERE idempotency_key = 'race-key'").fetchone() == (1,)


async def test_pg_a_keyed_query_returning_rows_records_them(pg: DatabaseHandler) -> None:
    start = request(query=database_pb2.QueryRequest(
        profile="pg", sql="INSERT INTO stock VALUES ('ret', 7) RETURNING qty"))
    first = await run(pg, start, "returning-key")
    assert [c.WhichOneof("body") for c in first] == ["query", "query", "query"]
    assert first[1].query.rows.row_count == 1
    assert await run(pg, start, "returning-key") == first
