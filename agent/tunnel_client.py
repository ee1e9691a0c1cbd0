"""Holds the agent's one outbound stream to the control plane, forever.

Dial out with the agent's certificate, say Hello, serve requests until the
stream ends, then back off (full jitter, capped) and dial again. Nothing
here listens: the private network opens no inbound port.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import socket
from dataclasses import dataclass
from typing import Any

import grpc

from onprem.agent import __version__, metrics
from onprem.agent.config import AgentConfig
from onprem.agent.dispatcher import Dispatcher
from onprem.agent.handlers.base import Handler
from onprem.agent.identity import Identity, make_key_and_csr, save_identity
from onprem.agent.session import ControlPlaneSession
from onprem.tunnel import kinds
from onprem.tunnel.aio import EOF
from onprem.tunnel.channel_options import CLIENT_OPTIONS
from onprem.tunnel.errors import DrainedToExit, PeerClosedStream, RemoteProtocolError, StreamEnded
from onprem.tunnel.protocol import AgentConnection, ControlFrame
from onprem.v1 import profiles_pb2, tunnel_pb2, tunnel_pb2_grpc

log = logging.getLogger("onprem.agent.tunnel")

#: The fraction of a certificate's lifetime after which the agent renews it.
RENEW_AT = 2 / 3


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


class TunnelClient:
    def __init__(
        self, config: AgentConfig, identity: Identity, dispatcher: Dispatcher, backoff: Backoff | None = None
    ) -> None:
        self._config = config
        self._identity = identity
        self._dispatcher = dispatcher
        self._backoff = backoff or Backoff()
        self._started_at = dt.datetime.now(dt.UTC)
        self.session: ControlPlaneSession | None = None
        self.sessions_opened = 0
        self._stub: tunnel_pb2_grpc.AgentTunnelAsyncStub | None = None
        self._attempt = 0
        #: The latest health check of every profile.
        self.health: list[profiles_pb2.ProfileHealth] = []
        self._check_now = asyncio.Event()

    def _hello(self) -> tunnel_pb2.Hello:
        hello = tunnel_pb2.Hello(
            agent_version=__version__,
            hostname=socket.gethostname(),
            profiles=self._dispatcher.profiles(),
            max_in_flight=self._config.max_in_flight,
        )
        hello.started_at.FromDatetime(self._started_at)
        return hello

    def reload(self, config: AgentConfig, dispatcher_handlers: dict[str, Handler[Any]]) -> None:
        """Take a reloaded config's profiles into use without dropping the stream, and re-advertise them."""
        self._config = config
        self._dispatcher.replace(dispatcher_handlers)
        if self.session is not None:
            self.session.send_status(profiles=self._dispatcher.profiles())
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
            if self.session is not None:
                self.session.send_status(health=self.health)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._check_now.wait()

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a session open until `stop` is set (or the control plane drains us to exit)."""
        loop = asyncio.get_running_loop()
        renewer = loop.create_task(self._renew_forever(), name="certificate-renewal")
        checker = loop.create_task(self._health_forever(), name="profile-health")
        try:
            while not stop.is_set():
                identity = self._identity
                async with grpc.aio.secure_channel(
                    self._config.control_plane.address,
                    channel_credentials(self._config, identity),
                    options=channel_options(self._config),
                ) as channel:
                    self._stub = tunnel_pb2_grpc.AgentTunnelStub(channel)
                    # A renewed certificate takes effect on the next connection: the
                    # current stream goes on with the old one until it ends.
                    if await self._sessions(stop, identity):
                        log.debug("shutdown: sessions ended; closing the channel")
                        return
        finally:
            self._stub = None
            log.debug("shutdown: channel closed; stopping background tasks")
            renewer.cancel()
            checker.cancel()
            await asyncio.gather(renewer, checker, return_exceptions=True)
            log.debug("shutdown: background tasks stopped")

    async def _sessions(self, stop: asyncio.Event, channel_identity: Identity) -> bool:
        """Open sessions on the current channel until stopped (True) or the identity was renewed (False)."""
        loop = asyncio.get_running_loop()
        assert self._stub is not None
        while not stop.is_set():
            began = loop.time()
            session_task = loop.create_task(self._session(self._stub))
            stop_task = loop.create_task(stop.wait())
            try:
                await asyncio.wait({session_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_task.cancel()
            if not session_task.done():
                await self._drain(session_task)
                return True
            exc = session_task.exception()
            if isinstance(exc, DrainedToExit):
                log.info("stopping: %s", exc)
                return True
            if isinstance(exc, grpc.aio.AioRpcError):
                log.warning("control plane %s: %s: %s", self._config.control_plane.address,
                            exc.code().name, exc.details())
            elif isinstance(exc, StreamEnded | RemoteProtocolError):
                log.warning("session ended: %s", exc)
            elif exc is not None:
                log.error("session failed", exc_info=exc)
            expired = self._identity.not_after
            if dt.datetime.now(dt.UTC) >= expired:
                log.error("the agent's certificate expired on %s, so the control plane refuses it: enroll the agent "
                          "again (onprem-agent enroll) with a new token", expired.isoformat())
            if loop.time() - began >= self._backoff.stable_after:
                self._attempt = 0
            delay = self._backoff.delay(self._attempt)
            self._attempt += 1
            log.info("reconnecting in %.1f s", delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
            if self._identity is not channel_identity:
                return False
        return True

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
        if self._stub is None:
            raise OSError("not connected")
        key_pem, csr_pem = make_key_and_csr(self._identity.agent_id)
        response = await self._stub.Renew(tunnel_pb2.RenewRequest(csr_pem=csr_pem.decode()), timeout=30)
        renewed = Identity(self._identity.agent_id, self._identity.group, key_pem, response.certificate_pem.encode())
        await asyncio.to_thread(save_identity, self._config.identity_dir, renewed)
        self._identity = renewed
        log.info("certificate renewed; valid until %s", renewed.not_after.isoformat())

    async def _drain(self, session_task: asyncio.Task[None]) -> None:
        """Stop taking work, let in-flight requests finish within the grace period, then close."""
        session = self.session
        if session is not None:
            grace = self._config.drain_grace_seconds
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
            except (TimeoutError, grpc.aio.AioRpcError, StreamEnded):
                pass
        session_task.cancel()
        await asyncio.gather(session_task, return_exceptions=True)

    async def _session(self, stub: tunnel_pb2_grpc.AgentTunnelAsyncStub) -> None:
        conn = AgentConnection()
        call = stub.Connect()  # type: ignore[call-arg]  # stream opened without an iterator: we write()
        try:
            await call.write(conn.hello_frame(self._hello()))
            first = await call.read()
            if first is EOF:
                await call.wait_for_connection()
                raise PeerClosedStream("the control plane closed the stream before welcoming us")
            assert isinstance(first, ControlFrame)
            conn.receive(first)
            assert conn.welcome is not None
            log.info(
                "connected to %s as %s in group %s (session %s)",
                self._config.control_plane.address, conn.welcome.agent_id, conn.welcome.group,
                conn.welcome.session_id,
            )
            self.sessions_opened += 1
            if self.sessions_opened > 1:
                metrics.RECONNECTS.inc()
            metrics.CONNECTED.set(1)
            self.session = ControlPlaneSession(call, conn, self._dispatcher, max_in_flight=self._config.max_in_flight)
            if self.health:
                self.session.send_status(health=self.health)
            await self.session.run()
        finally:
            self.session = None
            metrics.CONNECTED.set(0)
            call.cancel()
