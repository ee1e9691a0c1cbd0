"""The shape of `onprem`'s command tree: every operator RPC has a command, every command has examples, every write
takes an idempotency key, and the listing's older spelling `onprem files GROUP PROFILE` still lists."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import onprem.v1
from onprem.operator_cli import files
from onprem.operator_cli.commands import AGENT_SERVICES, RPC_COMMANDS, subcommands, walk
from onprem.operator_cli.main import build_parser

ONPREM = str(Path(sys.executable).parent / "onprem")
#: The commands that write, and so must take --idempotency-key.
WRITE_COMMANDS = ("query", "batch", "transaction", "upload", "files rm", "files mv", "files mkdir", "app call")


def operator_rpcs() -> set[str]:
    """Every method of every service in the generated onprem.v1 modules, but those agents call."""
    found: set[str] = set()
    for module_info in pkgutil.iter_modules(onprem.v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"onprem.v1.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            if service.full_name not in AGENT_SERVICES:
                found |= {f"{service.full_name}/{method.name}" for method in service.methods}
    return found


def leaves() -> dict[str, object]:
    """Each runnable command by its path ("files poll"), with what it runs."""
    return {" ".join(path): parser.get_default("run") or parser.get_default("run_local")
            for path, parser in walk(build_parser()) if path}


def test_every_operator_rpc_has_a_command_and_no_command_names_a_gone_rpc() -> None:
    rpcs = operator_rpcs()
    assert len(rpcs) == 28  # 8 AgentService, 1 AuditService, 5 DatabaseService, 8 FileService, 1 AppService, 5 Token
    assert sorted(rpcs - set(RPC_COMMANDS)) == [], "operator RPCs without an `onprem` command"
    assert sorted(set(RPC_COMMANDS) - rpcs) == [], "commands mapped to RPCs the protos do not have"


def test_every_mapped_command_exists_and_runs_something() -> None:
    commands = leaves()
    parsers = {" ".join(path): parser for path, parser in walk(build_parser()) if path}
    for rpc, command in RPC_COMMANDS.items():
        # "query --whole": the command, and the option that makes it call this RPC.
        name, _, option = command.partition(" --")
        assert commands.get(name) is not None, f"{rpc}: `onprem {name}` is not a runnable command"
        if option:
            parser = parsers[name]
            assert any(f"--{option}" in action.option_strings for action in parser._actions), \
                f"{rpc}: `onprem {name}` has no --{option}"


def test_agent_services_really_are_the_agents_own() -> None:
    services = {s.full_name for m in pkgutil.iter_modules(onprem.v1.__path__) if m.name.endswith("_pb2")
                for s in importlib.import_module(f"onprem.v1.{m.name}").DESCRIPTOR.services_by_name.values()}
    assert services >= AGENT_SERVICES
    assert {"onprem.v1.Enrollment", "onprem.v1.AgentTunnel"} == AGENT_SERVICES


def test_every_command_has_one_to_three_examples_in_its_help() -> None:
    for path, parser in walk(build_parser()):
        epilog = parser.epilog or ""
        assert epilog.startswith("examples:\n"), f"`onprem {' '.join(path)}` has no examples"
        examples = epilog.split("\n\n", 1)[0].splitlines()[1:]
        assert 1 <= len(examples) <= 3, (path, examples)
        assert all("onprem" in e for e in examples), (path, examples)
        assert "exit codes:" in epilog, path


def test_examples_show_in_help_output() -> None:
    out = subprocess.run([ONPREM, "files", "poll", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "examples:\n  onprem files poll demo demo-files incoming --recursive\n" in out.stdout
    assert "  11  `app call --fail`" in out.stdout


@pytest.mark.parametrize("command", WRITE_COMMANDS)
def test_every_write_command_takes_an_idempotency_key(command: str) -> None:
    parser = dict((" ".join(path), p) for path, p in walk(build_parser()))[command]
    assert "--idempotency-key" in parser._option_string_actions


def test_reads_take_no_idempotency_key() -> None:
    parsers = {" ".join(path): p for path, p in walk(build_parser())}
    for command in ("files list", "files stat", "files poll", "download", "changes", "agents get"):
        assert "--idempotency-key" not in parsers[command]._option_string_actions, command


def _legacy(*argv: str) -> list[str]:
    parser = build_parser()
    listing = subcommands(subcommands(parser)["files"])["list"]
    return files.legacy_argv(list(argv), parser, listing)


def test_the_old_files_spelling_means_files_list() -> None:
    assert _legacy("files", "site", "exchange") == ["files", "list", "site", "exchange"]
    assert _legacy("--address", "h:1", "files", "--glob", "*.csv", "-r", "site", "exchange") == [
        "--address", "h:1", "files", "list", "--glob", "*.csv", "-r", "site", "exchange"]


def test_a_files_subcommand_is_left_alone() -> None:
    assert _legacy("files", "stat", "site", "exchange", "a.txt") == ["files", "stat", "site", "exchange", "a.txt"]
    assert _legacy("files", "list", "stat", "exchange") == ["files", "list", "stat", "exchange"]
    assert _legacy("files", "--help") == ["files", "--help"]
    assert _legacy("query", "files", "p", "SELECT 1") == ["query", "files", "p", "SELECT 1"]


def test_an_option_value_named_files_is_not_the_command() -> None:
    assert _legacy("--token", "files", "groups") == ["--token", "files", "groups"]
