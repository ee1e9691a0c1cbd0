"""What the console's pages show, built from what the API returns (`fleet`) and the audit log.

Plain frozen dataclasses, free of HTTP, so that the pages' contents are tested without a server or a
browser. Everything an agent told us (names, host names, versions, profile names, health messages)
stays a plain string here: the templates escape it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field

from onprem.control_plane import fleet
from onprem.control_plane.auth import Principal
from onprem.control_plane.console import charts
from onprem.control_plane.core import ControlPlane
from onprem.control_plane.store import ALL_GROUPS, AuditEntry
from onprem.tunnel import kinds
from onprem.tunnel.errors import Code
from onprem.v1 import agents_pb2

#: The console's words for the API's agent states: an inactive agent is one the control plane lost.
STATES = {
    agents_pb2.AGENT_STATE_ACTIVE: "active",
    agents_pb2.AGENT_STATE_DRAINING: "draining",
    agents_pb2.AGENT_STATE_INACTIVE: "lost",
    agents_pb2.AGENT_STATE_REVOKED: "revoked",
}
#: The kinds of audit rows that are data requests (the activity charts count these).
DATA_KINDS = frozenset(kind.name for kind in kinds.KINDS)
#: Agents renew their certificate two thirds into its life; with a quarter left, renewals are failing.
CERT_NEAR_FRACTION = 0.25
#: Audit rows shown on the activity page.
AUDIT_ROWS = 100
#: The outcomes the activity page filters on, as the audit log names them.
OUTCOMES = tuple(code.name for code in Code)


@dataclass(frozen=True)
class CheckView:
    name: str
    ok: bool
    warning: bool
    message: str


@dataclass(frozen=True)
class ProfileView:
    kind: str
    name: str
    read_only: bool
    #: "healthy", "warning", "failing", "unchecked" (connected, no report yet) or "unknown" (not connected).
    health: str
    #: What to read first: the first failed check's message (or warning's), else "".
    message: str = ""
    checks: tuple[CheckView, ...] = ()
    checked_at: dt.datetime | None = None


@dataclass(frozen=True)
class AgentView:
    agent_id: str
    name: str
    group: str
    state: str
    hostname: str
    version: str
    uptime: dt.timedelta | None
    in_flight: int
    max_in_flight: int
    last_seen: dt.datetime | None
    cert_expires_at: dt.datetime
    cert_near: bool
    profiles: tuple[ProfileView, ...]
    replica_ids: tuple[str, ...] = ()
    #: The tunnel protocol revision of its stream here; 0 when not connected to this replica.
    protocol_revision: int = 0

    @property
    def connected(self) -> bool:
        return self.state in ("active", "draining")

    @property
    def failing(self) -> tuple[ProfileView, ...]:
        return tuple(p for p in self.profiles if p.health == "failing")

    @property
    def attention(self) -> list[str]:
        """What an operator should look at, in words; empty for a healthy agent."""
        notes = []
        if self.state == "lost":
            notes.append("lost: not connected")
        if self.failing:
            notes.append(f"{len(self.failing)} profile{'s' if len(self.failing) > 1 else ''} failing")
        if self.cert_near and self.state != "revoked":
            notes.append("certificate expires soon")
        return notes


@dataclass(frozen=True)
class GroupView:
    name: str
    created_at: dt.datetime
    agents: int
    active: int
    draining: int
    lost: int
    revoked: int
    #: The profiles the group's agents offer, by kind ("database", "folder", "app"), names sorted.
    profiles: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Fleet:
    groups: list[GroupView]
    agents: list[AgentView]

    @property
    def needing_attention(self) -> list[AgentView]:
        return [a for a in self.agents if a.attention]


def _time(message: agents_pb2.Agent, name: str) -> dt.datetime | None:
    return getattr(message, name).ToDatetime(dt.UTC) if message.HasField(name) else None


def profile_views(agent: agents_pb2.Agent) -> tuple[ProfileView, ...]:
    health = {(h.kind, h.profile): h for h in agent.profile_health}
    connected = agent.state in (agents_pb2.AGENT_STATE_ACTIVE, agents_pb2.AGENT_STATE_DRAINING)
    views = []
    for p in sorted(agent.profiles, key=lambda p: (p.kind, p.name)):
        kind = kinds.name_of(p.kind)
        h = health.get((p.kind, p.name))
        if h is None:
            views.append(ProfileView(kind=kind, name=p.name, read_only=p.read_only,
                                     health="unchecked" if connected else "unknown"))
            continue
        checks = tuple(CheckView(c.name, c.ok, c.warning, c.message) for c in h.checks)
        failed = [c for c in checks if not c.ok]
        warned = [c for c in checks if c.warning]
        state = "failing" if not h.ok or failed else "warning" if warned else "healthy"
        first = failed[0] if failed else warned[0] if warned else None
        message = f"{first.name}: {first.message}" if first is not None else ""
        views.append(ProfileView(kind=kind, name=p.name, read_only=p.read_only, health=state, message=message,
                                 checks=checks, checked_at=h.checked_at.ToDatetime(dt.UTC) if h.HasField("checked_at")
                                 else None))
    return tuple(views)


def agent_view(agent: agents_pb2.Agent, cert_validity: dt.timedelta, now: dt.datetime) -> AgentView:
    expires = agent.certificate_expires_at.ToDatetime(dt.UTC)
    return AgentView(
        agent_id=agent.agent_id,
        name=agent.name,
        group=agent.group,
        state=STATES.get(agent.state, "unknown"),
        hostname=agent.hostname,
        version=agent.version,
        uptime=agent.uptime.ToTimedelta() if agent.HasField("uptime") else None,
        in_flight=agent.in_flight,
        max_in_flight=agent.max_in_flight,
        last_seen=_time(agent, "last_seen_at"),
        cert_expires_at=expires,
        cert_near=expires - now < cert_validity * CERT_NEAR_FRACTION,
        profiles=profile_views(agent),
        replica_ids=tuple(agent.replica_ids),
        protocol_revision=agent.protocol_revision,
    )


def group_views(groups: Iterable[agents_pb2.Group], agents: list[AgentView]) -> list[GroupView]:
    views = []
    for g in groups:
        members = [a for a in agents if a.group == g.name]
        count = {state: sum(1 for a in members if a.state == state) for state in STATES.values()}
        profiles: dict[str, set[str]] = {}
        for a in members:
            if a.state == "revoked":
                continue
            for p in a.profiles:
                profiles.setdefault(p.kind, set()).add(p.name)
        views.append(GroupView(
            name=g.name, created_at=g.created_at.ToDatetime(dt.UTC), agents=len(members) - count["revoked"],
            active=count["active"], draining=count["draining"], lost=count["lost"], revoked=count["revoked"],
            profiles={kind: sorted(names) for kind, names in sorted(profiles.items())}))
    return views


async def load_fleet(cp: ControlPlane, principal: Principal, group: str | None = None) -> Fleet:
    """The groups and agents the token may see (of `group` only, if given)."""
    now = dt.datetime.now(dt.UTC)
    messages = await fleet.list_agents(cp, principal, group)
    agents = [agent_view(m, cp.settings.agent_cert_validity, now) for m in messages]
    groups = [g for g in await fleet.list_groups(cp, principal) if group is None or g.name == group]
    return Fleet(groups=group_views(groups, agents), agents=agents)


def audit_scope(principal: Principal) -> frozenset[str] | None:
    """The groups whose audit rows the token may read; None: all rows (a token of every group)."""
    return None if ALL_GROUPS in principal.groups else frozenset(principal.groups)


@dataclass(frozen=True)
class Activity:
    charts: list[charts.Chart]
    rows: list[AuditEntry]
    groups: list[str]


async def load_activity(cp: ControlPlane, principal: Principal, *, group: str | None = None,
                        token_id: str | None = None, outcome: str | None = None,
                        now: dt.datetime | None = None) -> Activity:
    """Charts of the last hour per group, and the latest audit rows, of what the token may see."""
    now = now or dt.datetime.now(dt.UTC)
    if group is not None:
        cp.require_group(principal, group)
    scope = audit_scope(principal)
    visible = [g.name for g in await fleet.list_groups(cp, principal)]
    shown_groups = [group] if group is not None else visible
    activity = await cp.blocking(lambda: cp.store.audit_activity(
        charts.window_start(now), DATA_KINDS, groups=scope if group is None else {group}))
    rows = await cp.blocking(lambda: cp.store.list_audit(
        AUDIT_ROWS, groups=scope, group=group, token_id=token_id, outcome=outcome))
    return Activity(charts=charts.charts(activity, shown_groups, now), rows=rows, groups=visible)
