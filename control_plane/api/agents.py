"""`onprem.v1.AgentService`: agents, groups and enrollment tokens (the work itself is `fleet`'s, which the
console shares)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
from google.protobuf.message import Message

from onprem.control_plane import fleet
from onprem.control_plane.api import errors
from onprem.control_plane.core import ControlPlane
from onprem.control_plane.store import DRAINING, SERVING
from onprem.tunnel.errors import InvalidArgument
from onprem.v1 import agents_pb2, agents_pb2_grpc, profiles_pb2, tunnel_pb2

Context = grpc.aio.ServicerContext[Any, Any]


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


class AgentService(agents_pb2_grpc.AgentServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp

    @errors.unary
    async def ListAgents(self, request: agents_pb2.ListAgentsRequest, context: Context) -> agents_pb2.ListAgentsResponse:
        principal = await self._cp.authenticate(context)
        return agents_pb2.ListAgentsResponse(agents=await fleet.list_agents(self._cp, principal, request.group or None))

    @errors.unary
    async def GetAgent(self, request: agents_pb2.GetAgentRequest, context: Context) -> agents_pb2.GetAgentResponse:
        principal = await self._cp.authenticate(context)
        return agents_pb2.GetAgentResponse(agent=await fleet.get_agent(self._cp, principal, request.agent_id))

    @errors.unary
    async def ListGroups(self, request: agents_pb2.ListGroupsRequest, context: Context) -> agents_pb2.ListGroupsResponse:
        principal = await self._cp.authenticate(context)
        return agents_pb2.ListGroupsResponse(groups=await fleet.list_groups(self._cp, principal))

    @errors.unary
    async def CreateEnrollmentToken(
        self, request: agents_pb2.CreateEnrollmentTokenRequest, context: Context
    ) -> agents_pb2.CreateEnrollmentTokenResponse:
        principal = await self._cp.authenticate(context)
        self._cp.require_admin(principal)
        ttl = duration(request, "ttl", fleet.DEFAULT_TOKEN_TTL, maximum=fleet.MAX_TOKEN_TTL, reason="INVALID_TTL")
        token, row = await fleet.create_enrollment_token(self._cp, principal, request.group, ttl, request.description)
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
        grace = duration(request, "grace_period", fleet.DEFAULT_DRAIN_GRACE, maximum=fleet.MAX_DRAIN_GRACE,
                         reason="INVALID_GRACE")
        agent = await fleet.drain_agent(self._cp, principal, request.agent_id, reason=request.reason, grace=grace)
        return agents_pb2.DrainAgentResponse(agent=agent)

    @errors.unary
    async def RevokeAgent(self, request: agents_pb2.RevokeAgentRequest, context: Context) -> agents_pb2.RevokeAgentResponse:
        principal = await self._cp.authenticate(context)
        agent = await fleet.revoke_agent(self._cp, principal, request.agent_id, reason=request.reason)
        return agents_pb2.RevokeAgentResponse(agent=agent)

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
