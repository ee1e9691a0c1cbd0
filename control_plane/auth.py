"""Who is calling the operator API, and what they may use.

Free of gRPC so that it can be tested and reused without a server: the API
layer reads the metadata, calls `parse_bearer`, authenticates the token with
the store and maps a missing or bad token to UNAUTHENTICATED itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from onprem.control_plane.store import ALL_GROUPS, API_TOKEN_PREFIX, ApiTokenRow, Role

AUTHORIZATION_KEY = "authorization"
_BEARER_SCHEME = "bearer"


@dataclass(frozen=True)
class Principal:
    """An authenticated operator token.

    The role and the groups are independent: `admin` adds the right to manage
    agents and tokens, while `groups` alone decides which groups' agents the
    token may reach (an admin can always mint itself a wider token, so this is
    about avoiding accidents, not a boundary against admins).
    """

    token_id: str
    name: str
    role: Role
    groups: frozenset[str]
    #: None: the token never expires.
    expires_at: datetime | None = None

    @classmethod
    def from_api_token(cls, row: ApiTokenRow) -> Principal:
        return cls(token_id=row.token_id, name=row.name, role=row.role, groups=frozenset(row.groups),
                   expires_at=row.expires_at)

    @property
    def short_id(self) -> str:
        return f"{API_TOKEN_PREFIX}_{self.token_id}"

    @property
    def label(self) -> str:
        """How messages and logs name the token: its name and id, never its secret."""
        return f"'{self.name}' ({self.short_id})"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_use_group(self, group: str) -> bool:
        return ALL_GROUPS in self.groups or group in self.groups

    def may_grant(self, groups: Sequence[str]) -> bool:
        """Whether every group in `groups` (the star included) is one this token may use itself."""
        return all((ALL_GROUPS in self.groups) if g == ALL_GROUPS else self.may_use_group(g) for g in groups)


def parse_bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the `authorization: Bearer <token>` entry, or None when there is no usable one.

    None covers: no authorization entry, another scheme, an empty token, a token
    with inner whitespace, and more than one authorization entry (which is
    ambiguous, so neither is trusted).
    """
    if not metadata:
        return None
    values = [value for key, value in metadata if key.lower() == AUTHORIZATION_KEY]
    if len(values) != 1:
        return None
    value = values[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    parts = value.split()
    if len(parts) != 2 or parts[0].lower() != _BEARER_SCHEME:
        return None
    return parts[1]
