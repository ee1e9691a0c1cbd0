"""ExecuteBatch, ExecuteTransaction, procedures, PollChanges and the safety limits, against real databases."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from onprem.agent.handlers.base import RequestContext
from onprem.agent.handlers.database import DatabaseHandler
from onprem.agent.profiles import DatabaseProfile
from onprem.tunnel.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, PermissionDenied
from onprem.v1 import database_pb2, tunnel_pb2, values_pb2
from tests.agent.handlers.database.test_handler import collect, decode, reader_url, start
from tests.support.postgres import PostgresServer

V = values_pb2.Value


def request(**operation: Any) -> tunnel_pb2.RequestStart:
    return tunnel_pb2.RequestStart(database_query=database_pb2.DatabaseQuery(**operation))


async def run(handler: DatabaseHandler, start_: tunnel_pb2.RequestStart) -> list[tunnel_pb2.ResponseChunk]:
    return [c async for c in handler.handle(start_.database_query, RequestContext(request_id=1, body=None))]


def batch(profile: str, sql: str, *sets: dict[str, V]) -> tunnel_pb2.RequestStart:
    return request(batch=database_pb2.ExecuteBatchRequest(
        profile=profile, sql=sql, parameter_sets=[database_pb2.ParameterSet(parameters=s) for s in sets]))


def transaction(profile: str, *statements: tuple[str, dict[str, V]]) -> tunnel_pb2.RequestStart:
    return request(transaction=database_pb2.ExecuteTransactionRequest(
        profile=profile, statements=[database_pb2.Statement(sql=s, parameters=p) for s, p in statements]))


@pytest.fixture(scope="module")
def ops_db(postgres: PostgresServer) -> Iterator[PostgresServer]:
    postgres.create_database("onprem_ops")
    server = PostgresServer(postgres.host, postgres.port, postgres.user, postgres.password, "onprem_ops")
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL CHECK (qty >= 0))")
        conn.execute("CREATE FUNCTION add_one(x int) RETURNS int LANGUAGE sql AS 'SELECT x + 1'")
        conn.execute("CREATE PROCEDURE restock(s text, n int, INOUT total int DEFAULT NULL) LANGUAGE plpgsql AS $$"
                     " BEGIN INSERT INTO stock VALUES (s, n) ON CONFLICT (sku) DO UPDATE SET qty = stock.qty + n"
                     " RETURNING qty INTO total; END $$")
        conn.execute("CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz NOT NULL, body text)")
    yield server


@pytest.fixture
async def pg(ops_db: PostgresServer) -> AsyncIterator[DatabaseHandler]:
    handler = DatabaseHandler({
        "pg": DatabaseProfile(name="pg", url=ops_db.url(), pool_size=3),
        "pg-ro": DatabaseProfile(name="pg-ro", url=reader_url(ops_db), read_only=True, pool_size=2),
        "pg-ro-super": DatabaseProfile(name="pg-ro-super", url=ops_db.url(), read_only=True, pool_size=1),
    })
    yield handler
    await handler.aclose()


def _scalar(server: PostgresServer, sql: str) -> Any:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
        return row[0] if row else None


async def test_pg_batch_applies_every_set_in_one_transaction(pg: DatabaseHandler, ops_db: PostgresServer) -> None:
    sets = [{"s": V(string_value=f"b{i}"), "q": V(int64_value=i)} for i in range(100)]
    [chunk] = await run(pg, batch("pg", "INSERT INTO stock VALUES (:s, :q)", *sets))
    assert chunk.batch == database_pb2.ExecuteBatchResponse(rows_affected=100, sets_applied=100)
    assert _scalar(ops_db, "SELECT count(*) FROM stock WHERE sku LIKE 'b%'") == 100


async def test_pg_batch_with_one_bad_set_applies_none(pg: DatabaseHandler, ops_db: PostgresServer) -> None:
    sets = [{"s": V(string_value="c1"), "q": V(int64_value=1)}, {"s": V(string_value="c2"), "q": V(int64_value=-1)}]
    with pytest.raises(FailedPrecondition, match="23514") as info:
        await run(pg, batch("pg", "INSERT INTO stock VALUES (:s, :q)", *sets))
    assert info.value.reason == "INTEGRITY_VIOLATION"
    assert _scalar(ops_db, "SELECT count(*) FROM stock WHERE sku LIKE 'c%'") == 0


async def test_batch_set_missing_a_parameter_names_the_set(pg: DatabaseHandler) -> None:
    with pytest.raises(InvalidArgument, match=r"parameter set 1: parameter 'q'"):
        await run(pg, batch("pg", "INSERT INTO stock VALUES (:s, :q)",
                            {"s": V(string_value="d1"), "q": V(int64_value=1)}, {"s": V(string_value="d2")}))


async def test_pg_transaction_commits_and_reports_rows_per_statement(pg: DatabaseHandler, ops_db: PostgresServer) -> None:
    [chunk] = await run(pg, transaction(
        "pg",
        ("INSERT INTO stock VALUES ('t1', 5), ('t2', 5)", {}),
        ("UPDATE stock SET qty = qty - :n WHERE sku IN ('t1', 't2')", {"n": V(int64_value=2)}),
        ("SELECT 1", {}),
    ))
    assert [r.rows_affected for r in chunk.transaction.results] == [2, 2, -1]
    assert _scalar(ops_db, "SELECT sum(qty) FROM stock WHERE sku IN ('t1', 't2')") == 6


async def test_pg_transaction_rolls_back_every_statement_at_the_first_failure(
    pg: DatabaseHandler, ops_db: PostgresServer
) -> None:
    with pytest.raises(FailedPrecondition, match="23514"):
        await run(pg, transaction(
            "pg",
            ("INSERT INTO stock VALUES ('r1', 1)", {}),
            ("UPDATE stock SET qty = qty - 5 WHERE sku = 'r1'", {}),  # violates qty >= 0
        ))
    assert _scalar(ops_db, "SELECT count(*) FROM stock WHERE sku = 'r1'") == 0


async def test_sqlite_transaction_rolls_back_as_one(tmp_path: Path) -> None:
    path = tmp_path / "tx.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    handler = DatabaseHandler({"lite": DatabaseProfile(name="lite", url=f"sqlite:///{path}")})
    try:
        with pytest.raises(Exception) as info:
            await run(handler, transaction("lite", ("INSERT INTO t VALUES (1)", {}), ("INSERT INTO t VALUES (1)", {})))
        assert info.value.reason == "UNIQUE_VIOLATION"  # type: ignore[attr-defined]
        [chunk] = await run(handler, batch("lite", "INSERT INTO t VALUES (:i)", *({"i": V(int64_value=i)}
                                                                                   for i in range(3))))
        assert chunk.batch.sets_applied == 3 and chunk.batch.rows_affected == 3
    finally:
        await handler.aclose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT group_concat(id) FROM t").fetchone() == ("0,1,2",)


async def test_pg_function_called_with_select_returns_its_value(pg: DatabaseHandler) -> None:
    _, rows = decode(await collect(pg, start("pg", "SELECT add_one(:x) AS y", x=V(int64_value=41))))
    assert rows == [[42]]


async def test_pg_procedure_called_with_call_runs_and_returns_inout(pg: DatabaseHandler, ops_db: PostgresServer) -> None:
    sql = "CALL restock(:s, CAST(:n AS int))"
    await collect(pg, start("pg", sql, s=V(string_value="p1"), n=V(int64_value=3)))
    columns, rows = decode(await collect(pg, start("pg", sql, s=V(string_value="p1"), n=V(int64_value=4))))
    assert [c.name for c in columns] == ["total"] and rows == [[7]]
    assert _scalar(ops_db, "SELECT qty FROM stock WHERE sku = 'p1'") == 7


@pytest.mark.parametrize("sql", [
    "INSERT INTO stock VALUES ('w', 1)",
    "CREATE TABLE evil (x int)",
    "COPY stock TO '/tmp/onprem-copy-leak.csv'",
    "COPY (SELECT * FROM stock) TO PROGRAM 'true'",
    "WITH gone AS (DELETE FROM stock RETURNING *) SELECT count(*) FROM gone",
    "SELECT 1; COMMIT; INSERT INTO stock VALUES ('w2', 1)",
    "CALL restock('w3', 1)",
])
async def test_pg_read_only_profile_refuses_every_write(pg: DatabaseHandler, ops_db: PostgresServer, sql: str) -> None:
    before = _scalar(ops_db, "SELECT count(*) FROM stock")
    with pytest.raises((FailedPrecondition, InvalidArgument, PermissionDenied)) as info:
        await collect(pg, start("pg-ro", sql))
    # A multi-statement string fails before anything runs; a read-only transaction allows COPY TO, so the
    # reader role's missing file rights refuse it; everything else is the server's read-only refusal.
    expected = {";": (InvalidArgument, "SQL_ERROR"), "COPY": (PermissionDenied, "INSUFFICIENT_PRIVILEGE")}
    cls, reason = next((v for k, v in expected.items() if k in sql), (FailedPrecondition, "READ_ONLY_PROFILE"))
    assert (type(info.value), info.value.reason) == (cls, reason)
    assert _scalar(ops_db, "SELECT count(*) FROM stock") == before
    assert not await asyncio.to_thread(Path("/tmp/onprem-copy-leak.csv").exists)


async def test_pg_read_only_profile_refuses_a_superuser_role_that_could_copy_to_files(pg: DatabaseHandler) -> None:
    with pytest.raises(FailedPrecondition, match="role 'onprem' is a superuser") as info:
        await collect(pg, start("pg-ro-super", "SELECT 1"))
    assert info.value.reason == "READ_ONLY_PROFILE"


async def test_pg_read_only_profile_refuses_batches_and_transactions(pg: DatabaseHandler) -> None:
    with pytest.raises(FailedPrecondition) as info:
        await run(pg, batch("pg-ro", "INSERT INTO stock VALUES (:s, 1)", {"s": V(string_value="x")}))
    assert info.value.reason == "READ_ONLY_PROFILE"
    with pytest.raises(FailedPrecondition):
        await run(pg, transaction("pg-ro", ("DELETE FROM stock", {})))


async def test_sqlite_statement_timeout_stops_the_statement(tmp_path: Path) -> None:
    handler = DatabaseHandler({"slow": DatabaseProfile(name="slow", url=f"sqlite:///{tmp_path}/s.db",
                                                       statement_timeout_seconds=0.3, pool_size=1)})
    endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
    try:
        began = time.monotonic()
        with pytest.raises(DeadlineExceeded) as info:
            await collect(handler, start("slow", endless))
        assert info.value.reason == "STATEMENT_TIMEOUT"
        assert time.monotonic() - began < 2
        # The deadline belongs to that statement: the next one on the same connection runs.
        _, rows = decode(await collect(handler, start("slow", "SELECT 1")))
        assert rows == [[1]]
    finally:
        await handler.aclose()


async def test_pg_result_columns_say_whether_they_are_nullable(pg: DatabaseHandler) -> None:
    columns, _ = decode(await collect(pg, start("pg", "SELECT sku, qty, qty + 1 AS computed, at FROM stock, events "
                                                      "LIMIT 0")))
    assert [(c.name, c.nullable, c.database_type) for c in columns] == [
        ("sku", False, "TEXT"), ("qty", False, "INT4"), ("computed", True, "INT4"), ("at", False, "TIMESTAMPTZ"),
    ]


# --- change polls -------------------------------------------------------------------------------


def poll(profile: str, after: database_pb2.Watermark | None, max_rows: int, **kw: Any) -> tunnel_pb2.RequestStart:
    req = database_pb2.PollChangesRequest(profile=profile, watermark_column="at", key_column="id",
                                          max_rows=max_rows, **kw)
    if after is not None:
        req.after.CopyFrom(after)
    return request(poll_changes=req)


async def _poll_once(handler: DatabaseHandler, after: database_pb2.Watermark | None, max_rows: int,
                     **kw: Any) -> tuple[list[int], database_pb2.PollChangesSummary]:
    chunks = [c.poll_changes for c in await run(handler, poll("pg", after, max_rows, **kw))]
    assert chunks[0].WhichOneof("result") == "header" and chunks[-1].WhichOneof("result") == "summary"
    header = [c.name for c in chunks[0].header.columns]
    ids = [v for c in chunks[1:-1] for v in c.rows.columns[header.index("id")].int64_values]
    return ids, chunks[-1].summary


async def test_poll_changes_pages_through_equal_watermarks_without_loss_or_repeat(
    pg: DatabaseHandler, ops_db: PostgresServer
) -> None:
    with psycopg.connect(ops_db.dsn(), autocommit=True) as conn:
        conn.execute("TRUNCATE events RESTART IDENTITY")
        # 25 rows share each of four timestamps: a page of 7 ends inside a group every time.
        conn.execute("INSERT INTO events (at, body) SELECT TIMESTAMPTZ '2024-01-01 00:00:00+00' + (i / 25) * "
                     "INTERVAL '1 second', 'e' || i FROM generate_series(0, 99) AS i")
    seen: list[int] = []
    after = None
    while True:
        ids, summary = await _poll_once(pg, after, 7, table="public.events")
        seen += ids
        after = summary.next
        if not summary.has_more:
            break
    assert seen == list(range(1, 101))
    assert after is not None and after.key.int64_value == 100
    assert after.value.timestamp_value == "2024-01-01T00:00:03+00:00"
    again, summary = await _poll_once(pg, after, 7, table="events")
    assert again == [] and summary.next == after and not summary.has_more


async def test_poll_changes_while_writers_insert_equal_timestamps_concurrently(
    pg: DatabaseHandler, ops_db: PostgresServer
) -> None:
    with psycopg.connect(ops_db.dsn(), autocommit=True) as conn:
        conn.execute("TRUNCATE events RESTART IDENTITY")
    written: list[int] = []

    def writer(n: int) -> None:
        # Four writers; every 20 consecutive rows share one timestamp. The advisory lock makes commit
        # order follow (timestamp, key) order, the premise of any watermark (see agent/handlers/database/operations.py).
        with psycopg.connect(ops_db.dsn()) as conn:
            for _ in range(60):
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(42)")
                    row = conn.execute("INSERT INTO events (at, body) VALUES (TIMESTAMPTZ '2024-06-01 00:00:00+00' + "
                                       "(SELECT count(*) FROM events) / 20 * INTERVAL '1 second', %s) RETURNING id",
                                       (f"w{n}",)).fetchone()
                assert row is not None
                written.append(row[0])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    seen: list[int] = []
    after = None
    try:
        while True:
            alive = any(t.is_alive() for t in threads)
            ids, summary = await _poll_once(pg, after, 5, sql="SELECT id, at, body FROM events")
            seen += ids
            after = summary.next if summary.next.HasField("value") else after
            if not alive and not summary.has_more:
                break
            await asyncio.sleep(0 if summary.has_more else 0.01)
    finally:
        for t in threads:
            t.join()
    assert len(seen) == len(set(seen)) == 240
    assert sorted(seen) == sorted(written)


async def test_poll_changes_needs_table_or_sql_and_a_known_watermark_column(pg: DatabaseHandler) -> None:
    with pytest.raises(InvalidArgument, match="either table or sql"):
        await run(pg, poll("pg", None, 5))
    with pytest.raises(InvalidArgument, match='column "at" does not exist'):
        await run(pg, poll("pg", None, 5, sql="SELECT 1 AS id, now() AS at2"))


async def test_sqlite_poll_changes_on_a_table_resumes_after_the_watermark(tmp_path: Path) -> None:
    path = tmp_path / "poll.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, at TEXT)")
        conn.executemany("INSERT INTO events VALUES (?, ?)", [(i, f"2024-01-0{1 + i // 3}") for i in range(9)])
    handler = DatabaseHandler({"pg": DatabaseProfile(name="pg", url=f"sqlite:///{path}", read_only=True)})
    try:
        first, summary = await _poll_once(handler, None, 4, table="events")
        rest, final = await _poll_once(handler, summary.next, 100, table="events")
        assert (first, summary.has_more) == ([0, 1, 2, 3], True)
        assert (rest, final.has_more) == ([4, 5, 6, 7, 8], False)
        assert final.next.value.string_value == "2024-01-03" and final.next.key.int64_value == 8
    finally:
        await handler.aclose()
