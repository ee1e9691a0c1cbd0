"""ODBC profiles for real through unixODBC: psqlODBC against the test PostgreSQL, and the SQLite ODBC driver.

No driver is skipped: a missing driver makes these tests fail (tools/setup_system.sh installs them).
SQL Server has no server here: its profiles are tested up to the connection string they build.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pyodbc
import pytest

from onprem.agent.handlers.database import DatabaseHandler, odbc
from onprem.agent.profiles import ConfigError, parse_profiles
from onprem.tunnel.errors import AlreadyExists, InvalidArgument
from onprem.v1 import values_pb2
from tests.agent.handlers.database.test_handler import collect, decode, start
from tests.agent.handlers.database.test_operations import batch, run, transaction
from tests.support.postgres import PostgresServer

V = values_pb2.Value
VT = values_pb2.ValueType
PG_DRIVER = "PostgreSQL Unicode"
SQLITE_DRIVER = "SQLite3"


def pg_connection_string(pg: PostgresServer) -> str:
    # UseDeclareFetch makes psqlODBC read through a cursor instead of loading the whole result.
    return f"Driver={{{PG_DRIVER}}};Server={pg.host};Port={pg.port};Database={pg.database};UseDeclareFetch=1"


@pytest.fixture
def lite_db(tmp_path: Path) -> Path:
    path = tmp_path / "odbc.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT UNIQUE, price REAL)")
        conn.execute("INSERT INTO items VALUES (1, 'apple', 1.5), (2, 'pear', NULL)")
    return path


@pytest.fixture
async def handler(postgres: PostgresServer, lite_db: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[DatabaseHandler]:
    monkeypatch.setenv("ODBC_TEST_PW", postgres.password)
    profiles = parse_profiles({"databases": {
        "pg": {"dialect": "odbc", "connection_string": pg_connection_string(postgres), "username": postgres.user,
               "password_env": "ODBC_TEST_PW", "statement_timeout_seconds": 1, "pool_size": 2},
        "lite": {"dialect": "odbc", "connection_string": f"Driver={SQLITE_DRIVER};Database={lite_db}"},
    }}).databases
    h = DatabaseHandler(profiles)
    yield h
    await h.aclose()


def test_the_odbc_drivers_are_installed() -> None:
    assert {PG_DRIVER, SQLITE_DRIVER} <= set(pyodbc.drivers())


async def test_psqlodbc_query_binds_named_parameters_and_types_columns(handler: DatabaseHandler) -> None:
    sql = "SELECT CAST(:i AS int8) AS i, CAST(:d AS numeric(12,2)) AS d, :s AS s, CAST(:dt AS date) AS dt"
    columns, rows = decode(await collect(handler, start(
        "pg", sql, i=V(int64_value=-5), d=V(decimal_value="1234.50"), s=V(string_value="zoë"),
        dt=V(date_value="2024-02-29"))))
    assert [(c.name, c.type, c.database_type) for c in columns] == [
        ("i", VT.VALUE_TYPE_INT64, "INTEGER"), ("d", VT.VALUE_TYPE_DECIMAL, "DECIMAL(12,2)"),
        ("s", VT.VALUE_TYPE_STRING, "VARCHAR"), ("dt", VT.VALUE_TYPE_DATE, "DATE")]
    assert rows == [[-5, "1234.50", "zoë", "2024-02-29"]]


async def test_psqlodbc_streams_a_large_result_in_bounded_batches(handler: DatabaseHandler) -> None:
    responses = await collect(handler, start("pg", "SELECT i FROM generate_series(1, 30000) AS i"),
                              max_chunk_bytes=16 * 1024)
    batches = [r for r in responses if r.WhichOneof("result") == "rows"]
    assert len(batches) > 5 and responses[-1].summary.row_count == 30000


async def test_psqlodbc_statement_timeout_is_deadline_exceeded(handler: DatabaseHandler) -> None:
    with pytest.raises(Exception) as info:
        await collect(handler, start("pg", "SELECT pg_sleep(5)"))
    assert (type(info.value).__name__, info.value.reason) in {  # type: ignore[attr-defined]
        ("DeadlineExceeded", "STATEMENT_TIMEOUT")}


async def test_psqlodbc_transaction_rolls_back_and_batch_commits(handler: DatabaseHandler, postgres: PostgresServer) -> None:
    await collect(handler, start("pg", "CREATE TABLE IF NOT EXISTS odbc_t (id int PRIMARY KEY)"))
    with pytest.raises(AlreadyExists):
        await run(handler, transaction("pg", ("INSERT INTO odbc_t VALUES (1)", {}), ("INSERT INTO odbc_t VALUES (1)", {})))
    [chunk] = await run(handler, batch("pg", "INSERT INTO odbc_t VALUES (:i)", *({"i": V(int64_value=i)} for i in (1, 2))))
    assert chunk.batch.sets_applied == 2
    _, rows = decode(await collect(handler, start("pg", "SELECT id FROM odbc_t ORDER BY id")))
    assert rows == [[1], [2]]


async def test_psqlodbc_cancellation_stops_the_statement_and_frees_the_connection(
        postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # No statement timeout: only the cancel (SQLCancel on the statement's own cursor) can end the sleep.
    monkeypatch.setenv("ODBC_TEST_PW", postgres.password)
    profiles = parse_profiles({"databases": {"one": {
        "dialect": "odbc", "connection_string": pg_connection_string(postgres), "username": postgres.user,
        "password_env": "ODBC_TEST_PW", "pool_size": 1}}}).databases
    h = DatabaseHandler(profiles)
    try:
        task = asyncio.create_task(collect(h, start("one", "SELECT pg_sleep(60)")))
        await asyncio.sleep(1)
        began = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - began < 10
        # pool_size=1: this only works if the cancelled connection went back to the pool.
        _, rows = decode(await asyncio.wait_for(collect(h, start("one", "SELECT 42 AS n")), 10))
        assert rows == [[42]]
    finally:
        await h.aclose()


async def test_sqlite_odbc_query_and_errors(handler: DatabaseHandler) -> None:
    _, rows = decode(await collect(handler, start("lite", "SELECT id, name, price FROM items WHERE id <= :n ORDER BY id",
                                                  n=V(int64_value=2))))
    assert rows == [[1, "apple", 1.5], [2, "pear", None]]
    with pytest.raises(InvalidArgument):
        await collect(handler, start("lite", "SELEC 1"))


async def test_password_never_appears_in_an_odbc_error(postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ODBC_BAD_PW", "wrong-odbc-Pa55")
    profiles = parse_profiles({"databases": {"bad": {
        "dialect": "odbc", "connection_string": pg_connection_string(postgres), "username": postgres.user,
        "password_env": "ODBC_BAD_PW"}}}).databases
    h = DatabaseHandler(profiles)
    try:
        with pytest.raises(Exception) as info:
            await collect(h, start("bad", "SELECT 1"))
        assert type(info.value).__name__ == "Unavailable"
        assert "wrong-odbc-Pa55" not in str(info.value) and "password authentication failed" in str(info.value)
    finally:
        await h.aclose()


# --- read-only: what the drivers actually do ------------------------------------------------------


@pytest.mark.parametrize("driver", [PG_DRIVER, SQLITE_DRIVER])
def test_the_drivers_accept_but_ignore_the_read_only_access_mode(driver: str, postgres: PostgresServer,
                                                                 lite_db: Path) -> None:
    """Why read-only ODBC profiles are refused: both drivers take SQL_MODE_READ_ONLY and then write anyway."""
    text = (f"{pg_connection_string(postgres)};UID={postgres.user};PWD={postgres.password}" if driver == PG_DRIVER
            else f"Driver={SQLITE_DRIVER};Database={lite_db}")
    conn = pyodbc.connect(text, autocommit=False, attrs_before={pyodbc.SQL_ATTR_ACCESS_MODE: 1})
    try:
        conn.set_attr(pyodbc.SQL_ATTR_ACCESS_MODE, 1)  # SQL_MODE_READ_ONLY
        conn.execute("CREATE TABLE ro_probe (x int)")
        conn.execute("INSERT INTO ro_probe VALUES (1)")
        assert conn.execute("SELECT count(*) FROM ro_probe").fetchone()[0] == 1  # type: ignore[index]
    finally:
        conn.rollback()
        conn.close()
    assert driver.lower() not in odbc.ODBC_READ_ONLY_DRIVERS


@pytest.mark.parametrize("body", [
    {"dialect": "odbc", "connection_string": f"Driver={{{PG_DRIVER}}};Server=h", "read_only": True},
    {"dialect": "odbc", "dsn": "warehouse", "read_only": True},
    {"dialect": "mssql", "host": "sql.internal", "database": "erp", "username": "r", "read_only": True},
    {"url": "mssql+pyodbc://r@sql.internal/erp?driver=ODBC+Driver+18+for+SQL+Server", "read_only": True},
])
def test_read_only_profiles_whose_driver_cannot_enforce_it_are_refused_at_load(body: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r"read_only: .*(cannot be enforced|not supported for SQL Server)"):
        parse_profiles({"databases": {"d": body}})


def test_a_driver_known_to_enforce_read_only_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(odbc, "ODBC_READ_ONLY_DRIVERS", frozenset({"strict driver"}))
    profile = parse_profiles({"databases": {"d": {"dialect": "odbc", "connection_string": "Driver={Strict Driver}",
                                                  "read_only": True}}}).databases["d"]
    assert profile.read_only and profile.dialect == "odbc"


# --- SQL Server: everything up to the server --------------------------------------------------------


def test_mssql_profile_builds_the_odbc_connection_string_without_the_password() -> None:
    profile = parse_profiles({"databases": {"erp": {
        "dialect": "mssql", "host": "sql.internal", "port": 1433, "database": "erp", "username": "reader",
        "password_env": "ERP_PW", "options": {"driver": "ODBC Driver 18 for SQL Server", "Encrypt": True,
                                              "TrustServerCertificate": "no", "ApplicationIntent": "ReadOnly"}}}}).databases["erp"]
    assert profile.dialect == "mssql"
    assert profile.odbc_connect == ("DRIVER=ODBC Driver 18 for SQL Server;SERVER=sql.internal,1433;DATABASE=erp;"
                                    "UID=reader;Encrypt=yes;TrustServerCertificate=no;ApplicationIntent=ReadOnly")
    assert profile.display_url() == f"mssql ODBC '{profile.odbc_connect}'"


def test_mssql_connection_fails_cleanly_when_its_driver_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_PW", "mssql-Secret-1")
    profiles = parse_profiles({"databases": {"erp": {
        "dialect": "mssql", "host": "127.0.0.1", "port": 1, "database": "erp", "username": "r",
        "password_env": "ERP_PW", "options": {"driver": "No Such SQL Server Driver"}}}}).databases

    async def go() -> Exception:
        h = DatabaseHandler(profiles)
        try:
            await collect(h, start("erp", "SELECT 1"))
        except Exception as exc:
            return exc
        finally:
            await h.aclose()
        raise AssertionError("connected to nothing")

    import asyncio

    exc = asyncio.run(go())
    assert type(exc).__name__ == "Unavailable" and "mssql-Secret-1" not in str(exc)
    assert "No Such SQL Server Driver" in str(exc)


@pytest.mark.parametrize(("text", "attributes"), [
    ("Driver={PostgreSQL Unicode};Server=h;Port=5432", {"Driver": "PostgreSQL Unicode", "Server": "h", "Port": "5432"}),
    ("DSN=x;Opt={a;b}}c}", {"DSN": "x", "Opt": "a;b}c"}),
])
def test_connection_strings_parse_and_quote_round_trip(text: str, attributes: dict[str, str]) -> None:
    assert odbc.parse_connection_string(text) == attributes
    assert odbc.parse_connection_string(odbc.connection_string(attributes)) == attributes


@pytest.mark.parametrize(("body", "message"), [
    ({"dialect": "odbc", "connection_string": "Driver=x;PWD=hunter2"}, "holds PWD=; use password_env"),
    ({"dialect": "odbc"}, "connection_string or dsn"),
    ({"dialect": "postgresql", "host": "h", "options": {"password": "x"}}, "may not be inline"),
    ({"dialect": "postgresql", "database": "d"}, r"\.host: required"),
    ({"url": "sqlite://", "dialect": "sqlite"}, "url or dialect, not both"),
    ({"dialect": "sqlite", "database": "/tmp/x.db", "read_only": True, "dsn": "x"}, "only for dialect 'odbc'"),
])
def test_database_profile_mistakes_are_named(body: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_profiles({"databases": {"d": body}})
    assert "hunter2" not in str(info.value)


def test_dialect_with_parts_builds_the_url() -> None:
    profile = parse_profiles({"databases": {"d": {
        "dialect": "postgresql", "host": "db.internal", "port": 6432, "database": "erp", "username": "reader",
        "options": {"sslmode": "require", "application_name": "onprem"}}}}).databases["d"]
    assert profile.url == "postgresql+psycopg://reader@db.internal:6432/erp"
    assert dict(profile.options) == {"sslmode": "require", "application_name": "onprem"}
