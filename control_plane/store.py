"""The control plane's persistent state: groups, agents, tokens and audit rows.

Written against SQLAlchemy Core so that one code path serves the embedded
SQLite file and a PostgreSQL database shared by several replicas. Every method
runs in its own short transaction and returns frozen rows with timezone-aware
UTC datetimes, whatever the database hands back.

Secrets (operator tokens, enrollment tokens) are stored only as hashes; the
plaintext is returned once, at creation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import (
    Connection,
    Insert,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from control_plane.store_rows import (
    _AUDIT_DETAIL_MAX,
    _AUDIT_LIST_MAX,
    _DESCRIPTION_MAX,
    _REASON_MAX,
    _SECRET_BYTES,
    _SECRET_RE,
    _SQLITE_BUSY_TIMEOUT_MS,
    _TOKEN_ID_BYTES,
    _TOKEN_ID_RE,
    _TOKEN_NAME_MAX,
    ALL_GROUPS,
    API_TOKEN_PREFIX,
    DEFAULT_DB_FILENAME,
    ENROLLMENT_TOKEN_PREFIX,
    ENROLLMENT_TTL_DEFAULT,
    ENROLLMENT_TTL_MAX,
    ROLES,
    AdvertisedProfile,
    AgentRevoked,
    AgentRow,
    ApiTokenRow,
    AuditEntry,
    Conflict,
    EnrollmentTokenRow,
    GroupRow,
    NotFound,
    Role,
    StoreError,
    TokenError,
    TokenExpired,
    TokenInvalid,
    TokenUsed,
    _check_text,
    _utc,
    _utcnow,
    default_url,
    validate_agent_name,
    validate_group_name,
)
from control_plane.store_schema import (
    _agent_row,
    _api_token_row,
    _audit_row,
    _enrollment_row,
    _group_row,
    _profiles_json,
    agents_table,
    api_tokens_table,
    audit_table,
    enrollment_tokens_table,
    groups_table,
    metadata,
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


def _parse_token(token: object, pattern: re.Pattern[str]) -> tuple[str, str] | None:
    if not isinstance(token, str):
        return None
    match = pattern.fullmatch(token)
    if match is None:
        return None
    return match.group(1), match.group(2)


# --- the store ----------------------------------------------------------------------------------------------

_WRITE_OPTION: Final = "onprem_write"


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module, which would otherwise open
        # transactions lazily and defeat BEGIN IMMEDIATE below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # WAL lets readers run while one writer writes; NORMAL sync is durable enough under WAL.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A write transaction takes the write lock up front: a deferred transaction that reads and
        # then writes can fail with SQLITE_BUSY at once, without waiting out the busy timeout.
        if conn.get_execution_options().get(_WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


class Store:
    """The control plane's state, in SQLite (embedded) or PostgreSQL (shared by replicas)."""

    def __init__(self, url: str, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._clock = clock
        engine = create_engine(url, pool_pre_ping=True)
        if engine.dialect.name == "sqlite":
            _configure_sqlite(engine)
        self._engine = engine

    def __repr__(self) -> str:
        return f"Store({self._engine.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        return self._engine

    def create_schema(self) -> None:
        """Create the tables that do not exist yet."""
        metadata.create_all(self._engine)

    def close(self) -> None:
        self._engine.dispose()

    def _now(self) -> datetime:
        return _utc(self._clock(), "clock's time")

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.begin() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                yield conn

    def _insert_ignoring_duplicates(self, conn: Connection, values: dict[str, Any]) -> None:
        # Several replicas may create the same group at once; the loser must not fail.
        stmt: Insert
        if conn.dialect.name == "postgresql":
            stmt = pg_insert(groups_table).values(values).on_conflict_do_nothing()
        elif conn.dialect.name == "sqlite":
            stmt = sqlite_insert(groups_table).values(values).on_conflict_do_nothing()
        else:
            exists = conn.execute(select(groups_table.c.name).where(groups_table.c.name == values["name"]))
            if exists.first() is not None:
                return
            stmt = insert(groups_table).values(values)
        conn.execute(stmt)

    # --- groups ---------------------------------------------------------------------------------------------

    def _ensure_group(self, conn: Connection, name: str) -> GroupRow:
        validate_group_name(name)
        self._insert_ignoring_duplicates(conn, {"name": name, "created_at": self._now()})
        row = conn.execute(select(groups_table).where(groups_table.c.name == name)).one()
        return _group_row(row)

    def ensure_group(self, name: str) -> GroupRow:
        """Return the group, creating it first if it does not exist."""
        with self._write() as conn:
            return self._ensure_group(conn, name)

    def get_group(self, name: str) -> GroupRow | None:
        with self._read() as conn:
            row = conn.execute(select(groups_table).where(groups_table.c.name == name)).first()
        return None if row is None else _group_row(row)

    def list_groups(self) -> list[GroupRow]:
        with self._read() as conn:
            rows = conn.execute(select(groups_table).order_by(groups_table.c.name)).all()
        return [_group_row(r) for r in rows]

    # --- agents ---------------------------------------------------------------------------------------------

    def add_agent(
        self,
        agent_id: str,
        name: str,
        group_name: str,
        hostname: str,
        version: str,
        cert_serial: int,
        cert_expires_at: datetime,
        *,
        enrolled_at: datetime | None = None,
        profiles: Iterable[AdvertisedProfile | Mapping[str, Any]] = (),
    ) -> AgentRow:
        """Record a newly enrolled agent; its group must exist (enrollment tokens create it)."""
        _check_text(agent_id, "agent id", 128, required=True)
        validate_agent_name(name)
        validate_group_name(group_name)
        values = {
            "agent_id": agent_id,
            "name": name,
            "group_name": group_name,
            "hostname": _check_text(hostname, "host name", 255),
            "version": _check_text(version, "agent version", 64),
            "enrolled_at": enrolled_at if enrolled_at is not None else self._now(),
            "last_seen_at": None,
            "cert_serial": str(cert_serial),
            "cert_expires_at": cert_expires_at,
            "revoked_at": None,
            "revoked_reason": "",
            "profiles": _profiles_json(profiles),
        }
        try:
            with self._write() as conn:
                group = conn.execute(select(groups_table.c.name).where(groups_table.c.name == group_name))
                if group.first() is None:
                    raise NotFound(f"the group {group_name!r} does not exist")
                conn.execute(insert(agents_table).values(values))
                row = conn.execute(select(agents_table).where(agents_table.c.agent_id == agent_id)).one()
        except IntegrityError as exc:
            # The group was checked above, so the only constraint left to break is the primary key.
            raise Conflict(f"an agent with id {agent_id!r} exists already") from exc
        return _agent_row(row)

    def get_agent(self, agent_id: str) -> AgentRow | None:
        with self._read() as conn:
            row = conn.execute(select(agents_table).where(agents_table.c.agent_id == agent_id)).first()
        return None if row is None else _agent_row(row)

    def list_agents(self, group: str | None = None) -> list[AgentRow]:
        """All agents, revoked ones included, by group then name; only those of `group` if given."""
        stmt = select(agents_table).order_by(
            agents_table.c.group_name, agents_table.c.name, agents_table.c.agent_id
        )
        if group is not None:
            stmt = stmt.where(agents_table.c.group_name == group)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        return [_agent_row(r) for r in rows]

    def _update_agent(self, conn: Connection, agent_id: str, values: dict[str, Any]) -> AgentRow:
        result = conn.execute(update(agents_table).where(agents_table.c.agent_id == agent_id).values(values))
        if result.rowcount == 0:
            raise NotFound(f"no agent has the id {agent_id!r}")
        row = conn.execute(select(agents_table).where(agents_table.c.agent_id == agent_id)).one()
        return _agent_row(row)

    def record_hello(
        self,
        agent_id: str,
        hostname: str,
        version: str,
        profiles: Iterable[AdvertisedProfile | Mapping[str, Any]],
        *,
        at: datetime | None = None,
    ) -> AgentRow:
        """Remember what a connecting agent advertised; replaces its previous profiles."""
        values = {
            "hostname": _check_text(hostname, "host name", 255),
            "version": _check_text(version, "agent version", 64),
            "profiles": _profiles_json(profiles),
            "last_seen_at": at if at is not None else self._now(),
        }
        with self._write() as conn:
            return self._update_agent(conn, agent_id, values)

    def touch_agent(self, agent_id: str, at: datetime) -> None:
        """Move the agent's last-seen time forward to `at`; an unknown agent is ignored."""
        column = agents_table.c.last_seen_at
        # Replicas touch the same agent independently; a late, older touch must not move the time back.
        stmt = (
            update(agents_table)
            .where(agents_table.c.agent_id == agent_id)
            .where((column.is_(None)) | (column < _utc(at)))
            .values(last_seen_at=at)
        )
        with self._write() as conn:
            conn.execute(stmt)

    def revoke_agent(self, agent_id: str, reason: str, *, at: datetime | None = None) -> AgentRow:
        """Revoke an agent for good; revoking again keeps the first time and reason."""
        _check_text(reason, "reason", _REASON_MAX)
        stmt = (
            update(agents_table)
            .where(agents_table.c.agent_id == agent_id)
            .where(agents_table.c.revoked_at.is_(None))
            .values(revoked_at=at if at is not None else self._now(), revoked_reason=reason)
        )
        with self._write() as conn:
            conn.execute(stmt)
            row = conn.execute(select(agents_table).where(agents_table.c.agent_id == agent_id)).first()
        if row is None:
            raise NotFound(f"no agent has the id {agent_id!r}")
        return _agent_row(row)

    def set_certificate(self, agent_id: str, serial: int, expires_at: datetime) -> AgentRow:
        """Record a renewed certificate; refused for a revoked agent, which must never get one."""
        stmt = (
            update(agents_table)
            .where(agents_table.c.agent_id == agent_id)
            .where(agents_table.c.revoked_at.is_(None))
            .values(cert_serial=str(serial), cert_expires_at=expires_at)
        )
        with self._write() as conn:
            updated = conn.execute(stmt).rowcount
            row = conn.execute(select(agents_table).where(agents_table.c.agent_id == agent_id)).first()
        if row is None:
            raise NotFound(f"no agent has the id {agent_id!r}")
        if updated == 0:
            raise AgentRevoked(f"the agent {agent_id!r} is revoked and cannot get a new certificate")
        return _agent_row(row)

    def profiles_of_group(self, group: str) -> set[tuple[str, str]]:
        """The (kind, name) pairs that the group's non-revoked agents last advertised."""
        stmt = (
            select(agents_table.c.profiles)
            .where(agents_table.c.group_name == group)
            .where(agents_table.c.revoked_at.is_(None))
        )
        with self._read() as conn:
            rows = conn.execute(stmt).scalars().all()
        found: set[tuple[str, str]] = set()
        for text in rows:
            for item in json.loads(text):
                profile = AdvertisedProfile.from_mapping(item)
                found.add((profile.kind, profile.name))
        return found

    # --- operator tokens ------------------------------------------------------------------------------------

    def create_api_token(self, name: str, role: Role, groups: Sequence[str]) -> tuple[str, ApiTokenRow]:
        """Create an operator token; the plaintext token is returned here and nowhere else."""
        _check_text(name, "token name", _TOKEN_NAME_MAX, required=True)
        if role not in ROLES:
            raise ValueError(f"invalid role {role!r}: use one of {', '.join(ROLES)}")
        if isinstance(groups, str):
            # A bare string would otherwise be taken as a list of one-letter groups.
            raise ValueError("groups must be a list of group names, not a single string")
        wanted: list[str] = []
        for group in groups:
            if group != ALL_GROUPS:
                validate_group_name(group)
            if group not in wanted:
                wanted.append(group)
        token, token_id, secret = _new_token(API_TOKEN_PREFIX)
        values = {
            "token_id": token_id,
            "name": name,
            "secret_hash": _hash_secret(secret),
            "role": role,
            "groups": json.dumps(wanted),
            "created_at": self._now(),
            "revoked_at": None,
        }
        with self._write() as conn:
            conn.execute(insert(api_tokens_table).values(values))
            row = conn.execute(select(api_tokens_table).where(api_tokens_table.c.token_id == token_id)).one()
        return token, _api_token_row(row)

    def authenticate_api_token(self, token: str) -> ApiTokenRow | None:
        """The token's row if the token is well formed, known, has the right secret and is not revoked."""
        parsed = _parse_token(token, _API_TOKEN_RE)
        if parsed is None:
            return None
        token_id, secret = parsed
        with self._read() as conn:
            row = conn.execute(
                select(api_tokens_table).where(api_tokens_table.c.token_id == token_id)
            ).first()
        if row is None or not _secret_matches(secret, row.secret_hash) or row.revoked_at is not None:
            return None
        return _api_token_row(row)

    def list_api_tokens(self) -> list[ApiTokenRow]:
        stmt = select(api_tokens_table).order_by(api_tokens_table.c.created_at, api_tokens_table.c.token_id)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        return [_api_token_row(r) for r in rows]

    def revoke_api_token(self, token_id: str) -> ApiTokenRow:
        """Revoke an operator token; revoking again keeps the first revocation time."""
        stmt = (
            update(api_tokens_table)
            .where(api_tokens_table.c.token_id == token_id)
            .where(api_tokens_table.c.revoked_at.is_(None))
            .values(revoked_at=self._now())
        )
        with self._write() as conn:
            conn.execute(stmt)
            row = conn.execute(
                select(api_tokens_table).where(api_tokens_table.c.token_id == token_id)
            ).first()
        if row is None:
            raise NotFound(f"no operator token has the id {token_id!r}")
        return _api_token_row(row)

    # --- enrollment tokens ----------------------------------------------------------------------------------

    def create_enrollment_token(
        self, group: str, ttl: timedelta = ENROLLMENT_TTL_DEFAULT, description: str = ""
    ) -> tuple[str, EnrollmentTokenRow]:
        """Create a single-use enrollment token for `group`, creating the group if needed."""
        validate_group_name(group)
        if ttl <= timedelta(0) or ttl > ENROLLMENT_TTL_MAX:
            raise ValueError(
                f"the enrollment token's lifetime must be more than 0 and at most {ENROLLMENT_TTL_MAX}, got {ttl}"
            )
        _check_text(description, "description", _DESCRIPTION_MAX)
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
        }
        table = enrollment_tokens_table
        with self._write() as conn:
            self._ensure_group(conn, group)
            conn.execute(insert(table).values(values))
            row = conn.execute(select(table).where(table.c.token_id == token_id)).one()
        return token, _enrollment_row(row)

    def consume_enrollment_token(
        self, token: str, agent_id: str, now: datetime | None = None
    ) -> EnrollmentTokenRow:
        """Spend an enrollment token on `agent_id`; of concurrent attempts with one token, one wins.

        Raises TokenInvalid, TokenExpired or TokenUsed. A wrong secret is always
        TokenInvalid, so that guessing reveals nothing about real tokens.
        """
        parsed = _parse_token(token, _ENROLLMENT_TOKEN_RE)
        if parsed is None:
            raise TokenInvalid()
        token_id, secret = parsed
        at = _utc(now) if now is not None else self._now()
        table = enrollment_tokens_table
        by_id = select(table).where(table.c.token_id == token_id)
        with self._write() as conn:
            row = conn.execute(by_id).first()
            if row is None or not _secret_matches(secret, row.secret_hash):
                raise TokenInvalid()
            # The conditions live in the UPDATE itself, not only in the read above: a concurrent
            # enrollment that read the same unused row will find it used here and update nothing.
            claimed = conn.execute(
                update(table)
                .where(table.c.token_id == token_id)
                .where(table.c.used_at.is_(None))
                .where(table.c.expires_at > at)
                .values(used_at=at, used_by_agent=agent_id)
            ).rowcount
            current = conn.execute(by_id).one()
        if claimed == 1:
            return _enrollment_row(current)
        if current.used_at is not None:
            raise TokenUsed(current.used_by_agent or "?", current.used_at)
        raise TokenExpired(current.expires_at)

    def list_enrollment_tokens(self) -> list[EnrollmentTokenRow]:
        table = enrollment_tokens_table
        with self._read() as conn:
            rows = conn.execute(select(table).order_by(table.c.created_at, table.c.token_id)).all()
        return [_enrollment_row(r) for r in rows]

    # --- audit ----------------------------------------------------------------------------------------------

    def add_audit(self, entry: AuditEntry) -> int:
        """Append one audit row and return its id; an over-long detail is cut, not refused."""
        values = self._audit_values(entry)
        with self._write() as conn:
            result = conn.execute(insert(audit_table).values(values))
            key = result.inserted_primary_key
        if key is None:
            raise StoreError("the database did not report the new audit row's id")
        return int(key[0])

    def add_audits(self, entries: Sequence[AuditEntry]) -> None:
        """Append many audit rows in one transaction (one commit, not one per request)."""
        if entries:
            with self._write() as conn:
                conn.execute(insert(audit_table), [self._audit_values(e) for e in entries])

    @staticmethod
    def _audit_values(entry: AuditEntry) -> dict[str, Any]:
        return {
            "at": entry.at,
            "principal": entry.principal[:_TOKEN_NAME_MAX],
            "role": entry.role,
            "method": entry.method[:200],
            "group_name": entry.group_name,
            "agent_id": entry.agent_id,
            "profile": entry.profile,
            "kind": entry.kind,
            "code": entry.code,
            "outcome": entry.outcome,
            "bytes_out": entry.bytes_out,
            "duration_ms": entry.duration_ms,
            "detail": entry.detail[:_AUDIT_DETAIL_MAX],
        }

    def list_audit(self, limit: int = 100) -> list[AuditEntry]:
        """The latest audit rows, newest first."""
        if limit < 1:
            raise ValueError(f"the limit must be at least 1, got {limit}")
        stmt = select(audit_table).order_by(audit_table.c.id.desc()).limit(min(limit, _AUDIT_LIST_MAX))
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        return [_audit_row(r) for r in rows]

    def count_agents(self, group: str) -> int:
        """How many non-revoked agents the group has."""
        stmt = (
            select(func.count())
            .select_from(agents_table)
            .where(agents_table.c.group_name == group)
            .where(agents_table.c.revoked_at.is_(None))
        )
        with self._read() as conn:
            return int(conn.execute(stmt).scalar_one())


__all__ = [
    "ALL_GROUPS",
    "API_TOKEN_PREFIX",
    "DEFAULT_DB_FILENAME",
    "ENROLLMENT_TOKEN_PREFIX",
    "ENROLLMENT_TTL_DEFAULT",
    "ENROLLMENT_TTL_MAX",
    "ROLES",
    "AdvertisedProfile",
    "AgentRevoked",
    "AgentRow",
    "ApiTokenRow",
    "AuditEntry",
    "Conflict",
    "EnrollmentTokenRow",
    "GroupRow",
    "NotFound",
    "Role",
    "Store",
    "StoreError",
    "TokenError",
    "TokenExpired",
    "TokenInvalid",
    "TokenUsed",
    "default_url",
    "validate_agent_name",
    "validate_group_name",
]
