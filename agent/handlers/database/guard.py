"""Read-only profiles the database keeps read-only, and pooled connections that go back clean.

Nothing here reads SQL text: the database and the driver's transaction state decide.

PostgreSQL, read-only, in four layers (each alone is not enough):

1. *Read-only by default.* The connection starts with `default_transaction_read_only=on` (a startup
   option, so `RESET ALL` returns to it) and psycopg opens every transaction with `BEGIN READ ONLY`.
2. *A transaction that cannot commit.* A read-only transaction still lets a statement create large
   objects (`lo_create`), queue `NOTIFY`, `LISTEN`, or rewrite a table it owns (`CLUSTER`), and a
   caller's `COMMIT` would keep all of that. So each connection gets a one-row temporary table with
   a deferred constraint trigger that raises, and each read-only transaction starts by updating that
   row: every way to commit (`COMMIT`, `END`, `COMMIT AND CHAIN`, `PREPARE TRANSACTION`, a savepoint
   then `COMMIT`) fires the trigger and the database rolls the transaction back. The update also
   takes the transaction's first snapshot, after which `SET TRANSACTION READ WRITE` is refused by
   the server. The trigger cannot be removed from inside a read-only transaction (`DROP`, `ALTER`,
   `TRUNCATE` are refused; `DISCARD TEMP` fails on the pending event; `DELETE` leaves the event
   queued; `SET CONSTRAINTS ... IMMEDIATE` fires it). An UPDATE rather than an INSERT: the rolled-back
   versions of the one row are pruned when the next update reads its page, while rolled-back inserts
   would grow the table by a page every ~150 requests (nothing vacuums temporary tables).
3. *The same transaction, after every statement.* What a commit guard cannot see is a `ROLLBACK`
   (`ABORT`, `ROLLBACK AND CHAIN`), after which the next statement would run in a new transaction,
   one that a `SET TRANSACTION READ WRITE` could open up. So the transaction also sets
   `application_name` LOCAL to a value with a fresh nonce; the server reports every change of that
   setting to the driver (ParameterStatus, before ReadyForQuery), and ending the transaction reverts
   it. After each statement the agent checks, from what psycopg already holds (no round trip), that
   the transaction is still open (`transaction_status`, from ReadyForQuery) and that the setting is
   still the nonce: otherwise the request ends with FAILED_PRECONDITION before the next statement.
   A statement that fails and leaves no transaction open (the refused COMMIT) ends it the same way.
4. *Reset on return.* See `reset_postgres`.

SQLite, read-only: `PRAGMA query_only`, and an authorizer (the database asks it about every action of
every statement it prepares) that refuses transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT,
RELEASE), ATTACH and DETACH, and PRAGMAs that set something or act, while the request's own statements
run; the agent's BEGIN and ROLLBACK around them are its own. The transaction must still be open after
each statement (`in_transaction`). On every SQLite profile the authorizer also notes statements that
leave state on the connection (temporary objects, ATTACH, PRAGMA settings): such a connection is not
returned to the pool but closed.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from onprem.tunnel.errors import FailedPrecondition

__all__ = [
    "PG_READ_ONLY_OPTION",
    "GuardMissing",
    "PgReadOnlyTransaction",
    "SqliteGuard",
    "pg_prepare_read_only",
    "reset_postgres",
    "statement_name",
]

#: A startup option: the session's own default, which RESET ALL (and DISCARD ALL) return to.
PG_READ_ONLY_OPTION = "-c default_transaction_read_only=on"

_GUARD_TABLE = "pg_temp.onprem_commit_guard"
_GUARD_WORDS = "onprem: a read-only transaction never commits"
# One round trip, once per connection: a read-write transaction of its own, since the session's
# default is read-only. plpgsql is installed in every database unless someone dropped it.
_GUARD_SETUP = f"""BEGIN READ WRITE;
CREATE TEMPORARY TABLE onprem_commit_guard (nonce text);
INSERT INTO {_GUARD_TABLE} VALUES ('');
CREATE FUNCTION pg_temp.onprem_refuse_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION USING ERRCODE = '25006', MESSAGE = '{_GUARD_WORDS} (its commit guard fired)';
END $$;
CREATE CONSTRAINT TRIGGER onprem_refuse_commit AFTER UPDATE ON {_GUARD_TABLE}
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION pg_temp.onprem_refuse_commit();
COMMIT"""

# DISCARD ALL, spelled out as its documented equivalent minus DISCARD TEMP (which would drop the commit
# guard; a read-only transaction cannot create temporary objects, and none of its work is committed).
# As one simple-protocol query it runs in one round trip, together with the ROLLBACK before it.
_PG_RESET_KEEPING_TEMP = (
    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; UNLISTEN *; "
    "SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD PLANS; DISCARD SEQUENCES"
)

_ENDED = "READ_ONLY_TRANSACTION_ENDED"
_ADVICE = ("a read-only profile runs each request in one READ ONLY transaction that the agent rolls back; "
           "leave out COMMIT, ROLLBACK and other transaction control")


def statement_name(index: int | None) -> str:
    return "the statement" if index is None else f"statement {index}"


class _PlainCursor(psycopg.Cursor[Any]):
    """The simple query protocol, for the agent's own multi-statement scripts (the profile's cursor forbids it)."""


def pg_prepare_read_only(dbapi: psycopg.Connection[Any]) -> None:
    """Once per new connection of a read-only profile: the commit guard, and BEGIN READ ONLY from now on."""
    if dbapi.info.transaction_status != TransactionStatus.IDLE:
        dbapi.rollback()
    dbapi.autocommit = True
    try:
        _PlainCursor(dbapi).execute(_GUARD_SETUP, prepare=False)
    except psycopg.Error as exc:
        raise FailedPrecondition(
            "a read-only PostgreSQL profile needs the TEMPORARY privilege on its database and the plpgsql "
            f"language, for the temporary table that stops any COMMIT: {str(exc).splitlines()[0]}",
            reason="READ_ONLY_PROFILE",
        ) from None
    finally:
        if dbapi.info.transaction_status == TransactionStatus.IDLE:
            dbapi.autocommit = False
    dbapi.read_only = True


class GuardMissing(FailedPrecondition):
    """The guard row is gone: fail closed, and the session closes the connection instead of pooling it."""


class PgReadOnlyTransaction:
    """One request's read-only transaction, and the checks that it is still the same one."""

    def __init__(self, dbapi: psycopg.Connection[Any], nonce: str) -> None:
        self.dbapi = dbapi
        self.nonce = nonce

    @classmethod
    def begin(cls, execute: Any, dbapi: psycopg.Connection[Any], timeout_ms: int | None) -> PgReadOnlyTransaction:
        """Queue the commit guard, set the nonce (and the statement timeout) LOCAL: one statement, one round trip.

        `execute(sql, params)` runs the statement on the request's connection, inside the transaction
        that psycopg has opened (or opens now) with BEGIN READ ONLY.
        """
        nonce = f"onprem-ro-{secrets.token_hex(6)}"
        values = "pg_catalog.set_config('application_name', %(nonce)s, true)"
        params: dict[str, Any] = {"nonce": nonce}
        if timeout_ms:
            values += " || pg_catalog.set_config('statement_timeout', %(timeout)s, true)"
            params["timeout"] = str(timeout_ms)
        if execute(f"UPDATE {_GUARD_TABLE} SET nonce = {values}", params).rowcount != 1:
            raise GuardMissing(
                "this connection's commit guard is missing, so its read-only transaction could commit; "
                "the connection is closed, retry the request",
                reason="READ_ONLY_PROFILE",
            )
        guard = cls(dbapi, nonce)
        if dbapi.info.parameter_status("application_name") != nonce:
            # A server or pooler that does not report application_name: the check below cannot work.
            raise FailedPrecondition(
                "the database does not report application_name changes to the driver, which a read-only "
                "profile needs to verify its transaction after every statement (a connection pooler in "
                "between?); connect to PostgreSQL directly",
                reason="READ_ONLY_PROFILE",
            )
        return guard

    def check(self, what: str, tag: str | None = None) -> None:
        """After a statement succeeded: still in the same read-only transaction, or FAILED_PRECONDITION."""
        info = self.dbapi.info
        status = info.transaction_status
        if status == TransactionStatus.INTRANS and info.parameter_status("application_name") == self.nonce:
            return
        did = f" ({tag})" if tag else ""
        if status != TransactionStatus.INTRANS:
            raise FailedPrecondition(f"{what}{did} ended the read-only transaction: {_ADVICE}", reason=_ENDED)
        if tag and tag.split(" ")[0] in ("COMMIT", "ROLLBACK"):
            raise FailedPrecondition(f"{what}{did} ended the read-only transaction and began another: {_ADVICE}",
                                     reason=_ENDED)
        raise FailedPrecondition(
            f"{what}{did} changed application_name, which the agent sets for the read-only transaction to know "
            "it is still the same one; a read-only profile cannot change it",
            reason=_ENDED,
        )

    def after_error(self, what: str, exc: BaseException) -> None:
        """A statement failed: when it took the transaction with it (a refused COMMIT), say so."""
        orig = getattr(exc, "orig", None) or exc
        said = str(orig).splitlines()[0] if str(orig) else type(orig).__name__
        if self.dbapi.info.transaction_status != TransactionStatus.IDLE:
            if said.startswith(_GUARD_WORDS):  # SET CONSTRAINTS ... IMMEDIATE fired the guard early
                raise FailedPrecondition(
                    f"{what} fired the read-only transaction's commit guard (SET CONSTRAINTS ... IMMEDIATE runs the "
                    f"deferred checks of a commit): {_ADVICE}",
                    reason="READ_ONLY_PROFILE",
                ) from None
            return
        # The commit guard's own words add nothing; the database's (e.g. prepared transactions disabled) may.
        why = "" if said.startswith(_GUARD_WORDS) else f" ({said})"
        raise FailedPrecondition(
            f"{what} tried to end the read-only transaction{why}; the database refused and rolled it back, so "
            f"nothing it did was kept: {_ADVICE}",
            reason=_ENDED,
        ) from None


class _Discard(Exception):
    """The connection cannot be reset (e.g. it is stuck in COPY): close it instead of returning it."""


def reset_postgres(dbapi: psycopg.Connection[Any], read_only: bool) -> None:
    """End the transaction and reset the session: nothing a request did reaches the next one.

    A read-only connection is always still inside its transaction here (it never commits): one round
    trip, `ROLLBACK; CLOSE ALL; ...`. A read-write one after its COMMIT: `DISCARD ALL`, one round trip.
    psycopg's own prepared statements never outlive this: the profile's connections do not prepare
    (`prepare_threshold=None`), because psycopg does not always notice that DISCARD ALL dropped them.
    Raises `_Discard` (or a driver error) when the connection must be closed instead.
    """
    status = dbapi.info.transaction_status
    if status in (TransactionStatus.ACTIVE, TransactionStatus.UNKNOWN):
        raise _Discard(f"the connection is {status.name}")
    cursor = _PlainCursor(dbapi)
    if read_only:
        if status == TransactionStatus.IDLE:
            with _autocommit(dbapi):
                cursor.execute(_PG_RESET_KEEPING_TEMP, prepare=False)
        else:
            cursor.execute(f"ROLLBACK; {_PG_RESET_KEEPING_TEMP}", prepare=False)
        return
    if status != TransactionStatus.IDLE:
        dbapi.rollback()
    with _autocommit(dbapi):
        cursor.execute("DISCARD ALL", prepare=False)


@contextlib.contextmanager
def _autocommit(dbapi: psycopg.Connection[Any]) -> Iterator[None]:
    dbapi.autocommit = True
    try:
        yield
    finally:
        dbapi.autocommit = False


# SQLite ---------------------------------------------------------------------------------------------------

# Pragmas whose argument names what to describe, not a new setting.
_PRAGMA_ARGUMENTS = frozenset({
    "table_info", "table_xinfo", "table_list", "index_info", "index_xinfo", "index_list", "foreign_key_list",
    "foreign_key_check", "integrity_check", "quick_check",
})
# Pragmas that act when run without an argument.
_PRAGMA_ACTIONS = frozenset({"optimize", "wal_checkpoint", "incremental_vacuum", "shrink_memory"})
_TEMP_CREATES = frozenset({
    sqlite3.SQLITE_CREATE_TEMP_INDEX, sqlite3.SQLITE_CREATE_TEMP_TABLE, sqlite3.SQLITE_CREATE_TEMP_TRIGGER,
    sqlite3.SQLITE_CREATE_TEMP_VIEW,
})
_CREATES = frozenset({
    sqlite3.SQLITE_CREATE_INDEX, sqlite3.SQLITE_CREATE_TABLE, sqlite3.SQLITE_CREATE_TRIGGER,
    sqlite3.SQLITE_CREATE_VIEW, sqlite3.SQLITE_CREATE_VTABLE,
})


class SqliteGuard:
    """The authorizer of one SQLite connection, and what it saw.

    SQLite calls `authorize` while it prepares each statement (and re-prepares after a schema change),
    in the thread that runs the statement; the session's steps run one at a time, so no lock.
    """

    def __init__(self, read_only: bool) -> None:
        self.read_only = read_only
        #: The statement left state on the connection: close it rather than pool it.
        self.dirty = False
        #: What the authorizer last refused, for the error message.
        self.refused: str | None = None
        self._ours = False

    @contextlib.contextmanager
    def ours(self) -> Iterator[None]:
        """The agent's own BEGIN and ROLLBACK, which the request's statements may not run."""
        self._ours = True
        try:
            yield
        finally:
            self._ours = False

    def authorize(self, action: int, arg1: str | None, arg2: str | None, db: str | None, _trigger: str | None) -> int:
        if self._ours:
            return sqlite3.SQLITE_OK
        refused = self._refusal(action, arg1, arg2) if self.read_only else None
        if refused is not None:
            self.refused = refused
            return sqlite3.SQLITE_DENY
        if action in _TEMP_CREATES or (action in _CREATES and db == "temp") or action == sqlite3.SQLITE_ATTACH \
                or (action == sqlite3.SQLITE_PRAGMA and self._sets(arg1, arg2)):
            self.dirty = True
        return sqlite3.SQLITE_OK

    @staticmethod
    def _sets(pragma: str | None, value: str | None) -> bool:
        name = (pragma or "").lower()
        return (value is not None and name not in _PRAGMA_ARGUMENTS) or name in _PRAGMA_ACTIONS

    def _refusal(self, action: int, arg1: str | None, arg2: str | None) -> str | None:
        if action == sqlite3.SQLITE_TRANSACTION:
            return f"run {arg1 or 'transaction control'} (it runs each request in one transaction of its own)"
        if action == sqlite3.SQLITE_SAVEPOINT:
            return f"use savepoints ({arg1} {arg2 or ''}".rstrip() + ")"
        if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
            return "attach or detach databases (ATTACH creates files; VACUUM INTO attaches one)"
        if action == sqlite3.SQLITE_PRAGMA and self._sets(arg1, arg2):
            return f"set or run PRAGMA {arg1}"
        return None

    def begin(self, dbapi: sqlite3.Connection) -> None:
        """One deferred transaction for the request: every statement reads the same snapshot."""
        if not dbapi.in_transaction:
            with self.ours():
                dbapi.execute("BEGIN")

    def check(self, dbapi: sqlite3.Connection, what: str) -> None:
        if self.read_only and not dbapi.in_transaction:
            # Only an error SQLite rolls back by itself gets here (transaction control is refused).
            raise FailedPrecondition(f"{what} ended the read-only transaction: {_ADVICE}", reason=_ENDED)

    def after_error(self, what: str) -> None:
        refused, self.refused = self.refused, None
        if refused is not None:
            raise FailedPrecondition(f"{what}: a read-only SQLite profile may not {refused}",
                                     reason="READ_ONLY_PROFILE") from None
