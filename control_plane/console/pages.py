"""The console's pages (GET): the fleet, the agents, the activity, and the forms of the admin actions.

Reading pages change nothing and leave no audit row, as the API's reads leave none.
"""

from __future__ import annotations

import datetime as dt
import re

from aiohttp import web

from onprem.control_plane import fleet
from onprem.control_plane.console import views
from onprem.control_plane.console.context import page, refusal, session, state
from onprem.control_plane.store import api_token_id
from onprem.tunnel.errors import InvalidArgument, RequestError

#: What an agent id looks like (the control plane makes them); anything else is no agent's.
AGENT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
#: A token id as a filter: its 16 hex digits, with or without the "onp_" of its name.
TOKEN_ID = re.compile(r"(?:onp_)?([0-9a-f]{16})")


def _group_filter(request: web.Request) -> str | None:
    return request.query.get("group") or None


async def fleet_page(request: web.Request) -> web.Response:
    s = session(request)
    try:
        found = await views.load_fleet(state(request).cp, s.principal)
    except RequestError as exc:
        return refusal(request, exc)
    return page(request, "fleet.html", fleet=found, title="Fleet", refreshing=True)


async def agents_page(request: web.Request) -> web.Response:
    s = session(request)
    group = _group_filter(request)
    try:
        found = await views.load_fleet(state(request).cp, s.principal, group)
        groups = [g.name for g in await fleet.list_groups(state(request).cp, s.principal)]
    except RequestError as exc:
        return refusal(request, exc)
    return page(request, "agents.html", fleet=found, group=group or "", groups=groups, title="Agents",
                refreshing=True)


async def activity_page(request: web.Request) -> web.Response:
    s = session(request)
    group = _group_filter(request)
    token = request.query.get("token", "").strip()
    outcome = request.query.get("outcome") or None
    try:
        token_id = None
        if token:
            match = TOKEN_ID.fullmatch(token)
            token_id = match.group(1) if match else api_token_id(token)
            if token_id is None:
                raise InvalidArgument("the token filter takes a token's id (onp_ and 16 hex digits)",
                                      reason="INVALID_TOKEN_FILTER")
        if outcome is not None and outcome not in views.OUTCOMES:
            raise InvalidArgument("the outcome filter takes a status name such as OK or PERMISSION_DENIED",
                                  reason="INVALID_OUTCOME_FILTER")
        activity = await views.load_activity(state(request).cp, s.principal, group=group, token_id=token_id,
                                             outcome=outcome)
    except RequestError as exc:
        return refusal(request, exc)
    return page(request, "activity.html", activity=activity, group=group or "", token=token, outcome=outcome or "",
                outcomes=views.OUTCOMES, title="Activity", refreshing=True)


async def enroll_form(request: web.Request) -> web.Response:
    s = session(request)
    cp = state(request).cp
    try:
        cp.require_admin(s.principal)
        groups = [g.name for g in await fleet.list_groups(cp, s.principal)]
    except RequestError as exc:
        return refusal(request, exc)
    return page(request, "enroll.html", groups=groups, title="Enroll an agent",
                max_hours=int(fleet.MAX_TOKEN_TTL / dt.timedelta(hours=1)))


async def confirm_page(request: web.Request) -> web.Response:
    """The confirmation of a drain or a revocation: which agent, what it will do, and the form."""
    s = session(request)
    action = request.match_info["action"]
    agent_id = request.match_info["agent_id"]
    cp = state(request).cp
    try:
        cp.require_admin(s.principal)
        if AGENT_ID.fullmatch(agent_id) is None:
            raise InvalidArgument("that is not an agent id", reason="INVALID_AGENT_ID")
        agent = views.agent_view(await fleet.get_agent(cp, s.principal, agent_id), cp.settings.agent_cert_validity,
                                 dt.datetime.now(dt.UTC))
    except RequestError as exc:
        return refusal(request, exc)
    return page(request, f"confirm_{action}.html", agent=agent, title=f"{action.capitalize()} {agent.name}",
                max_grace=int(fleet.MAX_DRAIN_GRACE.total_seconds()),
                default_grace=int(fleet.DEFAULT_DRAIN_GRACE.total_seconds()))


async def ca_certificate(request: web.Request) -> web.Response:
    """The control plane's CA certificate (public), for agents' `ca_file`."""
    return web.Response(body=state(request).settings.ca_pem, content_type="application/x-pem-file",
                        headers={"Content-Disposition": 'attachment; filename="ca.pem"'})


async def static_asset(request: web.Request) -> web.Response:
    found = state(request).static.get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    content_type, body = found
    # Versioned URLs (?v=<version>): a browser may keep them for a day.
    charset = "utf-8" if content_type.startswith("text/") else None
    return web.Response(body=body, content_type=content_type, charset=charset,
                        headers={"Cache-Control": "private, max-age=86400"})


async def no_favicon(_request: web.Request) -> web.Response:
    """Pages name their icon (/static/favicon.svg); this old default path is not a page to log in to."""
    raise web.HTTPNotFound()
