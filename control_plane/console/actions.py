"""The admin actions (POST): create an enrollment token, drain an agent, revoke an agent.

Each comes from a confirmation form carrying the session's CSRF token (checked before any handler
runs, `app`), and runs through `fleet` inside an observation of its own, as an API call runs inside
the guard's: it leaves the same audit row as its RPC (who, group, agent, outcome, detail), with the
console's method name ("/console/DrainAgent") so that a reader knows where it came from. A refused
action (not an admin, another group's agent, an agent not connected) leaves its refusal's row and
shows what the API would have answered.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.web_request import FileField
from multidict import MultiDictProxy

from onprem.control_plane import fleet
from onprem.control_plane.console.context import page, peer_of, refusal, see_other, session, state
from onprem.control_plane.console.pages import AGENT_ID
from onprem.control_plane.observe import Observation
from onprem.tunnel.errors import InvalidArgument, RequestError

FORM: web.RequestKey[MultiDictProxy[str | bytes | bytearray | FileField]] = web.RequestKey("console_form")
ENROLL_METHOD = "/console/CreateEnrollmentToken"
DRAIN_METHOD = "/console/DrainAgent"
REVOKE_METHOD = "/console/RevokeAgent"


def form(request: web.Request) -> MultiDictProxy[str | bytes | bytearray | FileField]:
    return request[FORM]


def _text(request: web.Request, name: str, limit: int) -> str:
    value = form(request).get(name, "")
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidArgument(f"'{name}' must be at most {limit} characters", reason="INVALID_FORM", field=name)
    return value.strip()


def _number(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = _text(request, name, 20) or str(default)
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise InvalidArgument(f"'{name}' must be a whole number from {low} to {high}", reason="INVALID_FORM",
                              field=name)
    return value


async def _observed(request: web.Request, method: str,
                    act: Callable[[Observation], Awaitable[web.Response]]) -> web.Response:
    s = session(request)
    try:
        with state(request).cp.observer.observe(method=method, peer=peer_of(request), kind="admin",
                                                principal=s.principal) as observation:
            return await act(observation)
    except RequestError as exc:
        return refusal(request, exc)


async def create_enrollment_token(request: web.Request) -> web.Response:
    s = session(request)
    cp = state(request).cp
    settings = state(request).settings

    async def act(_observation: Observation) -> web.Response:
        group = _text(request, "group", 63)
        hours = _number(request, "ttl_hours", 1, 1, int(fleet.MAX_TOKEN_TTL / dt.timedelta(hours=1)))
        description = _text(request, "description", fleet.MAX_DESCRIPTION)
        token, row = await fleet.create_enrollment_token(cp, s.principal, group, dt.timedelta(hours=hours),
                                                         description)
        host = request.url.host or "127.0.0.1"
        # The token is shown once, on this response (never cached: no-store), and never again.
        return page(request, "enrolled.html", title="Enrollment token", token=token, row=row,
                    agent_address=_address(settings.agent_address, host),
                    enroll_address=_address(settings.enroll_address, host))

    return await _observed(request, ENROLL_METHOD, act)


def _address(address: str, host: str) -> str:
    """`address` with a wildcard host replaced by the host the browser reached us at."""
    listen_host, _, port = address.rpartition(":")
    if listen_host in ("0.0.0.0", "[::]", "::", ""):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return address


def _agent_id(request: web.Request) -> str:
    agent_id = request.match_info["agent_id"]
    if AGENT_ID.fullmatch(agent_id) is None:
        raise InvalidArgument("that is not an agent id", reason="INVALID_AGENT_ID")
    return agent_id


async def drain_agent(request: web.Request) -> web.Response:
    s = session(request)
    cp = state(request).cp

    async def act(_observation: Observation) -> web.Response:
        agent_id = _agent_id(request)
        reason = _text(request, "reason", 500)
        grace = _number(request, "grace_seconds", int(fleet.DEFAULT_DRAIN_GRACE.total_seconds()), 0,
                        int(fleet.MAX_DRAIN_GRACE.total_seconds()))
        agent = await fleet.drain_agent(cp, s.principal, agent_id, reason=reason or f"drained by {s.principal.name} "
                                        "from the console", grace=dt.timedelta(seconds=grace))
        s.flash = f"Agent {agent.name} ({agent.agent_id}) is draining: it finishes its requests within {grace} s, then stops."
        return see_other(f"/agents?{urllib.parse.urlencode({'group': agent.group})}")

    return await _observed(request, DRAIN_METHOD, act)


async def revoke_agent(request: web.Request) -> web.Response:
    s = session(request)
    cp = state(request).cp

    async def act(_observation: Observation) -> web.Response:
        agent_id = _agent_id(request)
        reason = _text(request, "reason", 500)
        agent = await fleet.revoke_agent(cp, s.principal, agent_id,
                                         reason=reason or f"revoked by {s.principal.name} from the console")
        s.flash = f"Agent {agent.name} ({agent.agent_id}) is revoked: its stream was cut and it can never connect again."
        return see_other(f"/agents?{urllib.parse.urlencode({'group': agent.group})}")

    return await _observed(request, REVOKE_METHOD, act)
