"""Console sessions: a login with an operator token, then a server-side session named by a cookie.

- The cookie holds only a random session id (256 bits), never the token. The server keeps the
  sessions in memory, keyed by the id's SHA-256, each with the operator token it was opened with,
  so that every request is authenticated again through the token authority (`credentials`), the
  path every gRPC call takes: a revoked or expired token, by whichever process, ends the session on
  its next request, and the principal (role, groups) is the API's own.
- A login always makes a new session id (no session fixation: an id the browser already had is
  dropped, and ids the server did not make are never accepted).
- Sessions expire after `ttl`, and never outlive their token. Logging out drops the session.
- Failed logins are throttled per address like enrollments (`throttle.AttemptThrottle`: a few at
  once, then one every few seconds) and each leaves an audit row, as a refused API call does.
- Sessions live in this process: behind a load balancer, a browser must keep reaching the same
  replica (or log in again). At most `max_sessions` are kept; past that the oldest goes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from onprem.control_plane.auth import AUTHORIZATION_KEY, Principal
from onprem.control_plane.core import ControlPlane
from onprem.control_plane.throttle import AttemptThrottle, KeyedBuckets, Throttled, peer_key
from onprem.tunnel.errors import RequestError, ResourceExhausted, Unauthenticated

#: The session cookie. `__Host-`: the browser accepts it only with Secure, Path=/ and no Domain, so
#: that no other host (a sibling subdomain) can set or shadow it.
SESSION_COOKIE = "__Host-onprem-console"
#: Audit methods of the console's own events (the gRPC ones are "/onprem.v1.<Service>/<Method>").
LOGIN_METHOD = "/console/Login"
LOGOUT_METHOD = "/console/Logout"
#: The longest token a login form may carry (real ones are about 70 characters).
MAX_TOKEN_LENGTH = 512
#: How long the console remembers why a session ended, for the browser's next request with its cookie
#: (a page's refresh learns it ended; the reload that follows shows why).
ENDED_KEPT = dt.timedelta(minutes=10)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()


@dataclass(eq=False)
class ConsoleSession:
    """One logged-in browser."""

    #: The operator token, kept in memory only, to authenticate every request as an API call.
    token: str
    principal: Principal
    created_at: dt.datetime
    expires_at: dt.datetime
    #: The CSRF token of this session's forms (`csrf`).
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    #: A message for the next page shown (the outcome of an action), shown once.
    flash: str = ""

    def take_flash(self) -> str:
        message, self.flash = self.flash, ""
        return message


class SessionEnded(Exception):
    """The request's session is gone; `message` says why, for the login page."""

    def __init__(self, message: str, error: RequestError | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error = error


class Sessions:
    """The console's sessions, and the login that opens them."""

    def __init__(self, cp: ControlPlane, *, ttl: dt.timedelta = dt.timedelta(hours=8), max_sessions: int = 10_000,
                 login_failure_burst: int = 5, login_refill_seconds: float = 2.0,
                 clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self._cp = cp
        self.ttl = ttl
        self._max = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[bytes, ConsoleSession] = OrderedDict()
        #: Why recently ended sessions ended, and when (bounded like the sessions).
        self._ended: OrderedDict[bytes, tuple[str, dt.datetime]] = OrderedDict()
        self._throttle = AttemptThrottle(KeyedBuckets(
            burst=login_failure_burst, refill_seconds=login_refill_seconds,
            max_keys=cp.settings.throttle_max_addresses), max_waiting=8)

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def logins_waiting(self) -> int:
        """Logins held back by the throttle now."""
        return self._throttle.waiting

    async def login(self, token: str, peer: str, old_session_id: str | None = None) -> tuple[str, ConsoleSession]:
        """Open a session for `token`; returns its new id. Raises Unauthenticated (the API's own refusal,
        audited) or ResourceExhausted (too many failures from this address)."""
        if old_session_id:
            self.end(old_session_id)
        key = peer_key(peer)
        with self._cp.observer.observe(method=LOGIN_METHOD, peer=peer, kind="auth") as observation:
            try:
                await self._throttle.admit(key)
            except Throttled as exc:
                raise ResourceExhausted(
                    f"too many failed logins from {exc.key}; wait {exc.retry_after:.0f} s and check the token",
                    reason="LOGIN_THROTTLED") from None
            token = token.strip()
            if not token or len(token) > MAX_TOKEN_LENGTH:
                raise Unauthenticated("paste an operator token (onp_…) to log in", reason="MISSING_TOKEN")
            principal = await self._cp.tokens.authenticate([(AUTHORIZATION_KEY, f"Bearer {token}")])
            observation.principal = principal
            observation.record("console session opened")
        self._throttle.succeeded(key)
        now = self._clock()
        expires = now + self.ttl
        if principal.expires_at is not None:
            expires = min(expires, principal.expires_at)
        session_id = secrets.token_urlsafe(32)
        session = ConsoleSession(token=token, principal=principal, created_at=now, expires_at=expires)
        self._prune(now)
        while len(self._sessions) >= self._max:
            self._sessions.popitem(last=False)
        self._sessions[_key(session_id)] = session
        return session_id, session

    async def authenticate(self, session_id: str | None) -> ConsoleSession:
        """The live session named by the cookie, its token checked again; raises SessionEnded."""
        if not session_id:
            raise SessionEnded("")
        key = _key(session_id)
        session = self._sessions.get(key)
        now = self._clock()
        if session is None:
            ended = self._ended.get(key)
            if ended is not None and now - ended[1] < ENDED_KEPT:
                raise SessionEnded(ended[0])
            raise SessionEnded("your session ended (logged out, expired or the console restarted); log in again")
        token_expired = session.principal.expires_at is not None and now >= session.principal.expires_at
        if now >= session.expires_at and not token_expired:
            self._end(key, "your session expired; log in again", now)
            raise SessionEnded("your session expired; log in again")
        # (A session that ended with its token's expiry is refused below, in the token authority's words.)
        try:
            principal = await self._cp.tokens.authenticate([(AUTHORIZATION_KEY, f"Bearer {session.token}")])
        except RequestError as exc:
            if exc.reason == "STORE_UNAVAILABLE":
                raise  # the token may be fine: keep the session, say the control plane cannot check it now
            message = f"your session ended: {exc.message}"
            self._end(key, message, now)
            raise SessionEnded(message, exc) from None
        session.principal = principal
        return session

    def end(self, session_id: str) -> ConsoleSession | None:
        """Log out: the session is gone, whatever its cookie says."""
        return self._sessions.pop(_key(session_id), None)

    def _end(self, key: bytes, why: str, now: dt.datetime) -> None:
        self._sessions.pop(key, None)
        while len(self._ended) >= self._max:
            self._ended.popitem(last=False)
        self._ended[key] = (why, now)

    def _prune(self, now: dt.datetime) -> None:
        for key in [k for k, (_why, at) in self._ended.items() if now - at >= ENDED_KEPT]:
            del self._ended[key]
        for key in [k for k, s in self._sessions.items() if now >= s.expires_at]:
            del self._sessions[key]

    def cookie_max_age(self, session: ConsoleSession) -> int:
        return max(0, int((session.expires_at - self._clock()).total_seconds()))
