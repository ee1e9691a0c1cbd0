"""Database profiles: `profiles.databases.<name>` of the agent's config.

A profile is given by a SQLAlchemy `url` (without a password), or by `dialect`
with host, port, database and username; `dialect: odbc` names any ODBC source
by `connection_string` or `dsn`. The ODBC connection strings are built in
`agent.handlers.database.odbc`, next to the code that uses them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from onprem.agent.profiles.fields import ENV_NAME, Fields

__all__ = ["DatabaseProfile"]

_FIELDS = {
    "url", "dialect", "host", "port", "database", "username", "connection_string", "dsn", "options",
    "password_env", "password_file", "read_only", "pool_size", "statement_timeout_seconds", "max_rows",
    "idempotency_table", "idempotency_ttl_seconds",
}
#: How long a keyed write's record answers retries, unless the profile says otherwise: a day.
DEFAULT_IDEMPOTENCY_TTL_SECONDS = 86400.0
# Dialects whose read-only mode the handler has the database enforce (see agent/handlers/database/engine.py).
_READ_ONLY_DIALECTS = {"postgresql", "sqlite"}
# `dialect:` -> the SQLAlchemy driver name used when the config names none.
_DRIVERS = {"postgresql": "postgresql+psycopg", "mssql": "mssql+pyodbc", "odbc": "odbc+pyodbc"}


@dataclass(frozen=True)
class DatabaseProfile:
    """A database reachable through SQLAlchemy (ODBC sources through pyodbc)."""

    name: str
    #: A SQLAlchemy URL without a password, e.g. "postgresql+psycopg://reader@db:5432/erp";
    #: "odbc+pyodbc://" for a generic ODBC profile.
    url: str
    password_env: str | None = None
    password_file: str | None = None
    read_only: bool = False
    pool_size: int = 4
    statement_timeout_seconds: float | None = None
    max_rows: int | None = None
    #: Extra driver options: keyword arguments of the DBAPI connect() (e.g. sslmode), or, for ODBC
    #: profiles, attributes already folded into `odbc_connect`.
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: The ODBC connection string without a password (mssql and odbc profiles only).
    odbc_connect: str | None = None
    #: The table that records keyed writes (`agent.handlers.database.idempotency`); None: keys refused.
    idempotency_table: str | None = None
    #: How long a keyed write's record answers retries with the same key.
    idempotency_ttl_seconds: float = DEFAULT_IDEMPOTENCY_TTL_SECONDS

    @property
    def dialect(self) -> str:
        """The SQLAlchemy dialect name, e.g. "postgresql", "sqlite", "mssql" or "odbc"."""
        return make_url(self.url).get_backend_name()

    def display_url(self) -> str:
        """The URL with any password masked: the only form fit for messages and logs."""
        if self.odbc_connect is not None:
            return f"{self.dialect} ODBC '{self.odbc_connect}'"
        return make_url(self.url).render_as_string(hide_password=True)

    @classmethod
    def parse(cls, where: str, name: str, body: Mapping[str, Any]) -> DatabaseProfile:
        """The profile `body` describes, or a `ConfigError` naming the field at fault."""
        # Imported here: the handler package imports this module. Importing it also registers the
        # generic `odbc` dialect with SQLAlchemy, which the URL checks below need.
        from onprem.agent.handlers.database import odbc

        fields = Fields.known(where, body, _FIELDS)
        options = _options(fields)
        url, odbc_connect = _url(fields, options)
        dialect = url.get_backend_name()
        password_env = fields.optional_str("password_env")
        password_file = fields.optional_str("password_file")
        if password_env is not None and password_file is not None:
            raise fields.error("set password_env or password_file, not both")
        if password_env is not None and not ENV_NAME.match(password_env):
            raise fields.error(f"{password_env!r} is not an environment variable name", "password_env")
        if password_file is not None and not os.path.isabs(password_file):
            raise fields.error("must be an absolute path", "password_file")
        if (password_env or password_file) and url.password is not None:
            raise fields.error("holds a password although password_env/password_file is set", "url")
        read_only = fields.flag("read_only")
        if read_only and dialect not in _READ_ONLY_DIALECTS:
            driver = odbc.driver_of(odbc.parse_connection_string(odbc_connect)) if odbc_connect else None
            refusal = odbc.read_only_refusal(dialect, driver)
            if refusal is not None:
                raise fields.error(refusal, "read_only")
        timeout = fields.optional_seconds("statement_timeout_seconds")
        max_rows = fields.optional_positive_int("max_rows")
        idempotency_table = fields.optional_str("idempotency_table")
        if idempotency_table is not None:
            from onprem.agent.handlers.database.idempotency import check_table_name

            try:
                check_table_name(idempotency_table)
            except ValueError as exc:
                raise fields.error(str(exc), "idempotency_table") from None
        return cls(
            name=name,
            url=url.render_as_string(hide_password=False),
            password_env=password_env,
            password_file=password_file,
            read_only=read_only,
            pool_size=fields.positive_int("pool_size", 4),
            statement_timeout_seconds=timeout,
            max_rows=max_rows,
            options=MappingProxyType({} if odbc_connect is not None else options),
            odbc_connect=odbc_connect,
            idempotency_table=idempotency_table,
            idempotency_ttl_seconds=fields.seconds("idempotency_ttl_seconds", DEFAULT_IDEMPOTENCY_TTL_SECONDS),
        )


def _options(fields: Fields) -> dict[str, Any]:
    raw = fields.get("options")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise fields.error("expected a mapping of driver option to value", "options")
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            raise fields.error(f"option names must be non-empty strings, got {key!r}", "options")
        if key.lower() in ("password", "pwd"):
            raise fields.error("a password may not be inline; use password_env or password_file", f"options.{key}")
        if not isinstance(value, str | int | float | bool):
            raise fields.error("expected a string, number or boolean", f"options.{key}")
        options[key] = value
    return options


def _url(fields: Fields, options: dict[str, Any]) -> tuple[URL, str | None]:
    """The SQLAlchemy URL (without a password) and, for ODBC profiles, the connection string."""
    from onprem.agent.handlers.database import odbc

    raw_url = fields.optional_str("url")
    dialect = fields.optional_str("dialect")
    if raw_url is None and dialect is None:
        raise fields.error("required (a SQLAlchemy URL), or dialect with host, database, username", "url")
    if raw_url is not None and dialect is not None:
        raise fields.error("set url or dialect, not both")
    if raw_url is not None:
        given = [key for key in ("host", "port", "database", "username", "connection_string", "dsn")
                 if key in fields]
        if given:
            raise fields.error("not used with url; put it in the URL or use dialect", given[0])
        try:
            url: URL = make_url(raw_url)
        except (ArgumentError, ValueError):
            # The parser's own message quotes the URL, password and all.
            raise fields.error("not a valid SQLAlchemy URL, e.g. 'postgresql+psycopg://user@host/db'",
                               "url") from None
    else:
        assert dialect is not None
        url = _url_from_parts(fields, dialect)
    try:
        url.get_dialect()
    except NoSuchModuleError:
        raise fields.error(f"unknown database dialect {url.drivername!r}", "url") from None
    backend = url.get_backend_name()
    if backend == "odbc":
        return url, _generic_odbc(fields, options)
    if backend == "mssql" and url.get_driver_name() == "pyodbc" and dialect is not None:
        return url, odbc.mssql_connection_string(url, options)
    return url, None


def _url_from_parts(fields: Fields, dialect: str) -> URL:
    drivername = _DRIVERS.get(dialect, dialect)
    backend = drivername.split("+")[0]
    port = fields.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise fields.error(f"expected a port number, got {port!r}", "port")
    host = fields.optional_str("host")
    database = fields.optional_str("database")
    if backend not in ("sqlite", "odbc") and host is None:
        raise fields.error(f"required with dialect {dialect!r}", "host")
    if backend == "sqlite" and database is None:
        raise fields.error("required with dialect 'sqlite' (the database file's path)", "database")
    if backend != "odbc":
        for key in ("connection_string", "dsn"):
            if key in fields:
                raise fields.error("only for dialect 'odbc'", key)
    return URL.create(drivername, username=fields.optional_str("username"), host=host, port=port,
                      database=database)


def _generic_odbc(fields: Fields, options: dict[str, Any]) -> str:
    from onprem.agent.handlers.database import odbc

    text = fields.optional_str("connection_string")
    dsn = fields.optional_str("dsn")
    if (text is None) == (dsn is None):
        raise fields.error("a generic ODBC profile needs connection_string or dsn (one of them)")
    try:
        source = odbc.parse_connection_string(text) if text is not None else {"DSN": str(dsn)}
    except ValueError as exc:
        raise fields.error(str(exc), "connection_string") from None
    secret = odbc.secret_keys(source)
    if secret:
        raise fields.error(f"holds {secret[0]}=; use password_env or password_file", "connection_string")
    for key in ("host", "port", "database"):
        if key in fields:
            raise fields.error("not used with dialect 'odbc'; put it in connection_string", key)
    return odbc.generic_connection_string(source, fields.optional_str("username"), options)
