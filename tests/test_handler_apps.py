"""AppHandler against a real HTTP server on 127.0.0.1, started by the test."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import Any

import pytest

from agent.handlers.apps import AppHandler
from agent.handlers.base import RequestContext
from agent.profiles import AppProfile
from onprem.v1 import apps_pb2, profiles_pb2, tunnel_pb2
from tools.ports import free_port
from tunnel.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable

BIG = bytes(range(256)) * 1000  # 256 000 bytes


@dataclass
class Seen:
    requests: list[dict[str, Any]] = field(default_factory=list)


def make_server(seen: Seen) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    body += self.rfile.read(size)
                    self.rfile.readline()
            else:
                body = self.rfile.read(length)
            record = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                      "body": body.decode("latin-1")}
            seen.requests.append(record)
            if self.path.startswith("/api/missing"):
                self._reply(404, b"no such thing")
            elif self.path.startswith("/api/boom"):
                self._reply(500, b"it broke")
            elif self.path.startswith("/api/redirect"):
                self._reply(302, b"", [("Location", "http://127.0.0.1:1/elsewhere")])
            elif self.path.startswith("/api/big"):
                self._reply(200, BIG, [("Content-Type", "application/octet-stream")])
            elif self.path.startswith("/api/"):
                self._reply(200, json.dumps(record).encode(), [("Content-Type", "application/json"),
                                                               ("X-Reply", "yes")])
            else:
                self._reply(200, b"outside the base URL")

        def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "keep-alive")
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="module")
def httpd() -> Iterator[tuple[str, Seen]]:
    seen = Seen()
    server = make_server(seen)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/", seen
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(httpd: tuple[str, Seen]) -> tuple[str, Seen]:
    """The module's HTTP server, with what it has seen so far forgotten."""
    httpd[1].requests.clear()
    return httpd


@pytest.fixture
async def handler(server: tuple[str, Seen], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AppHandler]:
    monkeypatch.setenv("ONPREM_TEST_APP_TOKEN", "Bearer agent-secret")
    base_url, _ = server
    profiles = {
        "app": AppProfile(name="app", base_url=base_url,
                          headers_from_env=MappingProxyType({"Authorization": "ONPREM_TEST_APP_TOKEN"})),
        "unset": AppProfile(name="unset", base_url=base_url,
                            headers_from_env=MappingProxyType({"X-Key": "ONPREM_TEST_NOT_SET_VAR"})),
        "down": AppProfile(name="down", base_url=f"http://127.0.0.1:{free_port()}/", timeout_seconds=2),
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


async def run(handler: AppHandler, start: tunnel_pb2.RequestStart, body: AsyncIterator[bytes] | None = None,
              max_chunk_bytes: int = 256 * 1024) -> tuple[apps_pb2.CallResponseHead, bytes, list[tunnel_pb2.ResponseChunk]]:
    context = RequestContext(request_id=1, body=body, max_chunk_bytes=max_chunk_bytes)
    chunks = [chunk async for chunk in handler.handle(start, context)]
    assert chunks[0].call.WhichOneof("part") == "head"
    assert all(c.call.WhichOneof("part") == "body" for c in chunks[1:])
    return chunks[0].call.head, b"".join(c.call.body for c in chunks[1:]), chunks


async def test_get_with_query_reaches_the_server_with_injected_header(
    handler: AppHandler, server: tuple[str, Seen]
) -> None:
    head, body, _ = await run(handler, call("orders/42", query=[("a", "1"), ("b", "x y"), ("a", "2")],
                                            headers={"X-Trace": "t1"}))
    assert head.status_code == 200
    echoed = json.loads(body)
    assert echoed["path"] == "/api/orders/42?a=1&b=x+y&a=2"
    assert echoed["headers"]["Authorization"] == "Bearer agent-secret"
    assert echoed["headers"]["X-Trace"] == "t1"
    names = {h.name.lower() for h in head.headers}
    assert "x-reply" in names
    assert "connection" not in names  # hop-by-hop headers are not passed back


async def test_post_streams_request_body(handler: AppHandler) -> None:
    _, body, _ = await run(handler, call("items", method="POST", headers={"Content-Type": "text/plain"}),
                           body_of(b"hello ", b"world"))
    echoed = json.loads(body)
    assert (echoed["method"], echoed["body"]) == ("POST", "hello world")


@pytest.mark.parametrize("name", ["Authorization", "authorization", "AUTHORIZATION"])
async def test_operator_cannot_override_injected_header(
    handler: AppHandler, server: tuple[str, Seen], name: str
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, call("x", headers={name: "Bearer mine"}))
    assert info.value.reason == "INJECTED_HEADER"
    assert server[1].requests == []


async def test_hop_by_hop_request_headers_are_stripped(handler: AppHandler) -> None:
    _, body, _ = await run(handler, call("x", headers={"Host": "evil.example", "Proxy-Authorization": "p",
                                                       "Upgrade": "h2c", "X-Keep": "1"}))
    headers = json.loads(body)["headers"]
    assert headers["Host"].startswith("127.0.0.1:")
    assert "Proxy-Authorization" not in headers and "Upgrade" not in headers
    assert headers["X-Keep"] == "1"


@pytest.mark.parametrize(("path", "status", "text"), [("missing", 404, b"no such thing"), ("boom", 500, b"it broke")])
async def test_error_statuses_are_normal_responses(handler: AppHandler, path: str, status: int, text: bytes) -> None:
    head, body, _ = await run(handler, call(path))
    assert (head.status_code, body) == (status, text)


async def test_redirects_are_returned_not_followed(handler: AppHandler, server: tuple[str, Seen]) -> None:
    head, _, _ = await run(handler, call("redirect"))
    assert head.status_code == 302
    assert {h.name.lower(): h.value for h in head.headers}["location"] == "http://127.0.0.1:1/elsewhere"
    assert len(server[1].requests) == 1


async def test_large_body_streams_in_bounded_chunks(handler: AppHandler) -> None:
    _, body, chunks = await run(handler, call("big"), max_chunk_bytes=16 * 1024)
    assert body == BIG
    assert len(chunks) > 10
    assert all(c.ByteSize() <= 16 * 1024 for c in chunks)


async def test_unreachable_app_is_unavailable_naming_the_profile(handler: AppHandler) -> None:
    with pytest.raises(Unavailable, match="app profile 'down'") as info:
        await run(handler, call("x", profile="down"))
    assert info.value.reason == "APP_UNREACHABLE"


async def test_missing_env_var_is_failed_precondition_naming_the_variable(handler: AppHandler) -> None:
    with pytest.raises(FailedPrecondition, match="ONPREM_TEST_NOT_SET_VAR"):
        await run(handler, call("x", profile="unset"))


async def test_unknown_profile_is_not_found(handler: AppHandler) -> None:
    with pytest.raises(NotFound, match="app profile 'nope'"):
        await run(handler, call("x", profile="nope"))


HOSTILE_PATHS = [
    "http://evil.example/", "https://127.0.0.1/api/x", "HTTP://x", "javascript:alert(1)", "file:///etc/passwd",
    "mailto:x@y", "a:b", "//evil.example/x", "/api/x", "/", "\\evil", "x\\..\\..\\secret", "user@evil.example",
    "x/@evil", "..", "../secret", "x/../../secret", "./x", "x/./y", "x/..", "%2e%2e/secret", "%2E%2E/secret",
    "x%2fy", "x%2F..%2Fsecret", "%5c..%5csecret", "x%5Cy", "a\r\nHost: evil", "a\nb", "a\x00b", "x?admin=1",
    "x#frag", "%00", "%0d%0aSet-Cookie:x",
]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
async def test_hostile_paths_are_refused_before_any_request(
    handler: AppHandler, server: tuple[str, Seen], path: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        await run(handler, call(path))
    assert info.value.reason == "PATH_OUTSIDE_BASE_URL"
    assert server[1].requests == []


HOSTILE_HEADERS = [
    {"X-Evil": "a\r\nInjected: yes"}, {"X-Evil": "a\nb"}, {"X-Evil": "a\x00"}, {"Bad Name": "x"},
    {"X-Evil\r\nInjected": "x"}, {"": "x"}, {"X:Colon": "x"},
]


@pytest.mark.parametrize("headers", HOSTILE_HEADERS)
async def test_hostile_headers_are_refused(handler: AppHandler, server: tuple[str, Seen], headers: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument) as info:
        await run(handler, call("x", headers=headers))
    assert info.value.reason == "INVALID_HEADER"
    assert server[1].requests == []


def test_hostile_corpus_is_large_enough() -> None:
    assert len(set(HOSTILE_PATHS)) + len(HOSTILE_HEADERS) >= 30


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


def test_profiles_are_advertised() -> None:
    handler = AppHandler({"a": AppProfile(name="a", base_url="https://a.internal/")})
    assert handler.profiles() == [profiles_pb2.Profile(name="a", kind=profiles_pb2.PROFILE_KIND_APP)]
