"""The operations besides a plain query: a batch, a transaction, and a change poll.

A change poll orders rows by the tuple (watermark, key) and resumes strictly
after the last tuple it returned, so rows that share a watermark value (many
rows stamped in the same microsecond) are neither skipped nor repeated when a
poll ends among them. That holds for every row committed before the poll
runs; a row committed later with a watermark below one already returned is
missed by any watermark scheme, so the watermark must grow in commit order
(e.g. set by a trigger from `clock_timestamp()` or a sequence, not `now()` of
a long transaction).
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa

from onprem.agent.handlers.database.engine import COMMAND_TAG, ProfileRuntime, RequestConnection
from onprem.agent.handlers.database.query import Query, bind_parameters
from onprem.agent.handlers.database.statements import parse
from onprem.agent.handlers.database.values import bind_value, to_value
from onprem.tunnel.errors import InvalidArgument
from onprem.v1 import database_pb2, tunnel_pb2, values_pb2

__all__ = ["Batch", "Poll", "Transaction"]

_DEFAULT_POLL_ROWS = 1000
_TABLE_NAME = re.compile(r"^[^.\s\"]+(\.[^.\s\"]+)?$")
# Dialects whose LIMIT spelling SQLAlchemy knows; a generic ODBC source stops by fetching instead.
_LIMIT_DIALECTS = ("postgresql", "sqlite", "mssql", "mysql", "mariadb", "oracle")


def _rowcount(result: sa.CursorResult[Any]) -> int:
    if result.returns_rows:
        return -1
    count = result.rowcount
    return count if count is not None and count >= 0 else -1


def _tag(conn: sa.Connection) -> str | None:
    """The command tag the server reported for the last statement (read-only PostgreSQL profiles), for messages."""
    tag = conn.info.pop(COMMAND_TAG, None)
    return tag if isinstance(tag, str) else None


class Batch(RequestConnection):
    """One statement, once per parameter set, in one transaction."""

    def __init__(self, runtime: ProfileRuntime, request: database_pb2.ExecuteBatchRequest) -> None:
        super().__init__(runtime)
        if not request.parameter_sets:
            raise InvalidArgument("a batch needs at least one parameter set", reason="INVALID_PARAMETER")
        parsed = parse(request.sql)
        self.statement = parsed.text
        self.sets = []
        for i, parameter_set in enumerate(request.parameter_sets):
            try:
                self.sets.append(bind_parameters(parsed, parameter_set.parameters, runtime.dialect))
            except InvalidArgument as exc:
                raise InvalidArgument(f"parameter set {i}: {exc.message}", reason=exc.reason) from None

    def run(self) -> tunnel_pb2.ResponseChunk:
        conn = self.connection()
        self.begin()
        if self.profile.read_only:
            # One set at a time, each checked before the next runs (see RequestConnection.guarded); a read-only
            # batch writes nothing, so its speed matters less than that check.
            affected = 0
            for i, params in enumerate(self.sets):
                with self.guarded(f"parameter set {i}") as tag:
                    result = conn.execute(self.statement, params)
                    tag[0] = _tag(conn)
                    count = _rowcount(result)
                    result.close()
                affected = -1 if count < 0 or affected < 0 else affected + count
        else:
            # One executemany: psycopg pipelines it, pyodbc and sqlite3 loop in C.
            result = conn.execute(self.statement, self.sets)
            affected = _rowcount(result) if conn.dialect.supports_sane_multi_rowcount or len(self.sets) == 1 else -1
            result.close()
        self.end(commit=True)
        return tunnel_pb2.ResponseChunk(
            batch=database_pb2.ExecuteBatchResponse(rows_affected=affected, sets_applied=len(self.sets))
        )

    def run_all(self) -> list[tunnel_pb2.ResponseChunk]:
        return [self.run()]


class Transaction(RequestConnection):
    """Several statements that commit together, or roll back together at the first failure."""

    def __init__(self, runtime: ProfileRuntime, request: database_pb2.ExecuteTransactionRequest) -> None:
        super().__init__(runtime)
        if not request.statements:
            raise InvalidArgument("a transaction needs at least one statement", reason="INVALID_PARAMETER")
        self.steps: list[tuple[sa.TextClause, dict[str, Any]]] = []
        for i, step in enumerate(request.statements):
            parsed = parse(step.sql)
            try:
                self.steps.append((parsed.text, bind_parameters(parsed, step.parameters, runtime.dialect)))
            except InvalidArgument as exc:
                raise InvalidArgument(f"statement {i}: {exc.message}", reason=exc.reason) from None

    def run(self) -> tunnel_pb2.ResponseChunk:
        conn = self.connection()
        self.begin()
        results = []
        for i, (statement, params) in enumerate(self.steps):
            with self.guarded(f"statement {i}") as tag:
                result = conn.execute(statement, params)
                tag[0] = _tag(conn)
                results.append(database_pb2.StatementResult(rows_affected=_rowcount(result)))
                result.close()
        # A failure above leaves the transaction open; `close` rolls it back.
        self.end(commit=True)
        return tunnel_pb2.ResponseChunk(transaction=database_pb2.ExecuteTransactionResponse(results=results))

    def run_all(self) -> list[tunnel_pb2.ResponseChunk]:
        return [self.run()]


class Poll(Query):
    """The rows after a (watermark, key) position, in that order, and the position to resume from."""

    def __init__(self, runtime: ProfileRuntime, request: database_pb2.PollChangesRequest, max_chunk_bytes: int) -> None:
        self.request = request
        dialect = runtime.dialect
        if not request.watermark_column:
            raise InvalidArgument("watermark_column is required", reason="INVALID_ARGUMENT")
        if bool(request.table) == bool(request.sql):
            raise InvalidArgument("set either table or sql", reason="INVALID_ARGUMENT")
        params: dict[str, Any] = {}
        source: Any
        if request.table:
            if not _TABLE_NAME.match(request.table) or request.parameters:
                raise InvalidArgument(
                    f"table {request.table!r} must be 'name' or 'schema.name' (parameters go with sql)",
                    reason="INVALID_ARGUMENT",
                )
            schema, _, name = request.table.rpartition(".")
            source = sa.table(name, schema=schema or None)
        else:
            parsed = parse(request.sql)
            params = bind_parameters(parsed, request.parameters, dialect)
            source = parsed.text.columns().subquery("onprem_changes")
        watermark: sa.ColumnClause[Any] = sa.column(request.watermark_column)
        order: list[Any] = [watermark]
        statement = sa.select(sa.text("*")).select_from(source)
        if request.HasField("after") and request.after.HasField("value"):
            after = bind_value("after.value", request.after.value, dialect)
            params["onprem_after_value"] = after
            later: Any = watermark > sa.bindparam("onprem_after_value")
            if request.key_column and request.after.HasField("key"):
                params["onprem_after_key"] = bind_value("after.key", request.after.key, dialect)
                later = sa.or_(later, sa.and_(watermark == sa.bindparam("onprem_after_value"),
                                              sa.column(request.key_column) > sa.bindparam("onprem_after_key")))
            statement = statement.where(later)
        if request.key_column:
            order.append(sa.column(request.key_column))
        statement = statement.order_by(*order)
        limit = request.max_rows or _DEFAULT_POLL_ROWS
        if dialect in _LIMIT_DIALECTS:
            statement = statement.limit(limit + 1)  # the one extra row says whether there is more
        super().__init__(runtime, statement, params, max_chunk_bytes, limit)

    def wrap(self, **part: Any) -> tunnel_pb2.ResponseChunk:
        if "summary" in part:
            return tunnel_pb2.ResponseChunk(poll_changes=database_pb2.PollChangesResponse(summary=part["summary"]))
        return tunnel_pb2.ResponseChunk(poll_changes=database_pb2.PollChangesResponse(**part))

    def rows_chunk(self) -> tuple[tunnel_pb2.ResponseChunk, values_pb2.RowBatch]:
        chunk = tunnel_pb2.ResponseChunk()
        return chunk, chunk.poll_changes.rows

    def _index(self, column: str) -> int:
        names = [d[0] for d in self.description]
        for candidates in (names, [n.lower() for n in names]):
            target = column if candidates is names else column.lower()
            if target in candidates:
                return candidates.index(target)
        raise InvalidArgument(f"column {column!r} is not in the polled rows", reason="INVALID_ARGUMENT")

    def first(self) -> list[Any]:
        self._index(self.request.watermark_column)
        if self.request.key_column:
            self._index(self.request.key_column)
        return super().first()

    def finish(self) -> tunnel_pb2.ResponseChunk:
        self.close_result()
        self.end(commit=False)
        request = self.request
        next_mark = database_pb2.Watermark()
        if self.last_row is not None:
            at = self._index(request.watermark_column)
            next_mark.value.CopyFrom(to_value(self.last_row[at], self.types[at]))
            if request.key_column:
                at = self._index(request.key_column)
                next_mark.key.CopyFrom(to_value(self.last_row[at], self.types[at]))
        elif request.HasField("after"):
            next_mark.CopyFrom(request.after)
        summary = database_pb2.PollChangesSummary(row_count=self.row_count, next=next_mark, has_more=self.truncated)
        return self.wrap(summary=summary)
