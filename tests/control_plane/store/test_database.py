"""The store's database (`store.database`), on a SQLite file and on a real PostgreSQL server.

Connections, the schema made twice, and a store from the previous release refused with a message.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import make_url

from onprem.control_plane.store import Store, default_url
from tests.control_plane.store.helpers import Clock

# --- schema and connection ----------------------------------------------------------------------------------


def test_create_schema_twice_keeps_data_and_a_new_store_sees_it(store_url: str, clock: Clock) -> None:
    with Store(store_url, clock=clock) as first:
        first.create_schema()
        first.ensure_group("plant")
    with Store(store_url, clock=clock) as second:
        second.create_schema()
        assert [g.name for g in second.list_groups()] == ["plant"]


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'cp.db'}") as store:
        store.create_schema()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 1000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_repr_names_the_database_but_hides_its_password(store_url: str) -> None:
    url = make_url(store_url)
    with Store(store_url) as store:
        shown = repr(store)
    assert url.database is not None
    assert url.database in shown
    if url.password:
        assert str(url.password) not in shown


def test_default_url_is_a_sqlite_file_in_the_state_directory(tmp_path: Path) -> None:
    with Store(default_url(tmp_path)) as store:
        store.create_schema()
        store.ensure_group("plant")
    assert (tmp_path / "control-plane.db").is_file()


# --- the schema of the previous release: see test_schema_versions.py -----------------------------------------------
