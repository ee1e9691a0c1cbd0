"""The frozen rows the store returns, and the words they use (roles, token prefixes, states).

Every datetime in a row is timezone-aware UTC, whatever the database handed back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

Role = Literal["admin", "operator"]
ROLES: Final[tuple[Role, ...]] = ("admin", "operator")
#: In a token's groups: every group, present and future.
ALL_GROUPS: Final = "*"

#: Tokens read `<prefix>_<id>_<secret>`; the id (public) names the token, `<prefix>_<id>` for people.
API_TOKEN_PREFIX: Final = "onp"
ENROLLMENT_TOKEN_PREFIX: Final = "onpe"


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
    #: The request's W3C trace id, 32 hex digits (revision 0005); None for rows of no trace.
    trace_id: str | None = None
    id: int | None = None


@dataclass(frozen=True)
class ActivityMinute:
    """The audit rows of one group in one minute: how many, and how many of them failed."""

    group_name: str
    #: The minute's start, UTC.
    minute: datetime
    requests: int
    errors: int
