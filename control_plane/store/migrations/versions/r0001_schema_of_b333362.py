"""0001: the store's schema as release b333362 made it (groups, agents, tokens, audit).

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def _time() -> sa.DateTime:
    # What the store's UTCDateTime stores (timestamptz on PostgreSQL, text on SQLite).
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "groups",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("created_at", _time(), nullable=False),
    )
    op.create_table(
        "agents",
        sa.Column("agent_id", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("group_name", sa.String(63), sa.ForeignKey("groups.name"), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("enrolled_at", _time(), nullable=False),
        sa.Column("last_seen_at", _time(), nullable=True),
        sa.Column("cert_serial", sa.String(64), nullable=False),
        sa.Column("cert_expires_at", _time(), nullable=False),
        sa.Column("revoked_at", _time(), nullable=True),
        sa.Column("revoked_reason", sa.Text(), nullable=False),
        sa.Column("profiles", sa.Text(), nullable=False),
    )
    op.create_index("ix_agents_group_name", "agents", ["group_name"])
    op.create_table(
        "api_tokens",
        sa.Column("token_id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("groups", sa.Text(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("revoked_at", _time(), nullable=True),
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("token_id", sa.String(32), primary_key=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("group_name", sa.String(63), sa.ForeignKey("groups.name"), nullable=False),
        sa.Column("description", sa.String(500), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("expires_at", _time(), nullable=False),
        sa.Column("used_at", _time(), nullable=True),
        sa.Column("used_by_agent", sa.String(128), nullable=True),
    )
    op.create_table(
        "audit",
        # BIGINT on PostgreSQL for a long-lived log; SQLite only autoincrements an INTEGER primary key.
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("at", _time(), nullable=False),
        sa.Column("principal", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("method", sa.String(200), nullable=False),
        sa.Column("group_name", sa.String(63), nullable=True),
        sa.Column("agent_id", sa.String(128), nullable=True),
        sa.Column("profile", sa.String(200), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("code", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("bytes_out", sa.BigInteger(), nullable=False),
        sa.Column("duration_ms", sa.BigInteger(), nullable=False),
        sa.Column("detail", sa.String(500), nullable=False),
    )
    op.create_index("ix_audit_at", "audit", ["at"])


def downgrade() -> None:
    op.drop_index("ix_audit_at", table_name="audit")
    op.drop_table("audit")
    op.drop_table("enrollment_tokens")
    op.drop_table("api_tokens")
    op.drop_index("ix_agents_group_name", table_name="agents")
    op.drop_table("agents")
    op.drop_table("groups")
