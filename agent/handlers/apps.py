"""HTTP calls confined to the base URLs of the agent's app profiles.

A call's path is checked as text before any URL is built (no scheme, no
leading "/", no "..", no encoded separators...), then the joined URL is
checked again against the base URL, so that neither layer alone has to be
perfect. Redirects are never followed: a 3xx goes back to the caller as is.
Credentials come from environment variables the profile names and are added
here; a caller can neither set nor override them.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from urllib.parse import urlencode

import httpx

from agent.handlers.base import RequestContext
from agent.profiles import AppProfile
from onprem.v1 import apps_pb2, profiles_pb2, tunnel_pb2
from tunnel.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RequestError,
    Unavailable,
)

__all__ = ["AppHandler"]

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# Encoded separators and dots would be decoded by some server or proxy after our checks.
_ENCODED_SEPARATOR = re.compile(r"%(2f|2e|5c|0[0-9a-f]|1[0-9a-f]|7f)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade",
})
#: Request headers the agent's HTTP client sets itself.
_CLIENT_OWNED = _HOP_BY_HOP | {"host", "content-length"}
_REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
_CHUNK_OVERHEAD = 64


def _path_error(path: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"path {path!r} {why}; it must stay under the app's base URL",
                           reason="PATH_OUTSIDE_BASE_URL")


def check_path(path: str) -> None:
    """Refuse any path that could leave the base URL or mean different things to different parsers."""
    if _CONTROL.search(path):
        raise _path_error(path, "contains a control character (CR, LF, NUL...)")
    if _SCHEME.match(path):
        raise _path_error(path, "is an absolute URL")
    if path.startswith("/"):
        raise _path_error(path, "starts with '/'")
    if "\\" in path:
        raise _path_error(path, "contains a backslash")
    if "@" in path:
        raise _path_error(path, "contains '@'")
    if "?" in path or "#" in path:
        raise _path_error(path, "contains '?' or '#'; send query parameters in `query`")
    if _ENCODED_SEPARATOR.search(path):
        raise _path_error(path, "contains an encoded '/', '.', '\\' or control character")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise _path_error(path, "contains a '.' or '..' segment")


def build_url(profile: AppProfile, path: str) -> httpx.URL:
    check_path(path)
    base = httpx.URL(profile.base_url)
    url = base.join(path)
    if (url.scheme, url.host, url.port) != (base.scheme, base.host, base.port) or not url.raw_path.startswith(
        base.raw_path
    ) or url.userinfo:
        raise _path_error(path, "resolves outside the base URL")
    return url


class AppHandler:
    """Runs `AppCall` payloads against the configured app profiles."""

    def __init__(self, profiles: Mapping[str, AppProfile], *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._profiles = dict(profiles)
        self._transport = transport
        self._clients: dict[str, httpx.AsyncClient] = {}

    def profiles(self) -> list[profiles_pb2.Profile]:
        return [profiles_pb2.Profile(name=p.name, kind=profiles_pb2.PROFILE_KIND_APP) for p in self._profiles.values()]

    def _client(self, profile: AppProfile) -> httpx.AsyncClient:
        client = self._clients.get(profile.name)
        if client is None:
            # trust_env=False: proxy variables in the agent's environment must not reroute calls.
            client = self._clients[profile.name] = httpx.AsyncClient(
                follow_redirects=False,
                timeout=httpx.Timeout(profile.timeout_seconds),
                trust_env=False,
                transport=self._transport,
            )
        return client

    def _headers(self, profile: AppProfile, head: apps_pb2.CallHead) -> list[tuple[str, str]]:
        injected = {name.lower() for name in profile.headers_from_env}
        headers: list[tuple[str, str]] = []
        for header in head.headers:
            if not _TOKEN.match(header.name):
                raise InvalidArgument(f"header name {header.name!r} is not valid", reason="INVALID_HEADER")
            if _CONTROL.search(header.value.replace("\t", " ")):  # HTAB is the one legal control character
                raise InvalidArgument(f"header {header.name!r} has a control character in its value",
                                      reason="INVALID_HEADER")
            lowered = header.name.lower()
            if lowered in injected:
                raise PermissionDenied(f"header {header.name!r} is set by the agent for app profile "
                                       f"'{profile.name}' and cannot be sent by the caller", reason="INJECTED_HEADER")
            if lowered not in _CLIENT_OWNED:
                headers.append((header.name, header.value))
        for name, env in profile.headers_from_env.items():
            value = os.environ.get(env)
            if value is None:
                raise FailedPrecondition(
                    f"app profile '{profile.name}': environment variable {env} (for header {name}) is not set",
                    reason="MISSING_SECRET",
                )
            headers.append((name, value))
        return headers

    async def handle(
        self, request: tunnel_pb2.RequestStart, context: RequestContext
    ) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        if request.WhichOneof("payload") != "app_call":
            raise InvalidArgument("expected an app_call", reason="INVALID_PAYLOAD")
        head = request.app_call.head
        profile = self._profiles.get(head.profile)
        if profile is None:
            raise NotFound(f"app profile '{head.profile}' is not configured on this agent", reason="PROFILE_NOT_FOUND")
        method = head.method or "GET"
        if not _TOKEN.match(method) or method.upper() in _REFUSED_METHODS:
            raise InvalidArgument(f"HTTP method {method!r} is not allowed", reason="INVALID_METHOD")
        url = build_url(profile, head.path)
        pairs = []
        for q in head.query:
            if _CONTROL.search(q.name) or _CONTROL.search(q.value):
                raise InvalidArgument(f"query parameter {q.name!r} contains a control character", reason="INVALID_QUERY")
            pairs.append((q.name, q.value))
        if pairs:  # urlencode keeps the caller's order, which httpx.QueryParams would regroup by name
            url = url.copy_with(query=urlencode(pairs).encode("ascii"))
        headers = self._headers(profile, head)
        client = self._client(profile)
        chunk_size = max(1, context.max_chunk_bytes - _CHUNK_OVERHEAD)
        with _http_errors(profile):
            async with client.stream(
                method, url, headers=headers, content=context.body
            ) as response:
                response_head = apps_pb2.CallResponseHead(
                    status_code=response.status_code,
                    headers=[
                        apps_pb2.Header(name=name, value=value)
                        for name, value in response.headers.multi_items()
                        if name.lower() not in _HOP_BY_HOP
                    ],
                )
                yield tunnel_pb2.ResponseChunk(call=apps_pb2.CallResponse(head=response_head))
                # Raw bytes: the body stays as the Content-Encoding header sent along says.
                async for data in response.aiter_raw(chunk_size):
                    yield tunnel_pb2.ResponseChunk(call=apps_pb2.CallResponse(body=data))

    async def check(self, profile_name: str) -> list[profiles_pb2.ProfileCheck]:
        """Reach the base URL with the injected headers; 401/403 means the credentials are refused."""
        profile = self._profiles.get(profile_name)
        if profile is None:
            raise NotFound(f"app profile '{profile_name}' is not configured on this agent", reason="PROFILE_NOT_FOUND")
        try:
            headers = self._headers(profile, apps_pb2.CallHead())
        except RequestError as exc:
            return [profiles_pb2.ProfileCheck(name="credentials", ok=False, message=exc.message)]
        try:
            with _http_errors(profile):
                response = await self._client(profile).request("GET", profile.base_url, headers=headers)
        except RequestError as exc:
            return [profiles_pb2.ProfileCheck(name="reachable", ok=False, message=exc.message)]
        checks = [profiles_pb2.ProfileCheck(
            name="reachable", ok=True, message=f"GET {profile.base_url} answered HTTP {response.status_code}")]
        refused = response.status_code in (401, 407, 403)
        checks.append(profiles_pb2.ProfileCheck(
            name="credentials", ok=not refused,
            message=f"the app refused the injected credentials (HTTP {response.status_code})" if refused
            else "the app did not refuse the injected credentials"))
        return checks

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


@contextmanager
def _http_errors(profile: AppProfile) -> Iterator[None]:
    """The one table from httpx errors to RequestErrors."""
    where = f"app profile '{profile.name}' ({profile.base_url})"
    try:
        yield
    except RequestError:
        raise
    except httpx.ConnectTimeout:
        raise Unavailable(f"{where}: timed out connecting", reason="APP_UNREACHABLE") from None
    except httpx.TimeoutException as exc:
        raise DeadlineExceeded(f"{where}: timed out ({type(exc).__name__})", reason="APP_TIMEOUT") from None
    except httpx.ConnectError as exc:
        raise Unavailable(f"{where}: cannot connect: {exc}", reason="APP_UNREACHABLE") from None
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        raise Unavailable(f"{where}: the connection failed: {exc or type(exc).__name__}",
                          reason="APP_CONNECTION_FAILED") from None
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise InvalidArgument(f"{where}: {exc}", reason="INVALID_URL") from None
    except httpx.HTTPError as exc:
        raise Internal(f"{where}: {type(exc).__name__}: {exc}", reason="APP_ERROR") from None
