"""`onprem batch|transaction|changes`: the database writes and change polls of `DatabaseService`.

    onprem batch GROUP PROFILE --sql SQL (--rows-jsonl FILE|- | --params-file FILE) [--idempotency-key KEY]
    onprem transaction GROUP PROFILE (--file STEPS.json|- | --sql SQL ...) [--idempotency-key KEY]
    onprem changes GROUP PROFILE (--table T | --sql SQL) --watermark-column C --key-column K
                   [--state FILE] [--follow [--interval S]] [--max-rows N] [--format csv|jsonl|table]

Parameters come as JSON: numbers, text, true/false and null by their JSON type, or an object in `Value`'s JSON
mapping to name a type ({"date_value": "2026-01-02"}, {"decimal_value": "12.50"}). A batch takes one object per
parameter set (a JSON line each, or a JSON array of them); a transaction's file is a JSON array of
{"sql": ..., "parameters": {...}}.

`changes --state FILE` keeps the watermark between runs: read at the start (when the file exists) and replaced,
atomically, after each poll's rows were written to stdout. A run that dies after printing rows but before saving
the watermark prints them again next time (at least once, never a row missed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import IO, TYPE_CHECKING

from google.protobuf import json_format

from onprem.operator_cli import rows as rowsmod
from onprem.operator_cli.commands import CommandMaker, add_idempotency_option
from onprem.operator_cli.errors import EXIT_OK, LocalFileError, UsageError
from onprem.operator_cli.output import render_table, to_json
from onprem.v1 import database_pb2, database_pb2_grpc, values_pb2

if TYPE_CHECKING:
    from onprem.operator_cli.main import Connection

DEFAULT_INTERVAL = 2.0


def _open_input(name: str) -> IO[str]:
    if name == "-":
        return sys.stdin
    try:
        return open(name, encoding="utf-8")  # closed by the caller
    except OSError as e:
        raise LocalFileError(f"cannot read {name}: {e.strerror}") from None


def _load_json(name: str) -> object:
    f = _open_input(name)
    try:
        return json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{name}: not JSON: {e}") from None
    finally:
        if f is not sys.stdin:
            f.close()


def parameter_sets(args: argparse.Namespace) -> Iterator[dict[str, values_pb2.Value]]:
    """The batch's parameter sets, from JSON lines or a JSON array, in order."""
    try:
        if args.rows_jsonl:
            f = _open_input(args.rows_jsonl)
            try:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise UsageError(f"{args.rows_jsonl} line {number}: not JSON: {e}") from None
                        yield rowsmod.json_parameters(obj, f"{args.rows_jsonl} line {number}")
            finally:
                if f is not sys.stdin:
                    f.close()
        else:
            sets = _load_json(args.params_file)
            if not isinstance(sets, list):
                raise UsageError(f"{args.params_file}: expected a JSON array of parameter objects")
            for number, obj in enumerate(sets, start=1):
                yield rowsmod.json_parameters(obj, f"{args.params_file} item {number}")
    except ValueError as e:
        raise UsageError(str(e)) from None


def _copy_parameters(target: MutableMapping[str, values_pb2.Value], parameters: dict[str, values_pb2.Value]) -> None:
    for name, value in parameters.items():
        target[name].CopyFrom(value)  # a map of messages takes no assignment


def cmd_batch(conn: Connection, args: argparse.Namespace) -> int:
    request = database_pb2.ExecuteBatchRequest(group=args.group, profile=args.profile, sql=args.sql)
    for parameters in parameter_sets(args):
        _copy_parameters(request.parameter_sets.add().parameters, parameters)
    stub = database_pb2_grpc.DatabaseServiceStub(conn.channel)
    response = stub.ExecuteBatch(request, metadata=conn.write_metadata(args.idempotency_key), timeout=conn.timeout)
    if args.format == "json":
        sys.stdout.write(to_json(response) + "\n")
    else:
        affected = "unknown" if response.rows_affected < 0 else str(response.rows_affected)
        print(f"applied {response.sets_applied} parameter sets in one transaction; rows affected: {affected}")
    return EXIT_OK


def statements(args: argparse.Namespace) -> list[database_pb2.Statement]:
    if args.sql:
        return [database_pb2.Statement(sql=sql) for sql in args.sql]
    steps = _load_json(args.file)
    if isinstance(steps, dict) and "statements" in steps:
        steps = steps["statements"]  # an ExecuteTransactionRequest-shaped file
    if not isinstance(steps, list) or not steps:
        raise UsageError(f'{args.file}: expected a JSON array of {{"sql": ..., "parameters": {{...}}}}')
    result = []
    for number, step in enumerate(steps, start=1):
        if not isinstance(step, dict) or not isinstance(step.get("sql"), str):
            raise UsageError(f'{args.file} statement {number}: expected {{"sql": "...", "parameters": {{...}}}}')
        try:
            parameters = rowsmod.json_parameters(step.get("parameters", {}), f"{args.file} statement {number}")
        except ValueError as e:
            raise UsageError(str(e)) from None
        statement = database_pb2.Statement(sql=step["sql"])
        _copy_parameters(statement.parameters, parameters)
        result.append(statement)
    return result


def cmd_transaction(conn: Connection, args: argparse.Namespace) -> int:
    request = database_pb2.ExecuteTransactionRequest(group=args.group, profile=args.profile,
                                                     statements=statements(args))
    stub = database_pb2_grpc.DatabaseServiceStub(conn.channel)
    response = stub.ExecuteTransaction(request, metadata=conn.write_metadata(args.idempotency_key),
                                       timeout=conn.timeout)
    if args.format == "json":
        sys.stdout.write(to_json(response) + "\n")
    else:
        rows = [[str(i), "unknown" if r.rows_affected < 0 else str(r.rows_affected)]
                for i, r in enumerate(response.results, start=1)]
        sys.stdout.write(render_table(["STATEMENT", "ROWS AFFECTED"], rows, [True, True]))
    return EXIT_OK


# --- changes ---------------------------------------------------------------------------------------

def load_watermark(path: Path | None) -> database_pb2.Watermark | None:
    if path is None or not path.exists():
        return None
    try:
        return json_format.Parse(path.read_text(), database_pb2.Watermark())
    except OSError as e:
        raise LocalFileError(f"cannot read {path}: {e.strerror}") from None
    except json_format.ParseError as e:
        raise LocalFileError(f"{path} does not hold a watermark ({e}); remove it to start from the first row") \
            from None


def save_watermark(path: Path, watermark: database_pb2.Watermark) -> None:
    """Replace the state file in one step: a reader (or a crash) sees the old watermark or the new one."""
    part = path.with_name(path.name + ".onprem-part")
    try:
        part.write_text(to_json(watermark) + "\n")
        os.replace(part, path)
    except OSError as e:
        raise LocalFileError(f"cannot write {path}: {e.strerror}") from None


class ChangePoller:
    """Polls a table's changes from a watermark and writes the rows, one header for every poll."""

    def __init__(self, conn: Connection, args: argparse.Namespace, writer: rowsmod.RowWriter) -> None:
        self._stub = database_pb2_grpc.DatabaseServiceStub(conn.channel)
        self._conn = conn
        self._writer = writer
        self._state = Path(args.state) if args.state else None
        self.after = load_watermark(self._state)
        self._header_written = False
        self._request = database_pb2.PollChangesRequest(
            group=args.group, profile=args.profile, table=args.table or "", sql=args.sql or "",
            watermark_column=args.watermark_column, key_column=args.key_column, max_rows=args.max_rows)
        for text in args.param:
            try:
                name, value = rowsmod.parse_parameter(text)
            except ValueError as e:
                raise UsageError(str(e)) from None
            self._request.parameters[name].CopyFrom(value)

    def poll(self) -> bool:
        """One poll; True when the agent has more rows at once."""
        request = database_pb2.PollChangesRequest()
        request.CopyFrom(self._request)
        if self.after is not None:
            request.after.CopyFrom(self.after)
        columns: list[values_pb2.Column] = []
        has_more = False
        for message in self._stub.PollChanges(request, metadata=self._conn.metadata, timeout=self._conn.timeout):
            kind = message.WhichOneof("result")
            if kind == "header":
                columns = list(message.header.columns)
                if not self._header_written:
                    self._writer.header(columns)
                    self._header_written = True
            elif kind == "rows":
                self._writer.rows(rowsmod.decode_batch(columns, message.rows))
            elif kind == "summary":
                self.after = message.summary.next
                has_more = message.summary.has_more
        self._writer.close()  # flushes: the rows are out before the watermark that skips them is saved
        if self._state is not None and self.after is not None:
            save_watermark(self._state, self.after)
        return has_more


def cmd_changes(conn: Connection, args: argparse.Namespace) -> int:
    if args.interval <= 0 or args.max_rows < 0:
        raise UsageError("--interval must be more than 0, --max-rows 0 (the agent's default) or more")
    poller = ChangePoller(conn, args, rowsmod.make_writer(args.format, sys.stdout))
    if not args.follow:
        while poller.poll():
            pass
        return EXIT_OK
    # Ctrl-C ends a follow (exit 0) by setting a flag between polls, as `onprem audit --follow` does: a
    # KeyboardInterrupt inside a blocking gRPC call can leave the process hanging.
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
    try:
        while not stop.is_set():
            if not poller.poll():
                stop.wait(args.interval)
    finally:
        signal.signal(signal.SIGINT, previous)
    return EXIT_OK


def add_commands(command: CommandMaker) -> None:
    p = command("batch", "run one statement once per parameter set, all in one transaction (bulk inserts, "
                "upserts): every set applies or none does", cmd_batch,
                ["onprem batch demo demo-db --sql 'INSERT INTO customers (id, name) VALUES (:id, :name)' "
                 "--rows-jsonl customers.jsonl",
                 "printf '%s\\n' '{\"id\": 7, \"name\": \"Acme\"}' | onprem batch demo demo-db --sql '...' "
                 "--rows-jsonl - --idempotency-key import-2026-10-01"])
    p.add_argument("group")
    p.add_argument("profile")
    p.add_argument("--sql", required=True, help="the statement, parameters written :name")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--rows-jsonl", metavar="FILE", help='one JSON object of parameters a line, e.g. '
                        '{"id": 7, "since": {"date_value": "2026-01-02"}}; "-" reads stdin')
    source.add_argument("--params-file", metavar="FILE", help="a JSON array of parameter objects")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="text (default) or json (the ExecuteBatch response)")
    add_idempotency_option(p)

    p = command("transaction", "run several statements in one transaction that commits or rolls back as one",
                cmd_transaction,
                ["onprem transaction demo demo-db --file steps.json",
                 "onprem transaction demo demo-db --sql \"UPDATE orders SET status = 'open' WHERE id = 2\" "
                 "--sql 'DELETE FROM orders WHERE id = 4' --idempotency-key cleanup-17"])
    p.add_argument("group")
    p.add_argument("profile")
    steps = p.add_mutually_exclusive_group(required=True)
    steps.add_argument("--file", help='a JSON array of {"sql": ..., "parameters": {...}}, run in order; "-" reads '
                       "stdin")
    steps.add_argument("--sql", action="append", help="a statement without parameters (repeatable, run in order)")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="table (default: rows affected per statement) or json (the ExecuteTransaction response)")
    add_idempotency_option(p)

    p = command("changes", "print the rows added or changed after a watermark, in watermark order; --state keeps "
                "the watermark between runs, --follow keeps polling", cmd_changes,
                ["onprem changes demo demo-db --table orders --watermark-column created_at --key-column id",
                 "onprem changes demo demo-db --table orders --watermark-column id --key-column id "
                 "--state orders.watermark --follow --format jsonl"])
    p.add_argument("group")
    p.add_argument("profile")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--table", help="the table or view to poll, e.g. public.orders")
    what.add_argument("--sql", help="a query whose rows to poll (used as a sub-query)")
    p.add_argument("--param", action="append", default=[], metavar="NAME[:TYPE]=VALUE",
                   help="a parameter of --sql, as `onprem query --param` takes it (repeatable)")
    p.add_argument("--watermark-column", required=True, help="the column that orders changes, e.g. updated_at")
    p.add_argument("--key-column", required=True, help="a unique column that breaks ties, e.g. id")
    p.add_argument("--state", metavar="FILE", help="read the watermark from FILE (if it exists) and save the new "
                   "one there after each poll")
    p.add_argument("--max-rows", type=int, default=0, help="rows per poll (0: the agent's default, 1000); every "
                   "poll runs until no more rows are waiting")
    p.add_argument("--format", choices=["csv", "jsonl", "table"], default="csv",
                   help="csv (default), jsonl or table, as `onprem query` writes rows")
    p.add_argument("--follow", "-f", action="store_true", help="keep polling every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL,
                   help=f"seconds between polls with --follow (default {DEFAULT_INTERVAL:g})")
