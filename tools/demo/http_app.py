"""A small on-prem HTTP application for the demo's `demo-app` profile.

It stands in for an internal REST API: it answers only requests carrying the
API key that the agent injects from its environment, so the demo shows that
the caller never needs, or sees, the credential.

    python -m tools.demo.http_app --port 8480 --api-key-env DEMO_APP_KEY
"""

from __future__ import annotations

import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ORDERS = [
    {"id": 1, "customer": "Acme GmbH", "total": "1299.00", "status": "shipped"},
    {"id": 2, "customer": "Globex Ltd", "total": "87.50", "status": "open"},
    {"id": 3, "customer": "Initech", "total": "410.20", "status": "open"},
]


class DemoHandler(BaseHTTPRequestHandler):
    server_version = "demo-app/1.0"
    api_key = ""

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body, indent=2).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.headers.get("X-Api-Key") == self.api_key:
            return True
        self._send(401, {"error": "missing or wrong X-Api-Key"})
        return False

    def do_GET(self) -> None:
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0]
        if path in ("/api/status", "/api/status/"):
            self._send(200, {"status": "ok", "app": "demo-app"})
        elif path == "/api/orders":
            self._send(200, ORDERS)
        elif path.startswith("/api/orders/") and path.rsplit("/", 1)[1].isdigit():
            order = next((o for o in ORDERS if o["id"] == int(path.rsplit("/", 1)[1])), None)
            self._send(200 if order else 404, order or {"error": "no such order"})
        else:
            self._send(404, {"error": f"no route for {path}"})

    def do_POST(self) -> None:
        if not self._authorized():
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self._send(200, {"received_bytes": len(body), "echo": body.decode(errors="replace")[:1000]})

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8480)
    parser.add_argument("--api-key-env", default="DEMO_APP_KEY")
    args = parser.parse_args()
    DemoHandler.api_key = os.environ[args.api_key_env]
    server = ThreadingHTTPServer(("127.0.0.1", args.port), DemoHandler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
