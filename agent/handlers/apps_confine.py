"""What an app call may reach and carry: paths, methods, query and headers.

A call's path is checked as text before any URL is built (no scheme, no
leading "/", no "..", no encoded separators...), then the joined URL is
checked again against the base URL and the allowed prefixes, so that neither
layer alone has to be perfect. Everything here is pure: no I/O.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from urllib.parse import unquote, urlencode

import httpx

from agent.profiles import AppProfile
from onprem.v1 import apps_pb2
from tunnel.errors import InvalidArgument, PermissionDenied

__all__ = [
    "build_url",
    "caller_headers",
    "check_method",
    "check_path",
    "query_string",
    "response_headers",
]

TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# Encoded separators, dots and controls would be decoded by some server or proxy after our checks;
# an encoded '%' followed by hex digits is the double-encoded form of the same thing.
_ENCODED_SEPARATOR = re.compile(r"%(2f|2e|5c|0[0-9a-f]|1[0-9a-f]|7f|25[0-9a-f]{2})", re.IGNORECASE)
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade",
})
#: Request headers the agent's HTTP client sets itself. `Content-Length` is the exception that
#: may come from the caller (for apps that refuse chunked uploads); h11 then enforces it.
_CLIENT_OWNED = _HOP_BY_HOP | {"host", "expect"}
_NEVER_ALLOWED_METHODS = frozenset({"CONNECT", "TRACE"})


def _path_error(path: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"path {path!r} {why}; it must stay under the app's base URL",
                           reason="PATH_OUTSIDE_BASE_URL")


def _check_text(original: str, path: str) -> None:
    if _SCHEME.match(path):
        raise _path_error(original, "is an absolute URL")
    if path.startswith("/"):
        raise _path_error(original, "starts with '/'")
    if "\\" in path:
        raise _path_error(original, "contains a backslash")
    if "@" in path:
        raise _path_error(original, "contains '@'")
    if "?" in path or "#" in path:
        raise _path_error(original, "contains '?' or '#'; send query parameters in `query`")
    for segment in path.split("/"):
        # Servlet containers read "..;x" as "..": path parameters do not hide a dot segment.
        if segment.split(";", 1)[0].rstrip() in (".", ".."):
            raise _path_error(original, "contains a '.' or '..' segment")


def check_path(path: str) -> None:
    """Refuse any path that could leave the base URL or mean different things to different parsers."""
    if CONTROL.search(path):
        raise _path_error(path, "contains a control character (CR, LF, NUL...)")
    if _ENCODED_SEPARATOR.search(path):
        raise _path_error(path, "contains an encoded '/', '.', '\\', '%' or control character")
    _check_text(path, path)
    # Some servers fold compatibility characters (U+FF0E fullwidth dot, U+FF0F fullwidth slash) into ASCII before routing.
    _check_text(path, unicodedata.normalize("NFKC", unquote(path)))


def _under(path: str, prefix: str) -> bool:
    """Whether `path` is `prefix` or below it by whole segments ("orders" does not cover "orders-old")."""
    return path == prefix or path.startswith(prefix + "/")


def build_url(profile: AppProfile, path: str) -> httpx.URL:
    """The URL of `path` under the profile's base URL, if the profile allows it."""
    check_path(path)
    # Safe to decode now: no encoded separator, dot, '%' or control character survived check_path.
    decoded = unquote(path)
    prefixes = profile.path_prefixes
    if prefixes is not None and not any(_under(decoded, p) for p in prefixes):
        raise PermissionDenied(
            f"path {path!r} is outside the paths app profile '{profile.name}' allows ({', '.join(prefixes)})",
            reason="PATH_NOT_ALLOWED")
    base = httpx.URL(profile.base_url)
    url = base.join(path)
    if (url.scheme, url.host, url.port) != (base.scheme, base.host, base.port) or not url.raw_path.startswith(
        base.raw_path
    ) or url.userinfo:
        raise _path_error(path, "resolves outside the base URL")
    # The second layer: what the server will route on, decoded, must still be under a prefix.
    below = url.path[len(base.path):]
    if prefixes is not None and not any(_under(below, p) for p in prefixes):
        raise _path_error(path, "resolves outside the allowed path prefixes")
    return url


def check_method(profile: AppProfile, method: str) -> str:
    method = (method or "GET").upper()
    if not TOKEN.match(method) or method in _NEVER_ALLOWED_METHODS:
        raise InvalidArgument(f"HTTP method {method!r} is not allowed", reason="INVALID_METHOD", field="head.method")
    if method not in profile.methods:
        raise PermissionDenied(
            f"app profile '{profile.name}' does not allow {method}; it allows {', '.join(sorted(profile.methods))}",
            reason="METHOD_NOT_ALLOWED")
    return method


def query_string(query: Iterable[apps_pb2.QueryParameter]) -> bytes:
    pairs = []
    for q in query:
        if CONTROL.search(q.name) or CONTROL.search(q.value):
            raise InvalidArgument(f"query parameter {q.name!r} contains a control character", reason="INVALID_QUERY", field="head.query")
        pairs.append((q.name, q.value))
    # urlencode keeps the caller's order, which httpx.QueryParams would regroup by name.
    return urlencode(pairs).encode("ascii")


def caller_headers(profile: AppProfile, headers: Iterable[apps_pb2.Header]) -> list[tuple[str, str]]:
    """The caller's headers, checked; hop-by-hop ones dropped; injected ones refused."""
    injected = profile.injected_header_names()
    kept: list[tuple[str, str]] = []
    for header in headers:
        if not TOKEN.match(header.name):
            raise InvalidArgument(f"header name {header.name!r} is not valid", reason="INVALID_HEADER")
        if CONTROL.search(header.value.replace("\t", " ")):  # HTAB is the one legal control character
            raise InvalidArgument(f"header {header.name!r} has a control character in its value",
                                  reason="INVALID_HEADER")
        lowered = header.name.lower()
        if lowered in injected:
            raise PermissionDenied(f"header {header.name!r} is set by the agent for app profile "
                                   f"'{profile.name}' and cannot be sent by the caller", reason="INJECTED_HEADER")
        if lowered == "content-length" and not header.value.strip().isdigit():
            raise InvalidArgument(f"Content-Length {header.value!r} is not a number", reason="INVALID_HEADER")
        if lowered not in _CLIENT_OWNED:
            kept.append((header.name, header.value))
    if sum(1 for name, _ in kept if name.lower() == "content-length") > 1:
        raise InvalidArgument("Content-Length is given more than once", reason="INVALID_HEADER")
    return kept


def response_headers(response: httpx.Response, secrets: Iterable[str]) -> list[apps_pb2.Header]:
    """The app's response headers fit for the caller.

    Hop-by-hop headers (and those the app's Connection header names) are
    dropped. So is any header whose value holds an injected secret: an app
    that echoes request headers (debug endpoints, some gateways) must not hand
    the caller the credentials the agent exists to keep. Bodies are the app's
    own and pass untouched.
    """
    connection = {
        token.strip().lower() for value in response.headers.get_list("connection") for token in value.split(",")
    }
    dropped = _HOP_BY_HOP | connection
    hidden = [s for s in secrets if s]
    return [
        apps_pb2.Header(name=name, value=value)
        for name, value in response.headers.multi_items()
        if name.lower() not in dropped and not any(secret in value for secret in hidden)
    ]
