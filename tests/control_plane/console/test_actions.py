"""The admin actions: each confirmed, scoped like the API, refused with the API's words, and audited."""

from __future__ import annotations

import re

from onprem.control_plane.store import AuditEntry
from tests.control_plane.console.conftest import Browser, Site, add_agent


async def logged_in(site: Site, token: str) -> Browser:
    browser = await site.browser()
    await browser.login(token)
    await browser.get("/")
    return browser


def console_rows(method: str) -> object:
    return lambda r: isinstance(r, AuditEntry) and r.method == f"/console/{method}"


async def test_an_admin_creates_an_enrollment_token_shown_once_with_the_command_to_paste(site: Site) -> None:
    browser = await logged_in(site, site.admin_token)
    status, page, response = await browser.post("/enroll", {"group": "plant-a", "ttl_hours": "2",
                                                            "description": "new host"})
    assert status == 200
    assert response.headers["Cache-Control"] == "no-store"
    [token] = re.findall(r'<code id="enrollment-token">(onpe_[0-9a-f]{16}_[A-Za-z0-9_-]+)</code>', page)
    assert f'<pre id="enroll-command">onprem-agent enroll --config agent.yaml --token {token}</pre>' in page
    assert "  address: 127.0.0.1:8444\n  enroll_address: 127.0.0.1:8445\n  ca_file: ca.pem\n" in page
    [row] = site.store.list_enrollment_tokens()
    assert (row.group_name, row.description, row.created_by) == ("plant-a", "new host",
                                                                 f"'root' (onp_{site.admin_token.split('_')[1]})")
    assert site.store.check_enrollment_token(token).token_id == row.token_id
    [audit] = await site.audit_rows(lambda r: r.method == "/console/CreateEnrollmentToken")
    assert (audit.principal, audit.kind, audit.group_name, audit.outcome, audit.detail) == (
        "root", "admin", "plant-a", "OK", f"token {row.token_id}")
    # Shown once: no page of the console shows it again.
    for path in ("/", "/agents", "/activity", "/enroll"):
        assert token not in (await browser.get(path))[1]


async def test_the_ca_certificate_is_offered_for_the_agents_config(site: Site) -> None:
    browser = await logged_in(site, site.admin_token)
    _, body, response = await browser.get("/ca.pem")
    assert body.encode() == site.ca_pem
    assert response.headers["Content-Disposition"] == 'attachment; filename="ca.pem"'


async def test_an_operator_token_may_not_create_enrollment_tokens(site: Site) -> None:
    browser = await logged_in(site, site.token("ops", "operator", ("plant",)))
    status, page, _ = await browser.get("/enroll")
    assert status == 403
    assert "token &#39;ops&#39;" in page and "is not an admin token; ask an admin to do this" in page
    status, page, _ = await browser.post("/enroll", {"group": "plant", "ttl_hours": "1"})
    assert status == 403
    assert '<code id="error-reason">ADMIN_REQUIRED</code>' in page
    assert site.store.list_enrollment_tokens() == []
    [audit] = await site.audit_rows(lambda r: r.method == "/console/CreateEnrollmentToken")
    assert (audit.principal, audit.outcome) == ("ops", "PERMISSION_DENIED")
    assert audit.detail.startswith("ADMIN_REQUIRED: token 'ops'")


async def test_an_admin_of_one_group_may_not_enroll_into_another(site: Site) -> None:
    browser = await logged_in(site, site.token("a-admin", "admin", ("plant-a",)))
    status, page, _ = await browser.post("/enroll", {"group": "plant-b", "ttl_hours": "1"})
    assert status == 403
    assert "may not use group &#39;plant-b&#39; (its groups: plant-a)" in page
    assert site.store.list_enrollment_tokens() == []


async def test_bad_enrollment_input_gets_the_apis_invalid_argument(site: Site) -> None:
    browser = await logged_in(site, site.admin_token)
    status, page, _ = await browser.post("/enroll", {"group": "no spaces", "ttl_hours": "1"})
    assert (status, '<code id="error-reason">INVALID_GROUP</code>' in page) == (400, True)
    status, page, _ = await browser.post("/enroll", {"group": "plant", "ttl_hours": "169"})
    assert status == 400
    assert "&#39;ttl_hours&#39; must be a whole number from 1 to 168" in page
    assert site.store.list_enrollment_tokens() == []


async def test_an_admin_of_group_a_cannot_drain_an_agent_of_group_b(site: Site) -> None:
    add_agent(site, "agent-b", "plant-b")
    browser = await logged_in(site, site.token("a-admin", "admin", ("plant-a",)))
    status, page, _ = await browser.get("/agents/agent-b/drain")
    assert status == 404
    status, page, _ = await browser.post("/agents/agent-b/drain", {"grace_seconds": "5", "reason": "mine now"})
    # Exactly the API's answer: another group's agent does not exist for this token.
    assert status == 404
    assert '<p id="error-message">no agent has the id &#39;agent-b&#39;</p>' in page
    assert '<code id="error-reason">AGENT_NOT_FOUND</code>' in page
    assert site.store.drains_for(["agent-b"]) == []
    [audit] = await site.audit_rows(lambda r: r.method == "/console/DrainAgent")
    assert (audit.principal, audit.outcome, audit.detail) == (
        "a-admin", "NOT_FOUND", "AGENT_NOT_FOUND: no agent has the id 'agent-b'")


async def test_an_admin_of_group_a_cannot_revoke_an_agent_of_group_b(site: Site) -> None:
    add_agent(site, "agent-b", "plant-b")
    browser = await logged_in(site, site.token("a-admin", "admin", ("plant-a",)))
    status, page, _ = await browser.post("/agents/agent-b/revoke", {"reason": "mine now"})
    assert status == 404
    assert '<code id="error-reason">AGENT_NOT_FOUND</code>' in page
    row = site.store.get_agent("agent-b")
    assert row is not None and not row.revoked


async def test_an_operator_token_may_not_drain_or_revoke_even_in_its_group(site: Site) -> None:
    add_agent(site, "agent-a", "plant-a")
    browser = await logged_in(site, site.token("ops", "operator", ("plant-a",)))
    assert (await browser.get("/agents/agent-a/revoke"))[0] == 403
    status, page, _ = await browser.post("/agents/agent-a/revoke", {"reason": "x"})
    assert (status, '<code id="error-reason">ADMIN_REQUIRED</code>' in page) == (403, True)
    status, _, _ = await browser.post("/agents/agent-a/drain", {"grace_seconds": "1"})
    assert status == 403
    row = site.store.get_agent("agent-a")
    assert row is not None and not row.revoked


async def test_a_revocation_is_confirmed_then_done_then_reported_and_audited(site: Site) -> None:
    add_agent(site, "agent-a", "plant-a", "erp-host")
    browser = await logged_in(site, site.admin_token)
    status, confirm, _ = await browser.get("/agents/agent-a/revoke")
    assert status == 200
    assert '<h1>Revoke <bdi data-field="name">erp-host</bdi>?</h1>' in confirm
    assert '<form class="card" method="post" action="/agents/agent-a/revoke" id="confirm-form">' in confirm
    status, _, response = await browser.post("/agents/agent-a/revoke", {"reason": "host decommissioned"})
    assert status == 303
    assert response.headers["Location"] == "/agents?group=plant-a"
    row = site.store.get_agent("agent-a")
    assert row is not None and row.revoked and row.revoked_reason == "host decommissioned"
    _, page, _ = await browser.get("/agents?group=plant-a")
    assert ('<p class="flash" id="flash" role="status">Agent erp-host (agent-a) is revoked: its stream was cut and '
            "it can never connect again.</p>") in page
    assert 'id="flash"' not in (await browser.get("/agents?group=plant-a"))[1]  # shown once
    [audit] = await site.audit_rows(lambda r: r.method == "/console/RevokeAgent")
    assert (audit.principal, audit.group_name, audit.agent_id, audit.outcome, audit.detail) == (
        "root", "plant-a", "agent-a", "OK", "host decommissioned")


async def test_draining_an_agent_that_is_not_connected_is_the_apis_failed_precondition(site: Site) -> None:
    add_agent(site, "agent-a", "plant-a")
    browser = await logged_in(site, site.admin_token)
    status, page, _ = await browser.post("/agents/agent-a/drain", {"grace_seconds": "5"})
    assert status == 409
    assert "agent &#39;agent-a&#39; is not connected, so there is nothing to drain" in page
    assert site.store.drains_for(["agent-a"]) == []


async def test_a_grace_period_out_of_range_is_refused(site: Site) -> None:
    add_agent(site, "agent-a", "plant-a")
    browser = await logged_in(site, site.admin_token)
    for grace in ("-1", "3601", "soon"):
        status, page, _ = await browser.post("/agents/agent-a/drain", {"grace_seconds": grace})
        assert status == 400
        assert "&#39;grace_seconds&#39; must be a whole number from 0 to 3600" in page


async def test_an_unknown_agent_or_action_is_not_found(site: Site) -> None:
    browser = await logged_in(site, site.admin_token)
    assert (await browser.get("/agents/agent-x/revoke"))[0] == 404
    assert (await browser.get("/agents/agent-x/explode"))[0] == 404
    assert (await browser.post("/agents/agent-x/explode", {}))[0] == 404
