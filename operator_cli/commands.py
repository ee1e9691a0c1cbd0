"""How `onprem` builds its command tree: every command gets the connection options, a description, 1-3 examples
and the exit codes in its `--help`; a family of commands (`onprem files ...`) is a command with subcommands.

`RPC_COMMANDS` maps every operator RPC to the command that calls it; tests/operator_cli/test_rpc_coverage.py
checks it against the services' descriptors, so an RPC added to a proto without a command fails the build.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from onprem.operator_cli.errors import EXIT_CODES_HELP

if TYPE_CHECKING:
    from onprem.operator_cli.main import Connection

DEFAULT_ADDRESS = "127.0.0.1:8443"

#: A command's body: the connection to the control plane and the parsed command line in, the exit code out.
Run = Callable[["Connection", argparse.Namespace], int]
#: A command that needs no control plane (e.g. `onprem completion`): the parsed command line in, the exit code out.
RunLocal = Callable[[argparse.Namespace], int]

#: Every operator RPC, "package.Service/Method", and the `onprem` command that calls it.
RPC_COMMANDS: Final[dict[str, str]] = {
    "onprem.v1.AgentService/ListAgents": "agents list",
    "onprem.v1.AgentService/GetAgent": "agents get",
    "onprem.v1.AgentService/ListGroups": "groups",
    "onprem.v1.AgentService/CreateEnrollmentToken": "enrollment-tokens create",
    "onprem.v1.AgentService/RevokeAgent": "agents revoke",
    "onprem.v1.AgentService/CheckProfile": "agents check",
    "onprem.v1.AgentService/DrainAgent": "agents drain",
    "onprem.v1.AgentService/ListReplicas": "replicas",
    "onprem.v1.AuditService/ListAuditEvents": "audit",
    "onprem.v1.DatabaseService/Query": "query",
    "onprem.v1.DatabaseService/ExecuteQuery": "query --whole",
    "onprem.v1.DatabaseService/ExecuteBatch": "batch",
    "onprem.v1.DatabaseService/ExecuteTransaction": "transaction",
    "onprem.v1.DatabaseService/PollChanges": "changes",
    "onprem.v1.FileService/List": "files list",
    "onprem.v1.FileService/Stat": "files stat",
    "onprem.v1.FileService/Read": "download",
    "onprem.v1.FileService/Write": "upload",
    "onprem.v1.FileService/Delete": "files rm",
    "onprem.v1.FileService/Move": "files mv",
    "onprem.v1.FileService/MakeDirectory": "files mkdir",
    "onprem.v1.FileService/Poll": "files poll",
    "onprem.v1.AppService/Call": "app call",
    "onprem.v1.TokenService/CreateToken": "create-token",
    "onprem.v1.TokenService/ListTokens": "tokens",
    "onprem.v1.TokenService/RevokeToken": "revoke-token",
    "onprem.v1.TokenService/ListEnrollmentTokens": "enrollment-tokens list",
    "onprem.v1.TokenService/RevokeEnrollmentToken": "enrollment-tokens revoke",
}

#: Services that agents call, not operators: no command calls them.
AGENT_SERVICES: Final = frozenset({"onprem.v1.Enrollment", "onprem.v1.AgentTunnel"})


def connection_options(parser: argparse.ArgumentParser, default: object) -> None:
    group = parser.add_argument_group("connection (as grpcurl's)")
    group.add_argument("--address", default=default,
                       help=f"the control plane's operator API, host:port ($ONPREM_ADDRESS, default {DEFAULT_ADDRESS})")
    group.add_argument("--cacert", default=default,
                       help="PEM file of the CA that signed the control plane's certificate ($ONPREM_CACERT)")
    group.add_argument("--token", default=default, help="the bearer token ($ONPREM_TOKEN)")
    group.add_argument("--token-file", default=default, help="a file holding the bearer token ($ONPREM_TOKEN_FILE)")
    group.add_argument("--timeout", type=float, default=default, help="a deadline for the call, in seconds")


def epilog(examples: Sequence[str]) -> str:
    lines = "".join(f"  {example}\n" for example in examples)
    return f"examples:\n{lines}\n{EXIT_CODES_HELP}" if examples else EXIT_CODES_HELP


def add_idempotency_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--idempotency-key", metavar="KEY",
                        help="send this idempotency-key (1 to 128 printable ASCII characters): a retry with the same "
                        "key and request answers as the first did instead of writing again; the same key with "
                        "another request is refused (docs/operators.md, \"Writes that happen once\")")


class CommandMaker:
    """Adds commands to one level of the tree (`onprem X`, or `onprem files X` for a family's maker)."""

    def __init__(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser], path: str) -> None:
        self._subparsers = subparsers
        self.path = path

    def __call__(self, name: str, help_text: str, run: Run | None, examples: Sequence[str] = (), *,
                 local: RunLocal | None = None) -> argparse.ArgumentParser:
        """A command; `run` is called with a connection, `local` (for commands that need none) without."""
        p = self._subparsers.add_parser(name, help=help_text, description=help_text, epilog=epilog(examples),
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
        # SUPPRESS: an option given before the command is not reset by the command's own default.
        connection_options(p, argparse.SUPPRESS)
        p.set_defaults(run=run, run_local=local, command_path=f"{self.path} {name}".removeprefix("onprem "))
        return p

    def family(self, parser: argparse.ArgumentParser, *, required: bool) -> CommandMaker:
        """Subcommands of `parser` (`required=False`: the family's own command still runs without one)."""
        sub = parser.add_subparsers(dest=f"{parser.prog.replace(' ', '_')}_command", metavar="COMMAND",
                                    required=required)
        return CommandMaker(sub, parser.prog)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of a parser, by name (none for a leaf)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
         ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the tree with its path of command names, the root first (path ())."""
    found = [(path, parser)]
    for name, child in subcommands(parser).items():
        found += walk(child, (*path, name))
    return found
