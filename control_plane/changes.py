"""Changes made on one replica that every replica must act on: revocations, drains, the replica set.

The store stays the truth; notifications only wake the replicas sooner. A change is written to the
store first, then announced (`publish`: PostgreSQL `NOTIFY`, delivered to every replica's `LISTEN`
connection when it commits). Each replica also checks on its own every `check_interval` seconds, and
at once after its listener (re)connects, so that a notification missed while the listener was down
is caught within that interval:

- its agents that were revoked lose their streams;
- drains asked for its agents after their streams opened are carried out;
- the replica set is re-read (`replicas.Membership`).

Token revocations need none of this: every call reads the store's change counter
(`credentials`), and the token watcher ends open calls; a notification only wakes the watcher.
On SQLite (one process) nothing is sent and nothing listened to; the checks still run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from onprem.control_plane.store import CHANNEL

if TYPE_CHECKING:
    from onprem.control_plane.core import ControlPlane

log = logging.getLogger("onprem.control_plane.changes")

#: Topics, and what they carry.
AGENT_REVOKED = "agent.revoked"  # agent_id
AGENT_DRAIN = "agent.drain"  # agent_id
TOKENS = "tokens"  # a token was revoked or changed
Handler = Callable[[Mapping[str, Any]], None]


class ChangeFeed:
    """Announces this replica's changes, and acts on every replica's (this one's included)."""

    def __init__(self, cp: ControlPlane, *, check_interval: float = 2.0) -> None:
        self._cp = cp
        self.check_interval = check_interval
        self._handlers: dict[str, Handler] = {}
        self._check: Callable[[], Awaitable[None]] | None = None
        self._wake = asyncio.Event()
        #: Whether the listener is connected (PostgreSQL); health reports an outage otherwise.
        self.listening = False
        #: Counts the listener's connections: what was learnt under one epoch is stale in the next.
        self.epoch = 0

    def listening_epoch(self) -> int | None:
        """The listener's current connection, or None while it is not connected."""
        return self.epoch if self.listening else None

    def on(self, topic: str, handler: Handler) -> None:
        self._handlers[topic] = handler

    def set_check(self, check: Callable[[], Awaitable[None]]) -> None:
        """What the periodic check runs (the control plane's reconciliation of its agents)."""
        self._check = check

    async def publish(self, topic: str, **payload: Any) -> None:
        """Announce `topic` to every replica; this one acts on it at once, without waiting for its echo."""
        self._dispatch({"topic": topic, **payload})
        try:
            await self._cp.blocking(self._cp.store.notify, topic, payload)
        except Exception:
            # The change is in the store: the others' periodic checks will catch it.
            log.exception("could not announce %s; other replicas will see it at their next check", topic)

    def _dispatch(self, message: Mapping[str, Any]) -> None:
        handler = self._handlers.get(str(message.get("topic", "")))
        if handler is None:
            return
        try:
            handler(message)
        except Exception:
            log.exception("handling the change %r failed", message)

    async def run(self) -> None:
        """Listen (PostgreSQL) and check periodically, until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._check_forever(), name="change-checks")
            if self._cp.store.notifies:
                tasks.create_task(self._listen_forever(), name="change-listener")

    async def _check_forever(self) -> None:
        failing = False
        while True:
            try:
                async with asyncio.timeout(self.check_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._check is not None:
                try:
                    await self._check()
                except Exception as exc:
                    # Once per outage, not every interval: health says the store is down meanwhile.
                    if not failing:
                        log.warning("the periodic check of agents against the store failed (%s); retrying", exc)
                    failing = True
                else:
                    if failing:
                        log.info("the periodic check of agents against the store works again")
                    failing = False

    async def _listen_forever(self) -> None:
        import psycopg  # only replicas on PostgreSQL listen

        url = self._cp.store.engine.url.set(drivername="postgresql")
        conninfo = url.render_as_string(hide_password=False)
        attempt = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.epoch += 1
                    self.listening, attempt = True, 0
                    log.info("listening for changes from other replicas")
                    self._wake.set()  # catch up on what was missed while not listening
                    async for notification in conn.notifies():
                        self._received(notification.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.listening or attempt == 0:
                    log.warning("the change listener lost the store (%s); retrying", exc)
            finally:
                self.listening = False
            attempt += 1
            await asyncio.sleep(random.uniform(0, min(30.0, 0.5 * 2 ** min(attempt, 6))))

    def _received(self, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            log.warning("ignoring a malformed change notification %r", payload[:200])
            return
        if isinstance(message, dict):
            self._dispatch(message)
            # Whatever it was, look at the store soon: a notification says something changed, not all.
            self._wake.set()

