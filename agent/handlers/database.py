"""Runs SQL against the agent's database profiles and streams typed, columnar results.

Every blocking driver call runs in the profile's own bounded thread pool, one
step at a time (connect, execute, fetch a batch, finish), so the event loop
never waits on a database and a result of any size streams in bounded memory.
When the request is cancelled during a step the statement is cancelled on the
server (psycopg `cancel_safe`, sqlite3 `interrupt`), the step is awaited, and
the connection goes back to the pool rolled back.

Column types are fixed by the header, which is sent after the first batch has
been fetched: the driver's type when it reports one (PostgreSQL OIDs), else the
first non-null value of the column in that batch, else UNSPECIFIED (text).
A column whose values disagree within that first batch is sent as STRING. A
later value that does not fit its column is converted when that loses nothing
(an int in a DOUBLE column, any value in a text-encoded column) and otherwise
fails the request with FAILED_PRECONDITION, asking for a CAST: quietly sending
a different type than the header promised would be worse.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa
from psycopg.postgres import types as pg_types
from sqlalchemy import event
from sqlalchemy.engine import Connection, CursorResult, Engine, make_url
from sqlalchemy.pool import QueuePool

from agent.handlers.base import RequestContext
from agent.profiles import DatabaseProfile
from onprem.v1 import database_pb2, profiles_pb2, tunnel_pb2, values_pb2
from tunnel.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RequestError,
    ResourceExhausted,
    Unavailable,
)

__all__ = ["DatabaseHandler"]

log = logging.getLogger(__name__)
T = TypeVar("T")
VT = values_pb2.ValueType

_FIRST_FETCH_ROWS = 200
_MAX_FETCH_ROWS = 5000
#: How long a cancelled step may take to notice the server-side cancel.
_CANCEL_GRACE_SECONDS = 10.0
_PG_CONNECT_TIMEOUT_SECONDS = 10


class _SingleStatementCursor(psycopg.Cursor[Any]):
    """A psycopg cursor that always uses the extended query protocol.

    Without parameters psycopg sends SQL with the simple protocol, which runs
    `SELECT 1; COMMIT; INSERT ...` as three statements: the COMMIT would end the
    READ ONLY transaction of a read-only profile. The extended protocol makes
    the server refuse more than one statement.
    """

    def _execute_send(self, query: Any, *, force_extended: bool = False, binary: bool | None = None) -> None:
        super()._execute_send(query, force_extended=True, binary=binary)


# --- errors -------------------------------------------------------------------------------------

# SQLSTATE prefix -> (error class, reason), most specific first.
_SQLSTATE_TABLE: tuple[tuple[str, type[RequestError], str], ...] = (
    ("25006", FailedPrecondition, "READ_ONLY_PROFILE"),
    ("57014", DeadlineExceeded, "STATEMENT_TIMEOUT"),
    ("23505", AlreadyExists, "UNIQUE_VIOLATION"),
    ("42501", PermissionDenied, "INSUFFICIENT_PRIVILEGE"),
    ("57P0", Unavailable, "DATABASE_UNAVAILABLE"),
    ("08", Unavailable, "DATABASE_UNAVAILABLE"),
    ("23", FailedPrecondition, "INTEGRITY_VIOLATION"),
    ("42", InvalidArgument, "SQL_ERROR"),
    ("22", InvalidArgument, "INVALID_DATA"),
    ("0A", InvalidArgument, "SQL_ERROR"),
    ("40", Aborted, "TRANSACTION_CONFLICT"),
    ("53", ResourceExhausted, "DATABASE_RESOURCES"),
    ("28", Unavailable, "DATABASE_AUTH_FAILED"),
)

# SQLite reports no SQLSTATE: (message fragment, error class, reason), first match wins.
_SQLITE_TABLE: tuple[tuple[str, type[RequestError], str], ...] = (
    ("readonly database", FailedPrecondition, "READ_ONLY_PROFILE"),
    ("not authorized", FailedPrecondition, "READ_ONLY_PROFILE"),
    ("unique constraint failed", AlreadyExists, "UNIQUE_VIOLATION"),
    ("constraint failed", FailedPrecondition, "INTEGRITY_VIOLATION"),
    ("unable to open database", Unavailable, "DATABASE_UNAVAILABLE"),
    ("database is locked", Unavailable, "DATABASE_LOCKED"),
    ("interrupted", DeadlineExceeded, "STATEMENT_TIMEOUT"),
    ("syntax error", InvalidArgument, "SQL_ERROR"),
    ("no such", InvalidArgument, "SQL_ERROR"),
    ("one statement at a time", InvalidArgument, "SQL_ERROR"),
    ("incomplete input", InvalidArgument, "SQL_ERROR"),
    ("binding", InvalidArgument, "SQL_ERROR"),
    ("has no column", InvalidArgument, "SQL_ERROR"),
    ("already exists", InvalidArgument, "SQL_ERROR"),
)


def _map_error(exc: BaseException, profile: DatabaseProfile, secrets: Sequence[str], connecting: bool) -> RequestError:
    """Turn a driver error into the RequestError the caller gets; the one table lookup."""
    if isinstance(exc, RequestError):
        return exc
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None else exc
    message = _scrub(_first_lines(str(orig)), secrets)
    if connecting or (isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated):
        return Unavailable(
            f"database profile '{profile.name}' ({profile.display_url()}) is unreachable: {message}",
            reason="DATABASE_UNAVAILABLE",
        )
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        for prefix, cls, reason in _SQLSTATE_TABLE:
            if sqlstate.startswith(prefix):
                return cls(f"{message} (SQLSTATE {sqlstate})", reason=reason)
        return Internal(f"{message} (SQLSTATE {sqlstate})", reason="DATABASE_ERROR")
    if isinstance(orig, psycopg.OperationalError):  # no SQLSTATE: the connection broke
        return Unavailable(
            f"database profile '{profile.name}' ({profile.display_url()}) failed: {message}",
            reason="DATABASE_UNAVAILABLE",
        )
    if isinstance(orig, sqlite3.Error):
        lowered = message.lower()
        for fragment, cls, reason in _SQLITE_TABLE:
            if fragment in lowered:
                return cls(message, reason=reason)
    if isinstance(exc, sa.exc.StatementError | sa.exc.ArgumentError):
        return InvalidArgument(message, reason="SQL_ERROR")
    return Internal(f"database profile '{profile.name}': {message}", reason="DATABASE_ERROR")


def _first_lines(text: str) -> str:
    # Driver messages append the SQL and a caret line; the first lines say what went wrong.
    return " ".join(line.strip() for line in text.strip().splitlines()[:2])


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


# --- values -------------------------------------------------------------------------------------


def _bind_value(name: str, value: values_pb2.Value, dialect: str) -> Any:
    """Convert one bound parameter to the Python value the driver binds."""
    kind = value.WhichOneof("kind")
    try:
        if kind is None:
            raise InvalidArgument(f"parameter '{name}' has no value set; use null_value for NULL", reason="INVALID_PARAMETER")
        if kind == "null_value":
            return None
        if kind in ("bool_value", "int64_value", "double_value", "string_value", "json_value"):
            return getattr(value, kind)
        if kind == "bytes_value":
            return bytes(value.bytes_value)
        converted: Any
        if kind == "decimal_value":
            converted = Decimal(value.decimal_value)
        elif kind == "date_value":
            converted = date.fromisoformat(value.date_value)
        elif kind == "time_value":
            converted = time.fromisoformat(value.time_value)
        elif kind == "timestamp_value":
            converted = datetime.fromisoformat(value.timestamp_value)
        elif kind == "uuid_value":
            converted = uuid.UUID(value.uuid_value)
        else:
            raise InvalidArgument(f"parameter '{name}' has an unsupported kind {kind}", reason="INVALID_PARAMETER")
    except (ValueError, InvalidOperation):
        raise InvalidArgument(
            f"parameter '{name}': {getattr(value, kind or '')!r} is not a valid {kind}", reason="INVALID_PARAMETER"
        ) from None
    # sqlite3 has no adapters for these (and deprecated the date ones): bind their text forms.
    if dialect == "sqlite":
        return converted.isoformat() if isinstance(converted, date | time) else str(converted)
    return converted


def _pg_type_table() -> dict[int, tuple[int, str]]:
    """PostgreSQL type OID -> (ValueType, type name), from psycopg's registry."""
    by_name = {
        "bool": VT.VALUE_TYPE_BOOL, "int2": VT.VALUE_TYPE_INT64, "int4": VT.VALUE_TYPE_INT64,
        "int8": VT.VALUE_TYPE_INT64, "oid": VT.VALUE_TYPE_INT64, "float4": VT.VALUE_TYPE_DOUBLE,
        "float8": VT.VALUE_TYPE_DOUBLE, "numeric": VT.VALUE_TYPE_DECIMAL, "text": VT.VALUE_TYPE_STRING,
        "varchar": VT.VALUE_TYPE_STRING, "bpchar": VT.VALUE_TYPE_STRING, "name": VT.VALUE_TYPE_STRING,
        "char": VT.VALUE_TYPE_STRING, "bytea": VT.VALUE_TYPE_BYTES, "date": VT.VALUE_TYPE_DATE,
        "time": VT.VALUE_TYPE_TIME, "timetz": VT.VALUE_TYPE_TIME, "timestamp": VT.VALUE_TYPE_TIMESTAMP,
        "timestamptz": VT.VALUE_TYPE_TIMESTAMP_TZ, "interval": VT.VALUE_TYPE_INTERVAL,
        "uuid": VT.VALUE_TYPE_UUID, "json": VT.VALUE_TYPE_JSON, "jsonb": VT.VALUE_TYPE_JSON,
    }
    table: dict[int, tuple[int, str]] = {}
    for info in pg_types:
        table[info.oid] = (by_name.get(info.name, VT.VALUE_TYPE_UNSPECIFIED), info.name)
        if info.array_oid:
            table[info.array_oid] = (VT.VALUE_TYPE_ARRAY, f"{info.name}[]")
    return table


_PG_TYPES = _pg_type_table()

# Python type -> ValueType, checked in order: bool before int, datetime before date.
_PY_TYPES: tuple[tuple[type | tuple[type, ...], int], ...] = (
    (bool, VT.VALUE_TYPE_BOOL),
    (int, VT.VALUE_TYPE_INT64),
    (float, VT.VALUE_TYPE_DOUBLE),
    (Decimal, VT.VALUE_TYPE_DECIMAL),
    (str, VT.VALUE_TYPE_STRING),
    ((bytes, bytearray, memoryview), VT.VALUE_TYPE_BYTES),
    (datetime, VT.VALUE_TYPE_TIMESTAMP),
    (date, VT.VALUE_TYPE_DATE),
    (time, VT.VALUE_TYPE_TIME),
    (timedelta, VT.VALUE_TYPE_INTERVAL),
    (uuid.UUID, VT.VALUE_TYPE_UUID),
    (dict, VT.VALUE_TYPE_JSON),
    ((list, tuple), VT.VALUE_TYPE_ARRAY),
)


def _type_of_value(value: Any) -> int:
    for py, vt in _PY_TYPES:
        if isinstance(value, py):
            if vt == VT.VALUE_TYPE_TIMESTAMP and getattr(value, "tzinfo", None) is not None:
                return VT.VALUE_TYPE_TIMESTAMP_TZ
            return vt
    return VT.VALUE_TYPE_UNSPECIFIED


def _iso_duration(value: timedelta) -> str:
    micros = abs(value.days * 86_400_000_000 + value.seconds * 1_000_000 + value.microseconds)
    days, micros = divmod(micros, 86_400_000_000)
    hours, micros = divmod(micros, 3_600_000_000)
    minutes, micros = divmod(micros, 60_000_000)
    seconds, micros = divmod(micros, 1_000_000)
    secs = f"{seconds}.{micros:06d}".rstrip("0") if micros else str(seconds)
    sign = "-" if value < timedelta(0) else ""
    return f"{sign}P{days}DT{hours}H{minutes}M{secs}S"


def _json_default(value: Any) -> Any:
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, timedelta):
        return _iso_duration(value)
    return str(value)  # Decimal (as text, never through a float), UUID, anything else


def _text(value: Any) -> str:
    """The canonical text form of any value, for the text-encoded ValueTypes."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f") if value.is_finite() else str(value)
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return _iso_duration(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=_json_default)
    return str(value)


class _Misfit(Exception):
    """A value that its column's ValueType cannot carry without loss."""


def _fill(column: values_pb2.ColumnValues, vt: int, values: list[Any]) -> None:
    """Write one column of a batch into `column`, with placeholders for NULLs."""
    if any(v is None for v in values):
        column.nulls.extend(v is None for v in values)
    if vt == VT.VALUE_TYPE_BOOL:
        if not all(v is None or isinstance(v, bool) for v in values):
            raise _Misfit
        column.bool_values.extend(bool(v) for v in values)
    elif vt == VT.VALUE_TYPE_INT64:
        if not all(v is None or (isinstance(v, int) and -(2**63) <= v < 2**63) for v in values):
            raise _Misfit
        column.int64_values.extend(0 if v is None else int(v) for v in values)
    elif vt == VT.VALUE_TYPE_DOUBLE:
        # An int joins a DOUBLE column only when the float holds it exactly.
        if not all(v is None or isinstance(v, float) or (type(v) is int and float(v) == v) for v in values):
            raise _Misfit
        column.double_values.extend(0.0 if v is None else float(v) for v in values)
    elif vt == VT.VALUE_TYPE_BYTES:
        if not all(v is None or isinstance(v, bytes | bytearray | memoryview) for v in values):
            raise _Misfit
        column.bytes_values.extend(b"" if v is None else bytes(v) for v in values)
    elif vt in (VT.VALUE_TYPE_JSON, VT.VALUE_TYPE_ARRAY):
        # A JSON column's value may be any JSON scalar too, so encode by column, not by value.
        column.string_values.extend("" if v is None else json.dumps(v, default=_json_default) for v in values)
    else:
        column.string_values.extend("" if v is None else _text(v) for v in values)


def _choose_types(described: list[int], rows: Sequence[Sequence[Any]]) -> list[int]:
    chosen = []
    for i, vt in enumerate(described):
        if vt != VT.VALUE_TYPE_UNSPECIFIED:
            chosen.append(vt)
            continue
        seen = {_type_of_value(row[i]) for row in rows if row[i] is not None}
        if not seen:
            chosen.append(VT.VALUE_TYPE_UNSPECIFIED)
        elif len(seen) == 1:
            chosen.append(seen.pop())
        elif seen == {VT.VALUE_TYPE_INT64, VT.VALUE_TYPE_DOUBLE}:
            chosen.append(VT.VALUE_TYPE_DOUBLE)
        else:
            chosen.append(VT.VALUE_TYPE_STRING)
    return chosen


# --- one statement ------------------------------------------------------------------------------


class _Statement:
    """One request's connection, result and progress.

    Its methods block and run in the profile's thread pool, one at a time, so
    nothing here needs a lock; only `interrupt` runs concurrently, by design.
    """

    def __init__(self, runtime: _Runtime, query: database_pb2.QueryRequest, max_chunk_bytes: int) -> None:
        self.runtime = runtime
        self.profile = runtime.profile
        self.max_chunk_bytes = max_chunk_bytes
        self.statement = sa.text(query.sql)
        self.params = self._bind(query)
        caps = [c for c in (query.max_rows, self.profile.max_rows) if c]
        self.cap: int | None = min(caps) if caps else None
        self.conn: Connection | None = None
        self.dbapi: Any = None
        self.result: CursorResult[Any] | None = None
        self.types: list[int] = []
        self.description: list[Any] = []
        self.row_count = 0
        self.rows_affected = -1
        self.truncated = False
        self.done = False
        self.fetch_rows = _FIRST_FETCH_ROWS
        self.busy: concurrent.futures.Future[Any] | None = None

    def _bind(self, query: database_pb2.QueryRequest) -> dict[str, Any]:
        if not query.sql.strip():
            raise InvalidArgument("the SQL text is empty", reason="SQL_ERROR")
        wanted = set(self.statement.compile().params)
        for name in sorted(wanted - set(query.parameters)):
            raise InvalidArgument(f"parameter '{name}' is used by the statement but not given", reason="INVALID_PARAMETER")
        for name in sorted(set(query.parameters) - wanted):
            # SQLAlchemy reads `:name::type` as literal text, not as a parameter.
            hint = f"; write CAST(:{name} AS type) instead of :{name}::type" if f":{name}::" in query.sql else ""
            raise InvalidArgument(
                f"parameter '{name}' is given but the statement has no ':{name}'{hint}", reason="INVALID_PARAMETER"
            )
        dialect = self.profile.dialect
        return {name: _bind_value(name, value, dialect) for name, value in query.parameters.items()}

    @property
    def is_postgres(self) -> bool:
        return self.profile.dialect == "postgresql"

    def connect(self) -> None:
        self.conn = self.runtime.engine().connect()
        self.dbapi = self.conn.connection.driver_connection

    def _connection(self) -> Connection:
        if self.conn is None:
            raise Internal("database step ran before connect()", reason="HANDLER_BUG")
        return self.conn

    def _begin(self) -> None:
        conn = self._connection()
        if not self.is_postgres:
            return  # SQLite's read-only mode is set per connection, on connect
        if self.profile.read_only:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
        if self.profile.statement_timeout_seconds:
            millis = max(1, int(self.profile.statement_timeout_seconds * 1000))
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {millis}")

    def execute(self) -> None:
        conn = self._connection()
        self._begin()
        if self.is_postgres:
            try:
                # A server-side cursor streams rows in bounded memory...
                self.result = conn.execute(self.statement, self.params, execution_options={"stream_results": True})
            except sa.exc.DBAPIError as exc:
                # ...but PostgreSQL declares cursors only for SELECT/VALUES: DML, DDL and writable
                # CTEs fail to DECLARE without having run, so run them again with a plain cursor.
                if getattr(exc.orig, "sqlstate", None) not in ("42601", "0A000"):
                    raise
                conn.rollback()
                self._begin()
                self.result = conn.execute(self.statement, self.params)
            status = getattr(self.result.cursor, "statusmessage", None) or ""
            if status.split(" ")[0] in ("INSERT", "UPDATE", "DELETE", "MERGE"):
                self.rows_affected = self.result.rowcount
        else:
            self.result = conn.execute(self.statement, self.params)
        if self.result.returns_rows:
            # Kept now: the result lets go of its cursor once the last row is fetched.
            self.description = list(self.result.cursor.description or ())
        else:
            self.rows_affected = self.result.rowcount
            self.done = True

    def header(self, first_rows: Sequence[Sequence[Any]]) -> tunnel_pb2.ResponseChunk:
        """Fix the column types from the driver's description and the first rows."""
        columns: list[values_pb2.Column] = []
        described: list[int] = []
        unknown: tuple[int, str] = (VT.VALUE_TYPE_UNSPECIFIED, "")
        for desc in self.description:
            type_code = desc[1]
            vt, db_type = (
                _PG_TYPES.get(type_code, unknown) if self.is_postgres and isinstance(type_code, int) else unknown
            )
            described.append(vt)
            columns.append(values_pb2.Column(name=desc[0], database_type=db_type, nullable=desc[6] is not False))
        self.types = _choose_types(described, first_rows)
        for column, vt in zip(columns, self.types, strict=True):
            column.type = vt  # type: ignore[assignment]
        return tunnel_pb2.ResponseChunk(query=database_pb2.QueryResponse(header=database_pb2.QueryHeader(columns=columns)))

    def fetch(self) -> list[Sequence[Any]]:
        """Fetch the next rows, respecting the row cap; marks the end of the result."""
        if self.done or self.result is None:
            return []
        want = self.fetch_rows
        if self.cap is not None:
            remaining = self.cap - self.row_count
            if remaining <= 0:
                # One more row tells whether the cap cut anything off.
                self.truncated = bool(self.result.fetchmany(1))
                self.done = True
                return []
            want = min(want, remaining)
        rows: list[Sequence[Any]] = list(self.result.fetchmany(want))
        if len(rows) < want and (self.cap is None or self.row_count + len(rows) < self.cap):
            self.done = True
        self.row_count += len(rows)
        return rows

    def batches(self, rows: Sequence[Sequence[Any]]) -> list[tunnel_pb2.ResponseChunk]:
        """Encode rows as RowBatch chunks, halving until each fits in max_chunk_bytes."""
        if not rows:
            return []
        chunk = tunnel_pb2.ResponseChunk(query=database_pb2.QueryResponse(rows=self._encode(rows)))
        size = chunk.ByteSize()
        if size <= self.max_chunk_bytes:
            # Aim the next fetch at about three quarters of a chunk.
            per_row = max(1, size // len(rows))
            self.fetch_rows = max(1, min(_MAX_FETCH_ROWS, (self.max_chunk_bytes * 3 // 4) // per_row))
            return [chunk]
        if len(rows) == 1:
            raise ResourceExhausted(
                f"row {self.row_count} is {size} bytes encoded, above the chunk limit of {self.max_chunk_bytes}",
                reason="ROW_TOO_LARGE",
            )
        half = len(rows) // 2
        return self.batches(rows[:half]) + self.batches(rows[half:])

    def _encode(self, rows: Sequence[Sequence[Any]]) -> values_pb2.RowBatch:
        batch = values_pb2.RowBatch(row_count=len(rows))
        for i, vt in enumerate(self.types):
            values = [row[i] for row in rows]
            try:
                _fill(batch.columns.add(), vt, values)
            except _Misfit:
                name = self.description[i][0]
                raise FailedPrecondition(
                    f"column '{name}' holds values of another type than {VT.Name(vt)} (chosen from its first rows); "
                    "CAST it in the SQL to one type",
                    reason="MIXED_COLUMN_TYPES",
                ) from None
        return batch

    def first(self) -> list[tunnel_pb2.ResponseChunk]:
        rows = self.fetch()
        return [self.header(rows), *self.batches(rows)]

    def next(self) -> list[tunnel_pb2.ResponseChunk]:
        return self.batches(self.fetch())

    def finish(self) -> tunnel_pb2.ResponseChunk:
        conn = self._connection()
        if self.result is not None:
            self.result.close()
        if self.profile.read_only:
            conn.rollback()
        else:
            conn.commit()
        summary = database_pb2.QuerySummary(
            row_count=self.row_count, rows_affected=self.rows_affected, truncated=self.truncated
        )
        return tunnel_pb2.ResponseChunk(query=database_pb2.QueryResponse(summary=summary))

    def interrupt(self) -> None:
        """Cancel the running statement on the server; called from another thread."""
        dbapi = self.dbapi
        if isinstance(dbapi, psycopg.Connection):
            dbapi.cancel_safe(timeout=5)
        elif isinstance(dbapi, sqlite3.Connection):
            dbapi.interrupt()

    def close(self) -> None:
        """Give the connection back to the pool rolled back; never raises."""
        if self.result is not None:
            with contextlib.suppress(Exception):
                self.result.close()
        if self.conn is None:
            return
        try:
            self.conn.rollback()
            self.conn.close()
        except Exception as exc:  # a broken connection must not go back to the pool
            log.warning("database profile %r: discarding a connection that failed to roll back: %s",
                        self.profile.name, _scrub(_first_lines(str(exc)), self.runtime.secrets))
            with contextlib.suppress(Exception):
                self.conn.invalidate()
                self.conn.close()


# --- per profile --------------------------------------------------------------------------------


def _deny_writes(action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
    # query_only can be switched off by the statement itself, and ATTACH can create files:
    # refuse both so that a read-only SQLite profile stays read-only.
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and arg2 is not None and (arg1 or "").lower() in (
        "query_only", "writable_schema", "journal_mode", "locking_mode",
    ):
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


class _Runtime:
    """A profile's lazily created engine and its bounded thread pool."""

    def __init__(self, profile: DatabaseProfile) -> None:
        self.profile = profile
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

    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = self._create_engine()
            return self._engine

    def _password(self) -> str | None:
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
        url = make_url(self.profile.url)
        password = self._password()
        if password is not None:
            url = url.set(password=password)
            self.secrets.append(password)
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        dialect_cls: Any = url.get_dialect()
        if issubclass(dialect_cls.get_pool_class(url), QueuePool):
            kwargs.update(pool_size=self.profile.pool_size, max_overflow=0, pool_timeout=30)
        if url.get_backend_name() == "postgresql":
            kwargs["connect_args"] = {
                "connect_timeout": _PG_CONNECT_TIMEOUT_SECONDS,
                "cursor_factory": _SingleStatementCursor,
            }
        engine = sa.create_engine(url, **kwargs)
        if url.get_backend_name() == "sqlite" and self.profile.read_only:
            @event.listens_for(engine, "connect")
            def _read_only(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
                dbapi_conn.execute("PRAGMA query_only = ON")
                dbapi_conn.set_authorizer(_deny_writes)
        return engine

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self._engine is not None:
            self._engine.dispose()


# --- the handler --------------------------------------------------------------------------------


class DatabaseHandler:
    """Runs `DatabaseQuery` payloads against the configured database profiles."""

    def __init__(self, profiles: Mapping[str, DatabaseProfile]) -> None:
        self._profiles = dict(profiles)
        self._runtimes: dict[str, _Runtime] = {}

    def profiles(self) -> list[profiles_pb2.Profile]:
        return [
            profiles_pb2.Profile(
                name=p.name, kind=profiles_pb2.PROFILE_KIND_DATABASE, read_only=p.read_only, dialect=p.dialect
            )
            for p in self._profiles.values()
        ]

    def _runtime(self, name: str) -> _Runtime:
        runtime = self._runtimes.get(name)
        if runtime is None:
            profile = self._profiles.get(name)
            if profile is None:
                raise NotFound(f"database profile '{name}' is not configured on this agent", reason="PROFILE_NOT_FOUND")
            runtime = self._runtimes[name] = _Runtime(profile)
        return runtime

    async def handle(
        self, request: tunnel_pb2.RequestStart, context: RequestContext
    ) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        if request.WhichOneof("payload") != "database_query" or request.database_query.WhichOneof("operation") != "query":
            raise InvalidArgument("expected a database_query with a query", reason="INVALID_PAYLOAD")
        query = request.database_query.query
        runtime = self._runtime(query.profile)
        statement = _Statement(runtime, query, context.max_chunk_bytes)
        await runtime.slots.acquire()
        try:
            await self._step(statement, statement.connect, connecting=True)
            await self._step(statement, statement.execute)
            for chunk in await self._step(statement, statement.first):
                yield chunk
            while not statement.done:
                for chunk in await self._step(statement, statement.next):
                    yield chunk
            yield await self._step(statement, statement.finish)
        finally:
            await self._close(statement)

    async def check(self, profile: str) -> list[profiles_pb2.ProfileCheck]:
        """Connect and run a trivial statement; the error says what failed."""
        runtime = self._runtime(profile)

        def probe() -> None:
            with runtime.engine().connect() as conn:
                conn.execute(sa.text("SELECT 1"))

        try:
            await asyncio.get_running_loop().run_in_executor(runtime.executor, probe)
        except Exception as exc:
            error = _map_error(exc, runtime.profile, runtime.secrets, True)
            return [profiles_pb2.ProfileCheck(name="connect", ok=False, message=error.message)]
        return [profiles_pb2.ProfileCheck(
            name="connect", ok=True, message=f"connected to {runtime.profile.display_url()} and ran SELECT 1")]

    async def _step(self, statement: _Statement, fn: Callable[[], T], *, connecting: bool = False) -> T:
        """Run one blocking step in the profile's pool; on cancel, cancel it on the server."""
        runtime = statement.runtime
        future = statement.busy = runtime.executor.submit(fn)
        waiter = asyncio.wrap_future(future)
        try:
            return await asyncio.shield(waiter)
        except asyncio.CancelledError:
            if not future.cancel():
                await self._interrupt(statement, waiter)
            raise
        except Exception as exc:
            raise _map_error(exc, runtime.profile, runtime.secrets, connecting) from None

    async def _interrupt(self, statement: _Statement, waiter: asyncio.Future[Any]) -> None:
        try:
            await asyncio.to_thread(statement.interrupt)
        except Exception as exc:
            log.warning("database profile %r: could not cancel a statement: %s", statement.profile.name,
                        _scrub(_first_lines(str(exc)), statement.runtime.secrets))
        await asyncio.wait({waiter}, timeout=_CANCEL_GRACE_SECONDS)
        if waiter.done() and not waiter.cancelled():
            waiter.exception()  # retrieved: the cancelled statement's error is expected

    async def _close(self, statement: _Statement) -> None:
        """Close the statement and give its connection slot back (once the connection is back)."""
        runtime = statement.runtime
        busy = statement.busy
        if busy is not None and not busy.done():
            # The server ignored the cancel: close once the step returns, without waiting here.
            loop = asyncio.get_running_loop()

            def close_later(_: concurrent.futures.Future[Any]) -> None:
                try:
                    statement.close()
                finally:
                    loop.call_soon_threadsafe(runtime.slots.release)

            busy.add_done_callback(close_later)
            return
        try:
            closing = runtime.executor.submit(statement.close)
        except RuntimeError:  # aclose() already shut the pool down
            statement.close()
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
