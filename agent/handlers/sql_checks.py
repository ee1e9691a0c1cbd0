"""`test-profile` for a database profile: which of the usual set-up mistakes is the one.

The checks run in order and stop at the first failure that makes the rest
meaningless: the host is reachable (a TCP connect), the credentials are
accepted, the database exists, the server is what the dialect or driver says,
the user may read (the catalog answers), and for a read-only profile that the
database itself refuses writes. Every message is scrubbed of secrets.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url

from agent.handlers import sql_odbc
from agent.handlers.sql_engine import Runtime, Session
from agent.handlers.sql_errors import first_lines, scrub
from onprem.v1 import profiles_pb2
from tunnel.errors import RequestError

__all__ = ["run_checks"]

_TCP_TIMEOUT_SECONDS = 5.0
_DEFAULT_PORTS = {"postgresql": 5432, "mssql": 1433, "mysql": 3306, "mariadb": 3306, "oracle": 1521}
# What SQL_DBMS_NAME says for the dialects that reach a database through ODBC.
_DBMS_NAMES = {"mssql": "Microsoft SQL Server"}


def _check(name: str, ok: bool, message: str) -> profiles_pb2.ProfileCheck:
    return profiles_pb2.ProfileCheck(name=name, ok=ok, message=message)


def _address(runtime: Runtime) -> tuple[str, int] | None:
    """Where the database listens, when the profile says; None for files and DSNs."""
    profile = runtime.profile
    if profile.odbc_connect is not None:
        attributes = {k.lower(): v for k, v in sql_odbc.parse_connection_string(profile.odbc_connect).items()}
        server = attributes.get("server") or attributes.get("servername") or attributes.get("host")
        if not server:
            return None
        host, _, port = server.partition(",")  # SQL Server writes "host,port"
        port = attributes.get("port", port)
        return host.strip(), int(port) if port.strip().isdigit() else _DEFAULT_PORTS.get(runtime.dialect, 0)
    url = make_url(profile.url)
    if not url.host or url.host.startswith("/"):
        return None
    return url.host, url.port or _DEFAULT_PORTS.get(runtime.dialect, 0)


def _reachable(runtime: Runtime) -> profiles_pb2.ProfileCheck | None:
    if runtime.dialect == "sqlite":
        path = make_url(runtime.profile.url).database or ""
        if path in ("", ":memory:") or path.startswith("file:"):
            return _check("reachable", True, "in-memory or URI database")
        if not os.path.exists(path):
            return _check("reachable", False, f"the database file {path} does not exist")
        if not os.access(path, os.R_OK):
            return _check("reachable", False, f"the database file {path} is not readable by this agent")
        return _check("reachable", True, f"the database file {path} exists")
    address = _address(runtime)
    if address is None or not address[1]:
        return None  # a DSN or driver default: the connect below says whether it works
    host, port = address
    try:
        with socket.create_connection((host, port), timeout=_TCP_TIMEOUT_SECONDS):
            pass
    except OSError as exc:
        return _check("reachable", False, f"cannot open a TCP connection to {host}:{port}: {exc.strerror or exc}")
    return _check("reachable", True, f"{host}:{port} accepts TCP connections")


def _connect_failure(runtime: Runtime, exc: BaseException) -> list[profiles_pb2.ProfileCheck]:
    orig = getattr(exc, "orig", None) or exc
    message = exc.message if isinstance(exc, RequestError) else scrub(first_lines(str(orig)), runtime.secrets)
    lowered = message.lower()
    state = getattr(orig, "sqlstate", None) or (orig.args[0] if type(orig).__module__ == "pyodbc" and orig.args else "")
    if isinstance(exc, RequestError):  # the password's env var or file is missing
        return [_check("credentials", False, message)]
    if str(state).startswith("28") or "authentication failed" in lowered or "login failed" in lowered \
            or "password" in lowered:
        return [_check("credentials", False, f"the server refused the credentials: {message}")]
    if state == "3D000" or ("database" in lowered and "does not exist" in lowered) or "cannot open database" in lowered:
        return [_check("credentials", True, "the server accepted the credentials"),
                _check("database exists", False, message)]
    if "data source name not found" in lowered or "can't open lib" in lowered or "driver" in lowered:
        return [_check("driver", False, message)]
    return [_check("credentials", False, f"could not connect: {message}")]


def _server(conn: Connection, runtime: Runtime) -> tuple[str, bool]:
    """The server's own description, and whether it matches the profile's dialect or driver."""
    dbapi: Any = conn.connection.driver_connection
    if runtime.dialect == "postgresql":
        version = str(conn.exec_driver_sql("SELECT version()").scalar())
        return version, version.startswith("PostgreSQL")
    if isinstance(dbapi, sqlite3.Connection):
        return f"SQLite {sqlite3.sqlite_version}", True
    if hasattr(dbapi, "getinfo"):  # pyodbc
        import pyodbc

        name = str(dbapi.getinfo(pyodbc.SQL_DBMS_NAME))
        version = str(dbapi.getinfo(pyodbc.SQL_DBMS_VER))
        driver = str(dbapi.getinfo(pyodbc.SQL_DRIVER_NAME))
        expected = _DBMS_NAMES.get(runtime.dialect)
        return f"{name} {version} through ODBC driver {driver}", expected is None or name == expected
    return f"{conn.dialect.name} server {conn.dialect.server_version_info}", True


def _may_read(conn: Connection, runtime: Runtime) -> str:
    dbapi: Any = conn.connection.driver_connection
    if runtime.dialect == "postgresql":
        count = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND has_table_privilege(c.oid, 'SELECT')"
        ).scalar()
        return f"the user may read {count} tables and views"
    if isinstance(dbapi, sqlite3.Connection):
        count = conn.exec_driver_sql("SELECT count(*) FROM sqlite_master WHERE type IN ('table', 'view')").scalar()
        return f"the catalog lists {count} tables and views"
    if hasattr(dbapi, "cursor") and hasattr(dbapi, "getinfo"):  # pyodbc: the driver's own catalog call
        cursor = dbapi.cursor()
        try:
            tables = cursor.tables().fetchall()
        finally:
            cursor.close()
        return f"the catalog lists {len(tables)} tables and views"
    conn.exec_driver_sql("SELECT 1")
    return "the server answers queries"


def _read_only_enforced(conn: Connection, runtime: Runtime) -> profiles_pb2.ProfileCheck | None:
    if not runtime.profile.read_only:
        return None
    if runtime.dialect == "postgresql":
        state = conn.exec_driver_sql("SHOW transaction_read_only").scalar()
        return _check("read-only", state == "on", f"the database runs this profile's transactions with "
                                                   f"transaction_read_only = {state}")
    if runtime.dialect == "sqlite":
        state = conn.exec_driver_sql("PRAGMA query_only").scalar()
        return _check("read-only", state == 1, f"SQLite query_only = {state}")
    return None


def run_checks(runtime: Runtime) -> list[profiles_pb2.ProfileCheck]:
    """Run the checks in order (blocking: call it in the profile's thread pool)."""
    checks: list[profiles_pb2.ProfileCheck] = []
    reachable = _reachable(runtime)
    if reachable is not None:
        checks.append(reachable)
        if not reachable.ok:
            return checks
    if runtime.profile.odbc_connect is not None and runtime.dialect in _DBMS_NAMES:
        # The dialect's first queries on connect are its server's own SQL: ask the driver first.
        import pyodbc

        try:
            raw = runtime.odbc_connect()
        except Exception as exc:
            return checks + _connect_failure(runtime, exc)
        try:
            name = str(raw.getinfo(pyodbc.SQL_DBMS_NAME))
        finally:
            raw.close()
        if name != _DBMS_NAMES[runtime.dialect]:
            return [
                *checks,
                _check("credentials", True, "the server accepted the credentials"),
                _check("dialect", False, f"the server is {name}, not {_DBMS_NAMES[runtime.dialect]} as the "
                                         f"profile's dialect {runtime.dialect} expects"),
            ]
    session = Session(runtime)
    try:
        try:
            session.connect()
        except Exception as exc:
            return checks + _connect_failure(runtime, exc)
        checks.append(_check("credentials", True, "the server accepted the credentials"))
        conn = session.connection()
        checks.append(_check("database exists", True, f"connected to {runtime.profile.display_url()}"))
        try:
            session.begin()
            description, matches = _server(conn, runtime)
            checks.append(_check("dialect", matches, f"the server is {description}; the profile's dialect is "
                                                     f"{runtime.dialect}"))
            if not matches:
                return checks
            checks.append(_check("may read", True, _may_read(conn, runtime)))
            enforced = _read_only_enforced(conn, runtime)
            if enforced is not None:
                checks.append(enforced)
        except sa.exc.DBAPIError as exc:
            name = "may read" if checks[-1].name == "dialect" else "dialect"
            checks.append(_check(name, False, scrub(first_lines(str(exc.orig)), runtime.secrets)))
    finally:
        session.close()
    return checks
