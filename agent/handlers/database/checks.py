"""`test-profile` for a database profile: which of the usual set-up mistakes is the one.

The checks run in order and stop at the first failure that makes the rest
meaningless: the host is reachable (a TCP connect), the credentials are
accepted, the database exists, the server is what the dialect or driver says,
the user may read (the catalog answers), and for a read-only profile that the
database itself refuses writes, and whether its role could write outside the
agent (a warning: the role is the only complete boundary, see
docs/agent-config.md). Every message is scrubbed of secrets.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url

from onprem.agent.handlers.database import odbc
from onprem.agent.handlers.database.engine import ProfileRuntime, RequestConnection
from onprem.agent.handlers.database.errors import first_lines, scrub
from onprem.tunnel.errors import RequestError
from onprem.v1 import profiles_pb2

__all__ = ["run_checks"]

_TCP_TIMEOUT_SECONDS = 5.0
_DEFAULT_PORTS = {"postgresql": 5432, "mssql": 1433, "mysql": 3306, "mariadb": 3306, "oracle": 1521}
# What SQL_DBMS_NAME says for the dialects that reach a database through ODBC.
_DBMS_NAMES = {"mssql": "Microsoft SQL Server"}


def _check(name: str, ok: bool, message: str, *, warning: bool = False) -> profiles_pb2.ProfileCheck:
    return profiles_pb2.ProfileCheck(name=name, ok=ok, message=message, warning=warning)


# What a PostgreSQL role could change outside the agent's read-only transaction: one row per finding.
# It runs with every health check (once a minute by default): large objects stop at the first match.
# Ownership counts through membership (MEMBER: a SET ROLE away), privileges as has_*_privilege sees them.
_PG_WRITE_PRIVILEGES = """
WITH me AS (SELECT * FROM pg_catalog.pg_roles WHERE rolname = current_user),
user_schemas AS (
  SELECT oid, nspname, nspowner FROM pg_catalog.pg_namespace
  WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname !~ '^pg_(toast|temp_|toast_temp_)'
),
relations AS (
  SELECT c.oid, c.relkind, c.relowner, pg_catalog.format('%%I.%%I', n.nspname, c.relname) AS name
  FROM pg_catalog.pg_class c JOIN user_schemas n ON n.oid = c.relnamespace
)
SELECT 'attribute', a FROM me, LATERAL (VALUES ('SUPERUSER', rolsuper), ('CREATEROLE', rolcreaterole),
  ('CREATEDB', rolcreatedb), ('BYPASSRLS', rolbypassrls), ('REPLICATION', rolreplication)) v(a, has) WHERE has
UNION ALL
SELECT 'member of', rolname FROM pg_catalog.pg_roles
  WHERE rolname IN ('pg_write_all_data', 'pg_write_server_files', 'pg_execute_server_program')
  AND pg_catalog.pg_has_role(oid, 'MEMBER')
UNION ALL
SELECT 'table', name FROM relations WHERE relkind IN ('r', 'p', 'v', 'm', 'f') AND (
  pg_catalog.pg_has_role(relowner, 'MEMBER')
  OR pg_catalog.has_table_privilege(oid, 'INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER')
  OR pg_catalog.has_any_column_privilege(oid, 'INSERT, UPDATE'))
UNION ALL
SELECT 'sequence', name FROM relations WHERE relkind = 'S' AND (
  pg_catalog.pg_has_role(relowner, 'MEMBER') OR pg_catalog.has_sequence_privilege(oid, 'USAGE, UPDATE'))
UNION ALL
SELECT 'schema', nspname FROM user_schemas
  WHERE pg_catalog.pg_has_role(nspowner, 'MEMBER') OR pg_catalog.has_schema_privilege(oid, 'CREATE')
UNION ALL
SELECT 'database', datname FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()
  AND (pg_catalog.pg_has_role(datdba, 'MEMBER') OR pg_catalog.has_database_privilege(oid, 'CREATE'))
UNION ALL
SELECT 'large objects', '' WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_largeobject_metadata m
  WHERE pg_catalog.pg_has_role(m.lomowner, 'MEMBER') OR EXISTS (
    SELECT 1 FROM pg_catalog.aclexplode(m.lomacl) a
    WHERE a.privilege_type = 'UPDATE' AND (a.grantee = 0 OR pg_catalog.pg_has_role(a.grantee, 'MEMBER'))))
UNION ALL
SELECT 'new large objects', 'lo_create' WHERE pg_catalog.has_function_privilege('pg_catalog.lo_create(oid)', 'EXECUTE')
  OR pg_catalog.has_function_privilege('pg_catalog.lo_creat(integer)', 'EXECUTE')
  OR pg_catalog.has_function_privilege('pg_catalog.lo_from_bytea(oid, bytea)', 'EXECUTE')
UNION ALL
SELECT 'security definer functions', count(*)::text FROM pg_catalog.pg_proc p JOIN user_schemas n ON n.oid = p.pronamespace
  WHERE p.prosecdef AND NOT pg_catalog.pg_has_role(p.proowner, 'MEMBER')
  AND pg_catalog.has_function_privilege(p.oid, 'EXECUTE') HAVING count(*) > 0
UNION ALL
SELECT 'extension', extname FROM pg_catalog.pg_extension WHERE extname IN ('dblink', 'postgres_fdw', 'adminpack')
UNION ALL
SELECT 'foreign server', srvname FROM pg_catalog.pg_foreign_server
  WHERE pg_catalog.has_server_privilege(oid, 'USAGE')
"""

_FINDING_WORDS = {
    "attribute": "has the attributes",
    "member of": "is a member of",
    "table": "owns or may change the tables",
    "sequence": "owns or may advance the sequences",
    "schema": "owns or may create objects in the schemas",
    "database": "owns or may create schemas in the database",
    "large objects": "owns or may write large objects",
    "new large objects": "may create large objects (EXECUTE on lo_create, lo_creat, lo_from_bytea: PUBLIC's by "
                         "default; revoke it)",
    "security definer functions": "may call {} SECURITY DEFINER function(s) of other roles",
    "extension": "may reach other connections or files through the extensions",
    "foreign server": "may use the foreign servers",
}
_MAX_NAMES = 5


def _address(runtime: ProfileRuntime) -> tuple[str, int] | None:
    """Where the database listens, when the profile says; None for files and DSNs."""
    profile = runtime.profile
    if profile.odbc_connect is not None:
        attributes = {k.lower(): v for k, v in odbc.parse_connection_string(profile.odbc_connect).items()}
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


def _reachable(runtime: ProfileRuntime) -> profiles_pb2.ProfileCheck | None:
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


def _connect_failure(runtime: ProfileRuntime, exc: BaseException) -> list[profiles_pb2.ProfileCheck]:
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


def _server(conn: Connection, runtime: ProfileRuntime) -> tuple[str, bool]:
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


def _may_read(conn: Connection, runtime: ProfileRuntime) -> str:
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


def _read_only_enforced(probe: RequestConnection, runtime: ProfileRuntime) -> profiles_pb2.ProfileCheck | None:
    if not runtime.profile.read_only:
        return None
    conn = probe.connection()
    if runtime.dialect == "postgresql":
        row = conn.exec_driver_sql(
            "SELECT pg_catalog.current_setting('transaction_read_only'),"
            " pg_catalog.current_setting('default_transaction_read_only')"
        ).one()
        guard = probe.pg_guard
        guarded = guard is not None
        if guard is not None:
            guard.check("the check")
        ok = row[0] == "on" and row[1] == "on" and guarded
        return _check("read-only", ok, f"the database runs this profile's transactions with transaction_read_only = "
                                       f"{row[0]} (default_transaction_read_only = {row[1]}), "
                                       f"{'and a commit guard that makes any COMMIT fail' if guarded else 'unguarded'}")
    if runtime.dialect == "sqlite":
        state = conn.exec_driver_sql("PRAGMA query_only").scalar()
        return _check("read-only", state == 1, f"SQLite query_only = {state}, and an authorizer that refuses "
                                               "transaction control, ATTACH and PRAGMA settings")
    return None


def _role_may_write(conn: Connection, runtime: ProfileRuntime) -> profiles_pb2.ProfileCheck | None:
    """A warning when the login role of a read-only profile could write outside the agent."""
    if not runtime.profile.read_only:
        return None
    if runtime.dialect == "postgresql":
        user = str(conn.exec_driver_sql("SELECT current_user").scalar())
        findings: dict[str, list[str]] = {}
        for kind, name in conn.exec_driver_sql(_PG_WRITE_PRIVILEGES).all():
            findings.setdefault(str(kind), []).append(str(name))
        if not findings:
            return _check("role may not write", True, f"the role '{user}' has no privilege to write that the "
                                                     "catalog shows")
        parts = []
        for kind, names in findings.items():
            words = _FINDING_WORDS[kind]
            if kind in ("new large objects", "large objects") or "{}" in words:  # a fixed sentence, or a count
                parts.append(words.format(*names))
                continue
            shown = ", ".join(names[:_MAX_NAMES]) + (f" and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES
                                                      else "")
            parts.append(f"{words} {shown}")
        return _check(
            "role may not write", True,
            f"the role '{user}' could write outside this agent: {'; '.join(parts)}. The agent keeps this profile's "
            "requests read-only, but only a role without these rights is a complete boundary (dblink, SECURITY "
            "DEFINER functions, other clients): log in as a role with SELECT only",
            warning=True,
        )
    if runtime.dialect == "sqlite":
        url = make_url(runtime.profile.url)
        path = url.database or ""
        uri = "mode=ro" in path or str(url.query.get("mode", "")) == "ro"
        if path and path != ":memory:" and not uri and os.access(path, os.W_OK):
            return _check("role may not write", True, f"the agent's OS user may write {path}: query_only keeps this "
                                                      "profile's requests read-only, but only file permissions (or "
                                                      "a mode=ro URI) stop other writers", warning=True)
        return _check("role may not write", True, "the agent cannot write the database file")
    return None


def run_checks(runtime: ProfileRuntime) -> list[profiles_pb2.ProfileCheck]:
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
    probe = RequestConnection(runtime)
    try:
        try:
            probe.connect()
        except Exception as exc:
            return checks + _connect_failure(runtime, exc)
        checks.append(_check("credentials", True, "the server accepted the credentials"))
        conn = probe.connection()
        checks.append(_check("database exists", True, f"connected to {runtime.profile.display_url()}"))
        stage = "dialect"  # the check a database error is reported under
        try:
            probe.begin()
            description, matches = _server(conn, runtime)
            checks.append(_check("dialect", matches, f"the server is {description}; the profile's dialect is "
                                                     f"{runtime.dialect}"))
            if not matches:
                return checks
            stage = "may read"
            checks.append(_check("may read", True, _may_read(conn, runtime)))
            stage = "read-only"
            enforced = _read_only_enforced(probe, runtime)
            stage = "role may not write"
            for more in (enforced, _role_may_write(conn, runtime)):
                if more is not None:
                    checks.append(more)
        except sa.exc.DBAPIError as exc:
            checks.append(_check(stage, False, scrub(first_lines(str(exc.orig)), runtime.secrets)))
    finally:
        probe.close()
    return checks
