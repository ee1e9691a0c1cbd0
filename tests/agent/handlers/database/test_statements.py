"""Statements parsed and compiled once: the parameters the driver gets, and the caches' bounds."""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from onprem.agent.handlers.database import statements
from onprem.agent.handlers.database.statements import CACHED_SQL_CHARS, CACHED_STATEMENTS, for_driver, parse


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'lite.db'}")
    yield engine
    engine.dispose()


def what_sqlalchemy_sends(engine: sa.Engine, sql: str, params: dict[str, Any]) -> tuple[str, Any]:
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(sql), params).close()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return sent[0]


@pytest.mark.parametrize(("sql", "params"), [
    ("SELECT 1", {}),
    ("SELECT :b AS b, :a AS a", {"a": 1, "b": "two"}),
    ("SELECT :a + :a AS twice, :b AS b", {"a": 2, "b": None}),
    ("SELECT :when AS w, '%' || :s AS pct", {"when": datetime.date(2024, 2, 29), "s": "x"}),
    ("SELECT '\\:escaped' AS literal, :real AS r", {"real": 1.5}),
])
def test_the_driver_gets_what_sqlalchemy_would_send_it(sqlite_engine: sa.Engine, sql: str,
                                                        params: dict[str, Any]) -> None:
    driver = for_driver(parse(sql).text, sqlite_engine.dialect)
    assert (driver.sql, driver.parameters(params)) == what_sqlalchemy_sends(sqlite_engine, sql, params)


def test_a_name_used_twice_is_passed_twice_in_placeholder_order(sqlite_engine: sa.Engine) -> None:
    driver = for_driver(parse("SELECT :x, :y, :x").text, sqlite_engine.dialect)
    assert driver.sql == "SELECT ?, ?, ?"
    assert driver.parameters({"x": 1, "y": 2}) == (1, 2, 1)
    assert sqlite3.connect(":memory:").execute(driver.sql, driver.parameters({"x": 1, "y": 2})).fetchall() == [(1, 2, 1)]


def test_a_named_paramstyle_gets_the_values_by_name() -> None:
    dialect = sa.create_engine("postgresql+psycopg://u@localhost/db").dialect
    driver = for_driver(parse("SELECT :a, '100%' AS pct").text, dialect)
    assert driver.sql == "SELECT %(a)s, '100%%' AS pct"
    assert driver.parameters({"a": 7}) == {"a": 7}


def test_the_parameter_names_ignore_casts_written_the_postgresql_way() -> None:
    assert parse("SELECT :a::int, CAST(:b AS int)").names == frozenset({"b"})


def test_the_same_sql_is_parsed_and_compiled_once(sqlite_engine: sa.Engine) -> None:
    sql = "SELECT :only_here_once AS v"
    assert parse(sql) is parse(sql)
    assert for_driver(parse(sql).text, sqlite_engine.dialect) is for_driver(parse(sql).text, sqlite_engine.dialect)


def test_each_engine_has_its_own_compiled_statement(tmp_path: Path) -> None:
    lite = sa.create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    pg = sa.create_engine("postgresql+psycopg://u@localhost/db")
    text = parse("SELECT :per_dialect").text
    assert (for_driver(text, lite.dialect).sql, for_driver(text, pg.dialect).sql) == (
        "SELECT ?", "SELECT %(per_dialect)s")


def test_a_long_statement_is_not_kept(sqlite_engine: sa.Engine) -> None:
    sql = "SELECT :v AS v -- " + "x" * CACHED_SQL_CHARS
    before = statements.cache_sizes()
    parsed = parse(sql)
    driver = for_driver(parsed.text, sqlite_engine.dialect)
    assert parsed is not parse(sql) and driver is not for_driver(parsed.text, sqlite_engine.dialect)
    assert statements.cache_sizes() == before
    assert driver.parameters({"v": 3}) == (3,)


def test_a_flood_of_distinct_statements_keeps_the_caches_bounded(sqlite_engine: sa.Engine) -> None:
    # A caller sending ever new SQL (each up to the cached size) must not grow the agent without bound.
    filler = "x" * (CACHED_SQL_CHARS - 64)
    for i in range(CACHED_STATEMENTS * 3):
        for_driver(parse(f"SELECT {i} AS n -- {filler}").text, sqlite_engine.dialect)
    assert statements.cache_sizes() == (CACHED_STATEMENTS, CACHED_STATEMENTS)
