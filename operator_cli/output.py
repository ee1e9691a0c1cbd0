"""What the listing commands print: an aligned table for people, or for programs the response as JSON (as grpcurl
prints it), one JSON object a line, or CSV with the table's columns.

    --format table   the columns below, times in UTC to the second, "-" for unset
    --format json    the whole response message, proto field names, enums by name
    --format jsonl   one message a line (e.g. one Agent), compact, in the same JSON mapping
    --format csv     a header line of the table's columns (lower case, "_" for blanks) and one line per row
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import IO, Generic, TypeVar

from google.protobuf import duration_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message

FORMATS = ("table", "json", "jsonl", "csv")
FORMAT_HELP = ("table (default, for people), json (the response as grpcurl prints it), jsonl (one record a line) "
               "or csv (the table's columns)")

M = TypeVar("M", bound=Message)


def format_time(ts: timestamp_pb2.Timestamp) -> str:
    """A timestamp as UTC ISO 8601 to the second, "-" when unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_duration(d: duration_pb2.Duration) -> str:
    return f"{d.ToTimedelta().total_seconds():g}s"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] = ()) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    align = list(right) or [False] * len(headers)

    def line(cells: Sequence[str], aligned: bool) -> str:
        parts = [c.rjust(w) if aligned and a else c.ljust(w) for c, w, a in zip(cells, widths, align, strict=True)]
        return "  ".join(parts).rstrip() + "\n"

    return line(headers, False) + "".join(line(r, True) for r in rows)


def to_json(message: Message) -> str:
    # The same JSON grpcurl prints: proto field names, enums by name.
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2)


def to_json_line(message: Message) -> str:
    obj = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Column(Generic[M]):
    """One column of a table: its header, its cell for a record, and whether numbers align right."""

    header: str
    cell: Callable[[M], str]
    right: bool = False


def write_records(out: IO[str], fmt: str, records: Sequence[M], columns: Sequence[Column[M]],
                  response: Message) -> None:
    """`records` (the response's repeated field) in the chosen format; `json` prints the whole `response`."""
    if fmt == "json":
        out.write(to_json(response) + "\n")
    elif fmt == "jsonl":
        out.writelines(to_json_line(r) + "\n" for r in records)
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([c.header.lower().replace(" ", "_").replace("-", "_") for c in columns])
        writer.writerows([c.cell(r) for c in columns] for r in records)
    else:
        out.write(render_table([c.header for c in columns], [[c.cell(r) for c in columns] for r in records],
                               [c.right for c in columns]))
    out.flush()
