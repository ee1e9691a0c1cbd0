"""`onprem files`: a folder profile's listing, page after page, as a table or as JSON lines.

It follows `next_page_token` until the last page and writes each page as it arrives, so a folder of any size
lists in constant memory. The table streams like `query --format table`: column widths come from the first
page (a longer size later widens only its own line); the path is the last column and is never padded.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from datetime import UTC
from typing import IO

import grpc
from google.protobuf import json_format, timestamp_pb2

from onprem.v1 import files_pb2, files_pb2_grpc

HEADERS = ("TYPE", "SIZE", "MODIFIED", "PATH")
_KINDS = {files_pb2.FILE_TYPE_FILE: "file", files_pb2.FILE_TYPE_DIRECTORY: "folder"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("group")
    parser.add_argument("profile")
    parser.add_argument("path", nargs="?", default="", help="the folder to list (default: the profile's root)")
    parser.add_argument("--recursive", "-r", action="store_true", help="list sub-folders too, in path order")
    parser.add_argument("--glob", default="", help="only entries whose name matches, e.g. '*.csv'")
    parser.add_argument("--format", choices=["table", "jsonl"], default="table",
                        help="table (default: type, size, modification time in UTC, path) or jsonl (one FileInfo "
                        "per line, as grpcurl prints it)")


def pages(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...], timeout: float | None,
          args: argparse.Namespace) -> Iterator[files_pb2.ListResponse]:
    """Every page of the listing, asking for the next one only once the previous one was written."""
    stub = files_pb2_grpc.FileServiceStub(channel)
    token = ""
    while True:
        page = stub.List(files_pb2.ListRequest(group=args.group, profile=args.profile, path=args.path,
                                               recursive=args.recursive, glob=args.glob, page_token=token),
                         metadata=metadata, timeout=timeout)
        yield page
        token = page.next_page_token
        if not token:
            return


def format_time(ts: timestamp_pb2.Timestamp) -> str:
    """As `onprem agents` shows times: UTC ISO 8601 to the second, "-" when unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TableWriter:
    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._size_width = 0  # 0 until the first page has set it

    def page(self, entries: Sequence[files_pb2.FileInfo]) -> None:
        rows = [(_KINDS.get(e.type, "?"), str(e.size) if e.type == files_pb2.FILE_TYPE_FILE else "-",
                 format_time(e.modified_at), e.path) for e in entries]
        if not self._size_width:
            self._size_width = max([len(HEADERS[1]), *(len(r[1]) for r in rows)])
            self._out.write(self._line(HEADERS, aligned=False))
        for row in rows:
            self._out.write(self._line(row, aligned=True))
        self._out.flush()

    def _line(self, cells: tuple[str, str, str, str], aligned: bool) -> str:
        size = cells[1].rjust(self._size_width) if aligned else cells[1].ljust(self._size_width)
        return f"{cells[0]:<6}  {size}  {cells[2]:<20}  {cells[3]}".rstrip() + "\n"

    def close(self) -> None:
        if not self._size_width:
            self.page([])


class JsonLinesWriter:
    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def page(self, entries: Sequence[files_pb2.FileInfo]) -> None:
        for entry in entries:
            obj = json_format.MessageToDict(entry, preserving_proto_field_name=True)
            self._out.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._out.flush()

    def close(self) -> None:
        self._out.flush()


def run(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...], timeout: float | None,
        args: argparse.Namespace, out: IO[str]) -> None:
    writer: TableWriter | JsonLinesWriter = TableWriter(out) if args.format == "table" else JsonLinesWriter(out)
    for page in pages(channel, metadata, timeout, args):
        writer.page(page.entries)
    writer.close()
