"""A read-only PostgreSQL profile against a hostile caller: no statement sequence changes the database.

The profile logs in as a role that owns the database and everything in it (but is not a superuser):
nothing but the agent's enforcement stands between a caller and a write. Each case is a sequence of
requests through Query, ExecuteBatch, ExecuteTransaction, PollChanges and CheckProfile on a pool of
one connection, so that every request lands on the connection the previous one used. Each request
must end with exactly the status given, and after the case the database must be byte-for-byte what
it was (pg_dump with large objects and sequence values, relfilenodes, prepared transactions, server
files), no NOTIFY may have been delivered, and the pooled connection's session state must be what it
was, on the same backend.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from onprem.agent.handlers.database import DatabaseHandler
from onprem.agent.handlers.database.guard import GuardMissing, PgReadOnlyTransaction
from onprem.agent.profiles import DatabaseProfile
from onprem.tunnel.errors import Code, RequestError
from onprem.v1 import database_pb2
from tests.agent.handlers.database.test_handler import collect, decode, start
from tests.agent.handlers.database.test_operations import batch, request, run, transaction
from tests.support.owned_database import (
    CHANNEL,
    LARGE_OBJECT,
    PROBE,
    Listener,
    OwnedDatabase,
    create_owned_database,
)
from tests.support.postgres import PostgresServer

OK = Code.OK
FP = Code.FAILED_PRECONDITION
ENDED = "READ_ONLY_TRANSACTION_ENDED"
REFUSED = "READ_ONLY_PROFILE"  # the database refused a write in the read-only transaction (25006)
INSERT = "INSERT INTO accounts VALUES (99, 'mallory', 1)"


@dataclass(frozen=True)
class Step:
    """One request and the status it must end with (`reason` too, when given)."""

    rpc: str  # "query", "batch", "transaction", "poll" or "check"
    sql: tuple[str, ...] = ()
    code: Code = OK
    reason: str | None = None
    sets: int = 2  # parameter sets of a batch


# One-letter constructors, so that a case reads as the requests it sends.
def Q(sql: str, code: Code = OK, reason: str | None = None) -> Step:
    return Step("query", (sql,), code, reason)


def T(*sql: str, code: Code = OK, reason: str | None = None) -> Step:
    return Step("transaction", sql, code, reason)


def B(sql: str, code: Code = OK, reason: str | None = None, sets: int = 2) -> Step:
    return Step("batch", (sql,), code, reason, sets)


def P(sql: str, code: Code = OK, reason: str | None = None) -> Step:
    return Step("poll", (sql,), code, reason)


CHECK = Step("check")


@dataclass(frozen=True)
class Case:
    name: str
    steps: tuple[Step, ...]
    #: The case ends the connection (it kills its backend, or leaves it mid-COPY): the next request gets
    #: a new one, so its session state is compared but not its backend pid.
    new_connection: bool = False


def case(name: str, *steps: Step, new_connection: bool = False) -> Any:
    return pytest.param(Case(name, steps, new_connection), id=name)


CORPUS = [
    # Ending the read-only transaction: the commit guard refuses every COMMIT; ROLLBACK is caught after it.
    case("commit-then-insert-then-commit", T("COMMIT", INSERT, "COMMIT", code=FP, reason=ENDED)),
    case("commit-begin-insert-commit", T("COMMIT", "BEGIN", INSERT, "COMMIT", code=FP, reason=ENDED)),
    case("commit-then-nextval", T("COMMIT", "SELECT nextval('s')", code=FP, reason=ENDED)),
    case("set-transaction-read-write-first", T("SET TRANSACTION READ WRITE", INSERT, "COMMIT", code=FP,
                                               reason="INVALID_TRANSACTION_STATE")),
    case("rollback-then-insert", T("ROLLBACK", INSERT, "COMMIT", code=FP, reason=ENDED)),
    case("abort-then-insert", T("ABORT", INSERT, code=FP, reason=ENDED)),
    case("end-then-insert", T("END", INSERT, code=FP, reason=ENDED)),
    case("rollback-and-chain-then-read-write", T("ROLLBACK AND CHAIN", "SET TRANSACTION READ WRITE", INSERT, "COMMIT",
                                                 code=FP, reason=ENDED)),
    case("commit-and-chain-then-read-write", T("COMMIT AND CHAIN", "SET TRANSACTION READ WRITE", INSERT, "COMMIT",
                                               code=FP, reason=ENDED)),
    case("savepoint-then-read-write", T("SAVEPOINT a", "SET TRANSACTION READ WRITE", INSERT, code=FP,
                                        reason="INVALID_TRANSACTION_STATE")),
    case("savepoint-release-commit", T("SAVEPOINT a", f"SELECT lo_create({LARGE_OBJECT + 1})", "RELEASE a",
                                       "COMMIT", code=FP, reason=ENDED)),
    case("prepare-transaction", T("SELECT lo_create(0)", "PREPARE TRANSACTION 'onprem_evil'", code=FP, reason=ENDED)),
    case("begin-inside-the-transaction", T("BEGIN ISOLATION LEVEL SERIALIZABLE READ WRITE", INSERT, code=FP,
                                           reason="INVALID_TRANSACTION_STATE")),
    case("begin-read-write-inside-the-transaction", T("BEGIN READ WRITE", INSERT, code=FP,
                                                      reason="INVALID_TRANSACTION_STATE")),
    # Writes a READ ONLY transaction allows: kept only if something commits, and nothing does.
    case("lo-create-then-commit", T(f"SELECT lo_create({LARGE_OBJECT + 1})", "COMMIT", code=FP, reason=ENDED)),
    case("lo-from-bytea-then-commit", T("SELECT lo_from_bytea(0, 'evil')", "COMMIT", code=FP, reason=ENDED)),
    case("lo-write-then-commit", T(f"SELECT lowrite(lo_open({LARGE_OBJECT}, 131072), 'evil')", "COMMIT", code=FP,
                                   reason=ENDED)),
    case("lo-put-then-commit", T(f"SELECT lo_put({LARGE_OBJECT}, 0, 'evil')", "COMMIT", code=FP, reason=ENDED)),
    case("lo-unlink-then-commit", T(f"SELECT lo_unlink({LARGE_OBJECT})", "COMMIT", code=FP, reason=ENDED)),
    case("lo-create-query", Q(f"SELECT lo_create({LARGE_OBJECT + 1})")),
    case("notify-then-commit", T(f"NOTIFY {CHANNEL}, 'committed'", "COMMIT", code=FP, reason=ENDED)),
    case("pg-notify-then-commit", T(f"SELECT pg_notify('{CHANNEL}', 'committed')", "COMMIT", code=FP, reason=ENDED)),
    case("listen-then-commit", T(f"LISTEN {CHANNEL}", "COMMIT", code=FP, reason=ENDED)),
    case("cluster-then-commit", T("CLUSTER accounts USING accounts_pkey", "COMMIT", code=FP, reason=ENDED)),
    case("reindex-then-commit", T("REINDEX TABLE accounts", "COMMIT", code=FP, reason=ENDED)),
    case("analyze-then-commit", T("ANALYZE accounts", "COMMIT", code=FP, reason=ENDED)),
    case("lock-table-then-commit", T("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE", "COMMIT", code=FP, reason=ENDED)),
    # Taking the commit guard apart from inside the transaction.
    case("delete-the-guard-row-then-commit", T("DELETE FROM pg_temp.onprem_commit_guard", "SELECT lo_create(0)",
                                               "COMMIT", code=FP, reason=ENDED)),
    case("drop-the-guard", T("DROP TABLE pg_temp.onprem_commit_guard", "COMMIT", code=FP, reason=REFUSED)),
    case("discard-temp-then-commit", T("DISCARD TEMP", "COMMIT", code=FP, reason="OBJECT_NOT_IN_PREREQUISITE_STATE")),
    case("constraints-immediate", T("SET CONSTRAINTS ALL IMMEDIATE", "COMMIT", code=FP, reason=REFUSED)),
    case("constraints-immediate-caught-in-do", T(
        "DO $$BEGIN SET CONSTRAINTS ALL IMMEDIATE; EXCEPTION WHEN others THEN NULL; END$$",
        "SELECT lo_create(0)", "COMMIT", code=FP, reason=ENDED)),
    case("replication-role-replica", T("SET session_replication_role = replica", "COMMIT", code=Code.PERMISSION_DENIED)),
    # Changing the session's defaults, then ending the transaction to use them.
    case("default-read-only-off-then-commit", T("SET default_transaction_read_only = off", "COMMIT", INSERT, code=FP,
                                                reason=ENDED)),
    case("session-characteristics-then-commit", T("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", "COMMIT",
                                                  INSERT, code=FP, reason=ENDED)),
    case("set-config-then-rollback", T("SELECT set_config('default_transaction_read_only', 'off', false)",
                                       "ROLLBACK", INSERT, code=FP, reason=ENDED)),
    case("reset-all", T("RESET ALL", INSERT, code=FP, reason=ENDED)),
    case("application-name-forged", T("SELECT set_config('application_name', 'onprem-ro-000000000000', true)", INSERT,
                                      code=FP, reason=ENDED)),
    case("set-role-none-then-insert", T("SET ROLE NONE", INSERT, code=FP, reason=REFUSED)),
    case("set-session-authorization", T("SET SESSION AUTHORIZATION onprem", code=Code.PERMISSION_DENIED)),
    # Procedures, functions and anonymous blocks.
    case("call-procedure-that-commits", T("CALL audit_and_commit('evil')", code=FP, reason=REFUSED)),
    case("call-procedure-that-inserts", Q("CALL audit_only('evil')", code=FP, reason=REFUSED)),
    case("function-that-inserts", Q("SELECT add_audit('evil')", code=FP, reason=REFUSED)),
    case("do-block-that-commits", T("DO $$BEGIN INSERT INTO audit (note) VALUES ('evil'); COMMIT; END$$", code=FP,
                                    reason=REFUSED)),
    case("do-commit-only", T("DO $$BEGIN COMMIT; END$$", code=FP, reason="INVALID_TRANSACTION_TERMINATION")),
    # Plain writes and what needs more than a read-only transaction.
    case("writable-cte", Q("WITH gone AS (DELETE FROM accounts RETURNING *) SELECT * FROM gone", code=FP,
                           reason=REFUSED)),
    case("select-for-update", Q("SELECT * FROM accounts FOR UPDATE", code=FP, reason=REFUSED)),
    case("nextval", Q("SELECT nextval('s')", code=FP, reason=REFUSED)),
    case("setval", Q("SELECT setval('s', 1000)", code=FP, reason=REFUSED)),
    case("create-temp-table", T("CREATE TEMP TABLE evil AS SELECT 1 AS a", "COMMIT", code=FP, reason=REFUSED)),
    case("grant", Q("GRANT ALL ON accounts TO PUBLIC", code=FP, reason=REFUSED)),
    case("comment", Q("COMMENT ON TABLE accounts IS 'evil'", code=FP, reason=REFUSED)),
    case("vacuum", Q("VACUUM accounts", code=FP, reason="INVALID_TRANSACTION_STATE")),
    case("vacuum-full", T("VACUUM FULL accounts", code=FP, reason="INVALID_TRANSACTION_STATE")),
    case("checkpoint", Q("CHECKPOINT", code=Code.PERMISSION_DENIED)),
    case("discard-all", Q("DISCARD ALL", code=FP, reason="INVALID_TRANSACTION_STATE")),
    case("copy-from-stdin", Q("COPY accounts FROM STDIN", code=FP, reason=REFUSED)),
    case("copy-to-stdout", Q("COPY accounts TO STDOUT", code=Code.INVALID_ARGUMENT), new_connection=True),
    case("copy-to-server-file", Q("COPY accounts TO '{folder}/copy.csv'", code=Code.PERMISSION_DENIED)),
    case("lo-export-to-server-file", Q(f"SELECT lo_export({LARGE_OBJECT}, '{{folder}}/lo.bin')",
                                       code=Code.PERMISSION_DENIED)),
    case("lo-import-server-file", Q("SELECT lo_import('/etc/hostname')", code=Code.PERMISSION_DENIED)),
    # ExecuteBatch: every parameter set is checked before the next runs.
    case("batch-of-commits", B("COMMIT", code=FP, reason=ENDED)),
    case("batch-of-rollback-and-chain", B("ROLLBACK AND CHAIN", code=FP, reason=ENDED)),
    case("batch-of-inserts", B(INSERT.replace("99", "100"), code=FP, reason=REFUSED)),
    case("batch-of-lo-creates", B("SELECT lo_create(0)", sets=3)),
    case("batch-set-transaction-read-write", B("SET TRANSACTION READ WRITE", code=FP,
                                               reason="INVALID_TRANSACTION_STATE")),
    # PollChanges: its SQL runs as a subquery of the agent's SELECT, in the same transaction.
    case("poll-lo-create", P("SELECT lo_create(0) AS w")),
    case("poll-advisory-lock", P("SELECT pg_try_advisory_lock(4242) AS w")),
    case("poll-nextval", P("SELECT nextval('s') AS w", code=FP, reason=REFUSED)),
    case("poll-forges-application-name", P("SELECT set_config('application_name', 'x', false) AS w", code=FP,
                                           reason=ENDED)),
    case("poll-function-that-inserts", P("SELECT add_audit('evil') AS w", code=FP, reason=REFUSED)),
    # Session state that outlives a request: on the pool's one connection, gone before the next request.
    case("advisory-lock-held", Q("SELECT pg_advisory_lock(4242)"), Q("SELECT pg_try_advisory_lock(4242)")),
    case("prepared-statement-then-execute", Q(f"PREPARE evil AS {INSERT}"), Q("EXECUTE evil",
                                                                          code=Code.INVALID_ARGUMENT)),
    case("cursor-with-hold-then-fetch", T("DECLARE evil CURSOR WITH HOLD FOR SELECT * FROM accounts", "COMMIT",
                                          code=FP, reason=ENDED),
         Q("FETCH ALL FROM evil", code=Code.INVALID_ARGUMENT)),
    case("session-read-write-then-insert", Q("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE"),
         T(INSERT, code=FP, reason=REFUSED)),
    case("default-read-only-off-then-check", T("SET default_transaction_read_only = off", "COMMIT", code=FP,
                                               reason=ENDED), CHECK, T(INSERT, code=FP, reason=REFUSED)),
    case("search-path-then-insert", Q("SELECT set_config('search_path', 'pg_temp, public', false)"),
         Q(INSERT, code=FP, reason=REFUSED)),
    case("terminate-own-backend", Q("SELECT pg_terminate_backend(pg_backend_pid())", code=Code.UNAVAILABLE),
         T("SET TRANSACTION READ WRITE", INSERT, code=FP, reason="INVALID_TRANSACTION_STATE"), new_connection=True),
    case("check-after-lock-and-prepare", Q("SELECT pg_advisory_lock(7)"), Q("PREPARE p AS SELECT 1"), CHECK),
]


@dataclass
class Database:
    """The owned database and its snapshot; rebuilt after a case that changed it, so that only that case fails."""

    server: PostgresServer
    owned: OwnedDatabase
    baseline: str

    def rebuild(self) -> None:
        self.owned = create_owned_database(self.server, self.owned.admin.database, self.owned.server_folder)
        self.baseline = self.owned.snapshot()


@pytest.fixture(scope="module")
def database(postgres: PostgresServer) -> Database:
    owned = create_owned_database(postgres, "onprem_read_only")
    return Database(postgres, owned, owned.snapshot())


@pytest.fixture
def owned(database: Database) -> OwnedDatabase:
    return database.owned


@pytest.fixture
async def handler(owned: OwnedDatabase) -> AsyncIterator[DatabaseHandler]:
    h = DatabaseHandler({"ro": DatabaseProfile(name="ro", url=owned.owner.url(), read_only=True, pool_size=1)})
    yield h
    await h.aclose()


@pytest.fixture
def listener(owned: OwnedDatabase) -> Iterator[Listener]:
    listening = Listener(owned.admin)
    yield listening
    listening.close()


def _request(step: Step, folder: str) -> Any:
    sql = tuple(s.replace("{folder}", folder) for s in step.sql)
    if step.rpc == "query":
        return start("ro", sql[0])
    if step.rpc == "transaction":
        return transaction("ro", *((s, {}) for s in sql))
    if step.rpc == "batch":
        return batch("ro", sql[0], *({} for _ in range(step.sets)))
    assert step.rpc == "poll"
    return request(poll_changes=database_pb2.PollChangesRequest(profile="ro", sql=sql[0], watermark_column="w"))


async def perform(handler: DatabaseHandler, step: Step, folder: str) -> RequestError | None:
    try:
        if step.rpc == "check":
            checks = await handler.check("ro")
            assert all(c.ok for c in checks), checks
            assert [c.name for c in checks if c.name == "read-only"] == ["read-only"]
        else:
            await run(handler, _request(step, folder))
    except RequestError as exc:
        return exc
    return None


async def probe(handler: DatabaseHandler) -> dict[str, Any]:
    columns, rows = decode(await collect(handler, start("ro", PROBE)))
    return dict(zip([c.name for c in columns], rows[0], strict=True))


@pytest.mark.parametrize("hostile", CORPUS)
async def test_no_statement_sequence_changes_a_read_only_database(
    hostile: Case, handler: DatabaseHandler, owned: OwnedDatabase, database: Database, listener: Listener,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = await probe(handler)
    outcomes = []
    for step in hostile.steps:
        error = await perform(handler, step, str(owned.server_folder))
        outcomes.append((error.code, error.reason if step.reason else None) if error else (OK, None))
    after = await probe(handler)
    notified = listener.notifications()
    changed = owned.snapshot() != database.baseline
    if changed:
        database.rebuild()
    assert not changed, "the database changed"
    assert notified == [], "a NOTIFY was committed"
    if hostile.new_connection:
        before.pop("pid"), after.pop("pid")
    assert after == before, "session state outlived the request"
    assert outcomes == [(s.code, s.reason) for s in hostile.steps]
    # A caller's hostile request is the caller's mistake: nothing for the agent's operator to act on.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []


def test_the_corpus_has_forty_hostile_sequences_across_every_rpc() -> None:
    cases = [p.values[0] for p in CORPUS]
    assert len(cases) >= 40
    assert {s.rpc for c in cases for s in c.steps} == {"query", "batch", "transaction", "poll", "check"}


async def test_the_message_names_the_statement_that_tried_to_commit(handler: DatabaseHandler) -> None:
    with pytest.raises(RequestError) as caught:
        await run(handler, transaction("ro", ("SELECT 1", {}), ("COMMIT", {}), (INSERT, {})))
    assert (caught.value.code, caught.value.reason) == (FP, ENDED)
    assert caught.value.message.startswith("statement 1 tried to end the read-only transaction; the database "
                                           "refused and rolled it back, so nothing it did was kept")


async def test_the_message_names_a_rollback_and_chain(handler: DatabaseHandler) -> None:
    with pytest.raises(RequestError) as caught:
        await run(handler, transaction("ro", ("ROLLBACK AND CHAIN", {}), ("SET TRANSACTION READ WRITE", {})))
    assert caught.value.message.startswith("statement 0 (ROLLBACK) ended the read-only transaction and began another")


async def test_a_read_only_profile_still_reads_in_every_rpc(handler: DatabaseHandler) -> None:
    _, rows = decode(await collect(handler, start("ro", "SELECT owner FROM accounts ORDER BY id")))
    assert rows == [["ann"], ["bob"]]
    [chunk] = await run(handler, transaction("ro", ("SELECT 1", {}), ("SELECT count(*) FROM accounts", {})))
    assert len(chunk.transaction.results) == 2
    [chunk] = await run(handler, batch("ro", "SELECT 1", {}, {}, {}))
    assert chunk.batch.sets_applied == 3
    chunks = await run(handler, request(poll_changes=database_pb2.PollChangesRequest(
        profile="ro", table="accounts", watermark_column="id")))
    assert chunks[-1].poll_changes.summary.row_count == 2


async def test_a_role_without_the_temporary_privilege_is_refused_with_the_fix(postgres: PostgresServer) -> None:
    # The commit guard is a temporary table: without it a read-only profile would be unguarded, so it refuses.
    no_temp = create_owned_database(postgres, "onprem_no_temp")
    with psycopg.connect(no_temp.admin.dsn(), autocommit=True) as conn:
        conn.execute("REVOKE TEMPORARY ON DATABASE onprem_no_temp FROM PUBLIC, onprem_owner")
    h = DatabaseHandler({"ro": DatabaseProfile(name="ro", url=no_temp.owner.url(), read_only=True, pool_size=1)})
    try:
        with pytest.raises(RequestError) as caught:
            await collect(h, start("ro", "SELECT 1"))
    finally:
        await h.aclose()
    assert (caught.value.code, caught.value.reason) == (FP, REFUSED)
    assert caught.value.message.startswith("a read-only PostgreSQL profile needs the TEMPORARY privilege on its "
                                           "database and the plpgsql language")


async def test_the_commit_guard_stays_one_page_however_many_requests_it_guards(handler: DatabaseHandler) -> None:
    # Nothing vacuums a temporary table: the guard is one row updated per request, whose rolled-back versions
    # the next update prunes, so it never grows (rolled-back inserts would add a page every ~150 requests).
    size = "SELECT pg_relation_size('pg_temp.onprem_commit_guard'), pg_backend_pid()"
    _, [[first, pid]] = decode(await collect(handler, start("ro", size)))
    for _ in range(400):
        await collect(handler, start("ro", "SELECT 1"))
    _, [[after, same_pid]] = decode(await collect(handler, start("ro", size)))
    assert (after, same_pid) == (first, pid) == (8192, pid)


def test_a_missing_guard_row_fails_closed() -> None:
    class Result:
        rowcount = 0

    with pytest.raises(GuardMissing) as caught:
        PgReadOnlyTransaction.begin(lambda sql, params: Result(), dbapi=None, timeout_ms=None)  # type: ignore[arg-type]
    assert (caught.value.code, caught.value.reason) == (FP, REFUSED)
