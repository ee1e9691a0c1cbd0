"""What the store raises when an operation cannot be done; each message says why, for a person."""

from __future__ import annotations

from datetime import datetime

from onprem.control_plane.store.values import iso_utc


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
            f"the enrollment token expired at {iso_utc(expired_at)}; ask an administrator for a new one"
        )


class TokenRevoked(TokenError):
    def __init__(self, revoked_at: datetime, revoked_by: str) -> None:
        self.revoked_at = revoked_at
        self.revoked_by = revoked_by
        by = f" by {revoked_by}" if revoked_by else ""
        super().__init__(
            f"the enrollment token was revoked at {iso_utc(revoked_at)}{by}; ask an administrator for a new one"
        )


class TokenUsed(TokenError):
    def __init__(self, agent_id: str, used_at: datetime) -> None:
        self.agent_id = agent_id
        self.used_at = used_at
        super().__init__(
            f"the enrollment token was already used by agent {agent_id} at {iso_utc(used_at)}; "
            "enrollment tokens are single use, ask an administrator for a new one"
        )
