"""Alembic's entry point: runs the revisions on the connection `migrations.upgrade` hands over."""

from __future__ import annotations

from alembic import context

from onprem.control_plane.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the store's migrations with onprem.control_plane.store.upgrade(url), "
                       "not with the alembic command")
# `target_metadata` only serves to compare a database with the current schema (alembic check).
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
