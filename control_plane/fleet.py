"""What operators see of the agents and do to them, whichever door they come through.

The operator API (`api/agents.py`) and the web console (`console/`) both call these: the same
scoping (a token sees and touches only the agents of its groups; another group's agent is
NOT_FOUND, as if it did not exist), the same checks and errors, and the same audit notes
(`observe.record`, which leaves a row when the caller's observation ends well). Each function
expects to run inside an observation of the call (the API's guard, the console's action handler)
with an authenticated principal; none reads gRPC metadata, so that the console, which has no gRPC
call, can use them as they are. Store calls go off the event loop through `ControlPlane.blocking`.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence

from onprem.control_plane import observe
from onprem.control_plane import store as store_mod
from onprem.control_plane.auth import Principal
from onprem.control_plane.changes import AGENT_DRAIN, AGENT_REVOKED
from onprem.control_plane.core import ControlPlane
from onprem.control_plane.sessions import AgentSession
from onprem.control_plane.store import AgentRow, AgentStreamRow, EnrollmentTokenRow
from onprem.tunnel import kinds
from onprem.tunnel.errors import FailedPrecondition, InvalidArgument, NotFound
from onprem.v1 import agents_pb2

DEFAULT_DRAIN_GRACE = dt.timedelta(seconds=30)
MAX_DRAIN_GRACE = dt.timedelta(hours=1)
DEFAULT_TOKEN_TTL = dt.timedelta(hours=1)
MAX_TOKEN_TTL = dt.timedelta(days=7)
MAX_DESCRIPTION = 500
#: How much of an admin's reason an audit row keeps.
AUDIT_REASON_MAX = 200


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
        agent.protocol_revision = session.conn.protocol_revision
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


async def streams_of(cp: ControlPlane, agent_ids: list[str]) -> dict[str, list[AgentStreamRow]]:
    """The agents' streams on live replicas, as the store has them."""
    if not agent_ids:
        return {}
    return await cp.blocking(cp.store.streams_of, agent_ids, cp.membership.max_age)


async def find_agent(cp: ControlPlane, principal: Principal, agent_id: str) -> AgentRow:
    """The agent's row; NOT_FOUND for an unknown agent and for one of a group the token may not use."""
    if not agent_id:
        raise InvalidArgument("'agent_id' is required", reason="MISSING_AGENT_ID", field="agent_id")
    row = await cp.blocking(cp.store.get_agent, agent_id)
    if row is None or not principal.may_use_group(row.group_name):
        raise NotFound(f"no agent has the id '{agent_id}'", reason="AGENT_NOT_FOUND")
    return row


async def list_agents(cp: ControlPlane, principal: Principal, group: str | None = None) -> list[agents_pb2.Agent]:
    """The agents the token may see (of `group` only, if given: PERMISSION_DENIED if it may not use it)."""
    if group:
        cp.require_group(principal, group)
    rows = [row for row in await cp.blocking(cp.store.list_agents, group or None)
            if principal.may_use_group(row.group_name)]
    streams = await streams_of(cp, [row.agent_id for row in rows])
    return [agent_message(row, cp.registry.get(row.agent_id), streams.get(row.agent_id, ())) for row in rows]


async def get_agent(cp: ControlPlane, principal: Principal, agent_id: str) -> agents_pb2.Agent:
    row = await find_agent(cp, principal, agent_id)
    streams = await streams_of(cp, [row.agent_id])
    return agent_message(row, cp.registry.get(row.agent_id), streams.get(row.agent_id, ()))


async def list_groups(cp: ControlPlane, principal: Principal) -> list[agents_pb2.Group]:
    """The groups the token may use, by name, with their enrolled (not revoked) and active agents."""
    groups = await cp.blocking(cp.store.list_groups)
    agents = await cp.blocking(cp.store.list_agents, None)
    result = []
    for g in groups:
        if not principal.may_use_group(g.name):
            continue
        members = [a for a in agents if a.group_name == g.name and not a.revoked]
        active = [s for s in cp.registry.in_group(g.name) if not s.draining]
        group = agents_pb2.Group(name=g.name, agent_count=len(members), active_agent_count=len(active))
        group.created_at.FromDatetime(g.created_at)
        result.append(group)
    return result


async def create_enrollment_token(cp: ControlPlane, principal: Principal, group: str, ttl: dt.timedelta,
                                  description: str = "") -> tuple[str, EnrollmentTokenRow]:
    """A single-use enrollment token for `group` (made if new), valid for `ttl`; admin only."""
    cp.require_admin(principal)
    try:
        store_mod.validate_group_name(group)
    except ValueError as exc:
        raise InvalidArgument(f"'group': {exc}", reason="INVALID_GROUP", field="group") from None
    cp.require_group(principal, group)
    if not dt.timedelta(0) < ttl <= MAX_TOKEN_TTL:
        raise InvalidArgument(f"'ttl' must be more than 0 and at most {MAX_TOKEN_TTL}", reason="INVALID_TTL", field="ttl")
    if len(description) > MAX_DESCRIPTION:
        raise InvalidArgument(f"'description' must be at most {MAX_DESCRIPTION} characters",
                              reason="INVALID_DESCRIPTION", field="description")
    token, row = await cp.blocking(functools.partial(
        cp.store.create_enrollment_token, group, ttl, description, created_by=principal.label))
    observe.record(group=group, detail=f"token {row.token_id}")
    return token, row


async def drain_agent(cp: ControlPlane, principal: Principal, agent_id: str, *, reason: str = "",
                      grace: dt.timedelta = DEFAULT_DRAIN_GRACE) -> agents_pb2.Agent:
    """Drain a connected agent on every replica holding a stream of it, then it exits; admin only."""
    cp.require_admin(principal)
    row = await find_agent(cp, principal, agent_id)
    session = cp.registry.get(row.agent_id)
    if session is not None and not session.is_open:
        session = None
    streams = (await streams_of(cp, [row.agent_id])).get(row.agent_id, [])
    if session is None and not streams:
        raise FailedPrecondition(f"agent '{row.agent_id}' is not connected, so there is nothing to drain",
                                 reason="AGENT_NOT_CONNECTED")
    if not dt.timedelta(0) <= grace <= MAX_DRAIN_GRACE:
        raise InvalidArgument(f"'grace_period' must be between 0 and {MAX_DRAIN_GRACE}", reason="INVALID_GRACE",
                              field="grace_period")
    # In the store first, for every replica holding a stream of the agent; then here at once.
    drain = await cp.blocking(functools.partial(
        cp.store.request_drain, row.agent_id, reason=reason or f"drained by {principal.name}",
        grace=grace, exit_after=True, by=principal.label))
    if session is not None:
        cp.apply_drain(session, drain)
    await cp.changes.publish(AGENT_DRAIN, agent_id=row.agent_id)
    observe.record(group=row.group_name, agent_id=row.agent_id, detail=reason[:AUDIT_REASON_MAX])
    return agent_message(row, session, streams)


async def revoke_agent(cp: ControlPlane, principal: Principal, agent_id: str, *, reason: str = "") -> agents_pb2.Agent:
    """Revoke an agent for good: its stream is cut here and on every replica; admin only."""
    cp.require_admin(principal)
    row = await find_agent(cp, principal, agent_id)
    row = await cp.blocking(cp.store.revoke_agent, row.agent_id, reason or "revoked by operator")
    session = cp.registry.get(row.agent_id)
    if session is not None:
        session.close(f"revoked: {row.revoked_reason}")
    await cp.changes.publish(AGENT_REVOKED, agent_id=row.agent_id)
    observe.record(group=row.group_name, agent_id=row.agent_id, detail=reason[:AUDIT_REASON_MAX])
    return agent_message(row, None)
