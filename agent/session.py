"""The agent's end of one tunnel stream: the asyncio shell around
`tunnel.protocol.AgentConnection`.

One reader loop feeds frames to the protocol and acts on the events; one
writer task sends; one heartbeat task watches the peer. Each request runs in
its own task, which waits for its own credit before sending each chunk, so a
slow consumer at the far end stalls only its own request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc

from agent import metrics
from agent.dispatcher import Dispatcher
from agent.handlers.base import RequestContext
from onprem.v1 import profiles_pb2, tunnel_pb2
from tunnel.aio import EOF, CreditWaiters, FrameWriter, StreamClosed
from tunnel.budget import BudgetExceeded, Budgets, PeerMeter
from tunnel.errors import Code, RemoteProtocolError, RequestError
from tunnel.protocol import (
    AgentConnection,
    AgentFrame,
    CancelReceived,
    ControlFrame,
    CreditGranted,
    DataReceived,
    DrainReceived,
    Event,
    FrameIgnored,
    PingReceived,
    PongReceived,
    RequestStarted,
)

log = logging.getLogger("onprem.agent.session")

_CONTROL_KIND: dict[type[Event], str] = {PingReceived: "ping", PongReceived: "pong", DrainReceived: "drain"}


class SessionLost(Exception):
    """The stream to the control plane ended or went silent."""


class DrainedToExit(Exception):
    """The control plane drained this agent and asked it to stop (DrainAgent)."""


class TunnelCall(Protocol):
    async def read(self) -> object: ...
    async def write(self, request: AgentFrame) -> None: ...
    async def done_writing(self) -> None: ...


class _Body:
    """A request's body as its handler reads it: credit flows back as it is consumed."""

    def __init__(self, on_consumed: Callable[[int], None]) -> None:
        self._queue: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()
        self._on_consumed = on_consumed

    def feed(self, data: bytes, end: bool) -> None:
        self._queue.put_nowait((data, end))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            data, end = await self._queue.get()
            if data:
                yield data
                self._on_consumed(len(data))
            if end:
                return


class AgentSession:
    def __init__(
        self,
        call: TunnelCall,
        conn: AgentConnection,
        dispatcher: Dispatcher,
        *,
        max_in_flight: int,
        budgets: Budgets | None = None,
    ) -> None:
        self._call = call
        self._conn = conn
        self._dispatcher = dispatcher
        self._max_in_flight = max_in_flight
        # The agent holds the control plane to the same budgets the control plane holds it to.
        self._budgets = budgets or Budgets()
        self._meter = PeerMeter(self._budgets, "the control plane")
        self._broken: BudgetExceeded | None = None
        self._broken_event = asyncio.Event()
        self._writer: FrameWriter[AgentFrame] = FrameWriter(
            call.write, combine=AgentConnection.batch if conn.batching else None,
            max_queued_frames=self._budgets.max_queued_frames, on_overflow=self._over_budget)
        self._credit = CreditWaiters()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._bodies: dict[int, _Body] = {}
        self._cancelled: set[int] = set()
        self._nonces = itertools.count(1)
        loop = asyncio.get_running_loop()
        self._clock = loop.time
        self._last_heard = self._clock()
        self.draining = False
        #: Why the session ends once the control plane closes it, after a drain.
        self._leaving: SessionLost | DrainedToExit | None = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def run(self) -> None:
        """Serve requests until the stream ends; raises SessionLost then."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self._writer.run(), name="tunnel-writer")
                group.create_task(self._heartbeat(), name="tunnel-heartbeat")
                group.create_task(self._read_loop(), name="tunnel-reader")
                group.create_task(self._watch_budget(), name="tunnel-budget")
        except* grpc.aio.AioRpcError as eg:
            error = eg.exceptions[0]
            assert isinstance(error, grpc.aio.AioRpcError)
            raise SessionLost(f"the stream failed: {error.code().name}: {error.details()}") from None
        except* DrainedToExit as eg:
            raise eg.exceptions[0] from None
        except* BudgetExceeded as eg:
            exceeded = eg.exceptions[0]
            assert isinstance(exceeded, BudgetExceeded)
            log.warning("the control plane exceeded its budget of %s; closing the stream: %s",
                        exceeded.budget, exceeded)
            raise SessionLost(f"the control plane exceeded its budget of {exceeded.budget}: {exceeded}") from None
        except* (StreamClosed, SessionLost, RemoteProtocolError) as eg:
            raise SessionLost(str(eg.exceptions[0])) from None
        finally:
            self._writer.close(SessionLost("session closed"))
            for task in self._tasks.values():
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def drain(self, grace: float) -> None:
        """Take no new work, tell the control plane, and wait up to `grace` s for in-flight requests."""
        self.draining = True
        self._writer.send_nowait(self._conn.status(draining=True, in_flight=self.in_flight))
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=grace)

    def send_status(
        self,
        *,
        profiles: list[profiles_pb2.Profile] | None = None,
        health: list[profiles_pb2.ProfileHealth] | None = None,
    ) -> None:
        """Tell the control plane about new profiles (after a reload) or their latest health."""
        status = tunnel_pb2.AgentStatus(draining=self.draining, in_flight=self.in_flight)
        if profiles is not None:
            status.profiles_changed = True
            status.profiles.extend(profiles)
        if health:
            status.profile_health.extend(health)
        with contextlib.suppress(StreamClosed):
            self._writer.send_nowait(AgentFrame(status=status))

    async def close_gracefully(self) -> None:
        """Send what is queued, then half-close: the control plane ends the stream once it has read it all."""
        await self._writer.flush()
        await self._call.done_writing()

    async def _drain_then_leave(self, drain: tunnel_pb2.Drain) -> None:
        grace = drain.grace_period.ToTimedelta().total_seconds() if drain.HasField("grace_period") else 30.0
        await self.drain(grace)
        self._leaving = (DrainedToExit if drain.exit_after else SessionLost)(
            f"drained at the control plane's request ({drain.reason})")
        try:
            async with asyncio.timeout(5):
                await self.close_gracefully()
            # The control plane ends the stream once it has read our last frames.
            await asyncio.sleep(5)
        except (TimeoutError, grpc.aio.AioRpcError, StreamClosed):
            pass
        raise self._leaving

    def _over_budget(self, error: BudgetExceeded) -> None:
        # Called where a frame was queued (any task): the session's own tasks end it.
        self._broken = self._broken or error
        self._broken_event.set()

    async def _watch_budget(self) -> None:
        await self._broken_event.wait()
        assert self._broken is not None
        raise self._broken

    async def _read_loop(self) -> None:
        meter = self._meter
        while True:
            frame = await self._call.read()
            if frame is EOF:
                raise self._leaving or SessionLost("the control plane closed the stream")
            assert isinstance(frame, ControlFrame)
            now = self._last_heard = self._clock()
            meter.message(len(frame.batch.frames) if frame.HasField("batch") else 1)
            for event in self._conn.receive(frame):
                if isinstance(event, PingReceived | PongReceived | DrainReceived):
                    meter.control(_CONTROL_KIND[type(event)], now)
                self._on_event(event)

    def _on_event(self, event: Event) -> None:
        match event:
            case RequestStarted(rid, start):
                self._start(rid, start)
            case DataReceived(rid, data, end):
                body = self._bodies.get(rid)
                if body is not None:
                    body.feed(data, end)
            case CancelReceived(rid, reason):
                task = self._tasks.get(rid)
                if task is not None:
                    log.info("request %d cancelled by the control plane: %s", rid, reason)
                    self._cancelled.add(rid)
                    task.cancel()
            case CreditGranted(rid, _):
                self._credit.wake(rid)
            case PingReceived(nonce):
                self._writer.send_nowait(self._conn.pong(nonce))
            case PongReceived():
                pass
            case DrainReceived(drain):
                if not self.draining:
                    log.info("the control plane asked this agent to drain: %s", drain.reason)
                    self._group.create_task(self._drain_then_leave(drain), name="tunnel-drain")
            case FrameIgnored(rid, why):
                log.debug("ignored a frame for request %d: %s", rid, why)
            case _:
                log.warning("unexpected event %r", event)

    def _start(self, rid: int, start: tunnel_pb2.RequestStart) -> None:
        if self.draining:
            self._writer.send_nowait(self._conn.end(rid, Code.UNAVAILABLE, "the agent is draining", "AGENT_DRAINING"))
            return
        if len(self._tasks) >= self._max_in_flight:
            self._writer.send_nowait(
                self._conn.end(
                    rid, Code.RESOURCE_EXHAUSTED,
                    f"the agent runs at most {self._max_in_flight} requests at once", "AGENT_BUSY",
                )
            )
            return
        body: _Body | None = None
        if start.has_body:
            body = _Body(lambda size: self._data_consumed(rid, size))
            self._bodies[rid] = body
        task = asyncio.get_running_loop().create_task(self._run_request(rid, start, body), name=f"request-{rid}")
        self._tasks[rid] = task
        task.add_done_callback(lambda _t: self._forget(rid))

    def _forget(self, rid: int) -> None:
        self._tasks.pop(rid, None)
        self._bodies.pop(rid, None)
        self._cancelled.discard(rid)
        self._credit.forget(rid)

    def _data_consumed(self, rid: int, size: int) -> None:
        frame = self._conn.data_consumed(rid, size)
        if frame is not None:
            self._writer.send_nowait(frame)

    async def _run_request(self, rid: int, start: tunnel_pb2.RequestStart, body: _Body | None) -> None:
        kind = start.WhichOneof("payload") or "?"
        began = self._clock()
        metrics.IN_FLIGHT.inc()
        try:
            code = await self._run_request_inner(rid, start, body, kind)
        finally:
            metrics.IN_FLIGHT.dec()
        metrics.LATENCY.labels(kind).observe(self._clock() - began)
        metrics.REQUESTS.labels(kind, code.name).inc()

    async def _run_request_inner(self, rid: int, start: tunnel_pb2.RequestStart, body: _Body | None,
                                 kind: str) -> Code:
        code, message, reason, field = Code.OK, "", "", ""
        timeout = start.timeout.ToTimedelta().total_seconds() if start.HasField("timeout") else None
        context = RequestContext(
            request_id=rid,
            body=body.__aiter__() if body is not None else None,
            max_chunk_bytes=self._conn.max_chunk_bytes,
        )
        sent_bytes = metrics.RESPONSE_BYTES.labels(kind)
        try:
            async with asyncio.timeout(timeout) as deadline:
                async for chunk in self._dispatcher.handle(start, context):
                    size = chunk.ByteSize()
                    await self._credit.wait_for(rid, size, self._conn.chunk_credit)
                    await self._writer.send(self._conn.send_chunk(rid, chunk, size), size)
                    sent_bytes.inc(size)
        except RequestError as exc:
            code, message, reason = exc.code, exc.message, exc.reason
            field = getattr(exc, "field", None) or ""
        except TimeoutError:
            if not deadline.expired():
                raise
            code, message, reason = Code.DEADLINE_EXCEEDED, "the request's deadline passed on the agent", "DEADLINE"
        except asyncio.CancelledError:
            if rid in self._cancelled:
                # The control plane asked for this: it waits for one `end`.
                self._send_end(rid, Code.CANCELLED, "cancelled by the caller", "CANCELLED")
                metrics.REQUESTS.labels(kind, Code.CANCELLED.name).inc()
            raise
        except StreamClosed:
            return Code.UNAVAILABLE
        except Exception:
            log.exception("request %d failed inside the agent", rid)
            code = Code.INTERNAL
            message = f"the agent failed to run request {rid}; its log has the details"
            reason = "AGENT_INTERNAL"
        self._send_end(rid, code, message, reason, field)
        return code

    def _send_end(self, rid: int, code: Code, message: str, reason: str, field: str = "") -> None:
        with contextlib.suppress(StreamClosed):
            self._writer.send_nowait(self._conn.end(rid, code, message, reason, field))

    async def _heartbeat(self) -> None:
        assert self._conn.welcome is not None
        interval = self._conn.welcome.heartbeat_interval.ToTimedelta().total_seconds()
        stall = self._budgets.write_stall_intervals * interval
        while True:
            await asyncio.sleep(interval / 2)
            now = self._clock()
            if now - self._last_heard > 3 * interval:
                raise SessionLost(f"heard nothing from the control plane for {now - self._last_heard:.0f} s")
            since = self._writer.writing_since
            if since is not None and now - since > stall:
                raise BudgetExceeded("write stall", f"the control plane has not read the stream for "
                                                    f"{now - since:.0f} s (the limit is {stall:.0f} s)")
            if now - self._writer.last_write >= interval / 2:
                self._writer.send_nowait(self._conn.ping(next(self._nonces)))
