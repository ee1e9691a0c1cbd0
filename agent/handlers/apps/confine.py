"""What an app call may reach and carry: paths, methods, query and headers.

A call's path is checked as text before any URL is built (no scheme, no
leading "/", no "..", no encoded separators...), then the joined URL is
checked again against the base URL and the allowed prefixes, so that neither
layer alone has to be perfect. Caller headers that would steer the app past
those checks (see `headers`) are refused unless the profile allows
them, and even then a method override or rewritten URL must name what the
profile allows. Everything here is pure: no I/O.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from urllib.parse import unquote, urlencode

import httpx

from onprem.agent.handlers.apps.headers import (
    METHOD_OVERRIDES,
    NEVER_FROM_CALLER,
    URL_REWRITES,
    canonical,
    steers,
)
from onprem.agent.profiles.apps import AppProfile
from onprem.tunnel.errors import InvalidArgument, PermissionDenied, RequestError
from onprem.v1 import apps_pb2

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
#: Hop-by-hop response headers, which describe the app's connection to the agent, not the response.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade",
})
#: Dropped from a call. Expect negotiates how the agent sends the body, and its HTTP client always sends it
#: at once, never waiting for "100 Continue": forwarded, it would promise the app a pause that never comes
#: (and any other expectation would get a 417). It steers nothing, so it is dropped rather than refused.
_DROPPED = frozenset({"expect"})
#: Headers a message may carry once: two Hosts or two lengths mean different things to different parsers.
_ONCE = frozenset({"host", "content-length"})
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
    # fullmatch, not match: a regex `$` also matches before a trailing newline.
    if not TOKEN.fullmatch(method) or method in _NEVER_ALLOWED_METHODS:
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


def _invalid_header(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_HEADER", field="head.headers")


def _check_syntax(name: str, value: str) -> None:
    """One header line of printable ASCII, so that nothing can split it or be read differently later."""
    if name.startswith(":"):
        raise _invalid_header(f"header name {name!r} is an HTTP/2 pseudo-header; the agent sets the method, "
                              "scheme, authority and path itself")
    # fullmatch, not match: a regex `$` also matches before a trailing newline.
    if not TOKEN.fullmatch(name):
        raise _invalid_header(f"header name {name!r} is not valid")
    if CONTROL.search(value.replace("\t", " ")):  # HTAB is the one legal control character
        raise _invalid_header(f"header {name!r} has a control character in its value")
    if not value.isascii():
        # The HTTP client would fail to encode it; apps disagree on how to read any non-ASCII byte anyway.
        raise _invalid_header(f"header {name!r} has a non-ASCII character in its value; encode it first "
                              "(e.g. percent-encoding or RFC 8187)")


def _hop_by_hop(name: str, value: str) -> PermissionDenied:
    # A caller's Connection could make a proxy in front of the app strip the headers it names (the agent's own).
    named = f" (it names {value.strip()})" if canonical(name) == "connection" and value.strip() else ""
    return PermissionDenied(f"header {name!r} is hop-by-hop{named}: it belongs to the agent's own connection to "
                            "the app, so callers can never send it", reason="HOP_BY_HOP_HEADER")


def _check_method_override(profile: AppProfile, name: str, value: str) -> None:
    """An allowed method override still has to name a method the profile allows."""
    method = value.strip().upper()
    if not TOKEN.fullmatch(method) or method in _NEVER_ALLOWED_METHODS or method not in profile.methods:
        raise PermissionDenied(
            f"header {name!r} asks the app to run {value.strip()!r}; app profile '{profile.name}' allows "
            f"{', '.join(sorted(profile.methods))}", reason="METHOD_NOT_ALLOWED")


def _check_rewritten_url(profile: AppProfile, name: str, value: str) -> None:
    """An allowed rewritten URL still has to stay under the base URL and the allowed prefixes.

    Its value is a path from the server's root (`/api/orders/1?x=y`), so it
    must start with the base URL's path; the rest is checked as a call's path.
    """
    path = value.strip().split("?", 1)[0]
    base_path = httpx.URL(profile.base_url).path
    try:  # every refusal below is reported the same way: naming the header, then why
        if not path.startswith(base_path):
            raise PermissionDenied(f"it is not under the base URL's path {base_path!r}")
        build_url(profile, path[len(base_path):])
    except RequestError as exc:
        raise PermissionDenied(f"header {name!r} names {value.strip()!r}, which app profile '{profile.name}' "
                               f"does not allow: {exc.message}", reason="PATH_NOT_ALLOWED") from None


def _content_length(name: str, value: str) -> str:
    if name.lower() != "content-length":
        # h11 would send it as some other header, which an app folding '_' into '-' reads as the length:
        # the agent and the app would disagree on where the body ends.
        raise PermissionDenied(f"header {name!r} would be read as Content-Length by apps that fold '_' into "
                               "'-'; send Content-Length", reason="AMBIGUOUS_HEADER")
    # ASCII digits only: str.isdigit() also accepts Arabic-Indic digits and superscripts.
    length = value.strip()
    if not (length.isascii() and length.isdigit()):
        raise _invalid_header(f"Content-Length {value!r} is not a number")
    return length


def caller_headers(profile: AppProfile, headers: Iterable[apps_pb2.Header]) -> list[tuple[str, str]]:
    """The caller's headers fit to send, or the error for the first one that is not.

    Malformed headers are INVALID_ARGUMENT. PERMISSION_DENIED, naming the
    header: one the agent injects, a hop-by-hop one, and one that would steer
    the app (`headers.steers`) unless the profile lists it in
    `allow_caller_headers`. `Expect` is dropped. Names are compared in
    canonical form, so `X_Forwarded_For` and `x-forwarded-for` are
    `X-Forwarded-For`. Per header: a regex, and a few set lookups.
    """
    injected = frozenset(canonical(n) for n in profile.injected_header_names())
    allowed = profile.allow_caller_headers
    kept: list[tuple[str, str]] = []
    once: set[str] = set()
    for header in headers:
        name, value = header.name, header.value
        _check_syntax(name, value)
        key = canonical(name)
        if key in injected:
            raise PermissionDenied(f"header {name!r} is set by the agent for app profile '{profile.name}' and "
                                   "cannot be sent by the caller", reason="INJECTED_HEADER")
        if key in NEVER_FROM_CALLER:
            raise _hop_by_hop(name, value)
        if key in allowed:
            if key in METHOD_OVERRIDES:
                _check_method_override(profile, name, value)
            elif key in URL_REWRITES:
                _check_rewritten_url(profile, name, value)
        elif (what := steers(key, injects_credentials=bool(injected))) is not None:
            raise PermissionDenied(f"header {name!r} would let the caller change {what}; app profile "
                                   f"'{profile.name}' does not allow callers to send it (allow_caller_headers)",
                                   reason="CALLER_HEADER_NOT_ALLOWED")
        if key in _ONCE:
            if key in once:
                raise _invalid_header(f"header {name!r} is given more than once")
            once.add(key)
        if key == "content-length":
            value = _content_length(name, value)
        if key not in _DROPPED:
            kept.append((name, value))
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
