"""Caller headers cannot steer the app: against a real upstream that honours them.

The upstream here (`Upstream(steerable=True)`) behaves like a misconfigured
framework: it runs the method a method-override header names, routes by a
rewritten-URL header, and believes forwarded hosts and client addresses. So
every header the agent lets through would really change what the app does,
and a test that the app "saw no request" means the agent stopped it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from types import MappingProxyType

import pytest

from onprem.agent.handlers.apps import AppHandler
from onprem.agent.handlers.base import RequestContext
from onprem.agent.profiles import AppProfile
from onprem.tunnel.errors import InvalidArgument, PermissionDenied
from onprem.v1 import apps_pb2, tunnel_pb2
from tests.support.apps_upstream import Seen, Upstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream(steerable=True).start()
    yield server
    server.stop()


@pytest.fixture
def seen(upstream: Upstream) -> Seen:
    """What the upstream has seen, forgotten before each test."""
    upstream.seen.clear()
    return upstream.seen


def public_get_only(base_url: str) -> AppProfile:
    """The profile of the issue: GET only, and only under `public`."""
    return AppProfile(name="public", base_url=base_url, methods=frozenset({"GET"}), path_prefixes=("public",))


FORWARDING = frozenset({"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-prefix",
                        "forwarded", "x-real-ip", "host"})


@pytest.fixture
async def handler(upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AppHandler]:
    monkeypatch.setenv("ONPREM_TEST_STEER_KEY", "steer-key-77")
    base_url = upstream.base_url
    handler = AppHandler({
        "public": public_get_only(base_url),
        # Behind a proxy the site trusts to tell the app who the client is: forwarded identities pass.
        "forwarding": AppProfile(name="forwarding", base_url=base_url, methods=frozenset({"GET"}),
                                 path_prefixes=("public",), allow_caller_headers=FORWARDING),
        # A framework that needs PATCH tunnelled through POST, and an IIS-style rewrite.
        "tunnelled": AppProfile(name="tunnelled", base_url=base_url, methods=frozenset({"GET", "POST", "PATCH"}),
                                path_prefixes=("public",), allow_caller_headers=frozenset(
                                    {"x-http-method-override", "x-original-url"})),
        # Built in code, not parsed (which refuses it): hop-by-hop headers listed as if they could be allowed.
        "careless": AppProfile(name="careless", base_url=base_url, allow_caller_headers=frozenset(
            {"connection", "transfer-encoding", "upgrade", "te", "http2-settings"})),
        "keyed": AppProfile(name="keyed", base_url=base_url,
                            headers_from_env=MappingProxyType({"X-Api-Key": "ONPREM_TEST_STEER_KEY"})),
        "keyed-cookies": AppProfile(name="keyed-cookies", base_url=base_url, allow_caller_headers=frozenset({"cookie"}),
                                    headers_from_env=MappingProxyType({"X-Api-Key": "ONPREM_TEST_STEER_KEY"})),
        "open": AppProfile(name="open", base_url=base_url),
    })
    yield handler
    await handler.aclose()


def call(path: str, headers: list[tuple[str, str]], method: str = "GET", profile: str = "public") -> tunnel_pb2.RequestStart:
    head = apps_pb2.CallHead(profile=profile, method=method, path=path,
                             headers=[apps_pb2.Header(name=k, value=v) for k, v in headers])
    return tunnel_pb2.RequestStart(app_call=apps_pb2.AppCall(head=head))


async def no_body() -> AsyncIterator[bytes]:
    return
    yield b""


async def run(handler: AppHandler, start: tunnel_pb2.RequestStart) -> tuple[int, bytes]:
    chunks = [chunk async for chunk in handler.handle(start.app_call, RequestContext(request_id=1, body=no_body()))]
    return chunks[0].call.head.status_code, b"".join(c.call.body for c in chunks[1:])


# -- the finding of issue 11 --

ATTACK = [("X-HTTP-Method-Override", "DELETE"), ("X-Original-URL", "/api/admin/users/1")]


async def test_a_get_of_public_orders_cannot_become_delete_of_an_admin_user(handler: AppHandler, seen: Seen) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("public/orders", ATTACK))
    assert info.value.message == (
        "header 'X-HTTP-Method-Override' would let the caller change the method the app runs; app profile "
        "'public' does not allow callers to send it (allow_caller_headers)")
    assert info.value.reason == "CALLER_HEADER_NOT_ALLOWED"
    assert seen.requests == []
    assert seen.deleted_users == []


async def test_the_rewritten_url_alone_is_refused_naming_it(handler: AppHandler, seen: Seen) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("public/orders", [("X-Original-URL", "/api/admin/users/1")]))
    assert info.value.message == (
        "header 'X-Original-URL' would let the caller change the path the app routes on; app profile 'public' "
        "does not allow callers to send it (allow_caller_headers)")
    assert seen.requests == []


async def test_the_same_call_without_steering_headers_reaches_only_public_orders(
    handler: AppHandler, seen: Seen
) -> None:
    status, body = await run(handler, call("public/orders", []))
    assert status == 200
    assert json.loads(body)["ran"]["method"] == "GET"
    assert [(r["ran"]["method"], r["ran"]["path"]) for r in seen.requests] == [("GET", "/api/public/orders")]
    assert seen.deleted_users == []


# -- every header that steers the app is refused, in every spelling --

METHOD = "the method the app runs"
PATH = "the path the app routes on"
HOST = "the host the app believes it serves"
CLIENT = "who the app believes the client is"
FORWARDED = "what the app believes about the original request (client, host, scheme or path)"

STEERING = [
    ("X-HTTP-Method-Override", "DELETE", METHOD),
    ("X-HTTP-Method", "DELETE", METHOD),
    ("X-Method-Override", "DELETE", METHOD),
    ("x-http-method-override", "DELETE", METHOD),
    ("X-HTTP-METHOD-OVERRIDE", "DELETE", METHOD),
    ("X_HTTP_Method_Override", "DELETE", METHOD),  # CGI, WSGI and PHP read it as X-HTTP-Method-Override
    ("x_method-override", "DELETE", METHOD),
    ("X-Original-URL", "/api/admin/users/1", PATH),
    ("X-Rewrite-URL", "/api/admin/users/1", PATH),
    ("X-Original-URI", "/api/admin/users/1", PATH),
    ("X_Original_URL", "/api/admin/users/1", PATH),
    ("x-rewrite-url", "/api/admin/users/1", PATH),
    ("Host", "admin.internal", HOST),
    ("host", "admin.internal", HOST),
    ("HOST", "127.0.0.1", HOST),  # even a Host equal to the real one: the agent's client sets it
    ("X-Host", "admin.internal", HOST),
    ("X-Original-Host", "admin.internal", HOST),
    ("X-Forwarded-For", "10.0.0.1", FORWARDED),
    ("X-Forwarded-Host", "admin.internal", FORWARDED),
    ("X-Forwarded-Proto", "https", FORWARDED),
    ("X-Forwarded-Port", "443", FORWARDED),
    ("X-Forwarded-Prefix", "/api/admin", FORWARDED),
    ("X-Forwarded-Uri", "/api/admin/users/1", FORWARDED),
    ("X-Forwarded-Path", "/api/admin/users/1", FORWARDED),
    ("X-Forwarded-Server", "admin.internal", FORWARDED),
    ("X-Forwarded-Ssl", "on", FORWARDED),
    ("X-Forwarded", "for=10.0.0.1", FORWARDED),
    ("X-Forwarded-Anything-New", "x", FORWARDED),  # every name that starts with X-Forwarded
    ("x-forwarded-for", "10.0.0.1", FORWARDED),
    ("X_Forwarded_For", "10.0.0.1", FORWARDED),
    ("x_forwarded_host", "admin.internal", FORWARDED),
    ("Forwarded", "for=10.0.0.1;host=admin.internal;proto=https", FORWARDED),
    ("FORWARDED", "for=10.0.0.1", FORWARDED),
    ("X-Real-IP", "10.0.0.1", CLIENT),
    ("X_Real_IP", "10.0.0.1", CLIENT),
    ("X-Client-IP", "10.0.0.1", CLIENT),
    ("Client-IP", "10.0.0.1", CLIENT),
    ("True-Client-IP", "10.0.0.1", CLIENT),
    ("X-Cluster-Client-IP", "10.0.0.1", CLIENT),
    ("CF-Connecting-IP", "10.0.0.1", CLIENT),
    ("Fastly-Client-IP", "10.0.0.1", CLIENT),
    ("X-Original-Forwarded-For", "10.0.0.1", CLIENT),
]


@pytest.mark.parametrize(("name", "value", "what"), STEERING, ids=[f"{n}={v}" for n, v, _ in STEERING])
async def test_a_steering_header_is_permission_denied_naming_it_before_any_request(
    handler: AppHandler, seen: Seen, name: str, value: str, what: str
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("public/orders", [("X-Trace", "t1"), (name, value)]))
    assert info.value.message == (
        f"header {name!r} would let the caller change {what}; app profile 'public' does not allow callers to "
        "send it (allow_caller_headers)")
    assert info.value.reason == "CALLER_HEADER_NOT_ALLOWED"
    assert seen.requests == []


@pytest.mark.parametrize(("name", "value", "what"), [
    ("X-HTTP-Method-Override", "DELETE", METHOD), ("X-Original-URL", "/api/admin/users/1", PATH),
    ("X-Forwarded-For", "10.0.0.1", FORWARDED),
], ids=["method", "path", "forwarded"])
async def test_a_steering_header_sent_twice_or_empty_is_refused_all_the_same(
    handler: AppHandler, seen: Seen, name: str, value: str, what: str
) -> None:
    for headers in ([(name, value), (name, value)], [(name, "")]):
        with pytest.raises(PermissionDenied) as info:
            await run(handler, call("public/orders", headers))
        assert info.value.message == (
            f"header {name!r} would let the caller change {what}; app profile 'public' does not allow callers to "
            "send it (allow_caller_headers)")
    assert seen.requests == []


HOP_BY_HOP = [
    ("Connection", "close"), ("Keep-Alive", "timeout=5"), ("Proxy-Authenticate", "Basic"),
    ("Proxy-Authorization", "Basic eDp5"), ("Proxy-Connection", "keep-alive"), ("TE", "trailers"),
    ("Trailer", "X-Checksum"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
    ("transfer-encoding", "chunked"), ("TRANSFER-ENCODING", "identity"), ("Transfer_Encoding", "chunked"),
    ("upgrade", "websocket"), ("Proxy_Authorization", "Basic eDp5"),
]


@pytest.mark.parametrize(("name", "value"), HOP_BY_HOP, ids=[n for n, _ in HOP_BY_HOP])
async def test_a_hop_by_hop_header_is_permission_denied_naming_it_before_any_request(
    handler: AppHandler, seen: Seen, name: str, value: str
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("public/orders", [(name, value)]))
    named = " (it names close)" if name == "Connection" else ""
    assert info.value.message == (
        f"header {name!r} is hop-by-hop{named}: it belongs to the agent's own connection to the app, so callers "
        "can never send it")
    assert info.value.reason == "HOP_BY_HOP_HEADER"
    assert seen.requests == []


async def test_a_connection_header_is_refused_naming_the_headers_it_would_strip(
    handler: AppHandler, seen: Seen
) -> None:
    # Through a proxy in front of the app, this would remove the key the agent injects.
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("x", [("X-Trace", "t1"), ("Connection", "X-Api-Key, X-Trace")], profile="keyed"))
    assert info.value.message == (
        "header 'Connection' is hop-by-hop (it names X-Api-Key, X-Trace): it belongs to the agent's own connection "
        "to the app, so callers can never send it")
    assert seen.requests == []


@pytest.mark.parametrize(("name", "value"), [("Connection", "close"), ("Transfer-Encoding", "chunked"),
                                             ("Upgrade", "h2c"), ("TE", "trailers"), ("HTTP2-Settings", "AAMA")])
async def test_hop_by_hop_headers_stay_refused_on_a_profile_that_lists_them(
    handler: AppHandler, seen: Seen, name: str, value: str
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("x", [(name, value)], profile="careless"))
    assert info.value.reason == "HOP_BY_HOP_HEADER"
    assert seen.requests == []


async def test_a_content_length_spelled_with_an_underscore_is_refused_before_any_request(
    handler: AppHandler, seen: Seen
) -> None:
    # h11 would frame the body without it, while an app folding '_' into '-' would read it as the length.
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("public/orders", [("Content_Length", "5")]))
    assert info.value.message == (
        "header 'Content_Length' would be read as Content-Length by apps that fold '_' into '-'; send Content-Length")
    assert info.value.reason == "AMBIGUOUS_HEADER"
    assert seen.requests == []


# -- the allow-list is the only way through, one header at a time --

ALLOWED = [
    ("X-Forwarded-For", "10.0.0.1", "client", "10.0.0.1"),
    ("X_Forwarded_For", "10.0.0.2", "client", "10.0.0.2"),
    ("X-Real-IP", "10.0.0.3", "client", "10.0.0.3"),
    ("Forwarded", "for=10.0.0.4;proto=https", "client", "10.0.0.4"),
    ("X-Forwarded-Proto", "https", "scheme", "https"),
    ("X-Forwarded-Host", "erp.example", "host", "erp.example"),
    ("Host", "erp.example", "host", "erp.example"),
    ("X-Forwarded-Prefix", "/tenant-7", "path", "/tenant-7/api/public/orders"),
]


@pytest.mark.parametrize(("name", "value", "key", "ran"), ALLOWED, ids=[n for n, *_ in ALLOWED])
async def test_a_header_the_profile_allows_reaches_the_app_and_steers_it(
    handler: AppHandler, seen: Seen, name: str, value: str, key: str, ran: str
) -> None:
    status, _ = await run(handler, call("public/orders", [(name, value)], profile="forwarding"))
    assert status == 200
    assert seen.requests[0]["headers"][name] == value
    assert seen.requests[0]["ran"][key] == ran


@pytest.mark.parametrize(("name", "value", "what"), [
    ("X-Forwarded-Port", "443", FORWARDED), ("X-Client-IP", "10.0.0.1", CLIENT), ("X-Host", "erp.example", HOST),
    ("X-HTTP-Method-Override", "DELETE", METHOD), ("X-Original-URL", "/api/admin/users/1", PATH),
], ids=["X-Forwarded-Port", "X-Client-IP", "X-Host", "X-HTTP-Method-Override", "X-Original-URL"])
async def test_allowing_some_steering_headers_does_not_open_the_others(
    handler: AppHandler, seen: Seen, name: str, value: str, what: str
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("public/orders", [("X-Forwarded-For", "10.0.0.1"), (name, value)],
                                profile="forwarding"))
    assert info.value.message == (
        f"header {name!r} would let the caller change {what}; app profile 'forwarding' does not allow callers to "
        "send it (allow_caller_headers)")
    assert seen.requests == []


async def test_an_allowed_host_may_still_be_sent_only_once(handler: AppHandler, seen: Seen) -> None:
    with pytest.raises(InvalidArgument) as info:
        await run(handler, call("public/orders", [("Host", "a.example"), ("host", "b.example")], profile="forwarding"))
    assert info.value.message == "header 'host' is given more than once"
    assert (info.value.reason, info.value.field) == ("INVALID_HEADER", "head.headers")
    assert seen.requests == []


async def test_an_allowed_method_override_naming_an_allowed_method_steers_the_app(
    handler: AppHandler, seen: Seen
) -> None:
    status, _ = await run(handler, call("public/orders/7", [("X-HTTP-Method-Override", "patch")], method="POST",
                                        profile="tunnelled"))
    assert status == 200
    assert (seen.requests[0]["method"], seen.requests[0]["ran"]["method"]) == ("POST", "PATCH")


@pytest.mark.parametrize("value", ["DELETE", "delete", " DELETE ", "TRACE", "CONNECT", "PATCH, DELETE", ""])
async def test_an_allowed_method_override_naming_a_method_the_profile_does_not_allow_is_refused(
    handler: AppHandler, seen: Seen, value: str
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("public/orders", [("X-HTTP-Method-Override", value)], profile="tunnelled"))
    assert info.value.message == (
        f"header 'X-HTTP-Method-Override' asks the app to run {value.strip()!r}; app profile 'tunnelled' allows "
        "GET, PATCH, POST")
    assert info.value.reason == "METHOD_NOT_ALLOWED"
    assert seen.requests == []


async def test_an_allowed_rewritten_url_under_an_allowed_prefix_steers_the_app(
    handler: AppHandler, seen: Seen
) -> None:
    status, _ = await run(handler, call("public/index", [("X-Original-URL", "/api/public/orders/7?full=1")],
                                        profile="tunnelled"))
    assert status == 200
    assert seen.requests[0]["ran"]["path"] == "/api/public/orders/7?full=1"


REWRITES_OUT = [
    ("/api/admin/users/1", "path 'admin/users/1' is outside the paths app profile 'tunnelled' allows (public)"),
    ("/api/public/../admin/users/1", "path 'public/../admin/users/1' contains a '.' or '..' segment; it must stay "
                                     "under the app's base URL"),
    ("/api/public/%2e%2e/admin", "path 'public/%2e%2e/admin' contains an encoded '/', '.', '\\', '%' or control "
                                 "character; it must stay under the app's base URL"),
    ("/admin/users/1", "it is not under the base URL's path '/api/'"),
    ("http://127.0.0.1/api/public/x", "it is not under the base URL's path '/api/'"),
    ("//evil.example/api/public/x", "it is not under the base URL's path '/api/'"),
    ("api/public/x", "it is not under the base URL's path '/api/'"),
]


@pytest.mark.parametrize(("value", "why"), REWRITES_OUT, ids=[v for v, _ in REWRITES_OUT])
async def test_an_allowed_rewritten_url_outside_the_profile_is_refused(
    handler: AppHandler, seen: Seen, value: str, why: str
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("public/orders", [("X-Original-URL", value)], profile="tunnelled"))
    assert info.value.message == (
        f"header 'X-Original-URL' names {value!r}, which app profile 'tunnelled' does not allow: {why}")
    assert info.value.reason == "PATH_NOT_ALLOWED"
    assert seen.requests == []


async def test_the_original_attack_fails_even_where_both_of_its_headers_are_allowed(
    handler: AppHandler, seen: Seen
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("public/orders", ATTACK, profile="tunnelled"))
    assert info.value.reason == "METHOD_NOT_ALLOWED"
    assert seen.requests == []
    assert seen.deleted_users == []


# -- the agent's own headers, and the caller's credentials where the agent brings its own --


@pytest.mark.parametrize("name", ["X-Api-Key", "x-api-key", "X_Api_Key", "x_API-key"])
async def test_the_caller_can_neither_override_nor_duplicate_an_injected_header_in_any_spelling(
    handler: AppHandler, seen: Seen, name: str
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("x", [(name, "mine")], profile="keyed"))
    assert info.value.message == (
        f"header {name!r} is set by the agent for app profile 'keyed' and cannot be sent by the caller")
    assert info.value.reason == "INJECTED_HEADER"
    assert seen.requests == []


@pytest.mark.parametrize(("name", "value"), [("Cookie", "session=someone-else"), ("Authorization", "Bearer mine"),
                                             ("cookie", "a=1"), ("AUTHORIZATION", "Basic eDp5")])
async def test_caller_credentials_are_refused_where_the_profile_injects_its_own(
    handler: AppHandler, seen: Seen, name: str, value: str
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("x", [(name, value)], profile="keyed"))
    assert info.value.message == (
        f"header {name!r} would let the caller change who the app acts for (this profile injects its own "
        "credentials); app profile 'keyed' does not allow callers to send it (allow_caller_headers)")
    assert seen.requests == []


async def test_caller_cookies_pass_where_the_profile_allows_them_beside_its_injected_key(
    handler: AppHandler, seen: Seen
) -> None:
    status, body = await run(handler, call("x", [("Cookie", "csrf=abc")], profile="keyed-cookies"))
    assert status == 200
    assert json.loads(body)["headers"]["Cookie"] == "csrf=abc"
    assert json.loads(body)["headers"]["X-Api-Key"] == "steer-key-77"


async def test_caller_credentials_pass_where_the_profile_injects_none(handler: AppHandler, seen: Seen) -> None:
    status, body = await run(handler, call("x", [("Authorization", "Bearer mine"), ("Cookie", "s=1")], profile="open"))
    assert status == 200
    assert (json.loads(body)["headers"]["Authorization"], json.loads(body)["headers"]["Cookie"]) == ("Bearer mine", "s=1")


# -- headers that do not steer --


async def test_ordinary_headers_and_max_forwards_pass_untouched(handler: AppHandler, seen: Seen) -> None:
    # Max-Forwards only matters to proxies answering TRACE (never allowed) or OPTIONS; it steers nothing.
    headers = [("X-Trace", "t1"), ("Accept", "application/json"), ("Max-Forwards", "0")]
    status, body = await run(handler, call("public/orders", headers))
    assert status == 200
    echoed = json.loads(body)["headers"]
    assert (echoed["X-Trace"], echoed["Accept"], echoed["Max-Forwards"]) == ("t1", "application/json", "0")
    assert seen.requests[0]["ran"] == {"method": "GET", "path": "/api/public/orders", "host": echoed["Host"],
                                       "scheme": "http", "client": "127.0.0.1"}


async def test_expect_is_dropped_because_the_agent_never_waits_for_100_continue(handler: AppHandler, seen: Seen) -> None:
    status, body = await run(handler, call("public/orders", [("Expect", "100-continue")]))
    assert status == 200
    assert "Expect" not in json.loads(body)["headers"]
