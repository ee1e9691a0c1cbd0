"""When a request may go to another agent of its group, and doing it.

A request is re-routed only when doing so cannot make it run twice:
- the agent refused it before starting it (draining, at its limit), or
- the agent was lost, the request is idempotent (reads, lists, stats, GET/HEAD
  app calls, queries on read-only profiles, profile checks), and nothing of its
  result has reached the operator yet; this happens at most once.
Anything else fails with UNAVAILABLE saying whether the request may have run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from onprem.control_plane import metrics
from onprem.control_plane.sessions import AgentSession, Exchange
from onprem.tunnel import kinds
from onprem.tunnel.errors import RequestError, Unavailable
from onprem.v1 import tunnel_pb2

#: Final-status reasons with which an agent refuses a request before starting it.
NEVER_STARTED = frozenset({"AGENT_DRAINING", "AGENT_BUSY"})
#: How often a refused request is offered to another agent.
MAX_REFUSALS = 3

def is_idempotent(start: tunnel_pb2.RequestStart, session: AgentSession) -> bool:
    """Whether running `start` twice is harmless, on the agent that ran it (`tunnel.kinds` decides)."""
    kind = kinds.by_payload(start.WhichOneof("payload"))
    read_only = kind is kinds.DATABASE and session.profile_is_read_only(kinds.DATABASE.profile_of(start))
    return kinds.is_idempotent(start, read_only)


Opener = Callable[[frozenset[str]], Awaitable[Exchange]]


class RoutedRequest:
    """An operator request's result stream, re-routed to another agent when that is safe.

    `open(excluded_agent_ids)` sends the request to an agent not excluded.
    """

    def __init__(self, start: tunnel_pb2.RequestStart, opener: Opener) -> None:
        self._start = start
        self._open = opener
        self._excluded: set[str] = set()
        self._refusals = 0
        self._lost_retries = 0
        self.exchange: Exchange | None = None

    async def open(self) -> Exchange:
        self.exchange = await self._open(frozenset(self._excluded))
        return self.exchange

    @property
    def delivered(self) -> bool:
        return self.exchange is not None and self.exchange.delivered

    def __aiter__(self) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        return self

    async def __anext__(self) -> tunnel_pb2.ResponseChunk:
        while True:
            assert self.exchange is not None
            try:
                return await self.exchange.__anext__()
            except RequestError as exc:
                if not await self._retry(exc):
                    raise self._explain(exc) from None

    async def single(self) -> tunnel_pb2.ResponseChunk:
        result: tunnel_pb2.ResponseChunk | None = None
        async for chunk in self:
            if result is None:
                result = chunk
        if result is None:
            raise Unavailable("the agent ended the request without a result", reason="NO_RESULT")
        return result

    async def _retry(self, error: RequestError) -> bool:
        exchange = self.exchange
        assert exchange is not None
        if exchange.delivered or self._start.has_body:
            return False
        if error.reason in NEVER_STARTED and self._refusals < MAX_REFUSALS:
            self._refusals += 1
        elif (error.reason == "AGENT_LOST" and self._lost_retries == 0
              and is_idempotent(self._start, exchange.session)):
            self._lost_retries += 1
        else:
            return False
        metrics.RETRIES.labels(error.reason.lower()).inc()
        self._excluded.add(exchange.session.agent_id)
        self._start.attempt += 1
        try:
            await self.open()
        except RequestError:
            return False  # nobody else can take it: the original error explains best
        return True

    def _explain(self, error: RequestError) -> RequestError:
        if error.reason != "AGENT_LOST" or self.exchange is None:
            return error
        session = self.exchange.session
        cause = error.cause
        who = f"agent {session.name} ({session.agent_id})" + (f", {cause}," if cause else "")
        if self.delivered:
            return Unavailable(f"{who} was lost after part of the result was sent; the result is incomplete, "
                               f"retry the request", reason="AGENT_LOST")
        if is_idempotent(self._start, session):
            return Unavailable(f"{who} was lost while running the request, and no other agent of the group "
                               f"could take it; it changed nothing, so it is safe to retry", reason="AGENT_LOST")
        return Unavailable(f"{who} was lost while running the request; it may have run in part or in full, "
                           f"so check its effects before retrying", reason="AGENT_LOST")
