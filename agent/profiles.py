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
    """A database reachable through SQLAlchemy."""

    name: str
    url: str
    password_env: str | None = None
    password_file: str | None = None
    read_only: bool = False
    pool_size: int = 4
    statement_timeout_seconds: float | None = None
    max_rows: int | None = None

    @property
    def dialect(self) -> str:
        """The SQLAlchemy dialect name, e.g. "postgresql" or "sqlite"."""
        return make_url(self.url).get_backend_name()

    def display_url(self) -> str:
        """The URL with any password masked: the only form fit for messages and logs."""
        return make_url(self.url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class FolderProfile:
    """A folder tree; `root` is absolute and already resolved (no symlinks)."""

    name: str
    root: str
    read_only: bool = False


@dataclass(frozen=True)
class AppProfile:
    """An HTTP application under `base_url`."""

    name: str
    base_url: str
    #: Header name -> name of the environment variable holding its value.
    headers_from_env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    timeout_seconds: float = 30.0


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


def _parse_database(where: str, name: str, body: Mapping[str, Any]) -> DatabaseProfile:
    _refuse_unknown(
        where,
        body,
        {"url", "password_env", "password_file", "read_only", "pool_size", "statement_timeout_seconds", "max_rows"},
    )
    raw_url = _required_str(where, body, "url")
    try:
        url: URL = make_url(raw_url)
    except (ArgumentError, ValueError):
        # The parser's own message quotes the URL, password and all.
        raise ConfigError(f"{where}.url: not a valid SQLAlchemy URL, e.g. 'postgresql+psycopg://user@host/db'") from None
    try:
        url.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(f"{where}.url: unknown database dialect {url.drivername!r}") from None
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
    timeout = body.get("statement_timeout_seconds")
    if timeout is not None:
        timeout = _positive_number(where, "statement_timeout_seconds", timeout)
    max_rows = body.get("max_rows")
    if max_rows is not None:
        max_rows = _positive_int(where, "max_rows", max_rows)
    return DatabaseProfile(
        name=name,
        url=raw_url,
        password_env=password_env,
        password_file=password_file,
        read_only=_bool(where, body, "read_only"),
        pool_size=_positive_int(where, "pool_size", body.get("pool_size", 4)),
        statement_timeout_seconds=timeout,
        max_rows=max_rows,
    )


def _parse_folder(where: str, name: str, body: Mapping[str, Any]) -> FolderProfile:
    _refuse_unknown(where, body, {"root", "read_only"})
    root = _required_str(where, body, "root")
    if not os.path.isabs(root):
        raise ConfigError(f"{where}.root: must be an absolute path, got {root!r}")
    if not os.path.isdir(root):
        raise ConfigError(f"{where}.root: {root!r} is not an existing directory")
    # Resolve once so that confinement compares real paths with a real root.
    return FolderProfile(name=name, root=os.path.realpath(root), read_only=_bool(where, body, "read_only"))


def _parse_app(where: str, name: str, body: Mapping[str, Any]) -> AppProfile:
    _refuse_unknown(where, body, {"base_url", "headers_from_env", "timeout_seconds"})
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
    headers_raw = body.get("headers_from_env") or {}
    if not isinstance(headers_raw, Mapping):
        raise ConfigError(f"{where}.headers_from_env: expected a mapping of header name to env var name")
    headers: dict[str, str] = {}
    for header, env in headers_raw.items():
        if not isinstance(header, str) or not _HEADER_NAME.match(header):
            raise ConfigError(f"{where}.headers_from_env: {header!r} is not a valid header name")
        if not isinstance(env, str) or not _ENV_NAME.match(env):
            raise ConfigError(f"{where}.headers_from_env.{header}: {env!r} is not an environment variable name")
        if header.lower() in (h.lower() for h in headers):
            raise ConfigError(f"{where}.headers_from_env: header {header!r} is listed twice")
        headers[header] = env
    return AppProfile(
        name=name,
        base_url=base_url,
        headers_from_env=MappingProxyType(headers),
        timeout_seconds=_positive_number(where, "timeout_seconds", body.get("timeout_seconds", 30)),
    )


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
