"""The web console in a real browser (headless Chromium), against real control-plane and agent processes.

One control plane serves the console (`--console-listen`) with 1 s heartbeats and 1 s page refreshes.
Its agents: the demo's (group demo: demo-db, demo-files, demo-app), one that will go silent (edge), one
whose PostgreSQL password will go wrong (plant), and those enrolled from the console's own page. The
browser logs in with a demo-style admin token and is driven as an operator would drive it; every wait
polls the page (which refreshes itself) with a deadline, none sleeps and then asserts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import sqlalchemy
from google.protobuf.timestamp_pb2 import Timestamp
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from onprem.control_plane.console.render import shown
from onprem.control_plane.store import DEFAULT_DB_FILENAME
from onprem.control_plane.store.schema import agents_table, groups_table
from onprem.v1 import agents_pb2, database_pb2, profiles_pb2, tunnel_pb2
from tests.support.browser import chromium, console_log, text_of, wait_for
from tests.support.hostile_strings import CORPUS
from tests.support.postgres import PASSWORD, PostgresServer
from tools.cluster import (
    BIN,
    AgentProcess,
    ControlPlaneProcess,
    bearer,
    database_stub,
    operator_channel,
    wait_for_agent_state,
)
from tools.hostile_agent import AgentFrame, HostileAgent
from tools.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT = 1.0
REFRESH = 1.0
#: Where the fleet page's screenshot goes (docs/console.png is a copy of one).
SCREENSHOT = ROOT / "build" / "console" / "fleet.png"
ACTIVE = agents_pb2.AGENT_STATE_ACTIVE


@dataclass
class Site:
    root: Path
    cp: ControlPlaneProcess
    console_port: int
    admin_token: str
    demo: AgentProcess
    edge: AgentProcess
    plant: AgentProcess
    password_file: Path
    db_user: str
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: The agent enrolled from the console's page, once it runs.
    enrolled: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.console_port}"

    @property
    def server_certificate(self) -> Path:
        return self.cp.state_dir / "ca" / "server.pem"

    def wait_active(self, agent_id: str, within: float = 30) -> agents_pb2.Agent:
        async def wait() -> agents_pb2.Agent:
            async with operator_channel(self.cp) as channel:
                return await wait_for_agent_state(channel, self.admin_token, agent_id, ACTIVE, within)

        return asyncio.run(wait())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("console")
    started: list[subprocess.Popen[bytes]] = []
    app_port = free_port()
    env = {**os.environ, "DEMO_APP_KEY": "demo-key"}
    with open(root / "http-app.log", "ab") as log:
        app = subprocess.Popen([sys.executable, "-m", "tools.demo.http_app", "--port", str(app_port)], cwd=ROOT,
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    started.append(app)
    console_port = free_port()
    cp = ControlPlaneProcess(root / "cp", extra_args=[
        "--heartbeat-interval", str(HEARTBEAT), "--console-listen", f"127.0.0.1:{console_port}",
        "--console-refresh-seconds", str(REFRESH)])
    cp.start()
    token_file = root / "admin.token"
    # As `make run` makes its token: a bootstrap admin token that never expires, written to a file.
    cp.cli("create-admin-token", "--name", "demo-admin", "--no-expiry", "--output", str(token_file))
    admin_token = token_file.read_text().strip()

    sqlite3.connect(root / "demo.db").close()
    (root / "files").mkdir()
    demo = AgentProcess(root / "demo", cp, name="demo-agent", env=env, profiles={
        "databases": {"demo-db": {"url": f"sqlite:///{root / 'demo.db'}", "read_only": False}},
        "folders": {"demo-files": {"root": str(root / "files"), "read_only": False}},
        "apps": {"demo-app": {"base_url": f"http://127.0.0.1:{app_port}/api/",
                              "headers_from_env": {"X-Api-Key": "DEMO_APP_KEY"}}},
    })
    edge = AgentProcess(root / "edge", cp, name="edge-gateway",
                        profiles={"folders": {"spool": {"root": str(root / "files")}}})
    password_file = root / "erp.password"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)
    plant = AgentProcess(root / "plant", cp, name="erp-gateway", profiles={"databases": {
        "erp": {"url": postgres.url(with_password=False), "password_file": str(password_file)}}})
    for agent, group in ((demo, "demo"), (edge, "edge"), (plant, "plant")):
        agent.enroll(group)
        agent.start()
    s = Site(root, cp, console_port, admin_token, demo, edge, plant, password_file, postgres.user, started)
    for agent in (demo, edge, plant):
        s.wait_active(agent.agent_id)
    yield s
    for agent in (demo, edge, plant):
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.send_signal(signal.SIGCONT)
        agent.stop()
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    cp.stop()


@pytest.fixture(scope="module")
def driver(site: Site) -> Iterator[Chrome]:
    browser = chromium(site.server_certificate)
    yield browser
    browser.quit()


def log_in(driver: WebDriver, site: Site, token: str, path: str = "/") -> None:
    driver.delete_all_cookies()
    driver.get(site.url + "/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()
    wait_for(driver, lambda d: d.find_elements(By.ID, "principal"), 10, "the login did not reach a page")
    if path != "/":
        driver.get(site.url + path)


def agent_state(driver: WebDriver, agent_id: str) -> str:
    found = text_of(driver, f'tr[data-agent-id="{agent_id}"] [data-field="state"]')
    return found[0] if found else ""


def profile_health(driver: WebDriver, agent_id: str) -> dict[str, str]:
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll(`tr[data-agent-id='${arguments[0]}'] li.profile`),"
        " li => [li.querySelector('[data-field=profile]').textContent, li.querySelector('[data-field=health]').textContent]);",
        agent_id)
    return dict(rows)


def cp_cli(site: Site, *args: str) -> str:
    return site.cp.cli(*args)


# --- logging in, and the fleet at a glance --------------------------------------------------------------------


def test_the_demo_admin_sees_the_demo_agent_active_with_its_three_profiles_healthy(site: Site, driver: WebDriver) -> None:
    log_in(driver, site, site.admin_token, "/agents?group=demo")
    assert driver.find_element(By.ID, "principal").text == "demo-admin · admin · groups: *"
    demo = site.demo.agent_id
    wait_for(driver, lambda d: agent_state(d, demo) == "active", 10, "the demo agent is not shown active")
    # Health reports come a moment after the agent connects: the page refreshes itself until they are in.
    wait_for(driver, lambda d: profile_health(d, demo) == {"demo-db": "healthy", "demo-files": "healthy",
                                                            "demo-app": "healthy"}, 20,
             "the demo agent's three profiles are not all shown healthy")
    assert text_of(driver, f'tr[data-agent-id="{demo}"] [data-field="name"]') == ["demo-agent"]
    assert text_of(driver, f'tr[data-agent-id="{demo}"] [data-field="in-flight"]') == ["0 / 64"]


def test_a_silent_agent_turns_lost_on_the_open_page_within_its_heartbeat_window(site: Site, driver: WebDriver) -> None:
    log_in(driver, site, site.admin_token, "/agents?group=edge")
    edge = site.edge.agent_id
    wait_for(driver, lambda d: agent_state(d, edge) == "active", 10)
    assert site.edge.proc is not None
    driver.execute_script("window.consoleTestMark = 'same page'")  # gone if the page were loaded again
    stopped = time.monotonic()
    site.edge.proc.send_signal(signal.SIGSTOP)  # alive, holding its connection, but silent
    # Three missed heartbeats end its stream; the open page (never reloaded here) refreshes every REFRESH s.
    window = 3 * HEARTBEAT + REFRESH
    wait_for(driver, lambda d: agent_state(d, edge) == "lost", window + 6,
             f"the silent agent was not shown lost within {window + 6:.0f} s")
    print(f"shown lost {time.monotonic() - stopped:.1f} s after it went silent (window {window:.0f} s + refresh)")
    assert driver.execute_script("return window.consoleTestMark") == "same page"  # the page refreshed itself
    site.edge.kill()  # it stays lost for the rest of the module
    driver.get(site.url + "/")
    assert text_of(driver, 'tr[data-group="edge"] [data-field="lost"]') == ["1"]


def test_a_wrong_database_password_shows_as_the_profiles_health_message(site: Site, driver: WebDriver) -> None:
    log_in(driver, site, site.admin_token, "/agents?group=plant")
    plant = site.plant.agent_id
    wait_for(driver, lambda d: profile_health(d, plant) == {"erp": "healthy"}, 20)
    site.password_file.write_text("not-the-password")
    assert site.plant.proc is not None
    site.plant.proc.send_signal(signal.SIGHUP)  # the agent re-reads its profiles and checks them at once
    wait_for(driver, lambda d: profile_health(d, plant) == {"erp": "failing"}, 20,
             "the wrong password did not show as a failing profile")
    [message] = text_of(driver, f'tr[data-agent-id="{plant}"] [data-field="health-message"]')
    assert message.startswith("credentials: the server refused the credentials: ")
    assert message.endswith(f'password authentication failed for user "{site.db_user}"')
    assert "not-the-password" not in driver.page_source


def test_an_enrollment_token_made_in_the_page_enrolls_a_second_agent_with_the_command_shown(
    site: Site, driver: WebDriver,
) -> None:
    log_in(driver, site, site.admin_token, "/enroll")
    driver.find_element(By.ID, "group").send_keys("branch")
    driver.find_element(By.ID, "description").send_keys("enrolled from the console test")
    driver.find_element(By.ID, "create-token").click()
    wait_for(driver, lambda d: d.find_elements(By.ID, "enroll-command"), 10)
    config = driver.find_element(By.ID, "agent-config").text
    command = driver.find_element(By.ID, "enroll-command").text
    token = driver.find_element(By.ID, "enrollment-token").text
    assert command == f"onprem-agent enroll --config agent.yaml --token {token}"
    assert f"address: 127.0.0.1:{site.cp.agent_port}" in config and f"enroll_address: 127.0.0.1:{site.cp.enroll_port}" in config
    # The operator's steps, on the "other host": the CA from the page's link, the config and the command as shown.
    host = site.root / "branch-host"
    host.mkdir()
    cookie = driver.get_cookie("__Host-onprem-console")
    assert cookie is not None
    context = ssl.create_default_context(cafile=str(site.cp.ca_file))
    request = urllib.request.Request(site.url + "/ca.pem", headers={"Cookie": f"__Host-onprem-console={cookie['value']}"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        (host / "ca.pem").write_bytes(response.read())
    assert (host / "ca.pem").read_bytes() == site.cp.ca_file.read_bytes()
    (host / "agent.yaml").write_text(config)
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    enrolled = subprocess.run(["bash", "-c", command], cwd=host, env={**os.environ, "PATH": path},
                              capture_output=True, text=True, timeout=60)
    assert enrolled.returncode == 0, enrolled.stderr
    agent_id = json.loads((host / "identity" / "agent.json").read_text())["agent_id"]
    with open(host / "agent.log", "ab") as log:
        run = subprocess.Popen(["bash", "-c", "exec onprem-agent run --config agent.yaml"], cwd=host,
                               env={**os.environ, "PATH": path}, stdout=log, stderr=subprocess.STDOUT)
    site.started.append(run)
    site.enrolled = run
    driver.get(site.url + "/agents?group=branch")
    wait_for(driver, lambda d: agent_state(d, agent_id) == "active", 30, "the enrolled agent did not show active")
    assert text_of(driver, f'tr[data-agent-id="{agent_id}"] [data-field="name"]') == ["my-agent"]


def test_the_fleet_page_shows_every_group_and_what_needs_attention(site: Site, driver: WebDriver) -> None:
    log_in(driver, site, site.admin_token)
    wait_for(driver, lambda d: text_of(d, 'tr[data-group="branch"] [data-field="active"]') == ["1"], 20)
    assert text_of(driver, "table#groups tbody tr td.name") == ["branch", "demo", "edge", "plant"]
    assert text_of(driver, 'tr[data-group="demo"] [data-field="active"]') == ["1"]
    assert text_of(driver, 'tr[data-group="edge"] [data-field="lost"]') == ["1"]
    attention = dict(driver.execute_script(
        "return Array.from(document.querySelectorAll('#attention tbody tr'),"
        " tr => [tr.querySelector('[data-field=name]').textContent, tr.querySelector('[data-field=attention]').textContent]);"))
    assert attention == {"edge-gateway": "lost: not connected", "erp-gateway": "1 profile failing"}
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    driver.set_window_size(1440, 900)
    assert driver.save_screenshot(str(SCREENSHOT))

    print(f"screenshot of the fleet page: {SCREENSHOT}")


def test_draining_an_agent_from_the_console_stops_it(site: Site, driver: WebDriver) -> None:
    log_in(driver, site, site.admin_token, "/agents?group=branch")
    [row] = driver.find_elements(By.CSS_SELECTOR, 'tr[data-agent-id^="agent-"]')
    agent_id = row.get_attribute("data-agent-id")
    row.find_element(By.LINK_TEXT, "Drain…").click()
    wait_for(driver, lambda d: d.find_elements(By.ID, "confirm"), 10)
    grace = driver.find_element(By.ID, "grace_seconds")
    grace.clear()
    grace.send_keys("2")
    driver.find_element(By.ID, "reason").send_keys("console test")
    driver.find_element(By.ID, "confirm").click()
    wait_for(driver, lambda d: d.find_elements(By.ID, "flash"), 10)
    assert driver.find_element(By.ID, "flash").text == (
        f"Agent my-agent ({agent_id}) is draining: it finishes its requests within 2 s, then stops.")
    assert site.enrolled is not None
    assert site.enrolled.wait(30) == 0  # drained, it exits cleanly
    wait_for(driver, lambda d: agent_state(d, str(agent_id)) == "lost", 15)


def test_the_activity_page_charts_a_groups_requests_and_errors_and_lists_their_rows(site: Site, driver: WebDriver) -> None:
    async def queries() -> None:
        async with operator_channel(site.cp) as channel:
            stub = database_stub(channel)
            for sql in ("SELECT 1", "SELECT 2", "SELECT 3", "SELECT * FROM no_such_table"):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async for _ in stub.Query(database_pb2.QueryRequest(group="demo", profile="demo-db", sql=sql),
                                              metadata=bearer(site.admin_token)):
                        pass

    asyncio.run(queries())
    log_in(driver, site, site.admin_token, "/activity?group=demo")
    chart = 'figure.chart[data-group="demo"]'
    # Audit rows are written in batches: the page (refreshing itself) shows them once they are in.
    wait_for(driver, lambda d: text_of(d, f'{chart} [data-field="requests"]') == ["4"], 15,
             "the demo group's chart does not count its 4 queries")
    assert text_of(driver, f'{chart} [data-field="errors"]') == ["1"]
    outcomes = text_of(driver, '#audit tbody tr [data-field="outcome"]')
    assert outcomes[:4] == ["INVALID_ARGUMENT", "OK", "OK", "OK"]  # newest first; the missing table is the last
    driver.get(site.url + "/activity?group=demo&outcome=OK")
    assert set(text_of(driver, '#audit tbody tr [data-field="outcome"]')) == {"OK"}


# --- who sees what, and sessions that end ----------------------------------------------------------------------


def test_an_operator_token_of_one_group_sees_only_that_group(site: Site, driver: WebDriver) -> None:
    token = cp_cli(site, "create-token", "--name", "demo-ops", "--role", "operator", "--groups", "demo")
    log_in(driver, site, token)
    assert text_of(driver, "table#groups tbody tr td.name") == ["demo"]
    driver.get(site.url + "/agents")
    assert [r.get_attribute("data-agent-id") for r in driver.find_elements(By.CSS_SELECTOR, "tr[data-agent-id]")] == [
        site.demo.agent_id]
    for other in ("plant", "edge", "erp-gateway", site.plant.agent_id):
        assert other not in driver.page_source
    assert driver.find_elements(By.LINK_TEXT, "Enroll an agent") == []
    driver.get(site.url + "/agents?group=plant")
    assert driver.find_element(By.ID, "error-reason").text == "GROUP_NOT_ALLOWED"


def test_the_browser_keeps_the_session_cookie_httponly_secure_and_samesite_strict(site: Site, driver: WebDriver) -> None:
    log_in(driver, site, site.admin_token)
    cookie = driver.get_cookie("__Host-onprem-console")
    assert cookie is not None
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"], cookie["path"]) == (True, True, "Strict", "/")
    assert driver.execute_script("return document.cookie") == ""  # no script can read it


def test_a_logged_out_session_is_refused(site: Site, driver: WebDriver) -> None:
    log_in(driver, site, site.admin_token)
    cookie = driver.get_cookie("__Host-onprem-console")
    assert cookie is not None
    driver.find_element(By.ID, "logout").click()
    wait_for(driver, lambda d: d.find_elements(By.ID, "login-message"), 10)
    assert driver.find_element(By.ID, "login-message").text == "You are logged out."
    driver.add_cookie({"name": cookie["name"], "value": cookie["value"], "path": "/", "secure": True,
                       "httpOnly": True, "sameSite": "Strict"})
    driver.get(site.url + "/agents")
    assert driver.find_element(By.ID, "login-message").text == (
        "your session ended (logged out, expired or the console restarted); log in again")
    assert driver.find_elements(By.ID, "agents") == []


def test_a_revoked_token_ends_its_session_on_the_open_page(site: Site, driver: WebDriver) -> None:
    token = cp_cli(site, "create-token", "--name", "soon-revoked", "--role", "operator", "--groups", "*")
    log_in(driver, site, token, "/agents")
    wait_for(driver, lambda d: d.find_elements(By.ID, "agents"), 10)
    token_id = token.split("_")[1]
    cp_cli(site, "revoke-token", f"onp_{token_id}", "--reason", "console test")
    # The open page refreshes; its next request is refused, and the page says why.
    wait_for(driver, lambda d: d.find_elements(By.ID, "login-message"), 15, "the revoked session was not ended")
    message = driver.find_element(By.ID, "login-message").text
    assert message.startswith(f"your session ended: token 'soon-revoked' (onp_{token_id}) was revoked at ")
    assert message.endswith("(console test); ask an admin for a new one")
    driver.get(site.url + "/")
    assert driver.find_elements(By.ID, "token") and not driver.find_elements(By.ID, "groups")  # the login form


# --- hostile data from agents ----------------------------------------------------------------------------------


class HostileStream(threading.Thread):
    """A hand-made agent stream, held in a thread of its own (the browser's calls block the test's thread)."""

    def __init__(self, agent: HostileAgent, first: tunnel_pb2.Hello, status: tunnel_pb2.AgentStatus) -> None:
        super().__init__(daemon=True)
        self._agent, self._hello, self._status = agent, first, status
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        async def hold() -> None:
            async with self._agent.channel() as channel, self._agent.stream(channel, self._hello) as stream:
                await stream.send(AgentFrame(status=self._status))
                self.ready.set()
                while True:
                    await stream.next_start()  # answers pings; no request is ever sent to this group

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()  # type: ignore[assignment]
            try:
                await hold()
            except asyncio.CancelledError:
                pass
            except BaseException as exc:
                self.error = exc
                self.ready.set()

        asyncio.run(main())

    def stop(self) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self.join(10)


def _hostile_rows(site: Site) -> list[str]:
    """Agents whose names, host names, versions and profile names are the corpus, written into the store as an
    older release or a hand-edited database could have them (enrollment itself refuses such names)."""
    engine = sqlalchemy.create_engine(f"sqlite:///{site.cp.state_dir / DEFAULT_DB_FILENAME}")
    now = dt.datetime.now(dt.UTC)
    ids = []
    with engine.begin() as conn:
        conn.execute(groups_table.insert().values(name="hostile", created_at=now))
        for i, text in enumerate(CORPUS):
            agent_id = f"agent-hostile{i:02d}"
            ids.append(agent_id)
            conn.execute(agents_table.insert().values(
                agent_id=agent_id, name=text, group_name="hostile", hostname=text, version=text[:64],
                enrolled_at=now, last_seen_at=now, cert_serial="1", cert_expires_at=now + dt.timedelta(days=20),
                revoked_at=None, revoked_reason="",
                profiles=json.dumps([{"name": text[:255], "kind": "database", "read_only": False, "dialect": ""}])))
    engine.dispose()
    return ids


def _assert_inert(driver: Chrome) -> None:
    """No script ran, no element or attribute came from the data, and the CSP had nothing to block."""
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018
    found = driver.execute_script("""
        const all = Array.from(document.querySelectorAll('*'));
        return {
          injected: document.querySelectorAll('#injected').length,
          scripts: Array.from(document.scripts, s => s.getAttribute('src')),
          foreign: document.querySelectorAll(
            'img, iframe, object, embed, base, style, math, details, meta[http-equiv], a[href^="javascript"]').length,
          handlers: all.filter(e => Array.from(e.attributes).some(a => a.name.startsWith('on'))).length,
          title: document.title,
        };""")
    assert found["injected"] == 0 and found["foreign"] == 0 and found["handlers"] == 0
    assert len(found["scripts"]) == 1 and found["scripts"][0].startswith("/static/console.js?v=")
    assert found["title"].endswith("· onprem console")
    refused = [e["message"] for e in console_log(driver) if "Content Security Policy" in e["message"]
               or "Refused to" in e["message"]]
    assert refused == []  # had escaping failed, the CSP would have had something to refuse


def test_hostile_names_host_names_versions_profiles_and_health_messages_render_as_text(
    site: Site, driver: Chrome,
) -> None:
    raw_ids = _hostile_rows(site)
    evil = AgentProcess(site.root / "evil", site.cp, name="evil", profiles={})
    evil.enroll("evil")  # a real identity; what it says is hand-made below
    now = Timestamp()
    now.FromDatetime(dt.datetime.now(dt.UTC))
    profiles = [profiles_pb2.Profile(name=text[:255], kind=profiles_pb2.PROFILE_KIND_DATABASE) for text in CORPUS]
    first = tunnel_pb2.Hello(protocol_revisions=[1], agent_version=CORPUS[5], hostname=CORPUS[2], profiles=profiles,
                             max_in_flight=8, request_window_bytes=4 * 1024 * 1024, started_at=now)
    status = tunnel_pb2.AgentStatus(profile_health=[
        profiles_pb2.ProfileHealth(profile=p.name, kind=p.kind, ok=False, checked_at=now, checks=[
            profiles_pb2.ProfileCheck(name="reachable", ok=False, message=CORPUS[i])])
        for i, p in enumerate(profiles)])
    stream = HostileStream(HostileAgent(site.root / "evil" / "identity", site.cp.ca_file,
                                        f"127.0.0.1:{site.cp.agent_port}"), first, status)
    stream.start()
    try:
        assert stream.ready.wait(20) and stream.error is None, stream.error
        log_in(driver, site, site.admin_token, "/agents")
        live = evil.agent_id
        wait_for(driver, lambda d: len(text_of(d, f'tr[data-agent-id="{live}"] [data-field="health-message"]'))
                 == len(CORPUS), 20, "the hostile agent's health reports are not shown")
        console_log(driver)  # what came before this page is not this test's
        for page in ("/agents", "/agents?group=hostile", "/", "/activity"):
            driver.get(site.url + page)
            _assert_inert(driver)
        driver.get(site.url + "/agents")
        expected = [shown(t) for t in CORPUS]
        for agent_id, text in zip(raw_ids, CORPUS, strict=True):
            row = f'tr[data-agent-id="{agent_id}"]'
            assert text_of(driver, f'{row} [data-field="name"]') == [shown(text)]
            assert text_of(driver, f'{row} [data-field="hostname"]') == [shown(text)]
            assert text_of(driver, f'{row} [data-field="version"]') == [shown(text[:64])]
            assert text_of(driver, f'{row} [data-field="profile"]') == [shown(text[:255])]
        row = f'tr[data-agent-id="{live}"]'
        assert sorted(text_of(driver, f'{row} [data-field="profile"]')) == sorted(expected)
        assert sorted(text_of(driver, f'{row} [data-field="health-message"]')) == sorted(
            f"reachable: {t}" for t in expected)
        assert text_of(driver, f'{row} [data-field="hostname"]') == [shown(CORPUS[2])]
        assert text_of(driver, f'{row} [data-field="version"]') == [shown(CORPUS[5])]
        driver.get(site.url + "/")
        assert sorted(text_of(driver, 'tr[data-group="hostile"] [data-field="profile"]')) == sorted(
            {shown(t[:255]) for t in CORPUS})
        assert sorted(text_of(driver, 'tr[data-group="evil"] [data-field="profile"]')) == sorted(expected)
        # After the page refreshed itself (the fresh <main> swapped in by the script), still text only.
        wait_for(driver, lambda d: d.find_element(By.ID, "refreshed").get_attribute("data-state") == "fresh", 10)
        _assert_inert(driver)
        assert sorted(text_of(driver, '#attention [data-field="name"]')) == sorted(
            [shown(t) for t in CORPUS] + ["edge-gateway", "erp-gateway", "evil", "my-agent"])
    finally:
        stream.stop()
        shutil.rmtree(site.root / "evil", ignore_errors=True)
