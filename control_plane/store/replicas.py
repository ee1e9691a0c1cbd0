"""Replicas: who serves, which agent streams each holds, the drains they carry out, and notifications.

Several control-plane replicas share one PostgreSQL store (the embedded SQLite store has one). Each
replica upserts its row every heartbeat and reads the live set in the same transaction; a row whose
heartbeat is older than `max_age` is gone, whatever its state says. Times come from each replica's
clock: replicas need synchronised clocks (NTP), to well within a heartbeat timeout.

`notify` sends a PostgreSQL notification (`pg_notify`), delivered to every replica's listener when
the transaction commits; on SQLite there is no other replica to tell, and it does nothing.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, delete, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from onprem.control_plane.store.database import StoreBase
from onprem.control_plane.store.schema import (
    agent_drains_table,
    agent_streams_table,
    agents_table,
    replicas_table,
)
from onprem.control_plane.store.values import ACTOR_MAX, REASON_MAX, check_text

#: The channel of the store's notifications.
CHANNEL = "onprem_changes"
#: The largest payload PostgreSQL takes in a notification is 8000 bytes; ours are a few dozen.
MAX_NOTIFY_PAYLOAD = 7900
SERVING, DRAINING = "serving", "draining"


@dataclass(frozen=True)
class ReplicaRow:
    replica_id: str
    agent_address: str
    operator_address: str
    version: str
    started_at: datetime
    heartbeat_at: datetime
    state: str


@dataclass(frozen=True)
class AgentStreamRow:
    """One agent's stream on one replica."""

    agent_id: str
    replica_id: str
    session_id: str
    connected_at: datetime
    draining: bool


@dataclass(frozen=True)
class DrainRow:
    """A drain an admin asked for, for whichever replicas hold the agent's streams."""

    agent_id: str
    requested_at: datetime
    reason: str
    grace: timedelta
    exit_after: bool
    requested_by: str


def _replica(row: Any) -> ReplicaRow:
    return ReplicaRow(row.replica_id, row.agent_address, row.operator_address, row.version, row.started_at,
                      row.heartbeat_at, row.state)


class ReplicaStore(StoreBase):
    # -- the registry --
    def heartbeat_replica(self, replica_id: str, *, agent_address: str, operator_address: str, version: str,
                          started_at: datetime, state: str, max_age: timedelta) -> list[ReplicaRow]:
        """Record that `replica_id` is alive now, in `state`; return the live replicas (itself included)."""
        check_text(replica_id, "replica id", 255, required=True)
        now = self._now()
        values = {"agent_address": check_text(agent_address, "agent address", 255),
                  "operator_address": check_text(operator_address, "operator address", 255),
                  "version": check_text(version, "version", 64), "heartbeat_at": now, "state": state}
        with self._write() as conn:
            self._upsert(conn, replicas_table, ["replica_id"],
                         {"replica_id": replica_id, "started_at": started_at, **values}, values)
            return self._live(conn, now - max_age)

    def live_replicas(self, max_age: timedelta) -> list[ReplicaRow]:
        """The replicas whose heartbeat is younger than `max_age`, by id."""
        with self._read() as conn:
            return self._live(conn, self._now() - max_age)

    def leave_replica(self, replica_id: str) -> None:
        """A replica that stops cleanly: its row and its streams go at once."""
        with self._write() as conn:
            conn.execute(delete(agent_streams_table).where(agent_streams_table.c.replica_id == replica_id))
            conn.execute(delete(replicas_table).where(replicas_table.c.replica_id == replica_id))

    def forget_gone_replicas(self, max_age: timedelta, *, keep: timedelta) -> int:
        """Delete the streams of replicas gone for `max_age`, and their rows once gone for `keep`.

        Returns how many stream rows went. Any replica may run it: the result is the same.
        """
        now = self._now()
        with self._write() as conn:
            live = select(replicas_table.c.replica_id).where(replicas_table.c.heartbeat_at >= now - max_age)
            gone_streams = conn.execute(delete(agent_streams_table).where(
                agent_streams_table.c.replica_id.not_in(live))).rowcount
            conn.execute(delete(replicas_table).where(replicas_table.c.heartbeat_at < now - keep))
        return int(gone_streams or 0)

    # -- which replica holds which agent's stream --
    def record_stream(self, agent_id: str, replica_id: str, session_id: str, *, draining: bool = False) -> None:
        """`replica_id` holds a stream of `agent_id` now (replacing an older stream of the pair)."""
        values = {"session_id": session_id, "connected_at": self._now(), "draining": draining}
        with self._write() as conn:
            self._upsert(conn, agent_streams_table, ["agent_id", "replica_id"],
                         {"agent_id": agent_id, "replica_id": replica_id, **values}, values)

    def mark_stream_draining(self, agent_id: str, replica_id: str, session_id: str) -> None:
        with self._write() as conn:
            conn.execute(update(agent_streams_table).where(and_(
                agent_streams_table.c.agent_id == agent_id, agent_streams_table.c.replica_id == replica_id,
                agent_streams_table.c.session_id == session_id)).values(draining=True))

    def forget_stream(self, agent_id: str, replica_id: str, session_id: str) -> None:
        """The stream ended; a newer stream of the same pair (a reconnect) keeps its row."""
        with self._write() as conn:
            conn.execute(delete(agent_streams_table).where(and_(
                agent_streams_table.c.agent_id == agent_id, agent_streams_table.c.replica_id == replica_id,
                agent_streams_table.c.session_id == session_id)))

    def forget_streams_of(self, replica_id: str) -> None:
        """At a replica's start: the rows its previous run left (it was killed) are stale."""
        with self._write() as conn:
            conn.execute(delete(agent_streams_table).where(agent_streams_table.c.replica_id == replica_id))

    def streams_of(self, agent_ids: Collection[str] | None, max_age: timedelta) -> dict[str, list[AgentStreamRow]]:
        """The streams held by live replicas, by agent (of `agent_ids`, or of every agent)."""
        now = self._now()
        stmt = (select(agent_streams_table).join(
            replicas_table, replicas_table.c.replica_id == agent_streams_table.c.replica_id)
            .where(replicas_table.c.heartbeat_at >= now - max_age)
            .order_by(agent_streams_table.c.agent_id, agent_streams_table.c.replica_id))
        if agent_ids is not None:
            stmt = stmt.where(agent_streams_table.c.agent_id.in_(list(agent_ids)))
        result: dict[str, list[AgentStreamRow]] = {}
        with self._read() as conn:
            for row in conn.execute(stmt):
                result.setdefault(row.agent_id, []).append(AgentStreamRow(
                    row.agent_id, row.replica_id, row.session_id, row.connected_at, row.draining))
        return result

    # -- drains and revocations, for every replica to carry out --
    def request_drain(self, agent_id: str, *, reason: str, grace: timedelta, exit_after: bool, by: str) -> DrainRow:
        """Record an admin's drain of `agent_id`; each replica holding its stream carries it out."""
        now = self._now()
        values = {"requested_at": now, "reason": check_text(reason, "reason", REASON_MAX),
                  "grace_ms": int(grace.total_seconds() * 1000), "exit_after": exit_after,
                  "requested_by": check_text(by, "requester", ACTOR_MAX)}
        with self._write() as conn:
            self._upsert(conn, agent_drains_table, ["agent_id"], {"agent_id": agent_id, **values}, values)
        return DrainRow(agent_id, now, reason, grace, exit_after, by)

    def drains_for(self, agent_ids: Collection[str]) -> list[DrainRow]:
        """The latest drain asked for each of `agent_ids` that has one."""
        if not agent_ids:
            return []
        with self._read() as conn:
            rows = conn.execute(select(agent_drains_table).where(
                agent_drains_table.c.agent_id.in_(list(agent_ids)))).all()
        return [DrainRow(r.agent_id, r.requested_at, r.reason, timedelta(milliseconds=r.grace_ms), r.exit_after,
                         r.requested_by) for r in rows]

    def revoked_among(self, agent_ids: Collection[str]) -> set[str]:
        """Which of `agent_ids` are revoked."""
        if not agent_ids:
            return set()
        with self._read() as conn:
            rows = conn.execute(select(agents_table.c.agent_id).where(and_(
                agents_table.c.agent_id.in_(list(agent_ids)), agents_table.c.revoked_at.is_not(None)))).all()
        return {r.agent_id for r in rows}

    # -- notifications --
    @property
    def notifies(self) -> bool:
        """Whether `notify` reaches other processes (PostgreSQL)."""
        return self._engine.dialect.name == "postgresql"

    def notify(self, topic: str, payload: Mapping[str, Any] | None = None) -> None:
        """Tell every replica's listener that `topic` changed (PostgreSQL); nothing on SQLite."""
        if not self.notifies:
            return
        message = json.dumps({"topic": topic, **(payload or {})}, separators=(",", ":"))
        if len(message.encode()) > MAX_NOTIFY_PAYLOAD:
            raise ValueError(f"a notification of {len(message)} bytes is too long for PostgreSQL")
        with self._engine.begin() as conn:
            conn.execute(text("SELECT pg_notify(:channel, :message)"), {"channel": CHANNEL, "message": message})

    # -- internals --
    @staticmethod
    def _live(conn: Connection, since: datetime) -> list[ReplicaRow]:
        rows = conn.execute(select(replicas_table).where(replicas_table.c.heartbeat_at >= since)
                            .order_by(replicas_table.c.replica_id)).all()
        return [_replica(r) for r in rows]

    @staticmethod
    def _upsert(conn: Connection, table: Any, keys: list[str], values: dict[str, Any], changes: dict[str, Any]) -> None:
        if conn.dialect.name == "postgresql":
            conn.execute(pg_insert(table).values(values).on_conflict_do_update(index_elements=keys, set_=changes))
        elif conn.dialect.name == "sqlite":
            conn.execute(sqlite_insert(table).values(values).on_conflict_do_update(index_elements=keys, set_=changes))
        else:  # pragma: no cover - the store supports SQLite and PostgreSQL
            raise NotImplementedError(conn.dialect.name)
