"""`onprem-control-plane` token commands, run on the control plane's host against its store.

    create-admin-token [--name NAME] [--ttl 90d | --no-expiry] [--output FILE]
    create-token --name NAME --role operator --groups a,b [--ttl 30d] [--output FILE]
    list-tokens [--json]
    revoke-token ID [--reason TEXT]
    create-enrollment-token --group GROUP [--ttl SECONDS] [--description TEXT] [--output FILE]
    list-enrollment-tokens [--group G] [--json]
    revoke-enrollment-token ID [--reason TEXT]
    token-settings [--default-ttl 90d]

They work before any operator can authenticate (the first admin token comes
from here) and are the way back in when every admin token is lost. A token is
printed on stdout, or written to a new 0600 file with `--output`. A revocation
made here reaches a running control plane through the store: its next call
with the token is refused, and its open calls end within the control plane's
watch interval (1 s).
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from onprem.control_plane.api.tokens import enrollment_message, token_message
from onprem.control_plane.changes import TOKENS
from onprem.control_plane.private_state import write_new_private
from onprem.control_plane.store import (
    API_TOKEN_PREFIX,
    ENROLLMENT_TOKEN_PREFIX,
    Store,
    UsedEnrollmentTokenNotRevocable,
    iso_utc,
    parse_token_id,
    validate_group_name,
)
from onprem.operator_cli.tokens import enrollment_tokens_table, parse_duration, to_json, tokens_table
from onprem.tunnel.errors import NotFound
from onprem.v1 import tokens_pb2

OpenStore = Callable[[argparse.Namespace], Store]


def actor() -> str:
    """Who made a change from this CLI, for `created_by` and `revoked_by`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (e.g. an arbitrary uid in a container)
        user = f"uid {os.getuid()}"
    return f"local CLI ({user})"


def _duration(text: str) -> dt.timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _emit(token: str, output: Path | None) -> None:
    """The token on stdout, or in a new private file (never over an existing one)."""
    if output is None:
        print(token)
        return
    try:
        write_new_private(output, (token + "\n").encode())
    except FileExistsError:
        raise ValueError(f"{output} exists already; remove it or choose another --output") from None
    print(f"wrote the token to {output} (mode 0600)", file=sys.stderr)


def _token_id(text: str, prefix: str) -> str:
    token_id = parse_token_id(text, prefix)
    if token_id is None:
        raise ValueError(f"{text!r} is not a token id: give {prefix}_<16 hex digits> as the list shows it")
    return token_id


def _groups(text: str) -> list[str]:
    groups = [g.strip() for g in text.split(",") if g.strip()]
    if not groups:
        raise ValueError("--groups needs at least one group, or * for every group")
    for group in groups:
        if group != "*":
            validate_group_name(group)
    return groups


def _created(kind: str, row_label: str, groups: tuple[str, ...], expires_at: dt.datetime | None) -> None:
    expires = iso_utc(expires_at) if expires_at is not None else "never"
    print(f"created {kind} token {row_label} for groups {','.join(groups)}, expires {expires}", file=sys.stderr)


def create_admin_token(open_store: OpenStore, args: argparse.Namespace) -> int:
    with open_store(args) as store:
        token, row = store.create_api_token(args.name, "admin", ["*"], args.ttl, no_expiry=args.no_expiry,
                                            created_by=actor())
    _emit(token, args.output)
    _created("admin", row.label, row.groups, row.expires_at)
    if args.no_expiry:
        print(f"this admin token NEVER EXPIRES: use it to make expiring tokens, then revoke it with "
              f"`onprem-control-plane revoke-token {row.short_id}`", file=sys.stderr)
    return 0


def create_token(open_store: OpenStore, args: argparse.Namespace) -> int:
    groups = _groups(args.groups)
    with open_store(args) as store:
        token, row = store.create_api_token(args.name, args.role, groups, args.ttl, created_by=actor())
    _emit(token, args.output)
    _created(row.role, row.label, row.groups, row.expires_at)
    return 0


def list_tokens(open_store: OpenStore, args: argparse.Namespace) -> int:
    with open_store(args) as store:
        rows = store.list_api_tokens()
    now = dt.datetime.now(dt.UTC)
    tokens = [token_message(r, now) for r in rows]
    if args.json:
        print(to_json(tokens_pb2.ListTokensResponse(tokens=tokens)))
    else:
        sys.stdout.write(tokens_table(tokens))
    return 0


def revoke_token(open_store: OpenStore, args: argparse.Namespace) -> int:
    token_id = _token_id(args.id, API_TOKEN_PREFIX)
    with open_store(args) as store:
        try:
            row = store.revoke_api_token(token_id, by=actor(), reason=args.reason)
        except NotFound as exc:
            raise ValueError(f"{exc}; `list-tokens` shows the ids") from None
        # Replicas on a shared store end the token's open calls now rather than at their next check.
        store.notify(TOKENS, {"token_id": token_id})
    assert row.revoked_at is not None
    print(f"revoked token {row.label} at {iso_utc(row.revoked_at)}; a running control plane refuses its next "
          "call and ends its open calls within a second")
    return 0


def create_enrollment_token(open_store: OpenStore, args: argparse.Namespace) -> int:
    with open_store(args) as store:
        token, row = store.create_enrollment_token(args.group, dt.timedelta(seconds=args.ttl), args.description,
                                                   created_by=actor())
    _emit(token, args.output)
    print(f"valid until {row.expires_at.isoformat()} for group {row.group_name}", file=sys.stderr)
    return 0


def list_enrollment_tokens(open_store: OpenStore, args: argparse.Namespace) -> int:
    with open_store(args) as store:
        rows = store.list_enrollment_tokens(group=args.group)
    now = dt.datetime.now(dt.UTC)
    tokens = [enrollment_message(r, now) for r in rows]
    if args.json:
        print(to_json(tokens_pb2.ListEnrollmentTokensResponse(enrollment_tokens=tokens)))
    else:
        sys.stdout.write(enrollment_tokens_table(tokens))
    return 0


def revoke_enrollment_token(open_store: OpenStore, args: argparse.Namespace) -> int:
    token_id = _token_id(args.id, ENROLLMENT_TOKEN_PREFIX)
    with open_store(args) as store:
        try:
            row = store.revoke_enrollment_token(token_id, by=actor(), reason=args.reason)
        except NotFound as exc:
            raise ValueError(f"{exc}; `list-enrollment-tokens` shows the ids") from None
        except UsedEnrollmentTokenNotRevocable as exc:
            raise ValueError(f"enrollment token {ENROLLMENT_TOKEN_PREFIX}_{token_id} was already used by agent "
                             f"{exc.agent_id}; revoke the agent instead") from None
    assert row.revoked_at is not None
    print(f"revoked enrollment token {row.short_id} of group {row.group_name} at {iso_utc(row.revoked_at)}")
    return 0


def token_settings(open_store: OpenStore, args: argparse.Namespace) -> int:
    with open_store(args) as store:
        if args.default_ttl is not None:
            store.set_default_token_ttl(args.default_ttl)
        ttl = store.default_token_ttl()
    print(json.dumps({"default_ttl_seconds": int(ttl.total_seconds())}))
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                 common: Callable[[argparse.ArgumentParser], None], open_store: OpenStore) -> None:
    """Register the token commands; each runs `fn(open_store, args)`."""

    def command(name: str, help_text: str, fn: Callable[[OpenStore, argparse.Namespace], int]
                ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        common(p)
        p.set_defaults(func=lambda args: fn(open_store, args))
        return p

    def output(p: argparse.ArgumentParser) -> None:
        p.add_argument("--output", type=Path, help="write the token to this new file (mode 0600) instead of stdout")

    ttl_help = "how long it stays valid, e.g. 90d, 12h (default: the token-settings default, 90d at first)"
    p = command("create-admin-token", "create an admin token for every group", create_admin_token)
    p.add_argument("--name", default="admin")
    expiry = p.add_mutually_exclusive_group()
    expiry.add_argument("--ttl", type=_duration, help=ttl_help)
    expiry.add_argument("--no-expiry", action="store_true",
                        help="a bootstrap token that never expires (says so; revoke it once you have others)")
    output(p)

    p = command("create-token", "create an operator or admin token", create_token)
    p.add_argument("--name", required=True)
    p.add_argument("--role", choices=["operator", "admin"], default="operator")
    p.add_argument("--groups", required=True, help="comma-separated groups, or * for all")
    p.add_argument("--ttl", type=_duration, help=ttl_help)
    output(p)

    p = command("list-tokens", "list operator tokens (never their secrets)", list_tokens)
    p.add_argument("--json", action="store_true", help="print them as the ListTokens RPC does")

    p = command("revoke-token", "revoke an operator token, with effect on its next call", revoke_token)
    p.add_argument("id", help="onp_<id> as list-tokens shows it")
    p.add_argument("--reason", default="", help="why, for the audit log and the token's holder")

    p = command("create-enrollment-token", "create a single-use agent enrollment token", create_enrollment_token)
    p.add_argument("--group", required=True)
    p.add_argument("--ttl", type=float, default=3600, help="seconds the token stays valid")
    p.add_argument("--description", default="")
    output(p)

    p = command("list-enrollment-tokens", "list agent enrollment tokens", list_enrollment_tokens)
    p.add_argument("--group", help="only the tokens of this group")
    p.add_argument("--json", action="store_true", help="print them as the ListEnrollmentTokens RPC does")

    p = command("revoke-enrollment-token", "revoke an unused agent enrollment token", revoke_enrollment_token)
    p.add_argument("id", help="onpe_<id> as list-enrollment-tokens shows it")
    p.add_argument("--reason", default="", help="why, for the audit log")

    p = command("token-settings", "show, or change, the default lifetime of new operator tokens", token_settings)
    p.add_argument("--default-ttl", type=_duration, help="e.g. 30d; tokens made before keep their expiry")
