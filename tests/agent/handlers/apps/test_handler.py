"""AppHandler against a real HTTP server on 127.0.0.1, started by the test."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import MappingProxyType

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from onprem.agent.handlers.apps import AppHandler
from onprem.agent.handlers.base import RequestContext
from onprem.agent.profiles import AppProfile, BasicAuth, SecretSource
from onprem.tunnel import tracing
from onprem.tunnel.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RequestError,
    ResourceExhausted,
    Unavailable,
)
from onprem.v1 import apps_pb2, profiles_pb2, tunnel_pb2
from tests.support.apps_upstream import BIG, PATTERN, Seen, Upstream
from tools.ports import free_port

SECRET = "agent-secret-4f1d"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture
def server(upstream: Upstream) -> tuple[str, Seen]:
    """The module's HTTP server, with what it has seen so far forgotten."""
    upstream.seen.clear()
    return upstream.base_url, upstream.seen


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-key"
    path.write_text("file-key-9c2e\n")
    return path


@pytest.fixture
async def handler(server: tuple[str, Seen], secret_file: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AppHandler]:
    monkeypatch.setenv("ONPREM_TEST_APP_TOKEN", f"Bearer {SECRET}")
    monkeypatch.setenv("ONPREM_TEST_BASIC_PW", "pw-7781")
    base_url, _ = server
    profiles = {
        "app": AppProfile(name="app", base_url=base_url,
                          headers_from_env=MappingProxyType({"Authorization": "ONPREM_TEST_APP_TOKEN"})),
        "unset": AppProfile(name="unset", base_url=base_url,
                            headers_from_env=MappingProxyType({"X-Key": "ONPREM_TEST_NOT_SET_VAR"})),
        "down": AppProfile(name="down", base_url=f"http://127.0.0.1:{free_port()}/", connect_timeout_seconds=2),
        "narrow": AppProfile(name="narrow", base_url=base_url, methods=frozenset({"GET"}),
                             path_prefixes=("orders", "v2/customers")),
        "filekey": AppProfile(name="filekey", base_url=base_url,
                              headers_from_file=MappingProxyType({"X-Api-Key": str(secret_file)})),
        "bearer": AppProfile(name="bearer", base_url=base_url, bearer_token=SecretSource(file=str(secret_file))),
        "basic": AppProfile(name="basic", base_url=base_url,
                            basic_auth=BasicAuth(username="svc", password=SecretSource(env="ONPREM_TEST_BASIC_PW"))),
        "limited": AppProfile(name="limited", base_url=base_url, max_response_bytes=100_000),
        "impatient": AppProfile(name="impatient", base_url=base_url, read_timeout_seconds=0.5),
        "nodns": AppProfile(name="nodns", base_url="http://no-such-host.invalid/"),
    }
    handler = AppHandler(profiles)
    yield handler
    await handler.aclose()


def call(path: str, method: str = "GET", profile: str = "app", headers: dict[str, str] | None = None,
         query: list[tuple[str, str]] | None = None) -> tunnel_pb2.RequestStart:
    head = apps_pb2.CallHead(
        profile=profile, method=method, path=path,
        headers=[apps_pb2.Header(name=k, value=v) for k, v in (headers or {}).items()],
        query=[apps_pb2.QueryParameter(name=k, value=v) for k, v in (query or [])],
    )
    return tunnel_pb2.RequestStart(app_call=apps_pb2.AppCall(head=head))


async def body_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def no_body() -> AsyncIterator[bytes]:
    """What the tunnel hands over for a call whose operator sent only the head."""
    return
    yield b""


async def run(handler: AppHandler, start: tunnel_pb2.RequestStart, body: AsyncIterator[bytes] | None = None,
              max_chunk_bytes: int = 256 * 1024) -> tuple[apps_pb2.CallResponseHead, bytes, list[tunnel_pb2.ResponseChunk]]:
    context = RequestContext(request_id=1, body=body if body is not None else no_body(), max_chunk_bytes=max_chunk_bytes)
    chunks = [chunk async for chunk in handler.handle(start.app_call, context)]
    assert chunks[0].call.WhichOneof("part") == "head"
    assert all(c.call.WhichOneof("part") == "body" for c in chunks[1:])
    return chunks[0].call.head, b"".join(c.call.body for c in chunks[1:]), chunks


async def run_until_error(handler: AppHandler, start: tunnel_pb2.RequestStart) -> tuple[list[tunnel_pb2.ResponseChunk], RequestError]:
    """The chunks that went out before the call failed, and its error."""
    chunks: list[tunnel_pb2.ResponseChunk] = []
    try:
        async for chunk in handler.handle(start.app_call, RequestContext(request_id=1, body=no_body())):
            chunks.append(chunk)
    except RequestError as exc:
        return chunks, exc
    raise AssertionError("the call did not fail")


def headers_of(head: apps_pb2.CallResponseHead) -> dict[str, str]:
    return {h.name.lower(): h.value for h in head.headers}


# -- calls that work --


async def test_get_with_query_reaches_the_server_with_injected_header(
    handler: AppHandler, server: tuple[str, Seen]
) -> None:
    head, body, _ = await run(handler, call("orders/42", query=[("a", "1"), ("b", "x y"), ("a", "2")],
                                            headers={"X-Trace": "t1"}))
    assert head.status_code == 200
    echoed = json.loads(body)
    assert echoed["path"] == "/api/orders/42?a=1&b=x+y&a=2"
    assert echoed["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert echoed["headers"]["X-Trace"] == "t1"
    names = {h.name.lower() for h in head.headers}
    assert "x-reply" in names
    assert "connection" not in names  # hop-by-hop headers are not passed back


async def test_a_call_without_a_body_is_sent_without_chunked_encoding(handler: AppHandler) -> None:
    _, body, _ = await run(handler, call("x"))
    assert "Transfer-Encoding" not in json.loads(body)["headers"]


async def test_post_streams_request_body(handler: AppHandler) -> None:
    _, body, _ = await run(handler, call("items", method="POST", headers={"Content-Type": "text/plain"}),
                           body_of(b"hello ", b"world"))
    echoed = json.loads(body)
    assert (echoed["method"], echoed["body"]) == ("POST", "hello world")
    assert echoed["headers"]["Transfer-Encoding"] == "chunked"


async def test_the_app_receives_the_body_before_the_caller_has_finished_sending_it(
    handler: AppHandler, server: tuple[str, Seen]
) -> None:
    seen = server[1]

    async def held_back() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        # A handler that buffered the body would wait here forever: the app could not have seen any of it.
        for _ in range(500):
            if seen.body_bytes_received >= 1000:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the app saw nothing of the body before its end")
        yield b"y" * 1000

    _, body, _ = await run(handler, call("sink", method="PUT"), held_back())
    assert json.loads(body)["bytes"] == 2000


async def test_a_callers_content_length_is_kept_and_the_body_sent_unchunked(handler: AppHandler) -> None:
    _, body, _ = await run(handler, call("items", method="POST", headers={"Content-Length": "11"}),
                           body_of(b"hello ", b"world"))
    echoed = json.loads(body)
    assert echoed["body"] == "hello world"
    assert echoed["headers"]["Content-Length"] == "11"
    assert "Transfer-Encoding" not in echoed["headers"]


async def test_a_body_longer_than_the_callers_content_length_is_invalid_argument(handler: AppHandler) -> None:
    with pytest.raises(InvalidArgument) as info:
        await run(handler, call("items", method="POST", headers={"Content-Length": "3"}), body_of(b"too long"))
    assert info.value.reason == "INVALID_REQUEST"


@pytest.mark.parametrize(("path", "status", "text"), [("missing", 404, b"no such thing"), ("boom", 500, b"it broke")])
async def test_error_statuses_are_normal_responses(handler: AppHandler, path: str, status: int, text: bytes) -> None:
    head, body, _ = await run(handler, call(path))
    assert (head.status_code, body) == (status, text)


async def test_redirects_are_returned_not_followed(handler: AppHandler, server: tuple[str, Seen]) -> None:
    head, _, _ = await run(handler, call("redirect"))
    assert head.status_code == 302
    assert headers_of(head)["location"] == "http://127.0.0.1:1/elsewhere"
    assert len(server[1].requests) == 1


async def test_large_body_streams_in_bounded_chunks(handler: AppHandler) -> None:
    _, body, chunks = await run(handler, call("big"), max_chunk_bytes=16 * 1024)
    assert body == BIG
    assert len(chunks) > 10
    assert all(c.ByteSize() <= 16 * 1024 for c in chunks)


async def test_a_slow_chunked_response_is_relayed_as_it_comes(handler: AppHandler) -> None:
    context = RequestContext(request_id=1, body=no_body())
    began = time.monotonic()
    arrivals: list[float] = []
    parts: list[bytes] = []
    async for chunk in handler.handle(call("slow", query=[("chunks", "5"), ("delay", "0.15")]).app_call, context):
        if chunk.call.WhichOneof("part") == "body":
            arrivals.append(time.monotonic() - began)
            parts.append(chunk.call.body)
    assert b"".join(parts) == b"".join(f"part {i}\n".encode() for i in range(5))
    # Streamed, not gathered: the first part left long before the last one was written.
    assert arrivals[0] < arrivals[-1] - 0.3


async def test_head_requests_have_no_body(handler: AppHandler) -> None:
    head, body, _ = await run(handler, call("x", method="HEAD"))
    assert (head.status_code, body) == (200, b"")


# -- credentials stay on the agent --


@pytest.mark.parametrize("name", ["Authorization", "authorization", "AUTHORIZATION"])
async def test_operator_cannot_override_injected_header(
    handler: AppHandler, server: tuple[str, Seen], name: str
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("x", headers={name: "Bearer mine"}))
    assert info.value.reason == "INJECTED_HEADER"
    assert server[1].requests == []


@pytest.mark.parametrize("profile", ["bearer", "basic"])
async def test_operator_cannot_send_authorization_when_the_agent_authenticates(
    handler: AppHandler, profile: str
) -> None:
    with pytest.raises(PermissionDenied):
        await run(handler, call("x", profile=profile, headers={"Authorization": "Bearer mine"}))


@pytest.mark.parametrize(("profile", "header", "value"), [
    ("app", "Authorization", f"Bearer {SECRET}"),
    ("filekey", "X-Api-Key", "file-key-9c2e"),
    ("bearer", "Authorization", "Bearer file-key-9c2e"),
    ("basic", "Authorization", "Basic " + base64.b64encode(b"svc:pw-7781").decode()),
])
async def test_injected_credentials_reach_the_app_but_never_come_back_in_response_headers(
    handler: AppHandler, profile: str, header: str, value: str
) -> None:
    _, body, _ = await run(handler, call("x", profile=profile))
    assert json.loads(body)["headers"][header] == value
    head, _, _ = await run(handler, call("reflect", profile=profile, headers={"X-Trace": "t1"}))
    echoed = headers_of(head)
    assert echoed["x-echo-x-trace"] == "t1"  # the app does reflect headers...
    assert f"x-echo-{header.lower()}" not in echoed  # ...but not the injected one
    assert all(value not in v and value.split()[-1] not in v for v in echoed.values())


async def test_a_rotated_secret_file_is_used_without_a_restart(handler: AppHandler, secret_file: Path) -> None:
    await asyncio.to_thread(secret_file.write_text, "rotated-key\n")
    _, body, _ = await run(handler, call("x", profile="filekey"))
    assert json.loads(body)["headers"]["X-Api-Key"] == "rotated-key"


async def test_a_missing_secret_file_is_failed_precondition_naming_the_file(
    handler: AppHandler, secret_file: Path, server: tuple[str, Seen]
) -> None:
    await asyncio.to_thread(secret_file.unlink)
    with pytest.raises(FailedPrecondition, match=str(secret_file)) as info:
        await run(handler, call("x", profile="filekey"))
    assert info.value.reason == "MISSING_SECRET"
    assert server[1].requests == []


async def test_a_secret_with_a_line_break_is_refused_without_showing_it(handler: AppHandler, secret_file: Path) -> None:
    await asyncio.to_thread(secret_file.write_text, "part-one\nInjected: yes\n")
    with pytest.raises(FailedPrecondition) as info:
        await run(handler, call("x", profile="filekey"))
    assert info.value.reason == "INVALID_SECRET"
    assert "part-one" not in info.value.message


async def test_missing_env_var_is_failed_precondition_naming_the_variable(handler: AppHandler) -> None:
    with pytest.raises(FailedPrecondition, match="ONPREM_TEST_NOT_SET_VAR"):
        await run(handler, call("x", profile="unset"))


async def test_the_host_the_app_sees_is_the_base_urls(handler: AppHandler, server: tuple[str, Seen]) -> None:
    _, body, _ = await run(handler, call("x", headers={"X-Keep": "1"}))
    headers = json.loads(body)["headers"]
    assert headers["Host"] == server[0].split("/")[2]  # http://127.0.0.1:PORT/api/
    assert headers["X-Keep"] == "1"


async def test_a_caller_sending_host_is_permission_denied_naming_it(handler: AppHandler, server: tuple[str, Seen]) -> None:
    # Once silently dropped; now refused, like every header that steers the app (tests/agent/handlers/apps/test_steering.py).
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("x", headers={"Host": "evil.example"}))
    assert info.value.message == ("header 'Host' would let the caller change the host the app believes it serves; "
                                  "app profile 'app' does not allow callers to send it (allow_caller_headers)")
    assert server[1].requests == []


# -- errors --


async def test_unknown_profile_is_not_found(handler: AppHandler) -> None:
    with pytest.raises(NotFound, match="app profile 'nope'"):
        await run(handler, call("x", profile="nope"))


async def test_a_refused_connection_is_unavailable_naming_the_profile_and_the_connect_stage(handler: AppHandler) -> None:
    with pytest.raises(Unavailable, match=r"app profile 'down' .*: connect: connection refused") as info:
        await run(handler, call("x", profile="down"))
    assert info.value.reason == "APP_UNREACHABLE"


async def test_an_unresolvable_host_is_unavailable_naming_the_dns_stage(handler: AppHandler) -> None:
    with pytest.raises(Unavailable, match=r"app profile 'nodns' .*: DNS: cannot resolve 'no-such-host.invalid'") as info:
        await run(handler, call("x", profile="nodns"))
    assert info.value.reason == "APP_UNREACHABLE"


async def test_a_host_that_never_accepts_is_unavailable_after_the_connect_timeout() -> None:
    # A listener whose accept queue is full: Linux drops further SYNs, so connect() hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    await asyncio.sleep(0.1)
    profile = AppProfile(name="blackhole", base_url=f"http://127.0.0.1:{listener.getsockname()[1]}/",
                         connect_timeout_seconds=0.5)
    handler = AppHandler({"blackhole": profile})
    try:
        began = time.monotonic()
        with pytest.raises(Unavailable, match=r"connect: no answer from 127\.0\.0\.1:\d+ within 0\.5 s") as info:
            await run(handler, call("x", profile="blackhole"))
        assert time.monotonic() - began < 5
        assert info.value.reason == "APP_UNREACHABLE"
    finally:
        await handler.aclose()
        for s in [*fillers, listener]:
            s.close()


async def test_an_app_silent_beyond_the_read_timeout_is_deadline_exceeded(handler: AppHandler) -> None:
    with pytest.raises(DeadlineExceeded, match="read_timeout_seconds") as info:
        await run(handler, call("stall", profile="impatient", query=[("seconds", "2")]))
    assert info.value.reason == "APP_TIMEOUT"


async def test_a_response_announcing_more_than_the_limit_is_resource_exhausted_before_its_head(
    handler: AppHandler,
) -> None:
    chunks, error = await run_until_error(handler, call("bytes", profile="limited", query=[("n", "200000")]))
    assert isinstance(error, ResourceExhausted) and error.reason == "APP_RESPONSE_TOO_LARGE"
    assert chunks == []


async def test_a_chunked_response_growing_past_the_limit_ends_in_resource_exhausted(handler: AppHandler) -> None:
    chunks, error = await run_until_error(handler, call("bytes", profile="limited",
                                                        query=[("n", "1000000"), ("chunked", "1")]))
    assert isinstance(error, ResourceExhausted) and "max_response_bytes (100000)" in error.message
    assert chunks[0].call.head.status_code == 200
    assert sum(len(c.call.body) for c in chunks[1:]) <= 100_000


async def test_a_response_within_the_limit_passes(handler: AppHandler) -> None:
    _, body, _ = await run(handler, call("bytes", profile="limited", query=[("n", "100000")]))
    assert body == (PATTERN * 2)[:100_000]


@pytest.mark.parametrize("route", ["cut", "cut-chunked"])
async def test_an_app_hanging_up_mid_body_ends_the_call_unavailable_after_the_head(
    handler: AppHandler, route: str
) -> None:
    chunks, error = await run_until_error(handler, call(route))
    assert chunks[0].call.head.status_code == 200
    assert isinstance(error, Unavailable)
    assert error.reason == "APP_RESPONSE_INCOMPLETE"
    assert "cut off after" in error.message and "incomplete" in error.message


# -- cancellation reaches the app --


async def wait_for_event(seen: Seen, key: str, within: float = 5) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if any(event.get(key) for event in seen.events):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the app never noticed {key} (events: {seen.events})")


async def test_cancelling_a_call_mid_response_closes_the_apps_connection(
    handler: AppHandler, server: tuple[str, Seen]
) -> None:
    got_body = asyncio.Event()

    async def consume() -> None:
        async for chunk in handler.handle(call("forever").app_call, RequestContext(request_id=1, body=no_body())):
            if chunk.call.WhichOneof("part") == "body":
                got_body.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_body.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for_event(server[1], "closed_by_client")


async def test_cancelling_a_call_mid_upload_closes_the_apps_connection(
    handler: AppHandler, server: tuple[str, Seen]
) -> None:
    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"z" * 10_000
            await asyncio.sleep(0.01)

    task = asyncio.create_task(run(handler, call("slow-sink", method="POST"), endless()))
    for _ in range(500):
        if server[1].body_bytes_received > 50_000:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for_event(server[1], "body_cut_by_client")


# -- confinement --


HOSTILE_PATHS = [
    "http://evil.example/", "https://127.0.0.1/api/x", "HTTP://x", "javascript:alert(1)", "file:///etc/passwd",
    "mailto:x@y", "a:b", "//evil.example/x", "/api/x", "/", "\\evil", "x\\..\\..\\secret", "user@evil.example",
    "x/@evil", "..", "../secret", "x/../../secret", "./x", "x/./y", "x/..", "%2e%2e/secret", "%2E%2E/secret",
    "x%2fy", "x%2F..%2Fsecret", "%5c..%5csecret", "x%5Cy", "a\r\nHost: evil", "a\nb", "a\x00b", "x?admin=1",
    "x#frag", "%00", "%0d%0aSet-Cookie:x", "%252e%252e/secret", "x/%252f/y", "x/..;/secret", "..;/secret",
    "x/\uff0e\uff0e/secret", "x\uff0f..\uff0fsecret", "x/.. /secret", "\t../x",
]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
async def test_hostile_paths_are_refused_before_any_request(
    handler: AppHandler, server: tuple[str, Seen], path: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        await run(handler, call(path))
    assert info.value.reason == "PATH_OUTSIDE_BASE_URL"
    assert server[1].requests == []


# The "narrow" profile allows only orders and v2/customers, by whole segments.
PREFIX_ALLOWED = ["orders", "orders/42", "orders/42/lines", "v2/customers", "v2/customers/7", "%6frders/1"]
PREFIX_DENIED = [
    "", "order", "orders-old", "ordersx/1", "v2", "v2/customer", "v2/customers-admin/1", "admin/orders",
    "v2/Customers/1", "\uff4frders/1", "x/orders",
]
PREFIX_ESCAPES = [
    "orders/../admin", "orders/%2e%2e/admin", "orders/..;/admin", "orders/%252e%252e/admin",
    "v2/customers/../../admin", "orders\\..\\admin", "orders/\uff0e\uff0e/admin", "orders%2f..%2fadmin",
    "orders/./../admin",
]


@pytest.mark.parametrize("path", PREFIX_ALLOWED)
async def test_paths_under_an_allowed_prefix_reach_the_app(handler: AppHandler, path: str) -> None:
    head, _, _ = await run(handler, call(path, profile="narrow"))
    assert head.status_code == 200


@pytest.mark.parametrize("path", PREFIX_DENIED)
async def test_paths_beside_the_allowed_prefixes_are_permission_denied(
    handler: AppHandler, server: tuple[str, Seen], path: str
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call(path, profile="narrow"))
    assert info.value.reason == "PATH_NOT_ALLOWED"
    assert server[1].requests == []


@pytest.mark.parametrize("path", PREFIX_ESCAPES)
async def test_paths_climbing_out_of_an_allowed_prefix_are_refused(
    handler: AppHandler, server: tuple[str, Seen], path: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        await run(handler, call(path, profile="narrow"))
    assert info.value.reason == "PATH_OUTSIDE_BASE_URL"
    assert server[1].requests == []


@pytest.mark.parametrize("method", ["POST", "DELETE", "post"])
async def test_methods_the_profile_does_not_allow_are_permission_denied(
    handler: AppHandler, server: tuple[str, Seen], method: str
) -> None:
    with pytest.raises(PermissionDenied, match="allows GET") as info:
        await run(handler, call("orders/1", method=method, profile="narrow"))
    assert info.value.reason == "METHOD_NOT_ALLOWED"
    assert server[1].requests == []


HOSTILE_HEADERS = [
    {"X-Evil": "a\r\nInjected: yes"}, {"X-Evil": "a\nb"}, {"X-Evil": "a\x00"}, {"Bad Name": "x"},
    {"X-Evil\r\nInjected": "x"}, {"": "x"}, {"X:Colon": "x"}, {"X-Evil": "a\rb"}, {"Content-Length": "1, 2"},
    {"Content-Length": "-1"},
    # A steering header smuggled in through a value or a name, on every kind of line break.
    {"X-Trace": "t1\r\nX-HTTP-Method-Override: DELETE"}, {"X-Trace": "t1\nX-Original-URL: /api/admin"},
    {"X-Trace": "t1\rX-Forwarded-For: 10.0.0.1"}, {"X-Trace": "t1\r\n\r\nDELETE /api/admin HTTP/1.1"},
    {"X-Trace": "t1\x0bX-Real-IP: 10.0.0.1"}, {"X-Trace": "t1\x0cHost: evil"}, {"X-Trace": "\x7f"},
    {"X-Trace\r\nX-HTTP-Method-Override": "DELETE"}, {"X-Forwarded-For\n": "10.0.0.1"},
    {"X-HTTP-Method-Override\n": "DELETE"}, {" Host": "evil"}, {"Host ": "evil"}, {"X-Forwarded-For\t": "1"},
    {"X-Forwarded-For:": "1"}, {"X-Forwarded-For: 10.0.0.1\r\nX": "y"},
    # Pseudo-headers of HTTP/2: the agent sets method, scheme, authority and path.
    {":authority": "evil.example"}, {":method": "DELETE"}, {":path": "/api/admin"}, {":scheme": "https"},
    # Anything not ASCII: the HTTP client cannot encode it, and apps would read its bytes differently.
    {"X-Trace": "caf\u00e9"}, {"X-Trace": "a\u2028b"}, {"X-Trace": "a\u0085b"}, {"X-Trace": "\uff21"},
    {"X-\u0130d": "x"}, {"X-Forwarded-F\u043er": "10.0.0.1"},
    # Content-Length lies the HTTP client could not frame.
    {"Content-Length": "\u0665"}, {"Content-Length": "\u00b2"}, {"Content-Length": "\uff15"},
    {"Content-Length": "0x10"}, {"Content-Length": "1e3"}, {"Content-Length": ""}, {"Content-Length": "+5"},
]


@pytest.mark.parametrize("headers", HOSTILE_HEADERS)
async def test_hostile_headers_are_refused_naming_the_headers_field(
    handler: AppHandler, server: tuple[str, Seen], headers: dict[str, str]
) -> None:
    with pytest.raises(InvalidArgument) as info:
        await run(handler, call("x", headers=headers))
    assert (info.value.reason, info.value.field) == ("INVALID_HEADER", "head.headers")
    assert server[1].requests == []


async def test_a_pseudo_header_is_refused_saying_the_agent_sets_it(handler: AppHandler) -> None:
    with pytest.raises(InvalidArgument) as info:
        await run(handler, call("x", headers={":authority": "evil.example"}))
    assert info.value.message == ("header name ':authority' is an HTTP/2 pseudo-header; the agent sets the method, "
                                  "scheme, authority and path itself")


async def test_a_non_ascii_header_value_is_invalid_argument_not_an_internal_error(handler: AppHandler) -> None:
    # It used to escape as a UnicodeEncodeError from the HTTP client: INTERNAL, and a traceback in the agent's log.
    with pytest.raises(InvalidArgument) as info:
        await run(handler, call("x", headers={"X-Trace": "caf\u00e9"}))
    assert info.value.message == ("header 'X-Trace' has a non-ASCII character in its value; encode it first "
                                  "(e.g. percent-encoding or RFC 8187)")


async def test_two_content_lengths_are_refused_even_when_they_agree(handler: AppHandler, server: tuple[str, Seen]) -> None:
    start = call("items", method="POST")
    start.app_call.head.headers.extend([apps_pb2.Header(name="Content-Length", value="2"),
                                        apps_pb2.Header(name="content-length", value="2")])
    with pytest.raises(InvalidArgument) as info:
        await run(handler, start, body_of(b"hi"))
    assert info.value.message == "header 'content-length' is given more than once"
    assert server[1].requests == []


async def test_a_content_length_with_surrounding_spaces_is_sent_without_them(handler: AppHandler) -> None:
    _, body, _ = await run(handler, call("items", method="POST", headers={"Content-Length": " 2 "}), body_of(b"hi"))
    assert json.loads(body)["headers"]["Content-Length"] == "2"


async def test_a_body_shorter_than_the_callers_content_length_is_invalid_argument(handler: AppHandler) -> None:
    with pytest.raises(InvalidArgument) as info:
        await run(handler, call("items", method="POST", headers={"Content-Length": "100"}), body_of(b"short"))
    assert info.value.reason == "INVALID_REQUEST"
    assert "Too little data for declared Content-Length" in info.value.message


async def test_a_content_length_on_a_call_without_a_body_is_invalid_argument(handler: AppHandler) -> None:
    with pytest.raises(InvalidArgument) as info:
        await run(handler, call("x", headers={"Content-Length": "5"}))
    assert info.value.reason == "INVALID_REQUEST"


def test_hostile_corpus_is_large_enough() -> None:
    # The steering and hop-by-hop headers are a corpus of their own, in tests/agent/handlers/apps/test_steering.py.
    corpus = set(HOSTILE_PATHS) | set(PREFIX_DENIED) | set(PREFIX_ESCAPES)
    assert len(corpus) + len(HOSTILE_HEADERS) >= 100


async def test_query_values_with_line_breaks_are_refused(handler: AppHandler, server: tuple[str, Seen]) -> None:
    with pytest.raises(InvalidArgument):
        await run(handler, call("x", query=[("a", "1\r\nHost: evil")]))
    assert server[1].requests == []


@pytest.mark.parametrize("method", ["CONNECT", "TRACE", "GET /x HTTP/1.1\r\n", "G T"])
async def test_bad_methods_are_refused(handler: AppHandler, method: str) -> None:
    with pytest.raises(InvalidArgument):
        await run(handler, call("x", method=method))


async def test_path_with_spaces_and_unicode_stays_under_base(handler: AppHandler) -> None:
    _, body, _ = await run(handler, call("files/a b/é.txt"))
    assert json.loads(body)["path"] == "/api/files/a%20b/%C3%A9.txt"


# -- profile checks --


async def test_check_of_a_working_profile_passes(handler: AppHandler) -> None:
    checks = await handler.check("app")
    assert [(c.name, c.ok) for c in checks] == [("reachable", True), ("credentials", True)]


@pytest.mark.parametrize(("profile", "stage"), [("down", "connect: connection refused"), ("nodns", "DNS: cannot resolve")])
async def test_check_names_the_stage_that_fails(handler: AppHandler, profile: str, stage: str) -> None:
    checks = await handler.check(profile)
    assert [(c.name, c.ok) for c in checks] == [("reachable", False)]
    assert stage in checks[0].message


async def test_check_with_a_missing_secret_fails_on_credentials(handler: AppHandler) -> None:
    checks = await handler.check("unset")
    assert [(c.name, c.ok) for c in checks] == [("credentials", False)]
    assert "ONPREM_TEST_NOT_SET_VAR" in checks[0].message


async def test_check_of_an_unknown_profile_is_not_found(handler: AppHandler) -> None:
    with pytest.raises(NotFound):
        await handler.check("nope")


def test_profiles_are_advertised() -> None:
    handler = AppHandler({"a": AppProfile(name="a", base_url="https://a.internal/")})
    assert handler.profiles() == [profiles_pb2.Profile(name="a", kind=profiles_pb2.PROFILE_KIND_APP)]


async def test_a_keyed_call_forwards_its_key_as_the_idempotency_key_header_replacing_the_callers(
        handler: AppHandler, server: tuple[str, Seen]) -> None:
    _, seen = server
    start = call("orders", method="POST", headers={"Idempotency-Key": "set-by-the-caller"})
    context = RequestContext(request_id=1, body=no_body(),
                             idempotency=tunnel_pb2.Idempotency(key="order-77", fingerprint=b"f" * 32))
    [_ async for _ in handler.handle(start.app_call, context)]
    sent = {name.lower(): value for name, value in seen.requests[-1]["headers"].items()}
    assert sent["idempotency-key"] == "order-77"


# -- traces --


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(tracing.Tracing(provider.get_tracer("test"), enabled=True, provider=provider))
    yield exporter
    tracing.install(None)
    provider.shutdown()


async def test_with_tracing_on_the_app_gets_a_traceparent_naming_the_calls_span_in_place_of_the_callers(
        handler: AppHandler, exported: InMemorySpanExporter) -> None:
    callers = "00-11111111111111111111111111111111-2222222222222222-01"
    _, body, _ = await run(handler, call("orders/1", headers={"traceparent": callers, "tracestate": "x=1"}))
    echoed = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    [span] = [s for s in exported.get_finished_spans() if s.name == "http GET"]
    assert echoed["traceparent"] == tracing.format_traceparent(span.context)
    assert "tracestate" not in echoed
    assert span.attributes is not None and span.attributes["http.response.status_code"] == 200


async def test_with_tracing_off_the_callers_headers_reach_the_app_as_before(handler: AppHandler) -> None:
    callers = "00-11111111111111111111111111111111-2222222222222222-01"
    _, body, _ = await run(handler, call("orders/1", headers={"traceparent": callers}))
    assert {k.lower(): v for k, v in json.loads(body)["headers"].items()}["traceparent"] == callers
