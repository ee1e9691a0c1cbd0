"""ODBC profiles: connection strings, the generic `odbc` dialect, and which drivers can be read-only.

Two kinds of profile reach a database through ODBC (unixODBC + pyodbc):

- `dialect: mssql`: SQL Server through SQLAlchemy's `mssql+pyodbc` dialect, with a connection string
  built from host, port, database, username and `options` (the ODBC driver's name among them);
- `dialect: odbc`: any other ODBC data source, named by a connection string or a DSN, through the
  minimal `odbc+pyodbc` dialect below, which knows nothing about the SQL on the other side: it only
  moves statements and rows, so anything the driver accepts works.

Either way the handler connects through a `creator` that appends the password read from the
profile's secret, so the password never sits in a profile, a URL or a message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.connectors.pyodbc import PyODBCConnector
from sqlalchemy.dialects import registry
from sqlalchemy.engine import URL
from sqlalchemy.engine.default import DefaultDialect

__all__ = [
    "MSSQL_DEFAULT_DRIVER",
    "ODBC_READ_ONLY_DRIVERS",
    "GenericOdbcDialect",
    "connection_string",
    "generic_connection_string",
    "mssql_connection_string",
    "parse_connection_string",
    "quote_value",
    "read_only_refusal",
]

#: The driver named in a built SQL Server connection string unless `options.driver` says otherwise.
MSSQL_DEFAULT_DRIVER = "ODBC Driver 18 for SQL Server"

#: ODBC drivers (lower-cased names as written in `Driver=`) known to *enforce* SQL_ATTR_ACCESS_MODE =
#: SQL_MODE_READ_ONLY on the server side. The ODBC specification makes the attribute a hint ("the
#: connection is not required to support SQL statements that cause updates"), and measured here both
#: psqlODBC 13.02 and sqliteodbc 0.9998 accept it and then run INSERT, CREATE and writable CTEs
#: (tests/agent/handlers/database/test_odbc.py proves it on every run). psqlODBC's own `ReadOnly=1` option guesses from the
#: SQL text and lets a writable CTE through. Microsoft's SQL Server drivers document the attribute as
#: a hint as well. So no driver qualifies yet, and a read-only ODBC profile is refused at load: a
#: read-only promise that the database does not keep would be worse than none.
ODBC_READ_ONLY_DRIVERS: frozenset[str] = frozenset()

# Keys whose values are secrets: refused in a profile's connection string and options.
_SECRET_KEYS = frozenset({"pwd", "password"})


def quote_value(value: str) -> str:
    """Quote one attribute value the way ODBC connection strings require: braces, `}` doubled."""
    if value and not any(c in value for c in ";{}=") and value.strip() == value:
        return value
    return "{" + value.replace("}", "}}") + "}"


def connection_string(attributes: Mapping[str, str]) -> str:
    """`KEY=value;...` with each value quoted when it has to be."""
    return ";".join(f"{key}={quote_value(value)}" for key, value in attributes.items())


def parse_connection_string(text: str) -> dict[str, str]:
    """Split a connection string into attributes, honouring `{...}` quoting; keys keep their case."""
    attributes: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        eq = text.find("=", i)
        if eq < 0:
            if text[i:].strip():
                raise ValueError(f"attribute {text[i:].strip()!r} has no '='")
            break
        key = text[i:eq].strip()
        i = eq + 1
        if i < n and text[i] == "{":
            value_chars: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise ValueError(f"attribute {key!r} has an unterminated '{{'")
                if text[i] == "}":
                    if i + 1 < n and text[i + 1] == "}":
                        value_chars.append("}")
                        i += 2
                        continue
                    i += 1
                    break
                value_chars.append(text[i])
                i += 1
            value = "".join(value_chars)
            while i < n and text[i] != ";":
                i += 1
        else:
            end = text.find(";", i)
            end = n if end < 0 else end
            value = text[i:end].strip()
            i = end
        i += 1  # the ';'
        if not key:
            raise ValueError("an attribute has an empty name")
        attributes[key] = value
    return attributes


def option_text(value: Any) -> str:
    """A profile option's value as an attribute value: booleans as yes/no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def mssql_connection_string(url: URL, options: dict[str, Any]) -> str:
    """The connection string of an `mssql` profile given by its parts (host, port, database, username).

    Its driver is `options["driver"]` (or `DRIVER`), which is taken out of `options`, else
    `MSSQL_DEFAULT_DRIVER`; the other options become attributes as they are.
    """
    attributes = {"DRIVER": str(options.pop("driver", options.pop("DRIVER", MSSQL_DEFAULT_DRIVER)))}
    server = url.host or ""
    attributes["SERVER"] = f"{server},{url.port}" if url.port else server
    if url.database:
        attributes["DATABASE"] = url.database
    if url.username:
        attributes["UID"] = url.username
    attributes.update({k: option_text(v) for k, v in options.items()})
    return connection_string(attributes)


def generic_connection_string(source: dict[str, str], username: str | None, options: Mapping[str, Any]) -> str:
    """The connection string of a generic `odbc` profile: its source's attributes (already checked to hold
    no password), then UID and the options."""
    attributes = dict(source)
    if username is not None:
        attributes["UID"] = username
    attributes.update({k: option_text(v) for k, v in options.items()})
    return connection_string(attributes)


def secret_keys(attributes: Mapping[str, Any]) -> list[str]:
    """The attribute names that would carry a password."""
    return [key for key in attributes if key.lower() in _SECRET_KEYS]


def driver_of(attributes: Mapping[str, str]) -> str | None:
    for key, value in attributes.items():
        if key.lower() == "driver":
            return value
    return None


def read_only_refusal(dialect: str, driver: str | None) -> str | None:
    """Why a read-only profile of this dialect/driver cannot be honoured; None when it can."""
    if driver is not None and driver.strip("{}").lower() in ODBC_READ_ONLY_DRIVERS:
        return None
    named = f"ODBC driver {driver!r}" if driver else "a DSN's ODBC driver"
    if dialect == "mssql":
        return (
            f"read_only is not supported for SQL Server: {named} treats the ODBC read-only access mode "
            "as a hint and SQL Server has no read-only transaction, so nothing would stop a write; "
            "connect with an account that may only read (e.g. db_datareader) and set read_only: false"
        )
    return (
        f"read_only cannot be enforced: {named} ignores the ODBC read-only access mode "
        "(SQL_ATTR_ACCESS_MODE), so a write would still run; connect with an account that may only "
        "read and set read_only: false, or use the 'postgresql' or 'sqlite' dialect, whose read-only "
        "mode the database itself enforces"
    )


class GenericOdbcDialect(PyODBCConnector, DefaultDialect):  # type: ignore[misc]
    """Just enough dialect to run text statements over any ODBC driver.

    No SQL is generated for it except by `PollChanges`, which renders a plain
    `SELECT ... WHERE ... ORDER BY` and applies its row limit by fetching, not
    with LIMIT/TOP, whose spelling differs between databases.
    """

    name = "odbc"
    driver = "pyodbc"
    supports_statement_cache = True
    supports_native_boolean = False
    supports_sane_rowcount = True
    supports_sane_multi_rowcount = False
    # Leave SQL text as the caller wrote it: no server-side cursors or RETURNING emulation.
    supports_server_side_cursors = False
    postfetch_lastrowid = False

    def _get_default_schema_name(self, connection: Any) -> str:
        return ""  # unknown: statements name their schemas or rely on the source's default

    def get_isolation_level(self, dbapi_connection: Any) -> Any:
        raise NotImplementedError  # unknown for a generic source; SQLAlchemy then leaves it alone


registry.register("odbc.pyodbc", __name__, "GenericOdbcDialect")
registry.register("odbc", __name__, "GenericOdbcDialect")
