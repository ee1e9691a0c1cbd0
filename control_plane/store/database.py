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

from sqlalchemy import Connection, Insert, Table, create_engine, event, insert, inspect, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine

from onprem.control_plane.store.errors import StoreError
from onprem.control_plane.store.schema import (
    API_TOKENS_COUNTER,
    change_counters_table,
    metadata,
    settings_table,
)
from onprem.control_plane.store.values import utc, utcnow

DEFAULT_DB_FILENAME: Final = "control-plane.db"
#: The setting that names the release that last wrote the schema (for the refusal of a newer one).
SCHEMA_WRITER: Final = "schema_written_by"

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

    def create_schema(self, *, upgrade: bool = True, version: str = "") -> str:
        """Bring the database to the schema this version works with (the newest revision), or refuse it.

        - An empty database is made at the newest revision.
        - One made before the store had migrations (its tables, no revision) is recognised as the
          revision it is, and treated as such.
        - An older revision is upgraded when `upgrade` (the embedded SQLite store; a PostgreSQL store
          shared by replicas is upgraded by `onprem-control-plane migrate`), and refused otherwise,
          with the command to run.
        - A revision this version does not know (a newer release wrote it) is refused, naming it and
          the release that wrote it.

        `version` (this release) is recorded as the one that last wrote the schema. Returns the
        revision the database is at. Raises StoreError for a refusal.
        """
        from onprem.control_plane.store import migrations

        known = migrations.known_revisions()
        head = known[-1]
        with self._write() as conn:
            current = migrations.revision_on(conn)
            tables = set(inspect(conn).get_table_names())
            if current is None and not tables - {"alembic_version"}:
                # Several processes may make the schema at once: SQLite serialises writers; on
                # PostgreSQL the loser fails on a duplicate table and retries below.
                metadata.create_all(conn)
                migrations.stamp_on(conn, head)
                current = head
            elif current is None:
                current = "0002" if "change_counters" in tables else "0001"
                migrations.stamp_on(conn, current)
            if current not in known:
                written_by = self._setting(conn, SCHEMA_WRITER) or "a newer release of onprem"
                raise StoreError(
                    f"the store {self!r} is at schema revision {current}, which this version of onprem does not "
                    f"know (it knows up to {head}); it was written by {written_by}: run that version or a newer one")
            if current != head:
                if not upgrade:
                    raise StoreError(
                        f"the store {self!r} is at schema revision {current}, older than this version's {head}: "
                        f"run `onprem-control-plane migrate --database-url …` once (with the new version) before "
                        f"starting its replicas")
                migrations.upgrade_on(conn, head)
            if version:
                self._set_setting(conn, SCHEMA_WRITER, f"onprem {version} (revision {head})")
            # Several processes may create the schema at once; the loser must not fail.
            self._insert_ignoring_duplicates(conn, change_counters_table, {"name": API_TOKENS_COUNTER, "value": 0})
        return head

    def claim_setting(self, name: str, value: str) -> str:
        """The setting `name`, set to `value` if nobody set it before (the first replica's wins)."""
        with self._write() as conn:
            self._insert_ignoring_duplicates(conn, settings_table,
                                             {"name": name, "value": value, "updated_at": self._now()})
            return self._setting(conn, name) or value

    def _setting(self, conn: Connection, name: str) -> str | None:
        row = conn.execute(select(settings_table.c.value).where(settings_table.c.name == name)).first()
        return None if row is None else str(row.value)

    def _set_setting(self, conn: Connection, name: str, value: str) -> None:
        if self._setting(conn, name) is None:
            self._insert_ignoring_duplicates(conn, settings_table, {"name": name, "value": value, "updated_at": self._now()})
        else:
            conn.execute(update(settings_table).where(settings_table.c.name == name)
                         .values(value=value, updated_at=self._now()))

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
