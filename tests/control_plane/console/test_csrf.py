"""No state-changing request is carried out unless it came from the console's own page."""

from __future__ import annotations

import pytest

from onprem.control_plane.console.csrf import same_tokens
from tests.control_plane.console.conftest import Browser, Site, add_agent

ACTIONS = {
    "/enroll": {"group": "plant", "ttl_hours": "1"},
    "/agents/agent-1/drain": {"grace_seconds": "5", "reason": "forged"},
    "/agents/agent-1/revoke": {"reason": "forged"},
    "/logout": {},
}
ROUTES = {"/enroll": "CreateEnrollmentToken", "/agents/agent-1/drain": "DrainAgent",
          "/agents/agent-1/revoke": "RevokeAgent", "/logout": "Logout"}


async def nothing_was_done(site: Site) -> None:
    assert site.store.list_enrollment_tokens() == []
    agent = site.store.get_agent("agent-1")
    assert agent is not None and not agent.revoked
    assert site.store.drains_for(["agent-1"]) == []


@pytest.fixture
async def logged_in(site: Site) -> Browser:
    add_agent(site, "agent-1", "plant")
    browser = await site.browser()
    await browser.login(site.admin_token)
    await browser.get("/")  # a page of ours: its CSRF token is the session's
    return browser


@pytest.mark.parametrize("path", list(ACTIONS))
async def test_a_post_without_the_csrf_token_is_refused_and_nothing_is_done(site: Site, logged_in: Browser, path: str) -> None:
    status, page, _ = await logged_in.post(path, ACTIONS[path], csrf="")
    assert status == 403
    assert "refused: the form came without its CSRF token; reload the page and try again" in page
    await nothing_was_done(site)
    assert (await logged_in.get("/"))[0] == 200  # not even logged out


@pytest.mark.parametrize("path", list(ACTIONS))
async def test_a_post_with_a_wrong_csrf_token_is_refused_and_nothing_is_done(site: Site, logged_in: Browser, path: str) -> None:
    status, page, _ = await logged_in.post(path, ACTIONS[path], csrf=logged_in.csrf[:-1] + "x")
    assert status == 403
    assert "refused: the form&#39;s CSRF token is not this session&#39;s; reload the page and try again" in page
    await nothing_was_done(site)


async def test_the_csrf_token_of_another_session_is_refused(site: Site, logged_in: Browser) -> None:
    other = await site.browser()
    await other.login(site.admin_token)
    await other.get("/")
    assert other.csrf != logged_in.csrf
    status, _, _ = await logged_in.post("/agents/agent-1/revoke", {"reason": "x"}, csrf=other.csrf)
    assert status == 403
    await nothing_was_done(site)


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1"])
async def test_a_post_from_another_origin_is_refused_even_with_the_right_token(site: Site, logged_in: Browser, origin: str) -> None:
    status, page, _ = await logged_in.post("/agents/agent-1/revoke", {"reason": "x"}, origin=origin)
    assert status == 403
    assert f"refused: the request came from another origin ({origin})" in page
    await nothing_was_done(site)


async def test_a_post_a_browser_marks_cross_site_is_refused(site: Site, logged_in: Browser) -> None:
    status, page, _ = await logged_in.post("/enroll", ACTIONS["/enroll"], origin=None,
                                           headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    assert "refused: the request came from another site (Sec-Fetch-Site: cross-site)" in page
    await nothing_was_done(site)


async def test_a_refused_post_is_audited_with_the_sessions_token(site: Site, logged_in: Browser) -> None:
    await logged_in.post("/agents/agent-1/revoke", {"reason": "x"}, csrf="")
    [row] = await site.audit_rows(lambda r: r.method == "/console/RevokeAgent")
    assert (row.principal, row.kind, row.outcome) == ("root", "admin", "PERMISSION_DENIED")
    assert row.detail == ("CSRF_REFUSED: refused: the form came without its CSRF token; reload the page and try "
                          "again")


@pytest.mark.parametrize("path", list(ROUTES))
async def test_each_action_names_its_route_in_a_refusals_row(site: Site, logged_in: Browser, path: str) -> None:
    await logged_in.post(path, ACTIONS[path], csrf="")
    rows = await site.audit_rows(lambda r: r.method == f"/console/{ROUTES[path]}")
    assert [r.outcome for r in rows] == ["PERMISSION_DENIED"]


def test_tokens_are_the_same_only_when_both_are_there_and_equal() -> None:
    assert same_tokens("abc", "abc")
    assert not same_tokens("abc", "abd")
    assert not same_tokens("", "")
    assert not same_tokens(None, "abc")
    assert not same_tokens("abc", None)
    assert not same_tokens("abc", "abcd")
