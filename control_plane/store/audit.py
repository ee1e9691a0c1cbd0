"""The audit log: one row per operator request (written in batches by `control_plane.audit`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, insert, select

from onprem.control_plane.store.database import StoreBase
from onprem.control_plane.store.errors import StoreError
from onprem.control_plane.store.rows import AuditEntry
from onprem.control_plane.store.schema import audit_table
from onprem.control_plane.store.values import AUDIT_DETAIL_MAX, AUDIT_LIST_MAX, PEER_MAX, TOKEN_NAME_MAX


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

    def list_audit(self, limit: int = 100) -> list[AuditEntry]:
        """The latest audit rows, newest first."""
        if limit < 1:
            raise ValueError(f"the limit must be at least 1, got {limit}")
        stmt = select(audit_table).order_by(audit_table.c.id.desc()).limit(min(limit, AUDIT_LIST_MAX))
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        return [_audit_row(r) for r in rows]
