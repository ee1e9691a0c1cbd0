"""The two .debs, installed on this machine: install, serve a query, upgrade, remove, purge.

Both packages are built as `make dist` builds them (tools/dist), at the checkout's version and at a newer one,
then installed with `dpkg -i` into the real system, so the test needs root. The processes are started from the
installed units' own ExecStartPre/ExecStart lines, as the units' users (units.py; CI has no systemd). Each
fixture below takes the machine one step further (installed, serving, upgraded, removed, purged) and any test
can run alone; the outermost fixture purges both packages at the end, whatever failed, and refuses to start on
a machine where either package (or its config) is already there, so a developer's own installation is never
touched.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.packaging.units import Unit, as_user
from tools.dist.__main__ import Dist, build_all
from tools.dist.debian import AGENT, CONTROL_PLANE, PACKAGES
from tools.dist.versions import debian_version, project_version
from tools.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
NEWER_LABEL = "+upgrade1"
CP_STATE = Path(CONTROL_PLANE.state_dir)
AGENT_STATE = Path(AGENT.state_dir)
CP_CONFIG = Path(CONTROL_PLANE.config_dir)
AGENT_CONFIG = Path(AGENT.config_dir)
CP_UNIT = Path("/lib/systemd/system/onprem-control-plane.service")
AGENT_UNIT = Path("/lib/systemd/system/onprem-agent.service")
GROUP = "deb-site"

pytestmark = [pytest.mark.debian, pytest.mark.slow, pytest.mark.timeout(900)]

#: Everything the packages or their scripts make outside dpkg's own database; none may outlive a purge.
EVERY_PATH = [Path("/opt/onprem"), CP_CONFIG, AGENT_CONFIG, CP_STATE, AGENT_STATE, CP_UNIT, AGENT_UNIT,
              Path("/usr/bin/onprem"), Path("/usr/bin/onprem-agent"), Path("/usr/bin/onprem-control-plane"),
              Path("/usr/share/doc/onprem-agent"), Path("/usr/share/doc/onprem-control-plane"),
              Path("/etc/systemd/system/onprem-agent.service"),
              Path("/etc/systemd/system/onprem-control-plane.service"),
              Path("/var/lib/systemd/deb-systemd-helper-enabled/onprem-agent.service.dsh-also"),
              Path("/var/lib/systemd/deb-systemd-helper-enabled/onprem-control-plane.service.dsh-also"),
              Path("/var/lib/systemd/deb-systemd-helper-masked/onprem-agent.service"),
              Path("/var/lib/systemd/deb-systemd-helper-masked/onprem-control-plane.service")]


def package_status(name: str) -> str:
    """dpkg's status of a package ("install ok installed", "deinstall ok config-files"), or "" if unknown."""
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def dpkg(*args: str) -> subprocess.CompletedProcess[str]:
    # stdin closed: a conffile question would fail the call instead of waiting for an answer.
    result = subprocess.run(["dpkg", *args], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert result.returncode == 0, f"dpkg {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def purge_both() -> None:
    subprocess.run(["dpkg", "--purge", *(spec.name for spec in PACKAGES)], capture_output=True, timeout=600,
                   stdin=subprocess.DEVNULL)


def mode_and_owner(path: Path) -> tuple[int, str, str]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def processes_of(user: str) -> list[int]:
    """Ids of the processes running as `user` (from /proc: read-only, signals nobody)."""
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    found.append(int(entry.name))
            except FileNotFoundError:
                pass
    return found


def wait_for_port(port: int, proc: subprocess.Popen[bytes], within: float = 90) -> None:
    """Until the process listens on `port` (a hang guard, not a timing claim)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the process exited with {proc.returncode} before listening on {port}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listened on {port} within {within} s")


def stop(proc: subprocess.Popen[bytes] | None) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


@dataclass
class Machine:
    """This machine as the test drives it: the built packages, the ports, the processes it started."""

    dist: Dist
    newer: Dist
    logs: Path
    site: Path
    operator_port: int = field(default_factory=free_port)
    agent_port: int = field(default_factory=free_port)
    enroll_port: int = field(default_factory=free_port)
    control_plane: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    admin_token: str = ""

    def install(self, dist: Dist) -> subprocess.CompletedProcess[str]:
        return dpkg("-i", *(str(built.deb) for built in dist.debs))

    def start_control_plane(self) -> None:
        self.control_plane = Unit.read(CP_UNIT).start((self.logs / "control-plane.log").open("ab"))
        for port in (self.operator_port, self.agent_port, self.enroll_port):
            wait_for_port(port, self.control_plane)

    def start_agent(self) -> None:
        unit = Unit.read(AGENT_UNIT)
        check = unit.run("ExecStartPre")
        assert check.returncode == 0, check.stderr
        self.agent = unit.start((self.logs / "agent.log").open("ab"))

    def stop_processes(self) -> tuple[int | None, int | None]:
        agent, self.agent = stop(self.agent), None
        control_plane, self.control_plane = stop(self.control_plane), None
        return agent, control_plane

    def onprem(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The installed operator CLI, against the installed control plane."""
        return subprocess.run(["/usr/bin/onprem", "--address", f"127.0.0.1:{self.operator_port}",
                               "--cacert", str(CP_STATE / "ca" / "ca.pem"), "--token", self.admin_token, *args],
                              capture_output=True, text=True, timeout=120)

    def query(self, within: float = 90) -> list[dict[str, object]]:
        """The site database's rows through control plane and agent, once the agent is connected."""
        deadline = time.monotonic() + within
        while True:
            result = self.onprem("query", GROUP, "site", "SELECT id, name FROM customers ORDER BY id",
                                 "--format", "jsonl")
            if result.returncode == 0:
                return [json.loads(line) for line in result.stdout.splitlines()]
            assert time.monotonic() < deadline, f"no answer within {within} s: {result.stderr}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """Both versions built, and a machine without either package; purged at the end, whatever happened."""
    assert os.geteuid() == 0, "this test installs .debs with dpkg -i: run it as root (CI does)"
    assert shutil.which("dpkg") and shutil.which("dpkg-deb"), "this test needs dpkg and dpkg-deb (Debian)"
    for spec in PACKAGES:
        status = package_status(spec.name)
        assert status in ("", "unknown ok not-installed", "deinstall ok not-installed"), (
            f"{spec.name} is on this machine ({status}); the test would replace and purge it: remove it first")
    present = [str(path) for path in EVERY_PATH if path.exists() or path.is_symlink()]
    assert not present, f"onprem's files are on this machine already, and the test would delete them: {present}"
    for name in (AGENT.user, CONTROL_PLANE.user):
        assert not user_exists(name), f"the user {name} exists already; the test would delete it on purge"

    work = tmp_path_factory.mktemp("dist")
    version = project_version(ROOT)
    wheelhouse = work / "wheelhouse"
    dist = build_all(work / "current", root=ROOT, wheelhouse=wheelhouse)
    newer = build_all(work / "newer", version=version + NEWER_LABEL, root=ROOT, wheelhouse=wheelhouse)
    # The site's database, where the agent's user reads it (not in pytest's 0700 temporary folders).
    site = Path(tempfile.mkdtemp(prefix="onprem-deb-site-"))
    state = Machine(dist, newer, tmp_path_factory.mktemp("logs"), site)
    try:
        yield state
    finally:
        state.stop_processes()
        purge_both()
        shutil.rmtree(site, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(machine: Machine) -> Machine:
    machine.install(machine.dist)
    return machine


@pytest.fixture(scope="module")
def serving(installed: Machine) -> Machine:
    """The installed control plane, configured by its env file, and an agent enrolled with the installed
    `onprem-agent enroll`, both run from their units, answering a query."""
    m = installed
    env = CP_CONFIG / "env"
    env.write_text(env.read_text().replace(
        "--operator-listen 127.0.0.1:8443 --agent-listen 127.0.0.1:8444 --enroll-listen 127.0.0.1:8445",
        f"--operator-listen 127.0.0.1:{m.operator_port} --agent-listen 127.0.0.1:{m.agent_port} "
        f"--enroll-listen 127.0.0.1:{m.enroll_port}"))
    m.start_control_plane()
    token = as_user(CONTROL_PLANE.user, ["/usr/bin/onprem-control-plane", "create-admin-token", "--name", "deb"])
    assert token.returncode == 0, token.stderr
    m.admin_token = token.stdout.strip()
    enrollment = as_user(CONTROL_PLANE.user, ["/usr/bin/onprem-control-plane", "create-enrollment-token",
                                              "--group", GROUP])
    assert enrollment.returncode == 0, enrollment.stderr

    database = m.site / "site.db"
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.executemany("INSERT INTO customers VALUES (?, ?)", [(1, "Ada"), (2, "Grace")])
    conn.close()
    agent_user = pwd.getpwnam(AGENT.user)
    for path in (m.site, database):
        os.chown(path, agent_user.pw_uid, agent_user.pw_gid)
    # As docs/install.md says: `install -m 0644` (the CA's copy in the state folder is 0600, like all its files).
    shutil.copyfile(CP_STATE / "ca" / "ca.pem", AGENT_CONFIG / "ca.pem")
    os.chmod(AGENT_CONFIG / "ca.pem", 0o644)
    (AGENT_CONFIG / "agent.yaml").write_text(yaml.safe_dump({
        "control_plane": {"address": f"127.0.0.1:{m.agent_port}", "enroll_address": f"127.0.0.1:{m.enroll_port}",
                          "ca_file": str(AGENT_CONFIG / "ca.pem")},
        "identity_dir": str(AGENT_STATE),
        "name": "deb-agent",
        "profiles": {"databases": {"site": {"url": f"sqlite:///{database}", "read_only": True}}},
    }))
    os.chown(AGENT_CONFIG / "agent.yaml", 0, agent_user.pw_gid)
    os.chmod(AGENT_CONFIG / "agent.yaml", 0o640)
    enrolled = as_user(AGENT.user, ["/usr/bin/onprem-agent", "enroll", "--config", str(AGENT_CONFIG / "agent.yaml"),
                                    "--token", enrollment.stdout.strip()])
    assert enrolled.returncode == 0, enrolled.stderr
    m.start_agent()
    return m


@dataclass(frozen=True)
class Snapshot:
    """What must survive an upgrade and a remove: the agent's identity, both configs, the control plane's CA."""

    files: dict[str, bytes]

    @classmethod
    def take(cls) -> Snapshot:
        paths = [*sorted(AGENT_STATE.iterdir()), AGENT_CONFIG / "agent.yaml", AGENT_CONFIG / "ca.pem",
                 CP_CONFIG / "env", CP_STATE / "ca" / "ca.pem", CP_STATE / "ca" / "ca.key"]
        return cls({str(path): path.read_bytes() for path in paths if path.is_file()})


@dataclass(frozen=True)
class Upgrade:
    machine: Machine
    before: Snapshot
    after: Snapshot
    rows_before: list[dict[str, object]]
    rows_after: list[dict[str, object]]
    exits: tuple[int | None, int | None]
    agents: list[dict[str, object]]


@pytest.fixture(scope="module")
def upgraded(serving: Machine) -> Upgrade:
    """The newer version installed over the running one, and both processes restarted on it (by hand, as
    postinst's try-restart does under systemd; without systemd it restarts nothing)."""
    m = serving
    rows_before = m.query()
    before = Snapshot.take()
    m.install(m.newer)
    exits = m.stop_processes()
    m.start_control_plane()
    m.start_agent()
    rows_after = m.query()
    listing = m.onprem("agents", "--group", GROUP, "--json")
    assert listing.returncode == 0, listing.stderr
    return Upgrade(m, before, Snapshot.take(), rows_before, rows_after, exits,
                   list(json.loads(listing.stdout).get("agents", [])))


@pytest.fixture(scope="module")
def removed(upgraded: Upgrade) -> Upgrade:
    upgraded.machine.stop_processes()
    dpkg("--remove", *(spec.name for spec in PACKAGES))
    return upgraded


@pytest.fixture(scope="module")
def purged(removed: Upgrade) -> Upgrade:
    dpkg("--purge", *(spec.name for spec in PACKAGES))
    return removed


def test_lintian_reports_no_tag_that_the_packages_do_not_explain(machine: Machine) -> None:
    result = subprocess.run(["lintian", "--fail-on", "none", *(str(built.deb) for built in machine.dist.debs)],
                            capture_output=True, text=True, timeout=600)
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "X:")]
    assert "\n".join(tags) == ""


def test_install_makes_each_service_a_system_user_without_a_login(installed: Machine) -> None:
    for spec in PACKAGES:
        user = pwd.getpwnam(spec.user)
        assert (user.pw_dir, user.pw_shell) == (spec.state_dir, "/usr/sbin/nologin")
        assert user.pw_uid < 1000
        assert grp.getgrgid(user.pw_gid).gr_name == spec.user


def test_install_makes_config_readable_by_the_service_and_state_private_to_it(installed: Machine) -> None:
    assert mode_and_owner(AGENT_CONFIG) == (0o750, "root", AGENT.user)
    assert mode_and_owner(CP_CONFIG) == (0o750, "root", CONTROL_PLANE.user)
    assert mode_and_owner(CP_CONFIG / "env") == (0o640, "root", CONTROL_PLANE.user)
    assert mode_and_owner(AGENT_STATE) == (0o700, AGENT.user, AGENT.user)
    assert mode_and_owner(CP_STATE) == (0o700, CONTROL_PLANE.user, CONTROL_PLANE.user)


def test_install_starts_no_service_and_enables_none(installed: Machine) -> None:
    assert processes_of(AGENT.user) == []
    assert processes_of(CONTROL_PLANE.user) == []
    for spec in PACKAGES:
        assert not Path(f"/etc/systemd/system/multi-user.target.wants/{spec.unit}").exists()


def test_the_units_run_the_packaged_virtualenvs_as_their_users(installed: Machine) -> None:
    agent, control_plane = Unit.read(AGENT_UNIT), Unit.read(CP_UNIT)
    assert agent.service["Type"] == control_plane.service["Type"] == "notify"
    assert (agent.user, control_plane.user) == (AGENT.user, CONTROL_PLANE.user)
    assert agent.command("ExecStart")[0] == "/opt/onprem/agent/bin/onprem-agent"
    assert agent.command("ExecStartPre")[0] == "/opt/onprem/agent/bin/onprem-agent"
    assert control_plane.command("ExecStart")[:5] == [
        "/opt/onprem/control-plane/bin/onprem-control-plane", "--log-format", "json", "serve", "--state-dir"]
    version = installed.dist.python.version
    for command in ("/usr/bin/onprem-agent", "/usr/bin/onprem-control-plane", "/usr/bin/onprem"):
        out = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
        assert out.split()[1] == version


def under_systemd(tmp_path: Path, package: str, script: str, *args: str) -> list[str]:
    """Run an installed maintainer script as if systemd were running, and return the systemd calls it made.

    In a mount namespace of its own, where /run is a fresh tmpfs holding /run/systemd/system (what the scripts
    test for), and with systemctl, deb-systemd-invoke and deb-systemd-helper replaced by recorders on PATH: the
    machine's own /run and services are never touched.
    """
    fakes, calls = tmp_path / "fakes", tmp_path / "calls"
    fakes.mkdir(exist_ok=True)
    calls.write_text("")
    for name in ("systemctl", "deb-systemd-invoke", "deb-systemd-helper"):
        (fakes / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n')
        (fakes / name).chmod(0o755)
    shell = ('mount -t tmpfs onprem-test /run && mkdir -p /run/systemd/system && '
             f'PATH={fakes}:/usr/sbin:/usr/bin:/sbin:/bin exec "$@"')
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, "sh",
                             f"/var/lib/dpkg/info/{package}.{script}", *args],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return calls.read_text().splitlines()


@pytest.mark.parametrize("package", [spec.name for spec in PACKAGES])
def test_postinst_of_an_upgrade_restarts_a_running_service_and_only_a_running_one(
        installed: Machine, tmp_path: Path, package: str) -> None:
    calls = under_systemd(tmp_path, package, "postinst", "configure", "0.0.1-1")
    assert f"deb-systemd-invoke try-restart {package}.service" in calls
    assert "systemctl --system daemon-reload" in calls
    assert not [call for call in calls if " start " in f"{call} " or "enable" in call]


@pytest.mark.parametrize("package", [spec.name for spec in PACKAGES])
def test_postinst_of_a_fresh_install_neither_starts_nor_enables_the_service(
        installed: Machine, tmp_path: Path, package: str) -> None:
    calls = under_systemd(tmp_path, package, "postinst", "configure")
    assert [call for call in calls if call.startswith("deb-systemd-invoke")] == []
    assert [call for call in calls if call.startswith("deb-systemd-helper")] == [
        f"deb-systemd-helper unmask {package}.service", f"deb-systemd-helper update-state {package}.service"]


@pytest.mark.parametrize("package", [spec.name for spec in PACKAGES])
def test_prerm_stops_the_service_on_remove_and_leaves_it_running_on_upgrade(
        installed: Machine, tmp_path: Path, package: str) -> None:
    try:
        assert under_systemd(tmp_path, package, "prerm", "upgrade", "9.9.9-1") == []
        assert under_systemd(tmp_path, package, "prerm", "remove") == [f"deb-systemd-invoke stop {package}.service"]
    finally:
        # prerm removed the byte-code, which the processes of the next tests would have to do without.
        under_systemd(tmp_path, package, "postinst", "configure")


def test_the_installed_control_plane_answers_a_query_through_the_installed_agent(serving: Machine) -> None:
    assert serving.query() == [{"id": 1, "name": "Ada"}, {"id": 2, "name": "Grace"}]


def test_the_installed_processes_run_as_their_units_users_not_root(serving: Machine) -> None:
    assert serving.control_plane is not None and serving.agent is not None
    assert serving.control_plane.pid in processes_of(CONTROL_PLANE.user)
    assert serving.agent.pid in processes_of(AGENT.user)


def test_the_keys_and_the_store_the_services_write_are_theirs_alone(serving: Machine) -> None:
    # Keys are 0600; certificates and the agent's id may be 0644, inside folders no one else can enter (0700).
    for state, user in ((AGENT_STATE, AGENT.user), (CP_STATE, CONTROL_PLANE.user)):
        folders = [state, *(p for p in state.rglob("*") if p.is_dir())]
        assert [(p, *mode_and_owner(p)[:2]) for p in folders] == [(p, 0o700, user) for p in folders]
        files = [p for p in state.rglob("*") if p.is_file()]
        assert {mode_and_owner(p)[1] for p in files} == {user}
        keys = [p for p in files if p.suffix == ".key"]
        assert [(p, mode_and_owner(p)[0]) for p in keys] == [(p, 0o600) for p in keys]
    assert {p.name for p in AGENT_STATE.iterdir()} >= {"agent.key", "agent.pem", "agent.json"}
    assert {p.name for p in (CP_STATE / "ca").iterdir()} >= {"ca.key", "ca.pem"}


def test_an_upgrade_installs_the_newer_version_over_the_running_one(upgraded: Upgrade) -> None:
    newer = upgraded.machine.newer.python.version
    assert newer == project_version(ROOT) + NEWER_LABEL
    for spec in PACKAGES:
        assert package_status(spec.name) == "install ok installed"
        version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", spec.name], capture_output=True, text=True,
                                 check=True).stdout
        assert version == debian_version(newer)
    # Both old processes drained and exited cleanly on SIGTERM, as systemd's try-restart stops them.
    assert upgraded.exits == (0, 0)


def test_an_upgrade_keeps_the_agents_identity_and_both_configs_byte_for_byte(upgraded: Upgrade) -> None:
    assert upgraded.after.files.keys() == upgraded.before.files.keys()
    assert {str(AGENT_STATE / "agent.json"), str(AGENT_CONFIG / "agent.yaml"), str(CP_CONFIG / "env"),
            str(CP_STATE / "ca" / "ca.key")} <= upgraded.before.files.keys()
    assert upgraded.after == upgraded.before


def test_after_an_upgrade_the_same_enrolled_agent_answers_on_the_new_version(upgraded: Upgrade) -> None:
    assert upgraded.rows_after == upgraded.rows_before == [{"id": 1, "name": "Ada"}, {"id": 2, "name": "Grace"}]
    agent_id = json.loads(upgraded.before.files[str(AGENT_STATE / "agent.json")])["agent_id"]
    [agent] = [a for a in upgraded.agents if a.get("agent_id") == agent_id and a.get("state") == "AGENT_STATE_ACTIVE"]
    assert agent["version"] == upgraded.machine.newer.python.version


def test_remove_keeps_the_config_the_identity_and_the_users(removed: Upgrade) -> None:
    for spec in PACKAGES:
        assert package_status(spec.name) == "deinstall ok config-files"
        assert user_exists(spec.user)
    assert not Path("/opt/onprem").exists()
    assert not Path("/usr/bin/onprem-agent").exists()
    assert Snapshot.take() == removed.after


def test_purge_leaves_nothing_of_either_package(purged: Upgrade) -> None:
    for spec in PACKAGES:
        assert package_status(spec.name) in ("", "unknown ok not-installed", "deinstall ok not-installed")
        assert not user_exists(spec.user)
        assert not group_exists(spec.user)
    assert [str(path) for path in EVERY_PATH if path.exists() or path.is_symlink()] == []
