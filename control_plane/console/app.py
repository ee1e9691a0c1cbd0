"""The console's aiohttp application: its routes, and the guard every request passes.

The guard (`_guard`) lets only the login page and the static assets through without a session.
Every other request must name a live session whose token the token authority accepts *now*; a POST
must also carry that session's CSRF token and come from this origin. What fails gets the login page
(401: no session, or it ended, saying why) or a refusal page (403: the CSRF check, audited), and
nothing is done. Every response, refusals and assets included, carries the security headers
(`render.SECURITY_HEADERS`).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Awaitable, Callable

from aiohttp import web

from onprem.control_plane import __version__
from onprem.control_plane.console import actions, csrf, login, pages
from onprem.control_plane.console.auth import SESSION_COOKIE, SessionEnded, Sessions
from onprem.control_plane.console.context import (
    SESSION,
    STATE,
    ConsoleSettings,
    ConsoleState,
    peer_of,
    refusal,
)
from onprem.control_plane.console.render import Renderer, add_security_headers
from onprem.control_plane.core import ControlPlane
from onprem.tunnel.errors import PermissionDenied, RequestError

#: The largest request body: forms are small; anything larger is refused before it is read.
MAX_BODY = 64 * 1024
#: Requests that need no session.
PUBLIC_PATHS = frozenset({"/login", "/favicon.ico"})
STATIC_PREFIX = "/static/"
#: The header console.js sends with its refreshes.
REFRESH_HEADER = "X-Console-Refresh"
_CONTENT_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml", ".png": "image/png"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def load_static() -> dict[str, tuple[str, bytes]]:
    """The assets shipped in the package, read once (so that serving them reads no file on the loop)."""
    folder = importlib.resources.files("onprem.control_plane.console").joinpath("static")
    assets = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in _CONTENT_TYPES:
            assets[item.name] = (_CONTENT_TYPES[suffix], item.read_bytes())
    return assets


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS or request.path.startswith(STATIC_PREFIX):
        return await handler(request)
    console = request.app[STATE]
    cookie = request.cookies.get(SESSION_COOKIE)
    try:
        session = await console.sessions.authenticate(cookie)
    except SessionEnded as exc:
        response = login.login_page(request, status=401, message=exc.message, next_path=request.path)
        # A page's refresh keeps the cookie, so that the reload it then makes is told why the session ended.
        if cookie is not None and REFRESH_HEADER not in request.headers:
            login.clear_session_cookie(response)
        return response
    except RequestError as exc:
        # The store cannot check the token now: nothing is shown, and the session stays.
        return console.renderer.page("unavailable.html", 503, message=exc.message, version=__version__)
    request[SESSION] = session
    if request.method == "POST":
        form = await request.post()
        given = form.get(csrf.FIELD)
        try:
            csrf.check_form(request, given if isinstance(given, str) else None, session.csrf_token)
        except csrf.CsrfRefused as exc:
            error = PermissionDenied(f"refused: {exc.message}", reason="CSRF_REFUSED")
            route = request.match_info.route.name or request.path
            # Audited like a refused API call (the row names the session's token), and nothing is done.
            with console.cp.observer.observe(method=f"/console/{route}", peer=peer_of(request), kind="admin",
                                             principal=session.principal) as observation:
                observation.outcome = error
            return refusal(request, error)
        request[actions.FORM] = form
    return await handler(request)


async def _headers(_request: web.Request, response: web.StreamResponse) -> None:
    add_security_headers(response)


def make_app(cp: ControlPlane, settings: ConsoleSettings | None = None, sessions: Sessions | None = None) -> web.Application:
    settings = settings or ConsoleSettings()
    app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY)
    app[STATE] = ConsoleState(
        cp=cp, settings=settings,
        sessions=sessions or Sessions(cp, ttl=settings.session_ttl, login_failure_burst=settings.login_failure_burst,
                                      login_refill_seconds=settings.login_refill_seconds),
        renderer=Renderer(), static=load_static())
    app.on_response_prepare.append(_headers)
    r = app.router
    r.add_get("/login", login.show_login, name="ShowLogin")
    r.add_post("/login", login.log_in, name="Login")
    r.add_post("/logout", login.log_out, name="Logout")
    r.add_get("/", pages.fleet_page, name="Fleet")
    r.add_get("/agents", pages.agents_page, name="Agents")
    r.add_get("/activity", pages.activity_page, name="Activity")
    r.add_get("/enroll", pages.enroll_form, name="EnrollForm")
    r.add_post("/enroll", actions.create_enrollment_token, name="CreateEnrollmentToken")
    r.add_get(r"/agents/{agent_id}/{action:drain|revoke}", pages.confirm_page, name="Confirm")
    r.add_post("/agents/{agent_id}/drain", actions.drain_agent, name="DrainAgent")
    r.add_post("/agents/{agent_id}/revoke", actions.revoke_agent, name="RevokeAgent")
    r.add_get("/ca.pem", pages.ca_certificate, name="CaCertificate")
    r.add_get(STATIC_PREFIX + "{name}", pages.static_asset, name="Static")
    r.add_get("/favicon.ico", pages.no_favicon, name="Favicon")
    return app
