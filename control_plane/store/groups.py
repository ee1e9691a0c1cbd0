"""Groups: the sites agents enroll into. A group is made by the first enrollment token for it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row, select

from onprem.control_plane.store.database import StoreBase
from onprem.control_plane.store.rows import GroupRow
from onprem.control_plane.store.schema import groups_table
from onprem.control_plane.store.values import validate_group_name


def _group_row(row: Row[Any]) -> GroupRow:
    return GroupRow(name=row.name, created_at=row.created_at)


class GroupStore(StoreBase):
    def _ensure_group(self, conn: Connection, name: str) -> GroupRow:
        """The group, made first if missing, in the caller's transaction (for the modules that make groups)."""
        validate_group_name(name)
        self._insert_ignoring_duplicates(conn, groups_table, {"name": name, "created_at": self._now()})
        row = conn.execute(select(groups_table).where(groups_table.c.name == name)).one()
        return _group_row(row)

    def ensure_group(self, name: str) -> GroupRow:
        """Return the group, creating it first if it does not exist."""
        with self._write() as conn:
            return self._ensure_group(conn, name)

    def get_group(self, name: str) -> GroupRow | None:
        with self._read() as conn:
            row = conn.execute(select(groups_table).where(groups_table.c.name == name)).first()
        return None if row is None else _group_row(row)

    def list_groups(self) -> list[GroupRow]:
        with self._read() as conn:
            rows = conn.execute(select(groups_table).order_by(groups_table.c.name)).all()
        return [_group_row(r) for r in rows]
