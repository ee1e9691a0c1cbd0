"""`onprem.v1.AgentTunnel/Connect`: where an agent's stream arrives.

TLS has already checked that the client certificate chains to our CA; here
the certificate must also name an enrolled, unrevoked agent and be the one
last issued to it. Then Hello, Welcome, and the session serves until the
stream ends. Refusals raise `tunnel.errors` kinds, which the API's one error
boundary (`control_plane.api.errors`) turns into a status with its reason.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from onprem.control_plane import metrics
from onprem.control_plane.api import errors
from onprem.control_plane.ca import CsrError
from onprem.control_plane.core import ControlPlane
from onprem.control_plane.sessions import AgentSession
from onprem.control_plane.store import AdvertisedProfile, AgentRevoked, AgentRow
from onprem.tunnel import kinds
from onprem.tunnel.aio import EOF
from onprem.tunnel.budget import TokenBucket
from onprem.tunnel.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    RemoteProtocolError,
    ResourceExhausted,
    Unauthenticated,
)
from onprem.tunnel.protocol import AgentFrame, ControlPlaneConnection
from onprem.v1 import profiles_pb2, tunnel_pb2, tunnel_pb2_grpc

log = logging.getLogger("onprem.control_plane.tunnel")

HELLO_TIMEOUT = 10.0
#: Streams one agent may open, sustained per second and in a burst. Each costs a store lookup and a
#: write of its profiles; a healthy agent reconnects after a jittered backoff of at least half a second.
CONNECTS_PER_SECOND = 1.0
CONNECT_BURST = 10
#: Agents whose reconnect budget is remembered; beyond this, the fullest buckets are forgotten.
_MAX_TRACKED_AGENTS = 100_000


class AgentTunnelService(tunnel_pb2_grpc.AgentTunnelServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp
        self._connects: dict[str, TokenBucket] = {}

    def _may_connect(self, agent_id: str) -> bool:
        bucket = self._connects.get(agent_id)
        if bucket is None:
            if len(self._connects) >= _MAX_TRACKED_AGENTS:
                self._connects.clear()  # ids come from certificates we signed: only enrolled agents get here
            bucket = self._connects[agent_id] = TokenBucket(CONNECTS_PER_SECOND, CONNECT_BURST)
        return bucket.take(asyncio.get_running_loop().time())

    async def _authenticate(
        self, context: grpc.aio.ServicerContext[Any, Any], *, connecting: bool = False,
    ) -> tuple[AgentRow, x509.Certificate]:
        pem = next(iter(context.auth_context().get("x509_pem_cert") or [b""]))
        if not pem:
            raise Unauthenticated("a client certificate is required: enroll the agent first",
                                  reason="MISSING_CLIENT_CERTIFICATE")
        cert = x509.load_pem_x509_certificate(pem)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        agent_id = str(names[0].value) if names else ""
        if connecting and not self._may_connect(agent_id):
            log.warning("agent %s reconnects faster than %g a second (bursts of %d); refusing this stream",
                        agent_id, CONNECTS_PER_SECOND, CONNECT_BURST)
            raise ResourceExhausted(
                f"agent '{agent_id}' reconnects faster than {CONNECTS_PER_SECOND:g} a second; back off and retry",
                reason="RECONNECTING_TOO_FAST")
        row = await self._cp.blocking(self._cp.store.get_agent, agent_id)
        if row is None:
            raise PermissionDenied(f"agent '{agent_id}' is not enrolled here", reason="AGENT_NOT_ENROLLED")
        if row.revoked:
            raise AgentRevoked(agent_id, row.revoked_reason)
        if row.cert_serial != cert.serial_number:
            raise PermissionDenied(f"this certificate of agent '{agent_id}' was replaced by a newer one",
                                   reason="CERTIFICATE_REPLACED")
        return row, cert

    @errors.unary
    async def Renew(
        self, request: tunnel_pb2.RenewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tunnel_pb2.RenewResponse:
        row, _ = await self._authenticate(context)
        try:
            issued = self._cp.ca.sign_agent_csr(
                request.csr_pem.encode(), row.agent_id, self._cp.settings.agent_cert_validity)
        except CsrError as exc:
            raise InvalidArgument(str(exc), reason="INVALID_CSR", field="csr_pem") from None
        await self._cp.blocking(self._cp.store.set_certificate, row.agent_id, issued.serial, issued.not_after)
        session = self._cp.registry.get(row.agent_id)
        if session is not None:
            session.cert_expires_at = issued.not_after
        log.info("renewed the certificate of agent %s (%s) until %s", row.name, row.agent_id,
                 issued.not_after.isoformat())
        response = tunnel_pb2.RenewResponse(certificate_pem=issued.pem.decode())
        response.expires_at.FromDatetime(issued.not_after)
        return response

    async def _record_hello(self, agent_id: str, hello: tunnel_pb2.Hello, profiles: list[profiles_pb2.Profile]) -> None:
        advertised = [
            AdvertisedProfile(name=p.name, kind=_kind_name(p.kind), read_only=p.read_only,
                              dialect=p.dialect)
            for p in profiles
        ]
        await self._cp.blocking(
            self._cp.store.record_hello, agent_id, hello.hostname[:255], hello.agent_version[:64], advertised
        )

    async def _remember_profiles(self, session: AgentSession, hello: tunnel_pb2.Hello) -> None:
        """Store the profiles an agent re-advertises after a reload, so routing explains them when it is offline.

        Only the latest list is written: an agent re-advertising faster than the store writes costs one
        write at a time, never a queue of them.
        """
        while True:
            await session.profiles_updated.wait()
            session.profiles_updated.clear()
            profiles, session.profile_update = session.profile_update or [], None
            try:
                await self._record_hello(session.agent_id, hello, profiles)
            except Exception:
                log.exception("could not store the new profiles of agent %s", session.agent_id)

    async def _remember_draining(self, session: AgentSession) -> None:
        """Note in the store that the stream is draining, for ListAgents on the other replicas."""
        await session.draining_changed.wait()
        try:
            await self._cp.blocking(self._cp.store.mark_stream_draining, session.agent_id, self._cp.replica_id,
                                    session.session_id)
        except Exception:
            log.exception("could not record that agent %s is draining", session.agent_id)

    # Connect reads and writes through `context` (one writer task), so it
    # returns nothing instead of being a generator as the generated base says; its refusals go
    # through the same boundary as every other RPC, so each carries its ErrorInfo reason.
    @errors.unary  # type: ignore[misc]
    async def Connect(  # type: ignore[override]
        self, request_iterator: Any, context: grpc.aio.ServicerContext[AgentFrame, tunnel_pb2.ConnectResponse]
    ) -> None:
        # Asked first, while the call is surely alive (grpc's peer() on an ended call reads freed memory).
        peer = context.peer()
        row, cert = await self._authenticate(context, connecting=True)
        conn = ControlPlaneConnection(self._cp.settings.limits)
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                first = await context.read()
            if first is EOF:
                return
            assert isinstance(first, AgentFrame)
            conn.receive(first)
        except TimeoutError:
            raise DeadlineExceeded(f"no hello within {HELLO_TIMEOUT:.0f} s", reason="NO_HELLO") from None
        except RemoteProtocolError as exc:
            raise FailedPrecondition(f"tunnel protocol: {exc}", reason="TUNNEL_PROTOCOL") from None
        hello = conn.hello
        assert hello is not None
        if conn.replicas and self._cp.replica_id in hello.held_replica_ids:
            # A dial behind a load balancer that landed here again: the stream the agent holds stays.
            raise AlreadyExists(f"agent '{row.agent_id}' holds a stream to replica {self._cp.replica_id} already; "
                                "this one is not needed", reason="REPLICA_ALREADY_HELD")
        session = AgentSession(
            conn, context.write, context.read,
            agent_id=row.agent_id, name=row.name, group=row.group_name,
            cert_expires_at=cert.not_valid_after_utc, budgets=self._cp.settings.budgets,
        )
        await self._record_hello(row.agent_id, hello, list(hello.profiles))
        membership = self._cp.membership
        await self._cp.blocking(self._cp.store.record_stream, row.agent_id, self._cp.replica_id, session.session_id)
        told = membership.serving
        await context.write(session.welcome_frame(membership.me, told))
        self._cp.registry.add(session)
        if membership.serving != told:
            # The set changed while the welcome was being written, before the session could be told.
            session.send_replicas(membership.serving)
        metrics.SESSIONS_OPENED.inc()
        log.info("agent %s (%s) of group %s connected from %s, session %s, %d profiles",
                 row.name, row.agent_id, row.group_name, peer, session.session_id, len(hello.profiles))
        loop = asyncio.get_running_loop()
        watchers = [loop.create_task(self._remember_profiles(session, hello)),
                    loop.create_task(self._remember_draining(session))]
        try:
            await session.serve()
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            self._cp.registry.remove(session)
            try:
                await self._cp.blocking(self._cp.store.forget_stream, row.agent_id, self._cp.replica_id,
                                        session.session_id)
            except Exception:
                log.exception("could not record that agent %s left this replica", row.agent_id)
            metrics.SESSIONS_LOST.inc()
            log.info("agent %s (%s) session %s ended", row.name, row.agent_id, session.session_id)
            try:
                await self._cp.blocking(self._cp.store.touch_agent, row.agent_id, dt.datetime.now(dt.UTC))
            except Exception:
                log.exception("could not record when agent %s was last seen", row.agent_id)
        if session.budget_error is not None:
            raise ResourceExhausted(f"budget of {session.budget_error.budget} exceeded: {session.budget_error}",
                                    reason="AGENT_BUDGET_EXCEEDED")
        if session.protocol_error:
            raise FailedPrecondition(f"tunnel protocol: {session.protocol_error}", reason="TUNNEL_PROTOCOL")


def _kind_name(profile_kind: int) -> str:
    kind = kinds.by_profile_kind(profile_kind)
    return kind.name if kind is not None else "unknown"
