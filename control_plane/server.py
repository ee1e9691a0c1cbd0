"""Builds and runs the control plane's three listeners.

- operator listener (TLS, bearer tokens): the operator services, server
  reflection (v1 and v1alpha, `api.reflection`) and `grpc.health.v1.Health`; every call but health and
  reflection is authenticated from its metadata before any message is read
  (`control_plane.api.guard`);
- agent listener (mTLS): `AgentTunnel/Connect`;
- enrollment listener (TLS, no client certificate): `Enrollment/Enroll`;
- the web console (HTTPS with the same certificate, `control_plane.console`), when asked for
  (`console_listen`), on the same event loop.

Several replicas may share one PostgreSQL store (`replicas`, `changes`): each
records itself before it serves, and every agent holds a stream to each.

Health (`grpc.health.v1.Health`, public like reflection) answers for "" (the replica), for each operator
service by its full name (`OPERATOR_SERVICES`: SERVING while the replica serves, NOT_SERVING from the
moment it starts to drain, so that a load balancer checking one service stops sending it new calls) and for
`STORE_SERVICE` (whether the store answers); any other name is NOT_FOUND (docs/operators.md, "Health").

On SIGTERM or SIGINT: health turns NOT_SERVING (every service), the replica's row says
"draining" (agents stop dialing it, the other replicas drop it at once), its
agents are told to drain this stream only, in-flight requests get a grace
period, then the servers stop and the row goes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sqlalchemy.exc import DBAPIError

from onprem.control_plane import __version__, metrics
from onprem.control_plane.api.agents import AgentService
from onprem.control_plane.api.apps import AppService
from onprem.control_plane.api.audit import AuditService
from onprem.control_plane.api.database import DatabaseService
from onprem.control_plane.api.files import FileService
from onprem.control_plane.api.guard import AuthInterceptor
from onprem.control_plane.api.reflection import Reflection
from onprem.control_plane.api.tokens import TokenService
from onprem.control_plane.audit_retention import DEFAULT_RETENTION_DAYS, AuditRetention
from onprem.control_plane.ca import CertificateAuthority
from onprem.control_plane.console import Console, ConsoleConfig
from onprem.control_plane.console.context import ConsoleSettings
from onprem.control_plane.core import ControlPlane, Settings
from onprem.control_plane.enrollment import EnrollmentService
from onprem.control_plane.private_state import prepare_state_dir
from onprem.control_plane.replicas import ReplicaIdentity, load_replica_id
from onprem.control_plane.store import DEFAULT_DB_FILENAME, Store, StoreError
from onprem.control_plane.tunnel_service import AgentTunnelService
from onprem.tunnel.channel_options import OPERATOR_SERVER_OPTIONS, SERVER_OPTIONS, TUNNEL_SERVER_OPTIONS
from onprem.v1 import (
    agents_pb2,
    agents_pb2_grpc,
    apps_pb2,
    apps_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    database_pb2,
    database_pb2_grpc,
    enrollment_pb2_grpc,
    files_pb2,
    files_pb2_grpc,
    tokens_pb2,
    tokens_pb2_grpc,
    tunnel_pb2_grpc,
)

log = logging.getLogger("onprem.control_plane.server")

#: The health service name that reports whether the store answers (SERVING) or not (NOT_SERVING).
STORE_SERVICE = "onprem.control_plane.Store"
#: The store setting holding the fingerprint of the replicas' shared CA certificate.
CA_FINGERPRINT = "ca_sha256"

#: The operator services, by full name: served on the operator listener, listed by reflection, and each its
#: own name in health.
OPERATOR_SERVICES = [
    database_pb2.DESCRIPTOR.services_by_name["DatabaseService"].full_name,
    files_pb2.DESCRIPTOR.services_by_name["FileService"].full_name,
    apps_pb2.DESCRIPTOR.services_by_name["AppService"].full_name,
    agents_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    tokens_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
]


@dataclass(frozen=True)
class ServerConfig:
    state_dir: Path
    operator_listen: str = "127.0.0.1:8443"
    agent_listen: str = "127.0.0.1:8444"
    enroll_listen: str = "127.0.0.1:8445"
    database_url: str | None = None
    #: Names the server certificate must carry (host names and IP addresses).
    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1")
    grace_period: float = 30.0
    #: host:port for Prometheus metrics; None to serve none.
    metrics_listen: str | None = None
    settings: Settings = field(default_factory=Settings)
    #: This replica's id; None: the one kept in the state folder (made on first start).
    replica_id: str | None = None
    #: What agents and operators dial to reach this replica (host:port); "" behind a load balancer.
    advertise_agent_address: str = ""
    advertise_operator_address: str = ""
    #: host:port for the web console; None to serve none.
    console_listen: str | None = None
    #: The console's sessions and refreshes (the addresses and CA it shows agents are filled in here).
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    #: Audit rows older than this are deleted in the background (`audit_retention`); None keeps them all.
    audit_retention: dt.timedelta | None = dt.timedelta(days=DEFAULT_RETENTION_DAYS)

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / DEFAULT_DB_FILENAME}"


def open_store(state_dir: Path, database_url: str | None) -> Store:
    """The store of a state folder, the folder made private first (see `private_state`).

    The embedded SQLite store upgrades its schema itself; a store given by URL (PostgreSQL, shared by
    replicas) must be at this version's schema already (`onprem-control-plane migrate`), or new.
    """
    prepare_state_dir(state_dir, sqlite_file=None if database_url else state_dir / DEFAULT_DB_FILENAME)
    store = Store(database_url or f"sqlite:///{state_dir / DEFAULT_DB_FILENAME}")
    for attempt in range(3):
        try:
            store.create_schema(upgrade=database_url is None, version=__version__)
            break
        except DBAPIError:
            # Replicas starting together on a new database: the loser's create_all collides; again.
            if attempt == 2:
                raise
    return store


def check_shared_ca(store: Store, ca: CertificateAuthority) -> None:
    """Refuse a replica whose CA is not the one its store's other replicas use (agents would not trust it).

    The first replica records its CA certificate's fingerprint in the store; only the fingerprint:
    the key never goes into the database.
    """
    mine = hashlib.sha256(ca.cert_pem).hexdigest()
    theirs = store.claim_setting(CA_FINGERPRINT, mine)
    if theirs != mine:
        raise StoreError(
            f"this replica's CA (sha256 {mine[:16]}…) is not the one the other replicas of this store use (sha256 "
            f"{theirs[:16]}…): copy ca/ca.pem and ca/ca.key from an existing replica's state folder into this "
            f"one's (docs/ha.md), then start it again")


def open_control_plane(config: ServerConfig) -> ControlPlane:
    store = open_store(config.state_dir, config.database_url)
    ca = CertificateAuthority.load_or_create(config.state_dir / "ca")
    check_shared_ca(store, ca)
    identity = ReplicaIdentity(load_replica_id(config.state_dir, config.replica_id),
                               agent_address=config.advertise_agent_address,
                               operator_address=config.advertise_operator_address)
    return ControlPlane(store, ca, config.settings, identity)


class ControlPlaneServer:
    def __init__(self, config: ServerConfig, cp: ControlPlane) -> None:
        self.config = config
        self.cp = cp
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.ports: dict[str, int] = {}
        self._servers: list[grpc.aio.Server] = []
        self._audit_task: asyncio.Task[None] | None = None
        self._background: asyncio.Task[None] | None = None
        self._store_health: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self.console: Console | None = None

    async def start(self) -> None:
        key, chain = self.cp.ca.server_identity(self.config.state_dir / "ca", list(self.config.hostnames))
        ca_pem = self.cp.ca.cert_pem
        tls = grpc.ssl_server_credentials([(key, chain)])
        mtls = grpc.ssl_server_credentials([(key, chain)], root_certificates=ca_pem, require_client_auth=True)

        operator = grpc.aio.server(options=OPERATOR_SERVER_OPTIONS, interceptors=[AuthInterceptor(self.cp)])
        database_pb2_grpc.add_DatabaseServiceServicer_to_server(DatabaseService(self.cp), operator)
        files_pb2_grpc.add_FileServiceServicer_to_server(FileService(self.cp), operator)
        apps_pb2_grpc.add_AppServiceServicer_to_server(AppService(self.cp), operator)
        agents_pb2_grpc.add_AgentServiceServicer_to_server(AgentService(self.cp), operator)
        tokens_pb2_grpc.add_TokenServiceServicer_to_server(TokenService(self.cp), operator)
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditService(self.cp), operator)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, operator)
        # Reflection v1 and v1alpha, with the protos' comments (`api.reflection`).
        # The error details every refusal carries (google.rpc.ErrorInfo, BadRequest) are described too, so
        # that grpcurl and other clients decode them instead of printing base64.
        Reflection([*OPERATOR_SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
                   modules=[health_pb2.DESCRIPTOR, any_pb2.DESCRIPTOR, status_pb2.DESCRIPTOR,
                            error_details_pb2.DESCRIPTOR]).add_to(operator)
        agent = grpc.aio.server(options=TUNNEL_SERVER_OPTIONS)
        tunnel_pb2_grpc.add_AgentTunnelServicer_to_server(AgentTunnelService(self.cp), agent)
        enroll = grpc.aio.server(options=SERVER_OPTIONS)
        enrollment_pb2_grpc.add_EnrollmentServicer_to_server(EnrollmentService(self.cp), enroll)

        for name, server, address, creds in (
            ("operator", operator, self.config.operator_listen, tls),
            ("agent", agent, self.config.agent_listen, mtls),
            ("enroll", enroll, self.config.enroll_listen, tls),
        ):
            port = server.add_secure_port(address, creds)
            if port == 0:
                raise OSError(f"cannot listen on {address} for the {name} listener (in use?)")
            self.ports[name] = port
            self._servers.append(server)
        if self.config.console_listen:
            # Before anything serves: a console that cannot listen stops the start as a busy port does.
            await self._start_console(key, chain)
        # Recorded before serving: the first agent's welcome names this replica among the live ones.
        await self.cp.membership.join()
        self.cp.start_warmup()
        # Every service of this replica serves when the replica does (set before the listeners open, so that
        # no probe finds a service unknown); a drain (`stop`) turns them all at once.
        for service in [*OPERATOR_SERVICES, ""]:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        for server in self._servers:
            await server.start()
        loop = asyncio.get_running_loop()
        self._audit_task = loop.create_task(self.cp.audit.run(), name="audit-writer")
        self._background = loop.create_task(self.cp.run_background(), name="token-watcher")
        if self.config.audit_retention is not None:
            retention = AuditRetention(self.cp.store.prune_audit, self.cp.blocking, self.config.audit_retention)
            self._retention = loop.create_task(retention.run(), name="audit-retention")
        if self.config.metrics_listen:
            metrics.serve(self.config.metrics_listen, self._agent_states)
        self._store_health = loop.create_task(self._watch_store(), name="store-health")
        log.info("listening: operator %s, agents %s, enrollment %s",
                 self.config.operator_listen, self.config.agent_listen, self.config.enroll_listen)

    async def _start_console(self, key: bytes, chain: bytes) -> None:
        settings = dataclasses.replace(
            self.config.console,
            agent_address=self.config.advertise_agent_address or self.config.agent_listen,
            enroll_address=self.config.enroll_listen)
        assert self.config.console_listen is not None
        self.console = Console(self.cp, ConsoleConfig(self.config.console_listen, settings))
        await self.console.start(key, chain)
        assert self.console.port is not None
        self.ports["console"] = self.console.port

    async def _watch_store(self) -> None:
        """Health of `STORE_SERVICE` follows the store: requests whose routing is known keep being served
        while it is down, but a probe sees the outage (and the replica's own health stays SERVING)."""
        serving = None
        while True:
            ok = self.cp.membership.store_reachable
            if ok != serving:
                serving = ok
                status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                await self.health.set(STORE_SERVICE, status)
            await asyncio.sleep(self.cp.membership.heartbeat / 2)

    def _agent_states(self) -> list[tuple[str, str]]:
        """(group, state) of every enrolled agent; called from the metrics thread."""
        live = {s.agent_id: s for s in self.cp.registry.all()}
        states = []
        for row in self.cp.store.list_agents():
            session = live.get(row.agent_id)
            if row.revoked:
                state = "revoked"
            elif session is None or not session.is_open:
                state = "inactive"
            else:
                state = "draining" if session.draining else "active"
            states.append((row.group_name, state))
        return states

    async def stop(self, grace: float | None = None) -> None:
        grace = self.config.grace_period if grace is None else grace
        await self.health.enter_graceful_shutdown()
        for task in (self._store_health, self._retention):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.console is not None:
            await self.console.stop()
        # Off the replica set first: agents are told to hold no stream here, the other replicas hear of it.
        try:
            await self.cp.membership.drain()
        except Exception:
            log.exception("could not mark this replica draining in the store")
        for session in self.cp.registry.all():
            session.drain("the control plane is shutting down", dt.timedelta(seconds=grace))
        # Operators first, so in-flight requests finish while agent streams stay up.
        operator, agent, enroll = self._servers
        await enroll.stop(0)
        await operator.stop(grace)
        for session in self.cp.registry.all():
            session.close("the control plane is shutting down")
        await agent.stop(1)
        await self.cp.membership.leave()
        # The watcher first: it flushes last-used times and refusal summaries, which the audit writer then writes.
        for task in (self._background, self._audit_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def stop_on_signals(self) -> asyncio.Event:
        """An event set by SIGTERM or SIGINT; installed before `start`, so that a signal that comes
        the moment the listeners open still stops the replica gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return stop

    async def serve_until_signal(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or self.stop_on_signals()
        await stop.wait()
        log.info("shutting down: draining agents, %.0f s grace for in-flight requests", self.config.grace_period)
        await self.stop()
