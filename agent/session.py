"""The agent's session with the control plane over one stream: requests run, drains honoured.

`tunnel.shell.Shell` reads, writes, heartbeats and keeps the control plane
to its budgets; this module is what the agent does with the events: each
request runs in its own task, which waits for its own credit before sending
each chunk, so a slow consumer at the far end stalls only its own request.

The agent may hold one stream per control-plane replica (`agent.replicas`):
`AgentLoad` is the one count of requests over all of them, held to the one
`max_in_flight`, and each stream that agreed on replicas reports that count
(`AgentStatus.agent_in_flight`) when it changes, paced by `StatusPacer` so
that the control plane's budget of status frames is never reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import grpc

from onprem.agent import metrics
from onprem.agent.dispatcher import Dispatcher
from onprem.agent.handlers.base import RequestContext
from onprem.tunnel import tracing
from onprem.tunnel.budget import Budgets
from onprem.tunnel.errors import (
    Code,
    DrainedToExit,
    PeerClosedStream,
    RequestError,
    StreamClosed,
    StreamEnded,
)
from onprem.tunnel.events import (
    CancelReceived,
    DataReceived,
    DrainReceived,
    Event,
    ReplicasChanged,
    RequestStarted,
)
from onprem.tunnel.idempotency import is_keyed
from onprem.tunnel.protocol import AgentConnection, AgentFrame
from onprem.tunnel.shell import Shell
from onprem.v1 import profiles_pb2, tunnel_pb2

__all__ = ["AgentLoad", "ControlPlaneSession", "DrainedToExit", "StatusPacer", "TunnelCall"]

log = logging.getLogger("onprem.agent.session")

#: The least time between two reports of the agent's load on one stream, in seconds.
LOAD_STATUS_INTERVAL = 0.5
#: Status frames of the control plane's budget that load reports leave for drains, reloads and health.
LOAD_STATUS_RESERVE = 10


class AgentLoad:
    """The requests the agent runs over all its streams, held to its one `max_in_flight`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._watchers: list[Callable[[], None]] = []

    @property
    def full(self) -> bool:
        return self.total >= self.limit

    def add(self) -> None:
        self.total += 1
        self._changed()

    def remove(self) -> None:
        self.total -= 1
        self._changed()

    def watch(self, watcher: Callable[[], None]) -> Callable[[], None]:
        """Call `watcher` whenever the total changes; returns what stops that."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher) if watcher in self._watchers else None

    def _changed(self) -> None:
        for watcher in list(self._watchers):
            watcher()


class StatusPacer:
    """When one stream may report the agent's load, free of I/O (the clock is passed in).

    At most one report every `interval` s, and never into the last `reserve` frames of the status
    budget the control plane holds the stream to (`Budgets.status_frames_per_second` and
    `status_frame_burst`, mirrored here): those stay for drains, reloads and health reports, which
    go at once. Every status the stream sends counts (`sent`).
    """

    def __init__(self, rate: float, burst: int, *, interval: float = LOAD_STATUS_INTERVAL,
                 reserve: int = LOAD_STATUS_RESERVE) -> None:
        self.rate, self.burst, self.interval = rate, burst, interval
        self.reserve = min(reserve, burst // 2)
        self._tokens = float(burst)
        self._at: float | None = None
        self._last = -math.inf

    def _refill(self, now: float) -> None:
        if self._at is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now

    def wait(self, now: float) -> float:
        """Seconds until a load report may go (0: now)."""
        self._refill(now)
        short = self.reserve + 1 - self._tokens
        return max(0.0, self._last + self.interval - now, short / self.rate if short > 0 else 0.0)

    def sent(self, now: float) -> None:
        """A status frame went out at `now` (of any kind)."""
        self._refill(now)
        self._tokens -= 1.0
        self._last = now


class TunnelCall(Protocol):
    async def read(self) -> object: ...
    async def write(self, request: AgentFrame) -> None: ...
    async def done_writing(self) -> None: ...


class _Body:
    """A request's body as its handler reads it: credit flows back as it is consumed.

    The queue needs no bound of its own: the control plane may send no more than the request's
    credit window without breaking the protocol.
    """

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


class ControlPlaneSession:
    """The agent's end of one stream to the control plane."""

    def __init__(
        self,
        call: TunnelCall,
        conn: AgentConnection,
        dispatcher: Dispatcher,
        *,
        max_in_flight: int,
        budgets: Budgets | None = None,
        load: AgentLoad | None = None,
        on_replicas: Callable[[Sequence[tunnel_pb2.Replica]], None] | None = None,
        on_drain: Callable[[tunnel_pb2.Drain], None] | None = None,
    ) -> None:
        """`load` is shared by the agent's streams (default: this stream's own, of `max_in_flight`);
        `on_replicas` hears each `replicas` frame, `on_drain` each drain, before this stream honours it."""
        assert conn.welcome is not None
        self._call = call
        self._conn = conn
        self._dispatcher = dispatcher
        self._load = load if load is not None else AgentLoad(max_in_flight)
        self._on_replicas = on_replicas
        self._on_drain = on_drain
        # The agent holds the control plane to the same budgets the control plane holds it to.
        self._shell: Shell[AgentFrame] = Shell(
            conn, read=call.read, write=call.write, on_event=self._on_event, budgets=budgets,
            heartbeat_interval=conn.welcome.heartbeat_interval.ToTimedelta().total_seconds(),
        )
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._bodies: dict[int, _Body] = {}
        self._cancelled: set[int] = set()
        self._clock = asyncio.get_running_loop().time
        self.draining = False
        budgets = self._shell.budgets
        self._pacer = StatusPacer(budgets.status_frames_per_second, budgets.status_frame_burst)
        self._load_timer: asyncio.TimerHandle | None = None
        #: (in_flight, agent_in_flight) as last reported to the control plane.
        self._reported = (0, 0)
        self._closed_writing = False

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def welcome(self) -> tunnel_pb2.Welcome:
        assert self._conn.welcome is not None
        return self._conn.welcome

    async def run(self) -> None:
        """Serve requests until the stream ends; raises why (a `StreamEnded`, or the protocol error of the
        control plane). Requests still running are cancelled then."""
        unwatch = self._load.watch(self._load_changed)
        try:
            await self._shell.run()
        finally:
            unwatch()
            if self._load_timer is not None:
                self._load_timer.cancel()
                self._load_timer = None
            for task in self._tasks.values():
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def drain(self, grace: float) -> None:
        """Take no new work, tell the control plane, and wait up to `grace` s for in-flight requests."""
        self.draining = True
        self._send_status(tunnel_pb2.AgentStatus(draining=True, in_flight=self.in_flight))
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
        self._send_status(status)

    def _send_status(self, status: tunnel_pb2.AgentStatus) -> None:
        """Send a status (with the agent's load, on a stream that agreed on replicas); every status counts
        against the pace of load reports."""
        if self._conn.replicas:
            status.agent_in_flight = self._load.total
        self._reported = (status.in_flight, status.agent_in_flight)
        self._pacer.sent(self._clock())
        with contextlib.suppress(StreamClosed):
            self._shell.send_nowait(AgentFrame(status=status))

    def _load_changed(self) -> None:
        # Only a stream that agreed on replicas reports the agent's load; others report as before.
        if not self._conn.replicas or self._load_timer is not None or self._shell.writer.closed:
            return
        # Even with no wait, later: the changes of one frame batch (ten starts) make one report.
        self._load_timer = asyncio.get_running_loop().call_later(
            self._pacer.wait(self._clock()), self._report_load)

    def _report_load(self) -> None:
        self._load_timer = None
        if self._shell.writer.closed:
            return
        wait = self._pacer.wait(self._clock())
        if wait > 0:
            self._load_timer = asyncio.get_running_loop().call_later(wait, self._report_load)
            return
        if (self.in_flight, self._load.total) != self._reported:
            self._send_status(tunnel_pb2.AgentStatus(draining=self.draining, in_flight=self.in_flight))

    async def close_gracefully(self) -> None:
        """Send what is queued, then half-close: the control plane ends the stream once it has read it all."""
        if self._closed_writing:
            return
        self._closed_writing = True
        await self._shell.close_writing(self._call.done_writing)

    async def _drain_then_leave(self, drain: tunnel_pb2.Drain) -> None:
        grace = drain.grace_period.ToTimedelta().total_seconds() if drain.HasField("grace_period") else 30.0
        await self.drain(grace)
        why = f"drained at the control plane's request ({drain.reason})"
        leaving = DrainedToExit(why) if drain.exit_after else PeerClosedStream(why)
        self._shell.leaving = leaving
        try:
            async with asyncio.timeout(5):
                await self.close_gracefully()
            # The control plane ends the stream once it has read our last frames.
            await asyncio.sleep(5)
        except (TimeoutError, grpc.aio.AioRpcError, StreamEnded):
            pass
        raise leaving

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
            case DrainReceived(drain):
                if self._on_drain is not None:
                    self._on_drain(drain)
                if not self.draining:
                    log.info("the control plane asked this agent to drain: %s", drain.reason)
                    # At once, not in the task: a start right behind the drain must be refused.
                    self.draining = True
                    self._shell.spawn(self._drain_then_leave(drain), name="tunnel-drain")
            case ReplicasChanged(replicas):
                if self._on_replicas is not None:
                    self._on_replicas(replicas)
            case _:
                log.warning("unexpected event %r", event)

    def _start(self, rid: int, start: tunnel_pb2.RequestStart) -> None:
        if self.draining:
            self._shell.send_nowait(self._conn.end(rid, Code.UNAVAILABLE, "the agent is draining", "AGENT_DRAINING"))
            return
        if self._load.full:
            # The limit is the agent's, over all its streams (one per control-plane replica).
            self._shell.send_nowait(
                self._conn.end(
                    rid, Code.RESOURCE_EXHAUSTED,
                    f"the agent runs at most {self._load.limit} requests at once", "AGENT_BUSY",
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
        self._load.add()

    def _forget(self, rid: int) -> None:
        if self._tasks.pop(rid, None) is not None:
            self._load.remove()
        self._bodies.pop(rid, None)
        self._cancelled.discard(rid)
        self._shell.credit.forget(rid)

    def _data_consumed(self, rid: int, size: int) -> None:
        frame = self._conn.consumed(rid, size)
        if frame is not None:
            with contextlib.suppress(StreamClosed):
                self._shell.send_nowait(frame)

    async def _run_request(self, rid: int, start: tunnel_pb2.RequestStart, body: _Body | None) -> None:
        kind = start.WhichOneof("payload") or "?"
        began = self._clock()
        metrics.IN_FLIGHT.inc()
        # The request's task runs in its trace: under the control plane's relay span when it sent one
        # (checked like any peer's input), else a new one; its log lines carry the trace id.
        parent = tracing.from_proto(start.trace_context) if start.HasField("trace_context") else None
        try:
            with tracing.enter(f"agent {kind}", parent, attributes={
                    "onprem.request_id": rid, "onprem.kind": kind, "onprem.attempt": start.attempt}):
                code = await self._run_request_inner(rid, start, body, kind)
                log.debug("request %d (%s, attempt %d) ended %s", rid, kind, start.attempt, code.name)
        finally:
            metrics.IN_FLIGHT.dec()
        metrics.child(metrics.LATENCY, kind).observe(self._clock() - began)
        metrics.child(metrics.REQUESTS, kind, code.name).inc()

    async def _run_request_inner(self, rid: int, start: tunnel_pb2.RequestStart, body: _Body | None,
                                 kind: str) -> Code:
        code, message, reason, field = Code.OK, "", "", ""
        # Not Duration.ToTimedelta: protobuf's well-known-type helpers are pure Python, and slow.
        timeout = start.timeout.seconds + start.timeout.nanos / 1e9 if start.HasField("timeout") else None
        context = RequestContext(
            request_id=rid,
            body=body.__aiter__() if body is not None else None,
            max_chunk_bytes=self._conn.max_chunk_bytes,
            idempotency=start.idempotency if is_keyed(start) else None,
        )
        sent_bytes = metrics.child(metrics.RESPONSE_BYTES, kind)
        shell = self._shell
        try:
            async with asyncio.timeout(timeout) as deadline:
                async for chunk in self._dispatcher.handle(start, context):
                    size = chunk.ByteSize()
                    await shell.credit.wait_for(rid, size, self._conn.credit)
                    await shell.send(self._conn.send_chunk(rid, chunk, size), size)
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
                metrics.child(metrics.REQUESTS, kind, Code.CANCELLED.name).inc()
            raise
        except StreamEnded:
            return Code.UNAVAILABLE
        except Exception:
            log.exception("request %d failed inside the agent", rid)
            code = Code.INTERNAL
            message = f"the agent failed to run request {rid}; its log has the details"
            reason = "AGENT_INTERNAL"
        if code != Code.OK:
            tracing.failed(tracing.current_span(), code.name, reason)
        self._send_end(rid, code, message, reason, field)
        return code

    def _send_end(self, rid: int, code: Code, message: str, reason: str, field: str = "") -> None:
        with contextlib.suppress(StreamClosed):
            self._shell.send_nowait(self._conn.end(rid, code, message, reason, field))
