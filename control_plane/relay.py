"""One operator data request, from the choice of its agent to its last chunk.

`RelayedRequest` owns a request the way httpcore's connection pool owns an HTTP request: it asks
the router for an agent of the group, sends the request down that agent's stream, relays the result
chunks, re-routes to another agent when `failover` says that cannot make it run twice, and stops
when the operator's call is ended (its token revoked or expired). It says which agent ran the
request, how many bytes went back and how it ended; nobody outside reaches the agent session or the
per-attempt `sessions.Exchange` behind it.

`ControlPlane.relay` builds one per data RPC after authorizing it, inside the call's observation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from onprem.control_plane.credentials import OpenCall
from onprem.control_plane.failover import Attempts, explain
from onprem.control_plane.router import Router
from onprem.control_plane.sessions import AgentSession, Exchange
from onprem.tunnel.errors import RequestError, Unavailable
from onprem.v1 import tunnel_pb2


@dataclass(frozen=True)
class Target:
    """Where a request goes: a profile of one kind, offered by agents of one group."""

    group: str
    #: A `ProfileKind`.
    kind: int
    profile: str


class RelayedRequest:
    """An operator request relayed to an agent of its group; iterate it for the result chunks.

    Iterating raises the request's error at the end, if any: the agent's, or `failover`'s explanation
    when its agent was lost, or the call's own error once the call was ended.
    """

    def __init__(self, router: Router, target: Target, start: tunnel_pb2.RequestStart,
                 call: OpenCall | None = None) -> None:
        self.target = target
        self._router = router
        self._start = start
        self._call = call
        self._attempts = Attempts()
        self._excluded: set[str] = set()
        self._exchange: Exchange | None = None
        #: The error the request ended with; None while it runs or once it succeeded.
        self.outcome: RequestError | None = None

    @property
    def agent(self) -> AgentSession | None:
        """The agent running (or that ran) the request; None before one was chosen."""
        return self._exchange.session if self._exchange is not None else None

    @property
    def bytes_out(self) -> int:
        """Result bytes relayed to the operator."""
        return self._exchange.bytes_out if self._exchange is not None else 0

    @property
    def delivered(self) -> bool:
        """Whether any of the result reached the operator (a re-route is unsafe then)."""
        return self._exchange is not None and self._exchange.delivered

    async def begin(self) -> None:
        """Send the request to the best agent of its group not tried yet.

        Raises what `Router.route` raises: NotFound, Unavailable, ResourceExhausted.
        """
        target = self.target
        self._exchange = await self._router.route(
            target.group, target.kind, target.profile, self._start, frozenset(self._excluded))

    def __aiter__(self) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        return self

    async def __anext__(self) -> tunnel_pb2.ResponseChunk:
        # Checked before and after each chunk, so that a chunk already queued is not delivered
        # after the call was ended.
        self._raise_if_call_ended()
        while True:
            exchange = self._exchange
            assert exchange is not None, "begin() first"
            try:
                chunk = await exchange.__anext__()
            except RequestError as exc:
                if await self._rerouted(exc, exchange):
                    continue
                self.outcome = explain(exc, self._start, exchange.session, delivered=exchange.delivered)
                raise self.outcome from None
            self._raise_if_call_ended()
            return chunk

    def take_ready(self, fits: Callable[[tunnel_pb2.ResponseChunk], bool]) -> tunnel_pb2.ResponseChunk | None:
        """The next chunk if it has already arrived and `fits`, taken without waiting; None otherwise.

        For relaying several small chunks to the operator as one message (`FileService.Read`). Never
        returns the request's end or error, nor anything once the call was ended: iterate for those.
        """
        if self._exchange is None or (self._call is not None and self._call.error is not None):
            return None
        return self._exchange.take_ready(fits)

    async def single(self) -> tunnel_pb2.ResponseChunk:
        """The one result chunk of a unary operation (the first, should an agent send more)."""
        result: tunnel_pb2.ResponseChunk | None = None
        async for chunk in self:
            if result is None:
                result = chunk
        if result is None:
            raise Unavailable("the agent ended the request without a result", reason="NO_RESULT")
        return result

    async def send_body(self, data: bytes, *, end_of_data: bool = False) -> None:
        """Send request data to the agent within the request's credit (requests with a body never re-route)."""
        assert self._exchange is not None, "begin() first"
        await self._exchange.send_body(data, end_of_data=end_of_data)

    def fail(self, error: RequestError) -> None:
        """End the request with `error` for its reader, and cancel it on the agent."""
        if self._exchange is not None and not self._exchange.ended:
            self._exchange.fail(error)

    async def aclose(self) -> None:
        """Cancel the request on its agent if it has not ended (the operator went away)."""
        if self._exchange is not None:
            await self._exchange.aclose()

    def _raise_if_call_ended(self) -> None:
        if self._call is not None and self._call.error is not None:
            self.outcome = self._call.error
            raise self._call.error

    async def _rerouted(self, error: RequestError, exchange: Exchange) -> bool:
        if not self._attempts.may_retry(error, self._start, exchange.session, delivered=exchange.delivered):
            return False
        self._excluded.add(exchange.session.agent_id)
        self._start.attempt += 1
        try:
            await self.begin()
        except RequestError:
            return False  # nobody else can take it: the original error explains best
        return True
