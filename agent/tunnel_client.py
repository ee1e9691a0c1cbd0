"""Holds the agent's streams to the control plane, forever: one to each live replica, up to `max_streams`.

Each stream dials out with the agent's certificate, says Hello, serves
requests until it ends, then backs off (full jitter, capped) and dials again.
Which replicas get a stream is the business of `agent.replicas.StreamPlan`,
learned from the streams themselves (their welcomes and `replicas` frames);
this module runs the plan: one task per slot, each with its own backoff, all
on the agent's one identity and one count of requests (`AgentLoad`). A
control plane that names no replica gets one stream to
`control_plane.address`, as before replicas. Nothing here listens: the
private network opens no inbound port.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import random
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from onprem.agent import __version__, metrics
from onprem.agent.config import AgentConfig
from onprem.agent.dispatcher import Dispatcher
from onprem.agent.handlers.base import Handler
from onprem.agent.identity import Identity, make_key_and_csr, save_identity
from onprem.agent.replicas import Action, Close, Dial, Landing, Open, StreamPlan
from onprem.agent.session import AgentLoad, ControlPlaneSession, TunnelCall
from onprem.tunnel import kinds, systemd
from onprem.tunnel.aio import EOF
from onprem.tunnel.channel_options import CLIENT_OPTIONS
from onprem.tunnel.errors import DrainedToExit, PeerClosedStream, RemoteProtocolError, StreamEnded
from onprem.tunnel.protocol import AgentConnection, ControlFrame
from onprem.v1 import profiles_pb2, tunnel_pb2, tunnel_pb2_grpc

log = logging.getLogger("onprem.agent.tunnel")

#: The fraction of a certificate's lifetime after which the agent renews it.
RENEW_AT = 2 / 3
#: How long a stream that landed on a replica already held may take to end politely.
POLITE_CLOSE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Backoff:
    """Full-jitter exponential backoff: wait uniform(0, min(cap, base * 2**attempt))."""

    base: float = 0.5
    cap: float = 30.0
    #: A session that lasted this long resets the attempt count.
    stable_after: float = 60.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.base * 2 ** min(attempt, 16)))


def channel_credentials(config: AgentConfig, identity: Identity | None) -> grpc.ChannelCredentials:
    ca = config.control_plane.ca_file.read_bytes()
    if identity is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=identity.key_pem, certificate_chain=identity.cert_pem
    )


def channel_options(config: AgentConfig) -> list[tuple[str, int | str]]:
    options = list(CLIENT_OPTIONS)
    if config.control_plane.server_name:
        options.append(("grpc.ssl_target_name_override", config.control_plane.server_name))
    proxy = config.control_plane.proxy_url()
    # Set explicitly either way: the agent must not follow http_proxy variables it was not told about.
    options.append(("grpc.http_proxy", proxy or ""))
    options.append(("grpc.enable_http_proxy", 1 if proxy else 0))
    return options


class StreamCall(TunnelCall, Protocol):
    """One `AgentTunnel/Connect` call, as the agent uses it (grpc.aio's, or one in memory for tests)."""

    def cancel(self) -> bool: ...
    async def wait_for_connection(self) -> None: ...


if TYPE_CHECKING:  # the async stub is in the stubs only
    #: Opens a stream to an address with an identity: yields the call, and a stub for Renew (None in memory).
    Dialer = Callable[[str, Identity], contextlib.AbstractAsyncContextManager[
        tuple[StreamCall, tunnel_pb2_grpc.AgentTunnelAsyncStub | None]]]


def grpc_dialer(config: AgentConfig) -> Dialer:
    """Each stream on a channel of its own: behind a load balancer, each dial is a new connection that may
    land on another replica (a shared subchannel would land every stream where the first did)."""

    @contextlib.asynccontextmanager
    async def dial(address: str, identity: Identity) -> AsyncIterator[
            tuple[StreamCall, tunnel_pb2_grpc.AgentTunnelAsyncStub | None]]:
        options = [*channel_options(config), ("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.secure_channel(address, channel_credentials(config, identity), options=options) as channel:
            stub: tunnel_pb2_grpc.AgentTunnelAsyncStub = tunnel_pb2_grpc.AgentTunnelStub(channel)
            yield stub.Connect(), stub  # type: ignore[call-arg]  # stream opened without an iterator: we write()

    return dial


@dataclass
class Stream:
    """One stream the agent holds: to which replica, where, and its session."""

    slot: int
    #: The replica that welcomed it; None from a control plane that names none.
    replica_id: str | None
    address: str
    session: ControlPlaneSession
    stub: tunnel_pb2_grpc.AgentTunnelAsyncStub | None
    #: Set to close the stream gracefully: its replica left, or the agent stops.
    close: asyncio.Event = field(default_factory=asyncio.Event)
    grace: float = 30.0

    def describe(self) -> str:
        return f"replica {self.replica_id} at {self.address}" if self.replica_id else self.address


class TunnelClient:
    def __init__(
        self, config: AgentConfig, identity: Identity, dispatcher: Dispatcher, backoff: Backoff | None = None,
        *, dial: Dialer | None = None,
    ) -> None:
        self._config = config
        self._identity = identity
        self._dispatcher = dispatcher
        self._backoff = backoff or Backoff()
        self._dial = dial or grpc_dialer(config)
        self._started_at = dt.datetime.now(dt.UTC)
        self.sessions_opened = 0
        #: The agent's requests over all its streams, held to its one max_in_flight.
        self.load = AgentLoad(config.max_in_flight)
        self.plan = StreamPlan(config.control_plane.address, config.control_plane.max_streams,
                               stable_after=self._backoff.stable_after)
        #: The streams held now, by slot.
        self.streams: dict[int, Stream] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        #: Slots that held a stream once: their next one is a reconnect.
        self._ever_held: set[int] = set()
        self._stopping = False
        self._halt = asyncio.Event()
        self._exit_grace: float | None = None
        #: The latest health check of every profile.
        self.health: list[profiles_pb2.ProfileHealth] = []
        self._check_now = asyncio.Event()

    @property
    def sessions(self) -> list[ControlPlaneSession]:
        return [stream.session for _, stream in sorted(self.streams.items())]

    @property
    def session(self) -> ControlPlaneSession | None:
        """One session of the agent's (the oldest slot's), None while it holds no stream."""
        sessions = self.sessions
        return sessions[0] if sessions else None

    @property
    def slot_tasks(self) -> int:
        """The tasks of slots running now (seeking, holding or closing a stream).

        Not one cancelled while it sought a stream (the plan dropped its slot, see `_apply`): it dials
        nothing more, and only waits for the loop to deliver its cancellation. Counting it made a set
        that flaps every millisecond look like more slots than `max_streams` for that instant.
        """
        return sum(1 for task in self._tasks.values() if not task.cancelling())

    def describe_streams(self) -> str:
        """The streams held, for logs and `systemctl status`: "2 streams: replica r1 at h1:8444, ..."."""
        streams = [stream.describe() for _, stream in sorted(self.streams.items())]
        return f"{len(streams)} stream{'' if len(streams) == 1 else 's'}" + (f": {', '.join(streams)}" if streams else "")

    def status_line(self) -> str:
        """What `systemctl status` shows: "serving 3 profiles; 2 streams: replica r1 at ..., ..."."""
        return f"serving {len(self._dispatcher.profiles())} profiles; {self.describe_streams()}"

    def _hello(self) -> tunnel_pb2.Hello:
        hello = tunnel_pb2.Hello(
            agent_version=__version__,
            hostname=socket.gethostname(),
            profiles=self._dispatcher.profiles(),
            max_in_flight=self._config.max_in_flight,
        )
        hello.started_at.FromDatetime(self._started_at)
        # A dial that lands on one of these (behind a load balancer) is refused, not taken as a reconnect.
        hello.held_replica_ids.extend(sorted({s.replica_id for s in self.streams.values() if s.replica_id}))
        return hello

    def reload(self, config: AgentConfig, dispatcher_handlers: dict[str, Handler[Any]]) -> None:
        """Take a reloaded config's profiles into use without dropping the streams, and re-advertise them.

        The control plane's address, max_streams and max_in_flight take effect on the next start."""
        self._config = config
        self._dispatcher.replace(dispatcher_handlers)
        for session in self.sessions:
            session.send_status(profiles=self._dispatcher.profiles())
        self._check_now.set()
        log.info("reloaded: %d profiles offered", len(self._dispatcher.profiles()))

    async def _health_forever(self) -> None:
        """Check every profile now and then, and report the results to the control plane."""
        interval = self._config.health_check_interval_seconds
        while True:
            self._check_now.clear()
            self.health = await self._dispatcher.check_all()
            for health in self.health:
                metrics.PROFILE_UP.labels(kinds.name_of(health.kind), health.profile).set(1 if health.ok else 0)
            failing = [h.profile for h in self.health if not h.ok]
            if failing:
                log.warning("profile checks failing: %s", ", ".join(failing))
            for session in self.sessions:
                session.send_status(health=self.health)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._check_now.wait()

    async def run(self, stop: asyncio.Event) -> None:
        """Hold the streams until `stop` is set (or the control plane drains us to exit); then drain them all."""
        loop = asyncio.get_running_loop()
        renewer = loop.create_task(self._renew_forever(), name="certificate-renewal")
        checker = loop.create_task(self._health_forever(), name="profile-health")
        stop_task = loop.create_task(stop.wait())
        halt_task = loop.create_task(self._halt.wait())
        try:
            self._apply(self.plan.start(loop.time()))
            await asyncio.wait({stop_task, halt_task}, return_when=asyncio.FIRST_COMPLETED)
            log.debug("shutdown: draining %s", self.describe_streams())
            await self._stop_streams(self._exit_grace if self._exit_grace is not None
                                     else self._config.drain_grace_seconds)
        finally:
            stop_task.cancel()
            halt_task.cancel()
            self._stopping = True
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            log.debug("shutdown: streams closed; stopping background tasks")
            renewer.cancel()
            checker.cancel()
            await asyncio.gather(renewer, checker, return_exceptions=True)
            log.debug("shutdown: background tasks stopped")

    async def _stop_streams(self, grace: float) -> None:
        """Drain every stream held (finish its requests within `grace`, then close); cancel the dials."""
        self._stopping = True
        for slot, task in list(self._tasks.items()):
            stream = self.streams.get(slot)
            if stream is not None:
                stream.grace = grace
                stream.close.set()
            else:
                task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _renew_forever(self) -> None:
        """Renew the certificate once two thirds of its lifetime have passed, over the live connection."""
        while True:
            identity = self._identity
            now = dt.datetime.now(dt.UTC)
            if now >= identity.not_after:
                # Nothing can renew an expired certificate: the control plane refuses it.
                await asyncio.sleep(3600)
                continue
            due = identity.not_before + (identity.not_after - identity.not_before) * RENEW_AT
            wait = (due - now).total_seconds()
            if wait > 0:
                await asyncio.sleep(min(wait, 3600))
                continue
            try:
                await self._renew()
            except (grpc.aio.AioRpcError, OSError) as exc:
                details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.warning("certificate renewal failed (will retry): %s", details)
                await asyncio.sleep(min(30.0, max(1.0, (identity.not_after - now).total_seconds() / 20)))

    async def _renew(self) -> None:
        # Through any stream that is up: the replicas share one store and one CA.
        stub = next((stream.stub for _, stream in sorted(self.streams.items()) if stream.stub is not None), None)
        if stub is None:
            raise OSError("not connected")
        key_pem, csr_pem = make_key_and_csr(self._identity.agent_id)
        response = await stub.Renew(tunnel_pb2.RenewRequest(csr_pem=csr_pem.decode()), timeout=30)
        renewed = Identity(self._identity.agent_id, self._identity.group, key_pem, response.certificate_pem.encode())
        await asyncio.to_thread(save_identity, self._config.identity_dir, renewed)
        self._identity = renewed
        log.info("certificate renewed; valid until %s", renewed.not_after.isoformat())

    # -- the plan's actions --
    def _apply(self, actions: Sequence[Action]) -> None:
        loop = asyncio.get_running_loop()
        for action in actions:
            match action:
                case Open(slot, _, wait):
                    if self._stopping:
                        self.plan.forget(slot)
                        continue
                    task = loop.create_task(self._slot(slot, wait=wait), name=f"tunnel-stream-{slot}")
                    self._tasks[slot] = task
                    # A callback, not a `finally`: a task cancelled before it ran never enters its body.
                    task.add_done_callback(functools.partial(self._slot_done, slot))
                case Close(slot):
                    stream = self.streams.get(slot)
                    if stream is not None:
                        if not stream.close.is_set():
                            log.info("closing the stream to %s, which the control plane no longer names, once its "
                                     "%d requests finish", stream.describe(), stream.session.in_flight)
                            stream.grace = self._config.drain_grace_seconds
                            stream.close.set()
                    else:
                        seeking = self._tasks.get(slot)
                        if seeking is not None and seeking is not asyncio.current_task():
                            seeking.cancel()

    def _replicas_changed(self, replicas: Sequence[tunnel_pb2.Replica]) -> None:
        log.debug("the control plane names %d replicas: %s", len(replicas),
                  ", ".join(r.replica_id for r in replicas[:16]))
        if not self._stopping:
            self._apply(self.plan.replicas_changed(replicas, asyncio.get_running_loop().time()))

    def _drain_asked(self, stream: Stream, drain: tunnel_pb2.Drain) -> None:
        if drain.exit_after:
            # An operator's DrainAgent, through one replica: every stream drains, then the agent exits.
            grace = drain.grace_period.ToTimedelta().total_seconds() if drain.HasField("grace_period") else 30.0
            if self._exit_grace is None:
                log.info("%s asked the agent to drain and exit (%s): draining %s", stream.describe(), drain.reason,
                         self.describe_streams())
                self._exit_grace = grace
            self._halt.set()
        elif len(self.streams) > 1:
            log.info("%s is draining its stream (%s); the other streams go on serving", stream.describe(),
                     drain.reason)

    # -- one slot: one stream at a time, each with its own backoff --
    async def _slot(self, slot: int, *, wait: bool) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if wait:
                delay = self._backoff.delay(self.plan.attempt(slot))
                log.info("reconnecting in %.1f s" if slot in self._ever_held else "dialing another stream in %.1f s",
                         delay)
                await asyncio.sleep(delay)
            wait = True
            dial = self.plan.dial(slot)
            if dial is None or self._stopping:
                return
            began = loop.time()
            try:
                await self._stream(dial)
            except DrainedToExit as exc:
                log.info("stopping: %s", exc)
                self._halt.set()
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                    # Landed on a replica this agent holds already: another dial, after the slot's backoff.
                    log.info("a stream to %s landed on a replica held already: %s", dial.address, exc.details())
                else:
                    log.warning("control plane %s: %s: %s", dial.address, exc.code().name, exc.details())
            except (StreamEnded, RemoteProtocolError) as exc:
                log.warning("session ended: %s", exc)
            except Exception:
                log.exception("session failed")
            if self._stopping:
                return
            expired = self._identity.not_after
            if dt.datetime.now(dt.UTC) >= expired:
                log.error("the agent's certificate expired on %s, so the control plane refuses it: enroll the "
                          "agent again (onprem-agent enroll) with a new token", expired.isoformat())
            self._apply(self.plan.ended(slot, loop.time() - began, loop.time()))
            if slot not in self.plan.slots:
                return
    def _slot_done(self, slot: int, task: asyncio.Task[None]) -> None:
        if self._tasks.get(slot) is task:
            del self._tasks[slot]
        if self._stopping:
            self.plan.forget(slot)

    async def _stream(self, dial: Dial) -> None:
        """Dial, handshake, and serve one stream of `dial.slot` until it ends; raises why it ended."""
        slot = dial.slot
        async with self._dial(dial.address, self._identity) as (call, stub):
            try:
                conn = AgentConnection()
                await call.write(conn.hello_frame(self._hello()))
                first = await call.read()
                if first is EOF:
                    await call.wait_for_connection()
                    raise PeerClosedStream("the control plane closed the stream before welcoming us")
                assert isinstance(first, ControlFrame)
                conn.receive(first)
                welcome = conn.welcome
                assert welcome is not None
                replica = welcome.replica if conn.replicas else None
                landing, actions = self.plan.welcomed(slot, replica, welcome.replicas,
                                                      asyncio.get_running_loop().time())
                self._apply(actions)
                if landing in (Landing.DUPLICATE, Landing.UNWANTED):
                    why = "another stream holds it" if landing is Landing.DUPLICATE else "the agent does not want it"
                    log.info("a stream to %s landed on replica %s, which %s: closing it", dial.address,
                             replica.replica_id if replica is not None else "(unnamed)", why)
                    await self._leave_politely(call)
                    return
                await self._hold(slot, dial, call, conn, stub, replica)
            finally:
                call.cancel()

    async def _hold(self, slot: int, dial: Dial, call: StreamCall, conn: AgentConnection,
                    stub: tunnel_pb2_grpc.AgentTunnelAsyncStub | None, replica: tunnel_pb2.Replica | None) -> None:
        welcome = conn.welcome
        assert welcome is not None
        log.info("connected to %s as %s in group %s (session %s)%s", dial.address, welcome.agent_id, welcome.group,
                 welcome.session_id, f", replica {replica.replica_id}" if replica is not None else "")
        stream: Stream

        def on_drain(drain: tunnel_pb2.Drain) -> None:
            self._drain_asked(stream, drain)

        session = ControlPlaneSession(call, conn, self._dispatcher, max_in_flight=self._config.max_in_flight,
                                      load=self.load, on_replicas=self._replicas_changed, on_drain=on_drain)
        stream = Stream(slot, replica.replica_id if replica is not None else None, dial.address, session, stub,
                        grace=self._config.drain_grace_seconds)
        self.streams[slot] = stream
        self.sessions_opened += 1
        if slot in self._ever_held:
            metrics.RECONNECTS.inc()
        self._ever_held.add(slot)
        self._streams_changed()
        if replica is not None:
            log.info("stream joined: %s (%s)", stream.describe(), self.describe_streams())
        try:
            if self.health:
                session.send_status(health=self.health)
            await self._serve(stream)
        finally:
            if self.streams.get(slot) is stream:
                del self.streams[slot]
            self._streams_changed()
            if replica is not None:
                log.info("stream left: %s (%s)", stream.describe(), self.describe_streams())

    def _streams_changed(self) -> None:
        metrics.STREAMS.set(len(self.streams))
        metrics.CONNECTED.set(1 if self.streams else 0)
        if not self._stopping:
            systemd.notify(f"STATUS={self.status_line()}")

    async def _serve(self, stream: Stream) -> None:
        """Run the stream's session until it ends (raising why), or until asked to close it gracefully."""
        loop = asyncio.get_running_loop()
        session_task = loop.create_task(stream.session.run(), name=f"tunnel-session-{stream.slot}")
        close_task = loop.create_task(stream.close.wait())
        try:
            await asyncio.wait({session_task, close_task}, return_when=asyncio.FIRST_COMPLETED)
            if not session_task.done():
                await self._drain(stream, session_task)
                return
            await session_task
        finally:
            close_task.cancel()
            if not session_task.done():
                session_task.cancel()
                await asyncio.gather(session_task, return_exceptions=True)

    async def _drain(self, stream: Stream, session_task: asyncio.Task[None]) -> None:
        """Stop taking work, let in-flight requests finish within the grace period, then close."""
        session = stream.session
        grace = stream.grace
        if session.in_flight:
            log.info("draining: waiting up to %.0f s for %d in-flight requests", grace, session.in_flight)
        await session.drain(grace)
        try:
            # Cancelling the call could drop final statuses still in flight on the wire:
            # half-close instead, and let the control plane end the stream.
            async with asyncio.timeout(5):
                await session.close_gracefully()
            async with asyncio.timeout(5):
                await asyncio.shield(session_task)
        except (TimeoutError, grpc.aio.AioRpcError, StreamEnded, RemoteProtocolError):
            pass
        session_task.cancel()
        await asyncio.gather(session_task, return_exceptions=True)

    @staticmethod
    async def _leave_politely(call: StreamCall) -> None:
        """End a stream that ran no request: half-close, and let the control plane end it (a clean close)."""
        with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            async with asyncio.timeout(POLITE_CLOSE_TIMEOUT):
                await call.done_writing()
                while await call.read() is not EOF:
                    pass  # pings, a replicas frame: this stream serves nothing

