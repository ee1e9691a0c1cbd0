"""`onprem`: the operator CLI, a thin client of the control plane's public gRPC API.

    onprem agents [--group G] [--json]
    onprem groups [--json]
    onprem query GROUP PROFILE SQL [--param NAME=VALUE ...] [--format csv|jsonl|table] [--max-rows N]
    onprem download GROUP PROFILE PATH [DEST] [--force] [--progress]
    onprem upload GROUP PROFILE LOCAL PATH [--overwrite|--keep-both] [--create-parents] [--progress]
    onprem files GROUP PROFILE [PATH] [--recursive] [--glob GLOB] [--format table|jsonl]
    onprem tokens | create-token | revoke-token | enrollment-tokens | revoke-enrollment-token   (see tokens.py)
    onprem audit [--since 1h] [--group G] [--format table|jsonl|csv|json] [--output FILE] [--follow]   (audit.py)

Connection options work as grpcurl's do: --address (or $ONPREM_ADDRESS, default 127.0.0.1:8443), --cacert
(or $ONPREM_CACERT; system roots otherwise), --token or --token-file (or $ONPREM_TOKEN / $ONPREM_TOKEN_FILE).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC
from pathlib import Path
from typing import IO

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from onprem.operator_cli import audit, listing, service_config, transfer
from onprem.operator_cli import rows as rowsmod
from onprem.operator_cli import tokens as tokensmod
from onprem.operator_cli.errors import (
    EXIT_CODES_HELP,
    EXIT_ERROR,
    EXIT_OK,
    ChecksumMismatch,
    CliError,
    LocalFileError,
    UsageError,
    from_rpc_error,
)
from onprem.tunnel.version import version_line
from onprem.v1 import (
    agents_pb2,
    agents_pb2_grpc,
    database_pb2,
    database_pb2_grpc,
    files_pb2,
    files_pb2_grpc,
    values_pb2,
)

DEFAULT_ADDRESS = "127.0.0.1:8443"
Metadata = tuple[tuple[str, str], ...]


class Connection:
    """A channel to the control plane and the caller's bearer token."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.address: str = args.address or os.environ.get("ONPREM_ADDRESS") or DEFAULT_ADDRESS
        self.timeout: float | None = args.timeout
        cacert = args.cacert or os.environ.get("ONPREM_CACERT")
        root: bytes | None = None
        if cacert:
            try:
                root = Path(cacert).read_bytes()
            except OSError as e:
                raise LocalFileError(f"cannot read the CA certificate {cacert}: {e.strerror}") from None
        self.metadata: Metadata = (("authorization", f"Bearer {self._token(args)}"),)
        # Behind several replicas (a DNS name with an address each), calls spread over them and reads that
        # fail UNAVAILABLE go to another (docs/ha.md).
        self.channel = grpc.secure_channel(self.address, grpc.ssl_channel_credentials(root_certificates=root),
                                           options=service_config.channel_options())

    @staticmethod
    def _token(args: argparse.Namespace) -> str:
        token: str | None = args.token
        token_file: str | None = args.token_file
        if not token and not token_file:
            token = os.environ.get("ONPREM_TOKEN")
            token_file = None if token else os.environ.get("ONPREM_TOKEN_FILE")
        if token_file:
            try:
                token = Path(token_file).read_text().strip()
            except OSError as e:
                raise LocalFileError(f"cannot read the token file {token_file}: {e.strerror}") from None
        if not token:
            raise UsageError("no token: pass --token or --token-file, or set ONPREM_TOKEN")
        return token.strip()

    def close(self) -> None:
        self.channel.close()


# --- formatting ------------------------------------------------------------------------------------

def format_time(ts: timestamp_pb2.Timestamp) -> str:
    """A timestamp as UTC ISO 8601 to the second, "-" when unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] = ()) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    align = list(right) or [False] * len(headers)

    def line(cells: Sequence[str], aligned: bool) -> str:
        parts = [c.rjust(w) if aligned and a else c.ljust(w) for c, w, a in zip(cells, widths, align, strict=True)]
        return "  ".join(parts).rstrip() + "\n"

    return line(headers, False) + "".join(line(r, True) for r in rows)


def agents_table(agents: Sequence[agents_pb2.Agent]) -> str:
    headers = ["NAME", "ID", "GROUP", "STATE", "VERSION", "IN-FLIGHT", "LAST SEEN", "CERT EXPIRES"]
    rows = [
        [a.name, a.agent_id, a.group, agents_pb2.AgentState.Name(a.state).removeprefix("AGENT_STATE_"),
         a.version or "-", f"{a.in_flight}/{a.max_in_flight}", format_time(a.last_seen_at),
         format_time(a.certificate_expires_at)]
        for a in agents
    ]
    return render_table(headers, rows, [False] * 5 + [True] + [False] * 2)


def groups_table(groups: Sequence[agents_pb2.Group]) -> str:
    headers = ["NAME", "AGENTS", "ACTIVE", "CREATED"]
    rows = [[g.name, str(g.agent_count), str(g.active_agent_count), format_time(g.created_at)] for g in groups]
    return render_table(headers, rows, [False, True, True, False])


def to_json(message: Message) -> str:
    # The same JSON grpcurl prints: proto field names, enums by name.
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2)


# --- commands --------------------------------------------------------------------------------------

def cmd_agents(conn: Connection, args: argparse.Namespace) -> int:
    stub = agents_pb2_grpc.AgentServiceStub(conn.channel)
    response = stub.ListAgents(agents_pb2.ListAgentsRequest(group=args.group or ""), metadata=conn.metadata,
                               timeout=conn.timeout)
    sys.stdout.write(to_json(response) + "\n" if args.json else agents_table(response.agents))
    return EXIT_OK


def cmd_groups(conn: Connection, args: argparse.Namespace) -> int:
    stub = agents_pb2_grpc.AgentServiceStub(conn.channel)
    response = stub.ListGroups(agents_pb2.ListGroupsRequest(), metadata=conn.metadata, timeout=conn.timeout)
    sys.stdout.write(to_json(response) + "\n" if args.json else groups_table(response.groups))
    return EXIT_OK


def cmd_query(conn: Connection, args: argparse.Namespace) -> int:
    request = database_pb2.QueryRequest(group=args.group, profile=args.profile, sql=args.sql,
                                        max_rows=args.max_rows)
    for text in args.param:
        try:
            name, value = rowsmod.parse_parameter(text)
        except ValueError as e:
            raise UsageError(str(e)) from None
        request.parameters[name].CopyFrom(value)
    stub = database_pb2_grpc.DatabaseServiceStub(conn.channel)
    writer = rowsmod.make_writer(args.format, sys.stdout)
    columns: list[values_pb2.Column] = []
    for message in stub.Query(request, metadata=conn.metadata, timeout=conn.timeout):
        kind = message.WhichOneof("result")
        if kind == "header":
            columns = list(message.header.columns)
            if columns:
                writer.header(columns)
        elif kind == "rows":
            writer.rows(rowsmod.decode_batch(columns, message.rows))
        elif kind == "summary":
            summary = message.summary
            if columns:
                writer.close()
                if summary.truncated:
                    print(f"onprem: the result was cut short after {summary.row_count} rows "
                          "(--max-rows or the profile's row cap)", file=sys.stderr)
            else:
                affected = "unknown" if summary.rows_affected < 0 else str(summary.rows_affected)
                print(f"rows affected: {affected}", file=sys.stderr)
    return EXIT_OK


def _progress_stream(args: argparse.Namespace) -> IO[str] | None:
    """Where progress goes: stderr when it is a terminal or --progress asks for it."""
    return sys.stderr if args.progress or sys.stderr.isatty() else None


def cmd_download(conn: Connection, args: argparse.Namespace) -> int:
    target = transfer.download_destination(args.path, args.dest, args.force)
    stub = files_pb2_grpc.FileServiceStub(conn.channel)
    stream = stub.Read(files_pb2.ReadRequest(group=args.group, profile=args.profile, path=args.path),
                       metadata=conn.metadata, timeout=conn.timeout)
    try:
        info, sha256 = transfer.write_download(stream, target, _progress_stream(args), args.path)
    except BaseException:
        stream.cancel()  # type: ignore[no-untyped-call]
        raise
    print(f"downloaded {args.group}/{args.profile}:{info.path} to {target} ({info.size} bytes, sha256 {sha256})")
    return EXIT_OK


def cmd_upload(conn: Connection, args: argparse.Namespace) -> int:
    local = Path(args.local)
    size = transfer.local_file_size(local)
    local_sha256 = transfer.file_sha256(local)
    expected = (args.expected_sha256 or local_sha256).lower()
    mode = (files_pb2.WRITE_MODE_OVERWRITE if args.overwrite
            else files_pb2.WRITE_MODE_KEEP_BOTH if args.keep_both else files_pb2.WRITE_MODE_CREATE)
    header = files_pb2.WriteHeader(group=args.group, profile=args.profile, path=args.path, mode=mode,
                                   create_parents=args.create_parents, expected_sha256=expected)
    progress = transfer.Progress(str(local), size, _progress_stream(args))
    stub = files_pb2_grpc.FileServiceStub(conn.channel)
    response = stub.Write(transfer.upload_requests(header, local, progress), metadata=conn.metadata,
                          timeout=conn.timeout)
    if response.sha256.lower() != expected:
        raise ChecksumMismatch(f"the agent wrote bytes hashing to {response.sha256}, not {expected}")
    print(f"uploaded {local} to {args.group}/{args.profile}:{response.info.path} "
          f"({response.info.size} bytes, sha256 {response.sha256})")
    return EXIT_OK


def cmd_files(conn: Connection, args: argparse.Namespace) -> int:
    listing.run(conn.channel, conn.metadata, conn.timeout, args, sys.stdout)
    return EXIT_OK


# --- command line ----------------------------------------------------------------------------------

def _connection_options(parser: argparse.ArgumentParser, default: object) -> None:
    group = parser.add_argument_group("connection (as grpcurl's)")
    group.add_argument("--address", default=default,
                       help=f"the control plane's operator API, host:port ($ONPREM_ADDRESS, default {DEFAULT_ADDRESS})")
    group.add_argument("--cacert", default=default,
                       help="PEM file of the CA that signed the control plane's certificate ($ONPREM_CACERT)")
    group.add_argument("--token", default=default, help="the bearer token ($ONPREM_TOKEN)")
    group.add_argument("--token-file", default=default, help="a file holding the bearer token ($ONPREM_TOKEN_FILE)")
    group.add_argument("--timeout", type=float, default=default, help="a deadline for the call, in seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onprem", description="Operate onprem agents through the control plane's gRPC API.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_line("onprem"))
    _connection_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, run: Callable[[Connection, argparse.Namespace], int]
                ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXIT_CODES_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        # SUPPRESS: an option given before the command is not reset by the command's own default.
        _connection_options(p, argparse.SUPPRESS)
        p.set_defaults(run=run)
        return p

    p = command("agents", "list agents as a table: name, id, group, state, version, in-flight, last seen, "
                "certificate expiry (times in UTC)", cmd_agents)
    p.add_argument("--group", help="only the agents of this group")
    p.add_argument("--json", action="store_true", help="print the ListAgents response as JSON instead")

    p = command("groups", "list groups with their agent counts", cmd_groups)
    p.add_argument("--json", action="store_true", help="print the ListGroups response as JSON instead")

    p = command("query", "run one SQL statement on a database profile and stream its rows to stdout", cmd_query)
    p.add_argument("group")
    p.add_argument("profile")
    p.add_argument("sql")
    p.add_argument("--param", action="append", default=[], metavar="NAME[:TYPE]=VALUE", help=rowsmod.PARAM_HELP)
    p.add_argument("--format", choices=["csv", "jsonl", "table"], default="csv",
                   help="csv (default; NULL is empty), jsonl (one object per row) or table (widths from the "
                   "first batch)")
    p.add_argument("--max-rows", type=int, default=0, help="stop after this many rows")

    p = command("download", "download a file, verifying its SHA-256; the file appears at DEST only when "
                "verified", cmd_download)
    p.add_argument("group")
    p.add_argument("profile")
    p.add_argument("path", help="the file's path in the folder profile")
    p.add_argument("dest", nargs="?", help="a local file or folder (default: the file's name, here)")
    p.add_argument("--force", action="store_true", help="replace DEST if it exists")
    p.add_argument("--progress", action="store_true", help="show progress on stderr even when it is not a terminal")

    p = command("upload", "upload a file; the agent refuses it unless the bytes it receives have the local "
                "file's SHA-256", cmd_upload)
    p.add_argument("group")
    p.add_argument("profile")
    p.add_argument("local", help="the local file")
    p.add_argument("path", help="the path to write in the folder profile")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace a file already at PATH")
    mode.add_argument("--keep-both", action="store_true", help='keep an existing file; write "name (1).ext"')
    p.add_argument("--create-parents", action="store_true", help="create missing folders of PATH")
    p.add_argument("--expected-sha256", help="the SHA-256 the file must have (e.g. from a published checksum); "
                   "default: the local file's")
    p.add_argument("--progress", action="store_true", help="show progress on stderr even when it is not a terminal")

    p = command("files", "list a folder of a folder profile, every page of it: type, size, modification time "
                "(UTC) and path", cmd_files)
    listing.add_arguments(p)
    tokensmod.add_commands(command)
    audit.add_command(command)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    conn: Connection | None = None
    try:
        conn = Connection(args)
        code: int = args.run(conn, args)
        return code
    except grpc.RpcError as e:
        error: CliError = from_rpc_error(e)
    except CliError as e:
        error = e
    except KeyboardInterrupt:
        print("onprem: CANCELLED: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `| head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    finally:
        if conn is not None:
            conn.close()
    print(error.line(), file=sys.stderr)
    return error.exit_code


def main() -> None:
    try:
        sys.exit(run())
    except SystemExit:
        raise
    except Exception as e:  # a bug: say so briefly, with the exit code for it
        print(f"onprem: INTERNAL: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(EXIT_ERROR)

