"""0005: the trace id of each audited request (issue 17, part 3).

A nullable column `trace_id` on audit (the request's W3C trace id, 32 hex digits; rows written before
are NULL) and an index on it: `ListAuditEvents` filters by trace id.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("audit", sa.Column("trace_id", sa.String(32), nullable=True))
    op.create_index("ix_audit_trace_id", "audit", ["trace_id"])


def downgrade() -> None:
    op.drop_index("ix_audit_trace_id", table_name="audit")
    # Batch mode: SQLite rebuilds a table to drop a column.
    with op.batch_alter_table("audit") as audit:
        audit.drop_column("trace_id")
