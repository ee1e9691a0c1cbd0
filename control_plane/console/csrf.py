"""Cross-site request forgery: no state-changing request is carried out unless it came from our own page.

Three checks, each enough against a forger on another site, all required:
- the session cookie is `SameSite=Strict`, so a browser sends none with a request another site starts;
- every POST carries the session's CSRF token in a hidden field, compared in constant time (a forger
  cannot read it: it is only in our pages, which no other origin can read);
- a browser's `Origin` (and `Sec-Fetch-Site`) must name this very origin, when it sends them.

The login form has no session yet: its token is a random value set at once as a short-lived cookie
and in the form (double submit), so that another site cannot log a victim's browser in with the
forger's own token.
"""

from __future__ import annotations

import hmac
import re
import secrets

from aiohttp import web

#: The field every console form carries.
FIELD = "csrf_token"
#: The login form's double-submit cookie.
LOGIN_COOKIE = "__Host-onprem-console-login"
LOGIN_COOKIE_MAX_AGE = 600
#: What a login token looks like (`new_login_token`); a cookie that does not is replaced.
LOGIN_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


class CsrfRefused(Exception):
    """A state-changing request that may not have come from our page; `message` says which check failed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def same_tokens(given: str | None, expected: str | None) -> bool:
    """Whether both are there and equal, compared in constant time."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def check_origin(request: web.Request) -> None:
    """Refuse a request whose browser says it came from another origin."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"https://{request.host}":
        raise CsrfRefused(f"the request came from another origin ({origin[:100]})")
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise CsrfRefused(f"the request came from another site (Sec-Fetch-Site: {site[:40]})")


def check_form(request: web.Request, form_token: str | None, expected: str | None) -> None:
    """Refuse a POST without the right token (or from another origin)."""
    check_origin(request)
    if not form_token:
        raise CsrfRefused("the form came without its CSRF token; reload the page and try again")
    if not same_tokens(form_token, expected):
        raise CsrfRefused("the form's CSRF token is not this session's; reload the page and try again")


def new_login_token() -> str:
    return secrets.token_urlsafe(32)
