"""The store's credentials: operator tokens, enrollment tokens, the change counter and token settings.

Secrets are stored only as hashes; the plaintext is returned once, at creation.

Revocation and the caches of other processes: every revocation of an operator
token bumps the `api_tokens` change counter in the same transaction. A control
plane that caches authenticated tokens reads the counter on every call (one
primary-key read) and trusts a cached answer only if it was read under the
same counter value, so a token revoked by any process, the local CLI included,
is refused on its very next call.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import Connection, Row, and_, insert, or_, select, update

from onprem.control_plane.store.errors import (
    EnrollmentTokenExpired,
    EnrollmentTokenInvalid,
    EnrollmentTokenRevoked,
    EnrollmentTokenUsed,
    UsedEnrollmentTokenNotRevocable,
)
from onprem.control_plane.store.groups import GroupStore
from onprem.control_plane.store.rows import (
    ALL_GROUPS,
    API_TOKEN_PREFIX,
    ENROLLMENT_TOKEN_PREFIX,
    ROLES,
    ApiTokenRow,
    EnrollmentTokenRow,
    Role,
)
from onprem.control_plane.store.schema import (
    API_TOKENS_COUNTER,
    api_tokens_table,
    change_counters_table,
    enrollment_tokens_table,
    settings_table,
)
from onprem.control_plane.store.values import (
    ACTOR_MAX,
    DESCRIPTION_MAX,
    REASON_MAX,
    TOKEN_NAME_MAX,
    check_text,
    utc,
    validate_group_name,
)
from onprem.tunnel.errors import NotFound

ENROLLMENT_TTL_DEFAULT: Final = timedelta(hours=1)
ENROLLMENT_TTL_MAX: Final = timedelta(days=7)
#: How long an operator token lives when its creator does not say; admins change it with
#: `onprem-control-plane token-settings --default-ttl` (the `settings` table).
OPERATOR_TOKEN_TTL_DEFAULT: Final = timedelta(days=90)
#: The longest lifetime an operator token may be given; only the local bootstrap command
#: (`create-admin-token --no-expiry`) makes tokens that never expire.
OPERATOR_TOKEN_TTL_MAX: Final = timedelta(days=366)

_TOKEN_ID_BYTES: Final = 8
_SECRET_BYTES: Final = 32
# token_hex(8) and token_urlsafe(32) have fixed lengths; matching them exactly
# rejects garbage before it reaches the database.
_TOKEN_ID_RE: Final = f"[0-9a-f]{{{_TOKEN_ID_BYTES * 2}}}"
_SECRET_RE: Final = "[A-Za-z0-9_-]{43}"

_DEFAULT_TTL_SETTING: Final = "operator_token_default_ttl_seconds"

#: A position in a token list: (created_at, token_id) of the last row of the previous page.
PageKey = tuple[datetime, str]


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


# --- secrets ------------------------------------------------------------------------------------------------


def _hash_secret(secret: str) -> str:
    # The secret is 32 random bytes, so it cannot be guessed or found in a dictionary:
    # a fast unsalted SHA-256 is enough; slow password hashes only matter for low-entropy secrets.
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(_hash_secret(secret), stored_hash)


def _new_token(prefix: str) -> tuple[str, str, str]:
    token_id = secrets.token_hex(_TOKEN_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    return f"{prefix}_{token_id}_{secret}", token_id, secret


_API_TOKEN_RE: Final = re.compile(f"{API_TOKEN_PREFIX}_({_TOKEN_ID_RE})_({_SECRET_RE})")
_ENROLLMENT_TOKEN_RE: Final = re.compile(f"{ENROLLMENT_TOKEN_PREFIX}_({_TOKEN_ID_RE})_({_SECRET_RE})")
_TOKEN_ID_ONLY_RE: Final = re.compile(_TOKEN_ID_RE)


def _parse_token(token: object, pattern: re.Pattern[str]) -> tuple[str, str] | None:
    if not isinstance(token, str):
        return None
    match = pattern.fullmatch(token)
    if match is None:
        return None
    return match.group(1), match.group(2)


def api_token_id(token: str) -> str | None:
    """The id of a well-formed operator token (its public part), without checking its secret."""
    parsed = _parse_token(token, _API_TOKEN_RE)
    return None if parsed is None else parsed[0]


def enrollment_token_id(token: str) -> str | None:
    """The id of a well-formed enrollment token (its public part), without checking its secret."""
    parsed = _parse_token(token, _ENROLLMENT_TOKEN_RE)
    return None if parsed is None else parsed[0]


def parse_token_id(text: str, prefix: str) -> str | None:
    """A token id from what a person may paste: the id, `<prefix>_<id>`, or a resource name's last part."""
    text = text.strip().rsplit("/", 1)[-1]
    text = text.removeprefix(f"{prefix}_")
    return text if _TOKEN_ID_ONLY_RE.fullmatch(text) else None


def _groups(groups: Sequence[str]) -> list[str]:
    if isinstance(groups, str):
        # A bare string would otherwise be taken as a list of one-letter groups.
        raise ValueError("groups must be a list of group names, not a single string")
    wanted: list[str] = []
    for group in groups:
        if group != ALL_GROUPS:
            validate_group_name(group)
        if group not in wanted:
            wanted.append(group)
    return wanted


def _after(table: Any, after: PageKey | None) -> Any:
    """Rows strictly after `after` in (created_at, token_id) order; written out for every dialect."""
    if after is None:
        return None
    created_at, token_id = after
    return or_(table.c.created_at > created_at,
               and_(table.c.created_at == created_at, table.c.token_id > token_id))


class TokenStore(GroupStore):
    """Operator and enrollment tokens (making an enrollment token makes its group)."""

    # --- the change counter ---------------------------------------------------------------------------------

    def _bump(self, conn: Connection, name: str = API_TOKENS_COUNTER) -> None:
        table = change_counters_table
        if conn.execute(update(table).where(table.c.name == name).values(value=table.c.value + 1)).rowcount == 0:
            # No counter row (a schema made without create_schema): a change must never go unannounced.
            self._insert_ignoring_duplicates(conn, table, {"name": name, "value": 0})
            conn.execute(update(table).where(table.c.name == name).values(value=table.c.value + 1))

    def change_counter(self, name: str = API_TOKENS_COUNTER) -> int:
        """The counter's value; it only grows, and grows with every revocation of its kind."""
        table = change_counters_table
        with self._read() as conn:
            value = conn.execute(select(table.c.value).where(table.c.name == name)).scalar()
        return int(value or 0)

    # --- settings -------------------------------------------------------------------------------------------

    def default_token_ttl(self) -> timedelta:
        """How long an operator token lives when its creator does not say."""
        with self._read() as conn:
            value = conn.execute(select(settings_table.c.value)
                                 .where(settings_table.c.name == _DEFAULT_TTL_SETTING)).scalar()
        return OPERATOR_TOKEN_TTL_DEFAULT if value is None else timedelta(seconds=float(value))

    def set_default_token_ttl(self, ttl: timedelta) -> timedelta:
        """Change the default lifetime of new operator tokens (existing tokens keep theirs)."""
        _check_ttl(ttl)
        values = {"value": repr(ttl.total_seconds()), "updated_at": self._now()}
        table = settings_table
        with self._write() as conn:
            changed = conn.execute(update(table).where(table.c.name == _DEFAULT_TTL_SETTING).values(values))
            if changed.rowcount == 0:
                conn.execute(insert(table).values(name=_DEFAULT_TTL_SETTING, **values))
        return ttl

    # --- operator tokens ------------------------------------------------------------------------------------

    def create_api_token(
        self, name: str, role: Role, groups: Sequence[str], ttl: timedelta | None = None, *,
        no_expiry: bool = False, created_by: str = "",
    ) -> tuple[str, ApiTokenRow]:
        """Create an operator token; the plaintext token is returned here and nowhere else.

        It expires after `ttl`, or the default lifetime when `ttl` is None; `no_expiry`
        makes a token that never expires (for bootstrapping, from the local CLI only).
        """
        check_text(name, "token name", TOKEN_NAME_MAX, required=True)
        check_text(created_by, "creator", ACTOR_MAX)
        if role not in ROLES:
            raise ValueError(f"invalid role {role!r}: use one of {', '.join(ROLES)}")
        wanted = _groups(groups)
        now = self._now()
        expires_at: datetime | None = None
        if not no_expiry:
            expires_at = now + _check_ttl(ttl if ttl is not None else self.default_token_ttl())
        token, token_id, secret = _new_token(API_TOKEN_PREFIX)
        values = {
            "token_id": token_id,
            "name": name,
            "secret_hash": _hash_secret(secret),
            "role": role,
            "groups": json.dumps(wanted),
            "created_at": now,
            "revoked_at": None,
            "expires_at": expires_at,
            "last_used_at": None,
            "created_by": created_by,
            "revoked_by": "",
            "revoke_reason": "",
        }
        with self._write() as conn:
            conn.execute(insert(api_tokens_table).values(values))
            row = conn.execute(select(api_tokens_table).where(api_tokens_table.c.token_id == token_id)).one()
        return token, _api_token_row(row)

    def find_api_token(self, token: str) -> ApiTokenRow | None:
        """The token's row if the token is well formed, known and has the right secret, revoked or not.

        Callers decide what a revoked or expired token means (and can say so), which a
        caller with a wrong secret must never learn: it gets None, as for an unknown token.
        """
        parsed = _parse_token(token, _API_TOKEN_RE)
        if parsed is None:
            return None
        token_id, secret = parsed
        with self._read() as conn:
            row = conn.execute(select(api_tokens_table).where(api_tokens_table.c.token_id == token_id)).first()
        if row is None or not _secret_matches(secret, row.secret_hash):
            return None
        return _api_token_row(row)

    def authenticate_api_token(self, token: str) -> ApiTokenRow | None:
        """The token's row if the token is well formed, known, has the right secret, and is neither
        revoked nor expired (by the store's clock)."""
        row = self.find_api_token(token)
        if row is None or row.state(self._now()) != "active":
            return None
        return row

    def get_api_token(self, token_id: str) -> ApiTokenRow | None:
        with self._read() as conn:
            row = conn.execute(select(api_tokens_table).where(api_tokens_table.c.token_id == token_id)).first()
        return None if row is None else _api_token_row(row)

    def get_api_tokens(self, token_ids: Sequence[str]) -> list[ApiTokenRow]:
        """The rows of these tokens (unknown ids are left out), in no particular order."""
        if not token_ids:
            return []
        stmt = select(api_tokens_table).where(api_tokens_table.c.token_id.in_(list(token_ids)))
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        return [_api_token_row(r) for r in rows]

    def list_api_tokens(self, *, limit: int | None = None, after: PageKey | None = None) -> list[ApiTokenRow]:
        """Operator tokens, oldest first; `after` and `limit` page through them."""
        table = api_tokens_table
        stmt = select(table).order_by(table.c.created_at, table.c.token_id)
        if after is not None:
            stmt = stmt.where(_after(table, after))
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        return [_api_token_row(r) for r in rows]

    def revoke_api_token(self, token_id: str, *, by: str = "", reason: str = "") -> ApiTokenRow:
        """Revoke an operator token; revoking again keeps the first revocation (time, by, reason).

        Bumps the change counter in the same transaction, so every cache learns of it on its
        next read of the counter.
        """
        check_text(by, "revoker", ACTOR_MAX)
        check_text(reason, "reason", REASON_MAX)
        table = api_tokens_table
        stmt = (
            update(table)
            .where(table.c.token_id == token_id)
            .where(table.c.revoked_at.is_(None))
            .values(revoked_at=self._now(), revoked_by=by, revoke_reason=reason)
        )
        with self._write() as conn:
            if conn.execute(stmt).rowcount:
                self._bump(conn)
            row = conn.execute(select(table).where(table.c.token_id == token_id)).first()
        if row is None:
            raise NotFound(f"no operator token has the id {token_id!r}", reason="TOKEN_NOT_FOUND")
        return _api_token_row(row)

    def touch_api_tokens(self, used: Mapping[str, datetime]) -> None:
        """Move tokens' last-used times forward; never back (another replica may have a later one)."""
        if not used:
            return
        table = api_tokens_table
        with self._write() as conn:
            for token_id, at in used.items():
                conn.execute(
                    update(table)
                    .where(table.c.token_id == token_id)
                    .where(table.c.last_used_at.is_(None) | (table.c.last_used_at < utc(at)))
                    .values(last_used_at=at)
                )

    # --- enrollment tokens ----------------------------------------------------------------------------------

    def create_enrollment_token(
        self, group: str, ttl: timedelta = ENROLLMENT_TTL_DEFAULT, description: str = "", *, created_by: str = ""
    ) -> tuple[str, EnrollmentTokenRow]:
        """Create a single-use enrollment token for `group`, creating the group if needed."""
        validate_group_name(group)
        if ttl <= timedelta(0) or ttl > ENROLLMENT_TTL_MAX:
            raise ValueError(
                f"the enrollment token's lifetime must be more than 0 and at most {ENROLLMENT_TTL_MAX}, got {ttl}"
            )
        check_text(description, "description", DESCRIPTION_MAX)
        check_text(created_by, "creator", ACTOR_MAX)
        token, token_id, secret = _new_token(ENROLLMENT_TOKEN_PREFIX)
        now = self._now()
        values = {
            "token_id": token_id,
            "secret_hash": _hash_secret(secret),
            "group_name": group,
            "description": description,
            "created_at": now,
            "expires_at": now + ttl,
            "used_at": None,
            "used_by_agent": None,
            "revoked_at": None,
            "created_by": created_by,
            "revoked_by": "",
            "revoke_reason": "",
        }
        table = enrollment_tokens_table
        with self._write() as conn:
            self._ensure_group(conn, group)
            conn.execute(insert(table).values(values))
            row = conn.execute(select(table).where(table.c.token_id == token_id)).one()
        return token, _enrollment_row(row)

    def check_enrollment_token(self, token: str, now: datetime | None = None) -> EnrollmentTokenRow:
        """The token's row if it could enroll an agent now; spends nothing (consume does, atomically).

        Lets enrollment refuse a bad token before doing any signing work. Raises an
        EnrollmentTokenRefused: EnrollmentTokenInvalid, ...Revoked, ...Used or ...Expired.
        """
        parsed = _parse_token(token, _ENROLLMENT_TOKEN_RE)
        if parsed is None:
            raise EnrollmentTokenInvalid()
        token_id, secret = parsed
        at = utc(now) if now is not None else self._now()
        table = enrollment_tokens_table
        with self._read() as conn:
            row = conn.execute(select(table).where(table.c.token_id == token_id)).first()
        if row is None or not _secret_matches(secret, row.secret_hash):
            raise EnrollmentTokenInvalid()
        _raise_unless_usable(row, at)
        return _enrollment_row(row)

    def consume_enrollment_token(
        self, token: str, agent_id: str, now: datetime | None = None
    ) -> EnrollmentTokenRow:
        """Spend an enrollment token on `agent_id`; of concurrent attempts with one token, one wins.

        Raises an EnrollmentTokenRefused (...Invalid, ...Revoked, ...Expired or ...Used). A wrong
        secret is always EnrollmentTokenInvalid, so that guessing reveals nothing about real tokens.
        """
        parsed = _parse_token(token, _ENROLLMENT_TOKEN_RE)
        if parsed is None:
            raise EnrollmentTokenInvalid()
        token_id, secret = parsed
        at = utc(now) if now is not None else self._now()
        table = enrollment_tokens_table
        by_id = select(table).where(table.c.token_id == token_id)
        with self._write() as conn:
            row = conn.execute(by_id).first()
            if row is None or not _secret_matches(secret, row.secret_hash):
                raise EnrollmentTokenInvalid()
            # The conditions live in the UPDATE itself, not only in the read above: a concurrent
            # enrollment (or revocation) that read the same unused row will find it changed here.
            claimed = conn.execute(
                update(table)
                .where(table.c.token_id == token_id)
                .where(table.c.used_at.is_(None))
                .where(table.c.revoked_at.is_(None))
                .where(table.c.expires_at > at)
                .values(used_at=at, used_by_agent=agent_id)
            ).rowcount
            current = conn.execute(by_id).one()
        if claimed == 1:
            return _enrollment_row(current)
        _raise_unless_usable(current, at)
        raise EnrollmentTokenExpired(current.expires_at)  # unreachable unless the clock moved back

    def get_enrollment_token(self, token_id: str) -> EnrollmentTokenRow | None:
        table = enrollment_tokens_table
        with self._read() as conn:
            row = conn.execute(select(table).where(table.c.token_id == token_id)).first()
        return None if row is None else _enrollment_row(row)

    def list_enrollment_tokens(
        self, *, limit: int | None = None, after: PageKey | None = None, group: str | None = None
    ) -> list[EnrollmentTokenRow]:
        """Enrollment tokens, oldest first; `after` and `limit` page through them."""
        table = enrollment_tokens_table
        stmt = select(table).order_by(table.c.created_at, table.c.token_id)
        if after is not None:
            stmt = stmt.where(_after(table, after))
        if group is not None:
            stmt = stmt.where(table.c.group_name == group)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        return [_enrollment_row(r) for r in rows]

    def revoke_enrollment_token(self, token_id: str, *, by: str = "", reason: str = "") -> EnrollmentTokenRow:
        """Revoke an unused enrollment token; revoking again keeps the first revocation.

        Raises NotFound, or UsedEnrollmentTokenNotRevocable for a token an agent already used (revoke
        the agent instead).
        """
        check_text(by, "revoker", ACTOR_MAX)
        check_text(reason, "reason", REASON_MAX)
        table = enrollment_tokens_table
        stmt = (
            update(table)
            .where(table.c.token_id == token_id)
            .where(table.c.revoked_at.is_(None))
            .where(table.c.used_at.is_(None))
            .values(revoked_at=self._now(), revoked_by=by, revoke_reason=reason)
        )
        with self._write() as conn:
            conn.execute(stmt)
            row = conn.execute(select(table).where(table.c.token_id == token_id)).first()
        if row is None:
            raise NotFound(f"no enrollment token has the id {token_id!r}", reason="TOKEN_NOT_FOUND")
        if row.used_at is not None:
            raise UsedEnrollmentTokenNotRevocable(token_id, row.used_by_agent or "?", row.used_at)
        return _enrollment_row(row)


def _check_ttl(ttl: timedelta) -> timedelta:
    if ttl <= timedelta(0) or ttl > OPERATOR_TOKEN_TTL_MAX:
        raise ValueError(
            f"an operator token's lifetime must be more than 0 and at most {OPERATOR_TOKEN_TTL_MAX.days} days, "
            f"got {ttl}"
        )
    return ttl


def _raise_unless_usable(row: Any, at: datetime) -> None:
    if row.used_at is not None:
        raise EnrollmentTokenUsed(row.used_by_agent or "?", row.used_at)
    if row.revoked_at is not None:
        raise EnrollmentTokenRevoked(row.revoked_at, row.revoked_by)
    if row.expires_at <= at:
        raise EnrollmentTokenExpired(row.expires_at)
