"""`onprem files ...`: a folder profile through `FileService` (transfers are `onprem upload|download`).

    onprem files list GROUP PROFILE [PATH] [--recursive] [--glob G] [--format table|jsonl]
    onprem files stat GROUP PROFILE PATH [--format table|json]
    onprem files rm GROUP PROFILE PATH [--recursive] [--idempotency-key KEY]
    onprem files mv GROUP PROFILE PATH DESTINATION [--overwrite] [--idempotency-key KEY]
    onprem files mkdir GROUP PROFILE PATH [--parents] [--idempotency-key KEY]
    onprem files poll GROUP PROFILE [PATH] [--recursive] [--glob G] [--state FILE] [--follow] [--format ...]

`onprem files GROUP PROFILE [PATH]`, the listing's older spelling, still works: when the word after `files` is
not one of these subcommands it is a group, and `list` is meant (`legacy_argv`). A group named like a subcommand
(say "stat") is listed with `onprem files list stat PROFILE`.

`files poll --state FILE` keeps the marker between runs as `onprem changes --state` keeps a watermark: read at the
start, replaced atomically after each poll's files were written.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from onprem.operator_cli import listing
from onprem.operator_cli.commands import CommandMaker, add_idempotency_option
from onprem.operator_cli.errors import EXIT_OK, LocalFileError, UsageError
from onprem.operator_cli.output import to_json
from onprem.v1 import files_pb2, files_pb2_grpc

if TYPE_CHECKING:
    from onprem.operator_cli.main import Connection

SUBCOMMANDS = ("list", "stat", "rm", "mv", "mkdir", "poll")
DEFAULT_INTERVAL = 2.0


def legacy_argv(argv: Sequence[str], root: argparse.ArgumentParser, listing_parser: argparse.ArgumentParser
                ) -> list[str]:
    """`argv` with `list` put after `files` when the next word is a group rather than a subcommand."""
    args = list(argv)
    command_at = _first_positional(args, 0, root)
    if command_at is None or args[command_at] != "files":
        return args
    word_at = _first_positional(args, command_at + 1, listing_parser)
    if word_at is not None and args[word_at] not in SUBCOMMANDS:
        args.insert(command_at + 1, "list")
    return args


def _first_positional(args: Sequence[str], start: int, parser: argparse.ArgumentParser) -> int | None:
    """The index of the first word from `start` that is not an option of `parser` or an option's value."""
    takes_value = {s for action in parser._actions if action.nargs != 0 for s in action.option_strings}
    i = start
    while i < len(args):
        word = args[i]
        if word == "--":
            return i + 1 if i + 1 < len(args) else None
        if word.startswith("-") and word != "-":
            i += 2 if word in takes_value else 1  # "--glob=x" is one word
            continue
        return i
    return None


def _where(args: argparse.Namespace, path: str) -> str:
    return f"{args.group}/{args.profile}:{path}"


def _kind(info: files_pb2.FileInfo) -> str:
    return "folder" if info.type == files_pb2.FILE_TYPE_DIRECTORY else "file"


def _stub(conn: Connection) -> files_pb2_grpc.FileServiceStub:
    return files_pb2_grpc.FileServiceStub(conn.channel)


def cmd_list(conn: Connection, args: argparse.Namespace) -> int:
    listing.run(conn.channel, conn.metadata, conn.timeout, args, sys.stdout)
    return EXIT_OK


def cmd_stat(conn: Connection, args: argparse.Namespace) -> int:
    response = _stub(conn).Stat(files_pb2.StatRequest(group=args.group, profile=args.profile, path=args.path),
                                metadata=conn.metadata, timeout=conn.timeout)
    if args.format == "json":
        sys.stdout.write(to_json(response) + "\n")
    else:
        writer = listing.TableWriter(sys.stdout)
        writer.page([response.info])
    return EXIT_OK


def cmd_rm(conn: Connection, args: argparse.Namespace) -> int:
    request = files_pb2.DeleteRequest(group=args.group, profile=args.profile, path=args.path,
                                      recursive=args.recursive)
    response = _stub(conn).Delete(request, metadata=conn.write_metadata(args.idempotency_key), timeout=conn.timeout)
    if args.format == "json":
        sys.stdout.write(to_json(response) + "\n")
    else:
        print(f"deleted {_kind(response.info)} {_where(args, response.info.path)}")
    return EXIT_OK


def cmd_mv(conn: Connection, args: argparse.Namespace) -> int:
    request = files_pb2.MoveRequest(group=args.group, profile=args.profile, path=args.path,
                                    destination_path=args.destination, overwrite=args.overwrite)
    response = _stub(conn).Move(request, metadata=conn.write_metadata(args.idempotency_key), timeout=conn.timeout)
    if args.format == "json":
        sys.stdout.write(to_json(response) + "\n")
    else:
        print(f"moved {_where(args, args.path)} to {response.info.path}")
    return EXIT_OK


def cmd_mkdir(conn: Connection, args: argparse.Namespace) -> int:
    request = files_pb2.MakeDirectoryRequest(group=args.group, profile=args.profile, path=args.path,
                                             parents=args.parents)
    response = _stub(conn).MakeDirectory(request, metadata=conn.write_metadata(args.idempotency_key),
                                         timeout=conn.timeout)
    if args.format == "json":
        sys.stdout.write(to_json(response) + "\n")
    else:
        print(f"folder {_where(args, response.info.path)} exists")
    return EXIT_OK


def _load_marker(path: Path | None) -> str:
    if path is None or not path.exists():
        return ""
    try:
        return path.read_text().strip()
    except OSError as e:
        raise LocalFileError(f"cannot read {path}: {e.strerror}") from None


def _save_marker(path: Path, marker: str) -> None:
    part = path.with_name(path.name + ".onprem-part")
    try:
        part.write_text(marker + "\n")
        os.replace(part, path)
    except OSError as e:
        raise LocalFileError(f"cannot write {path}: {e.strerror}") from None


def cmd_poll(conn: Connection, args: argparse.Namespace) -> int:
    if args.interval <= 0 or args.max_files < 0 or args.settle_ms < 0:
        raise UsageError("--interval must be more than 0, --max-files and --settle-ms 0 (the agent's default) or more")
    state = Path(args.state) if args.state else None
    marker = _load_marker(state)
    out: IO[str] = sys.stdout
    writer: listing.TableWriter | listing.JsonLinesWriter = (
        listing.TableWriter(out) if args.format == "table" else listing.JsonLinesWriter(out))
    stub = _stub(conn)

    def poll() -> bool:
        nonlocal marker
        response = stub.Poll(files_pb2.PollRequest(
            group=args.group, profile=args.profile, path=args.path, recursive=args.recursive, glob=args.glob,
            marker=marker, max_files=args.max_files, settle_ms=args.settle_ms),
            metadata=conn.metadata, timeout=conn.timeout)
        if response.entries:
            writer.page(response.entries)  # flushed: the files are out before the marker that skips them is saved
        marker = response.marker
        if state is not None:
            _save_marker(state, marker)
        return response.has_more

    if not args.follow:
        while poll():
            pass
        writer.close()
        return EXIT_OK
    stop = threading.Event()  # Ctrl-C ends a follow between polls (see `onprem changes`)
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
    try:
        while not stop.is_set():
            if not poll():
                stop.wait(args.interval)
    finally:
        signal.signal(signal.SIGINT, previous)
    writer.close()
    return EXIT_OK


def _target(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("group")
    p.add_argument("profile")
    p.add_argument("path", help=help_text)


def _text_or_json(p: argparse.ArgumentParser, response: str) -> None:
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help=f"text (default) or json (the {response} response)")


def add_commands(command: CommandMaker) -> argparse.ArgumentParser:
    """Register `onprem files ...`; returns the `files list` parser (legacy_argv reads its options)."""
    p = command("files", "a folder profile's files: list, stat, rm, mv, mkdir, poll (`onprem files GROUP PROFILE` "
                "lists, as before)", None,
                ["onprem files list demo demo-files --recursive", "onprem files mkdir demo demo-files archive/2026",
                 "onprem files poll demo demo-files incoming --state incoming.marker --follow"])
    family = command.family(p, required=True)

    listing_parser = family("list", "list a folder of a folder profile, every page of it: type, size, modification "
                            "time (UTC) and path", cmd_list,
                            ["onprem files list demo demo-files --recursive",
                             "onprem files list demo demo-files reports --glob '*.csv' --format jsonl"])
    listing.add_arguments(listing_parser)

    p = family("stat", "describe one file or folder: type, size, modification time (UTC), path", cmd_stat,
               ["onprem files stat demo demo-files reports/2026-10.csv",
                "onprem files stat demo demo-files reports --format json"])
    _target(p, "the path in the folder profile")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="table (default) or json (the Stat response)")

    p = family("rm", "delete a file, or an empty folder (--recursive: a folder and everything in it)", cmd_rm,
               ["onprem files rm demo demo-files incoming/old.csv",
                "onprem files rm demo demo-files archive/2019 --recursive --idempotency-key purge-2019"])
    _target(p, "the path to delete (never the root)")
    p.add_argument("--recursive", "-r", action="store_true", help="delete a folder and everything in it")
    _text_or_json(p, "Delete")
    add_idempotency_option(p)

    p = family("mv", "move or rename a file or folder within the profile", cmd_mv,
               ["onprem files mv demo demo-files incoming/report.csv archive/report.csv",
                "onprem files mv demo demo-files draft.txt final.txt --overwrite --idempotency-key publish-42"])
    _target(p, "the current path")
    p.add_argument("destination", help="the new path, in the same profile")
    p.add_argument("--overwrite", action="store_true", help="replace a file already at DESTINATION")
    _text_or_json(p, "Move")
    add_idempotency_option(p)

    p = family("mkdir", "create a folder", cmd_mkdir,
               ["onprem files mkdir demo demo-files archive",
                "onprem files mkdir demo demo-files archive/2026/10 --parents"])
    _target(p, "the new folder's path")
    p.add_argument("--parents", "-p", action="store_true",
                   help="create missing parent folders, and succeed if the folder exists")
    _text_or_json(p, "MakeDirectory")
    add_idempotency_option(p)

    p = family("poll", "print the files that appeared or changed after a marker, oldest first (\"new file in "
               "folder\" triggers); --state keeps the marker between runs, --follow keeps polling", cmd_poll,
               ["onprem files poll demo demo-files incoming --recursive",
                "onprem files poll demo demo-files incoming --glob '*.csv' --state incoming.marker --follow "
                "--format jsonl"])
    p.add_argument("group")
    p.add_argument("profile")
    p.add_argument("path", nargs="?", default="", help="the folder to watch (default: the profile's root)")
    p.add_argument("--recursive", "-r", action="store_true", help="include files in sub-folders")
    p.add_argument("--glob", default="", help="only files whose name matches, e.g. '*.csv'")
    p.add_argument("--state", metavar="FILE", help="read the marker from FILE (if it exists) and save the new one "
                   "there after each poll")
    p.add_argument("--max-files", type=int, default=0, help="files per poll (0: the agent's default, 1000); every "
                   "poll runs until no more files are waiting")
    p.add_argument("--settle-ms", type=int, default=0, help="report a file only once unchanged this long (0: the "
                   "agent's default, 2000)")
    p.add_argument("--format", choices=["table", "jsonl"], default="table",
                   help="table (default) or jsonl (one FileInfo a line)")
    p.add_argument("--follow", "-f", action="store_true", help="keep polling every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL,
                   help=f"seconds between polls with --follow (default {DEFAULT_INTERVAL:g})")
    return listing_parser
