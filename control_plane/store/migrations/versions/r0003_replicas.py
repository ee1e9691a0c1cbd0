"""0003: control-plane replicas (issue 14).

New tables: `replicas` (each replica's row and heartbeat), `agent_streams` (which replica holds
which agent's stream) and `agent_drains` (drains an admin asked for, for every replica to carry out).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("replica_id", sa.String(255), primary_key=True),
        sa.Column("agent_address", sa.String(255), nullable=False),
        sa.Column("operator_address", sa.String(255), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("started_at", _time(), nullable=False),
        sa.Column("heartbeat_at", _time(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
    )
    op.create_table(
        "agent_streams",
        sa.Column("agent_id", sa.String(128), primary_key=True),
        sa.Column("replica_id", sa.String(255), primary_key=True),
        sa.Column("session_id", sa.String(32), nullable=False),
        sa.Column("connected_at", _time(), nullable=False),
        sa.Column("draining", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_agent_streams_replica_id", "agent_streams", ["replica_id"])
    op.create_table(
        "agent_drains",
        sa.Column("agent_id", sa.String(128), primary_key=True),
        sa.Column("requested_at", _time(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("grace_ms", sa.BigInteger(), nullable=False),
        sa.Column("exit_after", sa.Boolean(), nullable=False),
        sa.Column("requested_by", sa.String(255), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("agent_drains")
    op.drop_index("ix_agent_streams_replica_id", table_name="agent_streams")
    op.drop_table("agent_streams")
    op.drop_table("replicas")
