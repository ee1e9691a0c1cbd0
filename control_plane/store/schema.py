"""The store's tables: `metadata` is the schema that `Store.create_schema` makes.

Each query module turns the rows of its own tables into the frozen rows of `store.rows`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator

from onprem.control_plane.store.values import (
    ACTOR_MAX,
    AUDIT_DETAIL_MAX,
    DESCRIPTION_MAX,
    PEER_MAX,
    REASON_MAX,
    TOKEN_NAME_MAX,
    utc,
)

# --- schema -------------------------------------------------------------------------------------------------


class UTCDateTime(TypeDecorator[datetime]):
    """Stores aware datetimes as UTC and always reads them back aware in UTC.

    PostgreSQL's timestamptz keeps the instant; SQLite keeps text and drops the
    offset, so values are converted to UTC before they are written (which also
    keeps SQLite's text comparisons in time order).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

groups_table = Table(
    "groups",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("created_at", UTCDateTime(), nullable=False),
)

agents_table = Table(
    "agents",
    metadata,
    Column("agent_id", String(128), primary_key=True),
    Column("name", String(253), nullable=False),
    Column("group_name", String(63), ForeignKey("groups.name"), nullable=False),
    Column("hostname", String(255), nullable=False),
    Column("version", String(64), nullable=False),
    Column("enrolled_at", UTCDateTime(), nullable=False),
    Column("last_seen_at", UTCDateTime(), nullable=True),
    # X.509 serials are up to 20 bytes, beyond any SQL integer type, hence text.
    Column("cert_serial", String(64), nullable=False),
    Column("cert_expires_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("revoked_reason", Text(), nullable=False, default=""),
    Column("profiles", Text(), nullable=False, default="[]"),
    Index("ix_agents_group_name", "group_name"),
)

api_tokens_table = Table(
    "api_tokens",
    metadata,
    Column("token_id", String(32), primary_key=True),
    Column("name", String(TOKEN_NAME_MAX), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("groups", Text(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    # Added after release b333362 (issue 12); NULL: never expires (bootstrap tokens only).
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("last_used_at", UTCDateTime(), nullable=True),
    Column("created_by", String(ACTOR_MAX), nullable=False, default="", server_default=""),
    Column("revoked_by", String(ACTOR_MAX), nullable=False, default="", server_default=""),
    Column("revoke_reason", String(REASON_MAX), nullable=False, default="", server_default=""),
)

enrollment_tokens_table = Table(
    "enrollment_tokens",
    metadata,
    Column("token_id", String(32), primary_key=True),
    Column("secret_hash", String(64), nullable=False),
    Column("group_name", String(63), ForeignKey("groups.name"), nullable=False),
    Column("description", String(DESCRIPTION_MAX), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("used_at", UTCDateTime(), nullable=True),
    Column("used_by_agent", String(128), nullable=True),
    # Added after release b333362 (issue 12).
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("created_by", String(ACTOR_MAX), nullable=False, default="", server_default=""),
    Column("revoked_by", String(ACTOR_MAX), nullable=False, default="", server_default=""),
    Column("revoke_reason", String(REASON_MAX), nullable=False, default="", server_default=""),
)

# One counter per kind of change that caches elsewhere must notice at once (issue 12): a revocation
# bumps `api_tokens` in its own transaction, and every authentication compares the counter with the one
# its cached answer was read under. Replicas sharing a PostgreSQL store will announce the new value with
# NOTIFY (sent at commit, so never before the change is visible) and re-read it after reconnecting, so
# the counter stays the truth and the notification only saves the read.
#: The change counter bumped by every revocation of an operator token; the schema starts it at 0.
API_TOKENS_COUNTER: Final = "api_tokens"

change_counters_table = Table(
    "change_counters",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger(), nullable=False),
)

# Control-plane settings that admins change at run time (e.g. the default lifetime of operator tokens).
settings_table = Table(
    "settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

# The control plane's replicas (issue 14): each records itself and its heartbeat; one that missed
# its heartbeats is gone. A replica that stops cleanly deletes its row.
replicas_table = Table(
    "replicas",
    metadata,
    Column("replica_id", String(255), primary_key=True),
    # What agents dial, and what operators dial, as host:port ("" when behind a load balancer).
    Column("agent_address", String(255), nullable=False),
    Column("operator_address", String(255), nullable=False),
    Column("version", String(64), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("heartbeat_at", UTCDateTime(), nullable=False),
    # "serving", or "draining" once it is stopping (agents leave it, operators should too).
    Column("state", String(16), nullable=False),
)

# Which replica holds a stream of which agent: for ListAgents over all replicas and for drains. A
# replica writes its own rows; those of a replica that is gone are ignored, and deleted by any other.
agent_streams_table = Table(
    "agent_streams",
    metadata,
    Column("agent_id", String(128), primary_key=True),
    Column("replica_id", String(255), primary_key=True),
    Column("session_id", String(32), nullable=False),
    Column("connected_at", UTCDateTime(), nullable=False),
    Column("draining", Boolean(), nullable=False),
    Index("ix_agent_streams_replica_id", "replica_id"),
)

# A drain an admin asked for, for every replica holding a stream of the agent to carry out (the
# NOTIFY that announces it may be missed; each replica checks for drains newer than its streams).
agent_drains_table = Table(
    "agent_drains",
    metadata,
    Column("agent_id", String(128), primary_key=True),
    Column("requested_at", UTCDateTime(), nullable=False),
    Column("reason", Text(), nullable=False),
    Column("grace_ms", BigInteger(), nullable=False),
    Column("exit_after", Boolean(), nullable=False),
    Column("requested_by", String(ACTOR_MAX), nullable=False),
)

audit_table = Table(
    "audit",
    metadata,
    # BIGINT on PostgreSQL for a long-lived log; SQLite only autoincrements an INTEGER primary key.
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("at", UTCDateTime(), nullable=False),
    Column("principal", String(TOKEN_NAME_MAX), nullable=False),
    Column("role", String(16), nullable=False),
    Column("method", String(200), nullable=False),
    Column("group_name", String(63), nullable=True),
    Column("agent_id", String(128), nullable=True),
    Column("profile", String(200), nullable=True),
    Column("kind", String(16), nullable=False),
    Column("code", Integer(), nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("bytes_out", BigInteger(), nullable=False),
    Column("duration_ms", BigInteger(), nullable=False),
    Column("detail", String(AUDIT_DETAIL_MAX), nullable=False),
    # Added after release b333362 (issue 12): which token (its id, never its secret) and from where.
    Column("token_id", String(32), nullable=True),
    Column("peer", String(PEER_MAX), nullable=True),
    # The request's W3C trace id (revision 0005, issue 17): its spans and log lines carry the same.
    Column("trace_id", String(32), nullable=True),
    Index("ix_audit_at", "at"),
    # The audit API's pages of a group, or of a token limited to some groups, newest first (revision 0004).
    Index("ix_audit_group_at", "group_name", "at"),
    # ListAuditEvents by trace id: the rows of one trace (revision 0005).
    Index("ix_audit_trace_id", "trace_id"),
)
