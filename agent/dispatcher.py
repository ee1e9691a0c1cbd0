"""Where a request's payload meets its typed handler.

`RequestStart.payload` is a oneof: `database_query` goes to the database
handler, `file_op` to the folder handler, `app_call` to the app handler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from agent.handlers.base import Handler, RequestContext
from onprem.v1 import profiles_pb2, tunnel_pb2
from tunnel.errors import InvalidArgument

_PAYLOAD_OF_KIND = {
    profiles_pb2.PROFILE_KIND_DATABASE: "database_query",
    profiles_pb2.PROFILE_KIND_FOLDER: "file_op",
    profiles_pb2.PROFILE_KIND_APP: "app_call",
}


class Dispatcher:
    def __init__(self, handlers: dict[str, Handler]) -> None:
        # Keys are the names of RequestStart's payload fields.
        self._handlers = handlers

    def profiles(self) -> list[profiles_pb2.Profile]:
        return [p for handler in self._handlers.values() for p in handler.profiles()]

    def handle(self, start: tunnel_pb2.RequestStart, context: RequestContext) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        kind = start.WhichOneof("payload")
        if kind == "profile_check":
            return self._check(start.profile_check)
        handler = self._handlers.get(kind or "")
        if handler is None:
            raise InvalidArgument(f"this agent does not handle {kind or 'requests without a payload'}")
        return handler.handle(start, context)

    async def _check(self, request: profiles_pb2.CheckProfileRequest) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        handler = self._handlers.get(_PAYLOAD_OF_KIND.get(request.kind, ""))
        if handler is None:
            raise InvalidArgument("'kind' must be DATABASE, FOLDER or APP", reason="INVALID_KIND")
        checks = await handler.check(request.profile)
        yield tunnel_pb2.ResponseChunk(profile_check=profiles_pb2.CheckProfileResponse(
            checks=checks, ok=all(c.ok for c in checks)))

    async def aclose(self) -> None:
        for handler in self._handlers.values():
            await handler.aclose()
