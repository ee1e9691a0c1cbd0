"""`onprem`: the operator CLI, a thin client of the control plane's public gRPC API.

    onprem agents [list|get|check|drain|revoke] ...  groups  replicas        (agents.py)
    onprem query GROUP PROFILE SQL [--param NAME=VALUE ...] [--format csv|jsonl|table] [--max-rows N]
    onprem batch | transaction | changes GROUP PROFILE ...                     (database.py)
    onprem download GROUP PROFILE PATH [DEST] [--force] [--progress]
    onprem upload GROUP PROFILE LOCAL PATH [--overwrite|--keep-both] [--create-parents] [--progress]
    onprem files list|stat|rm|mv|mkdir|poll GROUP PROFILE ...                  (files.py; listing.py)
    onprem app call GROUP PROFILE METHOD PATH [--data @FILE|-] ...             (apps.py)
    onprem tokens | create-token | revoke-token | enrollment-tokens [list|create|revoke]   (tokens.py)
    onprem audit [--since 1h] [--group G] [--format table|jsonl|csv|json] [--output FILE] [--follow]   (audit.py)
    onprem completion bash|zsh|fish                                            (completion.py)

Every operator RPC has a command (commands.RPC_COMMANDS, checked against the protos by a test); every command's
--help has examples and the exit codes. Writes take --idempotency-key KEY, sent as `idempotency-key` metadata.

Connection options work as grpcurl's do: --address (or $ONPREM_ADDRESS, default 127.0.0.1:8443), --cacert
(or $ONPREM_CACERT; system roots otherwise), --token or --token-file (or $ONPREM_TOKEN / $ONPREM_TOKEN_FILE).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

import grpc

from onprem.operator_cli import agents, apps, audit, completion, database, files, service_config, transfer
from onprem.operator_cli import rows as rowsmod
from onprem.operator_cli import tokens as tokensmod
from onprem.operator_cli.commands import (
    DEFAULT_ADDRESS,
    CommandMaker,
    add_idempotency_option,
    connection_options,
)
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
from onprem.operator_cli.output import format_time, render_table, to_json
from onprem.tunnel.version import version_line
from onprem.v1 import database_pb2, database_pb2_grpc, files_pb2, files_pb2_grpc, values_pb2

__all__ = ["DEFAULT_ADDRESS", "Connection", "build_parser", "format_time", "main", "render_table", "run", "to_json"]

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

    def write_metadata(self, idempotency_key: str | None) -> Metadata:
        """The metadata of a write: with its `idempotency-key` when the caller gave one (the control plane checks
        it: 1 to 128 printable ASCII characters, else INVALID_ARGUMENT)."""
        if idempotency_key is None:
            return self.metadata
        return (*self.metadata, ("idempotency-key", idempotency_key))

    def close(self) -> None:
        self.channel.close()


# --- commands --------------------------------------------------------------------------------------

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
    metadata = conn.write_metadata(args.idempotency_key)
    if args.whole:
        unary = database_pb2.ExecuteQueryRequest.FromString(request.SerializeToString())  # same field numbers
        whole = stub.ExecuteQuery(unary, metadata=metadata, timeout=conn.timeout)
        messages: Iterable[database_pb2.QueryResponse] = rowsmod.as_stream(whole)
    else:
        messages = stub.Query(request, metadata=metadata, timeout=conn.timeout)
    columns: list[values_pb2.Column] = []
    for message in messages:
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
    response = stub.Write(transfer.upload_requests(header, local, progress),
                          metadata=conn.write_metadata(args.idempotency_key), timeout=conn.timeout)
    if response.sha256.lower() != expected:
        raise ChecksumMismatch(f"the agent wrote bytes hashing to {response.sha256}, not {expected}")
    print(f"uploaded {local} to {args.group}/{args.profile}:{response.info.path} "
          f"({response.info.size} bytes, sha256 {response.sha256})")
    return EXIT_OK


# --- command line ----------------------------------------------------------------------------------

def _add_transfer_commands(command: CommandMaker) -> None:
    p = command("query", "run one SQL statement on a database profile and stream its rows to stdout", cmd_query,
                ["onprem query demo demo-db 'SELECT id, total FROM orders WHERE total > :min' --param min=100",
                 "onprem query demo demo-db 'SELECT * FROM orders' --format jsonl > orders.jsonl",
                 "onprem query demo demo-db \"UPDATE orders SET status = 'shipped' WHERE id = :id\" --param id=2 "
                 "--idempotency-key ship-2"])
    p.add_argument("group")
    p.add_argument("profile")
    p.add_argument("sql")
    p.add_argument("--param", action="append", default=[], metavar="NAME[:TYPE]=VALUE", help=rowsmod.PARAM_HELP)
    p.add_argument("--format", choices=["csv", "jsonl", "table"], default="csv",
                   help="csv (default; NULL is empty), jsonl (one object per row) or table (widths from the "
                   "first batch)")
    p.add_argument("--max-rows", type=int, default=0, help="stop after this many rows")
    p.add_argument("--whole", action="store_true",
                   help="fetch the result in one message (ExecuteQuery): cheaper for small results, refused "
                   "(RESOURCE_EXHAUSTED) for one over 4 MiB")
    add_idempotency_option(p)

    p = command("download", "download a file, verifying its SHA-256; the file appears at DEST only when "
                "verified", cmd_download,
                ["onprem download demo demo-files reports/2026-10.csv",
                 "onprem download demo demo-files incoming/backup.tar ./copy.tar --force"])
    p.add_argument("group")
    p.add_argument("profile")
    p.add_argument("path", help="the file's path in the folder profile")
    p.add_argument("dest", nargs="?", help="a local file or folder (default: the file's name, here)")
    p.add_argument("--force", action="store_true", help="replace DEST if it exists")
    p.add_argument("--progress", action="store_true", help="show progress on stderr even when it is not a terminal")

    p = command("upload", "upload a file; the agent refuses it unless the bytes it receives have the local "
                "file's SHA-256", cmd_upload,
                ["onprem upload demo demo-files ./backup.tar incoming/backup.tar --create-parents",
                 "onprem upload demo demo-files ./report.csv reports/report.csv --overwrite "
                 "--idempotency-key report-2026-10"])
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
    add_idempotency_option(p)


class _Parsers:
    """The tree and the one parser `files.legacy_argv` needs to read."""

    def __init__(self) -> None:
        self.root = argparse.ArgumentParser(
            prog="onprem", description="Operate onprem agents through the control plane's gRPC API.",
            epilog="examples:\n  onprem agents\n  onprem query demo demo-db 'SELECT * FROM orders' --format table\n"
                   "  onprem files list demo demo-files --recursive\n\n" + EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.root.add_argument("--version", action="version", version=version_line("onprem"))
        connection_options(self.root, None)
        command = CommandMaker(self.root.add_subparsers(dest="command", required=True, metavar="COMMAND"), "onprem")
        agents.add_commands(command)
        _add_transfer_commands(command)
        database.add_commands(command)
        self.files_list = files.add_commands(command)
        apps.add_commands(command)
        tokensmod.add_commands(command)
        audit.add_command(command)
        completion.add_command(command, self.root)


def build_parser() -> argparse.ArgumentParser:
    return _Parsers().root


def run(argv: Sequence[str] | None = None) -> int:
    parsers = _Parsers()
    args = parsers.root.parse_args(files.legacy_argv(sys.argv[1:] if argv is None else argv, parsers.root,
                                                     parsers.files_list))
    conn: Connection | None = None
    try:
        if args.run_local is not None:
            local: int = args.run_local(args)
            return local
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
    sys.stdout.flush()  # what the command printed comes before its error, even in one pipe
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
