"""SQL text parsed and compiled once: the statement's `:name`s, and what the driver is sent.

A request carries SQL with `:name` parameters. Parsing it into SQLAlchemy's
`text()` and compiling that for the dialect cost more than the database takes
to run a small statement (measured here: 11 µs to compile and 23 µs of
SQLAlchemy's execution context around a 2 µs sqlite3 `SELECT 1`), and callers
send the same few statements again and again. So both results are kept by SQL
text, and a streamed query runs the compiled SQL on the driver's own cursor.

Only statements up to `CACHED_SQL_CHARS` are kept, in caches of
`CACHED_STATEMENTS` entries: a caller sending many large distinct statements
must not be able to pin the agent's memory with them (tests/agent/handlers/
database/test_statements.py holds both bounds).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

__all__ = ["CACHED_SQL_CHARS", "CACHED_STATEMENTS", "DriverStatement", "Parsed", "cache_sizes", "for_driver", "parse"]

#: The longest SQL text kept; longer statements are parsed and compiled per request.
CACHED_SQL_CHARS = 4096
#: How many statements each cache keeps (the least recently used goes first).
CACHED_STATEMENTS = 512


@dataclass(frozen=True, slots=True)
class Parsed:
    """A request's SQL as SQLAlchemy holds it, and the names of its parameters."""

    text: sa.TextClause
    names: frozenset[str]


@dataclass(frozen=True, slots=True)
class DriverStatement:
    """A statement compiled for one dialect: the driver's SQL, and how its parameters are passed.

    Mirrors what SQLAlchemy's execution context does for a `text()` statement
    (`DefaultExecutionContext._init_compiled`): positional paramstyles (sqlite3's
    and pyodbc's `?`) get the values in placeholder order, a name used twice
    twice; named ones (psycopg's `%(name)s`) a mapping, escaped names renamed;
    bind processors applied where the dialect has any.
    """

    sql: str
    #: Parameter names in placeholder order; None for a named paramstyle.
    order: tuple[str, ...] | None
    escaped: Mapping[str, str]
    processors: Mapping[str, Callable[[Any], Any]]
    sequence: Callable[[list[Any]], Sequence[Any]]

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
        procs = self.processors
        if self.order is None:
            if not procs and not self.escaped:
                return values
            escaped = self.escaped
            return {escaped.get(k, k): procs[k](v) if k in procs else v for k, v in values.items()}
        return self.sequence([procs[k](values[k]) if k in procs else values[k] for k in self.order])


def _parse(sql: str) -> Parsed:
    text = sa.text(sql)
    return Parsed(text, frozenset(text.compile().params))


def _compile(text: sa.TextClause, dialect: Dialect) -> DriverStatement:
    compiled: Any = text.compile(dialect=dialect)
    order = tuple(compiled.positiontup) if compiled.positional else None
    return DriverStatement(
        sql=compiled.string,
        order=order,
        escaped=dict(compiled.escaped_bind_names or {}),
        processors=dict(compiled._bind_processors),  # what the execution context applies
        sequence=dialect.execute_sequence_format,
    )


_parse_cached = functools.lru_cache(maxsize=CACHED_STATEMENTS)(_parse)


@functools.lru_cache(maxsize=CACHED_STATEMENTS)
def _compile_cached(sql: str, dialect: Dialect) -> DriverStatement:
    # Keyed by the text and the dialect object (one per profile's engine), not the TextClause: two requests
    # with the same SQL share the entry even when one parsed it uncached.
    return _compile(_parse_cached(sql).text, dialect)


def parse(sql: str) -> Parsed:
    """The statement and its `:name`s; SQLAlchemy reads `:name::type` as text, not a parameter."""
    return _parse_cached(sql) if len(sql) <= CACHED_SQL_CHARS else _parse(sql)


def for_driver(text: sa.TextClause, dialect: Dialect) -> DriverStatement:
    """`text` compiled for `dialect`, from the cache when it is short enough to be kept."""
    sql = text.text
    return _compile_cached(sql, dialect) if len(sql) <= CACHED_SQL_CHARS else _compile(text, dialect)


def cache_sizes() -> tuple[int, int]:
    """How many parsed and compiled statements are kept now (for tests)."""
    return _parse_cached.cache_info().currsize, _compile_cached.cache_info().currsize
