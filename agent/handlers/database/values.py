"""Values between protobuf and database drivers: parameters in, typed columns out.

Every type without an exact protobuf scalar travels as its canonical text
(values.proto says which), so nothing passes through a float on the way: a
NUMERIC(38,20) arrives digit for digit.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from psycopg.postgres import types as pg_types
from psycopg.types.json import Jsonb

from onprem.tunnel.errors import InvalidArgument
from onprem.v1 import values_pb2

__all__ = [
    "Misfit",
    "bind_value",
    "choose_types",
    "column_type",
    "fill",
    "parse_duration",
    "to_value",
]

VT = values_pb2.ValueType

_DURATION = re.compile(
    r"^(?P<sign>-)?P(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+(?:\.\d{1,6})?)S)?)?$"
)


def parse_duration(text: str) -> timedelta:
    """ISO 8601 "PnWnDTnHnMn.nS" to a timedelta; years and months are refused, they have no fixed length."""
    match = _DURATION.match(text)
    if match is None or text.rstrip("-") in ("P", "PT") or text.endswith("T"):
        raise ValueError(text)
    parts = {k: v for k, v in match.groupdict().items() if v is not None and k != "sign"}
    seconds = Decimal(parts.pop("seconds", "0"))
    value = timedelta(**{k: int(v) for k, v in parts.items()}, microseconds=int(seconds * 1_000_000))
    return -value if match.group("sign") else value


def iso_duration(value: timedelta) -> str:
    micros = abs(value.days * 86_400_000_000 + value.seconds * 1_000_000 + value.microseconds)
    days, micros = divmod(micros, 86_400_000_000)
    hours, micros = divmod(micros, 3_600_000_000)
    minutes, micros = divmod(micros, 60_000_000)
    seconds, micros = divmod(micros, 1_000_000)
    secs = f"{seconds}.{micros:06d}".rstrip("0") if micros else str(seconds)
    sign = "-" if value < timedelta(0) else ""
    return f"{sign}P{days}DT{hours}H{minutes}M{secs}S"


def bind_value(name: str, value: values_pb2.Value, dialect: str) -> Any:
    """Convert one bound parameter to the Python value the driver binds."""
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"parameter '{name}' has no value set; use null_value for NULL", reason="INVALID_PARAMETER",
                              field=f"parameters.{name}")
    if kind == "array_value":
        if dialect != "postgresql":
            raise InvalidArgument(
                f"parameter '{name}': array parameters need a database with array types (PostgreSQL), not {dialect}",
                reason="INVALID_PARAMETER",
            )
        return [bind_value(f"{name}[{i}]", v, dialect) for i, v in enumerate(value.array_value.values)]
    raw = getattr(value, kind)
    try:
        converted = _convert(kind, raw, dialect)
    except (ValueError, InvalidOperation):
        raise InvalidArgument(f"parameter '{name}': {raw!r} is not a valid {kind}", reason="INVALID_PARAMETER",
                              field=f"parameters.{name}") from None
    if dialect == "sqlite" and isinstance(converted, date | time | timedelta | Decimal | uuid.UUID):
        # sqlite3 has no adapters for these (and deprecated the date ones): bind their text forms.
        return _text(converted)
    return converted


def _convert(kind: str, raw: Any, dialect: str) -> Any:
    if kind == "null_value":
        return None
    if kind in ("bool_value", "int64_value", "double_value", "string_value"):
        return raw
    if kind == "bytes_value":
        return bytes(raw)
    if kind == "json_value":
        json.loads(raw)  # refuse malformed JSON here, with the parameter's name
        # Bound as jsonb as written: parsing and dumping again would round its numbers through floats.
        return Jsonb(raw, dumps=_as_is) if dialect == "postgresql" else raw
    if kind == "decimal_value":
        return Decimal(raw)
    if kind == "date_value":
        return date.fromisoformat(raw)
    if kind == "time_value":
        return time.fromisoformat(raw)
    if kind == "timestamp_value":
        return datetime.fromisoformat(raw)
    if kind == "uuid_value":
        return uuid.UUID(raw)
    if kind == "interval_value":
        return parse_duration(raw)
    raise ValueError(kind)


def _as_is(text: str) -> str:
    return text


_VALUE_FIELDS: dict[int, str] = {
    VT.VALUE_TYPE_DECIMAL: "decimal_value", VT.VALUE_TYPE_DATE: "date_value", VT.VALUE_TYPE_TIME: "time_value",
    VT.VALUE_TYPE_TIMESTAMP: "timestamp_value", VT.VALUE_TYPE_TIMESTAMP_TZ: "timestamp_value",
    VT.VALUE_TYPE_INTERVAL: "interval_value", VT.VALUE_TYPE_UUID: "uuid_value", VT.VALUE_TYPE_JSON: "json_value",
}


def to_value(value: Any, vt: int | None = None) -> values_pb2.Value:
    """A result value, of a column of type `vt`, as a bound-parameter Value (e.g. a change poll's watermark)."""
    if value is None:
        return values_pb2.Value(null_value=True)
    vt = type_of_value(value) if vt is None else vt
    if vt == VT.VALUE_TYPE_BOOL:
        return values_pb2.Value(bool_value=value)
    if vt == VT.VALUE_TYPE_INT64:
        return values_pb2.Value(int64_value=value)
    if vt == VT.VALUE_TYPE_DOUBLE:
        return values_pb2.Value(double_value=value)
    if vt == VT.VALUE_TYPE_BYTES:
        return values_pb2.Value(bytes_value=bytes(value))
    column = values_pb2.ColumnValues()
    fill(column, vt, [value])  # the same canonical text the column's values travel as
    result = values_pb2.Value()
    setattr(result, _VALUE_FIELDS.get(vt, "string_value"), column.string_values[0])
    return result


# --- column types -------------------------------------------------------------------------------


def _pg_type_table() -> dict[int, int]:
    """PostgreSQL type OID -> ValueType, from psycopg's registry."""
    by_name = {
        "bool": VT.VALUE_TYPE_BOOL, "int2": VT.VALUE_TYPE_INT64, "int4": VT.VALUE_TYPE_INT64,
        "int8": VT.VALUE_TYPE_INT64, "oid": VT.VALUE_TYPE_INT64, "float4": VT.VALUE_TYPE_DOUBLE,
        "float8": VT.VALUE_TYPE_DOUBLE, "numeric": VT.VALUE_TYPE_DECIMAL, "text": VT.VALUE_TYPE_STRING,
        "varchar": VT.VALUE_TYPE_STRING, "bpchar": VT.VALUE_TYPE_STRING, "name": VT.VALUE_TYPE_STRING,
        "char": VT.VALUE_TYPE_STRING, "bytea": VT.VALUE_TYPE_BYTES, "date": VT.VALUE_TYPE_DATE,
        "time": VT.VALUE_TYPE_TIME, "timetz": VT.VALUE_TYPE_TIME, "timestamp": VT.VALUE_TYPE_TIMESTAMP,
        "timestamptz": VT.VALUE_TYPE_TIMESTAMP_TZ, "interval": VT.VALUE_TYPE_INTERVAL,
        "uuid": VT.VALUE_TYPE_UUID, "json": VT.VALUE_TYPE_JSON, "jsonb": VT.VALUE_TYPE_JSON,
    }
    table: dict[int, int] = {}
    for info in pg_types:
        table[info.oid] = by_name.get(info.name, VT.VALUE_TYPE_UNSPECIFIED)
        if info.array_oid:
            table[info.array_oid] = VT.VALUE_TYPE_ARRAY
    return table


_PG_TYPES = _pg_type_table()

# Python type -> ValueType, checked in order: bool before int, datetime before date.
_PY_TYPES: tuple[tuple[type | tuple[type, ...], int], ...] = (
    (bool, VT.VALUE_TYPE_BOOL),
    (int, VT.VALUE_TYPE_INT64),
    (float, VT.VALUE_TYPE_DOUBLE),
    (Decimal, VT.VALUE_TYPE_DECIMAL),
    (str, VT.VALUE_TYPE_STRING),
    ((bytes, bytearray, memoryview), VT.VALUE_TYPE_BYTES),
    (datetime, VT.VALUE_TYPE_TIMESTAMP),
    (date, VT.VALUE_TYPE_DATE),
    (time, VT.VALUE_TYPE_TIME),
    (timedelta, VT.VALUE_TYPE_INTERVAL),
    (uuid.UUID, VT.VALUE_TYPE_UUID),
    (dict, VT.VALUE_TYPE_JSON),
    ((list, tuple), VT.VALUE_TYPE_ARRAY),
)


def type_of_value(value: Any) -> int:
    for py, vt in _PY_TYPES:
        if isinstance(value, py):
            if vt in (VT.VALUE_TYPE_TIMESTAMP, VT.VALUE_TYPE_TIME) and getattr(value, "tzinfo", None) is not None:
                return VT.VALUE_TYPE_TIMESTAMP_TZ if vt == VT.VALUE_TYPE_TIMESTAMP else VT.VALUE_TYPE_TIME
            return vt
    return VT.VALUE_TYPE_UNSPECIFIED


def column_type(desc: Any, dialect: str) -> tuple[int, str, bool | None]:
    """(ValueType, database type name, nullable or None) from one DBAPI description entry.

    PostgreSQL (psycopg) reports the type OID and its display name with modifiers
    ("numeric(12,2)"); pyodbc reports the Python class it converts to, with precision
    and scale; sqlite3 reports nothing, so the values decide.
    """
    type_code = desc[1]
    if dialect == "postgresql" and isinstance(type_code, int):
        display = getattr(desc, "type_display", "") or ""
        return _PG_TYPES.get(type_code, VT.VALUE_TYPE_UNSPECIFIED), display.upper(), None
    if isinstance(type_code, type):  # pyodbc
        vt = next((v for py, v in _PY_TYPES if issubclass(type_code, py)), VT.VALUE_TYPE_UNSPECIFIED)
        name = _ODBC_NAMES.get(vt, type_code.__name__.upper())
        if vt == VT.VALUE_TYPE_DECIMAL and desc[4] is not None:
            name = f"DECIMAL({desc[4]},{desc[5] or 0})"
        elif vt in (VT.VALUE_TYPE_TIME, VT.VALUE_TYPE_TIMESTAMP):
            vt = VT.VALUE_TYPE_UNSPECIFIED  # with or without a time zone: the first values tell
        return vt, name, desc[6]
    return VT.VALUE_TYPE_UNSPECIFIED, "", None


_ODBC_NAMES: dict[int, str] = {
    VT.VALUE_TYPE_BOOL: "BIT", VT.VALUE_TYPE_INT64: "INTEGER", VT.VALUE_TYPE_DOUBLE: "DOUBLE",
    VT.VALUE_TYPE_STRING: "VARCHAR", VT.VALUE_TYPE_BYTES: "VARBINARY", VT.VALUE_TYPE_DATE: "DATE",
    VT.VALUE_TYPE_TIME: "TIME", VT.VALUE_TYPE_TIMESTAMP: "TIMESTAMP", VT.VALUE_TYPE_UUID: "GUID",
}


def choose_types(described: list[int], rows: Sequence[Sequence[Any]]) -> list[int]:
    """The described type, else the one type of the first rows' values (INT64+DOUBLE: DOUBLE), else STRING."""
    chosen = []
    for i, vt in enumerate(described):
        if vt != VT.VALUE_TYPE_UNSPECIFIED:
            chosen.append(vt)
            continue
        seen = {type_of_value(row[i]) for row in rows if row[i] is not None}
        if not seen:
            chosen.append(VT.VALUE_TYPE_UNSPECIFIED)
        elif len(seen) == 1:
            chosen.append(seen.pop())
        elif seen == {VT.VALUE_TYPE_INT64, VT.VALUE_TYPE_DOUBLE}:
            chosen.append(VT.VALUE_TYPE_DOUBLE)
        else:
            chosen.append(VT.VALUE_TYPE_STRING)
    return chosen


# --- encoding -----------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, timedelta):
        return iso_duration(value)
    return str(value)  # Decimal (as text, never through a float), UUID, anything else


def _text(value: Any) -> str:
    """The canonical text form of any value, for the text-encoded ValueTypes."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f") if value.is_finite() else str(value)
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return iso_duration(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=_json_default)
    return str(value)


class Misfit(Exception):
    """A value that its column's ValueType cannot carry without loss."""


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def fill(column: values_pb2.ColumnValues, vt: int, values: list[Any]) -> None:
    """Write one column of a batch into `column`, with placeholders for NULLs.

    This is the agent's hot path (a million rows of four columns is four million values), so type
    checks are one C-level pass (`set(map(type, ...))`) and protobuf `extend` gets whole lists.
    """
    kinds = set(map(type, values))
    has_nulls = type(None) in kinds
    if has_nulls:
        column.nulls.extend([v is None for v in values])
        kinds.discard(type(None))
    if vt == VT.VALUE_TYPE_INT64:
        if not kinds <= {int} and not all(isinstance(v, int) for v in values if v is not None):
            raise Misfit
        try:
            column.int64_values.extend([0 if v is None else v for v in values] if has_nulls else values)
        except (ValueError, TypeError):  # above 64 bits
            raise Misfit from None
    elif vt == VT.VALUE_TYPE_DOUBLE:
        if has_nulls:
            values = [0.0 if v is None else v for v in values]
        if not kinds <= {float}:
            # An int joins a DOUBLE column only when the float holds it exactly.
            if not all(isinstance(v, float) or (type(v) is int and float(v) == v) for v in values):
                raise Misfit
            values = [float(v) for v in values]
        column.double_values.extend(values)
    elif vt == VT.VALUE_TYPE_BOOL:
        if not kinds <= {bool}:
            raise Misfit
        column.bool_values.extend([bool(v) for v in values])
    elif vt == VT.VALUE_TYPE_BYTES:
        if not all(isinstance(v, bytes | bytearray | memoryview) for v in values if v is not None):
            raise Misfit
        column.bytes_values.extend([b"" if v is None else bytes(v) for v in values])
    elif vt in (VT.VALUE_TYPE_TIMESTAMP, VT.VALUE_TYPE_TIMESTAMP_TZ, VT.VALUE_TYPE_TIME) and kinds <= {str}:
        # PostgreSQL's text, loaded as is: "2024-01-02 03:04:05+02" becomes "2024-01-02T03:04:05+02:00".
        texts = [v.replace(" ", "T", 1) for v in values] if not has_nulls else \
            ["" if v is None else v.replace(" ", "T", 1) for v in values]
        if vt != VT.VALUE_TYPE_TIMESTAMP:
            texts = [v + ":00" if len(v) > 3 and v[-3] in "+-" else v for v in texts]
        column.string_values.extend(texts)
    elif vt in (VT.VALUE_TYPE_JSON, VT.VALUE_TYPE_ARRAY):
        # A str here is PostgreSQL's JSON text as loaded; anything else a Python value to encode. A
        # JSON column's value may be any JSON scalar too, so encode by column, not by value.
        column.string_values.extend(["" if v is None else v if type(v) is str and vt == VT.VALUE_TYPE_JSON
                                     else json.dumps(v, default=_json_default) for v in values])
    elif kinds <= {str}:
        column.string_values.extend(["" if v is None else v for v in values] if has_nulls else values)
    else:
        column.string_values.extend(["" if v is None else _text(v) for v in values])
