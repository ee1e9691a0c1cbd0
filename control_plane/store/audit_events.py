"""The audit log as the audit API reads it (`api.audit`): filtered, scoped, paged by a cursor; and its pruning.

Kept apart from `store.audit` (which writes rows and serves the console's queries) so that the two grow
independently. Pages are read by keyset, newest first: (at, id) below the cursor's, which an index on `at`
serves (`ix_audit_at`), and one on (group_name, at) when a caller is limited to some groups or asks for one
(`ix_audit_group_at`, revision 0004), and one on trace_id for the rows of a trace (revision 0005). Pruning deletes by batches of ids, each in its own short transaction,
so that the writer of new rows (and SQLite's single write lock) never waits long behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, and_, delete, or_, select

from onprem.control_plane.store.audit import _audit_row
from onprem.control_plane.store.database import StoreBase
from onprem.control_plane.store.rows import AuditEntry
from onprem.control_plane.store.schema import audit_table
from onprem.control_plane.store.values import AUDIT_LIST_MAX, utc

#: Where a page ended: the (time, id) of its last row; the next page starts below it.
AuditCursor = tuple[datetime, int]


@dataclass(frozen=True)
class AuditFilter:
    """What the caller asked for; None: any. `start` is inclusive, `end` exclusive."""

    start: datetime | None = None
    end: datetime | None = None
    token_id: str | None = None
    group: str | None = None
    agent_id: str | None = None
    profile: str | None = None
    kind: str | None = None
    outcome: str | None = None
    trace_id: str | None = None


@dataclass(frozen=True)
class AuditScope:
    """What the caller may see, whatever it asks for (`api.audit` derives it from the token).

    `groups`: the rows of these groups only (None: of every group). `groupless`: the rows of no group too
    (only with `groups` None). `hidden_kinds`: never rows of these kinds.
    """

    groups: frozenset[str] | None
    groupless: bool = False
    hidden_kinds: frozenset[str] = frozenset()


def _conditions(wanted: AuditFilter, scope: AuditScope) -> list[ColumnElement[bool]]:
    c = audit_table.c
    where: list[ColumnElement[bool]] = []
    if scope.groups is not None:
        where.append(c.group_name.in_(sorted(scope.groups)))
    elif not scope.groupless:
        where.append(c.group_name.is_not(None))
    if scope.hidden_kinds:
        where.append(c.kind.not_in(sorted(scope.hidden_kinds)))
    if wanted.start is not None:
        where.append(c.at >= utc(wanted.start, "start"))
    if wanted.end is not None:
        where.append(c.at < utc(wanted.end, "end"))
    for column, value in ((c.token_id, wanted.token_id), (c.group_name, wanted.group), (c.agent_id, wanted.agent_id),
                          (c.profile, wanted.profile), (c.kind, wanted.kind), (c.outcome, wanted.outcome),
                          (c.trace_id, wanted.trace_id)):
        if value is not None:
            where.append(column == value)
    return where


class AuditEventStore(StoreBase):
    def list_audit_events(self, wanted: AuditFilter, scope: AuditScope, *, limit: int,
                          after: AuditCursor | None = None) -> list[AuditEntry]:
        """Up to `limit` rows that `scope` allows and `wanted` matches, newest first (time, then id), below
        `after` when given."""
        if limit < 1:
            raise ValueError(f"the limit must be at least 1, got {limit}")
        c = audit_table.c
        stmt = select(audit_table).where(*_conditions(wanted, scope))
        if after is not None:
            at, row_id = utc(after[0], "cursor's time"), after[1]
            stmt = stmt.where(or_(c.at < at, and_(c.at == at, c.id < row_id)))
        stmt = stmt.order_by(c.at.desc(), c.id.desc()).limit(min(limit, AUDIT_LIST_MAX))
        with self._read() as conn:
            return [_audit_row(r) for r in conn.execute(stmt).all()]

    def prune_audit(self, before: datetime, batch: int = 1000) -> int:
        """Delete up to `batch` of the oldest rows older than `before` (strictly), in one transaction; how many."""
        if batch < 1:
            raise ValueError(f"the batch must be at least 1, got {batch}")
        c = audit_table.c
        oldest = select(c.id).where(c.at < utc(before, "cut-off")).order_by(c.at).limit(batch)
        with self._write() as conn:
            ids = [row.id for row in conn.execute(oldest).all()]
            if ids:
                conn.execute(delete(audit_table).where(c.id.in_(ids)))
        return len(ids)
