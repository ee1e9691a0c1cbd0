"""0002: the credential lifecycle (issue 12).

Operator tokens get an expiry, a last-used time, their creator and revocation (who, why);
enrollment tokens their revocation and creator; audit rows the token id and the caller's
address. New tables: `change_counters` (bumped by every revocation of an operator token,
seeded with `api_tokens` = 0) and `settings` (e.g. the default lifetime of new tokens).

Operator tokens made before keep no expiry (NULL: never expires), as they had none.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    for name in ("expires_at", "last_used_at"):
        op.add_column("api_tokens", sa.Column(name, _time(), nullable=True))
    op.add_column("api_tokens", sa.Column("created_by", sa.String(255), nullable=False, server_default=""))
    op.add_column("api_tokens", sa.Column("revoked_by", sa.String(255), nullable=False, server_default=""))
    op.add_column("api_tokens", sa.Column("revoke_reason", sa.String(500), nullable=False, server_default=""))

    op.add_column("enrollment_tokens", sa.Column("revoked_at", _time(), nullable=True))
    op.add_column("enrollment_tokens", sa.Column("created_by", sa.String(255), nullable=False, server_default=""))
    op.add_column("enrollment_tokens", sa.Column("revoked_by", sa.String(255), nullable=False, server_default=""))
    op.add_column("enrollment_tokens",
                  sa.Column("revoke_reason", sa.String(500), nullable=False, server_default=""))

    op.add_column("audit", sa.Column("token_id", sa.String(32), nullable=True))
    op.add_column("audit", sa.Column("peer", sa.String(128), nullable=True))

    counters = op.create_table(
        "change_counters",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(counters, [{"name": "api_tokens", "value": 0}])
    op.create_table(
        "settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("settings")
    op.drop_table("change_counters")
    # Batch mode: SQLite rebuilds a table to drop columns.
    with op.batch_alter_table("audit") as audit:
        audit.drop_column("peer")
        audit.drop_column("token_id")
    with op.batch_alter_table("enrollment_tokens") as enrollment:
        for name in ("revoke_reason", "revoked_by", "created_by", "revoked_at"):
            enrollment.drop_column(name)
    with op.batch_alter_table("api_tokens") as tokens:
        for name in ("revoke_reason", "revoked_by", "created_by", "last_used_at", "expires_at"):
            tokens.drop_column(name)
