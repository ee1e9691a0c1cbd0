"""Where a request's payload meets its typed handler.

`RequestStart.payload` is a oneof: `database_query` goes to the database
handler, `file_op` to the folder handler, `app_call` to the app handler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from agent.handlers.base import Handler, RequestContext
from onprem.v1 import tunnel_pb2
from tunnel.errors import InvalidArgument


class Dispatcher:
    def __init__(self, handlers: dict[str, Handler]) -> None:
        # Keys are the names of RequestStart's payload fields.
        self._handlers = handlers

    def profiles(self) -> list[tunnel_pb2.Profile]:
        return [p for handler in self._handlers.values() for p in handler.profiles()]

    def handle(self, start: tunnel_pb2.RequestStart, context: RequestContext) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        kind = start.WhichOneof("payload")
        handler = self._handlers.get(kind or "")
        if handler is None:
            raise InvalidArgument(f"this agent does not handle {kind or 'requests without a payload'}")
        return handler.handle(start, context)

    async def aclose(self) -> None:
        for handler in self._handlers.values():
            await handler.aclose()
