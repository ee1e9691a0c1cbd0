"""Agents: enrolled agents, their certificates, what they last advertised, and their revocation."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from onprem.control_plane.store.database import StoreBase
from onprem.control_plane.store.errors import AgentAlreadyExists, AgentRevoked
from onprem.control_plane.store.rows import AdvertisedProfile, AgentRow
from onprem.control_plane.store.schema import agents_table, groups_table
from onprem.control_plane.store.values import (
    REASON_MAX,
    check_text,
    utc,
    validate_agent_name,
    validate_group_name,
)
from onprem.tunnel.errors import NotFound


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


def _profiles_json(profiles: Iterable[AdvertisedProfile | Mapping[str, Any]]) -> str:
    normalised = [
        (p if isinstance(p, AdvertisedProfile) else AdvertisedProfile.from_mapping(p)).to_dict()
        for p in profiles
    ]
    return json.dumps(normalised, separators=(",", ":"))


def _no_agent(agent_id: str) -> NotFound:
    return NotFound(f"no agent has the id {agent_id!r}", reason="AGENT_NOT_FOUND")


class AgentStore(StoreBase):
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
        """Record a newly enrolled agent; its group must exist (enrollment tokens create it).

        Raises NotFound for an unknown group, AgentAlreadyExists for an id that is taken.
        """
        check_text(agent_id, "agent id", 128, required=True)
        validate_agent_name(name)
        validate_group_name(group_name)
        values = {
            "agent_id": agent_id,
            "name": name,
            "group_name": group_name,
            "hostname": check_text(hostname, "host name", 255),
            "version": check_text(version, "agent version", 64),
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
                    raise NotFound(f"the group {group_name!r} does not exist", reason="GROUP_NOT_FOUND")
                conn.execute(insert(agents_table).values(values))
                row = conn.execute(select(agents_table).where(agents_table.c.agent_id == agent_id)).one()
        except IntegrityError as exc:
            # The group was checked above, so the only constraint left to break is the primary key.
            raise AgentAlreadyExists(agent_id) from exc
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
            raise _no_agent(agent_id)
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
            "hostname": check_text(hostname, "host name", 255),
            "version": check_text(version, "agent version", 64),
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
            .where((column.is_(None)) | (column < utc(at)))
            .values(last_seen_at=at)
        )
        with self._write() as conn:
            conn.execute(stmt)

    def revoke_agent(self, agent_id: str, reason: str, *, at: datetime | None = None) -> AgentRow:
        """Revoke an agent for good; revoking again keeps the first time and reason."""
        check_text(reason, "reason", REASON_MAX)
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
            raise _no_agent(agent_id)
        return _agent_row(row)

    def set_certificate(self, agent_id: str, serial: int, expires_at: datetime) -> AgentRow:
        """Record a renewed certificate; refused (AgentRevoked) for a revoked agent, which must never get one."""
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
            raise _no_agent(agent_id)
        if updated == 0:
            raise AgentRevoked(agent_id, row.revoked_reason)
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
