"""Which agent runs a request: the registry of live sessions and the router.

A request goes only to an agent of its group that is connected, not
draining, and advertises the profile; among those, the least loaded one with
room under its advertised concurrency limit. An agent's load counts its
requests on every replica (it reports them); one that is full all the same
refuses, and the request goes to another agent (`failover`). Failure is explained: an
unknown group or profile is NOT_FOUND, a known one with no agent able to
take it right now is UNAVAILABLE, and agents that stay full past a short
wait make it RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from onprem.control_plane.sessions import AgentSession, Exchange
from onprem.tunnel import kinds
from onprem.tunnel.errors import FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from onprem.tunnel.idempotency import METADATA_KEY, is_keyed
from onprem.v1 import tunnel_pb2

log = logging.getLogger("onprem.control_plane.router")


class Registry:
    """The live sessions, one per agent: a newer session supersedes an older one."""

    def __init__(self) -> None:
        self._sessions: dict[str, AgentSession] = {}
        self._changed = asyncio.Event()

    def add(self, session: AgentSession) -> None:
        old = self._sessions.get(session.agent_id)
        if old is not None and old is not session:
            log.info("agent %s reconnected; closing its older session %s", session.agent_id, old.session_id)
            old.close("superseded by a newer session of the same agent")
        self._sessions[session.agent_id] = session
        session.on_change = self.notify
        self.notify()

    def remove(self, session: AgentSession) -> None:
        if self._sessions.get(session.agent_id) is session:
            del self._sessions[session.agent_id]
        self.notify()

    def get(self, agent_id: str) -> AgentSession | None:
        return self._sessions.get(agent_id)

    def all(self) -> list[AgentSession]:
        return list(self._sessions.values())

    def in_group(self, group: str) -> list[AgentSession]:
        return [s for s in self._sessions.values() if s.group == group and s.is_open]

    def notify(self) -> None:
        """Wake requests waiting for capacity; called whenever load or membership changes."""
        # Each waiter holds the event current when it began waiting; setting
        # it and starting a fresh one wakes exactly those waiters.
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self, seconds: float) -> None:
        changed = self._changed
        try:
            async with asyncio.timeout(seconds):
                await changed.wait()
        except TimeoutError:
            pass


@dataclass(frozen=True)
class GroupFacts:
    """What the store knows of a group, for explaining why nothing can serve."""

    exists: bool
    known_profiles: frozenset[tuple[int, str]]


class Router:
    def __init__(
        self,
        registry: Registry,
        group_facts: Callable[[str], Awaitable[GroupFacts]],
        *,
        queue_wait: float = 2.0,
        elsewhere: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self._registry = registry
        self._group_facts = group_facts
        self._queue_wait = queue_wait
        #: Whether agents of a group hold streams to other replicas (they will reach this one soon).
        self._elsewhere = elsewhere
        #: Until when (loop time) this replica is warming up: just started, its agents still arriving.
        self.warm_until = 0.0

    def _eligible(self, group: str, kind: int, profile: str, excluded: frozenset[str],
                  keyed: bool = False) -> list[AgentSession]:
        # A keyed write goes only to agents that honour keys: an older agent would run it unrecorded,
        # and the caller, trusting the key, might then run it twice.
        return [s for s in self._registry.in_group(group)
                if not s.draining and s.offers(kind, profile) and s.agent_id not in excluded
                and (not keyed or s.honours_keys)]

    async def route(
        self, group: str, kind: int, profile: str, start: tunnel_pb2.RequestStart,
        excluded: frozenset[str] = frozenset(),
    ) -> Exchange:
        """Send `start` to the best agent not in `excluded`, waiting briefly if all are busy.

        Raises NotFound (no such group or profile), Unavailable (no agent can take it now) or
        ResourceExhausted (every agent stayed full for the queue wait).
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._queue_wait
        keyed = is_keyed(start)
        while True:
            eligible = self._eligible(group, kind, profile, excluded, keyed)
            if not eligible:
                if keyed and self._eligible(group, kind, profile, excluded):
                    raise FailedPrecondition(
                        f"no connected agent of group '{group}' offering {kinds.name_of(kind)} profile '{profile}' "
                        f"honours idempotency keys (they are older than this control plane); upgrade them, or "
                        f"send the request without an {METADATA_KEY}", reason="IDEMPOTENCY_UNSUPPORTED")
                # A replica that just started has not got its agents back yet: a request for a group whose
                # agents are on the other replicas waits for them (they reconnect within seconds) instead
                # of failing UNAVAILABLE at a client that was sent here by round robin.
                warming = self.warm_until - loop.time()
                if warming > 0 and not excluded and self._elsewhere is not None and await self._elsewhere(group):
                    await self._registry.wait_for_change(min(warming, 0.5))
                    continue
                raise await self._explain(group, kind, profile)
            free = [s for s in eligible if s.has_capacity()]
            if free:
                session = min(free, key=lambda s: s.load)
                return session.start(start)
            remaining = give_up - loop.time()
            if remaining <= 0:
                raise ResourceExhausted(
                    f"every agent of group '{group}' offering {kinds.name_of(kind)} profile "
                    f"'{profile}' is running its maximum of requests; retry shortly",
                    reason="AGENTS_BUSY",
                )
            await self._registry.wait_for_change(remaining)

    async def _explain(self, group: str, kind: int, profile: str) -> Exception:
        kind_name = kinds.name_of(kind)
        connected = self._registry.in_group(group)
        facts = await self._group_facts(group)
        if not facts.exists and not connected:
            return NotFound(f"group '{group}' does not exist", reason="GROUP_NOT_FOUND")
        known = facts.known_profiles | {p for s in connected for p in s.profiles}
        if (kind, profile) not in known:
            offered = sorted(name for k, name in known if k == kind)
            return NotFound(
                f"no agent of group '{group}' offers a {kind_name} profile named '{profile}'"
                f" (offered: {', '.join(offered) or 'none'})",
                reason="PROFILE_NOT_FOUND",
            )
        if not connected:
            return Unavailable(
                f"no agent of group '{group}' is connected; start or check the group's agents",
                reason="NO_ACTIVE_AGENT",
            )
        offering = [s for s in connected if s.offers(kind, profile)]
        if offering and all(s.draining for s in offering):
            return Unavailable(
                f"every agent of group '{group}' offering {kind_name} profile '{profile}' is draining",
                reason="AGENTS_DRAINING",
            )
        return Unavailable(
            f"no connected agent of group '{group}' offers {kind_name} profile '{profile}' right now "
            f"(the agents that offered it are offline)",
            reason="NO_ACTIVE_AGENT",
        )
