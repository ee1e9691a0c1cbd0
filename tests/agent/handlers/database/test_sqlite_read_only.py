"""A read-only SQLite profile against a hostile caller: no statement sequence changes the database file.

`query_only` refuses writes to every database of the connection (temporary ones too), and the
authorizer, which SQLite consults for every action of every statement it prepares, refuses
transaction control, savepoints, ATTACH (VACUUM INTO attaches its target) and PRAGMAs that set or
act. Each case must end with exactly the status given; afterwards the database file is byte-for-byte
what it was, no file appeared next to it or in the folder the statements point at, and the pooled
connection (a pool of one) has no temporary objects, attached databases or changed settings.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from onprem.agent.handlers.database import DatabaseHandler
from onprem.agent.handlers.database.guard import SqliteGuard
from onprem.agent.profiles import DatabaseProfile
from onprem.tunnel.errors import Code, RequestError
from onprem.v1 import database_pb2
from tests.agent.handlers.database.test_handler import collect, decode, start
from tests.agent.handlers.database.test_operations import batch, request, run, transaction
from tests.agent.handlers.database.test_read_only import CHECK, B, P, Q, Step, T

OK = Code.OK
FP = Code.FAILED_PRECONDITION
REFUSED = "READ_ONLY_PROFILE"
STATE = "INVALID_TRANSACTION_STATE"  # SQLite refuses it inside the request's transaction, before asking
INSERT = "INSERT INTO items VALUES (99, 'evil')"

CORPUS = [
    pytest.param(steps, id=name) for name, steps in [
        ("commit-then-insert", (T("COMMIT", INSERT, code=FP, reason=REFUSED),)),
        ("nested-begin", (T("BEGIN", INSERT, code=FP, reason=STATE),)),
        ("begin-immediate", (T("BEGIN IMMEDIATE", code=FP, reason=REFUSED),)),
        ("rollback-then-insert", (T("ROLLBACK", INSERT, code=FP, reason=REFUSED),)),
        ("end", (Q("END", code=FP, reason=REFUSED),)),
        ("savepoint-insert-release", (T("SAVEPOINT a", INSERT, "RELEASE a", code=FP, reason=REFUSED),)),
        ("release-unknown-savepoint", (Q("RELEASE a", code=FP, reason=REFUSED),)),
        ("insert", (Q(INSERT, code=FP, reason=REFUSED),)),
        ("insert-returning", (Q(f"{INSERT} RETURNING id", code=FP, reason=REFUSED),)),
        ("update", (Q("UPDATE items SET name = 'evil'", code=FP, reason=REFUSED),)),
        ("delete-in-a-cte", (Q("WITH x AS (SELECT 1) DELETE FROM items", code=FP, reason=REFUSED),)),
        ("replace", (Q("REPLACE INTO items VALUES (1, 'evil')", code=FP, reason=REFUSED),)),
        ("create-table", (Q("CREATE TABLE evil (a)", code=FP, reason=REFUSED),)),
        ("create-temp-table", (Q("CREATE TEMP TABLE evil (a)", code=FP, reason=REFUSED),)),
        ("create-table-in-temp", (Q("CREATE TABLE temp.evil (a)", code=FP, reason=REFUSED),)),
        ("create-temp-view", (Q("CREATE TEMP VIEW evil AS SELECT 1", code=FP, reason=REFUSED),)),
        ("create-temp-trigger", (Q("CREATE TEMP TRIGGER evil AFTER INSERT ON items BEGIN SELECT 1; END",
                                   code=FP, reason=REFUSED),)),
        ("drop-table", (Q("DROP TABLE items", code=FP, reason=REFUSED),)),
        ("alter-table", (Q("ALTER TABLE items ADD COLUMN evil", code=FP, reason=REFUSED),)),
        ("pragma-query-only-off", (Q("PRAGMA query_only = 0", code=FP, reason=REFUSED), Q(INSERT, code=FP,
                                                                                           reason=REFUSED))),
        ("pragma-writable-schema", (Q("PRAGMA writable_schema = 1", code=FP, reason=REFUSED),)),
        ("pragma-journal-mode", (Q("PRAGMA journal_mode = WAL", code=FP, reason=REFUSED),)),
        ("pragma-user-version", (Q("PRAGMA user_version = 7", code=FP, reason=REFUSED),)),
        ("pragma-foreign-keys", (Q("PRAGMA foreign_keys = ON", code=FP, reason=REFUSED),)),
        ("pragma-temp-store", (Q("PRAGMA temp.cache_size = 5", code=FP, reason=REFUSED),)),
        ("pragma-wal-checkpoint", (Q("PRAGMA wal_checkpoint(TRUNCATE)", code=FP, reason=REFUSED),)),
        ("pragma-optimize", (Q("PRAGMA optimize", code=FP, reason=REFUSED),)),
        ("pragma-incremental-vacuum", (Q("PRAGMA incremental_vacuum", code=FP, reason=REFUSED),)),
        ("attach-a-new-file", (Q("ATTACH '{folder}/evil.db' AS evil", code=FP, reason=REFUSED),)),
        ("vacuum-into-a-new-file", (Q("VACUUM INTO '{folder}/copy.db'", code=FP, reason=STATE),)),
        ("vacuum", (Q("VACUUM", code=FP, reason=STATE),)),
        ("analyze", (Q("ANALYZE", code=FP, reason=REFUSED),)),
        ("reindex", (Q("REINDEX", code=FP, reason=REFUSED),)),
        ("load-extension", (Q("SELECT load_extension('{folder}/evil')", code=FP, reason=REFUSED),)),
        ("batch-of-inserts", (B(INSERT, code=FP, reason=REFUSED),)),
        ("batch-of-commits", (B("COMMIT", code=FP, reason=REFUSED),)),
        ("batch-of-savepoints", (B("SAVEPOINT a", code=FP, reason=REFUSED),)),
        ("poll-of-a-delete", (P("DELETE FROM items RETURNING id AS w", code=Code.INVALID_ARGUMENT,
                                reason="SQL_ERROR"),)),
        ("refused-pragma-then-check", (Q("PRAGMA foreign_keys = ON", code=FP, reason=REFUSED), CHECK)),
        ("reads-and-pragma-reads", (Q("PRAGMA table_info(items)"), Q("PRAGMA foreign_keys"),
                                    T("SELECT count(*) FROM items", "SELECT * FROM pragma_table_info('items')"))),
    ]
]

PROBE = ("SELECT (SELECT count(*) FROM sqlite_temp_master) AS temp_objects,"
         " (SELECT count(*) FROM pragma_database_list) AS databases,"
         " (SELECT foreign_keys FROM pragma_foreign_keys) AS foreign_keys,"
         " (SELECT cache_size FROM pragma_cache_size) AS cache_size")


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "db" / "ro.db"
    path.parent.mkdir()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("CREATE INDEX items_name ON items (name)")
        conn.execute("INSERT INTO items VALUES (1, 'apple'), (2, 'pear')")
    conn.close()
    return path


@pytest.fixture
async def handler(database: Path) -> AsyncIterator[DatabaseHandler]:
    h = DatabaseHandler({"ro": DatabaseProfile(name="ro", url=f"sqlite:///{database}", read_only=True, pool_size=1)})
    yield h
    await h.aclose()


def _request(step: Step, folder: Path) -> Any:
    sql = tuple(s.replace("{folder}", str(folder)) for s in step.sql)
    if step.rpc == "query":
        return start("ro", sql[0])
    if step.rpc == "transaction":
        return transaction("ro", *((s, {}) for s in sql))
    if step.rpc == "batch":
        return batch("ro", sql[0], *({} for _ in range(step.sets)))
    return request(poll_changes=database_pb2.PollChangesRequest(profile="ro", sql=sql[0], watermark_column="w"))


def fingerprint(database: Path, folder: Path) -> tuple[str, list[str], list[str]]:
    return (hashlib.sha256(database.read_bytes()).hexdigest(), sorted(p.name for p in database.parent.iterdir()),
            sorted(p.name for p in folder.iterdir()))


@pytest.mark.parametrize("steps", CORPUS)
async def test_no_statement_sequence_changes_a_read_only_sqlite_database(
    steps: tuple[Step, ...], handler: DatabaseHandler, database: Path, tmp_path: Path,
) -> None:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    before, state = fingerprint(database, folder), decode(await collect(handler, start("ro", PROBE)))
    outcomes: list[tuple[Code, str | None]] = []
    for step in steps:
        try:
            if step.rpc == "check":
                assert all(c.ok for c in await handler.check("ro"))
            else:
                await run(handler, _request(step, folder))
            outcomes.append((OK, None))
        except RequestError as exc:
            outcomes.append((exc.code, exc.reason))
    assert fingerprint(database, folder) == before, "the database or its folder changed"
    assert decode(await collect(handler, start("ro", PROBE))) == state, "session state outlived the request"
    assert outcomes == [(s.code, s.reason) for s in steps]


async def test_a_refused_statement_is_named_with_what_it_tried(handler: DatabaseHandler) -> None:
    with pytest.raises(RequestError) as caught:
        await run(handler, transaction("ro", ("SELECT 1", {}), ("COMMIT", {})))
    assert caught.value.message == ("statement 1: a read-only SQLite profile may not run COMMIT (it runs each "
                                    "request in one transaction of its own)")
    with pytest.raises(RequestError) as caught:
        await run(handler, start("ro", "PRAGMA foreign_keys = ON"))
    assert caught.value.message == "the statement: a read-only SQLite profile may not set or run PRAGMA foreign_keys"


async def test_the_statements_of_a_read_only_request_share_one_snapshot(handler: DatabaseHandler, database: Path) -> None:
    # The request's BEGIN holds a read transaction: another writer waits for it instead of changing the rows
    # between two statements of the same request (here simply: the read transaction is open throughout).
    [chunk] = await run(handler, transaction("ro", ("SELECT count(*) FROM items", {}), ("SELECT 1", {})))
    assert len(chunk.transaction.results) == 2


def test_the_authorizer_alone_refuses_vacuum_into_and_attach_outside_a_transaction(tmp_path: Path) -> None:
    # The request's BEGIN already stops VACUUM; the authorizer stops its ATTACH of the target regardless.
    conn = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    guard = SqliteGuard(read_only=True)
    conn.set_authorizer(guard.authorize)
    for sql in (f"VACUUM INTO '{tmp_path}/copy.db'", f"ATTACH '{tmp_path}/b.db' AS b"):
        with pytest.raises(sqlite3.DatabaseError, match=r"not authorized|authorization denied"):
            conn.execute(sql)
    conn.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.db"]


def test_the_corpus_has_forty_sequences() -> None:
    assert len(CORPUS) >= 40
