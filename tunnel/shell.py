"""The asyncio shell of one tunnel stream, for either end (as grpclib's `protocol.py` serves client and server).

`Shell` owns what both ends do alike around a `tunnel.protocol.Connection`:
one reader loop that feeds frames to the connection, one writer task (grpc.aio
allows one outstanding write per call), one heartbeat task that pings a quiet
stream and notices a silent peer or one that stopped reading, the budgets a
peer must keep (`tunnel.budget`), pongs and credit wake-ups. The end's own
session (`agent.session`, `control_plane.sessions`) plugs in `on_event` for the
events that are its business: requests starting, data, cancels and drains at
the agent; chunks, ends and statuses at the control plane.

`run` returns nothing: the stream always ends by an exception, which says
who ended it (`tunnel.errors.StreamEnded` and its kinds), or which rule or
budget the peer broke (`RemoteProtocolError`, `BudgetExceeded`). Anything
else is a bug and propagates as it is.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic

import grpc

from onprem.tunnel.aio import EOF, CreditWaiters, FrameWriter
from onprem.tunnel.budget import BudgetExceeded, Budgets, PeerMeter
from onprem.tunnel.errors import PeerClosedStream, PeerSilent, ProtocolError, StreamClosed, StreamEnded
from onprem.tunnel.events import (
    CreditGranted,
    DrainReceived,
    Event,
    FrameIgnored,
    PingReceived,
    PongReceived,
    ReplicasChanged,
    StatusReceived,
)
from onprem.tunnel.protocol import Connection, OutFrame

__all__ = ["Shell"]

log = logging.getLogger("onprem.tunnel.shell")

#: The events that are stream-level frames, by the name their budget counts them under.
_CONTROL: dict[type[Event], str] = {
    PingReceived: "ping", PongReceived: "pong", StatusReceived: "status", DrainReceived: "drain",
    ReplicasChanged: "replicas",
}


class Shell(Generic[OutFrame]):
    """One stream: its reader, writer, heartbeat and budgets; the end's session handles the rest."""

    def __init__(
        self,
        conn: Connection[OutFrame],
        *,
        read: Callable[[], Awaitable[object]],
        write: Callable[[OutFrame], Awaitable[object]],
        on_event: Callable[[Event], None],
        heartbeat_interval: float,
        budgets: Budgets | None = None,
        peer_name: str | None = None,
    ) -> None:
        self.conn: Connection[OutFrame] = conn
        self.budgets = budgets or Budgets()
        #: The peer as logs and budget messages name it, e.g. "agent erp-1 (agent-3f…)".
        self.peer_name = peer_name or conn.peer
        self.heartbeat_interval = heartbeat_interval
        self._read = read
        self._on_event = on_event
        self.writer: FrameWriter[OutFrame] = FrameWriter(
            write, combine=conn.batch if conn.batching else None,
            max_queued_frames=self.budgets.max_queued_frames, on_overflow=self._over_budget)
        self.credit = CreditWaiters()
        self._meter = PeerMeter(self.budgets, self.peer_name)
        self._nonces = itertools.count(1)
        self._clock = asyncio.get_running_loop().time
        #: Loop time of the last frame from the peer.
        self.last_heard = self._clock()
        #: Why the stream ends when the peer closes it next (a drain we agreed to), instead of "closed".
        self.leaving: StreamEnded | None = None
        self._broken: BudgetExceeded | None = None
        self._broken_event = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None

    # -- the stream's life --
    async def run(self) -> None:
        """Serve the stream until it ends; raises why (see the module's docstring)."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self.writer.run(), name="tunnel-writer")
                group.create_task(self._heartbeat(), name="tunnel-heartbeat")
                group.create_task(self._read_loop(), name="tunnel-reader")
                group.create_task(self._watch_budget(), name="tunnel-budget")
        except BaseExceptionGroup as group:
            raise _why(group) from None
        finally:
            self._group = None
            self.writer.close(StreamClosed("the stream ended"))
            self.credit.wake_all()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run `coro` as part of the stream: it ends with the stream, and its error ends the stream."""
        if self._group is None:
            coro.close()
            raise StreamClosed("the stream is not running")
        self._group.create_task(coro, name=name)

    def send_nowait(self, frame: OutFrame) -> None:
        """Queue a frame that must not wait (credit, cancel, end, pong); raises StreamClosed once closed."""
        self.writer.send_nowait(frame)

    async def send(self, frame: OutFrame, size: int) -> None:
        """Queue a payload frame of `size` bytes, waiting while the stream's queue is full."""
        await self.writer.send(frame, size)

    async def close_writing(self, done_writing: Callable[[], Awaitable[object]]) -> None:
        """Send what is queued, accept nothing more, then half-close with `done_writing`.

        Frames queued afterwards (an end, a pong) raise StreamClosed where they are sent: a write
        after the half-close would fail inside grpc instead.
        """
        await self.writer.flush()
        self.writer.close(StreamClosed("this end has finished writing"))
        await done_writing()

    # -- internals --
    def _over_budget(self, error: BudgetExceeded) -> None:
        # Called where a frame was queued, in any task: the stream's own tasks end it.
        self._broken = self._broken or error
        self._broken_event.set()

    async def _watch_budget(self) -> None:
        await self._broken_event.wait()
        assert self._broken is not None
        raise self._broken

    async def _read_loop(self) -> None:
        meter, conn = self._meter, self.conn
        while True:
            frame = await self._read()
            if frame is EOF:
                raise self.leaving or PeerClosedStream(f"{conn.peer} closed the stream")
            now = self.last_heard = self._clock()
            # The count is known before any frame of a batch is looked at.
            meter.message(len(frame.batch.frames) if frame.HasField("batch") else 1)  # type: ignore[attr-defined]
            for event in conn.receive(frame):  # type: ignore[arg-type]
                kind = _CONTROL.get(type(event))
                if kind is not None:
                    meter.control(kind, now)
                match event:
                    case PingReceived(nonce):
                        if not self.writer.closed:  # after our half-close, nothing more is written
                            self.writer.send_nowait(conn.pong(nonce))
                    case PongReceived():
                        pass
                    case CreditGranted(rid, _):
                        self.credit.wake(rid)
                    case FrameIgnored(rid, why):
                        log.debug("%s: ignored a frame for request %d: %s", self.peer_name, rid, why)
                    case _:
                        self._on_event(event)

    async def _heartbeat(self) -> None:
        interval = self.heartbeat_interval
        stall = self.budgets.write_stall_intervals * interval
        while True:
            await asyncio.sleep(interval / 2)
            now = self._clock()
            silent = now - self.last_heard
            if silent > 3 * interval:
                raise PeerSilent(f"{self.conn.peer} was silent for {silent:.0f} s (heartbeats missed)")
            since = self.writer.writing_since
            if since is not None and now - since > stall:
                raise BudgetExceeded("write stall", f"{self.conn.peer} has not read its stream for "
                                                    f"{now - since:.0f} s (the limit is {stall:.0f} s)")
            if now - self.writer.last_write >= interval / 2 and not self.writer.closed:
                self.writer.send_nowait(self.conn.ping(next(self._nonces)))


def _why(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception that says why the stream ended, from what its tasks raised."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    for leaf in leaves:
        if not isinstance(leaf, StreamEnded | ProtocolError | grpc.aio.AioRpcError):
            return group  # a bug: let every part of it show
    # The peer's fault explains most; our own writer closing is only ever a consequence.
    first = min(leaves, key=lambda e: 0 if isinstance(e, ProtocolError) else 2 if isinstance(e, StreamClosed) else 1)
    if isinstance(first, grpc.aio.AioRpcError):
        return PeerClosedStream(f"the stream failed: {first.code().name}: {first.details()}")
    return first
