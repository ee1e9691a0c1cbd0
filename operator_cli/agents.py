"""`onprem agents|groups|replicas`: the fleet through `AgentService`.

    onprem agents [list] [--group G] [--format table|json|jsonl|csv] [--json]
    onprem agents get AGENT_ID [--format table|json]
    onprem agents check GROUP PROFILE [--kind database|folder|app] [--format table|json]
    onprem agents drain AGENT_ID [--grace 30s] [--reason TEXT] [--format text|json]     (admin)
    onprem agents revoke AGENT_ID [--reason TEXT] [--format text|json]                  (admin)
    onprem groups [--format ...] [--json]
    onprem replicas [--format ...]

`onprem agents` alone lists, as it always did. `agents check` exits 10 when a check failed, so that a script can
act on it; without --kind it finds the profile's kind in the group's agents (names are unique per kind).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from onprem.operator_cli.commands import CommandMaker
from onprem.operator_cli.errors import EXIT_NOT_FOUND, EXIT_OK, EXIT_UNHEALTHY, CliError, UsageError
from onprem.operator_cli.output import (
    FORMAT_HELP,
    FORMATS,
    Column,
    format_time,
    render_table,
    to_json,
    write_records,
)
from onprem.operator_cli.tokens import parse_duration
from onprem.v1 import agents_pb2, agents_pb2_grpc, profiles_pb2

if TYPE_CHECKING:
    from onprem.operator_cli.main import Connection

KINDS = {"database": profiles_pb2.PROFILE_KIND_DATABASE, "folder": profiles_pb2.PROFILE_KIND_FOLDER,
         "app": profiles_pb2.PROFILE_KIND_APP}


def _state(agent: agents_pb2.Agent) -> str:
    return agents_pb2.AgentState.Name(agent.state).removeprefix("AGENT_STATE_")


def _kind(kind: int) -> str:
    return profiles_pb2.ProfileKind.Name(kind).removeprefix("PROFILE_KIND_").lower()


AGENT_COLUMNS: list[Column[agents_pb2.Agent]] = [
    Column("NAME", lambda a: a.name),
    Column("ID", lambda a: a.agent_id),
    Column("GROUP", lambda a: a.group),
    Column("STATE", _state),
    Column("VERSION", lambda a: a.version or "-"),
    Column("IN-FLIGHT", lambda a: f"{a.in_flight}/{a.max_in_flight}", right=True),
    Column("LAST SEEN", lambda a: format_time(a.last_seen_at)),
    Column("CERT EXPIRES", lambda a: format_time(a.certificate_expires_at)),
]

GROUP_COLUMNS: list[Column[agents_pb2.Group]] = [
    Column("NAME", lambda g: g.name),
    Column("AGENTS", lambda g: str(g.agent_count), right=True),
    Column("ACTIVE", lambda g: str(g.active_agent_count), right=True),
    Column("CREATED", lambda g: format_time(g.created_at)),
]

REPLICA_COLUMNS: list[Column[agents_pb2.ControlPlaneReplica]] = [
    Column("ID", lambda r: r.replica_id),
    Column("STATE", lambda r: agents_pb2.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_")),
    Column("VERSION", lambda r: r.version or "-"),
    Column("AGENT ADDRESS", lambda r: r.agent_address or "-"),
    Column("OPERATOR ADDRESS", lambda r: r.operator_address or "-"),
    Column("STARTED", lambda r: format_time(r.started_at)),
    Column("HEARTBEAT", lambda r: format_time(r.heartbeat_at)),
]


def agents_table(agents: list[agents_pb2.Agent]) -> str:
    return render_table([c.header for c in AGENT_COLUMNS], [[c.cell(a) for c in AGENT_COLUMNS] for a in agents],
                        [c.right for c in AGENT_COLUMNS])


def _stub(conn: Connection) -> agents_pb2_grpc.AgentServiceStub:
    return agents_pb2_grpc.AgentServiceStub(conn.channel)


def _list_format(args: argparse.Namespace) -> str:
    # --json is the older spelling of --format json; scripts use it.
    return "json" if getattr(args, "json", False) else getattr(args, "format", None) or "table"


def cmd_agents(conn: Connection, args: argparse.Namespace) -> int:
    response = _stub(conn).ListAgents(agents_pb2.ListAgentsRequest(group=getattr(args, "group", None) or ""),
                                      metadata=conn.metadata, timeout=conn.timeout)
    write_records(sys.stdout, _list_format(args), response.agents, AGENT_COLUMNS, response)
    return EXIT_OK


def cmd_groups(conn: Connection, args: argparse.Namespace) -> int:
    response = _stub(conn).ListGroups(agents_pb2.ListGroupsRequest(), metadata=conn.metadata, timeout=conn.timeout)
    write_records(sys.stdout, _list_format(args), response.groups, GROUP_COLUMNS, response)
    return EXIT_OK


def cmd_replicas(conn: Connection, args: argparse.Namespace) -> int:
    response = _stub(conn).ListReplicas(agents_pb2.ListReplicasRequest(), metadata=conn.metadata,
                                        timeout=conn.timeout)
    write_records(sys.stdout, args.format, response.replicas, REPLICA_COLUMNS, response)
    return EXIT_OK


def _profiles_table(agent: agents_pb2.Agent) -> str:
    health = {(h.profile, h.kind): h for h in agent.profile_health}
    rows = []
    for p in agent.profiles:
        h = health.get((p.name, p.kind))
        rows.append([p.name, _kind(p.kind), "yes" if p.read_only else "no", p.dialect or "-",
                     "-" if h is None else "ok" if h.ok else "FAILING", "-" if h is None else format_time(h.checked_at)])
    return render_table(["PROFILE", "KIND", "READ-ONLY", "DIALECT", "HEALTH", "CHECKED"], rows)


def cmd_get(conn: Connection, args: argparse.Namespace) -> int:
    response = _stub(conn).GetAgent(agents_pb2.GetAgentRequest(agent_id=args.agent_id), metadata=conn.metadata,
                                    timeout=conn.timeout)
    if args.format == "json":
        sys.stdout.write(to_json(response) + "\n")
    else:
        sys.stdout.write(agents_table([response.agent]) + "\n" + _profiles_table(response.agent))
    return EXIT_OK


def _find_kind(conn: Connection, group: str, profile: str) -> int:
    """The kind of the group's profile of that name, from the agents' advertised profiles."""
    agents = _stub(conn).ListAgents(agents_pb2.ListAgentsRequest(group=group), metadata=conn.metadata,
                                    timeout=conn.timeout).agents
    kinds = sorted({p.kind for a in agents for p in a.profiles if p.name == profile})
    if len(kinds) > 1:
        raise UsageError(f"group '{group}' has a {' and a '.join(_kind(k) for k in kinds)} profile named "
                         f"'{profile}': pass --kind")
    if not kinds:
        offered = ", ".join(sorted({p.name for a in agents for p in a.profiles})) or "none"
        raise CliError("NOT_FOUND", f"no agent of group '{group}' offers a profile named '{profile}' "
                       f"(offered: {offered})", EXIT_NOT_FOUND)
    return kinds[0]


def cmd_check(conn: Connection, args: argparse.Namespace) -> int:
    kind = KINDS[args.kind] if args.kind else _find_kind(conn, args.group, args.profile)
    response = _stub(conn).CheckProfile(
        profiles_pb2.CheckProfileRequest(group=args.group, profile=args.profile, kind=kind),  # type: ignore[arg-type]
        metadata=conn.metadata, timeout=conn.timeout)
    if args.format == "json":
        sys.stdout.write(to_json(response) + "\n")
    else:
        rows = [[c.name, "ok" if c.ok and not c.warning else "WARNING" if c.ok else "FAILED", c.message]
                for c in response.checks]
        sys.stdout.write(render_table(["CHECK", "RESULT", "MESSAGE"], rows))
        print(f"{args.group}/{args.profile} ({_kind(kind)}) on {response.agent_id}: "
              f"{'healthy' if response.ok else 'UNHEALTHY'}")
    if not response.ok:
        raise CliError("UNHEALTHY", f"a check of {args.group}/{args.profile} failed", EXIT_UNHEALTHY)
    return EXIT_OK


def cmd_drain(conn: Connection, args: argparse.Namespace) -> int:
    request = agents_pb2.DrainAgentRequest(agent_id=args.agent_id, reason=args.reason)
    if args.grace:
        try:
            request.grace_period.FromTimedelta(parse_duration(args.grace))
        except ValueError as e:
            raise UsageError(str(e)) from None
    response = _stub(conn).DrainAgent(request, metadata=conn.metadata, timeout=conn.timeout)
    if args.format == "json":
        sys.stdout.write(to_json(response) + "\n")
    else:
        a = response.agent
        print(f"agent {a.name} ({a.agent_id}) of group {a.group} is {_state(a)}: it takes no new requests and "
              f"stops once those in flight finish (within {args.grace or '30s'})")
    return EXIT_OK


def cmd_revoke(conn: Connection, args: argparse.Namespace) -> int:
    response = _stub(conn).RevokeAgent(agents_pb2.RevokeAgentRequest(agent_id=args.agent_id, reason=args.reason),
                                       metadata=conn.metadata, timeout=conn.timeout)
    if args.format == "json":
        sys.stdout.write(to_json(response) + "\n")
    else:
        a = response.agent
        print(f"agent {a.name} ({a.agent_id}) of group {a.group} is {_state(a)}: its stream is cut and it can "
              "never connect again")
    return EXIT_OK


def _list_options(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("--format", choices=FORMATS, default=default, help=FORMAT_HELP)
    p.add_argument("--json", action="store_true", default=default, help="the same as --format json")


def add_commands(command: CommandMaker) -> None:
    p = command("agents", "list agents as a table: name, id, group, state, version, in-flight, last seen, "
                "certificate expiry (times in UTC); its subcommands describe, check, drain and revoke agents",
                cmd_agents, ["onprem agents --group demo", "onprem agents --format csv > agents.csv",
                             "onprem agents drain agent-3495d40a419ec1f6 --grace 60s --reason 'OS upgrade'"])
    p.add_argument("--group", help="only the agents of this group")
    _list_options(p, None)
    family = command.family(p, required=False)

    p = family("list", "list agents (the same as `onprem agents`)", cmd_agents,
               ["onprem agents list --group demo --format jsonl"])
    p.add_argument("--group", default=argparse.SUPPRESS, help="only the agents of this group")
    _list_options(p, argparse.SUPPRESS)

    p = family("get", "describe one agent and its profiles with their latest health", cmd_get,
               ["onprem agents get agent-3495d40a419ec1f6", "onprem agents get agent-3495d40a419ec1f6 --format json"])
    p.add_argument("agent_id", help="the agent's id, as `onprem agents` shows it")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="table (default) or json (the GetAgent response)")

    p = family("check", "have an agent of a group check a profile now (reachable, credentials, ...); exit 10 when "
               "a check failed", cmd_check,
               ["onprem agents check demo demo-db", "onprem agents check demo demo-app --kind app --format json"])
    p.add_argument("group")
    p.add_argument("profile")
    p.add_argument("--kind", choices=sorted(KINDS), help="the profile's kind (default: found in the group's agents)")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="table (default) or json (the CheckProfile response)")

    p = family("drain", "drain an agent (admin only): it takes no new requests, finishes those in flight within "
               "the grace period, then stops", cmd_drain,
               ["onprem agents drain agent-3495d40a419ec1f6",
                "onprem agents drain agent-3495d40a419ec1f6 --grace 5m --reason 'move to new host'"])
    p.add_argument("agent_id", help="the agent's id, as `onprem agents` shows it")
    p.add_argument("--grace", help="how long requests in flight may take, e.g. 30s or 5m (default 30s, at most 1h)")
    p.add_argument("--reason", default="", help="why, for the audit log")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="text (default) or json (the DrainAgent response)")

    p = family("revoke", "revoke an agent (admin only): its stream is cut and it can never connect again; this "
               "cannot be undone", cmd_revoke,
               ["onprem agents revoke agent-3495d40a419ec1f6 --reason 'host decommissioned'"])
    p.add_argument("agent_id", help="the agent's id, as `onprem agents` shows it")
    p.add_argument("--reason", default="", help="why, for the audit log")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="text (default) or json (the RevokeAgent response)")

    p = command("groups", "list groups with their agent counts", cmd_groups,
                ["onprem groups", "onprem groups --format jsonl"])
    _list_options(p, None)

    p = command("replicas", "list the control plane's live replicas (any token may)", cmd_replicas,
                ["onprem replicas", "onprem replicas --format json"])
    p.add_argument("--format", choices=FORMATS, default="table", help=FORMAT_HELP)
