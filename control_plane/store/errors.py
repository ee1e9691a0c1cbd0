"""What the store raises: the project's error tree (`tunnel.errors`), so that callers need no translation.

A refusal that ends a request is a `RequestError` with the gRPC code, the reason and the
message the caller gets: the operator API's and the enrollment listener's one error
boundary (`control_plane.api.errors`) sends them as they are. A missing group, agent or
token is the tree's own `NotFound`, with reason GROUP_NOT_FOUND, AGENT_NOT_FOUND or
TOKEN_NOT_FOUND. `StoreError` is the store failing itself (not a refusal of a request).

    OnpremError
    ├── StoreError                         the store cannot work (e.g. a database of an older release)
    └── RequestError
        ├── NotFound                       (tunnel.errors) no such group, agent or token
        ├── AlreadyExists
        │   └── AgentAlreadyExists         AGENT_EXISTS: an agent with this id is recorded already
        ├── PermissionDenied
        │   ├── AgentRevoked               AGENT_REVOKED: an admin revoked the agent
        │   └── EnrollmentTokenRefused     BAD_ENROLLMENT_TOKEN: the token cannot enroll an agent
        │       ├── EnrollmentTokenInvalid     malformed, unknown or a wrong secret (says no more)
        │       ├── EnrollmentTokenExpired     its lifetime ended it
        │       ├── EnrollmentTokenRevoked     an admin ended it
        │       └── EnrollmentTokenUsed        an agent enrolled with it (single use)
        └── FailedPrecondition
            └── UsedEnrollmentTokenNotRevocable  TOKEN_USED: an agent enrolled with it; revoke the agent
"""

from __future__ import annotations

from datetime import datetime

from onprem.control_plane.store.rows import ENROLLMENT_TOKEN_PREFIX
from onprem.control_plane.store.values import iso_utc
from onprem.tunnel.errors import AlreadyExists, FailedPrecondition, OnpremError, PermissionDenied


class StoreError(OnpremError):
    """The store cannot do what it was asked, through no fault of the request; the message says why."""


# --- agents -------------------------------------------------------------------------------------------------


class AgentAlreadyExists(AlreadyExists):
    """An agent with this id is recorded already."""

    default_reason = "AGENT_EXISTS"

    def __init__(self, agent_id: str) -> None:
        super().__init__(f"an agent with id {agent_id!r} exists already")
        self.agent_id = agent_id


class AgentRevoked(PermissionDenied):
    """An admin revoked the agent: it may neither connect nor get a certificate again."""

    default_reason = "AGENT_REVOKED"

    def __init__(self, agent_id: str, revoked_reason: str) -> None:
        super().__init__(f"agent '{agent_id}' was revoked ({revoked_reason}); enroll it again with a new token")
        self.agent_id = agent_id
        self.revoked_reason = revoked_reason


# --- enrollment tokens --------------------------------------------------------------------------------------


class EnrollmentTokenRefused(PermissionDenied):
    """An enrollment token that cannot enroll an agent (now or ever)."""

    default_reason = "BAD_ENROLLMENT_TOKEN"


class EnrollmentTokenInvalid(EnrollmentTokenRefused):
    """The token is malformed, unknown, or its secret is wrong; deliberately says no more."""

    def __init__(self) -> None:
        super().__init__("the enrollment token is not valid")


class EnrollmentTokenExpired(EnrollmentTokenRefused):
    """The token's lifetime ended before it was used."""

    def __init__(self, expired_at: datetime) -> None:
        super().__init__(
            f"the enrollment token expired at {iso_utc(expired_at)}; ask an administrator for a new one"
        )
        self.expired_at = expired_at


class EnrollmentTokenRevoked(EnrollmentTokenRefused):
    """An admin (`revoked_by`) revoked the token before it was used."""

    def __init__(self, revoked_at: datetime, revoked_by: str) -> None:
        by = f" by {revoked_by}" if revoked_by else ""
        super().__init__(
            f"the enrollment token was revoked at {iso_utc(revoked_at)}{by}; ask an administrator for a new one"
        )
        self.revoked_at = revoked_at
        self.revoked_by = revoked_by


class EnrollmentTokenUsed(EnrollmentTokenRefused):
    """An agent (`agent_id`) enrolled with the token already; enrollment tokens are single use."""

    def __init__(self, agent_id: str, used_at: datetime) -> None:
        super().__init__(
            f"the enrollment token was already used by agent {agent_id} at {iso_utc(used_at)}; "
            "enrollment tokens are single use, ask an administrator for a new one"
        )
        self.agent_id = agent_id
        self.used_at = used_at


class UsedEnrollmentTokenNotRevocable(FailedPrecondition):
    """An agent (`agent_id`) enrolled with the token, so there is nothing to revoke: the agent is."""

    default_reason = "TOKEN_USED"

    def __init__(self, token_id: str, agent_id: str, used_at: datetime) -> None:
        super().__init__(
            f"enrollment token {ENROLLMENT_TOKEN_PREFIX}_{token_id} was already used by agent {agent_id} at "
            f"{iso_utc(used_at)}, so there is nothing to revoke; revoke the agent instead (AgentService/RevokeAgent)"
        )
        self.token_id = token_id
        self.agent_id = agent_id
        self.used_at = used_at
