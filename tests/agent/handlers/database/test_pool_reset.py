"""Pooled connections go back reset: nothing one request leaves on its session reaches the next.

Every PostgreSQL test runs on a pool of one connection and asserts that both requests ran on the same
backend (`pg_backend_pid()`), so that "gone" means reset, not "landed on another connection". Read-only
and read-write profiles alike; SQLite and PostgreSQL through psqlODBC too.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import event

from onprem.agent.handlers.database import DatabaseHandler
from onprem.agent.profiles import DatabaseProfile, parse_profiles
from onprem.tunnel.errors import Code, RequestError
from tests.agent.handlers.database.test_handler import collect, decode, start
from tests.agent.handlers.database.test_odbc import pg_connection_string
from tests.agent.handlers.database.test_operations import batch, run, transaction
from tests.support.owned_database import OwnedDatabase, create_owned_database
from tests.support.postgres import PostgresServer

PROFILES = ["ro", "rw"]


@pytest.fixture(scope="module")
def owned(postgres: PostgresServer) -> OwnedDatabase:
    return create_owned_database(postgres, "onprem_pool_reset")


@pytest.fixture
async def pg(owned: OwnedDatabase) -> AsyncIterator[DatabaseHandler]:
    url = owned.owner.url()
    handler = DatabaseHandler({
        "ro": DatabaseProfile(name="ro", url=url, read_only=True, pool_size=1),
        "rw": DatabaseProfile(name="rw", url=url, pool_size=1),
    })
    yield handler
    await handler.aclose()


async def scalar(handler: DatabaseHandler, profile: str, sql: str) -> Any:
    _, rows = decode(await collect(handler, start(profile, sql)))
    return rows[0][0]


async def backend(handler: DatabaseHandler, profile: str) -> int:
    return int(await scalar(handler, profile, "SELECT pg_backend_pid()"))


async def failure(handler: DatabaseHandler, request: Any) -> tuple[Code, str]:
    with pytest.raises(RequestError) as caught:
        await run(handler, request)
    return caught.value.code, caught.value.message


@pytest.mark.parametrize("profile", PROFILES)
async def test_an_advisory_lock_is_released_when_the_request_ends(
    pg: DatabaseHandler, owned: OwnedDatabase, profile: str
) -> None:
    pid = await backend(pg, profile)
    await collect(pg, start(profile, "SELECT pg_advisory_lock(4242)"))
    assert await backend(pg, profile) == pid
    assert await scalar(pg, profile, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                     "AND pid = pg_backend_pid()") == 0
    with psycopg.connect(owned.admin.dsn(), autocommit=True) as other:
        assert other.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (True,)


@pytest.mark.parametrize("profile", PROFILES)
async def test_a_prepared_statement_is_gone_when_the_request_ends(pg: DatabaseHandler, profile: str) -> None:
    pid = await backend(pg, profile)
    await run(pg, transaction(profile, ("PREPARE leak AS SELECT 1", {})))
    assert await backend(pg, profile) == pid
    code, message = await failure(pg, start(profile, "EXECUTE leak"))
    assert code == Code.INVALID_ARGUMENT and 'prepared statement "leak" does not exist' in message


async def test_a_temporary_table_is_gone_when_the_request_ends(pg: DatabaseHandler) -> None:
    pid = await backend(pg, "rw")
    await run(pg, transaction("rw", ("CREATE TEMP TABLE leak AS SELECT 1 AS a", {})))
    assert await backend(pg, "rw") == pid
    code, message = await failure(pg, start("rw", "SELECT * FROM leak"))
    assert code == Code.INVALID_ARGUMENT and 'relation "leak" does not exist' in message


async def test_a_read_only_connection_keeps_only_its_commit_guard_as_temporary_table(pg: DatabaseHandler) -> None:
    pid = await backend(pg, "ro")
    names = "SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class WHERE relnamespace = pg_my_temp_schema()"
    assert await scalar(pg, "ro", names) == "onprem_commit_guard"
    assert await backend(pg, "ro") == pid


@pytest.mark.parametrize("profile", PROFILES)
async def test_a_listen_is_gone_when_the_request_ends(pg: DatabaseHandler, profile: str) -> None:
    pid = await backend(pg, profile)
    with pytest.raises(RequestError) if profile == "ro" else contextlib.nullcontext():
        # A read-only profile cannot commit a LISTEN at all; a read-write one commits it.
        await run(pg, transaction(profile, ("LISTEN leak", {}), ("COMMIT", {})))
    await collect(pg, start(profile, "LISTEN leak"))
    assert await backend(pg, profile) == pid
    assert await scalar(pg, profile, "SELECT count(*) FROM pg_listening_channels()") == 0


@pytest.mark.parametrize("profile", PROFILES)
async def test_a_cursor_with_hold_is_gone_when_the_request_ends(pg: DatabaseHandler, profile: str) -> None:
    pid = await backend(pg, profile)
    await run(pg, transaction(profile, ("DECLARE leak CURSOR WITH HOLD FOR SELECT 1", {})))
    assert await backend(pg, profile) == pid
    code, message = await failure(pg, start(profile, "FETCH ALL FROM leak"))
    assert code == Code.INVALID_ARGUMENT and 'cursor "leak" does not exist' in message


@pytest.mark.parametrize("profile", PROFILES)
async def test_session_settings_are_reset_when_the_request_ends(pg: DatabaseHandler, profile: str) -> None:
    pid = await backend(pg, profile)
    default = await scalar(pg, profile, "SHOW work_mem")
    await run(pg, transaction(profile, ("SET work_mem = '64kB'", {}), ("SET search_path = pg_catalog", {}),
                              ("SELECT set_config('datestyle', 'German', false)", {})))
    assert await backend(pg, profile) == pid
    assert await scalar(pg, profile, "SHOW work_mem") == default
    assert await scalar(pg, profile, "SHOW search_path") == '"$user", public'
    assert await scalar(pg, profile, "SHOW datestyle") == "ISO, MDY"


async def test_a_role_set_by_a_request_is_reset_when_it_ends(pg: DatabaseHandler, owned: OwnedDatabase) -> None:
    with psycopg.connect(owned.admin.dsn(), autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = 'onprem_other'").fetchone():
            admin.execute("CREATE ROLE onprem_other")
        admin.execute("GRANT onprem_other TO onprem_owner")
    pid = await backend(pg, "rw")
    await run(pg, transaction("rw", ("SET ROLE onprem_other", {})))
    assert await backend(pg, "rw") == pid
    assert await scalar(pg, "rw", "SELECT current_user") == "onprem_owner"


async def test_a_read_write_session_default_of_read_only_is_reset(pg: DatabaseHandler) -> None:
    pid = await backend(pg, "rw")
    await run(pg, transaction("rw", ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", {})))
    assert await backend(pg, "rw") == pid
    [chunk] = await run(pg, transaction("rw", ("CREATE TEMP TABLE fine (a int)", {})))
    assert len(chunk.transaction.results) == 1


async def test_batches_keep_working_after_resets(pg: DatabaseHandler) -> None:
    # psycopg's prepared-statement cache went stale after a repeated DISCARD ALL; the agent does not prepare.
    sets: list[dict[str, Any]] = [{} for _ in range(10)]
    for _ in range(3):
        [chunk] = await run(pg, batch("rw", "SELECT 1", *sets))
        assert chunk.batch.sets_applied == 10


# SQLite: a connection that kept state is closed instead of pooled.

@pytest.fixture
async def lite(tmp_path: Path) -> AsyncIterator[DatabaseHandler]:
    path = tmp_path / "reset.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        conn.execute("CREATE TABLE child (id INTEGER PRIMARY KEY, parent INTEGER REFERENCES parent (id))")
    handler = DatabaseHandler({"lite": DatabaseProfile(name="lite", url=f"sqlite:///{path}", pool_size=1)})
    yield handler
    await handler.aclose()


async def test_sqlite_a_temporary_table_is_gone_when_the_request_ends(lite: DatabaseHandler) -> None:
    await run(lite, transaction("lite", ("CREATE TEMP TABLE leak (a)", {}), ("INSERT INTO leak VALUES (1)", {})))
    code, message = await failure(lite, start("lite", "SELECT * FROM leak"))
    assert code == Code.INVALID_ARGUMENT and "no such table: leak" in message


async def test_sqlite_a_temporary_trigger_is_gone_when_the_request_ends(lite: DatabaseHandler) -> None:
    await run(lite, transaction("lite", ("CREATE TEMP TRIGGER leak AFTER INSERT ON parent BEGIN "
                                         "DELETE FROM parent; END", {})))
    await run(lite, transaction("lite", ("INSERT INTO parent VALUES (1)", {})))
    assert await scalar(lite, "lite", "SELECT count(*) FROM parent") == 1


async def test_sqlite_a_pragma_setting_is_gone_when_the_request_ends(lite: DatabaseHandler) -> None:
    await run(lite, transaction("lite", ("PRAGMA foreign_keys = ON", {})))
    assert await scalar(lite, "lite", "PRAGMA foreign_keys") == 0
    await run(lite, transaction("lite", ("PRAGMA query_only = ON", {})))
    [chunk] = await run(lite, transaction("lite", ("INSERT INTO parent VALUES (2)", {})))
    assert chunk.transaction.results[0].rows_affected == 1


async def test_sqlite_an_attached_database_is_gone_when_the_request_ends(lite: DatabaseHandler) -> None:
    await run(lite, transaction("lite", ("ATTACH ':memory:' AS leak", {})))
    assert await scalar(lite, "lite", "SELECT count(*) FROM pragma_database_list") == 1


async def test_sqlite_only_a_connection_that_kept_state_is_closed(lite: DatabaseHandler) -> None:
    await collect(lite, start("lite", "SELECT 1"))
    opened: list[object] = []
    event.listen(lite._runtime("lite").engine(), "connect", lambda *_: opened.append(1))
    # Reads, writes and reading pragmas leave nothing: the one connection stays pooled.
    await run(lite, transaction("lite", ("INSERT INTO parent VALUES (3)", {}), ("PRAGMA foreign_keys", {}),
                                ("PRAGMA table_info(parent)", {})))
    await collect(lite, start("lite", "SELECT count(*) FROM parent"))
    assert opened == []
    await run(lite, transaction("lite", ("PRAGMA recursive_triggers = ON", {})))
    await collect(lite, start("lite", "SELECT 1"))
    assert opened == [1]


# PostgreSQL through psqlODBC: DISCARD ALL too.

@pytest.fixture
async def odbc(owned: OwnedDatabase, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[DatabaseHandler]:
    monkeypatch.setenv("ODBC_RESET_PW", owned.owner.password)
    profiles = parse_profiles({"databases": {"pg-odbc": {
        "dialect": "odbc", "connection_string": pg_connection_string(owned.owner), "username": owned.owner.user,
        "password_env": "ODBC_RESET_PW", "pool_size": 1, "statement_timeout_seconds": 5}}}).databases
    handler = DatabaseHandler(profiles)
    yield handler
    await handler.aclose()


async def test_psqlodbc_an_advisory_lock_and_a_prepared_statement_are_gone(odbc: DatabaseHandler) -> None:
    pid = await backend(odbc, "pg-odbc")
    await run(odbc, transaction("pg-odbc", ("SELECT pg_advisory_lock(4243)", {}), ("PREPARE leak AS SELECT 1", {})))
    assert await backend(odbc, "pg-odbc") == pid
    assert await scalar(odbc, "pg-odbc", "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                         "AND pid = pg_backend_pid()") == 0
    assert await scalar(odbc, "pg-odbc", "SELECT count(*) FROM pg_prepared_statements") == 0


async def test_psqlodbc_keeps_its_statement_timeout_after_a_reset(odbc: DatabaseHandler) -> None:
    await collect(odbc, start("pg-odbc", "SELECT 1"))
    assert await scalar(odbc, "pg-odbc", "SHOW statement_timeout") == "5s"
