"""Where a request's payload meets its typed handler.

`RequestStart.payload` is a oneof. The registry of kinds (`tunnel.kinds`)
names the kind of each payload field; the dispatcher unwraps the payload and
hands the typed message (`DatabaseQuery`, `FileOp`, `AppCall`) to that kind's
handler, which need not look at the oneof again. A `profile_check` goes to
the handler of the profile's kind, found in the registry by `ProfileKind`.

A configuration reload (SIGHUP) swaps in a new set of handlers: new requests
use them at once, requests already running finish on the handlers they
started with, and those are closed when their last request ends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator
from typing import Any

from onprem.agent.handlers.base import Handler, RequestContext
from onprem.tunnel import kinds
from onprem.tunnel.errors import InvalidArgument, RequestError
from onprem.v1 import profiles_pb2, tunnel_pb2

log = logging.getLogger("onprem.agent.dispatcher")

#: How long one profile's health check may take before it counts as failed.
CHECK_TIMEOUT = 20.0


class _Generation:
    """One set of handlers, and how many requests still run on it."""

    def __init__(self, handlers: dict[str, Handler[Any]]) -> None:
        self.handlers = handlers
        self.active = 0
        self.retired = False

    async def aclose(self) -> None:
        for handler in self.handlers.values():
            try:
                await handler.aclose()
            except Exception:
                log.exception("closing a handler failed")


class Dispatcher:
    def __init__(self, handlers: dict[str, Handler[Any]]) -> None:
        # Keys are the names of RequestStart's payload fields (`Kind.payload`).
        self._current = _Generation(handlers)
        self._closing: set[asyncio.Task[None]] = set()

    def profiles(self) -> list[profiles_pb2.Profile]:
        return [p for handler in self._current.handlers.values() for p in handler.profiles()]

    def replace(self, handlers: dict[str, Handler[Any]]) -> None:
        """Use `handlers` for new requests; close the old ones once their requests end."""
        old, self._current = self._current, _Generation(handlers)
        old.retired = True
        if old.active == 0:
            self._close_later(old)

    def handle(self, start: tunnel_pb2.RequestStart, context: RequestContext) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        generation = self._current
        payload = start.WhichOneof("payload")
        if payload == kinds.PROFILE_CHECK:
            return self._tracked(generation, self._check(generation, start.profile_check))
        kind = kinds.by_payload(payload)
        handler = generation.handlers.get(kind.payload) if kind is not None else None
        if kind is None or handler is None:
            raise InvalidArgument(f"this agent does not handle {payload or 'requests without a payload'}")
        return self._tracked(generation, handler.handle(kind.payload_of(start), context))

    async def check_all(self) -> list[profiles_pb2.ProfileHealth]:
        """Check every profile, concurrently; a check that hangs counts as failed."""
        generation = self._current
        jobs: list[tuple[int, str, Handler[Any]]] = []
        for kind in kinds.KINDS:
            handler = generation.handlers.get(kind.payload)
            if handler is not None:
                jobs.extend((kind.profile_kind, p.name, handler) for p in handler.profiles())

        async def one(kind: int, name: str, handler: Handler[Any]) -> profiles_pb2.ProfileHealth:
            try:
                async with asyncio.timeout(CHECK_TIMEOUT):
                    checks = await handler.check(name)
            except TimeoutError:
                checks = [profiles_pb2.ProfileCheck(
                    name="responds", ok=False, message=f"the check took longer than {CHECK_TIMEOUT:.0f} s")]
            except RequestError as exc:
                checks = [profiles_pb2.ProfileCheck(name="check", ok=False, message=exc.message)]
            health = profiles_pb2.ProfileHealth(
                profile=name, kind=kind,  # type: ignore[arg-type]
                ok=all(c.ok for c in checks), checks=checks,
            )
            health.checked_at.FromDatetime(dt.datetime.now(dt.UTC))
            return health

        generation.active += 1
        try:
            return list(await asyncio.gather(*(one(*job) for job in jobs)))
        finally:
            self._release(generation)

    async def _tracked(
        self, generation: _Generation, chunks: AsyncIterator[tunnel_pb2.ResponseChunk]
    ) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        generation.active += 1
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self._release(generation)

    def _release(self, generation: _Generation) -> None:
        generation.active -= 1
        if generation.retired and generation.active == 0:
            self._close_later(generation)

    def _close_later(self, generation: _Generation) -> None:
        task = asyncio.get_running_loop().create_task(generation.aclose(), name="close-retired-handlers")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _check(
        self, generation: _Generation, request: profiles_pb2.CheckProfileRequest
    ) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        kind = kinds.by_profile_kind(request.kind)
        handler = generation.handlers.get(kind.payload) if kind is not None else None
        if handler is None:
            raise InvalidArgument("'kind' must be DATABASE, FOLDER or APP", reason="INVALID_KIND")
        checks = await handler.check(request.profile)
        yield tunnel_pb2.ResponseChunk(profile_check=profiles_pb2.CheckProfileResponse(
            checks=checks, ok=all(c.ok for c in checks)))

    async def aclose(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self._current.aclose()
