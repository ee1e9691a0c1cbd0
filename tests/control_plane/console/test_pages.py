"""The pages show what the token may see, as the API would list it, and values from agents only as text."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from markupsafe import escape

from onprem.control_plane.console.render import shown
from onprem.control_plane.store import AuditEntry
from tests.control_plane.console.conftest import Browser, Site, add_agent
from tests.support.hostile_strings import CORPUS

PAGES = ["/", "/agents", "/activity"]


async def logged_in(site: Site, token: str) -> Browser:
    browser = await site.browser()
    await browser.login(token)
    return browser


def two_groups(site: Site) -> None:
    add_agent(site, "agent-a1", "plant-a", "a-one", profiles=({"name": "erp", "kind": "database"},))
    add_agent(site, "agent-b1", "plant-b", "b-one", profiles=({"name": "ledger", "kind": "database"},
                                                                 {"name": "exports", "kind": "folder"}))
    now = dt.datetime.now(dt.UTC)
    site.store.add_audits([
        AuditEntry(at=now, principal="ci-a", role="operator", method="/onprem.v1.DatabaseService/Query",
                   kind="database", code=0, outcome="OK", group_name="plant-a", profile="erp", token_id="a" * 16),
        AuditEntry(at=now, principal="ci-b", role="operator", method="/onprem.v1.DatabaseService/Query",
                   kind="database", code=14, outcome="UNAVAILABLE", group_name="plant-b", profile="ledger",
                   token_id="b" * 16),
        AuditEntry(at=now, principal="anonymous", role="", method="/onprem.v1.AgentService/ListAgents",
                   kind="auth", code=16, outcome="UNAUTHENTICATED", peer="ipv4:10.9.9.9:1234"),
    ])


async def test_the_fleet_page_counts_each_groups_agents_and_lists_its_profiles_by_kind(site: Site) -> None:
    two_groups(site)
    add_agent(site, "agent-b2", "plant-b", "b-two")
    site.store.revoke_agent("agent-b2", "gone")
    _, page, _ = await (await logged_in(site, site.admin_token)).get("/")
    row_b = re.search(r'<tr data-group="plant-b">(.*?)</tr>', page, re.S)
    assert row_b is not None
    cells = row_b.group(1)
    assert '<td data-field="agents">1</td>' in cells  # the revoked one is not counted
    assert '<td data-field="active" class="">0</td>' in cells
    assert '<td data-field="lost" class="bad">1</td>' in cells
    assert ('<span class="kind">database</span> <bdi data-field="profile">ledger</bdi>' in cells
            and '<span class="kind">folder</span> <bdi data-field="profile">exports</bdi>' in cells)
    assert '<span class="n" id="total-agents">2</span>' in page
    assert '<span class="n" id="total-lost">2</span>' in page
    assert 'id="attention"' in page and "lost: not connected" in page


@pytest.mark.parametrize("path", PAGES)
async def test_a_token_of_one_group_sees_nothing_of_another(site: Site, path: str) -> None:
    two_groups(site)
    browser = await logged_in(site, site.token("ops-a", "operator", ("plant-a",)))
    status, page, _ = await browser.get(path)
    assert status == 200
    for other in ("plant-b", "agent-b1", "b-one", "ledger", "exports", "ci-b", "10.9.9.9"):
        assert other not in page, other


async def test_a_token_of_every_group_sees_every_group_and_the_rows_of_none(site: Site) -> None:
    two_groups(site)
    _, page, _ = await (await logged_in(site, site.token("ops", "operator", ("*",)))).get("/activity")
    assert 'data-group="plant-a"' in page and 'data-group="plant-b"' in page
    assert "ipv4:10.9.9.9:1234" in page  # a refusal with no group: only tokens of every group see it


@pytest.mark.parametrize("path", ["/agents?group=plant-b", "/activity?group=plant-b"])
async def test_asking_for_another_groups_page_is_the_apis_permission_denied(site: Site, path: str) -> None:
    two_groups(site)
    browser = await logged_in(site, site.token("ops-a", "operator", ("plant-a",)))
    status, page, _ = await browser.get(path)
    assert status == 403
    assert "may not use group &#39;plant-b&#39; (its groups: plant-a)" in page
    assert '<code id="error-reason">GROUP_NOT_ALLOWED</code>' in page


async def test_the_agents_page_filters_by_group(site: Site) -> None:
    two_groups(site)
    _, page, _ = await (await logged_in(site, site.admin_token)).get("/agents?group=plant-a")
    assert re.findall(r'<tr data-agent-id="([^"]+)"', page) == ["agent-a1"]
    assert '<option value="plant-a" selected>plant-a</option>' in page


async def test_admins_see_the_actions_and_operators_do_not(site: Site) -> None:
    two_groups(site)
    _, as_admin, _ = await (await logged_in(site, site.admin_token)).get("/agents")
    _, as_operator, _ = await (await logged_in(site, site.token("ops", "operator", ("*",)))).get("/agents")
    assert '<a class="button danger" href="/agents/agent-a1/revoke">Revoke…</a>' in as_admin
    assert 'href="/enroll"' in as_admin
    assert "/revoke" not in as_operator and 'href="/enroll"' not in as_operator
    # A lost agent has nothing to drain.
    assert "/agents/agent-a1/drain" not in as_admin


async def test_the_activity_page_filters_rows_by_token_and_outcome(site: Site) -> None:
    two_groups(site)
    browser = await logged_in(site, site.admin_token)
    _, by_outcome, _ = await browser.get("/activity?outcome=UNAVAILABLE")
    _, by_token, _ = await browser.get(f"/activity?token=onp_{'a' * 16}")
    _, by_bare_id, _ = await browser.get(f"/activity?token={'a' * 16}")

    def principals(page: str) -> list[str]:
        return re.findall(r'<td data-field="principal">(?:<a [^>]+>)?([^<]+)', page)

    assert principals(by_outcome) == ["ci-b"]
    assert principals(by_token) == ["ci-a"]
    assert principals(by_bare_id) == ["ci-a"]


@pytest.mark.parametrize("query, message", [
    ("token=nope", "the token filter takes a token&#39;s id (onp_ and 16 hex digits)"),
    ("outcome=FINE", "the outcome filter takes a status name such as OK or PERMISSION_DENIED"),
])
async def test_a_bad_filter_is_invalid_argument(site: Site, query: str, message: str) -> None:
    status, page, _ = await (await logged_in(site, site.admin_token)).get(f"/activity?{query}")
    assert status == 400
    assert message in page


async def test_the_charts_count_a_groups_data_requests_and_errors_this_minute(site: Site) -> None:
    two_groups(site)
    _, page, _ = await (await logged_in(site, site.admin_token)).get("/activity")
    chart = re.search(r'<figure class="chart" data-group="plant-b">(.*?)</figure>', page, re.S)
    assert chart is not None
    assert '<span data-field="requests">1</span> requests, <span data-field="errors" class="bad">1</span> errors' in chart.group(1)
    bars = re.findall(r'<g class="minute" data-requests="(\d+)" data-errors="(\d+)">', chart.group(1))
    assert len(bars) == 60
    assert bars[-1] == ("1", "1") and set(bars[:-1]) == {("0", "0")}


async def test_hostile_host_names_versions_and_profile_names_are_escaped_text(site: Site) -> None:
    for i, text in enumerate(CORPUS):
        add_agent(site, f"agent-{i:02d}", "hostile", f"agent-{i:02d}", hostname=text, version=text[:64],
                  profiles=({"name": text, "kind": "database"},))
    _, page, _ = await (await logged_in(site, site.admin_token)).get("/agents")
    for i, text in enumerate(CORPUS):
        row = re.search(rf'<tr data-agent-id="agent-{i:02d}" class="agent-lost">(.*?)</tr>', page, re.S)
        assert row is not None
        assert f'<bdi data-field="hostname">{escape(shown(text))}</bdi>' in row.group(1)
        assert f'<bdi data-field="version">{escape(shown(text[:64]))}</bdi>' in row.group(1)
        assert f'<bdi data-field="profile">{escape(shown(text))}</bdi>' in row.group(1)
    assert "<script>" not in page.split("</header>", 1)[1]
    # {{7*7}} is never evaluated (the check above holds it as the very text).
    assert '<bdi data-field="hostname">{{7*7}}</bdi>' in page
