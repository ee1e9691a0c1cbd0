"""The store under test: a SQLite file, and a database of its own on the test PostgreSQL server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from onprem.control_plane.store import Store
from tests.control_plane.store.helpers import Clock
from tests.support.postgres import PostgresServer


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'control-plane.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    # A database per test keeps tests independent without cleaning tables up.
    name = f"store_{uuid.uuid4().hex[:16]}"
    server.create_database(name)
    return server.url(name)


@pytest.fixture
def store(store_url: str, clock: Clock) -> Iterator[Store]:
    with Store(store_url, clock=clock) as s:
        s.create_schema()
        yield s
