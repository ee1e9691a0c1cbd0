"""The login page, logging in and out."""

from __future__ import annotations

from aiohttp import web

from onprem.control_plane import __version__
from onprem.control_plane.console import csrf
from onprem.control_plane.console.auth import LOGOUT_METHOD, SESSION_COOKIE, ConsoleSession
from onprem.control_plane.console.context import peer_of, see_other, session, state, status_of
from onprem.tunnel.errors import RequestError

#: Where a login may return to: the console's own pages, never another site.
RETURN_PATHS = frozenset({"/", "/agents", "/activity", "/enroll"})


def set_session_cookie(response: web.StreamResponse, session_id: str, max_age: int) -> None:
    # HttpOnly: no script reads it; Secure: never over plain HTTP; SameSite=Strict: no other site's
    # request carries it. aiohttp writes the attributes in this order (asserted by the tests).
    response.set_cookie(SESSION_COOKIE, session_id, max_age=max_age, path="/", secure=True, httponly=True,
                        samesite="Strict")


def clear_session_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="Strict")


def login_page(request: web.Request, *, status: int = 200, message: str = "", next_path: str = "/") -> web.Response:
    """The login form, with a double-submit CSRF token in the form and its cookie.

    A browser that has the cookie already keeps its value: a page and its favicon (or two tabs) loaded
    together must not leave the form holding a token its cookie no longer has."""
    token = request.cookies.get(csrf.LOGIN_COOKIE) or ""
    if not csrf.LOGIN_TOKEN.fullmatch(token):
        token = csrf.new_login_token()
    response = state(request).renderer.page(
        "login.html", status, csrf_token=token, message=message, next_path=safe_return(next_path),
        version=__version__)
    response.set_cookie(csrf.LOGIN_COOKIE, token, max_age=csrf.LOGIN_COOKIE_MAX_AGE, path="/", secure=True,
                        httponly=True, samesite="Strict")
    return response


def safe_return(path: str | None) -> str:
    return path if path in RETURN_PATHS else "/"


async def show_login(request: web.Request) -> web.Response:
    return login_page(request, next_path=request.query.get("next", "/"))


async def log_in(request: web.Request) -> web.Response:
    form = await request.post()
    next_path = safe_return(str(form.get("next", "/")))
    try:
        csrf.check_form(request, str(form.get(csrf.FIELD, "")), request.cookies.get(csrf.LOGIN_COOKIE))
    except csrf.CsrfRefused as exc:
        return login_page(request, status=403, message=f"Refused: {exc.message}", next_path=next_path)
    sessions = state(request).sessions
    try:
        session_id, opened = await sessions.login(str(form.get("token", "")), peer_of(request),
                                                  request.cookies.get(SESSION_COOKIE))
    except RequestError as exc:
        return login_page(request, status=status_of(exc), message=exc.message, next_path=next_path)
    response = see_other(next_path)
    set_session_cookie(response, session_id, sessions.cookie_max_age(opened))
    response.del_cookie(csrf.LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    return response


async def log_out(request: web.Request) -> web.Response:
    ended: ConsoleSession = session(request)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        state(request).sessions.end(cookie)
    with state(request).cp.observer.observe(method=LOGOUT_METHOD, peer=peer_of(request), kind="auth",
                                            principal=ended.principal) as observation:
        observation.record("console session closed")
    response = login_page(request, message="You are logged out.")
    clear_session_cookie(response)
    return response
