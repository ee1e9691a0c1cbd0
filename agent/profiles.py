"""The agent's profiles: what the site's config lets callers reach.

`parse_profiles` turns the `profiles:` section of the agent's YAML config
(the mapping under that key, not the whole file) into frozen dataclasses,
and refuses anything it does not understand with a `ConfigError` that names
the profile and field, so that a typo fails at start-up, not at first use.
Secrets are never read here: a profile names where its secret lives (an
environment variable or a file) and the handler reads it when it connects.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from onprem.agent.handlers.apps_headers import NEVER_FROM_CALLER, canonical, steers

__all__ = [
    "AppProfile",
    "ConfigError",
    "DatabaseProfile",
    "FolderProfile",
    "Profiles",
    "parse_profiles",
]

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# RFC 9110 token characters: what a header field name may contain.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class ConfigError(ValueError):
    """The agent's config is invalid; the message names the profile and field."""


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

    @property
    def dialect(self) -> str:
        """The SQLAlchemy dialect name, e.g. "postgresql", "sqlite", "mssql" or "odbc"."""
        return make_url(self.url).get_backend_name()

    def display_url(self) -> str:
        """The URL with any password masked: the only form fit for messages and logs."""
        if self.odbc_connect is not None:
            return f"{self.dialect} ODBC '{self.odbc_connect}'"
        return make_url(self.url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class FolderProfile:
    """A folder tree; `root` is absolute and already resolved (no symlinks)."""

    name: str
    root: str
    read_only: bool = False
    #: The largest file a write may create, in bytes; None: no limit but the disk.
    max_file_size: int | None = None
    #: Globs (fnmatch, case-sensitive) on the names of files that Read may stream and Poll
    #: reports; empty: any name. List and Stat still show every name: they show no content.
    read_patterns: tuple[str, ...] = ()
    #: Globs on the names of files that may be written, deleted or renamed (both names); empty:
    #: any name. With patterns set, folders are deleted only when empty.
    write_patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class SecretSource:
    """Where one secret lives. It is read when a request uses it, so a rotated file needs no restart."""

    env: str | None = None
    file: str | None = None

    def describe(self) -> str:
        """Names the source, never the secret: fit for messages and logs."""
        return f"environment variable {self.env}" if self.env is not None else f"file {self.file}"


@dataclass(frozen=True)
class BasicAuth:
    """HTTP Basic credentials; the username may be plain config, the password never is."""

    password: SecretSource
    username: str | None = None
    username_source: SecretSource | None = None


#: Methods an app profile allows when its config names none. CONNECT and TRACE are never allowed.
DEFAULT_APP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True)
class AppProfile:
    """An HTTP application under `base_url`.

    Every secret (injected header values, bearer token, basic-auth password)
    is named by source, never held here; the handler reads it per call.
    """

    name: str
    base_url: str
    #: Header name -> name of the environment variable holding its value.
    headers_from_env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: Header name -> absolute path of the file holding its value (one trailing newline is dropped).
    headers_from_file: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: Sent as `Authorization: Bearer <token>`.
    bearer_token: SecretSource | None = None
    #: Sent as `Authorization: Basic <base64(user:password)>`.
    basic_auth: BasicAuth | None = None
    #: Upper-case HTTP methods a caller may use.
    methods: frozenset[str] = DEFAULT_APP_METHODS
    #: Paths relative to `base_url`, without leading or trailing '/', that calls may reach: a call's path
    #: must equal one or continue below it by whole segments. None: anything under `base_url`.
    path_prefixes: tuple[str, ...] | None = None
    #: Caller headers that could steer the app (method overrides, rewritten URLs, Host, forwarded identities:
    #: see `agent.handlers.apps_headers`) that this profile lets through, in canonical form (lower case, '_'
    #: as '-'). Empty: the agent refuses every one of them.
    allow_caller_headers: frozenset[str] = frozenset()
    #: PEM bundle of the CAs to trust instead of the system's (private CAs).
    ca_file: str | None = None
    #: PEM client certificate (and key, unless `client_key_file` is set) for apps that require mTLS.
    client_cert_file: str | None = None
    client_key_file: str | None = None
    #: False turns certificate verification off; only ever set explicitly, and logged as a warning.
    tls_verify: bool = True
    connect_timeout_seconds: float = 10.0
    #: How long the app may stay silent while the agent waits for bytes (or to send them).
    read_timeout_seconds: float = 30.0
    #: Largest response body, in bytes as received (before any Content-Encoding is undone). None: no limit.
    max_response_bytes: int | None = None

    @property
    def timeout_seconds(self) -> float:
        """The read timeout (the single `timeout_seconds` of older configs)."""
        return self.read_timeout_seconds

    def injected_header_names(self) -> frozenset[str]:
        """Lower-case names of the headers the agent sets, which a caller may neither send nor override."""
        names = {h.lower() for h in (*self.headers_from_env, *self.headers_from_file)}
        if self.bearer_token is not None or self.basic_auth is not None:
            names.add("authorization")
        return frozenset(names)


@dataclass(frozen=True)
class Profiles:
    """Every profile of the agent, by kind and name."""

    databases: Mapping[str, DatabaseProfile] = field(default_factory=dict)
    folders: Mapping[str, FolderProfile] = field(default_factory=dict)
    apps: Mapping[str, AppProfile] = field(default_factory=dict)


def parse_profiles(raw: Mapping[str, Any] | None) -> Profiles:
    """Validate the `profiles:` section and build the profiles it describes."""
    if raw is None:
        return Profiles()
    if not isinstance(raw, Mapping):
        raise ConfigError("profiles: expected a mapping with 'databases', 'folders' and/or 'apps'")
    _refuse_unknown("profiles", raw, {"databases", "folders", "apps"})
    return Profiles(
        databases=_parse_kind(raw, "databases", _parse_database),
        folders=_parse_kind(raw, "folders", _parse_folder),
        apps=_parse_kind(raw, "apps", _parse_app),
    )


def _parse_kind(raw: Mapping[str, Any], kind: str, parse: Any) -> dict[str, Any]:
    section = raw.get(kind)
    if section is None:  # `databases:` with nothing under it
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"profiles.{kind}: expected a mapping of profile name to settings")
    parsed: dict[str, Any] = {}
    for name, body in section.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"profiles.{kind}: profile name {name!r} may contain only letters, digits, '-' and '_'"
            )
        where = f"profiles.{kind}.{name}"
        if not isinstance(body, Mapping):
            raise ConfigError(f"{where}: expected a mapping of settings")
        parsed[name] = parse(where, name, body)
    return parsed


_DATABASE_FIELDS = {
    "url", "dialect", "host", "port", "database", "username", "connection_string", "dsn", "options",
    "password_env", "password_file", "read_only", "pool_size", "statement_timeout_seconds", "max_rows",
}
# Dialects whose read-only mode the handler has the database enforce (see agent/handlers/sql_engine.py).
_READ_ONLY_DIALECTS = {"postgresql", "sqlite"}


def _parse_database(where: str, name: str, body: Mapping[str, Any]) -> DatabaseProfile:
    from onprem.agent.handlers import sql_odbc  # registers the generic `odbc` dialect with SQLAlchemy

    _refuse_unknown(where, body, _DATABASE_FIELDS)
    options = _database_options(where, body.get("options"))
    url, odbc_connect = _database_url(where, body, options)
    dialect = url.get_backend_name()
    password_env = _optional_str(where, body, "password_env")
    password_file = _optional_str(where, body, "password_file")
    if password_env is not None and password_file is not None:
        raise ConfigError(f"{where}: set password_env or password_file, not both")
    if password_env is not None and not _ENV_NAME.match(password_env):
        raise ConfigError(f"{where}.password_env: {password_env!r} is not an environment variable name")
    if password_file is not None and not os.path.isabs(password_file):
        raise ConfigError(f"{where}.password_file: must be an absolute path")
    if (password_env or password_file) and url.password is not None:
        raise ConfigError(f"{where}.url: holds a password although password_env/password_file is set")
    read_only = _bool(where, body, "read_only")
    if read_only and dialect not in _READ_ONLY_DIALECTS:
        driver = sql_odbc.driver_of(sql_odbc.parse_connection_string(odbc_connect)) if odbc_connect else None
        refusal = sql_odbc.read_only_refusal(dialect, driver)
        if refusal is not None:
            raise ConfigError(f"{where}.read_only: {refusal}")
    timeout = body.get("statement_timeout_seconds")
    if timeout is not None:
        timeout = _positive_number(where, "statement_timeout_seconds", timeout)
    max_rows = body.get("max_rows")
    if max_rows is not None:
        max_rows = _positive_int(where, "max_rows", max_rows)
    return DatabaseProfile(
        name=name,
        url=url.render_as_string(hide_password=False),
        password_env=password_env,
        password_file=password_file,
        read_only=read_only,
        pool_size=_positive_int(where, "pool_size", body.get("pool_size", 4)),
        statement_timeout_seconds=timeout,
        max_rows=max_rows,
        options=MappingProxyType({} if odbc_connect is not None else options),
        odbc_connect=odbc_connect,
    )


def _database_options(where: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}.options: expected a mapping of driver option to value")
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}.options: option names must be non-empty strings, got {key!r}")
        if key.lower() in ("password", "pwd"):
            raise ConfigError(f"{where}.options.{key}: a password may not be inline; use password_env or password_file")
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(f"{where}.options.{key}: expected a string, number or boolean")
        options[key] = value
    return options


def _database_url(where: str, body: Mapping[str, Any], options: dict[str, Any]) -> tuple[URL, str | None]:
    """The SQLAlchemy URL (without a password) and, for ODBC profiles, the connection string."""
    from onprem.agent.handlers import sql_odbc

    raw_url = _optional_str(where, body, "url")
    dialect = _optional_str(where, body, "dialect")
    if raw_url is None and dialect is None:
        raise ConfigError(f"{where}.url: required (a SQLAlchemy URL), or dialect with host, database, username")
    if raw_url is not None and dialect is not None:
        raise ConfigError(f"{where}: set url or dialect, not both")
    parts = ("host", "port", "database", "username", "connection_string", "dsn")
    if raw_url is not None:
        given = [key for key in parts if key in body]
        if given:
            raise ConfigError(f"{where}.{given[0]}: not used with url; put it in the URL or use dialect")
        try:
            url: URL = make_url(raw_url)
        except (ArgumentError, ValueError):
            # The parser's own message quotes the URL, password and all.
            raise ConfigError(
                f"{where}.url: not a valid SQLAlchemy URL, e.g. 'postgresql+psycopg://user@host/db'"
            ) from None
    else:
        assert dialect is not None
        url = _url_from_parts(where, body, dialect)
    try:
        url.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(f"{where}.url: unknown database dialect {url.drivername!r}") from None
    backend = url.get_backend_name()
    if backend == "odbc":
        return url, _generic_odbc(where, body, options)
    if backend == "mssql" and url.get_driver_name() == "pyodbc" and dialect is not None:
        attributes = {"DRIVER": str(options.pop("driver", options.pop("DRIVER", sql_odbc.MSSQL_DEFAULT_DRIVER)))}
        server = url.host or ""
        attributes["SERVER"] = f"{server},{url.port}" if url.port else server
        if url.database:
            attributes["DATABASE"] = url.database
        if url.username:
            attributes["UID"] = url.username
        attributes.update({k: _odbc_text(v) for k, v in options.items()})
        return url, sql_odbc.connection_string(attributes)
    return url, None


def _url_from_parts(where: str, body: Mapping[str, Any], dialect: str) -> URL:
    drivers = {"postgresql": "postgresql+psycopg", "mssql": "mssql+pyodbc", "odbc": "odbc+pyodbc"}
    drivername = drivers.get(dialect, dialect)
    port = body.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise ConfigError(f"{where}.port: expected a port number, got {port!r}")
    host = _optional_str(where, body, "host")
    database = _optional_str(where, body, "database")
    if drivername.split("+")[0] not in ("sqlite", "odbc") and host is None:
        raise ConfigError(f"{where}.host: required with dialect {dialect!r}")
    if drivername.split("+")[0] == "sqlite" and database is None:
        raise ConfigError(f"{where}.database: required with dialect 'sqlite' (the database file's path)")
    if drivername.split("+")[0] != "odbc":
        for key in ("connection_string", "dsn"):
            if key in body:
                raise ConfigError(f"{where}.{key}: only for dialect 'odbc'")
    return URL.create(drivername, username=_optional_str(where, body, "username"), host=host, port=port,
                      database=database)


def _generic_odbc(where: str, body: Mapping[str, Any], options: dict[str, Any]) -> str:
    from onprem.agent.handlers import sql_odbc

    text = _optional_str(where, body, "connection_string")
    dsn = _optional_str(where, body, "dsn")
    if (text is None) == (dsn is None):
        raise ConfigError(f"{where}: a generic ODBC profile needs connection_string or dsn (one of them)")
    try:
        attributes = sql_odbc.parse_connection_string(text) if text is not None else {"DSN": str(dsn)}
    except ValueError as exc:
        raise ConfigError(f"{where}.connection_string: {exc}") from None
    secret = sql_odbc.secret_keys(attributes)
    if secret:
        raise ConfigError(f"{where}.connection_string: holds {secret[0]}=; use password_env or password_file")
    for key in ("host", "port", "database"):
        if key in body:
            raise ConfigError(f"{where}.{key}: not used with dialect 'odbc'; put it in connection_string")
    username = _optional_str(where, body, "username")
    if username is not None:
        attributes["UID"] = username
    attributes.update({k: _odbc_text(v) for k, v in options.items()})
    return sql_odbc.connection_string(attributes)


def _odbc_text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _parse_folder(where: str, name: str, body: Mapping[str, Any]) -> FolderProfile:
    _refuse_unknown(where, body, {"root", "read_only", "max_file_size", "read_patterns", "write_patterns"})
    root = _required_str(where, body, "root")
    if not os.path.isabs(root):
        raise ConfigError(f"{where}.root: must be an absolute path, got {root!r}")
    if not os.path.isdir(root):
        raise ConfigError(f"{where}.root: {root!r} is not an existing directory")
    max_file_size = body.get("max_file_size")
    if max_file_size is not None:
        max_file_size = _positive_int(where, "max_file_size", max_file_size)
    # Resolve once so that confinement compares real paths with a real root.
    return FolderProfile(
        name=name,
        root=os.path.realpath(root),
        read_only=_bool(where, body, "read_only"),
        max_file_size=max_file_size,
        read_patterns=_name_patterns(where, body, "read_patterns"),
        write_patterns=_name_patterns(where, body, "write_patterns"),
    )


def _name_patterns(where: str, body: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = body.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}.{key}: expected a non-empty list of name globs, e.g. ['*.csv']")
    for pattern in value:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{where}.{key}: expected non-empty strings, got {pattern!r}")
        # Patterns match a file's name, never its folders: a "/" could only ever fail to match.
        if "/" in pattern:
            raise ConfigError(f"{where}.{key}: {pattern!r} contains '/'; patterns match file names only")
    return tuple(value)


# Injected headers with these names would be dropped by the HTTP client or break the message's framing.
_APP_UNINJECTABLE = frozenset({
    "connection", "content-length", "expect", "host", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
})


def _parse_app(where: str, name: str, body: Mapping[str, Any]) -> AppProfile:
    _refuse_unknown(where, body, {
        "base_url", "headers_from_env", "headers_from_file", "bearer_token_env", "bearer_token_file", "basic_auth",
        "methods", "path_prefixes", "ca_file", "client_cert_file", "client_key_file", "tls_verify",
        "timeout_seconds", "connect_timeout_seconds", "read_timeout_seconds", "max_response_bytes",
        "allow_caller_headers",
    })
    base_url = _required_str(where, body, "base_url")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}.base_url: must be an http:// or https:// URL with a host, got {base_url!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{where}.base_url: must not contain user info; use headers_from_env for credentials")
    if parts.query or parts.fragment or "?" in base_url or "#" in base_url:
        raise ConfigError(f"{where}.base_url: must not contain a query or fragment")
    if not parts.path.endswith("/"):
        raise ConfigError(f"{where}.base_url: must end with '/', e.g. {base_url + '/'!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(f"{where}.base_url: invalid port") from None

    headers_from_env = _app_header_map(where, body, "headers_from_env")
    for header, env in headers_from_env.items():
        if not _ENV_NAME.match(env):
            raise ConfigError(f"{where}.headers_from_env.{header}: {env!r} is not an environment variable name")
    headers_from_file = _app_header_map(where, body, "headers_from_file")
    for header, path in headers_from_file.items():
        if not os.path.isabs(path):
            raise ConfigError(f"{where}.headers_from_file.{header}: must be an absolute path, got {path!r}")
    injected = [h.lower() for h in (*headers_from_env, *headers_from_file)]
    for header in sorted(set(injected)):
        if injected.count(header) > 1:
            raise ConfigError(f"{where}: header {header!r} is injected twice (headers_from_env and headers_from_file)")
    bearer = _app_secret(where, body, "bearer_token")
    basic = _app_basic_auth(where, body.get("basic_auth"))
    if bearer is not None and basic is not None:
        raise ConfigError(f"{where}: set bearer_token_* or basic_auth, not both (each sets Authorization)")
    if (bearer is not None or basic is not None) and "authorization" in injected:
        raise ConfigError(f"{where}: Authorization is injected twice (a headers_from_* entry and bearer/basic auth)")
    allowed_headers = _app_caller_headers(where, body.get("allow_caller_headers"), frozenset(
        {canonical(h) for h in injected} | ({"authorization"} if bearer is not None or basic is not None else set())))

    https = parts.scheme == "https"
    ca_file = _app_existing_file(where, body, "ca_file")
    cert_file = _app_existing_file(where, body, "client_cert_file")
    key_file = _app_existing_file(where, body, "client_key_file")
    tls_verify = body.get("tls_verify", True)
    if not isinstance(tls_verify, bool):
        raise ConfigError(f"{where}.tls_verify: expected true or false, got {tls_verify!r}")
    if not https and (ca_file or cert_file or key_file or "tls_verify" in body):
        raise ConfigError(f"{where}: ca_file, client_cert_file, client_key_file and tls_verify need an https:// base_url")
    if key_file and not cert_file:
        raise ConfigError(f"{where}.client_key_file: set client_cert_file too")
    if not tls_verify and ca_file:
        raise ConfigError(f"{where}: ca_file is pointless with tls_verify: false; drop one of them")

    # `timeout_seconds` (older configs) sets both; the specific settings win.
    both = _positive_number(where, "timeout_seconds", body["timeout_seconds"]) if "timeout_seconds" in body else None
    connect_timeout = _positive_number(where, "connect_timeout_seconds", body.get("connect_timeout_seconds", both or 10))
    read_timeout = _positive_number(where, "read_timeout_seconds", body.get("read_timeout_seconds", both or 30))
    max_response = body.get("max_response_bytes")
    return AppProfile(
        name=name,
        base_url=base_url,
        headers_from_env=MappingProxyType(headers_from_env),
        headers_from_file=MappingProxyType(headers_from_file),
        bearer_token=bearer,
        basic_auth=basic,
        methods=_app_methods(where, body.get("methods")),
        path_prefixes=_app_prefixes(where, body.get("path_prefixes")),
        allow_caller_headers=allowed_headers,
        ca_file=ca_file,
        client_cert_file=cert_file,
        client_key_file=key_file,
        tls_verify=tls_verify,
        connect_timeout_seconds=connect_timeout,
        read_timeout_seconds=read_timeout,
        max_response_bytes=None if max_response is None else _positive_int(where, "max_response_bytes", max_response),
    )


def _app_header_map(where: str, body: Mapping[str, Any], key: str) -> dict[str, str]:
    raw = body.get(key) or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}.{key}: expected a mapping of header name to source")
    headers: dict[str, str] = {}
    for header, source in raw.items():
        if not isinstance(header, str) or not _HEADER_NAME.match(header):
            raise ConfigError(f"{where}.{key}: {header!r} is not a valid header name")
        if header.lower() in _APP_UNINJECTABLE:
            raise ConfigError(f"{where}.{key}: {header!r} is managed by the HTTP client and cannot be injected")
        if header.lower() in (h.lower() for h in headers):
            raise ConfigError(f"{where}.{key}: header {header!r} is listed twice")
        if not isinstance(source, str) or not source:
            raise ConfigError(f"{where}.{key}.{header}: expected a non-empty string, got {source!r}")
        headers[header] = source
    return headers


def _app_secret(where: str, body: Mapping[str, Any], stem: str) -> SecretSource | None:
    """`<stem>_env` or `<stem>_file`, at most one of them."""
    env = _optional_str(where, body, f"{stem}_env")
    path = _optional_str(where, body, f"{stem}_file")
    if env is not None and path is not None:
        raise ConfigError(f"{where}: set {stem}_env or {stem}_file, not both")
    if env is not None and not _ENV_NAME.match(env):
        raise ConfigError(f"{where}.{stem}_env: {env!r} is not an environment variable name")
    if path is not None and not os.path.isabs(path):
        raise ConfigError(f"{where}.{stem}_file: must be an absolute path, got {path!r}")
    if env is None and path is None:
        return None
    return SecretSource(env=env, file=path)


def _app_basic_auth(where: str, raw: Any) -> BasicAuth | None:
    if raw is None:
        return None
    where = f"{where}.basic_auth"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping with username* and password_env or password_file")
    _refuse_unknown(where, raw, {"username", "username_env", "username_file", "password_env", "password_file"})
    password = _app_secret(where, raw, "password")
    if password is None:
        raise ConfigError(f"{where}: set password_env or password_file (a password is never written in the config)")
    username = _optional_str(where, raw, "username")
    username_source = _app_secret(where, raw, "username")
    if (username is None) == (username_source is None):
        raise ConfigError(f"{where}: set exactly one of username, username_env, username_file")
    if username is not None and (":" in username or _APP_CONTROL.search(username)):
        raise ConfigError(f"{where}.username: must not contain ':' or control characters")
    return BasicAuth(password=password, username=username, username_source=username_source)


def _app_existing_file(where: str, body: Mapping[str, Any], key: str) -> str | None:
    path = _optional_str(where, body, key)
    if path is None:
        return None
    if not os.path.isabs(path):
        raise ConfigError(f"{where}.{key}: must be an absolute path, got {path!r}")
    if not os.path.isfile(path):
        raise ConfigError(f"{where}.{key}: {path!r} is not an existing file")
    return path


def _app_methods(where: str, raw: Any) -> frozenset[str]:
    if raw is None:
        return DEFAULT_APP_METHODS
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}.methods: expected a non-empty list such as [GET, POST]")
    methods = set()
    for method in raw:
        if not isinstance(method, str) or not _HEADER_NAME.match(method):
            raise ConfigError(f"{where}.methods: {method!r} is not an HTTP method")
        if method.upper() in ("CONNECT", "TRACE"):
            raise ConfigError(f"{where}.methods: {method.upper()} is never allowed")
        methods.add(method.upper())
    return frozenset(methods)


_APP_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _app_caller_headers(where: str, raw: Any, injected: frozenset[str]) -> frozenset[str]:
    """`allow_caller_headers`: only headers the agent would otherwise refuse, and never a hop-by-hop one.

    Listing anything else is refused rather than ignored, so that a config which
    believes it opened (or closed) something says so at start-up.
    """
    where = f"{where}.allow_caller_headers"
    if raw is None:
        return frozenset()
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: expected a list of header names such as [X-Forwarded-For]")
    allowed: set[str] = set()
    for header in raw:
        if not isinstance(header, str) or not _HEADER_NAME.fullmatch(header):
            raise ConfigError(f"{where}: {header!r} is not a valid header name")
        name = canonical(header)
        if name in NEVER_FROM_CALLER:
            raise ConfigError(f"{where}: {header!r} is hop-by-hop: it belongs to the agent's own connection to "
                              "the app and can never come from a caller")
        if name in injected:
            raise ConfigError(f"{where}: {header!r} is injected by the agent for this profile; a caller can never "
                              "send or override it")
        if steers(name, injects_credentials=bool(injected)) is None:
            raise ConfigError(f"{where}: callers may already send {header!r}; list only headers the agent refuses "
                              "(method overrides, rewritten URLs, Host, Forwarded, X-Forwarded-*, client "
                              "addresses, and Authorization or Cookie on a profile that injects credentials)")
        if name in allowed:
            raise ConfigError(f"{where}: {header!r} is listed twice")
        allowed.add(name)
    return frozenset(allowed)


def _app_prefixes(where: str, raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}.path_prefixes: expected a non-empty list such as ['orders/', 'customers/']")
    prefixes = []
    for prefix in raw:
        # Plain text only: the handler compares prefixes with decoded paths, segment by segment.
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ConfigError(f"{where}.path_prefixes: {prefix!r} must be a non-empty path such as 'orders/'")
        if prefix.startswith("/"):
            raise ConfigError(f"{where}.path_prefixes: {prefix!r} is relative to base_url and must not start with '/'")
        stripped = prefix.rstrip("/")
        if (_APP_CONTROL.search(stripped) or any(c in stripped for c in "%?#\\")
                or any(s in ("", ".", "..") for s in stripped.split("/"))):
            raise ConfigError(f"{where}.path_prefixes: {prefix!r} must be plain path segments "
                              "(no '.', '..', empty segments, '%', '?', '#', '\\' or control characters)")
        prefixes.append(stripped)
    return tuple(prefixes)


def _refuse_unknown(where: str, body: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(str(k) for k in body if k not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; expected one of {', '.join(sorted(known))}")


def _required_str(where: str, body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        raise ConfigError(f"{where}.{key}: required")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: expected a non-empty string")
    return value


def _optional_str(where: str, body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: expected a non-empty string")
    return value


def _bool(where: str, body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    # YAML's `yes`/`no` already arrive as bools; a quoted "false" is a mistake worth naming.
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def _positive_int(where: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}.{key}: expected a positive integer, got {value!r}")
    return value


def _positive_number(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}.{key}: expected a positive number of seconds, got {value!r}")
    return float(value)
