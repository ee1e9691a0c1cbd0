"""What the store accepts, and how it reads and shows times: length limits, name rules, UTC datetimes.

Shared by the store's modules (the tables are as wide as these limits) and by its callers:
the operator API checks request fields against the same limits before it calls the store.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

# --- limits (the widths of the columns that hold them) ------------------------------------------------------

#: An operator token's name (also an audit row's principal).
TOKEN_NAME_MAX: Final = 200
#: An enrollment token's description.
DESCRIPTION_MAX: Final = 500
#: Why an agent or a token was revoked.
REASON_MAX: Final = 500
#: Who created or revoked a token: a token's label, or the local CLI and its user.
ACTOR_MAX: Final = 255
#: A caller's address as gRPC reports it, in audit rows.
PEER_MAX: Final = 128
#: An audit row's note; a longer one is cut, not refused.
AUDIT_DETAIL_MAX: Final = 500
#: The most audit rows one read returns.
AUDIT_LIST_MAX: Final = 10_000

# --- names --------------------------------------------------------------------------------------------------

_GROUP_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,63}")
# Agent names are shown to operators and are often host names, so dots are allowed.
_AGENT_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,253}")


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


def check_text(value: str, what: str, limit: int, *, required: bool = False) -> str:
    """Return `value` if it is at most `limit` characters (and not blank, if `required`), else raise
    ValueError naming it as `what`."""
    if required and not value.strip():
        raise ValueError(f"the {what} must not be empty")
    if len(value) > limit:
        raise ValueError(f"the {what} is too long ({len(value)} characters, at most {limit})")
    return value


# --- times --------------------------------------------------------------------------------------------------


def utc(value: datetime, what: str = "time") -> datetime:
    """`value` in UTC; a naive time is refused (ValueError naming it as `what`), being ambiguous."""
    if value.tzinfo is None:
        # Refusing naive times keeps every stored time in UTC.
        raise ValueError(f"the {what} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)


def utcnow() -> datetime:
    """The store's default clock."""
    return datetime.now(UTC)


def iso_utc(value: datetime) -> str:
    """A time as people read it in messages: UTC, ISO 8601, with a Z."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
