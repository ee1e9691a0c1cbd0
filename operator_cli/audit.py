"""`onprem audit`: the audit log through `AuditService/ListAuditEvents`, for people and for SIEMs.

    onprem audit [--since 1h|TIME] [--until TIME] [--group G] [--token-id ID] [--agent ID] [--profile P]
                 [--kind KIND] [--outcome CODE] [--trace-id ID] [--limit N] [--format table|jsonl|csv|json] [--output FILE]
                 [--follow [--interval SECONDS]]

Without --follow: the newest events first, up to --limit (0: every one), page after page, each written as it
arrives. With --follow it works like `tail -f`: the latest --limit events oldest first, then new ones as they
are written, until Ctrl-C (exit 0). Following polls every --interval seconds (default 2) for events at or
after the newest one printed less `OVERLAP` seconds, and prints those it has not printed: rows are written in
batches and several replicas may commit theirs out of time order, so a poll from exactly the last time could
miss one. An event written more than `OVERLAP` seconds after its request ended (the store was down meanwhile)
can still be missed; a listing with --since finds it.

JSON lines and CSV carry one event a line with the same fields (`EXPORT_FIELDS`, documented in
docs/operators.md), numbers as numbers and times as UTC ISO 8601, so that a SIEM can read them as they are.
--output appends to a file (a collector tailing it keeps what it read) instead of writing to stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import IO, TYPE_CHECKING

from google.protobuf import json_format, timestamp_pb2

from onprem.operator_cli.errors import EXIT_OK, LocalFileError, UsageError
from onprem.operator_cli.tokens import parse_duration
from onprem.v1 import audit_pb2, audit_pb2_grpc

if TYPE_CHECKING:
    from onprem.operator_cli.commands import CommandMaker
    from onprem.operator_cli.main import Connection

#: The fields of an exported event, in this order (CSV's columns).
EXPORT_FIELDS = ("id", "time", "principal", "token_id", "role", "method", "group", "agent_id", "profile", "kind",
                 "outcome", "code", "bytes_out", "duration_ms", "detail", "peer", "trace_id")
#: Seconds a follow poll looks back before the newest event it printed.
OVERLAP = 30.0
DEFAULT_INTERVAL = 2.0
DEFAULT_LIMIT = 100
PAGE_SIZE = 1000
KINDS = ("database", "folder", "app", "admin", "request", "enroll", "auth")


def parse_time(text: str, now: datetime) -> datetime:
    """A time as ISO 8601 (UTC when it names no offset), or a duration ago: "1h", "7d", "30m"."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"invalid time {text!r}: use e.g. 2030-01-02T03:04:05Z or a duration ago such as 1h or 7d") \
            from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _iso(ts: timestamp_pb2.Timestamp) -> str:
    return ts.ToDatetime(tzinfo=UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def export_record(event: audit_pb2.AuditEvent) -> dict[str, object]:
    """An event as exported: every field always present, numbers as numbers, the time in UTC ISO 8601."""
    return {
        "id": event.id, "time": _iso(event.time), "principal": event.principal, "token_id": event.token_id,
        "role": event.role, "method": event.method, "group": event.group, "agent_id": event.agent_id,
        "profile": event.profile, "kind": event.kind, "outcome": event.outcome, "code": event.code,
        "bytes_out": event.bytes_out, "duration_ms": event.duration_ms, "detail": event.detail, "peer": event.peer,
        "trace_id": event.trace_id,
    }


# --- writers -------------------------------------------------------------------------------------------------------


class JsonLinesWriter:
    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def write(self, events: Sequence[audit_pb2.AuditEvent]) -> None:
        for event in events:
            self._out.write(json.dumps(export_record(event), ensure_ascii=False, separators=(",", ":")) + "\n")
        self._out.flush()

    def close(self) -> None:
        self._out.flush()


class CsvWriter:
    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._csv = csv.writer(out, lineterminator="\n")
        self._csv.writerow(EXPORT_FIELDS)

    def write(self, events: Sequence[audit_pb2.AuditEvent]) -> None:
        self._csv.writerows([export_record(e)[name] for name in EXPORT_FIELDS] for e in events)
        self._out.flush()

    def close(self) -> None:
        self._out.flush()


class JsonWriter:
    """One ListAuditEventsResponse-shaped object with every event, as grpcurl prints it (written at the end)."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._events: list[audit_pb2.AuditEvent] = []

    def write(self, events: Sequence[audit_pb2.AuditEvent]) -> None:
        self._events.extend(events)

    def close(self) -> None:
        message = audit_pb2.ListAuditEventsResponse(events=self._events)
        self._out.write(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2) + "\n")
        self._out.flush()


TABLE_HEADERS = ("TIME", "PRINCIPAL", "KIND", "METHOD", "GROUP", "PROFILE", "OUTCOME", "MS", "DETAIL")


class TableWriter:
    """A table for people; column widths from the first batch, DETAIL last and never padded."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._widths: list[int] | None = None

    @staticmethod
    def _cells(event: audit_pb2.AuditEvent) -> list[str]:
        return [event.time.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), event.principal, event.kind,
                event.method.rsplit(".", 1)[-1] or "-", event.group or "-", event.profile or "-", event.outcome,
                str(event.duration_ms), event.detail]

    def write(self, events: Sequence[audit_pb2.AuditEvent]) -> None:
        rows = [self._cells(e) for e in events]
        if self._widths is None:
            self._widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(TABLE_HEADERS[:-1])]
            self._out.write(self._line(TABLE_HEADERS))
        for row in rows:
            self._out.write(self._line(row))
        self._out.flush()

    def _line(self, cells: Sequence[str]) -> str:
        assert self._widths is not None
        padded = [c.rjust(w) if i == 7 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, self._widths, strict=False))]
        return "  ".join([*padded, cells[-1]]).rstrip() + "\n"

    def close(self) -> None:
        if self._widths is None:
            self.write([])


Writer = JsonLinesWriter | CsvWriter | JsonWriter | TableWriter
WRITERS: dict[str, Callable[[IO[str]], Writer]] = {
    "table": TableWriter, "jsonl": JsonLinesWriter, "csv": CsvWriter, "json": JsonWriter}


# --- the command ---------------------------------------------------------------------------------------------------


def request_of(args: argparse.Namespace, now: datetime) -> audit_pb2.ListAuditEventsRequest:
    request = audit_pb2.ListAuditEventsRequest(
        token_id=args.token_id or "", group=args.group or "", agent_id=args.agent or "", profile=args.profile or "",
        kind=args.kind or "", outcome=(args.outcome or "").upper(), trace_id=(args.trace_id or "").lower())
    if args.since:
        request.start_time.FromDatetime(parse_time(args.since, now))
    if args.until:
        request.end_time.FromDatetime(parse_time(args.until, now))
    return request


def events(conn: Connection, request: audit_pb2.ListAuditEventsRequest, limit: int
           ) -> Iterator[list[audit_pb2.AuditEvent]]:
    """Pages of events, newest first, up to `limit` events in all (0: every one)."""
    stub = audit_pb2_grpc.AuditServiceStub(conn.channel)
    shown = 0
    page = audit_pb2.ListAuditEventsRequest()
    page.CopyFrom(request)
    while True:
        page.page_size = min(PAGE_SIZE, limit - shown) if limit else PAGE_SIZE
        response = stub.ListAuditEvents(page, metadata=conn.metadata, timeout=conn.timeout)
        shown += len(response.events)
        yield list(response.events)
        if not response.next_page_token or (limit and shown >= limit):
            return
        page.page_token = response.next_page_token


def _chronological(batch: list[audit_pb2.AuditEvent]) -> list[audit_pb2.AuditEvent]:
    return sorted(batch, key=lambda e: (e.time.seconds, e.time.nanos, e.id))


def follow(conn: Connection, request: audit_pb2.ListAuditEventsRequest, writer: Writer, limit: int,
           interval: float, sleep: Callable[[float], object] = time.sleep,
           stopped: Callable[[], bool] = lambda: False) -> None:
    """The latest `limit` events oldest first, then every new one, until `stopped()` (or interrupted)."""
    latest = [e for page in events(conn, request, limit) for e in page]
    printed: dict[int, datetime] = {}

    def show(batch: list[audit_pb2.AuditEvent]) -> None:
        batch = _chronological([e for e in batch if e.id not in printed])
        writer.write(batch)
        for e in batch:
            printed[e.id] = e.time.ToDatetime(tzinfo=UTC)

    show(latest)
    while not stopped():
        sleep(interval)
        if stopped():
            return
        poll = audit_pb2.ListAuditEventsRequest()
        poll.CopyFrom(request)
        if printed:
            # Server times only: the newest printed event's, less the overlap (no clock of this host is involved).
            since = max(printed.values()) - timedelta(seconds=OVERLAP)
            if not request.HasField("start_time") or since > request.start_time.ToDatetime(tzinfo=UTC):
                poll.start_time.FromDatetime(since)
            for event_id in [i for i, at in printed.items() if at < since]:
                del printed[event_id]  # older than any poll will ask for again
        show([e for page in events(conn, poll, 0) for e in page])


def cmd_audit(conn: Connection, args: argparse.Namespace) -> int:
    if args.follow and args.until:
        raise UsageError("--follow shows new events as they come: it takes no --until")
    if args.limit < 0 or args.interval <= 0:
        raise UsageError("--limit must be 0 (every event) or more, --interval more than 0")
    request = request_of(args, datetime.now(UTC))
    with ExitStack() as stack:
        out: IO[str] = sys.stdout
        if args.output:
            try:
                out = stack.enter_context(open(args.output, "a", encoding="utf-8"))
            except OSError as e:
                raise LocalFileError(f"cannot open {args.output}: {e.strerror}") from None
        writer = WRITERS[args.format](out)
        if args.follow:
            # Ctrl-C is how a follow ends, not an error. It only sets a flag: a KeyboardInterrupt raised
            # inside a blocking gRPC call can leave the channel hanging instead of ending the process.
            stop = threading.Event()
            previous = signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
            try:
                follow(conn, request, writer, args.limit, args.interval, sleep=stop.wait, stopped=stop.is_set)
            finally:
                signal.signal(signal.SIGINT, previous)
        else:
            for page in events(conn, request, args.limit):
                writer.write(page)
        writer.close()
    return EXIT_OK


def add_command(command: CommandMaker) -> None:
    p = command("audit", "list audit events, newest first, as a table or for a SIEM (jsonl, csv, json); --follow "
                "prints new ones as they are written", cmd_audit,
                ["onprem audit --since 24h --group demo",
                 "onprem audit --since 2030-01-02T00:00:00Z --outcome PERMISSION_DENIED --format csv > denied.csv",
                 "onprem audit --follow --limit 0 --format jsonl --output /var/log/onprem/audit.jsonl"])
    p.add_argument("--since", help="only events at or after this time: ISO 8601 (UTC unless it says) or a duration "
                   "ago, e.g. 1h or 7d")
    p.add_argument("--until", help="only events before this time (same forms as --since)")
    p.add_argument("--group", help="only the events of this group")
    p.add_argument("--token-id", help="only the calls of this operator token (its id, as `onprem tokens` shows it)")
    p.add_argument("--agent", help="only the events of this agent id")
    p.add_argument("--profile", help="only the events of this profile")
    p.add_argument("--kind", choices=KINDS, help="only events of this kind")
    p.add_argument("--trace-id", help="only the events of this trace (its W3C trace id: 32 hex digits, as the "
                                      "jsonl, csv and json formats show it and the log lines of the request carry)")
    p.add_argument("--outcome", help="only events that ended with this gRPC status, e.g. OK or PERMISSION_DENIED")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help=f"at most this many events (default {DEFAULT_LIMIT}; 0: every one)")
    p.add_argument("--format", choices=sorted(WRITERS), default="table",
                   help="table (default), jsonl or csv (one event a line, for a SIEM; fields in docs/operators.md), "
                   "or json (the events as one ListAuditEventsResponse)")
    p.add_argument("--output", help="append to this file instead of writing to stdout")
    p.add_argument("--follow", "-f", action="store_true",
                   help="after the latest events (oldest first), print new ones as they are written, until Ctrl-C")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL,
                   help=f"seconds between polls with --follow (default {DEFAULT_INTERVAL:g})")
