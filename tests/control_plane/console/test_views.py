"""What the pages show of an agent, from the API's own `Agent` message."""

from __future__ import annotations

import datetime as dt

from onprem.control_plane.console.views import agent_view, group_views
from onprem.v1 import agents_pb2, profiles_pb2

NOW = dt.datetime(2030, 1, 2, 12, 0, tzinfo=dt.UTC)
VALIDITY = dt.timedelta(days=30)
DB, FOLDER, APP = profiles_pb2.PROFILE_KIND_DATABASE, profiles_pb2.PROFILE_KIND_FOLDER, profiles_pb2.PROFILE_KIND_APP


def agent(state: agents_pb2.AgentState = agents_pb2.AGENT_STATE_ACTIVE, *, expires_in: dt.timedelta = dt.timedelta(days=20),
          health: list[profiles_pb2.ProfileHealth] | None = None, group: str = "plant") -> agents_pb2.Agent:
    message = agents_pb2.Agent(
        agent_id="agent-1", name="erp-host", group=group, state=state, hostname="erp.internal", version="0.1.0",
        in_flight=3, max_in_flight=64,
        profiles=[profiles_pb2.Profile(name="erp", kind=DB, read_only=True),
                  profiles_pb2.Profile(name="exports", kind=FOLDER),
                  profiles_pb2.Profile(name="crm", kind=APP)],
        profile_health=health or [])
    message.certificate_expires_at.FromDatetime(NOW + expires_in)
    message.last_seen_at.FromDatetime(NOW - dt.timedelta(seconds=4))
    message.uptime.FromTimedelta(dt.timedelta(hours=2))
    return message


def healthy(name: str, kind: profiles_pb2.ProfileKind) -> profiles_pb2.ProfileHealth:
    h = profiles_pb2.ProfileHealth(profile=name, kind=kind, ok=True,
                                   checks=[profiles_pb2.ProfileCheck(name="reachable", ok=True, message="ok")])
    h.checked_at.FromDatetime(NOW - dt.timedelta(seconds=30))
    return h


def test_an_active_agent_shows_its_numbers_and_each_profiles_health() -> None:
    view = agent_view(agent(health=[healthy("erp", DB), healthy("exports", FOLDER), healthy("crm", APP)]), VALIDITY, NOW)
    assert (view.state, view.in_flight, view.max_in_flight, view.uptime) == ("active", 3, 64, dt.timedelta(hours=2))
    assert view.last_seen == NOW - dt.timedelta(seconds=4)
    assert [(p.kind, p.name, p.health, p.read_only) for p in view.profiles] == [
        ("database", "erp", "healthy", True), ("folder", "exports", "healthy", False), ("app", "crm", "healthy", False)]
    assert view.profiles[0].checked_at == NOW - dt.timedelta(seconds=30)
    assert view.attention == []


def test_a_failing_check_is_the_profiles_message() -> None:
    failing = profiles_pb2.ProfileHealth(profile="erp", kind=DB, ok=False, checks=[
        profiles_pb2.ProfileCheck(name="reachable", ok=True, message="connected"),
        profiles_pb2.ProfileCheck(name="credentials", ok=False,
                                  message='password authentication failed for user "reader"')])
    view = agent_view(agent(health=[failing]), VALIDITY, NOW)
    erp = view.profiles[0]
    assert (erp.health, erp.message) == ("failing", 'credentials: password authentication failed for user "reader"')
    assert [c.name for c in erp.checks] == ["reachable", "credentials"]
    assert view.attention == ["1 profile failing"]


def test_a_warning_leaves_the_profile_healthy_but_says_so() -> None:
    warned = profiles_pb2.ProfileHealth(profile="erp", kind=DB, ok=True, checks=[
        profiles_pb2.ProfileCheck(name="read-only role", ok=True, warning=True, message="the role can write")])
    erp = agent_view(agent(health=[warned]), VALIDITY, NOW).profiles[0]
    assert (erp.health, erp.message) == ("warning", "read-only role: the role can write")


def test_profiles_without_a_report_are_unchecked_while_connected_and_unknown_when_lost() -> None:
    assert {p.health for p in agent_view(agent(), VALIDITY, NOW).profiles} == {"unchecked"}
    lost = agent_view(agent(agents_pb2.AGENT_STATE_INACTIVE), VALIDITY, NOW)
    assert {p.health for p in lost.profiles} == {"unknown"}
    assert (lost.state, lost.connected, lost.attention) == ("lost", False, ["lost: not connected"])


def test_states_have_the_consoles_words() -> None:
    words = [agent_view(agent(s), VALIDITY, NOW).state for s in (
        agents_pb2.AGENT_STATE_ACTIVE, agents_pb2.AGENT_STATE_DRAINING, agents_pb2.AGENT_STATE_INACTIVE,
        agents_pb2.AGENT_STATE_REVOKED, agents_pb2.AGENT_STATE_UNSPECIFIED)]
    assert words == ["active", "draining", "lost", "revoked", "unknown"]


def test_a_certificate_is_near_its_expiry_with_a_quarter_of_its_life_left() -> None:
    # Agents renew at two thirds of the life: a quarter left (7.5 of 30 days) means renewals fail.
    assert not agent_view(agent(expires_in=dt.timedelta(days=7, hours=13)), VALIDITY, NOW).cert_near
    near = agent_view(agent(expires_in=dt.timedelta(days=7, hours=11)), VALIDITY, NOW)
    assert near.cert_near and near.attention == ["certificate expires soon"]
    assert agent_view(agent(agents_pb2.AGENT_STATE_REVOKED, expires_in=dt.timedelta(0)), VALIDITY, NOW).attention == []


def test_groups_count_states_and_gather_profiles_of_agents_not_revoked() -> None:
    group = agents_pb2.Group(name="plant")
    group.created_at.FromDatetime(NOW)
    views = [agent_view(agent(s), VALIDITY, NOW) for s in (
        agents_pb2.AGENT_STATE_ACTIVE, agents_pb2.AGENT_STATE_ACTIVE, agents_pb2.AGENT_STATE_DRAINING,
        agents_pb2.AGENT_STATE_INACTIVE, agents_pb2.AGENT_STATE_REVOKED)]
    [g] = group_views([group], views)
    assert (g.agents, g.active, g.draining, g.lost, g.revoked) == (4, 2, 1, 1, 1)
    assert g.profiles == {"app": ["crm"], "database": ["erp"], "folder": ["exports"]}
