"""DatabaseHandler against a real SQLite file and the real PostgreSQL test server."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from onprem.agent.handlers.base import RequestContext
from onprem.agent.handlers.database import DatabaseHandler
from onprem.agent.handlers.database.engine import RequestConnection
from onprem.agent.profiles import DatabaseProfile
from onprem.tunnel.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from onprem.v1 import database_pb2, profiles_pb2, tunnel_pb2, values_pb2
from tests.support.postgres import PostgresServer

VT = values_pb2.ValueType


def start(profile: str, sql: str, max_rows: int = 0, **params: values_pb2.Value) -> tunnel_pb2.RequestStart:
    query = database_pb2.QueryRequest(profile=profile, sql=sql, max_rows=max_rows)
    for name, value in params.items():
        query.parameters[name].CopyFrom(value)
    return tunnel_pb2.RequestStart(database_query=database_pb2.DatabaseQuery(query=query))


async def collect(
    handler: DatabaseHandler, request: tunnel_pb2.RequestStart, max_chunk_bytes: int = 256 * 1024
) -> list[database_pb2.QueryResponse]:
    context = RequestContext(request_id=1, body=None, max_chunk_bytes=max_chunk_bytes)
    return [chunk.query async for chunk in handler.handle(request.database_query, context)]


def decode(responses: list[database_pb2.QueryResponse]) -> tuple[list[values_pb2.Column], list[list[Any]]]:
    """Rows back as Python values, reading each column from the array its type names."""
    assert responses[0].WhichOneof("result") == "header"
    assert responses[-1].WhichOneof("result") == "summary"
    columns = list(responses[0].header.columns)
    rows: list[list[Any]] = []
    for response in responses[1:-1]:
        batch = response.rows
        decoded = []
        for column, values in zip(columns, batch.columns, strict=True):
            if column.type == VT.VALUE_TYPE_BOOL:
                raw: list[Any] = list(values.bool_values)
            elif column.type == VT.VALUE_TYPE_INT64:
                raw = list(values.int64_values)
            elif column.type == VT.VALUE_TYPE_DOUBLE:
                raw = list(values.double_values)
            elif column.type == VT.VALUE_TYPE_BYTES:
                raw = list(values.bytes_values)
            else:
                raw = list(values.string_values)
            assert len(raw) == batch.row_count
            if values.nulls:
                raw = [None if null else v for v, null in zip(raw, values.nulls, strict=True)]
            decoded.append(raw)
        rows.extend([list(r) for r in zip(*decoded, strict=True)])
    return columns, rows


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    path = tmp_path / "demo.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT UNIQUE, price REAL, data BLOB)")
        conn.executemany(
            "INSERT INTO items (id, name, price, data) VALUES (?, ?, ?, ?)",
            [(1, "apple", 1.5, b"\x00\x01"), (2, "pear", None, None), (3, "plum", 0.25, b"")],
        )
    return path


@pytest.fixture
async def sqlite_handler(sqlite_path: Path) -> AsyncIterator[DatabaseHandler]:
    handler = DatabaseHandler(
        {
            "rw": DatabaseProfile(name="rw", url=f"sqlite:///{sqlite_path}", pool_size=2),
            "ro": DatabaseProfile(name="ro", url=f"sqlite:///{sqlite_path}", read_only=True, pool_size=2),
            "capped": DatabaseProfile(name="capped", url=f"sqlite:///{sqlite_path}", max_rows=2),
        }
    )
    yield handler
    await handler.aclose()


@pytest.fixture(scope="module")
def pg_db(postgres: PostgresServer) -> Iterator[PostgresServer]:
    """A fresh database for this module, with one table of known rows."""
    postgres.create_database("onprem_handler_db")
    server = PostgresServer(postgres.host, postgres.port, postgres.user, postgres.password, "onprem_handler_db")
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, owner text UNIQUE NOT NULL, balance numeric(12,2))")
        conn.execute("INSERT INTO accounts VALUES (1, 'ann', 10.50), (2, 'bob', NULL)")
    yield server


def reader_url(server: PostgresServer) -> str:
    """A URL for a role that may only read: read-only profiles refuse superusers, who could COPY ... TO a file."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'onprem_reader'").fetchone():
            conn.execute(f"CREATE ROLE onprem_reader LOGIN PASSWORD '{server.password}'")
        conn.execute(f'GRANT ALL ON DATABASE "{server.database}" TO onprem_reader')
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO onprem_reader")
        conn.execute("GRANT USAGE ON SCHEMA public TO onprem_reader")
    return server.url().replace(f"{server.user}:", "onprem_reader:", 1)


@pytest.fixture
async def pg_handler(pg_db: PostgresServer) -> AsyncIterator[DatabaseHandler]:
    handler = DatabaseHandler(
        {
            "pg": DatabaseProfile(name="pg", url=pg_db.url(), pool_size=2),
            "pg-ro": DatabaseProfile(name="pg-ro", url=reader_url(pg_db), read_only=True, pool_size=1),
            "pg-timeout": DatabaseProfile(name="pg-timeout", url=pg_db.url(), statement_timeout_seconds=0.2),
        }
    )
    yield handler
    await handler.aclose()


# --- SQLite ---------------------------------------------------------------------------------------


async def test_sqlite_select_streams_header_rows_and_summary(sqlite_handler: DatabaseHandler) -> None:
    responses = await collect(sqlite_handler, start("rw", "SELECT id, name, price, data FROM items ORDER BY id"))
    columns, rows = decode(responses)
    assert [(c.name, c.type) for c in columns] == [
        ("id", VT.VALUE_TYPE_INT64),
        ("name", VT.VALUE_TYPE_STRING),
        ("price", VT.VALUE_TYPE_DOUBLE),
        ("data", VT.VALUE_TYPE_BYTES),
    ]
    assert rows == [[1, "apple", 1.5, b"\x00\x01"], [2, "pear", None, None], [3, "plum", 0.25, b""]]
    assert responses[-1].summary == database_pb2.QuerySummary(row_count=3, rows_affected=-1, truncated=False)


async def test_sqlite_nulls_list_only_present_when_batch_has_nulls(sqlite_handler: DatabaseHandler) -> None:
    responses = await collect(sqlite_handler, start("rw", "SELECT id, price FROM items ORDER BY id"))
    batch = responses[1].rows
    assert list(batch.columns[0].nulls) == []
    assert list(batch.columns[1].nulls) == [False, True, False]
    assert list(batch.columns[1].double_values) == [1.5, 0.0, 0.25]


async def test_sqlite_binds_typed_parameters(sqlite_handler: DatabaseHandler) -> None:
    request = start(
        "rw",
        "SELECT :i AS i, :s AS s, :d AS d, :dt AS dt, :n AS n, :b AS b",
        i=values_pb2.Value(int64_value=-7),
        s=values_pb2.Value(string_value="x'y"),
        d=values_pb2.Value(decimal_value="12.50"),
        dt=values_pb2.Value(date_value="2024-02-29"),
        n=values_pb2.Value(null_value=True),
        b=values_pb2.Value(bool_value=True),
    )
    _, rows = decode(await collect(sqlite_handler, request))
    # SQLite has no decimal or date type: they arrive as the text they were bound as.
    assert rows == [[-7, "x'y", "12.50", "2024-02-29", None, 1]]


async def test_missing_parameter_is_invalid_argument_naming_it(sqlite_handler: DatabaseHandler) -> None:
    with pytest.raises(InvalidArgument, match="parameter 'id'") as info:
        await collect(sqlite_handler, start("rw", "SELECT * FROM items WHERE id = :id"))
    assert info.value.reason == "INVALID_PARAMETER"


async def test_pg_style_cast_after_parameter_gets_a_hint(sqlite_handler: DatabaseHandler) -> None:
    with pytest.raises(InvalidArgument, match=r"CAST\(:n AS type\)"):
        await collect(sqlite_handler, start("rw", "SELECT :n::int", n=values_pb2.Value(int64_value=1)))


async def test_parameter_without_kind_is_invalid_argument(sqlite_handler: DatabaseHandler) -> None:
    with pytest.raises(InvalidArgument, match="parameter 'id' has no value set"):
        await collect(sqlite_handler, start("rw", "SELECT :id", id=values_pb2.Value()))


async def test_unused_parameter_is_invalid_argument(sqlite_handler: DatabaseHandler) -> None:
    with pytest.raises(InvalidArgument, match="parameter 'extra'"):
        await collect(sqlite_handler, start("rw", "SELECT 1", extra=values_pb2.Value(int64_value=1)))


async def test_malformed_decimal_parameter_is_invalid_argument(sqlite_handler: DatabaseHandler) -> None:
    with pytest.raises(InvalidArgument, match="parameter 'p'"):
        await collect(sqlite_handler, start("rw", "SELECT :p", p=values_pb2.Value(decimal_value="1,5")))


async def test_sqlite_dml_reports_rows_affected_and_commits(
    sqlite_handler: DatabaseHandler, sqlite_path: Path
) -> None:
    responses = await collect(sqlite_handler, start("rw", "UPDATE items SET price = 2 WHERE id < 3"))
    assert list(responses[0].header.columns) == []
    assert responses[-1].summary.rows_affected == 2
    with sqlite3.connect(sqlite_path) as conn:
        assert conn.execute("SELECT count(*) FROM items WHERE price = 2").fetchone() == (2,)


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO items (id, name) VALUES (9, 'fig')",
        "CREATE TABLE evil (x int)",
        "PRAGMA query_only = OFF",
        "ATTACH DATABASE ':memory:' AS other",
    ],
)
async def test_sqlite_read_only_profile_refuses_writes(
    sqlite_handler: DatabaseHandler, sqlite_path: Path, sql: str
) -> None:
    with pytest.raises(FailedPrecondition) as info:
        await collect(sqlite_handler, start("ro", sql))
    assert info.value.reason == "READ_ONLY_PROFILE"
    with sqlite3.connect(sqlite_path) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (3,)
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'evil'").fetchone() == (0,)
    # The same pooled connections still refuse writes afterwards.
    with pytest.raises(FailedPrecondition):
        await collect(sqlite_handler, start("ro", "DELETE FROM items"))


async def test_sqlite_read_only_profile_still_reads(sqlite_handler: DatabaseHandler) -> None:
    _, rows = decode(await collect(sqlite_handler, start("ro", "SELECT count(*) FROM items")))
    assert rows == [[3]]


async def test_sqlite_unique_violation_is_already_exists(sqlite_handler: DatabaseHandler) -> None:
    with pytest.raises(AlreadyExists):
        await collect(sqlite_handler, start("rw", "INSERT INTO items (id, name) VALUES (10, 'apple')"))


async def test_sqlite_syntax_error_is_invalid_argument(sqlite_handler: DatabaseHandler) -> None:
    with pytest.raises(InvalidArgument, match="syntax error") as info:
        await collect(sqlite_handler, start("rw", "SELEC 1"))
    assert info.value.reason == "SQL_ERROR"


async def test_sqlite_multiple_statements_are_refused(sqlite_handler: DatabaseHandler, sqlite_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        await collect(sqlite_handler, start("ro", "SELECT 1; DELETE FROM items"))
    with sqlite3.connect(sqlite_path) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (3,)


async def test_unknown_profile_is_not_found(sqlite_handler: DatabaseHandler) -> None:
    with pytest.raises(NotFound, match="database profile 'nope' is not configured on this agent") as info:
        await collect(sqlite_handler, start("nope", "SELECT 1"))
    assert info.value.reason == "PROFILE_NOT_FOUND"


async def test_max_rows_truncates_and_says_so(sqlite_handler: DatabaseHandler) -> None:
    responses = await collect(sqlite_handler, start("rw", "SELECT id FROM items ORDER BY id", max_rows=2))
    _, rows = decode(responses)
    assert rows == [[1], [2]]
    assert responses[-1].summary.truncated is True
    assert responses[-1].summary.row_count == 2


async def test_profile_row_cap_applies_and_exact_fit_is_not_truncated(sqlite_handler: DatabaseHandler) -> None:
    capped = await collect(sqlite_handler, start("capped", "SELECT id FROM items"))
    assert capped[-1].summary.truncated is True
    exact = await collect(sqlite_handler, start("rw", "SELECT id FROM items", max_rows=3))
    assert exact[-1].summary.truncated is False
    assert exact[-1].summary.row_count == 3


async def test_sqlite_mixed_column_in_first_batch_is_sent_as_string(sqlite_handler: DatabaseHandler) -> None:
    sql = "SELECT 1 AS v UNION ALL SELECT 'two' UNION ALL SELECT NULL"
    columns, rows = decode(await collect(sqlite_handler, start("rw", sql)))
    assert columns[0].type == VT.VALUE_TYPE_STRING
    assert sorted(rows, key=str) == sorted([["1"], ["two"], [None]], key=str)


async def test_sqlite_type_change_after_header_fails_precisely(sqlite_handler: DatabaseHandler) -> None:
    # 300 integers fill the first fetch (200 rows), then text arrives.
    sql = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300) "
        "SELECT CASE WHEN i <= 250 THEN i ELSE 'x' || i END AS v FROM n"
    )
    with pytest.raises(FailedPrecondition, match="column 'v'") as info:
        await collect(sqlite_handler, start("rw", sql))
    assert info.value.reason == "MIXED_COLUMN_TYPES"


async def test_row_larger_than_chunk_is_resource_exhausted(sqlite_handler: DatabaseHandler) -> None:
    with pytest.raises(ResourceExhausted):
        await collect(sqlite_handler, start("rw", "SELECT zeroblob(5000)"), max_chunk_bytes=1024)


async def test_sqlite_large_result_streams_in_bounded_batches(sqlite_handler: DatabaseHandler) -> None:
    sql = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000) "
        "SELECT i, 'row-' || i AS label FROM n"
    )
    responses = await collect(sqlite_handler, start("rw", sql), max_chunk_bytes=32 * 1024)
    batches = [r for r in responses if r.WhichOneof("result") == "rows"]
    assert len(batches) > 10
    assert all(tunnel_pb2.ResponseChunk(query=r).ByteSize() <= 32 * 1024 for r in batches)
    assert sum(b.rows.row_count for b in batches) == 50000 == responses[-1].summary.row_count


@pytest.mark.parametrize("profile", ["rw", "ro"])
async def test_sqlite_sql_the_driver_refuses_before_running_it_is_invalid_argument(
        sqlite_handler: DatabaseHandler, profile: str) -> None:
    # sqlite3 refuses a NUL in the SQL text itself (ProgrammingError), without a message SQLite would write.
    with pytest.raises(InvalidArgument) as info:
        await collect(sqlite_handler, start(profile, "SELECT 1\x00"))
    assert info.value.reason == "SQL_ERROR" and "null character" in info.value.message
    _, rows = decode(await collect(sqlite_handler, start(profile, "SELECT 7")))
    assert rows == [[7]]


async def test_sqlite_cancellation_interrupts_and_frees_the_connection(tmp_path: Path) -> None:
    path = tmp_path / "one.db"
    handler = DatabaseHandler({"one": DatabaseProfile(name="one", url=f"sqlite:///{path}", pool_size=1)})
    try:
        endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
        task = asyncio.create_task(collect(handler, start("one", endless)))
        await asyncio.sleep(0.3)
        began = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - began < 2
        # pool_size=1: this only works if the interrupted connection went back to the pool.
        _, rows = decode(await asyncio.wait_for(collect(handler, start("one", "SELECT 42")), 5))
        assert rows == [[42]]
    finally:
        await handler.aclose()


# --- PostgreSQL -------------------------------------------------------------------------------------


async def test_pg_maps_column_types_from_the_server(pg_handler: DatabaseHandler) -> None:
    sql = """
        SELECT true AS b, 42::int8 AS i, 1.5::float8 AS f, 12345.6700::numeric(12,4) AS d, 'tx'::text AS s,
               '\\x0001'::bytea AS y, DATE '2024-02-29' AS dt, TIME '13:14:15.5' AS t,
               TIMESTAMP '2024-01-02 03:04:05' AS ts, TIMESTAMPTZ '2024-01-02 03:04:05+00' AS tz,
               INTERVAL '1 day 2 hours 3.5 seconds' AS iv, '6c0f2a52-3f6b-4a38-9f10-0c1c2d3e4f50'::uuid AS u,
               '{"a": [1, 2]}'::jsonb AS j, ARRAY[1, 2, 3] AS arr, NULL::int4 AS nothing
    """
    columns, rows = decode(await collect(pg_handler, start("pg", sql)))
    assert [(c.name, c.type, c.database_type) for c in columns] == [
        ("b", VT.VALUE_TYPE_BOOL, "BOOL"),
        ("i", VT.VALUE_TYPE_INT64, "INT8"),
        ("f", VT.VALUE_TYPE_DOUBLE, "FLOAT8"),
        ("d", VT.VALUE_TYPE_DECIMAL, "NUMERIC(12,4)"),
        ("s", VT.VALUE_TYPE_STRING, "TEXT"),
        ("y", VT.VALUE_TYPE_BYTES, "BYTEA"),
        ("dt", VT.VALUE_TYPE_DATE, "DATE"),
        ("t", VT.VALUE_TYPE_TIME, "TIME"),
        ("ts", VT.VALUE_TYPE_TIMESTAMP, "TIMESTAMP"),
        ("tz", VT.VALUE_TYPE_TIMESTAMP_TZ, "TIMESTAMPTZ"),
        ("iv", VT.VALUE_TYPE_INTERVAL, "INTERVAL"),
        ("u", VT.VALUE_TYPE_UUID, "UUID"),
        ("j", VT.VALUE_TYPE_JSON, "JSONB"),
        ("arr", VT.VALUE_TYPE_ARRAY, "INT4[]"),
        ("nothing", VT.VALUE_TYPE_INT64, "INT4"),
    ]
    assert rows == [[
        True, 42, 1.5, "12345.6700", "tx", b"\x00\x01", "2024-02-29", "13:14:15.5",
        "2024-01-02T03:04:05", "2024-01-02T03:04:05+00:00", "P1DT2H0M3.5S",
        "6c0f2a52-3f6b-4a38-9f10-0c1c2d3e4f50", '{"a": [1, 2]}', "[1, 2, 3]", None,
    ]]


async def test_pg_binds_typed_parameters(pg_handler: DatabaseHandler) -> None:
    request = start(
        "pg",
        "SELECT CAST(:d AS numeric) + 0.01 AS d, CAST(:ts AS timestamptz) AS ts, CAST(:u AS uuid) AS u,"
        " CAST(:j AS jsonb) -> 'k' AS j, :by AS by",
        d=values_pb2.Value(decimal_value="0.10000000000000000001"),
        ts=values_pb2.Value(timestamp_value="2024-05-06T07:08:09+02:00"),
        u=values_pb2.Value(uuid_value="6c0f2a52-3f6b-4a38-9f10-0c1c2d3e4f50"),
        j=values_pb2.Value(json_value='{"k": "v"}'),
        by=values_pb2.Value(bytes_value=b"\xff"),
    )
    _, rows = decode(await collect(pg_handler, request))
    assert rows == [["0.11000000000000000001", "2024-05-06T05:08:09+00:00",
                     "6c0f2a52-3f6b-4a38-9f10-0c1c2d3e4f50", '"v"', b"\xff"]]


async def test_pg_dml_rows_affected_and_returning(pg_handler: DatabaseHandler, pg_db: PostgresServer) -> None:
    inserted = await collect(pg_handler, start("pg", "INSERT INTO accounts VALUES (10, 'cy', 1), (11, 'di', 2)"))
    assert inserted[-1].summary.rows_affected == 2
    returned = await collect(pg_handler, start("pg", "DELETE FROM accounts WHERE id >= 10 RETURNING id"))
    _, rows = decode(returned)
    assert sorted(rows) == [[10], [11]]
    assert returned[-1].summary.rows_affected == 2
    with psycopg.connect(pg_db.dsn()) as conn:
        assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (2,)


async def test_pg_select_with_no_rows_still_has_columns(pg_handler: DatabaseHandler) -> None:
    responses = await collect(pg_handler, start("pg", "SELECT id, owner FROM accounts WHERE false"))
    assert [c.name for c in responses[0].header.columns] == ["id", "owner"]
    assert responses[-1].summary.row_count == 0


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO accounts VALUES (20, 'eve', 0)",
        "CREATE TABLE evil (x int)",
        "WITH gone AS (DELETE FROM accounts RETURNING id) SELECT * FROM gone",
        "SELECT 1; COMMIT; INSERT INTO accounts VALUES (21, 'mal', 0)",
        "UPDATE accounts SET balance = 0",
    ],
)
async def test_pg_read_only_profile_is_enforced_by_the_database(
    pg_handler: DatabaseHandler, pg_db: PostgresServer, sql: str
) -> None:
    with pytest.raises((FailedPrecondition, InvalidArgument)) as info:
        await collect(pg_handler, start("pg-ro", sql))
    if "COMMIT" not in sql:
        assert isinstance(info.value, FailedPrecondition)
        assert info.value.reason == "READ_ONLY_PROFILE"
        assert "25006" in info.value.message
    with psycopg.connect(pg_db.dsn()) as conn:
        assert conn.execute("SELECT count(*), count(balance) FROM accounts").fetchone() == (2, 1)
        assert conn.execute("SELECT to_regclass('evil')").fetchone() == (None,)


async def test_pg_read_only_profile_reads(pg_handler: DatabaseHandler) -> None:
    _, rows = decode(await collect(pg_handler, start("pg-ro", "SELECT owner FROM accounts ORDER BY id")))
    assert rows == [["ann"], ["bob"]]


async def test_pg_syntax_error_is_invalid_argument_with_sqlstate(pg_handler: DatabaseHandler) -> None:
    with pytest.raises(InvalidArgument, match=r"SQLSTATE 42601") as info:
        await collect(pg_handler, start("pg", "SELEC 1"))
    assert info.value.reason == "SQL_ERROR"


async def test_pg_undefined_table_is_invalid_argument(pg_handler: DatabaseHandler) -> None:
    with pytest.raises(InvalidArgument, match=r"no_such_table.*SQLSTATE 42P01"):
        await collect(pg_handler, start("pg", "SELECT * FROM no_such_table"))


async def test_pg_unique_violation_is_already_exists(pg_handler: DatabaseHandler) -> None:
    with pytest.raises(AlreadyExists, match="23505"):
        await collect(pg_handler, start("pg", "INSERT INTO accounts VALUES (1, 'dup', 0)"))


async def test_pg_not_null_violation_is_failed_precondition(pg_handler: DatabaseHandler) -> None:
    with pytest.raises(FailedPrecondition, match="23502"):
        await collect(pg_handler, start("pg", "INSERT INTO accounts VALUES (30, NULL, 0)"))


async def test_pg_statement_timeout_is_deadline_exceeded(pg_handler: DatabaseHandler) -> None:
    with pytest.raises(DeadlineExceeded, match="57014"):
        await collect(pg_handler, start("pg-timeout", "SELECT pg_sleep(5)"))


async def test_pg_large_result_arrives_in_bounded_batches(pg_handler: DatabaseHandler) -> None:
    limit = 64 * 1024
    context = RequestContext(request_id=1, body=None, max_chunk_bytes=limit)
    request = start("pg", "SELECT i, md5(i::text) AS h FROM generate_series(1, 200000) AS i")
    batches = 0
    rows = 0
    last = 0
    async for chunk in pg_handler.handle(request.database_query, context):
        assert chunk.ByteSize() <= limit
        part = chunk.query.WhichOneof("result")
        if part == "rows":
            batches += 1
            rows += chunk.query.rows.row_count
            ints = list(chunk.query.rows.columns[0].int64_values)
            assert ints[0] == last + 1  # in order, nothing lost between batches
            last = ints[-1]
        elif part == "summary":
            assert chunk.query.summary.row_count == 200000
    assert rows == 200000
    assert batches > 20


async def test_pg_first_batch_arrives_before_the_query_finishes(pg_handler: DatabaseHandler) -> None:
    # The second row sleeps for 3 s: the first batch must not wait for it.
    sql = "SELECT i, CASE WHEN i = 5000 THEN pg_sleep(3)::text END FROM generate_series(1, 5000) AS i"
    context = RequestContext(request_id=1, body=None, max_chunk_bytes=1024)
    began = time.monotonic()
    stream = pg_handler.handle(start("pg", sql).database_query, context)
    try:
        async for chunk in stream:
            if chunk.query.WhichOneof("result") == "rows":
                break
        assert time.monotonic() - began < 2
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def _sleeping_backends(server: PostgresServer) -> int:
    """How many backends are inside pg_sleep right now."""
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        row = conn.execute(
            # The active statement is the cursor's FETCH, so look for what it waits on; only in
            # this module's database, so that other tests' sleepers do not count.
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND wait_event = 'PgSleep'"
            " AND datname = %s",
            (server.database,),
        ).fetchone()
        return int(row[0]) if row else 0


async def test_pg_cancellation_stops_the_statement_on_the_server(
    pg_handler: DatabaseHandler, pg_db: PostgresServer
) -> None:
    task = asyncio.create_task(collect(pg_handler, start("pg-ro", "SELECT pg_sleep(30)")))
    for _ in range(50):
        await asyncio.sleep(0.1)
        if await asyncio.to_thread(_sleeping_backends, pg_db):
            break
    else:
        pytest.fail("pg_sleep(30) never showed up in pg_stat_activity")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(30):
        if await asyncio.to_thread(_sleeping_backends, pg_db) == 0:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the cancelled pg_sleep(30) is still running on the server")
    # pool_size=1: the next query reuses the cancelled connection, which must be clean.
    _, rows = decode(await asyncio.wait_for(collect(pg_handler, start("pg-ro", "SELECT 7")), 5))
    assert rows == [[7]]


async def test_pg_a_cancel_that_comes_before_the_statement_starts_stops_it_too(
    pg_handler: DatabaseHandler, pg_db: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cancel arrives while the step is still beginning the transaction (slow here on purpose, as on
    # a loaded machine): a server-side cancel then hits nothing, and the query sent next must not run.
    real_begin = RequestConnection.begin
    beginning = threading.Event()

    def slow_begin(self: RequestConnection) -> None:
        beginning.set()
        time.sleep(1.0)
        real_begin(self)

    monkeypatch.setattr(RequestConnection, "begin", slow_begin)
    task = asyncio.create_task(collect(pg_handler, start("pg-ro", "SELECT pg_sleep(30)")))
    assert await asyncio.to_thread(beginning.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Long enough for the statement to have started had it been sent.
    for _ in range(20):
        assert await asyncio.to_thread(_sleeping_backends, pg_db) == 0
        await asyncio.sleep(0.1)
    _, rows = decode(await asyncio.wait_for(collect(pg_handler, start("pg-ro", "SELECT 7")), 5))
    assert rows == [[7]]


async def test_pg_unreachable_is_unavailable_without_the_password(pg_db: PostgresServer) -> None:
    from tools.ports import free_port

    secret = "s3cret-Pa55word"
    url = f"postgresql+psycopg://onprem:{secret}@127.0.0.1:{free_port()}/x"
    handler = DatabaseHandler({"down": DatabaseProfile(name="down", url=url)})
    try:
        with pytest.raises(Unavailable) as info:
            await collect(handler, start("down", "SELECT 1"))
        assert "down" in info.value.message
        assert secret not in info.value.message
        assert secret not in str(info.value)
        assert info.value.__cause__ is None or secret not in str(info.value.__cause__)
    finally:
        await handler.aclose()


async def test_pg_wrong_password_from_env_never_appears_in_the_error(
    pg_db: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONPREM_TEST_DB_PW", "wrong-Pa55word-xyz")
    url = pg_db.url(with_password=False)
    handler = DatabaseHandler({"bad": DatabaseProfile(name="bad", url=url, password_env="ONPREM_TEST_DB_PW")})
    try:
        with pytest.raises(Unavailable) as info:
            await collect(handler, start("bad", "SELECT 1"))
        assert "wrong-Pa55word-xyz" not in info.value.message
        assert "password authentication failed" in info.value.message
    finally:
        await handler.aclose()


async def test_missing_password_env_is_failed_precondition_naming_it(pg_db: PostgresServer) -> None:
    url = pg_db.url(with_password=False)
    handler = DatabaseHandler({"x": DatabaseProfile(name="x", url=url, password_env="ONPREM_NO_SUCH_VAR_123")})
    try:
        with pytest.raises(FailedPrecondition, match="ONPREM_NO_SUCH_VAR_123"):
            await collect(handler, start("x", "SELECT 1"))
    finally:
        await handler.aclose()


async def test_password_file_is_used(pg_db: PostgresServer, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(pg_db.password + "\n")
    url = pg_db.url(with_password=False)
    handler = DatabaseHandler({"f": DatabaseProfile(name="f", url=url, password_file=str(secret))})
    try:
        _, rows = decode(await collect(handler, start("f", "SELECT 'ok' AS v")))
        assert rows == [["ok"]]
    finally:
        await handler.aclose()


def test_profiles_are_advertised_with_dialect_and_read_only(tmp_path: Path) -> None:
    handler = DatabaseHandler(
        {
            "a": DatabaseProfile(name="a", url="postgresql+psycopg://u@h/db", read_only=True),
            "b": DatabaseProfile(name="b", url=f"sqlite:///{tmp_path}/b.db"),
        }
    )
    assert handler.profiles() == [
        profiles_pb2.Profile(name="a", kind=profiles_pb2.PROFILE_KIND_DATABASE, read_only=True, dialect="postgresql"),
        profiles_pb2.Profile(name="b", kind=profiles_pb2.PROFILE_KIND_DATABASE, read_only=False, dialect="sqlite"),
    ]


def test_decimal_values_never_pass_through_float() -> None:
    from onprem.agent.handlers.database.values import fill as _fill

    column = values_pb2.ColumnValues()
    _fill(column, VT.VALUE_TYPE_DECIMAL, [Decimal("0.10000000000000000001"), Decimal("1E+3"), None])
    assert list(column.string_values) == ["0.10000000000000000001", "1000", ""]
    assert list(column.nulls) == [False, False, True]
