"""Caller headers that could steer an app, and what each one would change.

A profile's `methods` and `path_prefixes` are checked against the request
line, but many frameworks and proxies also act on headers: they run the
method `X-HTTP-Method-Override` names, route by `X-Original-URL`, or believe
`X-Forwarded-For` about who the client is. A caller who could send those
would bypass the profile, so they are refused unless the profile lists them
in `allow_caller_headers`; hop-by-hop headers are refused always, since they
belong to the agent's own connection to the app, not to the caller.

Names are compared in one canonical form: lower case, with `_` folded into
`-`, because CGI, WSGI, PHP and some proxies turn `X_Forwarded_For` into the
same variable as `X-Forwarded-For`. Everything here is pure data: no I/O and
no imports from the rest of the agent, so that the profile parser can use it
to validate `allow_caller_headers` at start-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "CREDENTIALS",
    "METHOD_OVERRIDES",
    "NEVER_FROM_CALLER",
    "URL_REWRITES",
    "canonical",
    "steers",
]

METHOD = "the method the app runs"
PATH = "the path the app routes on"
HOST = "the host the app believes it serves"
CLIENT = "who the app believes the client is"
FORWARDED = "what the app believes about the original request (client, host, scheme or path)"
CREDENTIALS = "who the app acts for (this profile injects its own credentials)"

#: Headers that tell a framework to run another method than the request line's.
METHOD_OVERRIDES = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
#: Headers that tell a framework (IIS, Symfony, nginx auth_request setups) to route by another path.
URL_REWRITES = frozenset({"x-original-url", "x-rewrite-url", "x-original-uri"})

_STEERING: Mapping[str, str] = MappingProxyType({
    **dict.fromkeys(METHOD_OVERRIDES, METHOD),
    **dict.fromkeys(URL_REWRITES, PATH),
    **dict.fromkeys(("host", "x-host", "x-original-host"), HOST),
    "forwarded": FORWARDED,
    # Each is read as "the real client address" by some proxy, CDN or IP-detection snippet (PHP's HTTP_CLIENT_IP).
    **dict.fromkeys(("x-real-ip", "x-client-ip", "client-ip", "true-client-ip", "x-cluster-client-ip",
                     "cf-connecting-ip", "fastly-client-ip", "x-original-forwarded-for"), CLIENT),
})
#: X-Forwarded-For, -Host, -Proto, -Port, -Prefix, -Uri, -Server...: every name that starts so.
_FORWARDED_PREFIX = "x-forwarded"

#: Hop-by-hop headers (RFC 9110 section 7.6.1, plus Proxy-Connection and the h2c upgrade's HTTP2-Settings):
#: they frame or govern the agent's own connection to the app, which its HTTP client owns. Forwarded, they
#: would let a caller smuggle a second request (Transfer-Encoding), take over the connection (Upgrade) or make
#: a proxy in front of the app strip the headers the agent adds (Connection: X-Api-Key). No profile can allow
#: them.
NEVER_FROM_CALLER = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "http2-settings",
})

#: Headers that carry a caller's own credentials: refused (unless allowed) on a profile that injects its own,
#: since the site chose whom the app serves those calls as.
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie"})


def canonical(name: str) -> str:
    """The form names are compared in: lower case, `_` folded into `-`."""
    return name.lower().replace("_", "-")


def steers(name: str, *, injects_credentials: bool) -> str | None:
    """What a caller header (in canonical form) would change upstream, or None when it changes none of that.

    Hop-by-hop headers are not covered: see `NEVER_FROM_CALLER`.
    """
    what = _STEERING.get(name)
    if what is not None:
        return what
    if name.startswith(_FORWARDED_PREFIX):
        return FORWARDED
    if injects_credentials and name in _CREDENTIAL_HEADERS:
        return CREDENTIALS
    return None
