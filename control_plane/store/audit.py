"""The audit log: one row per operator request (written in batches by `control_plane.audit`)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, String, case, func, insert, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from onprem.control_plane.store.database import StoreBase
from onprem.control_plane.store.errors import StoreError
from onprem.control_plane.store.rows import ActivityMinute, AuditEntry
from onprem.control_plane.store.schema import audit_table
from onprem.control_plane.store.values import AUDIT_DETAIL_MAX, AUDIT_LIST_MAX, PEER_MAX, TOKEN_NAME_MAX

#: Outcomes that are not failures of the request: done, or given up by the caller.
NOT_ERRORS = ("OK", "CANCELLED")


class _minute(FunctionElement[str]):
    """A time's minute as text, "YYYY-MM-DDTHH:MM" in UTC, computed by the database (grouped there)."""

    type = String()
    inherit_cache = True
    name = "audit_minute"


@compiles(_minute, "sqlite")
def _minute_sqlite(element: _minute, compiler: SQLCompiler, **kw: Any) -> str:
    # The column holds UTC text ("2030-01-02 03:04:05.678901"), which strftime reads as it is.
    return f"strftime('%Y-%m-%dT%H:%M', {compiler.process(element.clauses, **kw)})"


@compiles(_minute, "postgresql")
def _minute_postgresql(element: _minute, compiler: SQLCompiler, **kw: Any) -> str:
    return f"to_char(timezone('UTC', {compiler.process(element.clauses, **kw)}), 'YYYY-MM-DD\"T\"HH24:MI')"


def _audit_scope(groups: Collection[str] | None) -> list[ColumnElement[bool]]:
    """Rows of these groups only (None: every row, those of no group included)."""
    return [] if groups is None else [audit_table.c.group_name.in_(sorted(groups))]


def _audit_values(entry: AuditEntry) -> dict[str, Any]:
    return {
        "at": entry.at,
        "principal": entry.principal[:TOKEN_NAME_MAX],
        "role": entry.role,
        "method": entry.method[:200],
        "group_name": entry.group_name,
        "agent_id": entry.agent_id,
        "profile": entry.profile,
        "kind": entry.kind,
        "code": entry.code,
        "outcome": entry.outcome,
        "bytes_out": entry.bytes_out,
        "duration_ms": entry.duration_ms,
        "detail": entry.detail[:AUDIT_DETAIL_MAX],
        "token_id": entry.token_id,
        "peer": entry.peer[:PEER_MAX] if entry.peer is not None else None,
        "trace_id": entry.trace_id,
    }


def _audit_row(row: Row[Any]) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        at=row.at,
        principal=row.principal,
        role=row.role,
        method=row.method,
        group_name=row.group_name,
        agent_id=row.agent_id,
        profile=row.profile,
        kind=row.kind,
        code=row.code,
        outcome=row.outcome,
        bytes_out=row.bytes_out,
        duration_ms=row.duration_ms,
        detail=row.detail,
        token_id=row.token_id,
        peer=row.peer,
        trace_id=row.trace_id,
    )


class AuditStore(StoreBase):
    def add_audit(self, entry: AuditEntry) -> int:
        """Append one audit row and return its id; an over-long detail is cut, not refused."""
        values = _audit_values(entry)
        with self._write() as conn:
            result = conn.execute(insert(audit_table).values(values))
            key = result.inserted_primary_key
        if key is None:
            raise StoreError("the database did not report the new audit row's id")
        return int(key[0])

    def add_audits(self, entries: Sequence[AuditEntry]) -> None:
        """Append many audit rows in one transaction (one commit, not one per request)."""
        if entries:
            with self._write() as conn:
                conn.execute(insert(audit_table), [_audit_values(e) for e in entries])

    def list_audit(self, limit: int = 100, *, groups: Collection[str] | None = None, group: str | None = None,
                   token_id: str | None = None, outcome: str | None = None) -> list[AuditEntry]:
        """The latest audit rows, newest first: of `groups` only (None: all, rows of no group included),
        and of one group, token id or outcome when given."""
        if limit < 1:
            raise ValueError(f"the limit must be at least 1, got {limit}")
        stmt = select(audit_table).where(*_audit_scope(groups))
        if group is not None:
            stmt = stmt.where(audit_table.c.group_name == group)
        if token_id is not None:
            stmt = stmt.where(audit_table.c.token_id == token_id)
        if outcome is not None:
            stmt = stmt.where(audit_table.c.outcome == outcome)
        stmt = stmt.order_by(audit_table.c.id.desc()).limit(min(limit, AUDIT_LIST_MAX))
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        return [_audit_row(r) for r in rows]

    def audit_activity(self, since: datetime, kinds: Collection[str], *,
                       groups: Collection[str] | None = None) -> list[ActivityMinute]:
        """Per group and minute since `since`: the rows of these kinds, and those whose outcome is an
        error (any but OK and CANCELLED); only groups in `groups` if given. Minutes without a row are
        left out; by group, then minute."""
        minute = _minute(audit_table.c.at).label("minute")
        failed = case((audit_table.c.outcome.in_(NOT_ERRORS), 0), else_=1)
        stmt = (
            select(audit_table.c.group_name, minute, func.count().label("requests"),
                   func.sum(failed).label("errors"))
            .where(audit_table.c.at >= since, audit_table.c.kind.in_(sorted(kinds)),
                   audit_table.c.group_name.is_not(None), *_audit_scope(groups))
            .group_by(audit_table.c.group_name, minute)
            .order_by(audit_table.c.group_name, minute)
        )
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        return [ActivityMinute(group_name=r.group_name,
                               minute=datetime.strptime(r.minute, "%Y-%m-%dT%H:%M").replace(tzinfo=UTC),
                               requests=int(r.requests), errors=int(r.errors or 0)) for r in rows]
