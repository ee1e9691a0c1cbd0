"""The store's tables, and the conversion of database rows to frozen rows."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator

from onprem.control_plane.store_rows import (
    _ACTOR_MAX,
    _AUDIT_DETAIL_MAX,
    _DESCRIPTION_MAX,
    _PEER_MAX,
    _REASON_MAX,
    _TOKEN_NAME_MAX,
    AdvertisedProfile,
    AgentRow,
    ApiTokenRow,
    AuditEntry,
    EnrollmentTokenRow,
    GroupRow,
    Role,
    _utc,
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
        value = _utc(value)
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
    Column("name", String(_TOKEN_NAME_MAX), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("groups", Text(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    # Added after release b333362 (issue 12); NULL: never expires (bootstrap tokens only).
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("last_used_at", UTCDateTime(), nullable=True),
    Column("created_by", String(_ACTOR_MAX), nullable=False, default="", server_default=""),
    Column("revoked_by", String(_ACTOR_MAX), nullable=False, default="", server_default=""),
    Column("revoke_reason", String(_REASON_MAX), nullable=False, default="", server_default=""),
)

enrollment_tokens_table = Table(
    "enrollment_tokens",
    metadata,
    Column("token_id", String(32), primary_key=True),
    Column("secret_hash", String(64), nullable=False),
    Column("group_name", String(63), ForeignKey("groups.name"), nullable=False),
    Column("description", String(_DESCRIPTION_MAX), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("used_at", UTCDateTime(), nullable=True),
    Column("used_by_agent", String(128), nullable=True),
    # Added after release b333362 (issue 12).
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("created_by", String(_ACTOR_MAX), nullable=False, default="", server_default=""),
    Column("revoked_by", String(_ACTOR_MAX), nullable=False, default="", server_default=""),
    Column("revoke_reason", String(_REASON_MAX), nullable=False, default="", server_default=""),
)

# One counter per kind of change that caches elsewhere must notice at once (issue 12): a revocation
# bumps `api_tokens` in its own transaction, and every authentication compares the counter with the one
# its cached answer was read under. Replicas sharing a PostgreSQL store will announce the new value with
# NOTIFY (sent at commit, so never before the change is visible) and re-read it after reconnecting, so
# the counter stays the truth and the notification only saves the read.
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

audit_table = Table(
    "audit",
    metadata,
    # BIGINT on PostgreSQL for a long-lived log; SQLite only autoincrements an INTEGER primary key.
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("at", UTCDateTime(), nullable=False),
    Column("principal", String(_TOKEN_NAME_MAX), nullable=False),
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
    Column("detail", String(_AUDIT_DETAIL_MAX), nullable=False),
    # Added after release b333362 (issue 12): which token (its id, never its secret) and from where.
    Column("token_id", String(32), nullable=True),
    Column("peer", String(_PEER_MAX), nullable=True),
    Index("ix_audit_at", "at"),
)


# --- row conversion -----------------------------------------------------------------------------------------


def _group_row(row: Row[Any]) -> GroupRow:
    return GroupRow(name=row.name, created_at=row.created_at)


def _agent_row(row: Row[Any]) -> AgentRow:
    profiles = tuple(AdvertisedProfile.from_mapping(p) for p in json.loads(row.profiles))
    return AgentRow(
        agent_id=row.agent_id,
        name=row.name,
        group_name=row.group_name,
        hostname=row.hostname,
        version=row.version,
        enrolled_at=row.enrolled_at,
        last_seen_at=row.last_seen_at,
        cert_serial=int(row.cert_serial),
        cert_expires_at=row.cert_expires_at,
        revoked_at=row.revoked_at,
        revoked_reason=row.revoked_reason,
        profiles=profiles,
    )


def _api_token_row(row: Row[Any]) -> ApiTokenRow:
    return ApiTokenRow(
        token_id=row.token_id,
        name=row.name,
        role=cast(Role, row.role),
        groups=tuple(json.loads(row.groups)),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        created_by=row.created_by,
        revoked_by=row.revoked_by,
        revoke_reason=row.revoke_reason,
    )


def _enrollment_row(row: Row[Any]) -> EnrollmentTokenRow:
    return EnrollmentTokenRow(
        token_id=row.token_id,
        group_name=row.group_name,
        description=row.description,
        created_at=row.created_at,
        expires_at=row.expires_at,
        used_at=row.used_at,
        used_by_agent=row.used_by_agent,
        revoked_at=row.revoked_at,
        created_by=row.created_by,
        revoked_by=row.revoked_by,
        revoke_reason=row.revoke_reason,
    )


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


def _profiles_json(profiles: Iterable[AdvertisedProfile | Mapping[str, Any]]) -> str:
    normalised = [
        (p if isinstance(p, AdvertisedProfile) else AdvertisedProfile.from_mapping(p)).to_dict()
        for p in profiles
    ]
    return json.dumps(normalised, separators=(",", ":"))


