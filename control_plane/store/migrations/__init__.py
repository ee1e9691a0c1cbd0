"""The store's schema migrations (Alembic), and the functions that run them.

The revisions are in `versions/`, one file each, written by hand and never changed once
released:

    0001  the schema as release b333362 made it
    0002  the credential lifecycle (issue 12): operator tokens' expiry, last use, creator and
          revocation; enrollment tokens' revocation and creator; the audit's token id and peer;
          the `change_counters` table (seeded with `api_tokens` = 0) and the `settings` table
    0003  control-plane replicas (issue 14): `replicas`, `agent_streams`, `agent_drains`
    0004  the audit API (issue 17): index `ix_audit_group_at` on audit (group_name, at)
    0005  traces (issue 17, part 3): audit's `trace_id`, and its index `ix_audit_trace_id`

A new revision copies the latest file, names the latest as its `down_revision`, and writes
`upgrade` and `downgrade` with `alembic.op` and literal types and widths, never the `schema`
module (which moves on while a revision must not). The tests check that migrating an empty
database to the head makes exactly the tables `schema.metadata` makes.

`Store.create_schema` runs them at start-up (`database`): the embedded SQLite store upgrades
itself; a PostgreSQL store shared by replicas is upgraded by `onprem-control-plane migrate`, run
once before the replicas of a new version start.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection

from onprem.control_plane.store.database import make_engine

if TYPE_CHECKING:
    from alembic.config import Config

_SCRIPTS = Path(__file__).resolve().parent
log = logging.getLogger("onprem.control_plane.store")

# Alembic is imported when a migration function runs, not with the store: it adds a tenth of a
# second to every start of the control plane and its CLI, which do not migrate (yet).


def _config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    # Alembic narrates every step at INFO; the store logs the one line that matters (what it upgraded).
    logging.getLogger("alembic").setLevel(logging.WARNING)

    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    # env.py runs the revisions on this connection, in its transaction.
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision: the schema this version of onprem works with."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None, "the store has no migrations"
    return head


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision`, in one transaction (on SQLite and PostgreSQL alike)."""
    from alembic import command

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            command.upgrade(_config(conn), revision)
    finally:
        engine.dispose()


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at `url` down to `revision` (rows in what goes are lost), in one transaction."""
    from alembic import command

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            command.downgrade(_config(conn), revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """The revision the database at `url` is at; None for a database no migration has touched."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


# --- on a connection the store holds (its own transaction) ----------------------------------------------------


def known_revisions() -> list[str]:
    """Every revision this version knows, oldest first."""
    from alembic.script import ScriptDirectory

    return [script.revision for script in reversed(list(ScriptDirectory.from_config(_config()).walk_revisions()))]


def revision_on(connection: Connection) -> str | None:
    """The revision of the database behind `connection`; None when no migration has touched it."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def upgrade_on(connection: Connection, revision: str = "head") -> None:
    """Migrate the database behind `connection` up to `revision`, in the connection's transaction."""
    from alembic import command

    log.info("upgrading the store's schema from revision %s to %s", revision_on(connection), revision)
    command.upgrade(_config(connection), revision)


def stamp_on(connection: Connection, revision: str) -> None:
    """Record that the database behind `connection` is at `revision`, changing no table."""
    from alembic import command

    command.stamp(_config(connection), revision)
