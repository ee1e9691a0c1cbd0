"""This replica among the control plane's replicas: its heartbeat, the live set, and telling agents.

Every replica upserts its row in the store's registry each heartbeat and reads back the live set
(`store.replicas`); one that missed `missed_heartbeats` heartbeats is gone. When the set of serving
replicas changes, every agent stream on this replica is told (a `ReplicaSet` frame), so that agents
join a replica that appeared and leave one that went. A replica that stops turns "draining" first
(agents stop dialing it, the others drop it from their sets at once through a notification), and
deletes its row last.

The embedded single process runs the same code on SQLite: a set of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from onprem.control_plane.store import DRAINING, SERVING, ReplicaRow
from onprem.v1 import tunnel_pb2

if TYPE_CHECKING:
    from onprem.control_plane.core import ControlPlane

log = logging.getLogger("onprem.control_plane.replicas")

#: The file in the state folder that keeps a replica's id across its restarts.
REPLICA_ID_FILE = "replica-id"
#: Every this many heartbeats, a replica deletes what gone replicas left (their streams; their rows
#: after an hour): a cleanup, not worth a write transaction every check.
CLEANUP_EVERY = 15
#: The topic of the notification a replica sends when it joins or leaves.
REPLICAS_TOPIC = "replicas"


@dataclass(frozen=True)
class ReplicaIdentity:
    """Who this replica is, and where agents and operators reach it."""

    replica_id: str
    #: host:port that agents dial for this replica; "" behind one load-balanced address.
    agent_address: str = ""
    operator_address: str = ""


def load_replica_id(state_dir: Path, given: str | None = None) -> str:
    """The replica's id: `given`, else the one kept in the state folder, else a new one kept there."""
    path = state_dir / REPLICA_ID_FILE
    if given:
        return given
    with contextlib.suppress(FileNotFoundError):
        kept = path.read_text().strip()
        if kept:
            return kept
    new = "cp-" + secrets.token_hex(6)
    path.write_text(new + "\n")
    path.chmod(0o600)
    return new


def as_replicas(rows: Sequence[ReplicaRow]) -> list[tunnel_pb2.Replica]:
    """The serving replicas, as agents are told of them."""
    return [tunnel_pb2.Replica(replica_id=r.replica_id, agent_address=r.agent_address)
            for r in rows if r.state == SERVING]


class Membership:
    """This replica's row in the registry, kept alive, and the live set it reads back."""

    def __init__(self, cp: ControlPlane, identity: ReplicaIdentity, *, heartbeat: float = 2.0,
                 missed_heartbeats: int = 3, version: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cp = cp
        self.identity = identity
        self.heartbeat = heartbeat
        self.max_age = dt.timedelta(seconds=heartbeat * missed_heartbeats)
        self._version = version
        self._started_at = dt.datetime.now(dt.UTC)
        self._state = SERVING
        #: Every live replica (this one included once it has joined), as last read.
        self.rows: list[ReplicaRow] = []
        self._announced: list[tunnel_pb2.Replica] | None = None
        self._wake = asyncio.Event()
        #: Called with the serving replicas whenever they change (the control plane tells its agents).
        self.on_change: Callable[[list[tunnel_pb2.Replica]], None] = lambda _replicas: None
        #: Whether the last heartbeat reached the store (health reports the outage otherwise).
        self.store_reachable = True
        self._left = False
        self._beats = 0
        self._clock = clock
        #: When the store came back after an outage (`clock`), for as long as the others may not have beaten since.
        self._store_back_at: float | None = None
        # A heartbeat and the leave never interleave: a beat in flight would bring the deleted row back.
        self._beating = asyncio.Lock()

    @property
    def me(self) -> tunnel_pb2.Replica:
        return tunnel_pb2.Replica(replica_id=self.identity.replica_id, agent_address=self.identity.agent_address)

    @property
    def serving(self) -> list[tunnel_pb2.Replica]:
        """The serving replicas agents should hold a stream to; this one at least while it serves."""
        replicas = as_replicas(self.rows)
        if self._state == SERVING and all(r.replica_id != self.identity.replica_id for r in replicas):
            replicas = sorted([*replicas, self.me], key=lambda r: r.replica_id)
        return replicas

    def _after_outage(self, serving: list[tunnel_pb2.Replica]) -> list[tunnel_pb2.Replica]:
        """`serving`, or while the store is just back from an outage, also the replicas last announced
        that the registry no longer lists.

        No replica could heartbeat during the outage, so when it ends every other row looks aged out
        until its replica beats again; announcing the set that shrank would make agents drop healthy
        streams to those replicas. For one `max_age` after the store came back, a replica whose row is
        missing stays announced; one whose row says it drains goes at once, and after the grace, the
        registry decides alone.
        """
        back_at = self._store_back_at
        if back_at is None:
            return serving
        if self._clock() - back_at >= self.max_age.total_seconds() or self._announced is None:
            self._store_back_at = None
            return serving
        listed = {r.replica_id for r in self.rows}
        kept = [r for r in self._announced if r.replica_id not in listed]
        return sorted([*serving, *kept], key=lambda r: r.replica_id) if kept else serving

    def wake(self) -> None:
        """Heartbeat now (another replica joined or left)."""
        self._wake.set()

    async def join(self) -> None:
        """Record this replica before it serves; its previous run's agent streams are stale."""
        await self._cp.blocking(self._cp.store.forget_streams_of, self.identity.replica_id)
        await self._beat()
        await self._cp.changes.publish(REPLICAS_TOPIC)
        log.info("replica %s joined: %d live (%s)", self.identity.replica_id, len(self.rows),
                 ", ".join(r.replica_id for r in self.rows))

    async def run(self) -> None:
        """Heartbeat until cancelled; tell agents whenever the serving set changes."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat):
                    await self._wake.wait()
            self._wake.clear()
            await self._beat()

    async def drain(self) -> None:
        """Stop being offered to agents: the row says "draining", and the others hear at once."""
        self._state = DRAINING
        await self._beat()
        await self._cp.changes.publish(REPLICAS_TOPIC)

    async def leave(self) -> None:
        """The last step of a clean stop: the row and its agent streams go (and no heartbeat brings them back)."""
        async with self._beating:
            self._left = True
        try:
            await self._cp.blocking(self._cp.store.leave_replica, self.identity.replica_id)
            await self._cp.changes.publish(REPLICAS_TOPIC)
        except Exception:
            log.exception("could not remove replica %s from the registry; it will age out", self.identity.replica_id)

    async def _beat(self) -> None:
        async with self._beating:
            if not self._left:
                await self._beat_once()
                self._beats += 1
                if self._beats % CLEANUP_EVERY == 0 and self.store_reachable:
                    try:
                        await self._cp.blocking(functools.partial(
                            self._cp.store.forget_gone_replicas, self.max_age, keep=dt.timedelta(hours=1)))
                    except Exception as exc:
                        log.warning("could not delete what gone replicas left: %s", exc)

    async def _beat_once(self) -> None:
        identity = self.identity
        try:
            self.rows = await self._cp.blocking(functools.partial(
                self._cp.store.heartbeat_replica, identity.replica_id, agent_address=identity.agent_address,
                operator_address=identity.operator_address, version=self._version, started_at=self._started_at,
                state=self._state, max_age=self.max_age))
        except Exception as exc:
            # The store is down: keep serving with the set we know; health says so.
            if self.store_reachable:
                log.error("replica %s cannot reach the store: %s", identity.replica_id, exc)
            self.store_reachable = False
            return
        if not self.store_reachable:
            log.info("replica %s reaches the store again", identity.replica_id)
            self._store_back_at = self._clock()
        self.store_reachable = True
        serving = self._after_outage(self.serving)
        if serving != self._announced:
            if self._announced is not None:
                log.info("serving replicas now: %s", ", ".join(r.replica_id for r in serving) or "none")
            self._announced = serving
            self.on_change(serving)
