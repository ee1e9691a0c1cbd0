"""Pages from Jinja templates, with every value escaped; what each response carries for the browser.

Autoescaping is on for every template, and nothing the console renders is ever marked safe or
compiled as a template: a value is text, whatever it holds (`<script>`, `{{7*7}}`, quotes that
would end an attribute). Every value printed also goes through `shown` (the environment's
`finalize`), which makes control characters visible (as Unicode's control pictures, e.g. a carriage
return as U+240D): an agent's name with a line break or an escape sequence is shown as such instead
of hiding it, and the HTML parser cannot fold it away. Values
from agents sit in elements that isolate their direction (`unicode-bidi: isolate` in the CSS), so
that a right-to-left override inside one cannot reorder the text around it.

Every response carries a Content-Security-Policy that allows scripts, styles and images from the
console itself only (no inline script or style, no eval), no framing, no plugins, forms posting only
to the console; and nosniff, no referrer to other sites, no caching of authenticated pages.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import jinja2
import markupsafe
from aiohttp import web

#: What every response is sent with.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Not "no-referrer": with it, browsers send `Origin: null` on our own form posts, which the CSRF check
    # must then refuse. "same-origin" sends nothing to other sites.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}

# C0 controls and DEL as control pictures (U+2400..U+2421); C1 controls have none, so U+FFFD.
_CONTROLS = {code: chr(0x2400 + code) for code in range(0x20)} | {0x7F: "\u2421"}
_CONTROLS |= {code: "\ufffd" for code in range(0x80, 0xA0)}


def shown(value: object) -> str:
    """A value as the console shows it: text with control characters made visible."""
    return str(value).translate(_CONTROLS)


def _finalize(value: object) -> object:
    # Our own markup (macros, `Markup`) passes as it is; any other text is shown, then escaped.
    if isinstance(value, str) and not isinstance(value, markupsafe.Markup):
        return shown(value)
    return value


def ago(value: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """How long ago, in words a person reads at a glance ("12 s ago", "3 min ago", "2 h ago")."""
    if value is None:
        return "never"
    now = now or dt.datetime.now(dt.UTC)
    return f"{span(now - value)} ago" if value <= now else f"in {span(value - now)}"


def span(delta: dt.timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{seconds // 60} min"
    if seconds < 48 * 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def when(value: dt.datetime | None) -> str:
    """A time in UTC, to the second."""
    return "never" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("onprem.control_plane.console", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_finalize,
        # Templates are read once (`Renderer` loads them all at start): no file is read on the event loop.
        auto_reload=False,
    )
    env.filters.update(ago=ago, span=span, when=when)
    return env


class Renderer:
    def __init__(self, **globals_: Any) -> None:
        self._env = environment()
        self._env.globals.update(globals_)
        for name in self._env.list_templates():
            self._env.get_template(name)

    def page(self, template: str, status: int = 200, **context: Any) -> web.Response:
        body = self._env.get_template(template).render(**context)
        return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


def add_security_headers(response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if "Cache-Control" not in response.headers:
        # Pages show tokens, agents and audit rows: no copy in any cache. Static assets set their own.
        response.headers["Cache-Control"] = "no-store"
