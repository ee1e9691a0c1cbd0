"""Both ends of a tunnel stream in one process, joined by memory (as grpclib's `ChannelFor` is).

`TunnelFor(dispatcher)` runs the control plane's real `AgentSession` and the
agent's real `ControlPlaneSession` on a pair of bounded in-memory pipes, past
the real handshake, so that cancel, deadlines, drains and flow control are
tested in milliseconds, with no sockets and no processes:

    async with TunnelFor(Dispatcher({"file_op": handler})) as tunnel:
        exchange = tunnel.control_plane.start(start)
        chunks = [chunk async for chunk in exchange]

A pipe holds a few messages, then makes its writer wait until the other end
reads, as an HTTP/2 stream's window does; `pause()` stops an end from reading.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar

from onprem.tunnel.aio import EOF
from onprem.tunnel.budget import Budgets
from onprem.tunnel.protocol import AgentConnection, ControlPlaneConnection, Limits
from onprem.v1 import tunnel_pb2

if TYPE_CHECKING:
    from onprem.agent.dispatcher import Dispatcher
    from onprem.agent.session import ControlPlaneSession
    from onprem.control_plane.sessions import AgentSession

__all__ = ["Pipe", "TunnelFor"]

M = TypeVar("M")


@dataclass
class Pipe(Generic[M]):
    """One direction of a stream: `write` waits while `capacity` messages are unread."""

    capacity: int = 8
    _queue: asyncio.Queue[object] = field(init=False)
    #: Cleared to stop the reader (a peer that does not read).
    reading: asyncio.Event = field(default_factory=asyncio.Event)
    written: int = 0
    #: Set once the writer half-closed; a write after that fails as it does in grpc.aio.
    half_closed: bool = False

    def __post_init__(self) -> None:
        self._queue = asyncio.Queue(self.capacity)
        self.reading.set()

    async def write(self, message: M) -> None:
        if self.half_closed:
            raise asyncio.InvalidStateError('RPC is half closed after calling "done_writing".')
        await self._queue.put(message)
        self.written += 1

    async def read(self) -> object:
        await self.reading.wait()
        return await self._queue.get()

    async def done_writing(self) -> None:
        self.half_closed = True
        await self._queue.put(EOF)


class TunnelFor:
    """A control plane's session and an agent's session of one stream, in memory."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        limits: Limits | None = None,
        hello: tunnel_pb2.Hello | None = None,
        max_in_flight: int = 16,
        budgets: Budgets | None = None,
        capacity: int = 8,
    ) -> None:
        self.limits = limits or Limits(heartbeat_interval=timedelta(seconds=10))
        self._dispatcher = dispatcher
        self._hello = hello or tunnel_pb2.Hello(agent_version="test", hostname="memory")
        self._max_in_flight = max_in_flight
        self._budgets = budgets
        self.to_agent: Pipe[object] = Pipe(capacity)
        self.to_control_plane: Pipe[object] = Pipe(capacity)
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> TunnelFor:
        from onprem.agent.session import ControlPlaneSession
        from onprem.control_plane.sessions import AgentSession

        agent_conn = AgentConnection()
        cp_conn = ControlPlaneConnection(self.limits)
        hello = self._hello
        hello.max_in_flight = hello.max_in_flight or self._max_in_flight
        if not hello.profiles:
            hello.profiles.extend(self._dispatcher.profiles())
        cp_conn.receive(agent_conn.hello_frame(hello))
        self.control_plane: AgentSession = AgentSession(
            cp_conn, self.to_agent.write, self.to_control_plane.read, agent_id="agent-memory", name="memory",
            group="g", cert_expires_at=None, budgets=self._budgets)
        agent_conn.receive(self.control_plane.welcome_frame())

        class _Call:
            read = self.to_agent.read
            write = self.to_control_plane.write
            done_writing = self.to_control_plane.done_writing

        self.agent: ControlPlaneSession = ControlPlaneSession(
            _Call(), agent_conn, self._dispatcher, max_in_flight=self._max_in_flight, budgets=self._budgets)
        loop = asyncio.get_running_loop()
        self.control_plane_ended: asyncio.Task[None] = loop.create_task(self.control_plane.serve())
        self.agent_ended: asyncio.Task[None] = loop.create_task(self.agent.run())

        async def end_the_call() -> None:
            # When the control plane's handler returns, grpc ends the call: the agent reads its end.
            with contextlib.suppress(BaseException):
                await self.control_plane_ended
            await self.to_agent.done_writing()

        self._tasks = [self.control_plane_ended, self.agent_ended, loop.create_task(end_the_call())]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.control_plane.close("the test is over")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
