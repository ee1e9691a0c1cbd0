"""A profile's engine, thread pool and connection slots (`ProfileRuntime`), and one request's
connection (`RequestConnection`, which `Query`, `Batch`, `Transaction` and `Poll` extend).

Each profile gets a lazily created SQLAlchemy engine (pooled), a bounded
thread pool for the blocking driver calls, and one asyncio slot per pooled
connection. Where the database can enforce the profile's limits itself it
does: a READ ONLY transaction that cannot commit and `statement_timeout` in
PostgreSQL, `query_only` plus an authorizer and a progress-handler deadline in
SQLite, the query timeout (SQL_ATTR_QUERY_TIMEOUT) of ODBC connections
(`guard` says how read-only is kept, statement by statement). Every
connection goes back to the pool reset, or is closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import QueuePool

from onprem.agent import failpoints
from onprem.agent.handlers.database import odbc
from onprem.agent.handlers.database.errors import first_lines, scrub
from onprem.agent.handlers.database.guard import (
    PG_READ_ONLY_OPTION,
    GuardMissing,
    PgReadOnlyTransaction,
    SqliteGuard,
    pg_prepare_read_only,
    reset_postgres,
)
from onprem.agent.handlers.database.idempotency import IdempotencyTable
from onprem.agent.profiles.database import DatabaseProfile
from onprem.tunnel.errors import Cancelled, FailedPrecondition, Internal

__all__ = ["COMMAND_TAG", "ProfileRuntime", "RequestConnection"]

log = logging.getLogger("onprem.agent.database")

_PG_CONNECT_TIMEOUT_SECONDS = 10
_ODBC_LOGIN_TIMEOUT_SECONDS = 10
# SQLite calls the progress handler every this many VM instructions: about every millisecond.
_SQLITE_PROGRESS_STEPS = 10_000
# Keys of a pooled connection's `info`, which lives as long as the DBAPI connection.
_SQLITE_GUARD = "onprem_sqlite_guard"
_ODBC_DBMS = "onprem_odbc_dbms"
#: The last statement's command tag (read-only PostgreSQL profiles), in the SQLAlchemy connection's `info`.
COMMAND_TAG = "onprem_command_tag"


class _SingleStatementCursor(psycopg.Cursor[Any]):
    """A psycopg cursor that always uses the extended query protocol.

    Without parameters psycopg sends SQL with the simple protocol, which runs
    `SELECT 1; COMMIT; INSERT ...` as three statements: the COMMIT would end the
    READ ONLY transaction of a read-only profile. The extended protocol makes
    the server refuse more than one statement.
    """

    def _execute_send(self, query: Any, *, force_extended: bool = False, binary: bool | None = None) -> None:
        super()._execute_send(query, force_extended=True, binary=binary)


class ProfileRuntime:
    """A profile's lazily created engine, its bounded thread pool, its connection slots and its secrets."""

    def __init__(self, profile: DatabaseProfile) -> None:
        self.profile = profile
        self.dialect = profile.dialect
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=profile.pool_size, thread_name_prefix=f"onprem-db-{profile.name}"
        )
        inline = make_url(profile.url).password
        self.secrets: list[str] = [str(inline)] if inline else []
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        # One slot per pooled connection, taken before a statement asks the pool for one:
        # a thread must never block on pool checkout while the statements that hold the
        # connections wait for a thread (with pool_size threads, that deadlocks).
        self.slots = asyncio.Semaphore(profile.pool_size)
        #: (table OID, column number) -> nullable, from pg_attribute; column metadata rarely changes.
        self.pg_nullable: dict[tuple[int, int], bool] = {}
        #: Where keyed writes are recorded; None when the profile names no idempotency table.
        self.idempotency: IdempotencyTable | None = (
            IdempotencyTable(profile.idempotency_table, profile.idempotency_ttl_seconds)
            if profile.idempotency_table else None)

    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = self._create_engine()
            return self._engine

    def password(self) -> str | None:
        profile = self.profile
        if profile.password_env:
            value = os.environ.get(profile.password_env)
            if value is None:
                raise FailedPrecondition(
                    f"database profile '{profile.name}': environment variable {profile.password_env} is not set",
                    reason="MISSING_SECRET",
                )
            return value
        if profile.password_file:
            try:
                with open(profile.password_file, encoding="utf-8") as f:
                    return f.read().strip()
            except OSError as exc:
                raise FailedPrecondition(
                    f"database profile '{profile.name}': password_file cannot be read ({exc.strerror})",
                    reason="MISSING_SECRET",
                ) from None
        return None

    def _create_engine(self) -> Engine:
        profile = self.profile
        url = make_url(profile.url)
        password = self.password()
        if password is not None:
            self.secrets.append(password)
        # A ping per checkout finds connections a network or server dropped; an SQLite file has none
        # to drop, and no ping statement works on every ODBC source.
        kwargs: dict[str, Any] = {"pool_pre_ping": self.dialect not in ("odbc", "sqlite")}
        dialect_cls: Any = url.get_dialect()
        if issubclass(dialect_cls.get_pool_class(url), QueuePool):
            kwargs.update(pool_size=profile.pool_size, max_overflow=0, pool_timeout=30)
        connect_args: dict[str, Any] = dict(profile.options)
        if profile.odbc_connect is not None:
            kwargs["creator"] = self._odbc_creator(profile.odbc_connect, password)
            # The creator connects; the URL only names the dialect.
            url = make_url(f"{url.drivername}://")
        elif password is not None:
            url = url.set(password=password)
        if self.dialect == "postgresql":
            connect_args.setdefault("connect_timeout", _PG_CONNECT_TIMEOUT_SECONDS)
            connect_args["cursor_factory"] = _SingleStatementCursor
            # No server-side prepared statements of psycopg's own: DISCARD ALL drops them on every return
            # to the pool, and psycopg's cache does not always notice (it would then EXECUTE a missing one).
            connect_args["prepare_threshold"] = None
            if profile.read_only:
                connect_args["options"] = f"{connect_args.get('options', '')} {PG_READ_ONLY_OPTION}".strip()
        if connect_args and profile.odbc_connect is None:
            kwargs["connect_args"] = connect_args
        engine = sa.create_engine(url, **kwargs)
        if self.dialect == "sqlite":
            @event.listens_for(engine, "connect")
            def _sqlite_guard(dbapi_conn: sqlite3.Connection, record: Any) -> None:
                if profile.read_only:
                    dbapi_conn.execute("PRAGMA query_only = ON")
                guard = SqliteGuard(profile.read_only)
                dbapi_conn.set_authorizer(guard.authorize)
                record.info[_SQLITE_GUARD] = guard
        if self.dialect == "postgresql" and profile.read_only:
            @event.listens_for(engine, "connect")
            def _read_only_connection(dbapi_conn: psycopg.Connection[Any], _record: Any) -> None:
                self._refuse_powerful_role(dbapi_conn)
                pg_prepare_read_only(dbapi_conn)
        if url.get_driver_name() == "pyodbc":
            @event.listens_for(engine, "connect")
            def _remember_dbms(dbapi_conn: Any, record: Any) -> None:
                import pyodbc

                # Which server is behind the driver decides how a connection is reset (see RequestConnection.close).
                with contextlib.suppress(pyodbc.Error):
                    record.info[_ODBC_DBMS] = str(dbapi_conn.getinfo(pyodbc.SQL_DBMS_NAME))
        if url.get_driver_name() == "pyodbc" and profile.odbc_connect is None and profile.statement_timeout_seconds:
            @event.listens_for(engine, "connect")
            def _query_timeout(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.timeout = math.ceil(profile.statement_timeout_seconds or 0)

        @event.listens_for(engine, "before_cursor_execute")
        def _remember_cursor(conn: Connection, cursor: Any, *_: Any) -> None:
            # What `RequestConnection.interrupt` cancels, for drivers that cancel per cursor (ODBC).
            conn.info["onprem_cursor"] = cursor

        if self.dialect == "postgresql" and profile.read_only:
            @event.listens_for(engine, "after_cursor_execute")
            def _remember_tag(conn: Connection, cursor: Any, *_: Any) -> None:
                # The command tag, for the message when a statement ended the read-only transaction:
                # SQLAlchemy closes the cursor of a statement without rows before the caller sees it.
                conn.info[COMMAND_TAG] = cursor.statusmessage

        return engine

    def _refuse_powerful_role(self, dbapi_conn: psycopg.Connection[Any]) -> None:
        """A read-only transaction still lets a superuser write files (COPY ... TO, lo_export) and run programs.

        So a read-only PostgreSQL profile must log in as a role that cannot: checked on every new connection.
        """
        row = dbapi_conn.execute(
            "SELECT current_user, rolsuper, pg_has_role('pg_write_server_files', 'MEMBER'),"
            " pg_has_role('pg_execute_server_program', 'MEMBER'),"
            " has_function_privilege('pg_catalog.lo_export(oid, text)', 'EXECUTE')"
            " FROM pg_catalog.pg_roles WHERE rolname = current_user"
        ).fetchone()
        dbapi_conn.rollback()
        if row is not None and any(row[1:]):
            what = "is a superuser" if row[1] else "may write server files or run server programs (COPY ... TO a " \
                "file, COPY ... PROGRAM, lo_export)"
            raise FailedPrecondition(
                f"database profile '{self.profile.name}' is read_only, but its role '{row[0]}' {what}, which a "
                "read-only transaction does not stop; log in as a role without these rights",
                reason="READ_ONLY_PROFILE",
            )

    def odbc_connect(self) -> Any:
        """A raw pyodbc connection, outside the pool and the dialect (whose first queries are its own SQL)."""
        assert self.profile.odbc_connect is not None
        password = self.password()
        if password is not None and password not in self.secrets:
            self.secrets.append(password)
        return self._odbc_creator(self.profile.odbc_connect, password)()

    def _odbc_creator(self, connect: str, password: str | None) -> Any:
        import pyodbc

        text = connect if password is None else f"{connect};PWD={odbc.quote_value(password)}"
        timeout = self.profile.statement_timeout_seconds

        def create() -> Any:
            conn = pyodbc.connect(text, autocommit=False, timeout=_ODBC_LOGIN_TIMEOUT_SECONDS)
            if timeout:
                try:
                    conn.timeout = math.ceil(timeout)  # SQL_ATTR_QUERY_TIMEOUT, whole seconds
                except pyodbc.Error:
                    # psqlODBC refuses the attribute on a connection; PostgreSQL enforces its own.
                    if conn.getinfo(pyodbc.SQL_DBMS_NAME) != "PostgreSQL":
                        conn.close()
                        raise FailedPrecondition(
                            f"database profile '{self.profile.name}': the ODBC driver supports no query timeout; "
                            "remove statement_timeout_seconds or use another driver",
                            reason="UNSUPPORTED_OPTION",
                        ) from None
                    conn.execute(f"SET statement_timeout = {max(1, int(timeout * 1000))}")
                    conn.commit()
            return conn

        return create

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self._engine is not None:
            self._engine.dispose()


class RequestConnection:
    """One request's pooled connection and transaction.

    Its methods block and run in the profile's thread pool, one at a time, so
    nothing here needs a lock; only `interrupt` runs concurrently, by design.
    Every statement of the request runs inside `guarded()`, which checks
    after it that a read-only profile is still in its read-only transaction.
    """

    def __init__(self, runtime: ProfileRuntime) -> None:
        self.runtime = runtime
        self.profile = runtime.profile
        self.dialect = runtime.dialect
        self.conn: Connection | None = None
        self.dbapi: Any = None
        self.busy: concurrent.futures.Future[Any] | None = None
        #: The read-only PostgreSQL transaction of this request, once begun.
        self.pg_guard: PgReadOnlyTransaction | None = None
        #: The SQLite connection's authorizer state.
        self.sqlite_guard: SqliteGuard | None = None
        #: Close the connection instead of pooling it.
        self._discard = False
        #: Set by `interrupt`: no further statement of this request may start. A cancel that reaches
        #: the server between two statements (while connecting, or between BEGIN and the query)
        #: cancels nothing there, so the next statement must not be sent at all.
        self.interrupted = False
        #: A keyed write commits only once its record is written (`commit`), not at `end`.
        self.commit_deferred = False

    def connect(self) -> None:
        self.conn = self.runtime.engine().connect()
        self.dbapi = self.conn.connection.driver_connection
        self.sqlite_guard = self.conn.connection.info.get(_SQLITE_GUARD)

    def connection(self) -> Connection:
        if self.conn is None:
            raise Internal("database step ran before connect()", reason="HANDLER_BUG")
        return self.conn

    def begin(self) -> None:
        """Apply the profile's limits to the transaction about to start."""
        conn = self.connection()
        if not conn.in_transaction():
            conn.begin()  # so that commit() reaches the driver even when only raw cursors ran
        timeout = self.profile.statement_timeout_seconds
        timeout_ms = max(1, int(timeout * 1000)) if timeout else None
        if self.dialect == "postgresql":
            if self.profile.read_only:
                try:
                    self.pg_guard = PgReadOnlyTransaction.begin(conn.exec_driver_sql, self.dbapi, timeout_ms)
                except GuardMissing:
                    self._discard = True
                    raise
            elif timeout_ms:
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {timeout_ms}")
        elif self.dialect == "sqlite" and isinstance(self.dbapi, sqlite3.Connection):
            if timeout:
                deadline = time.monotonic() + timeout
                self.dbapi.set_progress_handler(lambda: int(time.monotonic() > deadline), _SQLITE_PROGRESS_STEPS)
            if self.profile.read_only and self.sqlite_guard is not None:
                self.sqlite_guard.begin(self.dbapi)

    @contextlib.contextmanager
    def guarded(self, what: str) -> Iterator[list[str | None]]:
        """Run one of the request's statements (or fetch from it), then check the transaction.

        Yields a one-element list where the caller may put the statement's command tag, for the message.
        A statement that broke out of a read-only transaction ends the request with FAILED_PRECONDITION
        here, before any next statement runs. Costs no round trip: psycopg already holds the
        transaction status and the reported settings, and sqlite3 its `in_transaction`.
        """
        if self.interrupted:
            raise Cancelled("the request was cancelled before the statement started", reason="CANCELLED")
        tag: list[str | None] = [None]
        try:
            yield tag
        except Exception as exc:
            if self.pg_guard is not None:
                self.pg_guard.after_error(what, exc)
            elif self.sqlite_guard is not None:
                self.sqlite_guard.after_error(what)
            raise
        if self.pg_guard is not None:
            self.pg_guard.check(what, tag[0])
        elif self.sqlite_guard is not None:
            self.sqlite_guard.check(self.dbapi, what)

    def end(self, commit: bool) -> None:
        """Commit a read-write profile's work; anything else is rolled back by `close`, with the reset."""
        if commit and not self.profile.read_only and not self.commit_deferred:
            self.commit()
        self._clear_deadline()

    def commit(self) -> None:
        """Commit the request's work (a keyed write's `end` leaves that to its runner, after the record)."""
        failpoints.hit("database.before_commit")
        self.connection().commit()
        failpoints.hit("database.after_commit")

    def _clear_deadline(self) -> None:
        if isinstance(self.dbapi, sqlite3.Connection) and self.profile.statement_timeout_seconds:
            self.dbapi.set_progress_handler(None, 0)

    def interrupt(self) -> None:
        """Cancel the running statement on the server, and any later one; called from another thread.

        Called again until the step returns (`DatabaseHandler._interrupt`): the flag stops a statement
        that had not started, and a cancel that came just before a statement reached the server is sent
        once more for it.
        """
        self.interrupted = True
        dbapi = self.dbapi
        if isinstance(dbapi, psycopg.Connection):
            dbapi.cancel_safe(timeout=5)
        elif isinstance(dbapi, sqlite3.Connection):
            dbapi.interrupt()
        elif self.conn is not None:
            cursor = self.conn.info.get("onprem_cursor")
            if cursor is not None and hasattr(cursor, "cancel"):
                cursor.cancel()  # pyodbc: SQLCancel, which unblocks the executing thread

    def release(self) -> None:
        """Extra cleanup of subclasses (open results) before the connection goes back."""

    def close(self) -> None:
        """Give the connection back to the pool rolled back and reset, or close it; never raises."""
        with contextlib.suppress(Exception):
            self.release()
        conn, self.conn = self.conn, None  # closing twice is a no-op
        self.pg_guard = None
        if conn is None:
            return
        conn.info.pop("onprem_cursor", None)
        try:
            keep = self._reset(conn) and not self._discard
            self._clear_deadline()
        except Exception as exc:  # a connection that cannot be reset must not go back to the pool
            log.warning("database profile %r: discarding a connection that failed to reset: %s",
                        self.profile.name, scrub(first_lines(str(exc)), self.runtime.secrets))
            keep = False
        if not keep:
            with contextlib.suppress(Exception):
                conn.invalidate()
        with contextlib.suppress(Exception):
            conn.close()

    def _reset(self, conn: Connection) -> bool:
        """Roll back and reset the session state; False when the connection must be closed instead.

        PostgreSQL: `reset_postgres` (DISCARD ALL or its equivalent). SQLite: a connection on which a
        statement left state (temporary objects, ATTACH, a PRAGMA setting) is closed. ODBC: PostgreSQL
        behind psqlODBC gets DISCARD ALL; other servers only the rollback (no portable reset exists).
        """
        dbapi = self.dbapi
        if isinstance(dbapi, psycopg.Connection):
            if dbapi.info.transaction_status in (psycopg.pq.TransactionStatus.ACTIVE,
                                                 psycopg.pq.TransactionStatus.UNKNOWN):
                # Stuck in a COPY the caller started, or broken (its backend ended): nothing to reset.
                return False
            reset_postgres(dbapi, self.profile.read_only)
            conn.rollback()  # SQLAlchemy's own transaction state; the driver is idle already
            return True
        if isinstance(dbapi, sqlite3.Connection) and self.sqlite_guard is not None:
            guard = self.sqlite_guard
            with guard.ours():  # the driver's own ROLLBACK, even where SQLAlchemy thinks none is needed
                dbapi.rollback()
                conn.rollback()
            guard.refused = None
            return not guard.dirty
        conn.rollback()
        if conn.connection.info.get(_ODBC_DBMS) == "PostgreSQL":
            self._reset_odbc_postgres(dbapi)
        return True

    def _reset_odbc_postgres(self, dbapi: Any) -> None:
        dbapi.autocommit = True
        try:
            dbapi.execute("DISCARD ALL")
            timeout = self.profile.statement_timeout_seconds
            if timeout:  # set per session by the creator (psqlODBC has no query timeout): again after RESET ALL
                dbapi.execute(f"SET statement_timeout = {max(1, int(timeout * 1000))}")
        finally:
            dbapi.autocommit = False

    @property
    def closed(self) -> bool:
        return self.conn is None
