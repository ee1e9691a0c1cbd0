"""`onprem` token commands: list, create and revoke operator tokens; list and revoke enrollment tokens.

    onprem tokens [--json]
    onprem create-token NAME --groups a,b [--role operator|admin] [--ttl 30d]
    onprem revoke-token ID [--reason TEXT]
    onprem enrollment-tokens [list] [--group G] [--json]
    onprem enrollment-tokens create GROUP [--ttl 1h] [--description TEXT]   (AgentService/CreateEnrollmentToken)
    onprem enrollment-tokens revoke ID [--reason TEXT]   (also spelled revoke-enrollment-token ID)

All of them need an admin token. The tables are shared with `onprem-control-plane list-tokens`, which
prints the same rows from the store on the control plane's host.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from onprem.operator_cli.errors import EXIT_OK, UsageError
from onprem.v1 import agents_pb2, agents_pb2_grpc, tokens_pb2, tokens_pb2_grpc

if TYPE_CHECKING:
    from onprem.operator_cli.commands import CommandMaker
    from onprem.operator_cli.main import Connection

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """"90d", "12h", "30m", "45s" or plain seconds ("3600"); ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"invalid duration {text!r}: use e.g. 90d, 12h, 30m, 45s or seconds")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _time(ts: timestamp_pb2.Timestamp, unset: str = "-") -> str:
    if not ts.seconds and not ts.nanos:
        return unset
    return ts.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() + "\n"

    return line(headers) + "".join(line(r) for r in rows)


def tokens_table(tokens: Sequence[tokens_pb2.Token]) -> str:
    """One line per token: never its secret (no API returns it after creation)."""
    headers = ["NAME", "ID", "ROLE", "GROUPS", "STATE", "CREATED", "EXPIRES", "LAST USED"]
    rows = [[t.display_name, f"onp_{t.id}", tokens_pb2.TokenRole.Name(t.role).removeprefix("TOKEN_ROLE_").lower(),
             ",".join(t.groups), tokens_pb2.TokenState.Name(t.state).removeprefix("TOKEN_STATE_"),
             _time(t.created_at), _time(t.expires_at, "never"), _time(t.last_used_at, "never")]
            for t in tokens]
    return _table(headers, rows)


def enrollment_tokens_table(tokens: Sequence[tokens_pb2.EnrollmentToken]) -> str:
    headers = ["ID", "GROUP", "STATE", "CREATED", "EXPIRES", "USED BY", "DESCRIPTION"]
    rows = [[f"onpe_{t.id}", t.group,
             tokens_pb2.EnrollmentTokenState.Name(t.state).removeprefix("ENROLLMENT_TOKEN_STATE_"),
             _time(t.created_at), _time(t.expires_at), t.used_by_agent or "-", t.description]
            for t in tokens]
    return _table(headers, rows)


def to_json(message: Message) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2)


# --- commands --------------------------------------------------------------------------------------


class _Page(Protocol):
    next_page_token: str


def _pages(call: Callable[[str], _Page]) -> Iterator[_Page]:
    token = ""
    while True:
        page = call(token)
        yield page
        token = page.next_page_token
        if not token:
            return


def _stub(conn: Connection) -> tokens_pb2_grpc.TokenServiceStub:
    return tokens_pb2_grpc.TokenServiceStub(conn.channel)


def cmd_tokens(conn: Connection, args: argparse.Namespace) -> int:
    stub = _stub(conn)
    tokens: list[tokens_pb2.Token] = []
    for page in _pages(lambda t: stub.ListTokens(tokens_pb2.ListTokensRequest(page_token=t),
                                                 metadata=conn.metadata, timeout=conn.timeout)):
        assert isinstance(page, tokens_pb2.ListTokensResponse)
        tokens.extend(page.tokens)
    if args.json:
        sys.stdout.write(to_json(tokens_pb2.ListTokensResponse(tokens=tokens)) + "\n")
    else:
        sys.stdout.write(tokens_table(tokens))
    return EXIT_OK


def cmd_enrollment_tokens(conn: Connection, args: argparse.Namespace) -> int:
    stub = _stub(conn)
    tokens: list[tokens_pb2.EnrollmentToken] = []
    for page in _pages(lambda t: stub.ListEnrollmentTokens(
            tokens_pb2.ListEnrollmentTokensRequest(page_token=t, group=args.group or ""),
            metadata=conn.metadata, timeout=conn.timeout)):
        assert isinstance(page, tokens_pb2.ListEnrollmentTokensResponse)
        tokens.extend(page.enrollment_tokens)
    if args.json:
        sys.stdout.write(to_json(tokens_pb2.ListEnrollmentTokensResponse(enrollment_tokens=tokens)) + "\n")
    else:
        sys.stdout.write(enrollment_tokens_table(tokens))
    return EXIT_OK


def cmd_create_token(conn: Connection, args: argparse.Namespace) -> int:
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    role = tokens_pb2.TOKEN_ROLE_ADMIN if args.role == "admin" else tokens_pb2.TOKEN_ROLE_OPERATOR
    request = tokens_pb2.CreateTokenRequest(token=tokens_pb2.Token(display_name=args.name, role=role, groups=groups))
    if args.ttl:
        try:
            request.ttl.FromTimedelta(parse_duration(args.ttl))
        except ValueError as e:
            raise UsageError(str(e)) from None
    response = _stub(conn).CreateToken(request, metadata=conn.metadata, timeout=conn.timeout)
    token = response.token
    # The secret alone on stdout, so that `$(onprem create-token ...)` captures just it.
    print(response.secret, flush=True)  # before the note on stderr, also when both go to one pipe
    print(f"created {args.role} token '{token.display_name}' (onp_{token.id}) for groups {','.join(token.groups)}, "
          f"expires {_time(token.expires_at, 'never')}; it is shown only now", file=sys.stderr)
    return EXIT_OK


def cmd_revoke_token(conn: Connection, args: argparse.Namespace) -> int:
    response = _stub(conn).RevokeToken(tokens_pb2.RevokeTokenRequest(name=args.id, reason=args.reason),
                                       metadata=conn.metadata, timeout=conn.timeout)
    token = response.token
    print(f"revoked token '{token.display_name}' (onp_{token.id}) at {_time(token.revoked_at)}")
    return EXIT_OK


def cmd_revoke_enrollment_token(conn: Connection, args: argparse.Namespace) -> int:
    response = _stub(conn).RevokeEnrollmentToken(
        tokens_pb2.RevokeEnrollmentTokenRequest(name=args.id, reason=args.reason),
        metadata=conn.metadata, timeout=conn.timeout)
    token = response.enrollment_token
    print(f"revoked enrollment token onpe_{token.id} of group {token.group} at {_time(token.revoked_at)}")
    return EXIT_OK


def cmd_create_enrollment_token(conn: Connection, args: argparse.Namespace) -> int:
    request = agents_pb2.CreateEnrollmentTokenRequest(group=args.group, description=args.description)
    if args.ttl:
        try:
            request.ttl.FromTimedelta(parse_duration(args.ttl))
        except ValueError as e:
            raise UsageError(str(e)) from None
    response = agents_pb2_grpc.AgentServiceStub(conn.channel).CreateEnrollmentToken(
        request, metadata=conn.metadata, timeout=conn.timeout)
    # The token alone on stdout, for `onprem-agent enroll --token "$(onprem enrollment-tokens create G)"`.
    print(response.token, flush=True)
    print(f"created an enrollment token for group {response.group}, single use, expires "
          f"{_time(response.expires_at)}; it is shown only now", file=sys.stderr)
    return EXIT_OK


def add_commands(command: CommandMaker) -> None:
    """Register the token commands with `onprem`'s parser."""
    p = command("tokens", "list operator tokens as a table: name, id, role, groups, state, created, expires, "
                "last used (never their secrets; admin only)", cmd_tokens,
                ["onprem tokens", "onprem tokens --json"])
    p.add_argument("--json", action="store_true", help="print the ListTokens response as JSON instead")

    p = command("create-token", "create an operator token and print it (once) on stdout; admin only",
                cmd_create_token,
                ["onprem create-token ci-bot --groups demo --ttl 30d > ci-bot.token",
                 "onprem create-token ops --groups '*' --role admin --ttl 12h"])
    p.add_argument("name", help='a name for people, e.g. "ci-bot"')
    p.add_argument("--groups", required=True, help='comma-separated groups the token may use, or "*" for all')
    p.add_argument("--role", choices=["operator", "admin"], default="operator")
    p.add_argument("--ttl", help="how long it stays valid, e.g. 30d or 12h (default: the control plane's, 90d)")

    p = command("revoke-token", "revoke an operator token: its next call is refused and its open calls end",
                cmd_revoke_token, ["onprem revoke-token onp_3f9a0b1c2d3e4f50 --reason 'leaked in a CI log'"])
    p.add_argument("id", help="the token's id as `onprem tokens` shows it (onp_<id>, or tokens/<id>)")
    p.add_argument("--reason", default="", help="why, for the audit log and the token's holder")

    p = command("enrollment-tokens", "list agent enrollment tokens as a table (admin only); its subcommands "
                "create and revoke them", cmd_enrollment_tokens,
                ["onprem enrollment-tokens --group staging",
                 "onprem enrollment-tokens create staging --ttl 10m --description 'db01 in Frankfurt'",
                 "onprem enrollment-tokens revoke onpe_6f03fa3719cdcdaa"])
    p.add_argument("--group", help="only the tokens of this group")
    p.add_argument("--json", action="store_true", help="print the ListEnrollmentTokens response as JSON instead")
    family = command.family(p, required=False)

    p = family("list", "list agent enrollment tokens (the same as `onprem enrollment-tokens`)",
               cmd_enrollment_tokens, ["onprem enrollment-tokens list --group staging --json"])
    p.add_argument("--group", default=argparse.SUPPRESS, help="only the tokens of this group")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print the ListEnrollmentTokens response as JSON instead")

    p = family("create", "create a single-use enrollment token for a group (created if new) and print it (once) on "
               "stdout; admin only", cmd_create_enrollment_token,
               ["onprem enrollment-tokens create staging",
                "onprem-agent enroll --config agent.yaml --token \"$(onprem enrollment-tokens create staging "
                "--ttl 10m)\""])
    p.add_argument("group", help="the group the enrolled agent joins: letters, digits, - and _")
    p.add_argument("--ttl", help="how long it stays valid, e.g. 10m (default 1h, at most 7d)")
    p.add_argument("--description", default="", help='a note for the audit log, e.g. "db01 in Frankfurt"')

    p = family("revoke", "revoke an unused agent enrollment token (the same as `onprem revoke-enrollment-token`)",
               cmd_revoke_enrollment_token, ["onprem enrollment-tokens revoke onpe_6f03fa3719cdcdaa --reason typo"])
    p.add_argument("id", help="the token's id as `onprem enrollment-tokens` shows it (onpe_<id>)")
    p.add_argument("--reason", default="", help="why, for the audit log")

    p = command("revoke-enrollment-token", "revoke an unused agent enrollment token", cmd_revoke_enrollment_token,
                ["onprem revoke-enrollment-token onpe_6f03fa3719cdcdaa --reason 'not needed'"])
    p.add_argument("id", help="the token's id as `onprem enrollment-tokens` shows it (onpe_<id>)")
    p.add_argument("--reason", default="", help="why, for the audit log")
