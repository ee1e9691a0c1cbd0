"""A real agent `TunnelClient` over real gRPC (mTLS on loopback) to fake control-plane replicas.

Each replica is a gRPC server in this process whose `Connect` runs the control plane's real
`AgentSession` and names replicas in its welcome, as a replica of the HA control plane will: the
agent's own dialer, channels, TLS and polite closes are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc

from onprem.agent.config import AgentConfig, ControlPlaneConfig
from onprem.agent.dispatcher import Dispatcher
from onprem.agent.identity import Identity, make_key_and_csr
from onprem.agent.profiles import Profiles
from onprem.agent.tunnel_client import TunnelClient
from onprem.control_plane.ca import CertificateAuthority
from onprem.control_plane.sessions import AgentSession
from onprem.tunnel.aio import EOF
from onprem.tunnel.protocol import AgentFrame, ControlPlaneConnection
from onprem.v1 import tunnel_pb2, tunnel_pb2_grpc
from tests.agent.test_tunnel_client_replicas import QuickBackoff, until
from tests.tunnel.test_testing import FakeFolder, read

#: What the control plane's session records when the agent half-closed its stream: a clean close.
CLEAN = "the agent closed the stream"


class FakeReplica(tunnel_pb2_grpc.AgentTunnelServicer):
    def __init__(self, replica_id: str, names: Callable[[], list[tunnel_pb2.Replica]]) -> None:
        self.replica_id = replica_id
        self.names = names
        self.address = ""
        self.sessions: list[AgentSession] = []
        #: The peer (client address and port) of every stream, in order.
        self.peers: list[str] = []
        #: Each ended session and why, as the session recorded it.
        self.ended: list[tuple[AgentSession, str | None]] = []

    async def Renew(self, request: tunnel_pb2.RenewRequest, context: Any) -> tunnel_pb2.RenewResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this fake replica renews nothing")
        raise AssertionError("abort raises")

    async def Connect(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        conn = ControlPlaneConnection()
        first = await context.read()
        if first is EOF:
            return
        assert isinstance(first, AgentFrame)
        conn.receive(first)
        session = AgentSession(conn, context.write, context.read, agent_id="agent-grpc", name="grpc", group="g",
                               cert_expires_at=None)
        replica = tunnel_pb2.Replica(replica_id=self.replica_id, agent_address=self.address)
        await context.write(conn.welcome_frame(agent_id="agent-grpc", group="g", session_id=session.session_id,
                                               replica=replica, replicas=self.names()))
        self.sessions.append(session)
        self.peers.append(context.peer())
        try:
            await session.serve()
        finally:
            self.ended.append((session, session._closed))


@contextlib.asynccontextmanager
async def pki(tmp_path: Path) -> AsyncIterator[tuple[CertificateAuthority, grpc.ServerCredentials, Identity]]:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    key, chain = ca.server_identity(tmp_path / "ca", ["localhost"])
    credentials = grpc.ssl_server_credentials([(key, chain)], root_certificates=ca.cert_pem, require_client_auth=True)
    agent_key, csr = make_key_and_csr("agent-grpc")
    issued = ca.sign_agent_csr(csr, "agent-grpc", dt.timedelta(days=1))
    yield ca, credentials, Identity("agent-grpc", "g", agent_key, issued.pem)


@contextlib.asynccontextmanager
async def listening(servicer: FakeReplica, credentials: grpc.ServerCredentials) -> AsyncIterator[str]:
    server = grpc.aio.server()
    tunnel_pb2_grpc.add_AgentTunnelServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield f"localhost:{port}"
    finally:
        await server.stop(1)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, address: str, ca: CertificateAuthority, identity: Identity,
                  folder: FakeFolder) -> AsyncIterator[TunnelClient]:
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    config = AgentConfig(
        control_plane=ControlPlaneConfig(address=address, enroll_address="localhost:1", ca_file=tmp_path / "ca.pem"),
        identity_dir=tmp_path / "id", profiles=Profiles(), drain_grace_seconds=5, health_check_interval_seconds=3600)
    client = TunnelClient(config, identity, Dispatcher({"file_op": folder}), QuickBackoff())
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(client.run(stop))
    try:
        yield client
    finally:
        folder.release.set()
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_the_agent_dials_each_replica_at_its_own_address_over_mtls(tmp_path: Path) -> None:
    names: list[tunnel_pb2.Replica] = []
    r1, r2 = FakeReplica("r1", lambda: names), FakeReplica("r2", lambda: names)
    folder = FakeFolder()
    async with pki(tmp_path) as (ca, credentials, identity), listening(r1, credentials) as a1, \
            listening(r2, credentials) as a2:
        r1.address, r2.address = a1, a2
        names[:] = [tunnel_pb2.Replica(replica_id="r1", agent_address=a1),
                    tunnel_pb2.Replica(replica_id="r2", agent_address=a2)]
        async with running(tmp_path, a1, ca, identity, folder) as client:
            await until(lambda: len(client.streams) == 2)
            assert {s.replica_id: s.address for s in client.streams.values()} == {"r1": a1, "r2": a2}
            chunks = [c async for c in r2.sessions[0].start(read("small"))]
            assert len(chunks) == 3
        # Stopping drained both streams and half-closed them: each replica saw a clean close.
        await until(lambda: len(r1.ended) == 1 and len(r2.ended) == 1)
        assert [why for _, why in r1.ended + r2.ended] == [CLEAN, CLEAN]


async def test_behind_one_address_a_landing_on_a_replica_held_is_closed_cleanly_on_a_new_connection(
        tmp_path: Path) -> None:
    # The one replica behind the address names a second one that no dial ever reaches.
    behind = [tunnel_pb2.Replica(replica_id="r1"), tunnel_pb2.Replica(replica_id="r2")]
    r1 = FakeReplica("r1", lambda: behind)
    folder = FakeFolder()
    async with pki(tmp_path) as (ca, credentials, identity), listening(r1, credentials) as address, \
            running(tmp_path, address, ca, identity, folder) as client:
        await until(lambda: len(r1.ended) >= 3)
        assert len(client.streams) == 1 and len([s for s in r1.sessions if s.is_open]) == 1
        # Each duplicate ran no request and ended by the agent's half-close, the control plane's clean end.
        assert {why for _, why in r1.ended} == {CLEAN}
        assert all(session.conn.in_flight == 0 and session is not r1.sessions[0] for session, _ in r1.ended)
        # Each dial was a connection of its own (a new client port), so a balancer could spread them.
        assert len(set(r1.peers)) == len(r1.peers)
        # The stream that holds r1 still serves.
        assert len([c async for c in r1.sessions[0].start(read("small"))]) == 3
