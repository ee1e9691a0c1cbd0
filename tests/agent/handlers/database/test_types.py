"""Every common type, bound as a parameter and read back with its column metadata, per backend.

Each case binds one Value, selects it back through a column of the backend's own type, and
compares the ValueType, database type name and value text the caller receives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from onprem.agent.handlers.database import DatabaseHandler
from onprem.agent.profiles import DatabaseProfile
from onprem.tunnel.errors import InvalidArgument
from onprem.v1 import values_pb2
from tests.agent.handlers.database.test_handler import collect, decode, start
from tests.support.postgres import PostgresServer

V = values_pb2.Value
VT = values_pb2.ValueType

# (name, bound value, PostgreSQL cast, expected type, expected database type, expected value)
PG_CASES = [
    ("null", V(null_value=True), "int8", VT.VALUE_TYPE_INT64, "INT8", None),
    ("bool", V(bool_value=True), "bool", VT.VALUE_TYPE_BOOL, "BOOL", True),
    ("int16", V(int64_value=-32768), "int2", VT.VALUE_TYPE_INT64, "INT2", -32768),
    ("int32", V(int64_value=2**31 - 1), "int4", VT.VALUE_TYPE_INT64, "INT4", 2**31 - 1),
    ("int64", V(int64_value=-(2**63)), "int8", VT.VALUE_TYPE_INT64, "INT8", -(2**63)),
    ("float", V(double_value=0.5), "float4", VT.VALUE_TYPE_DOUBLE, "FLOAT4", 0.5),
    ("double", V(double_value=1e308), "float8", VT.VALUE_TYPE_DOUBLE, "FLOAT8", 1e308),
    ("decimal", V(decimal_value="1234567890.12"), "numeric(12,2)", VT.VALUE_TYPE_DECIMAL, "NUMERIC(12,2)",
     "1234567890.12"),
    ("decimal-exact", V(decimal_value="0.10000000000000000000000000001"), "numeric", VT.VALUE_TYPE_DECIMAL,
     "NUMERIC", "0.10000000000000000000000000001"),
    ("text", V(string_value="zoë 🐘 'q'"), "text", VT.VALUE_TYPE_STRING, "TEXT", "zoë 🐘 'q'"),
    ("varchar", V(string_value="abc"), "varchar(10)", VT.VALUE_TYPE_STRING, "VARCHAR(10)", "abc"),
    ("bytes", V(bytes_value=b"\x00\xff\x10"), "bytea", VT.VALUE_TYPE_BYTES, "BYTEA", b"\x00\xff\x10"),
    ("date", V(date_value="2024-02-29"), "date", VT.VALUE_TYPE_DATE, "DATE", "2024-02-29"),
    ("time", V(time_value="23:59:59.999999"), "time", VT.VALUE_TYPE_TIME, "TIME", "23:59:59.999999"),
    ("timestamp", V(timestamp_value="2024-01-02T03:04:05.123456"), "timestamp", VT.VALUE_TYPE_TIMESTAMP,
     "TIMESTAMP", "2024-01-02T03:04:05.123456"),
    ("timestamptz", V(timestamp_value="2024-01-02T03:04:05+02:00"), "timestamptz", VT.VALUE_TYPE_TIMESTAMP_TZ,
     "TIMESTAMPTZ", "2024-01-02T01:04:05+00:00"),
    ("interval", V(interval_value="P1DT2H3M4.5S"), "interval", VT.VALUE_TYPE_INTERVAL, "INTERVAL",
     "P1DT2H3M4.5S"),
    ("negative-interval", V(interval_value="-PT0.25S"), "interval", VT.VALUE_TYPE_INTERVAL, "INTERVAL",
     "-P0DT0H0M0.25S"),
    ("uuid", V(uuid_value="6c0f2a52-3f6b-4a38-9f10-0c1c2d3e4f50"), "uuid", VT.VALUE_TYPE_UUID, "UUID",
     "6c0f2a52-3f6b-4a38-9f10-0c1c2d3e4f50"),
    ("jsonb", V(json_value='{"a": [1, 2.50, null]}'), "jsonb", VT.VALUE_TYPE_JSON, "JSONB", '{"a": [1, 2.50, null]}'),
    ("int-array", V(array_value=values_pb2.ValueList(values=[V(int64_value=1), V(null_value=True)])), "int8[]",
     VT.VALUE_TYPE_ARRAY, "INT8[]", "[1, null]"),
    ("text-array", V(array_value=values_pb2.ValueList(values=[V(string_value="a"), V(string_value="b,c")])),
     "text[]", VT.VALUE_TYPE_ARRAY, "TEXT[]", '["a", "b,c"]'),
]


@pytest.fixture
async def pg(postgres: PostgresServer) -> AsyncIterator[DatabaseHandler]:
    handler = DatabaseHandler({"pg": DatabaseProfile(name="pg", url=postgres.url(), pool_size=2)})
    yield handler
    await handler.aclose()


@pytest.mark.parametrize(("name", "value", "cast", "vt", "db_type", "expected"), PG_CASES, ids=[c[0] for c in PG_CASES])
async def test_pg_type_round_trips_as_parameter_and_result(
    pg: DatabaseHandler, name: str, value: values_pb2.Value, cast: str, vt: int, db_type: str, expected: object
) -> None:
    # Through a table column, so that the header also carries the column's nullability.
    responses = await collect(pg, start("pg", f"SELECT CAST(:v AS {cast}) AS v", v=value))
    columns, rows = decode(responses)
    assert (columns[0].name, columns[0].type, columns[0].database_type) == ("v", vt, db_type)
    assert rows == [[expected]]


async def test_pg_column_metadata_says_not_null_for_not_null_columns(pg: DatabaseHandler, postgres: PostgresServer) -> None:
    import psycopg

    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS typed (a numeric(12,2) NOT NULL, b timestamptz)")
    columns, _ = decode(await collect(pg, start("pg", "SELECT a, b FROM typed")))
    assert [(c.name, c.database_type, c.nullable) for c in columns] == [
        ("a", "NUMERIC(12,2)", False), ("b", "TIMESTAMPTZ", True)]


async def test_interval_with_months_is_refused_as_inexact(pg: DatabaseHandler) -> None:
    with pytest.raises(InvalidArgument, match="parameter 'v'") as info:
        await collect(pg, start("pg", "SELECT CAST(:v AS interval)", v=V(interval_value="P1M")))
    assert info.value.reason == "INVALID_PARAMETER"


async def test_malformed_json_parameter_is_invalid_argument(pg: DatabaseHandler) -> None:
    with pytest.raises(InvalidArgument, match="parameter 'v'"):
        await collect(pg, start("pg", "SELECT CAST(:v AS jsonb)", v=V(json_value="{nope")))


# SQLite stores five storage classes; the rest travels as the text it was bound as, exactly.
SQLITE_CASES = [
    ("null", V(null_value=True), "INTEGER", VT.VALUE_TYPE_UNSPECIFIED, None),
    ("bool", V(bool_value=False), "BOOLEAN", VT.VALUE_TYPE_INT64, 0),
    ("int64", V(int64_value=2**63 - 1), "INTEGER", VT.VALUE_TYPE_INT64, 2**63 - 1),
    ("double", V(double_value=-2.5e-300), "REAL", VT.VALUE_TYPE_DOUBLE, -2.5e-300),
    ("decimal", V(decimal_value="12345678901234567890.123456789"), "TEXT", VT.VALUE_TYPE_STRING,
     "12345678901234567890.123456789"),
    ("text", V(string_value="zoë 🐘"), "TEXT", VT.VALUE_TYPE_STRING, "zoë 🐘"),
    ("bytes", V(bytes_value=b"\x00\x01"), "BLOB", VT.VALUE_TYPE_BYTES, b"\x00\x01"),
    ("date", V(date_value="2024-02-29"), "DATE", VT.VALUE_TYPE_STRING, "2024-02-29"),
    ("time", V(time_value="13:14:15.5"), "TIME", VT.VALUE_TYPE_STRING, "13:14:15.500000"),
    ("timestamp", V(timestamp_value="2024-01-02T03:04:05"), "TIMESTAMP", VT.VALUE_TYPE_STRING, "2024-01-02T03:04:05"),
    ("timestamptz", V(timestamp_value="2024-01-02T03:04:05+02:00"), "TEXT", VT.VALUE_TYPE_STRING,
     "2024-01-02T03:04:05+02:00"),
    ("interval", V(interval_value="PT1.5S"), "TEXT", VT.VALUE_TYPE_STRING, "P0DT0H0M1.5S"),
    ("uuid", V(uuid_value="6C0F2A52-3F6B-4A38-9F10-0C1C2D3E4F50"), "TEXT", VT.VALUE_TYPE_STRING,
     "6c0f2a52-3f6b-4a38-9f10-0c1c2d3e4f50"),
    ("json", V(json_value='{"a": 1.50}'), "TEXT", VT.VALUE_TYPE_STRING, '{"a": 1.50}'),
]


@pytest.fixture
async def lite(tmp_path: Path) -> AsyncIterator[DatabaseHandler]:
    handler = DatabaseHandler({"lite": DatabaseProfile(name="lite", url=f"sqlite:///{tmp_path}/types.db")})
    yield handler
    await handler.aclose()


@pytest.mark.parametrize(("name", "value", "decl", "vt", "expected"), SQLITE_CASES, ids=[c[0] for c in SQLITE_CASES])
async def test_sqlite_type_round_trips_through_a_typed_column(
    lite: DatabaseHandler, name: str, value: values_pb2.Value, decl: str, vt: int, expected: object
) -> None:
    table = f"t_{name}"
    await collect(lite, start("lite", f"CREATE TABLE {table} (v {decl})"))
    await collect(lite, start("lite", f"INSERT INTO {table} VALUES (:v)", v=value))
    columns, rows = decode(await collect(lite, start("lite", f"SELECT v FROM {table}")))
    assert (columns[0].name, columns[0].type) == ("v", vt)
    assert rows == [[expected]]


async def test_sqlite_refuses_array_parameters(lite: DatabaseHandler) -> None:
    with pytest.raises(InvalidArgument, match="array parameters need a database with array types") as info:
        await collect(lite, start("lite", "SELECT :v", v=V(array_value=values_pb2.ValueList(values=[V(int64_value=1)]))))
    assert info.value.reason == "INVALID_PARAMETER"
