"""0004: the audit API (issue 17).

An index on audit (group_name, at): `ListAuditEvents` pages a group's rows, or those of a token limited
to some groups, newest first.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("ix_audit_group_at", "audit", ["group_name", "at"])


def downgrade() -> None:
    op.drop_index("ix_audit_group_at", table_name="audit")
