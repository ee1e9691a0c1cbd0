"""Which schema a store starts on: made new, recognised, upgraded, or refused with the command to run.

On a SQLite file and on a real PostgreSQL server. The embedded SQLite store upgrades itself; a store
shared by replicas (PostgreSQL, started with `upgrade=False`) is upgraded by `migrate` only.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import create_engine, text

from onprem.control_plane.store import Store, StoreError, current_revision, head_revision, upgrade
from tests.control_plane.store.test_migrations import AT, SECRET, NewUrl, new_url, write_release_b333362_rows

__all__ = ["new_url"]  # the fixture, shared with the migration tests


def drop_revision_table(url: str) -> None:
    """Make the database look as a release before migrations left it: its tables, no revision."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
    engine.dispose()


def test_an_empty_database_is_made_at_the_newest_revision(new_url: NewUrl) -> None:
    url = new_url("empty")
    with Store(url) as store:
        assert store.create_schema(upgrade=False) == head_revision()
    assert current_revision(url) == head_revision()


def test_a_store_of_release_b333362_without_a_revision_is_recognised_and_upgraded_keeping_its_rows(
    new_url: NewUrl,
) -> None:
    url = new_url("b333362")
    upgrade(url, "0001")
    write_release_b333362_rows(url)
    drop_revision_table(url)
    with Store(url, clock=lambda: AT + timedelta(days=1)) as store:
        assert store.create_schema() == head_revision()
        token = store.authenticate_api_token(f"onp_0123456789abcdef_{SECRET}")
        assert token is not None and token.name == "ci"
        assert store.get_agent("agent-1") is not None
    assert current_revision(url) == head_revision()


def test_a_store_of_the_credential_lifecycle_without_a_revision_is_recognised_as_0002(new_url: NewUrl) -> None:
    url = new_url("stop20")
    upgrade(url, "0002")
    drop_revision_table(url)
    with Store(url) as store:
        store.create_schema()
        assert store.live_replicas(timedelta(seconds=6)) == []  # 0003's table is there
    assert current_revision(url) == head_revision()


def test_an_older_revision_is_refused_without_upgrade_naming_the_command_to_run(new_url: NewUrl) -> None:
    url = new_url("older")
    upgrade(url, "0002")
    with Store(url) as store, pytest.raises(StoreError) as info:
        store.create_schema(upgrade=False)
    assert str(info.value).endswith(
        "is at schema revision 0002, older than this version's 0005: run `onprem-control-plane migrate "
        "--database-url …` once (with the new version) before starting its replicas")
    assert current_revision(url) == "0002"


def test_a_revision_this_version_does_not_know_is_refused_naming_it_and_the_release_that_wrote_it(
    new_url: NewUrl,
) -> None:
    url = new_url("newer")
    with Store(url) as store:
        store.create_schema(version="9.9.9")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0042'"))
        conn.execute(text("UPDATE settings SET value = 'onprem 9.9.9 (revision 0042)' WHERE name = 'schema_written_by'"))
    engine.dispose()
    with Store(url) as store, pytest.raises(StoreError) as info:
        store.create_schema()
    assert str(info.value).endswith(
        "is at schema revision 0042, which this version of onprem does not know (it knows up to 0005); it was "
        "written by onprem 9.9.9 (revision 0042): run that version or a newer one")
    assert current_revision(url) == "0042"


def test_the_release_that_wrote_the_schema_is_recorded(new_url: NewUrl) -> None:
    url = new_url("writer")
    with Store(url) as store:
        store.create_schema(version="1.2.3")
        assert store.claim_setting("schema_written_by", "ignored") == "onprem 1.2.3 (revision 0005)"
