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

from opentelemetry.trace import INVALID_SPAN, Span

from onprem.control_plane.credentials import OpenCall
from onprem.control_plane.failover import Attempts, explain
from onprem.control_plane.router import Router
from onprem.control_plane.sessions import AgentSession, Exchange
from onprem.tunnel import tracing
from onprem.tunnel.errors import RequestError, Unavailable
from onprem.tunnel.idempotency import is_keyed
from onprem.v1 import tunnel_pb2

#: The largest body of a keyed request kept to send again should its agent be lost; a larger one is not
#: retried by the control plane (the caller retries with the same key).
MAX_REPLAY_BYTES = 1024 * 1024


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
        #: A keyed request's body so far, to send again on a retry; None when it has none or outgrew the cap.
        self._replay: list[bytes] | None = [] if start.has_body and is_keyed(start) else None
        self._replay_bytes = 0
        #: Whether the whole body reached the agent's stream (a body cut short cannot be sent again).
        self._body_sent = False
        #: The error the request ended with; None while it runs or once it succeeded.
        self.outcome: RequestError | None = None
        #: The span of relaying it (`ControlPlane.relay`'s), parent of each attempt's routing.
        self.span: Span = INVALID_SPAN

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
        with tracing.span("route", parent=self.span, attributes={"onprem.attempt": self._start.attempt}) as route_span:
            try:
                self._exchange = await self._router.route(
                    target.group, target.kind, target.profile, self._start, frozenset(self._excluded))
            except RequestError as exc:
                tracing.failed(route_span, exc.code.name, exc.reason)
                raise
            if route_span.is_recording():
                route_span.set_attribute("onprem.agent_id", self._exchange.session.agent_id)

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
        """Send request data to the agent within the request's credit.

        A request with a body re-routes only when it carries an idempotency key and its whole body, at
        most `MAX_REPLAY_BYTES`, was sent: that body is kept here to send to the next agent.
        """
        assert self._exchange is not None, "begin() first"
        if self._replay is not None:
            self._replay_bytes += len(data)
            if self._replay_bytes > MAX_REPLAY_BYTES:
                self._replay = None
            elif data:
                self._replay.append(data)
        await self._exchange.send_body(data, end_of_data=end_of_data)
        if end_of_data:
            self._body_sent = True

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
        replayable = self._replay is not None and self._body_sent
        if not self._attempts.may_retry(error, self._start, exchange.session, delivered=exchange.delivered,
                                        body_replayable=replayable):
            return False
        self._excluded.add(exchange.session.agent_id)
        self._start.attempt += 1
        try:
            await self.begin()
        except RequestError:
            return False  # nobody else can take it: the original error explains best
        if self._start.has_body and self._replay is not None and self._exchange is not None:
            # The pump is done (the body was sent whole): nothing else sends on the new exchange.
            for part in self._replay:
                await self._exchange.send_body(part)
            await self._exchange.send_body(b"", end_of_data=True)
        return True
