"""App profiles: `profiles.apps.<name>` of the agent's config, HTTP applications under a base URL."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import SplitResult, urlsplit

from onprem.agent.profiles.fields import ENV_NAME, HEADER_NAME, ConfigError, Fields

__all__ = ["DEFAULT_APP_METHODS", "AppProfile", "BasicAuth", "SecretSource"]

_FIELDS = {
    "base_url", "headers_from_env", "headers_from_file", "bearer_token_env", "bearer_token_file", "basic_auth",
    "methods", "path_prefixes", "ca_file", "client_cert_file", "client_key_file", "tls_verify",
    "timeout_seconds", "connect_timeout_seconds", "read_timeout_seconds", "max_response_bytes",
    "allow_caller_headers",
}
_BASIC_AUTH_FIELDS = {"username", "username_env", "username_file", "password_env", "password_file"}
# Injected headers with these names would be dropped by the HTTP client or break the message's framing.
_UNINJECTABLE = frozenset({
    "connection", "content-length", "expect", "host", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: Methods an app profile allows when its config names none. CONNECT and TRACE are never allowed.
DEFAULT_APP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


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
    #: see `agent.handlers.apps.headers`) that this profile lets through, in canonical form (lower case, '_'
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

    @classmethod
    def parse(cls, where: str, name: str, body: Mapping[str, Any]) -> AppProfile:
        """The profile `body` describes, or a `ConfigError` naming the field at fault."""
        # Imported here: the handler package imports this module.
        from onprem.agent.handlers.apps.headers import canonical

        fields = Fields.known(where, body, _FIELDS)
        base_url = fields.required_str("base_url")
        parts = _base_url_parts(fields, base_url)

        headers_from_env = _header_map(fields, "headers_from_env")
        for header, env in headers_from_env.items():
            if not ENV_NAME.match(env):
                raise fields.error(f"{env!r} is not an environment variable name", f"headers_from_env.{header}")
        headers_from_file = _header_map(fields, "headers_from_file")
        for header, path in headers_from_file.items():
            if not os.path.isabs(path):
                raise fields.error(f"must be an absolute path, got {path!r}", f"headers_from_file.{header}")
        injected = [h.lower() for h in (*headers_from_env, *headers_from_file)]
        for header in sorted(set(injected)):
            if injected.count(header) > 1:
                raise fields.error(f"header {header!r} is injected twice (headers_from_env and headers_from_file)")
        bearer = _secret(fields, "bearer_token")
        basic = _basic_auth(fields)
        if bearer is not None and basic is not None:
            raise fields.error("set bearer_token_* or basic_auth, not both (each sets Authorization)")
        if (bearer is not None or basic is not None) and "authorization" in injected:
            raise fields.error("Authorization is injected twice (a headers_from_* entry and bearer/basic auth)")
        allowed_headers = _caller_headers(fields, frozenset(
            {canonical(h) for h in injected} | ({"authorization"} if bearer is not None or basic is not None else set())))

        https = parts.scheme == "https"
        ca_file = _existing_file(fields, "ca_file")
        cert_file = _existing_file(fields, "client_cert_file")
        key_file = _existing_file(fields, "client_key_file")
        tls_verify = fields.flag("tls_verify", True)
        if not https and (ca_file or cert_file or key_file or "tls_verify" in fields):
            raise fields.error("ca_file, client_cert_file, client_key_file and tls_verify need an https:// base_url")
        if key_file and not cert_file:
            raise fields.error("set client_cert_file too", "client_key_file")
        if not tls_verify and ca_file:
            raise fields.error("ca_file is pointless with tls_verify: false; drop one of them")

        # `timeout_seconds` (older configs) sets both; the specific settings win.
        both = fields.seconds("timeout_seconds", 0) if "timeout_seconds" in fields else None
        connect_timeout = fields.seconds("connect_timeout_seconds", both or 10)
        read_timeout = fields.seconds("read_timeout_seconds", both or 30)
        return cls(
            name=name,
            base_url=base_url,
            headers_from_env=MappingProxyType(headers_from_env),
            headers_from_file=MappingProxyType(headers_from_file),
            bearer_token=bearer,
            basic_auth=basic,
            methods=_methods(fields),
            path_prefixes=_prefixes(fields),
            allow_caller_headers=allowed_headers,
            ca_file=ca_file,
            client_cert_file=cert_file,
            client_key_file=key_file,
            tls_verify=tls_verify,
            connect_timeout_seconds=connect_timeout,
            read_timeout_seconds=read_timeout,
            max_response_bytes=fields.optional_positive_int("max_response_bytes"),
        )


def _base_url_parts(fields: Fields, base_url: str) -> SplitResult:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise fields.error(f"must be an http:// or https:// URL with a host, got {base_url!r}", "base_url")
    if parts.username is not None or parts.password is not None:
        raise fields.error("must not contain user info; use headers_from_env for credentials", "base_url")
    if parts.query or parts.fragment or "?" in base_url or "#" in base_url:
        raise fields.error("must not contain a query or fragment", "base_url")
    if not parts.path.endswith("/"):
        raise fields.error(f"must end with '/', e.g. {base_url + '/'!r}", "base_url")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise fields.error("invalid port", "base_url") from None
    return parts


def _header_map(fields: Fields, key: str) -> dict[str, str]:
    raw = fields.get(key) or {}
    if not isinstance(raw, Mapping):
        raise fields.error("expected a mapping of header name to source", key)
    headers: dict[str, str] = {}
    for header, source in raw.items():
        if not isinstance(header, str) or not HEADER_NAME.match(header):
            raise fields.error(f"{header!r} is not a valid header name", key)
        if header.lower() in _UNINJECTABLE:
            raise fields.error(f"{header!r} is managed by the HTTP client and cannot be injected", key)
        if header.lower() in (h.lower() for h in headers):
            raise fields.error(f"header {header!r} is listed twice", key)
        if not isinstance(source, str) or not source:
            raise fields.error(f"expected a non-empty string, got {source!r}", f"{key}.{header}")
        headers[header] = source
    return headers


def _secret(fields: Fields, stem: str) -> SecretSource | None:
    """`<stem>_env` or `<stem>_file`, at most one of them."""
    env = fields.optional_str(f"{stem}_env")
    path = fields.optional_str(f"{stem}_file")
    if env is not None and path is not None:
        raise fields.error(f"set {stem}_env or {stem}_file, not both")
    if env is not None and not ENV_NAME.match(env):
        raise fields.error(f"{env!r} is not an environment variable name", f"{stem}_env")
    if path is not None and not os.path.isabs(path):
        raise fields.error(f"must be an absolute path, got {path!r}", f"{stem}_file")
    if env is None and path is None:
        return None
    return SecretSource(env=env, file=path)


def _basic_auth(profile: Fields) -> BasicAuth | None:
    raw = profile.get("basic_auth")
    if raw is None:
        return None
    where = f"{profile.where}.basic_auth"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping with username* and password_env or password_file")
    fields = Fields.known(where, raw, _BASIC_AUTH_FIELDS)
    password = _secret(fields, "password")
    if password is None:
        raise fields.error("set password_env or password_file (a password is never written in the config)")
    username = fields.optional_str("username")
    username_source = _secret(fields, "username")
    if (username is None) == (username_source is None):
        raise fields.error("set exactly one of username, username_env, username_file")
    if username is not None and (":" in username or _CONTROL.search(username)):
        raise fields.error("must not contain ':' or control characters", "username")
    return BasicAuth(password=password, username=username, username_source=username_source)


def _existing_file(fields: Fields, key: str) -> str | None:
    path = fields.optional_str(key)
    if path is None:
        return None
    if not os.path.isabs(path):
        raise fields.error(f"must be an absolute path, got {path!r}", key)
    if not os.path.isfile(path):
        raise fields.error(f"{path!r} is not an existing file", key)
    return path


def _methods(fields: Fields) -> frozenset[str]:
    raw = fields.get("methods")
    if raw is None:
        return DEFAULT_APP_METHODS
    if not isinstance(raw, list) or not raw:
        raise fields.error("expected a non-empty list such as [GET, POST]", "methods")
    methods = set()
    for method in raw:
        if not isinstance(method, str) or not HEADER_NAME.match(method):
            raise fields.error(f"{method!r} is not an HTTP method", "methods")
        if method.upper() in ("CONNECT", "TRACE"):
            raise fields.error(f"{method.upper()} is never allowed", "methods")
        methods.add(method.upper())
    return frozenset(methods)


def _caller_headers(fields: Fields, injected: frozenset[str]) -> frozenset[str]:
    """`allow_caller_headers`: only headers the agent would otherwise refuse, and never a hop-by-hop one.

    Listing anything else is refused rather than ignored, so that a config which
    believes it opened (or closed) something says so at start-up.
    """
    from onprem.agent.handlers.apps.headers import NEVER_FROM_CALLER, canonical, steers

    key = "allow_caller_headers"
    raw = fields.get(key)
    if raw is None:
        return frozenset()
    if not isinstance(raw, list):
        raise fields.error("expected a list of header names such as [X-Forwarded-For]", key)
    allowed: set[str] = set()
    for header in raw:
        if not isinstance(header, str) or not HEADER_NAME.fullmatch(header):
            raise fields.error(f"{header!r} is not a valid header name", key)
        name = canonical(header)
        if name in NEVER_FROM_CALLER:
            raise fields.error(f"{header!r} is hop-by-hop: it belongs to the agent's own connection to the app "
                               "and can never come from a caller", key)
        if name in injected:
            raise fields.error(f"{header!r} is injected by the agent for this profile; a caller can never send "
                               "or override it", key)
        if steers(name, injects_credentials=bool(injected)) is None:
            raise fields.error(f"callers may already send {header!r}; list only headers the agent refuses "
                               "(method overrides, rewritten URLs, Host, Forwarded, X-Forwarded-*, client "
                               "addresses, and Authorization or Cookie on a profile that injects credentials)", key)
        if name in allowed:
            raise fields.error(f"{header!r} is listed twice", key)
        allowed.add(name)
    return frozenset(allowed)


def _prefixes(fields: Fields) -> tuple[str, ...] | None:
    key = "path_prefixes"
    raw = fields.get(key)
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise fields.error("expected a non-empty list such as ['orders/', 'customers/']", key)
    prefixes = []
    for prefix in raw:
        # Plain text only: the handler compares prefixes with decoded paths, segment by segment.
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise fields.error(f"{prefix!r} must be a non-empty path such as 'orders/'", key)
        if prefix.startswith("/"):
            raise fields.error(f"{prefix!r} is relative to base_url and must not start with '/'", key)
        stripped = prefix.rstrip("/")
        if (_CONTROL.search(stripped) or any(c in stripped for c in "%?#\\")
                or any(s in ("", ".", "..") for s in stripped.split("/"))):
            raise fields.error(f"{prefix!r} must be plain path segments "
                               "(no '.', '..', empty segments, '%', '?', '#', '\\' or control characters)", key)
        prefixes.append(stripped)
    return tuple(prefixes)
