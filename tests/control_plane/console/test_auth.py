"""Console sessions: logging in with an operator token, the session cookie, and every way a session ends."""

from __future__ import annotations

import asyncio
import datetime as dt
import re

import pytest

from onprem.control_plane.console.auth import SESSION_COOKIE, SessionEnded, Sessions
from onprem.control_plane.console.context import STATE
from tests.control_plane.console.conftest import Site

PAGES = ["/", "/agents", "/activity", "/enroll", "/agents/agent-1/drain", "/agents/agent-1/revoke", "/ca.pem"]
COOKIE = re.compile(r"__Host-onprem-console=([A-Za-z0-9_-]{43}); HttpOnly; Max-Age=(\d+); Path=/; SameSite=Strict; Secure")


def session_set_cookie(headers: list[str]) -> re.Match[str]:
    [header] = [h for h in headers if h.startswith(SESSION_COOKIE + "=")]
    found = COOKIE.fullmatch(header)
    assert found is not None, header
    return found


async def test_a_login_sets_an_httponly_secure_samesite_strict_cookie_that_expires_with_the_session(site: Site) -> None:
    browser = await site.browser()
    status, _, response = await browser.login(site.admin_token)
    assert status == 303
    assert response.headers["Location"] == "/"
    cookie = session_set_cookie(response.headers.getall("Set-Cookie"))
    assert int(cookie.group(2)) in (8 * 3600 - 1, 8 * 3600)
    assert cookie.group(1) == browser.session_cookie()
    # The cookie is a random id only: the token is nowhere in it.
    assert site.admin_token not in response.headers.getall("Set-Cookie")[0]


async def test_a_login_redirects_to_the_page_asked_for_and_never_to_another_site(site: Site) -> None:
    browser = await site.browser()
    await browser.get("/login")
    _, _, to_activity = await browser.post("/login", {"token": site.admin_token, "next": "/activity"})
    other = await site.browser()
    await other.get("/login")
    _, _, elsewhere = await other.post("/login", {"token": site.admin_token, "next": "//evil.example/"})
    assert to_activity.headers["Location"] == "/activity"
    assert elsewhere.headers["Location"] == "/"


async def test_the_cookie_never_outlives_its_token(site: Site) -> None:
    browser = await site.browser()
    _, _, response = await browser.login(site.token("short", ttl=dt.timedelta(minutes=10)))
    assert int(session_set_cookie(response.headers.getall("Set-Cookie")).group(2)) in (599, 600)


async def test_a_logged_in_browser_sees_its_token_name_role_and_groups(site: Site) -> None:
    browser = await site.browser()
    await browser.login(site.token("ops", "operator", ("plant",)))
    status, page, _ = await browser.get("/")
    assert status == 200
    assert re.search(r'<span id="principal" title="onp_[0-9a-f]{16}">ops · operator · groups: plant</span>', page)


async def test_every_login_makes_a_new_session_id_and_the_old_one_is_refused(site: Site) -> None:
    browser = await site.browser()
    await browser.login(site.admin_token)
    first = browser.session_cookie()
    await browser.login(site.admin_token)
    second = browser.session_cookie()
    assert first is not None and second is not None and first != second
    assert len(site.console.app[STATE].sessions) == 1
    replay = await site.browser()
    replay.session.cookie_jar.update_cookies({SESSION_COOKIE: first})
    status, page, _ = await replay.get("/")
    assert status == 401
    assert "your session ended (logged out, expired or the console restarted); log in again" in page


async def test_a_session_id_the_console_did_not_make_is_refused_and_cleared(site: Site) -> None:
    browser = await site.browser()
    browser.session.cookie_jar.update_cookies({SESSION_COOKIE: "A" * 43})
    status, page, response = await browser.get("/agents")
    assert status == 401
    assert 'id="login-message"' in page
    assert any(h.startswith(f'{SESSION_COOKIE}=""; expires=Thu, 01 Jan 1970 00:00:00 GMT; HttpOnly; Max-Age=0; Path=/; '
                            "SameSite=Strict; Secure") for h in response.headers.getall("Set-Cookie"))


@pytest.mark.parametrize("path", PAGES)
async def test_without_a_session_every_page_is_the_login_form(site: Site, path: str) -> None:
    browser = await site.browser()
    status, page, _ = await browser.get(path)
    assert status == 401
    assert '<form method="post" action="/login"' in page
    assert "Fleet" not in page


@pytest.mark.parametrize("path", ["/enroll", "/agents/agent-1/drain", "/agents/agent-1/revoke", "/logout"])
async def test_without_a_session_no_action_is_carried_out(site: Site, path: str) -> None:
    browser = await site.browser()
    status, _, _ = await browser.post(path, {"group": "plant", "reason": "x"}, csrf="forged")
    assert status == 401
    assert site.store.list_enrollment_tokens() == []


async def test_a_bad_token_is_refused_as_the_api_refuses_it_and_audited(site: Site) -> None:
    browser = await site.browser()
    status, page, _ = await browser.login("onp_0123456789abcdef_" + "x" * 43)
    assert status == 401
    assert "the bearer token is not valid (unknown, revoked or mistyped)" in page
    assert browser.session_cookie() is None
    [row] = await site.audit_rows(lambda r: r.method == "/console/Login")
    assert (row.principal, row.kind, row.outcome) == ("anonymous", "auth", "UNAUTHENTICATED")
    assert row.detail == "BAD_TOKEN: the bearer token is not valid (unknown, revoked or mistyped)"
    assert row.peer is not None and row.peer.startswith("ipv4:127.0.0.1:")


async def test_a_good_login_is_audited_with_the_tokens_name(site: Site) -> None:
    browser = await site.browser()
    await browser.login(site.admin_token)
    [row] = await site.audit_rows(lambda r: r.method == "/console/Login")
    assert (row.principal, row.role, row.outcome, row.detail) == ("root", "admin", "OK", "console session opened")


async def test_logging_out_ends_the_session_for_good(site: Site) -> None:
    browser = await site.browser()
    await browser.login(site.admin_token)
    cookie = browser.session_cookie()
    await browser.get("/")
    status, page, _ = await browser.post("/logout", {})
    assert status == 200
    assert "You are logged out." in page
    assert browser.session_cookie() is None
    replay = await site.browser()
    replay.session.cookie_jar.update_cookies({SESSION_COOKIE: cookie or ""})
    assert (await replay.get("/"))[0] == 401
    [row] = await site.audit_rows(lambda r: r.method == "/console/Logout")
    assert (row.principal, row.outcome, row.detail) == ("root", "OK", "console session closed")


async def test_a_token_revoked_mid_session_is_refused_on_the_next_request(site: Site) -> None:
    token = site.token("ops")
    browser = await site.browser()
    await browser.login(token)
    assert (await browser.get("/"))[0] == 200
    token_id = token.split("_")[1]
    # Revoked in the store, as another process (the CLI, another replica) would.
    site.store.revoke_api_token(token_id, by="the test", reason="leaked")
    status, page, _ = await browser.get("/agents")
    assert status == 401
    assert (f"your session ended: token &#39;ops&#39; (onp_{token_id}) was revoked at " in page
            and "by the test (leaked); ask an admin for a new one" in page)
    assert browser.session_cookie() is None
    # And it stays ended: logging in again with the revoked token is refused too.
    status, page, _ = await browser.login(token)
    assert status == 401
    assert "was revoked at" in page


async def test_a_refresh_of_an_ended_session_keeps_the_cookie_so_that_the_reload_says_why(site: Site) -> None:
    token = site.token("ops")
    browser = await site.browser()
    await browser.login(token)
    site.store.revoke_api_token(token.split("_")[1], by="the test", reason="leaked")
    status, _, response = await browser.get("/agents", headers={"X-Console-Refresh": "1"})
    assert status == 401
    assert not any(h.startswith(SESSION_COOKIE + "=") for h in response.headers.getall("Set-Cookie", []))
    status, page, response = await browser.get("/agents")  # the reload console.js makes
    assert status == 401
    assert "your session ended: token &#39;ops&#39;" in page and "(leaked); ask an admin for a new one" in page
    assert browser.session_cookie() is None


async def test_a_token_that_expires_mid_session_ends_it(site: Site) -> None:
    token = site.token("brief", ttl=dt.timedelta(seconds=2))
    browser = await site.browser()
    await browser.login(token)
    assert (await browser.get("/"))[0] == 200
    cookie = browser.session_cookie()
    await asyncio.sleep(2.1)  # its expiry is a known instant
    # The browser forgets the cookie by itself (its Max-Age was the token's remaining life)...
    assert browser.session_cookie() is None
    # ...and the console refuses it, should it be sent again.
    replay = await site.browser()
    replay.session.cookie_jar.update_cookies({SESSION_COOKIE: cookie or ""})
    status, page, _ = await replay.get("/")
    assert status == 401
    assert "your session ended: token &#39;brief&#39;" in page and " expired at " in page


async def test_a_session_expires_after_its_lifetime(site: Site) -> None:
    now = [dt.datetime(2030, 1, 1, tzinfo=dt.UTC)]
    sessions = Sessions(site.cp, ttl=dt.timedelta(hours=8), clock=lambda: now[0])
    session_id, session = await sessions.login(site.admin_token, "ipv4:127.0.0.1:1")
    assert session.expires_at == now[0] + dt.timedelta(hours=8)
    assert (await sessions.authenticate(session_id)) is session
    now[0] += dt.timedelta(hours=8)
    with pytest.raises(SessionEnded, match="your session expired; log in again"):
        await sessions.authenticate(session_id)
    assert len(sessions) == 0


async def test_the_oldest_session_goes_when_the_table_is_full(site: Site) -> None:
    sessions = Sessions(site.cp, max_sessions=2)
    ids = [(await sessions.login(site.admin_token, "ipv4:127.0.0.1:1"))[0] for _ in range(3)]
    with pytest.raises(SessionEnded):
        await sessions.authenticate(ids[0])
    assert [(await sessions.authenticate(i)).principal.name for i in ids[1:]] == ["root", "root"]


async def test_failed_logins_from_one_address_are_throttled(site: Site) -> None:
    # The console's fixture allows 3 failures at once, then one every 30 s, with at most 8 waiting.
    browser = await site.browser()
    for _ in range(3):
        assert (await browser.login("onp_0123456789abcdef_" + "y" * 43))[0] == 401
    waiting = [asyncio.create_task(browser.login(site.admin_token)) for _ in range(8)]
    try:
        sessions = site.console.app[STATE].sessions
        for _ in range(1000):  # they reach the throttle, where they wait (30 s) for a turn; 10 s at most
            if sessions.logins_waiting == 8:
                break
            await asyncio.sleep(0.01)
        assert sessions.logins_waiting == 8
        status, page, _ = await (await site.browser()).login(site.admin_token)
        assert status == 429
        # The wait is what is left of the refill (30 s less the moments that passed).
        assert re.search(r"too many failed logins from 127\.0\.0\.1; wait (29|30) s and check the token", page)
        assert not any(task.done() for task in waiting)
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def test_a_login_without_its_forms_csrf_token_is_refused(site: Site) -> None:
    browser = await site.browser()
    await browser.get("/login")
    status, page, _ = await browser.post("/login", {"token": site.admin_token}, csrf="")
    assert status == 403
    assert "the form came without its CSRF token" in page
    other = await site.browser()  # a forger's page: no login cookie of ours in this browser
    status, _, _ = await other.post("/login", {"token": site.admin_token}, csrf="made-up")
    assert status == 403
    assert browser.session_cookie() is None and other.session_cookie() is None
