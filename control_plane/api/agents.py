"""`onprem.v1.AgentService`: agents, groups and enrollment tokens."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from onprem.control_plane import observe
from onprem.control_plane import store as store_mod
from onprem.control_plane.api import errors
from onprem.control_plane.auth import Principal
from onprem.control_plane.changes import AGENT_DRAIN, AGENT_REVOKED
from onprem.control_plane.core import ControlPlane
from onprem.control_plane.sessions import AgentSession
from onprem.control_plane.store import DRAINING, SERVING, AgentRow, AgentStreamRow
from onprem.tunnel import kinds
from onprem.tunnel.errors import FailedPrecondition, InvalidArgument, NotFound
from onprem.v1 import agents_pb2, agents_pb2_grpc, profiles_pb2, tunnel_pb2

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_DRAIN_GRACE = dt.timedelta(seconds=30)
MAX_DRAIN_GRACE = dt.timedelta(hours=1)
DEFAULT_TOKEN_TTL = dt.timedelta(hours=1)
MAX_TOKEN_TTL = dt.timedelta(days=7)


MAX_DESCRIPTION = 500


def duration(message: Message, name: str, default: dt.timedelta, *, maximum: dt.timedelta, reason: str) -> dt.timedelta:
    """A Duration field as a timedelta; one outside (-maximum, maximum] is refused, not overflowed."""
    if not message.HasField(name):
        return default
    value = getattr(message, name)
    if abs(value.seconds) > maximum.total_seconds() + 1:
        raise InvalidArgument(f"'{name}' must be at most {maximum}", reason=reason, field=name)
    result: dt.timedelta = value.ToTimedelta()
    if result > maximum:
        raise InvalidArgument(f"'{name}' must be at most {maximum}", reason=reason, field=name)
    return result


def agent_message(row: AgentRow, session: AgentSession | None,
                  streams: Sequence[AgentStreamRow] = ()) -> agents_pb2.Agent:
    """One agent as operators see it: its row, this replica's stream of it if any, and the streams
    the other replicas hold (`streams`, from the store)."""
    agent = agents_pb2.Agent(
        agent_id=row.agent_id,
        name=row.name,
        group=row.group_name,
        hostname=row.hostname,
        version=row.version,
        replica_ids=sorted({s.replica_id for s in streams}),
    )
    agent.enrolled_at.FromDatetime(row.enrolled_at)
    agent.certificate_expires_at.FromDatetime(row.cert_expires_at)
    if row.revoked:
        agent.state = agents_pb2.AGENT_STATE_REVOKED
    elif session is not None and session.is_open:
        agent.state = agents_pb2.AGENT_STATE_DRAINING if session.draining else agents_pb2.AGENT_STATE_ACTIVE
        agent.hostname = session.hello.hostname
        agent.version = session.hello.agent_version
        agent.in_flight = session.in_flight
        agent.max_in_flight = session.max_in_flight
        agent.last_seen_at.FromDatetime(session.last_seen_at)
        if session.hello.HasField("started_at"):
            started = session.hello.started_at.ToDatetime(dt.UTC)
            agent.uptime.FromTimedelta(max(dt.datetime.now(dt.UTC) - started, dt.timedelta(0)))
        agent.profiles.extend(session.hello.profiles)
        agent.profile_health.extend(session.profile_health.values())
        agent.session_id = session.session_id
        # A renewal through another replica is in the store, not in this replica's session.
        expires = max(session.cert_expires_at or row.cert_expires_at, row.cert_expires_at)
        agent.certificate_expires_at.FromDatetime(expires)
        return agent
    elif streams:
        # Connected to other replicas only: what they recorded of its streams.
        draining = all(s.draining for s in streams)
        agent.state = agents_pb2.AGENT_STATE_DRAINING if draining else agents_pb2.AGENT_STATE_ACTIVE
    else:
        agent.state = agents_pb2.AGENT_STATE_INACTIVE
    if row.last_seen_at is not None:
        agent.last_seen_at.FromDatetime(row.last_seen_at)
    for p in row.profiles:
        agent.profiles.add(name=p.name, kind=kinds.profile_kind_named(p.kind), read_only=p.read_only, dialect=p.dialect)
    return agent


class AgentService(agents_pb2_grpc.AgentServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp

    async def _agent(self, principal: Principal, agent_id: str) -> AgentRow:
        if not agent_id:
            raise InvalidArgument("'agent_id' is required", reason="MISSING_AGENT_ID", field="agent_id")
        row = await self._cp.blocking(self._cp.store.get_agent, agent_id)
        if row is None or not principal.may_use_group(row.group_name):
            raise NotFound(f"no agent has the id '{agent_id}'", reason="AGENT_NOT_FOUND")
        return row

    @errors.unary
    async def ListAgents(self, request: agents_pb2.ListAgentsRequest, context: Context) -> agents_pb2.ListAgentsResponse:
        principal = await self._cp.authenticate(context)
        if request.group:
            self._cp.require_group(principal, request.group)
        rows = [row for row in await self._cp.blocking(self._cp.store.list_agents, request.group or None)
                if principal.may_use_group(row.group_name)]
        streams = await self._streams([row.agent_id for row in rows])
        return agents_pb2.ListAgentsResponse(agents=[
            agent_message(row, self._cp.registry.get(row.agent_id), streams.get(row.agent_id, ()))
            for row in rows
        ])

    async def _streams(self, agent_ids: list[str]) -> dict[str, list[AgentStreamRow]]:
        """The agents' streams on live replicas, as the store has them."""
        if not agent_ids:
            return {}
        return await self._cp.blocking(self._cp.store.streams_of, agent_ids, self._cp.membership.max_age)

    @errors.unary
    async def GetAgent(self, request: agents_pb2.GetAgentRequest, context: Context) -> agents_pb2.GetAgentResponse:
        principal = await self._cp.authenticate(context)
        row = await self._agent(principal, request.agent_id)
        streams = await self._streams([row.agent_id])
        return agents_pb2.GetAgentResponse(
            agent=agent_message(row, self._cp.registry.get(row.agent_id), streams.get(row.agent_id, ())))

    @errors.unary
    async def ListGroups(self, request: agents_pb2.ListGroupsRequest, context: Context) -> agents_pb2.ListGroupsResponse:
        principal = await self._cp.authenticate(context)
        groups = await self._cp.blocking(self._cp.store.list_groups)
        agents = await self._cp.blocking(self._cp.store.list_agents, None)
        response = agents_pb2.ListGroupsResponse()
        for g in groups:
            if not principal.may_use_group(g.name):
                continue
            members = [a for a in agents if a.group_name == g.name and not a.revoked]
            active = [s for s in self._cp.registry.in_group(g.name) if not s.draining]
            group = response.groups.add(name=g.name, agent_count=len(members), active_agent_count=len(active))
            group.created_at.FromDatetime(g.created_at)
        return response

    @errors.unary
    async def CreateEnrollmentToken(
        self, request: agents_pb2.CreateEnrollmentTokenRequest, context: Context
    ) -> agents_pb2.CreateEnrollmentTokenResponse:
        principal = await self._cp.authenticate(context)
        self._cp.require_admin(principal)
        try:
            store_mod.validate_group_name(request.group)
        except ValueError as exc:
            raise InvalidArgument(f"'group': {exc}", reason="INVALID_GROUP", field="group") from None
        self._cp.require_group(principal, request.group)
        ttl = duration(request, "ttl", DEFAULT_TOKEN_TTL, maximum=MAX_TOKEN_TTL, reason="INVALID_TTL")
        if ttl <= dt.timedelta(0):
            raise InvalidArgument(f"'ttl' must be more than 0 and at most {MAX_TOKEN_TTL}", reason="INVALID_TTL", field="ttl")
        if len(request.description) > MAX_DESCRIPTION:
            raise InvalidArgument(f"'description' must be at most {MAX_DESCRIPTION} characters",
                                  reason="INVALID_DESCRIPTION", field="description")
        token, row = await self._cp.blocking(functools.partial(
            self._cp.store.create_enrollment_token, request.group, ttl, request.description,
            created_by=principal.label))
        observe.record(group=request.group, detail=f"token {row.token_id}")
        response = agents_pb2.CreateEnrollmentTokenResponse(token=token, group=row.group_name)
        response.expires_at.FromDatetime(row.expires_at)
        return response

    @errors.unary
    async def CheckProfile(
        self, request: profiles_pb2.CheckProfileRequest, context: Context
    ) -> profiles_pb2.CheckProfileResponse:
        if request.kind == profiles_pb2.PROFILE_KIND_UNSPECIFIED:
            raise InvalidArgument("'kind' is required: DATABASE, FOLDER or APP", reason="MISSING_KIND", field="kind")
        start = tunnel_pb2.RequestStart(profile_check=request)
        async with self._cp.relay(context, group=request.group, kind=request.kind, profile=request.profile,
                                  start=start) as relayed:
            response = (await relayed.single()).profile_check
            assert relayed.agent is not None  # single() returned: an agent answered
            response.agent_id = relayed.agent.agent_id
        return response

    @errors.unary
    async def DrainAgent(self, request: agents_pb2.DrainAgentRequest, context: Context) -> agents_pb2.DrainAgentResponse:
        principal = await self._cp.authenticate(context)
        self._cp.require_admin(principal)
        row = await self._agent(principal, request.agent_id)
        session = self._cp.registry.get(row.agent_id)
        if session is not None and not session.is_open:
            session = None
        streams = (await self._streams([row.agent_id])).get(row.agent_id, [])
        if session is None and not streams:
            raise FailedPrecondition(f"agent '{row.agent_id}' is not connected, so there is nothing to drain",
                                     reason="AGENT_NOT_CONNECTED")
        grace = duration(request, "grace_period", DEFAULT_DRAIN_GRACE, maximum=MAX_DRAIN_GRACE, reason="INVALID_GRACE")
        if not dt.timedelta(0) <= grace <= MAX_DRAIN_GRACE:
            raise InvalidArgument(f"'grace_period' must be between 0 and {MAX_DRAIN_GRACE}", reason="INVALID_GRACE",
                                  field="grace_period")
        # In the store first, for every replica holding a stream of the agent; then here at once.
        drain = await self._cp.blocking(functools.partial(
            self._cp.store.request_drain, row.agent_id, reason=request.reason or f"drained by {principal.name}",
            grace=grace, exit_after=True, by=principal.label))
        if session is not None:
            self._cp.apply_drain(session, drain)
        await self._cp.changes.publish(AGENT_DRAIN, agent_id=row.agent_id)
        observe.record(group=row.group_name, agent_id=row.agent_id,
                       detail=request.reason[:200])
        return agents_pb2.DrainAgentResponse(agent=agent_message(row, session, streams))

    @errors.unary
    async def RevokeAgent(self, request: agents_pb2.RevokeAgentRequest, context: Context) -> agents_pb2.RevokeAgentResponse:
        principal = await self._cp.authenticate(context)
        self._cp.require_admin(principal)
        row = await self._agent(principal, request.agent_id)
        row = await self._cp.blocking(self._cp.store.revoke_agent, row.agent_id, request.reason or "revoked by operator")
        session = self._cp.registry.get(row.agent_id)
        if session is not None:
            session.close(f"revoked: {row.revoked_reason}")
        await self._cp.changes.publish(AGENT_REVOKED, agent_id=row.agent_id)
        observe.record(group=row.group_name, agent_id=row.agent_id,
                       detail=request.reason[:200])
        return agents_pb2.RevokeAgentResponse(agent=agent_message(row, None))

    @errors.unary
    async def ListReplicas(
        self, request: agents_pb2.ListReplicasRequest, context: Context
    ) -> agents_pb2.ListReplicasResponse:
        await self._cp.authenticate(context)
        membership = self._cp.membership
        rows = await self._cp.blocking(self._cp.store.live_replicas, membership.max_age)
        response = agents_pb2.ListReplicasResponse(answered_by=membership.identity.replica_id)
        for row in rows:
            replica = response.replicas.add(
                replica_id=row.replica_id, agent_address=row.agent_address, operator_address=row.operator_address,
                version=row.version, state=_REPLICA_STATES.get(row.state, agents_pb2.REPLICA_STATE_UNSPECIFIED))
            replica.started_at.FromDatetime(row.started_at)
            replica.heartbeat_at.FromDatetime(row.heartbeat_at)
        return response


_REPLICA_STATES = {SERVING: agents_pb2.REPLICA_STATE_SERVING, DRAINING: agents_pb2.REPLICA_STATE_DRAINING}
