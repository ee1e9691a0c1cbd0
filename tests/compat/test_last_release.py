"""Upgrades keep old agents working: the checkout against the last release (docs/releases.json), both ways.

A site upgrades its control plane first and its agents later, one by one, so for a while every pairing of
the two versions runs in production. Each test here is one such moment, with real processes: the released
code is built from its recorded commit, the checkout's is the one under test. The rule they check is in
docs/upgrades.md.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from onprem.operator_cli.rows import decode_batch
from onprem.tunnel.protocol import SUPPORTED_REVISIONS
from onprem.v1 import apps_pb2, apps_pb2_grpc, database_pb2, database_pb2_grpc, files_pb2, files_pb2_grpc
from tests.compat.fleet import Agent, ControlPlane, Site
from tests.compat.installs import (
    Install,
    Release,
    build_release,
    checkout_install,
    git,
    has_commit,
    last_release,
)

pytestmark = pytest.mark.slow
GROUP = "plant"


@pytest.fixture(scope="module")
def release() -> Release:
    release = last_release()
    assert has_commit(release.commit), (
        f"the last release's commit {release.commit} ({release.tag}) is not in this clone: "
        "a shallow clone cannot run the compatibility tests (git fetch --unshallow)")
    return release


@pytest.fixture(scope="module")
def released(release: Release, tmp_path_factory: pytest.TempPathFactory) -> Install:
    return build_release(release, tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def current() -> Install:
    return checkout_install()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path / "site").start()
    yield site
    site.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[list[ControlPlane | Agent]]:
    """What a test started, stopped at the end whatever happened."""
    started: list[ControlPlane | Agent] = []
    yield started
    for process in reversed(started):
        process.stop()


def control_plane(install: Install, tmp_path: Path, fleet: list[ControlPlane | Agent]) -> ControlPlane:
    (tmp_path / "cp").mkdir(exist_ok=True)
    cp = ControlPlane(install, tmp_path / "cp" / "state", tmp_path / "cp" / f"control-plane-{install.version}.log")
    fleet.append(cp)
    return cp.start()


def enrolled_agent(name: str, install: Install, cp: ControlPlane, site: Site, tmp_path: Path,
                   fleet: list[ControlPlane | Agent]) -> Agent:
    agent = Agent(name, tmp_path / name, GROUP)
    agent.configure(cp, site)
    agent.enroll(install, cp)
    fleet.append(agent)
    agent.start(install)
    cp.wait_for_active(GROUP, agent.agent_id, install.version)
    return agent


def query_names(cp: ControlPlane) -> list[str]:
    with cp.channel() as channel:
        stub = database_pb2_grpc.DatabaseServiceStub(channel)
        columns, rows = [], []
        for message in stub.Query(database_pb2.QueryRequest(group=GROUP, profile="site-db",
                                                            sql="SELECT name FROM customers ORDER BY id"),
                                  metadata=cp.metadata(), timeout=30):
            if message.HasField("header"):
                columns = list(message.header.columns)
            elif message.HasField("rows"):
                rows += decode_batch(columns, message.rows)
    return [str(row[0]) for row in rows]


def read_file(cp: ControlPlane) -> bytes:
    with cp.channel() as channel:
        stub = files_pb2_grpc.FileServiceStub(channel)
        return b"".join(m.data for m in stub.Read(files_pb2.ReadRequest(group=GROUP, profile="site-files",
                                                                        path="report.csv"),
                                                  metadata=cp.metadata(), timeout=30) if m.HasField("data"))


def call_app(cp: ControlPlane) -> tuple[int, bytes]:
    with cp.channel() as channel:
        stub = apps_pb2_grpc.AppServiceStub(channel)
        head = apps_pb2.CallHead(group=GROUP, profile="site-app", method="GET", path="status")
        status, body = 0, b""
        for message in stub.Call(iter([apps_pb2.CallRequest(head=head)]), metadata=cp.metadata(), timeout=30):
            if message.HasField("head"):
                status = message.head.status_code
            else:
                body += message.body
    return status, body


def assert_serves_every_kind(cp: ControlPlane) -> None:
    assert query_names(cp) == ["Acme GmbH", "Globex Ltd", "Initech"]
    assert read_file(cp) == b"customer,total\nAcme GmbH,1314.99\n"
    status, body = call_app(cp)
    assert (status, b'"status": "ok"' in body) == (200, True)


def test_the_last_release_is_a_tagged_commit_that_carries_its_version(release: Release) -> None:
    pyproject = git("show", f"{release.commit}:pyproject.toml")
    assert f'version = "{release.version}"' in pyproject
    tags = git("tag", "--points-at", release.commit).split()
    # A clone may come without tags; when the tag is there it must name the recorded commit.
    if git("tag", "--list", release.tag).strip():
        assert release.tag in tags
    assert f"## {release.version} " in git("show", f"{release.commit}:CHANGELOG.md")


def test_the_released_install_runs_the_released_code_not_the_checkouts(released: Install, current: Install) -> None:
    assert released.version != current.version
    out = subprocess.run([str(released.bin / "python"), "-c",
                          "import onprem, importlib.metadata as m; print(onprem.__file__, m.version('onprem'))"],
                         check=True, capture_output=True, text=True, cwd=released.bin).stdout.split()
    assert Path(out[0]).is_relative_to(released.bin.parent)
    assert out[1] == released.version


def test_the_checkout_speaks_every_protocol_revision_of_the_last_release(release: Release) -> None:
    assert set(release.protocol_revisions) <= set(SUPPORTED_REVISIONS)


def test_the_current_agent_serves_a_query_a_file_read_and_an_app_call_through_the_released_control_plane(
        released: Install, current: Install, site: Site, tmp_path: Path, fleet: list[ControlPlane | Agent]) -> None:
    cp = control_plane(released, tmp_path, fleet)
    agent = enrolled_agent("agent-a", current, cp, site, tmp_path, fleet)
    listed = cp.wait_for_active(GROUP, agent.agent_id, current.version)
    assert listed.protocol_revision == max(set(SUPPORTED_REVISIONS) & set(last_release().protocol_revisions))
    assert_serves_every_kind(cp)


def test_the_released_agent_serves_a_query_a_file_read_and_an_app_call_through_the_current_control_plane(
        released: Install, current: Install, site: Site, tmp_path: Path, fleet: list[ControlPlane | Agent]) -> None:
    cp = control_plane(current, tmp_path, fleet)
    agent = enrolled_agent("agent-a", released, cp, site, tmp_path, fleet)
    listed = cp.wait_for_active(GROUP, agent.agent_id, released.version)
    assert listed.protocol_revision == max(set(SUPPORTED_REVISIONS) & set(last_release().protocol_revisions))
    assert_serves_every_kind(cp)


def test_a_control_plane_upgraded_in_place_keeps_its_ca_its_tokens_and_its_agents(
        released: Install, current: Install, site: Site, tmp_path: Path, fleet: list[ControlPlane | Agent]) -> None:
    old = control_plane(released, tmp_path, fleet)
    agent = enrolled_agent("agent-a", released, old, site, tmp_path, fleet)
    ca, token = old.ca_pem, old.token
    assert old.stop() == 0
    new = ControlPlane(current, old.state_dir, old.state_dir.parent / "control-plane-current.log",
                       old.operator_port, old.agent_port, old.enroll_port, token=token)
    fleet.append(new)
    new.start()
    assert new.ca_pem == ca
    # The agent dials the same address again, with the certificate the released control plane signed.
    new.wait_for_active(GROUP, agent.agent_id, released.version)
    assert_serves_every_kind(new)


def test_an_agent_upgraded_in_place_keeps_its_identity_config_and_enrollment(
        released: Install, current: Install, site: Site, tmp_path: Path, fleet: list[ControlPlane | Agent]) -> None:
    cp = control_plane(current, tmp_path, fleet)
    agent = enrolled_agent("agent-a", released, cp, site, tmp_path, fleet)
    agent_id, config = agent.agent_id, agent.config_file.read_bytes()
    assert agent.stop() == 0
    agent.start(current)
    cp.wait_for_active(GROUP, agent_id, current.version)
    assert (agent.agent_id, agent.config_file.read_bytes()) == (agent_id, config)
    assert [a.agent_id for a in cp.agents(GROUP)] == [agent_id]
    assert_serves_every_kind(cp)


def test_rolling_the_agents_of_a_group_one_by_one_loses_no_request(
        released: Install, current: Install, site: Site, tmp_path: Path, fleet: list[ControlPlane | Agent]) -> None:
    cp = control_plane(current, tmp_path, fleet)
    agents = [enrolled_agent(name, released, cp, site, tmp_path, fleet) for name in ("agent-a", "agent-b")]
    done, failures, served = threading.Event(), list[str](), [0]

    def load() -> None:
        # What the site's callers do all along: reads, one after another, through one channel.
        with cp.channel() as channel:
            stub = database_pb2_grpc.DatabaseServiceStub(channel)
            request = database_pb2.QueryRequest(group=GROUP, profile="site-db", sql="SELECT count(*) FROM customers")
            while not done.is_set():
                try:
                    list(stub.Query(request, metadata=cp.metadata(), timeout=30))
                    served[0] += 1
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

    caller = threading.Thread(target=load)
    caller.start()
    try:
        for agent, other in zip(agents, reversed(agents), strict=True):
            # One at a time: the other agent of the group is serving before this one stops.
            assert other.install is not None
            cp.wait_for_active(GROUP, other.agent_id, other.install.version)
            before = served[0]
            assert agent.stop() == 0
            agent.start(current)
            cp.wait_for_active(GROUP, agent.agent_id, current.version)
            assert served[0] > before
    finally:
        done.set()
        caller.join(60)
    assert failures == []
    assert {a.version for a in cp.agents(GROUP)} == {current.version}

