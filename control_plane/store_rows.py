"""The store's vocabulary: constants, errors, the frozen rows it returns, and name validation.

Kept apart from the transactions (`store`) and the tables (`store_schema`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

Role = Literal["admin", "operator"]
ROLES: Final[tuple[Role, ...]] = ("admin", "operator")
ALL_GROUPS: Final = "*"
DEFAULT_DB_FILENAME: Final = "control-plane.db"

ENROLLMENT_TTL_DEFAULT: Final = timedelta(hours=1)
ENROLLMENT_TTL_MAX: Final = timedelta(days=7)
#: How long an operator token lives when its creator does not say; admins change it with
#: `onprem-control-plane token-settings --default-ttl` (the `settings` table).
OPERATOR_TOKEN_TTL_DEFAULT: Final = timedelta(days=90)
#: The longest lifetime an operator token may be given; only the local bootstrap command
#: (`create-admin-token --no-expiry`) makes tokens that never expire.
OPERATOR_TOKEN_TTL_MAX: Final = timedelta(days=366)

API_TOKEN_PREFIX: Final = "onp"
ENROLLMENT_TOKEN_PREFIX: Final = "onpe"

_TOKEN_ID_BYTES: Final = 8
_SECRET_BYTES: Final = 32
# token_hex(8) and token_urlsafe(32) have fixed lengths; matching them exactly
# rejects garbage before it reaches the database.
_TOKEN_ID_RE: Final = f"[0-9a-f]{{{_TOKEN_ID_BYTES * 2}}}"
_SECRET_RE: Final = "[A-Za-z0-9_-]{43}"

_GROUP_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,63}")
# Agent names are shown to operators and are often host names, so dots are allowed.
_AGENT_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,253}")
_TOKEN_NAME_MAX: Final = 200
_DESCRIPTION_MAX: Final = 500
_REASON_MAX: Final = 500
#: Who created or revoked a token: a token's label, or the local CLI and its user.
_ACTOR_MAX: Final = 255
_PEER_MAX: Final = 128
_AUDIT_DETAIL_MAX: Final = 500
_AUDIT_LIST_MAX: Final = 10_000

# SQLite serialises writers; a writer that finds the file locked waits this long
# before giving up, which covers audit bursts from many concurrent requests.
_SQLITE_BUSY_TIMEOUT_MS: Final = 30_000


# --- errors -------------------------------------------------------------------------------------------------


class StoreError(Exception):
    """A store operation could not be done; the message says why, for a person."""


class NotFound(StoreError, LookupError):
    """The group, agent or token named does not exist."""


class Conflict(StoreError):
    """The row to create exists already."""


class AgentRevoked(StoreError):
    """The agent is revoked, so the operation is refused."""


class TokenError(StoreError):
    """An enrollment token cannot be used."""


class TokenInvalid(TokenError):
    """The token is malformed, unknown, or its secret is wrong; deliberately says no more."""

    def __init__(self) -> None:
        super().__init__("the enrollment token is not valid")


class TokenExpired(TokenError):
    def __init__(self, expired_at: datetime) -> None:
        self.expired_at = expired_at
        super().__init__(
            f"the enrollment token expired at {_iso(expired_at)}; ask an administrator for a new one"
        )


class TokenRevoked(TokenError):
    def __init__(self, revoked_at: datetime, revoked_by: str) -> None:
        self.revoked_at = revoked_at
        self.revoked_by = revoked_by
        by = f" by {revoked_by}" if revoked_by else ""
        super().__init__(
            f"the enrollment token was revoked at {_iso(revoked_at)}{by}; ask an administrator for a new one"
        )


class TokenUsed(TokenError):
    def __init__(self, agent_id: str, used_at: datetime) -> None:
        self.agent_id = agent_id
        self.used_at = used_at
        super().__init__(
            f"the enrollment token was already used by agent {agent_id} at {_iso(used_at)}; "
            "enrollment tokens are single use, ask an administrator for a new one"
        )


# --- rows ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupRow:
    name: str
    created_at: datetime


@dataclass(frozen=True)
class AdvertisedProfile:
    """A profile as an agent last advertised it; stored as JSON on the agent row."""

    name: str
    kind: str
    read_only: bool = False
    dialect: str = ""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AdvertisedProfile:
        name, kind = data.get("name"), data.get("kind")
        if not isinstance(name, str) or not name or not isinstance(kind, str) or not kind:
            raise ValueError(f"a profile needs a non-empty name and kind, got {dict(data)!r}")
        dialect = data.get("dialect") or ""
        return cls(name=name, kind=kind, read_only=bool(data.get("read_only", False)), dialect=str(dialect))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "read_only": self.read_only, "dialect": self.dialect}


@dataclass(frozen=True)
class AgentRow:
    agent_id: str
    name: str
    group_name: str
    hostname: str
    version: str
    enrolled_at: datetime
    last_seen_at: datetime | None
    cert_serial: int
    cert_expires_at: datetime
    revoked_at: datetime | None
    revoked_reason: str
    profiles: tuple[AdvertisedProfile, ...]

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


TokenState = Literal["active", "expired", "revoked", "used"]


@dataclass(frozen=True)
class ApiTokenRow:
    """An operator token, without its secret or the secret's hash.

    People and audit rows name a token by `label`: its name and its id, which is
    the public start of the token (`onp_<id>_<secret>`), never the secret.
    """

    token_id: str
    name: str
    role: Role
    groups: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None
    #: None: the token never expires (only the local bootstrap command makes such tokens).
    expires_at: datetime | None = None
    #: When the token last authenticated a call, to within the control plane's flush interval.
    last_used_at: datetime | None = None
    created_by: str = ""
    revoked_by: str = ""
    revoke_reason: str = ""

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def short_id(self) -> str:
        return f"{API_TOKEN_PREFIX}_{self.token_id}"

    @property
    def label(self) -> str:
        return f"'{self.name}' ({self.short_id})"

    def state(self, now: datetime) -> TokenState:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


@dataclass(frozen=True)
class EnrollmentTokenRow:
    """An enrollment token, without its secret or the secret's hash."""

    token_id: str
    group_name: str
    description: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    used_by_agent: str | None
    revoked_at: datetime | None = None
    created_by: str = ""
    revoked_by: str = ""
    revoke_reason: str = ""

    @property
    def short_id(self) -> str:
        return f"{ENROLLMENT_TOKEN_PREFIX}_{self.token_id}"

    def state(self, now: datetime) -> TokenState:
        if self.used_at is not None:
            return "used"
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        return "active"


@dataclass(frozen=True)
class AuditEntry:
    """One operator request. `detail` is a short human note: never payloads, SQL text results or secrets.

    `principal` is the token's name ("anonymous" when no valid token came), `token_id` its id (never its
    secret), `peer` the caller's address as gRPC reports it (e.g. "ipv4:10.0.0.7:51234").
    """

    at: datetime
    principal: str
    role: str
    method: str
    kind: str
    code: int
    outcome: str
    group_name: str | None = None
    agent_id: str | None = None
    profile: str | None = None
    bytes_out: int = 0
    duration_ms: int = 0
    detail: str = ""
    token_id: str | None = None
    peer: str | None = None
    id: int | None = None


# --- validation ---------------------------------------------------------------------------------------------


def validate_group_name(name: str) -> str:
    """Return `name` if it is a valid group name, else raise ValueError saying what is allowed."""
    if not isinstance(name, str) or _GROUP_NAME_RE.fullmatch(name) is None:
        raise ValueError(f"invalid group name {name!r}: use 1 to 63 letters, digits, '-' or '_'")
    return name


def validate_agent_name(name: str) -> str:
    """Return `name` if it is a valid agent name, else raise ValueError saying what is allowed."""
    if not isinstance(name, str) or _AGENT_NAME_RE.fullmatch(name) is None:
        raise ValueError(f"invalid agent name {name!r}: use 1 to 253 letters, digits, '.', '-' or '_'")
    return name


def _check_text(value: str, what: str, limit: int, *, required: bool = False) -> str:
    if required and not value.strip():
        raise ValueError(f"the {what} must not be empty")
    if len(value) > limit:
        raise ValueError(f"the {what} is too long ({len(value)} characters, at most {limit})")
    return value


def _utc(value: datetime, what: str = "time") -> datetime:
    if value.tzinfo is None:
        # A naive time is ambiguous; refusing it keeps every stored time in UTC.
        raise ValueError(f"the {what} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def default_url(state_dir: Path) -> str:
    """The embedded default: a SQLite file in the control plane's state directory."""
    return f"sqlite:///{Path(state_dir).resolve() / DEFAULT_DB_FILENAME}"




def iso_utc(value: datetime) -> str:
    """A time as people read it in messages: UTC, ISO 8601, with a Z."""
    return _iso(value)
