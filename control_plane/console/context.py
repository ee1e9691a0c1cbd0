"""What every console handler shares: the console's state, the request's session, and how pages and
refusals are answered."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from onprem.control_plane import __version__
from onprem.control_plane.console.auth import ConsoleSession, Sessions
from onprem.control_plane.console.render import Renderer
from onprem.control_plane.core import ControlPlane
from onprem.tunnel.errors import Code, RequestError


@dataclass(frozen=True)
class ConsoleSettings:
    """How the console behaves (the listener's own settings are `listener.ConsoleConfig`)."""

    #: How long a login lasts (never longer than its token).
    session_ttl: dt.timedelta = dt.timedelta(hours=8)
    #: Seconds between refreshes of a page's data in the browser.
    refresh_seconds: float = 5.0
    #: What an agent's config names to reach the control plane (host:port); a wildcard host ("0.0.0.0")
    #: is shown as the host the browser reached the console at.
    agent_address: str = "127.0.0.1:8444"
    enroll_address: str = "127.0.0.1:8445"
    #: The control plane's CA certificate (public), offered for agents' configs (set by `listener.Console`).
    ca_pem: bytes = b""
    #: Failed logins an address may make at once; then one every `login_refill_seconds`.
    login_failure_burst: int = 5
    login_refill_seconds: float = 2.0


@dataclass
class ConsoleState:
    cp: ControlPlane
    settings: ConsoleSettings
    sessions: Sessions
    renderer: Renderer
    #: The static assets, read once at start: name -> (content type, bytes).
    static: dict[str, tuple[str, bytes]] = field(default_factory=dict)


STATE = web.AppKey("console", ConsoleState)
SESSION = web.RequestKey("console_session", ConsoleSession)

#: HTTP statuses of the API's refusals.
HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400, Code.UNAUTHENTICATED: 401, Code.PERMISSION_DENIED: 403, Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409, Code.FAILED_PRECONDITION: 409, Code.RESOURCE_EXHAUSTED: 429, Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}


def state(request: web.Request) -> ConsoleState:
    return request.app[STATE]


def session(request: web.Request) -> ConsoleSession:
    return request[SESSION]


def peer_of(request: web.Request) -> str:
    """The caller's address as gRPC writes it ("ipv4:10.0.0.7:51234"), for audit rows and throttling."""
    peername = request.transport.get_extra_info("peername") if request.transport is not None else None
    if not peername:
        return "unknown"
    host, port = str(peername[0]), int(peername[1])
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def status_of(error: RequestError) -> int:
    return HTTP_STATUS.get(error.code, 500)


def page(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    """A page of a logged-in operator: the layout's navigation, its token and its session's CSRF token."""
    s = session(request)
    return state(request).renderer.page(
        template, status, principal=s.principal, csrf_token=s.csrf_token, flash=s.take_flash(),
        path=request.path, version=__version__, refresh=state(request).settings.refresh_seconds, **context)


def see_other(location: str) -> web.Response:
    """Post/redirect/get: after an action, the browser loads `location` (a path of ours)."""
    return web.Response(status=303, headers={"Location": location})


def refusal(request: web.Request, error: RequestError) -> web.Response:
    """The page of a refused request: what the API would have answered, as a page."""
    return page(request, "error.html", status_of(error), error=error, title="Refused")
