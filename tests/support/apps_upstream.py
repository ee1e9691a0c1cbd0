"""A real HTTP application for the app tests: HTTP/1.1, chunked and slow
responses, bodies streamed both ways, connections cut on purpose, optional
TLS with client certificates.

Routes live under `/api/<route>[/...]`; anything else under `/api/` echoes
the request as JSON. What the server noticed about connections the client
closed is kept in `events` and, for a server in another process, served as
JSON at `/_events` (outside any test's base URL); the requests it received
likewise at `/_requests`.

`POST /api/payments` is an app that deduplicates by the `Idempotency-Key` header, as the IETF draft
(draft-ietf-httpapi-idempotency-key-header) and Stripe do: the first request with a key makes a payment
and answers 201; a later one with the same key and the same body gets that first answer again, with
`Idempotent-Replayed: true`, and makes nothing; the same key with another body is refused with 422; one
while the first is still running, with 409. A request without the header makes a payment each time. The
payments made are served at `/_payments`.

A *steerable* server (`Upstream(steerable=True)`, `--steerable`) behaves like
a misconfigured framework behind a trusted proxy: it runs the method named by
`X-HTTP-Method-Override`, `X-HTTP-Method` or `X-Method-Override`, routes by
`X-Original-URL` or `X-Rewrite-URL`, and takes the host, scheme and client
address from `X-Forwarded-*`, `Forwarded` and `X-Real-IP`. Like a CGI/WSGI
server it folds `_` into `-` in header names, so `X_Forwarded_For` steers it
too. What it ended up running is recorded as `ran`, and `DELETE
/api/admin/users/<n>` really deletes user n (see `Seen.deleted_users`).

Run it in a thread (`Upstream.start`) or, to keep its CPU out of the test
process, as `python -m tests.support.apps_upstream --port N`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tools.ports import free_port

BIG = bytes(range(256)) * 1000  # 256 000 bytes
PATTERN = bytes(range(256)) * 256  # 64 KiB, what /api/bytes repeats


@dataclass
class Seen:
    requests: list[dict[str, Any]] = field(default_factory=list)
    #: Things noticed about connections, e.g. {"route": "forever", "closed_by_client": True}.
    events: list[dict[str, Any]] = field(default_factory=list)
    #: Bytes of request bodies received so far by /api/sink and /api/slow-sink.
    body_bytes_received: int = 0
    #: Users a steerable server deleted, by number: the damage a steered request does.
    deleted_users: list[int] = field(default_factory=list)
    #: Payments made by POST /api/payments, oldest first: what a duplicated call would double.
    payments: list[dict[str, Any]] = field(default_factory=list)
    #: Idempotency-Key -> (sha256 of the body, the first answer's status and body; None while it runs).
    keys: dict[str, tuple[str, tuple[int, bytes] | None]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        self.requests.clear()
        self.events.clear()
        self.body_bytes_received = 0
        self.deleted_users.clear()
        self.payments.clear()
        self.keys.clear()


#: What a steerable server honours, in the order it looks (lower case, '_' folded into '-').
METHOD_OVERRIDES = ("x-http-method-override", "x-http-method", "x-method-override")
URL_REWRITES = ("x-original-url", "x-rewrite-url")


def _steered(command: str, path: str, headers: dict[str, str], peer: str) -> dict[str, str]:
    """The method, path, host, scheme and client a misconfigured framework would act on."""
    method = next((headers[h].strip().upper() for h in METHOD_OVERRIDES if h in headers), command)
    target = next((headers[h].strip() for h in URL_REWRITES if h in headers), path)
    forwarded = dict(
        pair.strip().split("=", 1) for pair in headers.get("forwarded", "").split(",")[0].split(";") if "=" in pair)
    client = (headers.get("x-forwarded-for", "").split(",")[0].strip() or headers.get("x-real-ip", "").strip()
              or forwarded.get("for", "").strip('"') or peer)
    return {
        "method": method,
        "path": headers.get("x-forwarded-prefix", "").rstrip("/") + target,
        "host": headers.get("x-forwarded-host") or forwarded.get("host") or headers.get("host", ""),
        "scheme": headers.get("x-forwarded-proto") or forwarded.get("proto") or "http",
        "client": client,
    }


class _ClientGone(Exception):
    pass


def _handler(seen: Seen, steerable: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        # -- reading bodies, in pieces, the way a real app would --

        def _body_pieces(self) -> Iterator[bytes]:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while True:
                    line = self.rfile.readline()
                    if not line:
                        raise _ClientGone
                    size = int(line.split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return
                    left = size
                    while left:
                        data = self.rfile.read1(min(left, 1 << 20))  # type: ignore[attr-defined]
                        if not data:
                            raise _ClientGone
                        left -= len(data)
                        yield data
                    self.rfile.readline()
            else:
                left = int(self.headers.get("Content-Length") or 0)
                while left:
                    data = self.rfile.read1(min(left, 1 << 20))  # type: ignore[attr-defined]
                    if not data:
                        raise _ClientGone
                    left -= len(data)
                    yield data

        # -- writing --

        def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> None:
            self.send_response(status)
            for name, value in headers or []:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _start_chunked(self, status: int = 200, headers: list[tuple[str, str]] | None = None) -> None:
            self.send_response(status)
            for name, value in headers or []:
                self.send_header(name, value)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _end_chunked(self) -> None:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        # -- routes --

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            if parts.path in ("/_events", "/_requests", "/_payments"):
                kept = {"/_events": seen.events, "/_requests": seen.requests, "/_payments": seen.payments}[parts.path]
                self._reply(200, json.dumps(kept).encode(), [("Content-Type", "application/json")])
                return
            ran = None
            if steerable:
                folded = {name.lower().replace("_", "-"): value for name, value in self.headers.items()}
                ran = _steered(self.command, self.path, folded, self.client_address[0])
                parts = urlsplit(ran["path"])
            route = parts.path[len("/api/"):].split("/")[0] if parts.path.startswith("/api/") else None
            try:
                if route in ("sink", "slow-sink"):
                    self._sink(route, float(query.get("delay", 0)))
                    return
                body = b"".join(self._body_pieces())
            except _ClientGone:
                seen.events.append({"route": route, "body_cut_by_client": True})
                self.close_connection = True
                return
            record = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                      "body": body.decode("latin-1"), "client_cert_cn": self._client_cert_cn(),
                      "client_port": self.client_address[1]}
            if ran is not None:
                record["ran"] = ran
            seen.requests.append(record)
            try:
                self._route(route, query, record)
            except (BrokenPipeError, ConnectionResetError):
                seen.events.append({"route": route, "closed_by_client": True})
                self.close_connection = True

        def _client_cert_cn(self) -> str | None:
            if not isinstance(self.connection, ssl.SSLSocket):
                return None
            cert: dict[str, Any] = dict(self.connection.getpeercert() or {})
            for rdn in cert.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        return str(value)
            return None

        def _sink(self, route: str, delay: float) -> None:
            digest, count = hashlib.sha256(), 0
            for data in self._body_pieces():
                digest.update(data)
                count += len(data)
                seen.body_bytes_received += len(data)
                if delay:
                    time.sleep(delay)
            seen.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                                  "body": ""})
            self._reply(200, json.dumps({"bytes": count, "sha256": digest.hexdigest()}).encode(),
                        [("Content-Type", "application/json")])

        def _route(self, route: str | None, query: dict[str, str], record: dict[str, Any]) -> None:
            if route is None:
                self._reply(200, b"outside the base URL")
            elif route == "missing":
                self._reply(404, b"no such thing")
            elif route == "boom":
                self._reply(500, b"it broke")
            elif route == "admin" and "ran" in record:
                self._admin(record["ran"])
            elif route == "payments" and self.command == "POST":
                self._payment(record["body"].encode("latin-1"))
            elif route == "redirect":
                self._reply(302, b"", [("Location", "http://127.0.0.1:1/elsewhere")])
            elif route == "big":
                self._reply(200, BIG, [("Content-Type", "application/octet-stream")])
            elif route == "reflect":
                # What a debugging endpoint does: every request header comes back as a response header.
                echoed = [(f"X-Echo-{name}", value) for name, value in self.headers.items()]
                self._reply(200, b"reflected", echoed)
            elif route == "bytes":
                self._bytes(int(query["n"]), chunked=query.get("chunked") == "1")
            elif route == "slow":
                self._start_chunked(headers=[("Content-Type", "text/plain")])
                for i in range(int(query.get("chunks", 5))):
                    time.sleep(float(query.get("delay", 0.1)))
                    self._chunk(f"part {i}\n".encode())
                self._end_chunked()
            elif route == "stall":
                time.sleep(float(query.get("seconds", 3)))
                self._reply(200, b"too late")
            elif route == "cut":
                # Promises 1 000 000 bytes, sends 100 000, hangs up.
                self.send_response(200)
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                self.wfile.write(BIG[:100_000])
                self.wfile.flush()
                self.close_connection = True
            elif route == "cut-chunked":
                self._start_chunked()
                for _ in range(3):
                    self._chunk(BIG[:50_000])
                self.close_connection = True  # no final 0-size chunk
            elif route == "forever":
                self._start_chunked()
                sent = 0
                while True:
                    self._chunk(BIG[:4096])
                    sent += 4096
                    time.sleep(0.02)
            else:
                self._reply(200, json.dumps(record).encode(), [("Content-Type", "application/json"),
                                                               ("X-Reply", "yes")])

        def _admin(self, ran: dict[str, str]) -> None:
            """The endpoint a steered request must never reach: DELETE /api/admin/users/<n> deletes user n."""
            segments = urlsplit(ran["path"]).path.split("/")
            if ran["method"] == "DELETE" and segments[2:4] == ["admin", "users"] and len(segments) == 5 \
                    and segments[4].isdigit():
                seen.deleted_users.append(int(segments[4]))
                self._reply(200, json.dumps({"deleted_user": int(segments[4]), "ran": ran}).encode(),
                            [("Content-Type", "application/json")])
            else:
                self._reply(404, b"no such admin action")

        def _payment(self, body: bytes) -> None:
            """A payment, made at most once per Idempotency-Key."""
            key = self.headers.get("Idempotency-Key")
            fingerprint = hashlib.sha256(body).hexdigest()
            json_type = ("Content-Type", "application/json")
            if key is not None:
                with seen.lock:
                    known = seen.keys.get(key)
                    if known is None:
                        seen.keys[key] = (fingerprint, None)
                if known is not None:
                    first_fingerprint, answer = known
                    if first_fingerprint != fingerprint:
                        self._reply(422, b'{"error": "this Idempotency-Key was used with another body"}', [json_type])
                    elif answer is None:
                        self._reply(409, b'{"error": "a request with this Idempotency-Key is in progress"}',
                                    [json_type])
                    else:
                        self._reply(answer[0], answer[1], [json_type, ("Idempotent-Replayed", "true")])
                    return
            with seen.lock:
                payment = {"payment": len(seen.payments) + 1, "request": json.loads(body or b"{}"),
                           "idempotency_key": key}
                seen.payments.append(payment)
                answer = (201, json.dumps(payment).encode())
                if key is not None:
                    seen.keys[key] = (fingerprint, answer)
            self._reply(answer[0], answer[1], [json_type])

        def _bytes(self, n: int, chunked: bool) -> None:
            if chunked:
                self._start_chunked(headers=[("Content-Type", "application/octet-stream")])
            else:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(n))
                self.end_headers()
            left = n
            while left:
                piece = PATTERN[:min(left, len(PATTERN))]
                if chunked:
                    self._chunk(piece)
                else:
                    self.wfile.write(piece)
                left -= len(piece)
            if chunked:
                self._end_chunked()

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class Upstream:
    """The app, on 127.0.0.1 at a free port, optionally behind TLS."""

    def __init__(self, tls: ssl.SSLContext | None = None, port: int = 0, steerable: bool = False) -> None:
        self.seen = Seen()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self.seen, steerable))
        self.server.daemon_threads = True
        # Refused handshakes and clients that hang up are what some tests are about, not noise for stderr.
        self.server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        if tls is not None:
            # Handshake in the handler's thread, not in accept(): one bad client must not block the rest.
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True,
                                                 do_handshake_on_connect=False)
        self.port = int(self.server.server_address[1])
        self.scheme = "https" if tls is not None else "http"
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/api/"

    def start(self) -> Upstream:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class UpstreamProcess:
    """The app in its own process (`python -m tests.support.apps_upstream`), so that its CPU does not
    compete with the test's client; what it saw is read over HTTP."""

    def __init__(self, steerable: bool = False) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.apps_upstream", "--port", str(self.port),
                                      *(["--steerable"] if steerable else [])],
                                     cwd=Path(__file__).resolve().parents[2])
        deadline = time.monotonic() + 15
        while True:
            try:
                self.events()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def events(self) -> list[dict[str, Any]]:
        return self._get("/_events")

    def requests(self) -> list[dict[str, Any]]:
        """Every request the app has received, oldest first."""
        return self._get("/_requests")

    def payments(self) -> list[dict[str, Any]]:
        """Every payment POST /api/payments made, oldest first."""
        return self._get("/_payments")

    def _get(self, path: str) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
            kept: list[dict[str, Any]] = json.load(response)
            return kept

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--steerable", action="store_true",
                        help="honour method overrides, rewritten URLs and forwarded identities")
    args = parser.parse_args()
    Upstream(port=args.port, steerable=args.steerable).server.serve_forever()


if __name__ == "__main__":
    main()
