"""The control plane's persistent state: groups, agents, tokens and audit rows.

Written against SQLAlchemy Core so that one code path serves the embedded
SQLite file and a PostgreSQL database shared by several replicas. Every method
runs in its own short transaction and returns frozen rows with timezone-aware
UTC datetimes, whatever the database hands back.

Tokens live in `store_tokens` (a mixin of `Store`): secrets are stored only as
hashes, and the plaintext is returned once, at creation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    Connection,
    Insert,
    Table,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from onprem.control_plane.store_rows import (
    _AUDIT_DETAIL_MAX,
    _AUDIT_LIST_MAX,
    _PEER_MAX,
    _REASON_MAX,
    _SQLITE_BUSY_TIMEOUT_MS,
    _TOKEN_NAME_MAX,
    ALL_GROUPS,
    API_TOKEN_PREFIX,
    DEFAULT_DB_FILENAME,
    ENROLLMENT_TOKEN_PREFIX,
    ENROLLMENT_TTL_DEFAULT,
    ENROLLMENT_TTL_MAX,
    OPERATOR_TOKEN_TTL_DEFAULT,
    OPERATOR_TOKEN_TTL_MAX,
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
    TokenRevoked,
    TokenState,
    TokenUsed,
    _check_text,
    _utc,
    _utcnow,
    default_url,
    validate_agent_name,
    validate_group_name,
)
from onprem.control_plane.store_schema import (
    _agent_row,
    _audit_row,
    _group_row,
    _profiles_json,
    agents_table,
    audit_table,
    groups_table,
    metadata,
)
from onprem.control_plane.store_tokens import (
    API_TOKENS_COUNTER,
    PageKey,
    TokenStore,
    api_token_id,
    enrollment_token_id,
    parse_token_id,
)

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


class Store(TokenStore):
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

    @property
    def sqlite_path(self) -> str | None:
        """The database file, when the store is a SQLite file; None otherwise."""
        url = self._engine.url
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
            return None
        return url.database

    def create_schema(self) -> None:
        """Create the tables that do not exist yet, and refuse a store made by an older release.

        There are no migrations yet (they come with Alembic); until then a store whose tables
        lack columns this version needs is refused with a message saying so, rather than
        failing later on the first query that touches them.
        """
        metadata.create_all(self._engine)
        missing = []
        inspector = inspect(self._engine)
        for table in metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            missing += [f"{table.name}.{c.name}" for c in table.columns if c.name not in present]
        if missing:
            raise StoreError(
                f"the store {self!r} was made by an older release of onprem and lacks the columns "
                f"{', '.join(missing)}; this version cannot upgrade it in place yet (schema migrations are "
                "planned): keep the older release for it, or start from a new state folder"
            )
        with self._write() as conn:
            self._ensure_counters(conn)

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

    def _insert_ignoring_duplicates(self, conn: Connection, table: Table, values: dict[str, Any]) -> None:
        # Several replicas may create the same row (a group, a counter) at once; the loser must not fail.
        stmt: Insert
        if conn.dialect.name == "postgresql":
            stmt = pg_insert(table).values(values).on_conflict_do_nothing()
        elif conn.dialect.name == "sqlite":
            stmt = sqlite_insert(table).values(values).on_conflict_do_nothing()
        else:
            exists = conn.execute(select(table.c.name).where(table.c.name == values["name"]))
            if exists.first() is not None:
                return
            stmt = insert(table).values(values)
        conn.execute(stmt)

    # --- groups ---------------------------------------------------------------------------------------------

    def _ensure_group(self, conn: Connection, name: str) -> GroupRow:
        validate_group_name(name)
        self._insert_ignoring_duplicates(conn, groups_table, {"name": name, "created_at": self._now()})
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
            "token_id": entry.token_id,
            "peer": entry.peer[:_PEER_MAX] if entry.peer is not None else None,
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
    "API_TOKENS_COUNTER",
    "API_TOKEN_PREFIX",
    "DEFAULT_DB_FILENAME",
    "ENROLLMENT_TOKEN_PREFIX",
    "ENROLLMENT_TTL_DEFAULT",
    "ENROLLMENT_TTL_MAX",
    "OPERATOR_TOKEN_TTL_DEFAULT",
    "OPERATOR_TOKEN_TTL_MAX",
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
    "PageKey",
    "Role",
    "Store",
    "StoreError",
    "TokenError",
    "TokenExpired",
    "TokenInvalid",
    "TokenRevoked",
    "TokenState",
    "TokenUsed",
    "api_token_id",
    "default_url",
    "enrollment_token_id",
    "parse_token_id",
    "validate_agent_name",
    "validate_group_name",
]
