"""The control plane's end of each agent stream, and `Exchange`, one request's attempt on it.

`tunnel.shell.Shell` reads, writes, heartbeats and holds the agent to its
budgets; `AgentSession` is what the control plane does with the events. The
reader never blocks: chunks go to their request's queue, which the request's
credit window bounds, so a slow operator of one request holds at most one
window of data and stalls no other request on the stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from onprem.tunnel.budget import BudgetExceeded, Budgets
from onprem.tunnel.errors import (
    AgentLost,
    Code,
    RemoteProtocolError,
    RequestError,
    RequestGone,
    StreamClosed,
    StreamEnded,
    Unavailable,
)
from onprem.tunnel.events import ChunkReceived, Event, RequestEnded, StatusReceived
from onprem.tunnel.protocol import IDEMPOTENCY, ControlFrame, ControlPlaneConnection
from onprem.tunnel.shell import Shell
from onprem.v1 import profiles_pb2, tunnel_pb2

log = logging.getLogger("onprem.control_plane.sessions")


@dataclass(frozen=True)
class _End:
    error: RequestError | None

class Exchange:
    """One request on an agent's stream, as the operator API sees it.

    Iterate it for result chunks; it raises the request's error at the end,
    if any. Close it (`async with`) to cancel the request on the agent when
    the operator goes away early.
    """

    def __init__(self, session: AgentSession, rid: int) -> None:
        self.session = session
        self.request_id = rid
        # A deque and an event rather than an asyncio.Queue: `take_ready` looks at the next item
        # without taking it. The request's credit window bounds it.
        self._items: collections.deque[ChunkReceived | _End] = collections.deque()
        self._arrived = asyncio.Event()
        self._unacked = 0
        self.ended = False
        #: Whether any chunk reached the operator (a retry is unsafe then).
        self.delivered = False
        self.bytes_out = 0

    # -- fed by the session's reader --
    def _deliver(self, item: ChunkReceived | _End) -> None:
        self._items.append(item)
        self._arrived.set()

    # -- used by the operator API --
    def __aiter__(self) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        return self

    async def __anext__(self) -> tunnel_pb2.ResponseChunk:
        # The previous chunk is consumed once the operator asks for the next:
        # only now does its credit go back to the agent.
        if self._unacked:
            self.session._consumed(self.request_id, self._unacked)
            self._unacked = 0
        if self.ended:
            raise StopAsyncIteration
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        item = self._items.popleft()
        if isinstance(item, _End):
            self.ended = True
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        self._unacked = item.size
        self.delivered = True
        self.bytes_out += item.size
        return item.chunk

    def take_ready(self, fits: Callable[[tunnel_pb2.ResponseChunk], bool]) -> tunnel_pb2.ResponseChunk | None:
        """The next result chunk if it has already arrived and `fits`; None (and nothing taken) otherwise.

        Its credit goes back with the chunk before it, when the operator asks for the next.
        """
        if self.ended or not self._items:
            return None
        item = self._items[0]
        if isinstance(item, _End) or not fits(item.chunk):
            return None
        self._items.popleft()
        self._unacked += item.size
        self.bytes_out += item.size
        return item.chunk

    async def send_body(self, data: bytes, *, end_of_data: bool = False) -> None:
        """Send request data, split to the chunk limit, waiting for credit."""
        limit = self.session.conn.limits.max_chunk_bytes
        pieces = [data[i:i + limit] for i in range(0, len(data), limit)] or [b""]
        for i, piece in enumerate(pieces):
            last = end_of_data and i == len(pieces) - 1
            try:
                await self.session.shell.credit.wait_for(self.request_id, len(piece), self.session.conn.credit)
            except RequestGone:
                return  # the agent ended the request, or it was cancelled: its status tells why
            frame = self.session.conn.send_data(self.request_id, piece, end_of_data=last)
            await self.session.shell.send(frame, len(piece))

    def fail(self, error: RequestError) -> None:
        """End the request with `error` for its reader, and cancel it on the agent."""
        self._deliver(_End(error))
        self.session._cancel(self.request_id, error.message)

    async def aclose(self, reason: str = "the caller went away") -> None:
        if not self.ended:
            self.session._cancel(self.request_id, reason)

    async def __aenter__(self) -> Exchange:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AgentSession:
    """One live agent stream on the control plane."""

    def __init__(
        self,
        conn: ControlPlaneConnection,
        write: Callable[[ControlFrame], Awaitable[object]],
        read: Callable[[], Awaitable[object]],
        *,
        agent_id: str,
        name: str,
        group: str,
        cert_expires_at: dt.datetime | None,
        budgets: Budgets | None = None,
    ) -> None:
        assert conn.hello is not None
        self.conn = conn
        self.hello: tunnel_pb2.Hello = conn.hello
        self.agent_id = agent_id
        self.name = name
        self.group = group
        self.cert_expires_at = cert_expires_at
        self.session_id = uuid.uuid4().hex[:12]
        self.connected_at = dt.datetime.now(dt.UTC)
        self.draining = False
        self.max_in_flight = max(1, conn.hello.max_in_flight or 1)
        self.profiles = {(p.kind, p.name) for p in conn.hello.profiles}
        #: The latest health check of each profile, by (kind, name).
        self.profile_health: dict[tuple[int, str], profiles_pb2.ProfileHealth] = {}
        #: The latest profile list advertised after a reload, for the store to remember; only the
        #: latest counts, so however often an agent re-advertises, the store is written at its own pace.
        self.profile_update: list[profiles_pb2.Profile] | None = None
        self.profiles_updated = asyncio.Event()
        self.shell: Shell[ControlFrame] = Shell(
            conn, read=read, write=write, on_event=self._on_event, budgets=budgets,
            heartbeat_interval=conn.limits.heartbeat_interval.total_seconds(), peer_name=f"agent {name} ({agent_id})",
        )
        self._exchanges: dict[int, Exchange] = {}
        self._closed: str | None = None
        #: Set when the agent broke the protocol; the stream ends with an error status.
        self.protocol_error: str | None = None
        #: Set when the agent went past a budget; the stream ends with RESOURCE_EXHAUSTED.
        self.budget_error: BudgetExceeded | None = None
        self._task: asyncio.Task[None] | None = None
        #: The requests the agent runs over all its streams (one per replica), as it last reported.
        self.agent_in_flight = 0
        #: Set when the session turns draining (the store remembers it for the other replicas).
        self.draining_changed = asyncio.Event()
        #: Set when the session ends, for whoever waits on capacity.
        self.on_change: Callable[[], None] = lambda: None

    @property
    def in_flight(self) -> int:
        return self.conn.in_flight

    @property
    def is_open(self) -> bool:
        return self._closed is None

    @property
    def last_seen_at(self) -> dt.datetime:
        """When the agent's last frame arrived."""
        ago = asyncio.get_running_loop().time() - self.shell.last_heard
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=max(ago, 0.0))

    def profile_is_read_only(self, profile: str) -> bool:
        return any(p.name == profile and p.kind == profiles_pb2.PROFILE_KIND_DATABASE and p.read_only
                   for p in self.hello.profiles)

    @property
    def honours_keys(self) -> bool:
        """Whether the agent offered the "idempotency" capability: it records keyed writes (an older one
        would ignore the key, so it gets no keyed writes)."""
        return IDEMPOTENCY in self.hello.capabilities

    def offers(self, kind: int, profile: str) -> bool:
        return (kind, profile) in self.profiles

    def has_capacity(self) -> bool:
        return self.conn.in_flight < self.max_in_flight

    @property
    def load(self) -> float:
        """How busy the agent is, 0 to 1: its requests over all replicas (as it reported them, or
        at least those on this stream) against its limit."""
        return max(self.conn.in_flight, self.agent_in_flight) / self.max_in_flight

    def welcome_frame(self, replica: tunnel_pb2.Replica | None = None,
                      replicas: list[tunnel_pb2.Replica] | None = None) -> ControlFrame:
        return self.conn.welcome_frame(agent_id=self.agent_id, group=self.group, session_id=self.session_id,
                                       replica=replica, replicas=replicas or [])

    def send_replicas(self, replicas: list[tunnel_pb2.Replica]) -> None:
        """Tell the agent the serving replicas now (if its stream agreed on replicas)."""
        frame = self.conn.replicas_frame(replicas)
        if frame is not None and self._closed is None:
            with contextlib.suppress(StreamClosed):
                self.shell.send_nowait(frame)

    async def serve(self) -> None:
        """Run the stream until it ends; fail whatever is in flight then."""
        self._task = asyncio.current_task()
        reason = "the agent closed its stream"
        try:
            await self.shell.run()
        except BudgetExceeded as exc:
            reason = f"the agent exceeded its budget of {exc.budget}: {exc}"
            log.warning("agent %s (%s) exceeded its budget of %s; closing its session: %s",
                        self.name, self.agent_id, exc.budget, exc)
            self.budget_error = exc
        except RemoteProtocolError as exc:
            reason = f"the agent broke the tunnel protocol: {exc}"
            log.warning("agent %s (%s): %s", self.name, self.agent_id, reason)
            self.protocol_error = str(exc)
        except StreamEnded as exc:
            reason = str(exc)
        finally:
            # A cancelled serve() (superseded, revoked, shutdown) set _closed.
            self._fail_all(self._closed or reason)

    def close(self, reason: str) -> None:
        """End the session (superseded, revoked, shutting down)."""
        if self._closed is None:
            self._closed = reason
        if self._task is not None:
            self._task.cancel()

    def drain(self, reason: str, grace: dt.timedelta, *, exit_after: bool = False) -> None:
        """Route nothing more here, and ask the agent to finish its requests (then reconnect, or exit)."""
        self.draining = True
        self.draining_changed.set()
        with contextlib.suppress(StreamClosed):
            self.shell.send_nowait(self.conn.drain(reason, grace, exit_after=exit_after))
        self.on_change()

    def start(self, start: tunnel_pb2.RequestStart) -> Exchange:
        """Send `start` on this stream; its result comes through the `Exchange` returned.

        Raises Unavailable if the session just ended (the router chose it a moment before).
        """
        if self._closed is not None:
            raise Unavailable(f"agent {self.name} ({self.agent_id}) just disconnected: {self._closed}")
        rid, frame = self.conn.start_request(start)
        exchange = Exchange(self, rid)
        self._exchanges[rid] = exchange
        self.shell.send_nowait(frame)
        return exchange

    # -- internals --
    def _consumed(self, rid: int, size: int) -> None:
        frame = self.conn.consumed(rid, size)
        if frame is not None and self._closed is None:
            with contextlib.suppress(StreamClosed):
                self.shell.send_nowait(frame)

    def _cancel(self, rid: int, reason: str) -> None:
        frame = self.conn.cancel(rid, reason)
        self.shell.credit.wake(rid)  # a sender of its body waiting for credit stops
        if frame is not None and self._closed is None:
            with contextlib.suppress(StreamClosed):
                self.shell.send_nowait(frame)

    def _on_event(self, event: Event) -> None:
        match event:
            case ChunkReceived(rid):
                exchange = self._exchanges.get(rid)
                if exchange is not None:
                    exchange._deliver(event)
            case RequestEnded(rid, code, message, reason, field, screened):
                if screened:
                    log.warning("agent %s (%s) ended request %d with %s; the operator gets INTERNAL (%s)",
                                self.name, self.agent_id, rid, screened, reason)
                exchange = self._exchanges.pop(rid, None)
                self.shell.credit.forget(rid)
                if exchange is not None:
                    error = None if code == Code.OK else RequestError.from_status(code, message, reason, field)
                    exchange._deliver(_End(error))
                self.on_change()
            case StatusReceived(status):
                if status.draining and not self.draining:
                    log.info("agent %s (%s) is draining", self.name, self.agent_id)
                    self.draining_changed.set()
                self.agent_in_flight = status.agent_in_flight
                # Once draining, a session stays so: the control plane may have asked for it.
                self.draining = self.draining or status.draining
                if status.profiles_changed:
                    del self.hello.profiles[:]
                    self.hello.profiles.extend(status.profiles)
                    self.profiles = {(p.kind, p.name) for p in status.profiles}
                    self.profile_update = list(status.profiles)
                    self.profiles_updated.set()
                    log.info("agent %s (%s) now offers %d profiles", self.name, self.agent_id, len(self.profiles))
                if status.profile_health:
                    self.profile_health = {(h.kind, h.profile): h for h in status.profile_health}
                self.on_change()
            case _:
                log.warning("agent %s: unexpected event %r", self.agent_id, event)

    def _fail_all(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
        self.shell.writer.close(StreamClosed(reason))
        self.shell.credit.wake_all()
        for rid, exchange in list(self._exchanges.items()):
            lost = AgentLost(
                f"agent {self.name} ({self.agent_id}) was lost while running the request "
                f"({reason}); the request may have run in part or in full",
            )
            lost.cause = reason
            exchange._deliver(_End(lost))
            self.shell.credit.forget(rid)
        self._exchanges.clear()
        self.on_change()
