"""One streamed statement: execute, then header, row batches sized by bytes, summary.

Column types are fixed by the header, which is sent after the first batch has
been fetched: the driver's type when it reports one (PostgreSQL OIDs, pyodbc
classes), else the first non-null value of the column in that batch, else
UNSPECIFIED (text). A column whose values disagree within that first batch is
sent as STRING. A later value that does not fit its column is converted when
that loses nothing (an int in a DOUBLE column, any value in a text-encoded
column) and otherwise fails the request with FAILED_PRECONDITION, asking for a
CAST: quietly sending a different type than the header promised would be worse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import CursorResult

from onprem.agent.handlers.database.engine import ProfileRuntime, RequestConnection
from onprem.agent.handlers.database.fetch_ahead import FetchAhead
from onprem.agent.handlers.database.statements import Parsed, for_driver, parse
from onprem.agent.handlers.database.values import Misfit, bind_value, choose_types, column_type, fill
from onprem.tunnel.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from onprem.v1 import database_pb2, tunnel_pb2, values_pb2

__all__ = ["Query", "bind_parameters"]

VT = values_pb2.ValueType

_FIRST_FETCH_ROWS = 200
_MAX_FETCH_ROWS = 5000
# Dialects whose streamed statements run on the driver's own cursor (`Query._execute_dbapi`). Not mssql:
# SQLAlchemy's SQL Server dialect adds behaviour around execute that no SQL Server here can check.
_DBAPI_DIALECTS = ("sqlite", "odbc")
# Statement tags whose row count is the rows affected (PostgreSQL's command status).
_DML_TAGS = ("INSERT", "UPDATE", "DELETE", "MERGE")


def bind_parameters(parsed: Parsed, given: Mapping[str, values_pb2.Value], dialect: str) -> dict[str, Any]:
    """Check the names against the statement's `:name`s and convert the values."""
    sql = parsed.text.text
    if not sql.strip():
        raise InvalidArgument("the SQL text is empty", reason="SQL_ERROR")
    wanted = parsed.names
    for name in sorted(wanted - set(given)):
        raise InvalidArgument(f"parameter '{name}' is used by the statement but not given", reason="INVALID_PARAMETER",
                              field=f"parameters.{name}")
    for name in sorted(set(given) - wanted):
        # SQLAlchemy reads `:name::type` as literal text, not as a parameter.
        hint = f"; write CAST(:{name} AS type) instead of :{name}::type" if f":{name}::" in sql else ""
        raise InvalidArgument(
            f"parameter '{name}' is given but the statement has no ':{name}'{hint}", reason="INVALID_PARAMETER"
        )
    return {name: bind_value(name, value, dialect) for name, value in given.items()}


# Types whose PostgreSQL text form already is (nearly) the canonical text values.proto asks for: loading
# them as text skips parsing into Python objects only to print them again (half the cost of a timestamp).
_TEXT_LOADED = ("numeric", "date", "time", "timetz", "timestamp", "timestamptz", "uuid", "json", "jsonb")
_TEXT_LOADER = psycopg.adapters.get_loader(psycopg.adapters.types["text"].oid, psycopg.pq.Format.TEXT)


def _load_as_text(cursor: Any) -> None:
    for name in _TEXT_LOADED:
        cursor.adapters.register_loader(name, _TEXT_LOADER)


class Query(RequestConnection):
    """A statement whose result streams as columnar batches of at most `max_chunk_bytes`.

    `wrap` builds the oneof message of the response stream (QueryResponse or
    PollChangesResponse), so that a change poll reuses the streaming unchanged.
    """

    def __init__(self, runtime: ProfileRuntime, statement: sa.TextClause | sa.Select[Any], params: dict[str, Any], max_chunk_bytes: int,
                 cap: int | None) -> None:
        super().__init__(runtime)
        self.statement = statement
        self.params = params
        self.max_chunk_bytes = max_chunk_bytes
        self.cap = cap
        self.result: CursorResult[Any] | None = None
        #: The DBAPI cursor the rows come from.
        self.cursor: Any = None
        #: A PostgreSQL server-side cursor's FETCHes, each sent before the rows of the last are encoded.
        self.ahead: FetchAhead | None = None
        self.types: list[int] = []
        self.description: list[Any] = []
        self.row_count = 0
        self.rows_affected = -1
        self.truncated = False
        self.done = False
        self.fetch_rows = _FIRST_FETCH_ROWS
        self.last_row: Sequence[Any] | None = None
        #: (table OID, column number) per column, 0s when computed: PostgreSQL only.
        self._origins: list[tuple[int, int]] = []
        #: PostgreSQL: stream rows from a server-side cursor (DML then runs again on a plain one).
        self.server_cursor = True

    @classmethod
    def from_request(cls, runtime: ProfileRuntime, query: database_pb2.QueryRequest, max_chunk_bytes: int) -> Query:
        parsed = parse(query.sql)
        params = bind_parameters(parsed, query.parameters, runtime.dialect)
        caps = [c for c in (query.max_rows, runtime.profile.max_rows) if c]
        return cls(runtime, parsed.text, params, max_chunk_bytes, min(caps) if caps else None)

    def wrap(self, **part: Any) -> Any:
        return tunnel_pb2.ResponseChunk(query=database_pb2.QueryResponse(**part))

    def rows_chunk(self) -> tuple[tunnel_pb2.ResponseChunk, values_pb2.RowBatch]:
        """An empty rows message and the batch inside it, filled in place: wrapping a filled batch copies it."""
        chunk = tunnel_pb2.ResponseChunk()
        return chunk, chunk.query.rows

    def execute(self) -> None:
        conn = self.connection()
        self.begin()
        if self.dialect == "postgresql":
            with self.guarded("the statement") as tag:
                tag[0] = self._execute_postgres()
            return
        if self.dialect in _DBAPI_DIALECTS and isinstance(self.statement, sa.TextClause):
            with self.guarded("the statement"):
                self._execute_dbapi()
            return
        # sqlite3 and pyodbc fetch from the database as the rows are asked for; SQLAlchemy's default
        # result does not buffer, so the rows can be read from its DBAPI cursor directly.
        with self.guarded("the statement"):
            self.result = conn.execute(self.statement, self.params)
        if self.result.returns_rows:
            self.cursor = self.result.cursor
            self.description = list(self.cursor.description or ())
        else:
            self.rows_affected = self.result.rowcount
            self.done = True

    def _execute_dbapi(self) -> None:
        """Run a text statement on the driver's own cursor (sqlite3, pyodbc), compiled once per SQL text.

        SQLAlchemy's execution context around it costs ten times what sqlite3 takes for `SELECT 1`
        (statements.py); what it would add for a text statement is the parameter order, which the
        compiled statement gives. The guards do not depend on it: SQLite's authorizer and `query_only`
        sit on the connection, and `guarded()` checks the transaction after the statement either way.
        """
        conn = self.connection()
        assert isinstance(self.statement, sa.TextClause)
        statement = for_driver(self.statement, conn.dialect)
        cursor = self.dbapi.cursor()
        self.cursor = cursor  # closed by close_result, also when the statement fails
        conn.info["onprem_cursor"] = cursor  # what `interrupt` cancels: pyodbc cancels per cursor
        params = statement.parameters(self.params)
        try:
            cursor.execute(statement.sql, params)
        except Exception as exc:
            # Wrapped as SQLAlchemy's execute wraps it, so that map_error answers as it did on that path
            # (e.g. sqlite3's ProgrammingError for a NUL in the SQL is INVALID_ARGUMENT, not INTERNAL),
            # and a lost connection is reported, and discarded, as SQLAlchemy would invalidate it.
            error_class = conn.dialect.loaded_dbapi.Error
            lost = isinstance(exc, error_class) and conn.dialect.is_disconnect(exc, self.dbapi, cursor)
            if lost:
                self._discard = True
            raise sa.exc.DBAPIError.instance(statement.sql, params, exc, error_class, connection_invalidated=lost,
                                             dialect=conn.dialect) from exc
        if cursor.description is None:
            self.rows_affected = cursor.rowcount
            self.done = True
        else:
            self.description = list(cursor.description)

    def _execute_postgres(self) -> str | None:
        """Run on psycopg itself: SQLAlchemy's streaming result wraps each row in a Row, a third of the cost.

        Returns the statement's command tag.
        """
        conn = self.connection()
        sql: str
        params: Any
        if isinstance(self.statement, sa.TextClause):
            driver = for_driver(self.statement, conn.dialect)
            sql, params = driver.sql, driver.parameters(self.params)
        else:  # a change poll's SELECT, built per request
            compiled = self.statement.compile(dialect=conn.dialect)
            sql, params = str(compiled), compiled.construct_params(self.params)
        dbapi: psycopg.Connection[Any] = self.dbapi
        # A server-side cursor streams rows in bounded memory...
        cursor: Any = dbapi.cursor(name="onprem_stream") if self.server_cursor else dbapi.cursor()
        _load_as_text(cursor)
        try:
            cursor.execute(sql, params)
            if not self.server_cursor and (cursor.statusmessage or "").split(" ")[0] in _DML_TAGS:
                self.rows_affected = cursor.rowcount
        except psycopg.Error as exc:
            # ...but PostgreSQL declares cursors only for SELECT/VALUES: DML, DDL, CALL and writable
            # CTEs fail to DECLARE without having run, so run them again with a plain cursor.
            if exc.sqlstate not in ("42601", "0A000") or not self.server_cursor:
                raise
            conn.rollback()
            self.begin()
            cursor = dbapi.cursor()
            _load_as_text(cursor)
            cursor.execute(sql, params)
            if (cursor.statusmessage or "").split(" ")[0] in _DML_TAGS:
                self.rows_affected = cursor.rowcount
        self.cursor = cursor
        if isinstance(cursor, psycopg.ServerCursor):
            self.ahead = FetchAhead(cursor)
        self.description = list(cursor.description or ())
        tag: str | None = cursor.statusmessage
        if cursor.description is None:
            self.done = True
            return tag
        pgresult = cursor.pgresult
        if pgresult is not None and pgresult.nfields == len(self.description):
            self._origins = [(pgresult.ftable(i), pgresult.ftablecol(i)) for i in range(pgresult.nfields)]
        return tag

    def header(self, first_rows: Sequence[Sequence[Any]]) -> Any:
        """Fix the column types from the driver's description and the first rows."""
        columns: list[values_pb2.Column] = []
        described: list[int] = []
        nullable = self._pg_nullable()
        for i, desc in enumerate(self.description):
            vt, db_type, null_ok = column_type(desc, self.dialect)
            described.append(vt)
            known = nullable[i] if nullable else null_ok
            columns.append(values_pb2.Column(name=desc[0], database_type=db_type, nullable=known is not False))
        self.types = choose_types(described, first_rows)
        for column, vt in zip(columns, self.types, strict=True):
            column.type = vt  # type: ignore[assignment]
        return self.wrap(header=database_pb2.QueryHeader(columns=columns))

    def _pg_nullable(self) -> list[bool | None] | None:
        """Whether each column may be NULL, for columns read straight from a table (PostgreSQL)."""
        origins = self._origins
        if not origins or not any(o[0] for o in origins):
            return None
        cache = self.runtime.pg_nullable
        missing = sorted({o for o in origins if o[0] and o not in cache})
        if missing:
            rows = self.connection().exec_driver_sql(
                "SELECT attrelid::int8, attnum::int8, NOT attnotnull FROM pg_catalog.pg_attribute "
                "WHERE (attrelid::int8, attnum::int8) IN (SELECT * FROM unnest(%(r)s::int8[], %(n)s::int8[]))",
                {"r": [o[0] for o in missing], "n": [o[1] for o in missing]},
            ).all()
            cache.update({(int(r[0]), int(r[1])): bool(r[2]) for r in rows})
        return [cache.get(o) if o[0] else None for o in origins]

    def _next_want(self) -> int:
        """The rows to fetch next: a batch within the cap, or 1 once the cap is reached (does it cut anything?)."""
        if self.cap is None:
            return self.fetch_rows
        remaining = self.cap - self.row_count
        return 1 if remaining <= 0 else min(self.fetch_rows, remaining)

    def fetch(self) -> list[Sequence[Any]]:
        """Fetch the next rows, respecting the row cap; marks the end of the result."""
        if self.done or self.cursor is None:
            return []
        ahead = self.ahead
        want = ahead.asked if ahead is not None else None
        probe = self.cap is not None and self.cap - self.row_count <= 0
        # Fetching runs the statement further (functions in the select list included): checked as well.
        with self.guarded("the statement"):
            if ahead is None:
                want = self._next_want()
                rows: list[Sequence[Any]] = self.cursor.fetchmany(want)
            else:
                if want is None:
                    want = self._next_want()
                    ahead.ask(want)
                rows = ahead.take()
        if probe:
            # The one row after the cap tells whether the cap cut anything off.
            self.truncated = bool(rows)
            self.done = True
            return []
        if len(rows) < want and (self.cap is None or self.row_count + len(rows) < self.cap):
            self.done = True
        self.row_count += len(rows)
        if rows:
            self.last_row = rows[-1]
        return rows

    def ask_ahead(self) -> None:
        """Send the next FETCH now, when there will be one: it runs on the server while this batch is encoded.

        It is the FETCH that `fetch` would send next, only earlier; a cancelled request sends none (the
        next `fetch` raises Cancelled), and one that ends early drains it (`close_result`).
        """
        if self.ahead is not None and self.ahead.asked is None and not self.done and not self.interrupted:
            self.ahead.ask(self._next_want())

    def batches(self, rows: Sequence[Sequence[Any]]) -> list[Any]:
        """Encode rows as RowBatch chunks, halving until each fits in max_chunk_bytes."""
        if not rows:
            return []
        chunk = self._encode(rows)
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

    def _encode(self, rows: Sequence[Sequence[Any]]) -> tunnel_pb2.ResponseChunk:
        chunk, batch = self.rows_chunk()
        batch.row_count = len(rows)
        for i, vt in enumerate(self.types):
            try:
                # One C-level pass per column. Not zip(*rows): its one iterator per row is an object the
                # cyclic GC tracks, and thousands of them alive at once get promoted to the oldest
                # generation, which then triggers a full collection of the agent's heap every few batches.
                fill(batch.columns.add(), vt, list(map(itemgetter(i), rows)))
            except Misfit:
                name = self.description[i][0]
                raise FailedPrecondition(
                    f"column '{name}' holds values of another type than {VT.Name(vt)} (chosen from its first rows); "
                    "CAST it in the SQL to one type",
                    reason="MIXED_COLUMN_TYPES",
                ) from None
        return chunk

    def first(self) -> list[Any]:
        rows = self.fetch()
        # The header's catalog query runs before the next FETCH is on its way: one statement at a time.
        parts = [self.header(rows), *self.batches(rows)]
        self.ask_ahead()
        return parts

    def next(self) -> list[Any]:
        rows = self.fetch()
        self.ask_ahead()
        return self.batches(rows)

    def close_result(self) -> None:
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            ahead.drain()  # before the cursor's CLOSE: the connection runs one statement at a time
        cursor, self.cursor = self.cursor, None
        if cursor is not None and self.result is None:
            cursor.close()  # our own psycopg cursor; SQLAlchemy's result closes its own
        if self.result is not None:
            self.result.close()

    def finish(self) -> Any:
        self.close_result()
        self.end(commit=True)
        summary = database_pb2.QuerySummary(
            row_count=self.row_count, rows_affected=self.rows_affected, truncated=self.truncated
        )
        return self.wrap(summary=summary)

    def run_all(self) -> list[Any]:
        """Execute and fetch the whole result (a keyed query's, which is recorded whole)."""
        self.execute()
        chunks = self.first()
        while not self.done:
            chunks.extend(self.next())
        chunks.append(self.finish())
        return chunks

    def release(self) -> None:
        self.close_result()
