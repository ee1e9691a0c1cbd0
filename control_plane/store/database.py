"""The store's database: the engine, its short transactions, the clock and the schema.

`StoreBase` is what the query modules (`groups`, `agents`, `tokens`, `audit`) build on:
their classes subclass it and use its protected helpers (`_read`, `_write`, `_now`,
`_insert_ignoring_duplicates`); `store.facade.Store` combines them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Self

from sqlalchemy import Connection, Insert, Table, create_engine, event, insert, inspect, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine

from onprem.control_plane.store.errors import StoreError
from onprem.control_plane.store.schema import API_TOKENS_COUNTER, change_counters_table, metadata
from onprem.control_plane.store.values import utc, utcnow

DEFAULT_DB_FILENAME: Final = "control-plane.db"

# SQLite serialises writers; a writer that finds the file locked waits this long
# before giving up, which covers audit bursts from many concurrent requests.
_SQLITE_BUSY_TIMEOUT_MS: Final = 30_000
_WRITE_OPTION: Final = "onprem_write"


def default_url(state_dir: Path) -> str:
    """The embedded default: a SQLite file in the control plane's state directory."""
    return f"sqlite:///{Path(state_dir).resolve() / DEFAULT_DB_FILENAME}"


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module, which would otherwise open
        # transactions lazily and defeat BEGIN IMMEDIATE below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # WAL lets readers run while one writer writes; NORMAL sync is durable enough under WAL.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A write transaction takes the write lock up front: a deferred transaction that reads and
        # then writes can fail with SQLITE_BUSY at once, without waiting out the busy timeout.
        if conn.get_execution_options().get(_WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def make_engine(url: str) -> Engine:
    """An engine for the store's database; on SQLite, in WAL mode and with transactions SQLAlchemy controls
    (so that DDL, e.g. a migration's, is transactional too)."""
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


class StoreBase:
    """A SQLite file (embedded) or a PostgreSQL database (shared by replicas), and its transactions.

    Every operation runs in its own short transaction: `_read()` or `_write()` (which takes
    SQLite's write lock up front).
    """

    def __init__(self, url: str, *, clock: Callable[[], datetime] = utcnow) -> None:
        self._clock = clock
        self._engine = make_engine(url)

    def __repr__(self) -> str:
        return f"Store({self._engine.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def sqlite_path(self) -> str | None:
        """The database file, when the store is a SQLite file; None otherwise."""
        url = self._engine.url
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
            return None
        return url.database

    def create_schema(self) -> None:
        """Create the tables that do not exist yet, and refuse a store made by an older release.

        There are no migrations yet (they come with Alembic); until then a store whose tables
        lack columns this version needs is refused with a message saying so, rather than
        failing later on the first query that touches them.
        """
        metadata.create_all(self._engine)
        missing = []
        inspector = inspect(self._engine)
        for table in metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            missing += [f"{table.name}.{c.name}" for c in table.columns if c.name not in present]
        if missing:
            raise StoreError(
                f"the store {self!r} was made by an older release of onprem and lacks the columns "
                f"{', '.join(missing)}; this version cannot upgrade it in place yet (schema migrations are "
                "planned): keep the older release for it, or start from a new state folder"
            )
        with self._write() as conn:
            # Several processes may create the schema at once; the loser must not fail.
            self._insert_ignoring_duplicates(conn, change_counters_table, {"name": API_TOKENS_COUNTER, "value": 0})

    def close(self) -> None:
        self._engine.dispose()

    # --- for the query modules ------------------------------------------------------------------------------

    def _now(self) -> datetime:
        return utc(self._clock(), "clock's time")

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.begin() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                yield conn

    def _insert_ignoring_duplicates(self, conn: Connection, table: Table, values: dict[str, Any]) -> None:
        # Several replicas may create the same row (a group, a counter) at once; the loser must not fail.
        stmt: Insert
        if conn.dialect.name == "postgresql":
            stmt = pg_insert(table).values(values).on_conflict_do_nothing()
        elif conn.dialect.name == "sqlite":
            stmt = sqlite_insert(table).values(values).on_conflict_do_nothing()
        else:
            exists = conn.execute(select(table.c.name).where(table.c.name == values["name"]))
            if exists.first() is not None:
                return
            stmt = insert(table).values(values)
        conn.execute(stmt)
