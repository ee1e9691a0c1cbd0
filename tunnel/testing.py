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

`MemoryReplicas` are control-plane replicas in memory for a real agent
`TunnelClient` to dial (its `dial=`): each stream dialed to a
`MemoryReplica` runs a real `AgentSession`, welcomed in the replica's name,
so one process can prove what an agent does with two or three replicas:

    replicas = MemoryReplicas(MemoryReplica("r1", "r1:8444"), MemoryReplica("r2", "r2:8444"))
    client = TunnelClient(config, identity, dispatcher, dial=replicas.dial)
    session = await replicas["r2"].stream()
    exchange = session.start(start)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar

import grpc

from onprem.tunnel.aio import EOF
from onprem.tunnel.budget import Budgets
from onprem.tunnel.errors import StreamEnded
from onprem.tunnel.protocol import AgentConnection, AgentFrame, ControlPlaneConnection, Limits
from onprem.v1 import tunnel_pb2

if TYPE_CHECKING:
    from onprem.agent.dispatcher import Dispatcher
    from onprem.agent.session import ControlPlaneSession
    from onprem.control_plane.sessions import AgentSession

__all__ = ["MemoryCall", "MemoryReplica", "MemoryReplicas", "Pipe", "TunnelFor"]

M = TypeVar("M")
_FAILED = object()


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
    #: Set when the call failed (`fail`): every read raises it.
    error: BaseException | None = None

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
        if self.error is not None:
            raise self.error
        message = await self._queue.get()
        if message is _FAILED:
            assert self.error is not None
            raise self.error
        return message

    def fail(self, error: BaseException) -> None:
        """The call failed: what was not read yet is lost, and the reader gets `error`."""
        self.error = error
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_FAILED)

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


class MemoryCall:
    """The agent's end of one stream to a `MemoryReplica`, as grpc.aio's stream-stream call behaves."""

    def __init__(self, to_agent: Pipe[object], to_control_plane: Pipe[object]) -> None:
        self._to_agent = to_agent
        self._to_control_plane = to_control_plane
        #: Set by the replica once its handler returned (the call is over: cancelling it does nothing).
        self.finished = False
        self.cancelled = False
        self._on_cancel: Callable[[], object] = lambda: None

    async def read(self) -> object:
        return await self._to_agent.read()

    async def write(self, frame: AgentFrame) -> None:
        await self._to_control_plane.write(frame)

    async def done_writing(self) -> None:
        await self._to_control_plane.done_writing()

    async def wait_for_connection(self) -> None:
        return None

    def cancel(self) -> bool:
        if self.finished or self.cancelled:
            return False
        self.cancelled = True
        self._on_cancel()
        return True


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


@dataclass
class Ended:
    """How a stream ended at a replica: "closed" by the agent (a clean close), "cancelled" by it, or broken."""

    session: AgentSession
    how: str
    #: Requests the replica started on the stream.
    started: int


class MemoryReplica:
    """One control-plane replica in memory: every stream dialed to it is a real `AgentSession`.

    `replica_id` None is a control plane that names no replica (as before replicas).
    """

    def __init__(self, replica_id: str | None, agent_address: str = "", *, limits: Limits | None = None,
                 budgets: Budgets | None = None, capacity: int = 8) -> None:
        self.replica = tunnel_pb2.Replica(replica_id=replica_id, agent_address=agent_address) if replica_id else None
        self.replica_id = replica_id
        self.address = agent_address
        self.limits = limits or Limits(heartbeat_interval=timedelta(seconds=10))
        self.budgets = budgets
        self.capacity = capacity
        #: False: dials fail UNAVAILABLE, as a replica that is down.
        self.accepting = True
        #: Every stream it welcomed, in order, and how those that ended did.
        self.sessions: list[AgentSession] = []
        self.ended: list[Ended] = []
        #: Every status an agent sent it, with its session.
        self.statuses: list[tuple[AgentSession, tunnel_pb2.AgentStatus]] = []
        #: Streams dialed to it (welcomed or not).
        self.dials = 0
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def live(self) -> list[AgentSession]:
        return [s for s in self.sessions if s.is_open]

    async def stream(self, *, index: int = -1, within: float = 10.0) -> AgentSession:
        """The agent's live stream here (the newest), once there is one."""
        await self.wait_for(lambda: bool(self.live), within=within)
        return self.live[index]

    async def wait_for(self, condition: Callable[[], bool], *, within: float = 10.0) -> None:
        """Wait until `condition()` holds, looked at whenever a stream or a status arrives or ends."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(condition)

    def names(self, replicas: Sequence[tunnel_pb2.Replica]) -> None:
        """Send a `replicas` frame naming `replicas` on every live stream (a stream the agent just broke, on
        its budget for such frames, takes none: `AgentSession.send_replicas`)."""
        for session in self.live:
            session.send_replicas(list(replicas))

    async def _poke(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def accept(self, welcome_names: Callable[[], Sequence[tunnel_pb2.Replica]]) -> MemoryCall:
        """A stream dialed here: the agent's call, and the replica's handler running behind it."""
        self.dials += 1
        to_agent: Pipe[object] = Pipe(self.capacity)
        to_control_plane: Pipe[object] = Pipe(self.capacity)
        call = MemoryCall(to_agent, to_control_plane)
        task = asyncio.get_running_loop().create_task(self._handle(call, to_agent, to_control_plane, welcome_names))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        call._on_cancel = task.cancel
        return call

    async def _handle(self, call: MemoryCall, to_agent: Pipe[object], to_control_plane: Pipe[object],
                      welcome_names: Callable[[], Sequence[tunnel_pb2.Replica]]) -> None:
        from onprem.control_plane.sessions import AgentSession

        conn = ControlPlaneConnection(self.limits)
        first = await to_control_plane.read()
        if first is EOF:
            call.finished = True
            await to_agent.done_writing()
            return
        assert isinstance(first, AgentFrame)
        conn.receive(first)
        session: AgentSession

        async def read() -> object:
            frame = await to_control_plane.read()
            if isinstance(frame, AgentFrame):
                statuses = [f.status for f in (frame.batch.frames if frame.HasField("batch") else [frame])
                            if f.HasField("status")]
                for status in statuses:
                    self.statuses.append((session, status))
                if statuses:
                    await self._poke()
            return frame

        started = 0

        async def write(frame: tunnel_pb2.ConnectResponse) -> None:
            nonlocal started
            started += sum(f.HasField("start") for f in (frame.batch.frames if frame.HasField("batch") else [frame]))
            await to_agent.write(frame)

        session = AgentSession(conn, write, read, agent_id="agent-memory", name="memory", group="g",
                               cert_expires_at=None, budgets=self.budgets)
        await to_agent.write(conn.welcome_frame(agent_id="agent-memory", group="g", session_id=session.session_id,
                                                replica=self.replica, replicas=list(welcome_names())))
        self.sessions.append(session)
        await self._poke()
        how = "closed"
        try:
            await session.serve()
            if session.protocol_error:
                how = f"protocol error: {session.protocol_error}"
            elif session.budget_error is not None:
                how = f"budget: {session.budget_error.budget}"
        except asyncio.CancelledError:
            how = "cancelled"
            # The handler was cancelled (the agent cancelled its call, or the replica closed the session): the
            # call ends with CANCELLED for the agent.
            to_agent.fail(_rpc_error(grpc.StatusCode.CANCELLED, "the replica's handler was cancelled"))
            raise
        finally:
            call.finished = True
            self.ended.append(Ended(session, how, started))
            with contextlib.suppress(BaseException):
                await self._poke()
        # The handler returned: grpc ends the call, and the agent reads its end.
        await to_agent.done_writing()

    def close(self) -> None:
        for session in self.sessions:
            session.close("the test is over")
        for task in list(self._tasks):
            task.cancel()


class MemoryReplicas:
    """Replicas in memory, at their own addresses and behind one load-balanced address (`lb_address`).

    `dial` is the agent's dialer. A dial of a replica's address reaches it; a dial of `lb_address`
    reaches the replica `pick` chooses (default: round robin over those behind it). Welcomes name
    `named` (default: every replica with an id that accepts streams).
    """

    def __init__(self, *replicas: MemoryReplica, lb_address: str = "cp:8444",
                 pick: Callable[[list[MemoryReplica]], MemoryReplica] | None = None) -> None:
        self.replicas = list(replicas)
        self.lb_address = lb_address
        self._pick = pick
        self._turn = 0
        #: Every address dialed, in order.
        self.dials: list[str] = []
        self.named: list[tunnel_pb2.Replica] | None = None

    def __getitem__(self, replica_id: str) -> MemoryReplica:
        return next(r for r in self.replicas if r.replica_id == replica_id)

    def welcome_names(self) -> list[tunnel_pb2.Replica]:
        if self.named is not None:
            return list(self.named)
        return [r.replica for r in self.replicas if r.replica is not None and r.accepting]

    def _reach(self, address: str) -> MemoryReplica | None:
        for replica in self.replicas:
            if replica.address and replica.address == address:
                return replica
        if address != self.lb_address:
            return None
        behind = [r for r in self.replicas if r.accepting]
        if not behind:
            return None
        if self._pick is not None:
            return self._pick(behind)
        self._turn += 1
        return behind[(self._turn - 1) % len(behind)]

    @contextlib.asynccontextmanager
    async def dial(self, address: str, identity: object) -> AsyncIterator[tuple[MemoryCall, None]]:
        self.dials.append(address)
        replica = self._reach(address)
        if replica is None or not replica.accepting:
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE, f"failed to connect to all addresses; last error: {address}: Connection refused")
        call = replica.accept(self.welcome_names)
        try:
            yield call, None
        finally:
            call.cancel()

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()

    async def aclose(self) -> None:
        self.close()
        tasks = [t for r in self.replicas for t in r._tasks]
        with contextlib.suppress(StreamEnded):
            await asyncio.gather(*tasks, return_exceptions=True)
