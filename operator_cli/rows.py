"""Decode the columnar `RowBatch` of a query into rows, and write rows as CSV, JSON lines or a table.

A `RowBatch` holds one `ColumnValues` per column; the column's `ValueType` says which array holds its values
(one entry per row, a placeholder where `nulls[i]` is true). See protos/onprem/v1/values.proto.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import IO, Protocol

from google.protobuf import json_format

from onprem.v1 import database_pb2, values_pb2

Cell = bool | int | float | str | bytes | None

def as_stream(whole: database_pb2.ExecuteQueryResponse) -> list[database_pb2.QueryResponse]:
    """The Query messages that carry what one ExecuteQuery response carries: header, batches, summary."""
    return [database_pb2.QueryResponse(header=whole.header),
            *(database_pb2.QueryResponse(rows=batch) for batch in whole.batches),
            database_pb2.QueryResponse(summary=whole.summary)]


_NUMERIC = {values_pb2.VALUE_TYPE_INT64, values_pb2.VALUE_TYPE_DOUBLE, values_pb2.VALUE_TYPE_DECIMAL}


def _values_of(column_type: int, values: values_pb2.ColumnValues) -> Sequence[Cell]:
    if column_type == values_pb2.VALUE_TYPE_BOOL:
        return values.bool_values
    if column_type == values_pb2.VALUE_TYPE_INT64:
        return values.int64_values
    if column_type == values_pb2.VALUE_TYPE_DOUBLE:
        return values.double_values
    if column_type == values_pb2.VALUE_TYPE_BYTES:
        return values.bytes_values
    # Every other type travels as its canonical text (decimal, dates, times, UUID, JSON, ...).
    return values.string_values


def decode_batch(columns: Sequence[values_pb2.Column], batch: values_pb2.RowBatch) -> list[list[Cell]]:
    """The batch's rows, each a list of Python values in column order (None for SQL NULL)."""
    if len(batch.columns) != len(columns):
        raise ValueError(f"a row batch has {len(batch.columns)} columns, the header {len(columns)}")
    arrays = [_values_of(column.type, values) for column, values in zip(columns, batch.columns, strict=True)]
    nulls = [values.nulls for values in batch.columns]
    rows: list[list[Cell]] = []
    for i in range(batch.row_count):
        row: list[Cell] = []
        for array, null in zip(arrays, nulls, strict=True):
            if (i < len(null) and null[i]) or i >= len(array):
                row.append(None)
            else:
                row.append(array[i])
        rows.append(row)
    return rows


def _json_cell(value: Cell) -> object:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()  # as protobuf's JSON mapping writes bytes
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _text_cell(value: Cell, null: str) -> str:
    if value is None:
        return null
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, float):
        return str(_json_cell(value)) if not math.isfinite(value) else repr(value)
    return str(value)


class RowWriter(Protocol):
    def header(self, columns: Sequence[values_pb2.Column]) -> None: ...

    def rows(self, rows: Iterable[Sequence[Cell]]) -> None: ...

    def close(self) -> None: ...


class CsvWriter:
    """RFC 4180 CSV with a header line; NULL is an empty field, bytes are base64, booleans true/false."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._csv = csv.writer(out, lineterminator="\n")

    def header(self, columns: Sequence[values_pb2.Column]) -> None:
        self._csv.writerow([c.name for c in columns])
        self._out.flush()

    def rows(self, rows: Iterable[Sequence[Cell]]) -> None:
        self._csv.writerows([_text_cell(v, "") for v in row] for row in rows)
        self._out.flush()

    def close(self) -> None:
        self._out.flush()


class JsonLinesWriter:
    """One JSON object per row, keys in column order; NULL is null, bytes are base64, decimals stay text."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._names: list[str] = []

    def header(self, columns: Sequence[values_pb2.Column]) -> None:
        self._names = [c.name for c in columns]

    def rows(self, rows: Iterable[Sequence[Cell]]) -> None:
        for row in rows:
            obj = {name: _json_cell(v) for name, v in zip(self._names, row, strict=True)}
            self._out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._out.flush()

    def close(self) -> None:
        self._out.flush()


class TableWriter:
    """An aligned text table that still streams: column widths come from the header and the first batch
    (later, longer values widen only their own line). Numbers are right-aligned, NULL shows as NULL."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._columns: list[values_pb2.Column] = []
        self._widths: list[int] | None = None

    def header(self, columns: Sequence[values_pb2.Column]) -> None:
        self._columns = list(columns)

    def _line(self, cells: Sequence[str], numeric: Sequence[bool]) -> str:
        assert self._widths is not None
        parts = [c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, self._widths, numeric, strict=True)]
        return "  ".join(parts).rstrip() + "\n"

    def rows(self, rows: Iterable[Sequence[Cell]]) -> None:
        text = [[_text_cell(v, "NULL") for v in row] for row in rows]
        numeric = [c.type in _NUMERIC for c in self._columns]
        if self._widths is None:
            names = [c.name for c in self._columns]
            self._widths = [max([len(n), *(len(r[i]) for r in text)]) for i, n in enumerate(names)]
            self._out.write(self._line(names, [False] * len(names)))
            self._out.write(self._line(["-" * w for w in self._widths], [False] * len(names)))
        for row in text:
            self._out.write(self._line(row, numeric))
        self._out.flush()

    def close(self) -> None:
        if self._widths is None and self._columns:
            self.rows([])
        self._out.flush()


def make_writer(fmt: str, out: IO[str]) -> RowWriter:
    if fmt == "csv":
        return CsvWriter(out)
    if fmt == "jsonl":
        return JsonLinesWriter(out)
    if fmt == "table":
        return TableWriter(out)
    raise ValueError(f"unknown format {fmt!r}")


# --- parameters ------------------------------------------------------------------------------------

_TYPES = ("int", "float", "decimal", "str", "bool", "null", "date", "time", "timestamp", "uuid", "json",
          "interval", "bytes")
_INT = re.compile(r"-?\d+")
_FLOAT = re.compile(r"-?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][-+]?\d+)")

PARAM_HELP = (
    "a bound parameter NAME=VALUE for :NAME in the SQL (repeatable). The type is inferred: an integer, "
    "a decimal number (sent as a double), true/false, else text. Name the type to choose it: "
    f"NAME:TYPE=VALUE with TYPE one of {', '.join(_TYPES)} (bytes take base64; null ignores the value)."
)


def parse_parameter(text: str) -> tuple[str, values_pb2.Value]:
    """`name=value` or `name:type=value` as a bound parameter; ValueError with a readable message."""
    spec, sep, raw = text.partition("=")
    if not sep or not spec:
        raise ValueError(f"--param {text!r}: expected NAME=VALUE or NAME:TYPE=VALUE")
    name, _, kind = spec.partition(":")
    name = name.removeprefix(":")
    value = values_pb2.Value()
    if not kind:
        if _INT.fullmatch(raw):
            kind = "int"
        elif _FLOAT.fullmatch(raw):
            kind = "float"
        elif raw in ("true", "false"):
            kind = "bool"
        else:
            kind = "str"
    try:
        if kind == "int":
            value.int64_value = int(raw)
        elif kind == "float":
            value.double_value = float(raw)
        elif kind == "bool":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            value.bool_value = raw.lower() in ("true", "1")
        elif kind == "null":
            value.null_value = True
        elif kind == "bytes":
            value.bytes_value = base64.b64decode(raw, validate=True)
        elif kind in ("str", "decimal", "date", "time", "timestamp", "uuid", "json", "interval"):
            field = {"str": "string_value"}.get(kind, f"{kind}_value")
            setattr(value, field, raw)
        else:
            raise ValueError(f"unknown type {kind!r} (one of {', '.join(_TYPES)})")
    except ValueError as e:
        raise ValueError(f"--param {text!r}: {e}") from None
    return name, value


def json_value(obj: object, where: str) -> values_pb2.Value:
    """A JSON value as a bound parameter: numbers, true/false, null and text by their JSON type, or an object in
    `Value`'s own JSON mapping to name the type, e.g. {"date_value": "2026-01-02"} or {"decimal_value": "12.50"}."""
    value = values_pb2.Value()
    if obj is None:
        value.null_value = True
    elif isinstance(obj, bool):
        value.bool_value = obj
    elif isinstance(obj, int):
        value.int64_value = obj
    elif isinstance(obj, float):
        value.double_value = obj
    elif isinstance(obj, str):
        value.string_value = obj
    elif isinstance(obj, dict):
        try:
            json_format.ParseDict(obj, value)
        except json_format.ParseError as e:
            raise ValueError(f"{where}: {e}") from None
    else:
        raise ValueError(f"{where}: a parameter is a number, text, true/false, null or a typed object such as "
                         '{"date_value": "2026-01-02"}, not a list')
    return value


def json_parameters(obj: object, where: str) -> dict[str, values_pb2.Value]:
    """A JSON object of parameters by name (without the colon) as `Value`s."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object of parameters by name, e.g. {{\"id\": 7}}")
    return {str(name).removeprefix(":"): json_value(v, f"{where}: parameter {name!r}") for name, v in obj.items()}
