"""HTTP calls confined to the base URLs and path prefixes of the agent's app profiles.

What a call may reach is decided in `confine` (path, method, headers),
the credentials it carries in `auth`, and what its failures become in
`errors`. This module moves the bytes: request bodies stream from the
tunnel to the app and responses stream back, each in bounded chunks, so a
body of any size passes through constant memory. Redirects are never
followed: a 3xx goes back to the caller as is, to be judged there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

import httpx
from opentelemetry.trace import Span

from onprem.agent import failpoints
from onprem.agent.handlers.apps.auth import injected_headers, ssl_context
from onprem.agent.handlers.apps.confine import (
    build_url,
    caller_headers,
    check_method,
    check_path,
    query_string,
    response_headers,
)
from onprem.agent.handlers.apps.errors import Progress, classify, http_errors, to_request_error
from onprem.agent.handlers.base import RequestContext
from onprem.agent.handlers.traced import traced
from onprem.agent.profiles.apps import AppProfile
from onprem.tunnel import tracing
from onprem.tunnel.errors import (
    FailedPrecondition,
    NotFound,
    RequestError,
    ResourceExhausted,
)
from onprem.v1 import apps_pb2, profiles_pb2, tunnel_pb2

__all__ = ["AppHandler", "build_url", "check_path"]

log = logging.getLogger("onprem.agent.apps")

#: Room for the protobuf framing around a body chunk, so a chunk never exceeds the negotiated maximum.
_CHUNK_OVERHEAD = 64
_NO_BODY_STATUSES = frozenset({204, 304})


#: The header that carries a call's idempotency key to the app (draft-ietf-httpapi-idempotency-key-header).
IDEMPOTENCY_HEADER = "Idempotency-Key"


def _too_large(profile: AppProfile, size: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"app profile '{profile.name}': the response body is larger than max_response_bytes "
        f"({profile.max_response_bytes}){size}", reason="APP_RESPONSE_TOO_LARGE")


async def _request_body(
    body: AsyncIterator[bytes] | None, length_given: bool
) -> AsyncIterator[bytes] | None:
    """The body to send, or None when there is none.

    The first chunk is awaited here so that a call without a body (a GET, or
    a POST the caller sent nothing with) goes out without `Transfer-Encoding:
    chunked`, which some apps refuse on such requests. A caller's
    Content-Length always gets the body, so that h11 can hold it to its word.
    """
    if body is None:
        return None
    first = await anext(body, None)
    if first is None and not length_given:
        return None

    async def rest() -> AsyncIterator[bytes]:
        if first is not None:
            yield first
        async for data in body:
            yield data

    return rest()


class AppHandler:
    """Runs `AppCall` payloads against the configured app profiles."""

    def __init__(self, profiles: Mapping[str, AppProfile], *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._profiles = dict(profiles)
        self._transport = transport
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._client_lock = asyncio.Lock()
        for profile in self._profiles.values():
            if not profile.tls_verify:
                log.warning("app profile '%s': TLS certificate verification is OFF (tls_verify: false); anyone "
                            "on the path to %s can read and alter its calls and see its credentials",
                            profile.name, profile.base_url)

    def profiles(self) -> list[profiles_pb2.Profile]:
        return [profiles_pb2.Profile(name=name, kind=profiles_pb2.PROFILE_KIND_APP) for name in self._profiles]

    def _profile(self, name: str) -> AppProfile:
        profile = self._profiles.get(name)
        if profile is None:
            raise NotFound(f"app profile '{name}' is not configured on this agent", reason="PROFILE_NOT_FOUND")
        return profile

    async def _client(self, profile: AppProfile) -> httpx.AsyncClient:
        """The profile's pooled client, made on first use (its TLS files are read in a worker thread)."""
        client = self._clients.get(profile.name)
        if client is not None:
            return client
        async with self._client_lock:
            client = self._clients.get(profile.name)
            if client is None:
                https = httpx.URL(profile.base_url).scheme == "https"
                verify = await asyncio.to_thread(ssl_context, profile) if https else True
                # trust_env=False: proxy variables in the agent's environment must not reroute calls.
                client = self._clients[profile.name] = httpx.AsyncClient(
                    follow_redirects=False,
                    timeout=httpx.Timeout(connect=profile.connect_timeout_seconds,
                                          read=profile.read_timeout_seconds,
                                          write=profile.read_timeout_seconds,
                                          pool=profile.connect_timeout_seconds),
                    verify=verify,
                    trust_env=False,
                    transport=self._transport,
                )
            return client

    def handle(self, call: apps_pb2.AppCall, context: RequestContext) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        head = call.head

        def attributes() -> dict[str, str | int | bool]:
            return {"http.request.method": head.method.upper() or "GET", "onprem.profile": head.profile}

        return traced(f"http {head.method.upper() or 'GET'}", attributes, lambda span: self._handle(call, context, span))

    async def _handle(self, call: apps_pb2.AppCall, context: RequestContext,
                      span: Span) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        head = call.head
        profile = self._profile(head.profile)
        method = check_method(profile, head.method)
        url = build_url(profile, head.path)
        if head.query:
            url = url.copy_with(query=query_string(head.query))
        headers = caller_headers(profile, head.headers)
        if context.idempotency is not None:
            # The caller's key, under the IETF draft's name, for the app to deduplicate by: it is what makes
            # the control plane's retry of a lost call safe, so it replaces any such header the caller set.
            headers = [(n, v) for n, v in headers if n.lower() != IDEMPOTENCY_HEADER.lower()]
            headers.append((IDEMPOTENCY_HEADER, context.idempotency.key))
        if span.is_recording():
            # The app joins the trace under this call's span, as OpenTelemetry's HTTP clients do; the
            # caller's own trace headers, if its profile lets them through, would name the wrong parent.
            headers = [(n, v) for n, v in headers if n.lower() not in (tracing.TRACEPARENT, tracing.TRACESTATE)]
            headers.append((tracing.TRACEPARENT, tracing.format_traceparent(span.get_span_context())))
        injected = await injected_headers(profile)
        client = await self._client(profile)
        length_given = any(name.lower() == "content-length" for name, _ in headers)
        content = await _request_body(context.body, length_given)
        chunk_size = max(1, context.max_chunk_bytes - _CHUNK_OVERHEAD)
        limit = profile.max_response_bytes
        progress = Progress()
        failpoints.hit("apps.before_request")
        with http_errors(profile, progress):
            # On cancel (operator or deadline) leaving this block closes the response, and since its
            # body is unread, httpcore drops the connection instead of pooling it: the app sees it close.
            async with client.stream(method, url, headers=headers + injected.headers, content=content) as response:
                if span.is_recording():
                    span.set_attribute("http.response.status_code", response.status_code)
                has_body = method != "HEAD" and response.status_code not in _NO_BODY_STATUSES
                declared = response.headers.get("content-length", "")
                if limit is not None and has_body and declared.isdigit() and int(declared) > limit:
                    raise _too_large(profile, f": it announced {declared} bytes")
                response_head = apps_pb2.CallResponseHead(
                    status_code=response.status_code,
                    headers=response_headers(response, injected.secrets),
                )
                failpoints.hit("apps.after_response")
                progress.head_sent = True
                yield tunnel_pb2.ResponseChunk(call=apps_pb2.CallResponse(head=response_head))
                # Raw bytes: the body stays as the Content-Encoding header sent along says. Not
                # aiter_raw(chunk_size): that waits to fill each chunk, which would hold back a slow
                # stream (server-sent events, progress output) until it had sent chunk_size bytes.
                async for received in response.aiter_raw():
                    if limit is not None and progress.body_bytes + len(received) > limit:
                        raise _too_large(profile, f"; {progress.body_bytes} bytes were sent")
                    for start in range(0, len(received), chunk_size):
                        data = received[start:start + chunk_size]
                        progress.body_bytes += len(data)
                        yield tunnel_pb2.ResponseChunk(call=apps_pb2.CallResponse(body=data))

    async def check(self, profile_name: str) -> list[profiles_pb2.ProfileCheck]:
        """GET the base URL with the injected credentials, and say which stage fails.

        "reachable": DNS and TCP connect; "tls" (https only): the handshake, i.e.
        the app's certificate and the agent's client certificate; "credentials":
        401, 403 or 407 means the app refused what the agent injected.
        """
        profile = self._profile(profile_name)
        https = httpx.URL(profile.base_url).scheme == "https"
        try:
            injected = await injected_headers(profile)
        except RequestError as exc:
            return [profiles_pb2.ProfileCheck(name="credentials", ok=False, message=exc.message)]
        try:
            client = await self._client(profile)
        except FailedPrecondition as exc:
            return [profiles_pb2.ProfileCheck(name="tls", ok=False, message=exc.message)]
        try:
            response = await client.request("GET", profile.base_url, headers=injected.headers)
        except (httpx.HTTPError, OSError) as exc:
            failure = classify(exc, profile)
            if failure is not None and (failure.stage == "TLS" or failure.tls_suspected):
                return [
                    profiles_pb2.ProfileCheck(name="reachable", ok=True, message="the TCP connection succeeded"),
                    profiles_pb2.ProfileCheck(name="tls", ok=False, message=f"{failure.stage}: {failure.detail}"),
                ]
            error = to_request_error(exc, profile)
            return [profiles_pb2.ProfileCheck(name="reachable", ok=False, message=error.message)]
        checks = [profiles_pb2.ProfileCheck(
            name="reachable", ok=True, message=f"GET {profile.base_url} answered HTTP {response.status_code}")]
        if https:
            client_cert = " with the client certificate" if profile.client_cert_file else ""
            # A profile without verification works, so the check passes, but says so loudly.
            checks.append(profiles_pb2.ProfileCheck(
                name="tls", ok=True,
                message=f"the handshake succeeded{client_cert}; the app's certificate was verified against "
                        f"{profile.ca_file or 'the system CAs'}" if profile.tls_verify
                else f"WARNING: the handshake succeeded{client_cert}, but certificate verification is OFF "
                     "(tls_verify: false)"))
        refused = response.status_code in (401, 403, 407)
        checks.append(profiles_pb2.ProfileCheck(
            name="credentials", ok=not refused,
            message=f"the app refused the injected credentials (HTTP {response.status_code})" if refused
            else "the app did not refuse the injected credentials"))
        return checks

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

