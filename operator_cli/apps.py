"""`onprem app call`: one HTTP request to an app profile through `AppService/Call`, bodies streamed both ways.

    onprem app call GROUP PROFILE METHOD PATH [--header 'Name: value' ...] [--query NAME=VALUE ...]
                    [--data @FILE | --data - | --data TEXT] [--output FILE] [--include] [--fail]
                    [--idempotency-key KEY] [--progress]

The response body goes to stdout (or --output FILE, which appears only once the whole body arrived), exactly as
the app sent it; --include writes the status line and headers to stderr. An HTTP 4xx or 5xx is a response like
any other (exit 0) unless --fail asks for exit 11. A body from a file or the command line is sent with its
Content-Length (many apps do not read chunked bodies); one from stdin is sent chunked unless --header gives a
Content-Length. Long bodies show progress on stderr when it is a terminal (or with --progress).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO
from urllib.parse import parse_qsl

from onprem.operator_cli.commands import CommandMaker, add_idempotency_option
from onprem.operator_cli.errors import EXIT_HTTP, EXIT_OK, CliError, LocalFileError, UsageError
from onprem.operator_cli.transfer import CHUNK_SIZE, PART_SUFFIX, Progress, local_file_size
from onprem.v1 import apps_pb2, apps_pb2_grpc

if TYPE_CHECKING:
    from onprem.operator_cli.main import Connection


def parse_header(text: str) -> apps_pb2.Header:
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or name != name.strip():
        raise UsageError(f"--header {text!r}: expected 'Name: value'")
    return apps_pb2.Header(name=name, value=value.strip())


def parse_query(text: str) -> apps_pb2.QueryParameter:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise UsageError(f"--query {text!r}: expected NAME=VALUE")
    return apps_pb2.QueryParameter(name=name, value=value)


class Body:
    """Where the request body comes from: nothing, a file, stdin, or the command line's text."""

    def __init__(self, data: str | None) -> None:
        self.size: int | None = 0
        self._path: Path | None = None
        self._text = b""
        self._stdin = False
        if data is None:
            return
        if data == "-":
            self._stdin, self.size = True, None
        elif data.startswith("@"):
            self._path = Path(data[1:])
            self.size = local_file_size(self._path)
        else:
            self._text = data.encode()
            self.size = len(self._text)

    @property
    def label(self) -> str:
        return str(self._path) if self._path else "stdin" if self._stdin else "body"

    def chunks(self, progress: Progress) -> Iterator[bytes]:
        if self._text:
            progress.advance(len(self._text))
            yield self._text
            return
        source: BinaryIO
        if self._path is not None:
            try:
                source = self._path.open("rb")
            except OSError as e:
                raise LocalFileError(f"cannot read {self._path}: {e.strerror}") from None
        elif self._stdin:
            source = sys.stdin.buffer
        else:
            return
        try:
            while chunk := source.read(CHUNK_SIZE):
                progress.advance(len(chunk))
                yield chunk
        finally:
            if source is not sys.stdin.buffer:
                source.close()


def head_of(args: argparse.Namespace, body: Body) -> apps_pb2.CallHead:
    path, _, query_string = args.path.partition("?")
    head = apps_pb2.CallHead(group=args.group, profile=args.profile, method=args.method.upper(), path=path)
    head.query.extend(apps_pb2.QueryParameter(name=n, value=v) for n, v in parse_qsl(query_string,
                                                                                   keep_blank_values=True))
    head.query.extend(parse_query(q) for q in args.query)
    head.headers.extend(parse_header(h) for h in args.header)
    if body.size and not any(h.name.lower() == "content-length" for h in head.headers):
        head.headers.add(name="Content-Length", value=str(body.size))
    return head


def _requests(head: apps_pb2.CallHead, body: Body, progress: Progress) -> Iterator[apps_pb2.CallRequest]:
    yield apps_pb2.CallRequest(head=head)
    for chunk in body.chunks(progress):
        yield apps_pb2.CallRequest(body=chunk)
    progress.finish()


def _progress_stream(args: argparse.Namespace) -> IO[str] | None:
    return sys.stderr if args.progress or sys.stderr.isatty() else None


def _content_length(head: apps_pb2.CallResponseHead) -> int | None:
    for h in head.headers:
        if h.name.lower() == "content-length" and h.value.isdigit():
            return int(h.value)
    return None


def cmd_call(conn: Connection, args: argparse.Namespace) -> int:
    body = Body(args.data)
    head = head_of(args, body)
    stream_progress = _progress_stream(args)
    sent = Progress(f"{body.label} (sent)", body.size, stream_progress if args.data else None)
    stub = apps_pb2_grpc.AppServiceStub(conn.channel)
    responses = stub.Call(_requests(head, body, sent), metadata=conn.write_metadata(args.idempotency_key),
                          timeout=conn.timeout)
    target = Path(args.output) if args.output else None
    part = target.with_name(target.name + PART_SUFFIX) if target else None
    status = 0
    try:
        with contextlib.ExitStack() as stack:
            out: BinaryIO = sys.stdout.buffer
            if part is not None:
                try:
                    out = stack.enter_context(part.open("wb"))
                except OSError as e:
                    raise LocalFileError(f"cannot write {part}: {e.strerror}") from None
            received: Progress | None = None
            for message in responses:
                if message.WhichOneof("part") == "head":
                    status = message.head.status_code
                    if args.include:
                        lines = [f"HTTP {status}", *(f"{h.name}: {h.value}" for h in message.head.headers)]
                        print("\n".join(lines) + "\n", file=sys.stderr, flush=True)
                    received = Progress(f"{args.output} (received)", _content_length(message.head),
                                        stream_progress if part is not None else None)
                else:
                    try:
                        out.write(message.body)
                        out.flush()
                    except OSError as e:
                        if isinstance(e, BrokenPipeError):
                            raise
                        raise LocalFileError(f"cannot write {args.output or 'stdout'}: {e.strerror}") from None
                    if received is not None:
                        received.advance(len(message.body))
            if received is not None and part is not None:
                received.finish()
        if part is not None and target is not None:
            os.replace(part, target)
    except BaseException:
        responses.cancel()  # type: ignore[no-untyped-call]
        if part is not None:
            part.unlink(missing_ok=True)
        raise
    if args.fail and status >= 400:
        raise CliError("HTTP_ERROR", f"{args.group}/{args.profile} answered HTTP {status} to {head.method} "
                       f"{args.path}", EXIT_HTTP)
    return EXIT_OK


def add_commands(command: CommandMaker) -> None:
    p = command("app", "HTTP apps reachable from an agent, through app profiles", None,
                ["onprem app call demo demo-app GET orders/2"])
    family = command.family(p, required=True)
    p = family("call", "send one HTTP request to an app profile; the response body goes to stdout, the agent adds "
               "the app's credentials", cmd_call,
               ["onprem app call demo demo-app GET orders/2",
                "onprem app call demo demo-app POST orders --header 'Content-Type: application/json' "
                "--data @order.json --idempotency-key order-1001",
                "onprem app call demo demo-app GET 'orders?status=open' --include --fail --output open.json"])
    p.add_argument("group")
    p.add_argument("profile")
    p.add_argument("method", help="the HTTP method, e.g. GET or POST")
    p.add_argument("path", help="the path under the profile's base URL, e.g. orders/42 (a ?query is split into "
                   "parameters)")
    p.add_argument("--header", "-H", action="append", default=[], metavar="'NAME: VALUE'",
                   help="a request header (repeatable); the headers the agent injects cannot be sent")
    p.add_argument("--query", "-q", action="append", default=[], metavar="NAME=VALUE",
                   help="a query-string parameter (repeatable)")
    p.add_argument("--data", "-d", metavar="@FILE|-|TEXT",
                   help="the request body: @FILE a file, - stdin (streamed either way), else the text itself")
    p.add_argument("--output", "-o", metavar="FILE", help="write the response body to FILE instead of stdout; it "
                   "appears only once the whole body arrived")
    p.add_argument("--include", "-i", action="store_true",
                   help="write the response's status line and headers to stderr")
    p.add_argument("--fail", action="store_true", help="exit 11 when the app answers HTTP 400 or more")
    p.add_argument("--progress", action="store_true", help="show progress on stderr even when it is not a terminal")
    add_idempotency_option(p)
