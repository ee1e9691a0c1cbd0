"""Every operator RPC is authenticated from its metadata before a single message is read.

A server interceptor runs when a call arrives, before grpc reads the request:
it authenticates the bearer token and, when that fails, answers with a handler
that reads nothing and ends the call with UNAUTHENTICATED at once, audited with
the caller's address. (A refusing handler is client-streaming on purpose: for a
handler of a unary request grpc would first wait for the request message, which
a hostile client need never send.) Everything on the operator listener is
guarded except what must be public: the health service and server reflection.

For an RPC with a unary request, a token this process already holds as valid is let through
without reading the store's change counter (`TokenAuthority.screen`): the call is authenticated in
full when its handler starts, before it does anything.

An accepted call runs inside `_Guarded`, which
- authenticates once more when the handler starts, for RPCs with a unary request
  (grpc read the message in between, and a client may delay it at will), so that
  the principal is bound when the work starts;
- tracks the call with the token authority for its whole life, so that revoking
  or expiring the token ends it with UNAUTHENTICATED (a call not waiting on an
  agent is cancelled, and the cancellation is turned into that status here);
- observes the call (`observe.Observer.observe`): services note on it what they
  did, and its end becomes the call's audit row and metrics;
- runs it in its trace (`tunnel.tracing.enter`): the caller's `traceparent`, checked, or a new one,
  with a server span when spans are exported; refusals too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, cast

import grpc

from onprem.control_plane.api import errors
from onprem.control_plane.auth import Principal
from onprem.control_plane.core import ControlPlane
from onprem.control_plane.credentials import OpenCall, current_call
from onprem.control_plane.observe import Observation
from onprem.tunnel import tracing
from onprem.tunnel.errors import RequestError

log = logging.getLogger("onprem.control_plane.api")

#: Methods anyone may call: probes and load balancers check health, clients discover the API.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
#: Services whose calls the audit log files as "admin" (the others relay requests to agents).
ADMIN_SERVICES = ("/onprem.v1.AgentService/", "/onprem.v1.TokenService/")

Context = grpc.aio.ServicerContext[Any, Any]
Metadata = Sequence[tuple[str, str | bytes]]


if TYPE_CHECKING:  # grpc-stubs makes it generic; at run time it is a plain class
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


def _metadata(context: Context) -> Metadata:
    return cast(Metadata, context.invocation_metadata())


def _traced(method: str, context: Context) -> AbstractContextManager[object]:
    """The call's span: a child of the caller's `traceparent` when it is valid, else in a new trace."""
    service, _, name = method.lstrip("/").partition("/")
    return tracing.enter(method.lstrip("/"), tracing.from_metadata(_metadata(context)),
                         attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})


class AuthInterceptor(_ServerInterceptor):
    """Authenticates every non-public call from its metadata, before grpc reads a message."""

    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if method.startswith(PUBLIC_PREFIXES) or handler is None:
            return handler  # None: an unknown method, UNIMPLEMENTED
        metadata = cast(Metadata, handler_call_details.invocation_metadata)
        # A unary request is authenticated again when its handler starts, and that binds the principal:
        # here a token already known valid is enough to let grpc read the message (one counter read
        # per call instead of two). Anything else is authenticated in full before a byte is read.
        principal = None if handler.request_streaming else self._cp.tokens.screen(metadata)
        if principal is None:
            try:
                principal = await self._cp.tokens.authenticate(metadata)
            except RequestError as exc:
                return _refusal(self._cp, method, exc)
        return _Guarded(self._cp, method, handler, principal).handler()


def _refusal(cp: ControlPlane, method: str, error: RequestError) -> grpc.RpcMethodHandler[Any, Any]:
    async def refuse(_requests: AsyncIterator[bytes], context: Context) -> None:
        with _traced(method, context):
            cp.observer.refuse(method=method, peer=context.peer(), error=error)
        await errors.abort(context, error)

    return grpc.stream_stream_rpc_method_handler(refuse)


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


class _Guarded:
    """One accepted call: the handler that serves it, tracked and audited."""

    def __init__(self, cp: ControlPlane, method: str, handler: grpc.RpcMethodHandler[Any, Any], principal: Principal) -> None:
        self._cp = cp
        self._method = method
        self._handler = handler
        # A unary request is read between the interceptor and the handler: authenticate again then.
        self._principal: Principal | None = principal if handler.request_streaming else None

    def handler(self) -> grpc.RpcMethodHandler[Any, Any]:
        # Any: grpc-stubs types method handlers for the sync server; on grpc.aio their behaviours are async.
        h: Any = self._handler
        kwargs = {"request_deserializer": h.request_deserializer, "response_serializer": h.response_serializer}
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary_response(h.unary_unary), **kwargs)
        if h.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._unary_response(h.stream_unary), **kwargs)
        if h.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._stream_response(h.unary_stream), **kwargs)
        return grpc.stream_stream_rpc_method_handler(self._stream_response(h.stream_stream), **kwargs)

    def _observe(self, context: Context) -> AbstractContextManager[Observation]:
        # Asked before any await, while the call is alive: grpc's peer() on a call that ended (the
        # client cancelled meanwhile) reads freed memory.
        kind = "admin" if self._method.startswith(ADMIN_SERVICES) else "request"
        return self._cp.observer.observe(method=self._method, peer=context.peer(), kind=kind)

    async def _open(self, context: Context, observation: Observation) -> OpenCall:
        principal = self._principal
        if principal is None:
            try:
                principal = await self._cp.tokens.authenticate(_metadata(context))
            except RequestError as exc:
                await errors.abort(context, exc)
                raise AssertionError("unreachable: abort raises") from None
        observation.principal = principal
        with tracing.span("auth", attributes={"onprem.token_id": principal.token_id or "",
                                              "onprem.role": principal.role}):
            # For RPCs with a streamed request the token was checked on arrival; this binds it to the call.
            call = self._cp.tokens.open_call(principal, self._method, observation.peer)
        current_call.set(call)  # one task per call: the variable lives and dies with it
        return call

    @staticmethod
    async def _ended(context: Context, call: OpenCall, observation: Observation) -> None:
        """Turn the cancellation of an ended call into its status."""
        assert call.error is not None
        if observation.outcome is not None:
            # It was ended while already sending its own error status: let that one stand.
            raise asyncio.CancelledError
        _uncancel()
        await errors.abort(context, call.error)

    def _unary_response(self, inner: Callable[[Any, Context], Awaitable[Any]]) -> Callable[[Any, Context], Awaitable[Any]]:
        async def behaviour(request: Any, context: Context) -> Any:
            with _traced(self._method, context), self._observe(context) as observation:
                call = await self._open(context, observation)
                try:
                    if call.error is not None:
                        await errors.abort(context, call.error)
                    return await inner(request, context)
                except asyncio.CancelledError:
                    if call.error is None:
                        raise
                    await self._ended(context, call, observation)
                finally:
                    self._cp.tokens.close_call(call)

        return behaviour

    def _stream_response(
        self, inner: Callable[[Any, Context], AsyncIterator[Any]]
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def behaviour(request: Any, context: Context) -> AsyncIterator[Any]:
            with _traced(self._method, context), self._observe(context) as observation:
                call = await self._open(context, observation)
                try:
                    if call.error is not None:
                        await errors.abort(context, call.error)
                    async for response in inner(request, context):
                        call.responded = True
                        yield response
                except asyncio.CancelledError:
                    if call.error is None or call.responded:
                        raise
                    await self._ended(context, call, observation)
                finally:
                    self._cp.tokens.close_call(call)

        return behaviour
