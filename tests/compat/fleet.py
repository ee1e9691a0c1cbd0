"""A control plane and agents as real processes, each from the installation a test names.

Only flags and config keys that the released version knows are used, because the point is to run the
commands a site already has (its unit's ExecStart, its agent.yaml) against the other version.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml

from onprem.v1 import agents_pb2, agents_pb2_grpc
from tests.compat.installs import Install
from tools.ports import free_port

APP_KEY = "compat-app-key"
START_TIMEOUT = 60.0


def wait_until(what: str, condition: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout:.0f} s")


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM, as a service manager stops it; SIGKILL if it does not exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Site:
    """What the agents expose: a SQLite database, a folder and an HTTP app, shared by every version."""

    directory: Path
    app_port: int = 0
    app: subprocess.Popen[bytes] | None = None

    def start(self) -> Site:
        self.directory.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(self.directory / "site.db") as db:
            db.executescript("""
                CREATE TABLE IF NOT EXISTS customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
                INSERT OR IGNORE INTO customers VALUES (1, 'Acme GmbH'), (2, 'Globex Ltd'), (3, 'Initech');
            """)
        (self.directory / "files").mkdir(exist_ok=True)
        (self.directory / "files" / "report.csv").write_bytes(b"customer,total\nAcme GmbH,1314.99\n")
        self.app_port = free_port()
        self.app = subprocess.Popen([sys.executable, "-m", "tools.demo.http_app", "--port", str(self.app_port)],
                                    env={**os.environ, "DEMO_APP_KEY": APP_KEY},
                                    cwd=Path(__file__).resolve().parents[2])
        wait_until("the site's HTTP app listens", lambda: listening(self.app_port))
        return self

    def stop(self) -> None:
        if self.app is not None:
            stop(self.app)

    def profiles(self) -> dict[str, object]:
        return {
            "databases": {"site-db": {"url": f"sqlite:///{self.directory / 'site.db'}", "read_only": True}},
            "folders": {"site-files": {"root": str(self.directory / "files"), "read_only": True}},
            "apps": {"site-app": {"base_url": f"http://127.0.0.1:{self.app_port}/api/",
                                  "headers_from_env": {"X-Api-Key": "DEMO_APP_KEY"}}},
        }


@dataclass
class ControlPlane:
    install: Install
    state_dir: Path
    log: Path
    operator_port: int = field(default_factory=free_port)
    agent_port: int = field(default_factory=free_port)
    enroll_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    token: str = ""

    @property
    def operator(self) -> str:
        return f"127.0.0.1:{self.operator_port}"

    @property
    def ca_pem(self) -> bytes:
        return (self.state_dir / "ca" / "ca.pem").read_bytes()

    def cli(self, *args: str) -> str:
        out = subprocess.run([self.install.command("onprem-control-plane"), args[0], "--state-dir", str(self.state_dir),
                              *args[1:]], check=True, capture_output=True, text=True, timeout=60)
        return out.stdout.strip()

    def start(self) -> ControlPlane:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [self.install.command("onprem-control-plane"), "serve", "--state-dir", str(self.state_dir),
                 "--operator-listen", self.operator, "--agent-listen", f"127.0.0.1:{self.agent_port}",
                 "--enroll-listen", f"127.0.0.1:{self.enroll_port}", "--grace-period", "5"],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.state_dir.parent)
        wait_until(f"the control plane {self.install.version} listens (see {self.log})",
                   lambda: self._alive() and listening(self.operator_port) and listening(self.agent_port))
        if not self.token:
            token_file = self.state_dir.parent / "admin.token"
            self.cli("create-admin-token", "--name", "compat-admin", "--no-expiry", "--output", str(token_file))
            self.token = token_file.read_text().strip()
        return self

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the control plane {self.install.version} exited with {self.proc.returncode}; "
                                 f"see {self.log}")
        return True

    def stop(self) -> int:
        return stop(self.proc) if self.proc is not None else 0

    def channel(self) -> grpc.Channel:
        return grpc.secure_channel(self.operator, grpc.ssl_channel_credentials(self.ca_pem))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    def agents(self, group: str) -> list[agents_pb2.Agent]:
        with self.channel() as channel:
            return list(agents_pb2_grpc.AgentServiceStub(channel).ListAgents(
                agents_pb2.ListAgentsRequest(group=group), metadata=self.metadata(), timeout=10).agents)

    def wait_for_active(self, group: str, agent_id: str, version: str) -> agents_pb2.Agent:
        found: list[agents_pb2.Agent] = []

        def active() -> bool:
            found[:] = [a for a in self.agents(group) if a.agent_id == agent_id
                        and a.state == agents_pb2.AGENT_STATE_ACTIVE and a.version == version]
            return bool(found)

        wait_until(f"agent {agent_id} {version} is ACTIVE in {group}", active)
        return found[0]


@dataclass
class Agent:
    """One agent's home: its config and identity survive a change of installation (an upgrade)."""

    name: str
    home: Path
    group: str
    proc: subprocess.Popen[bytes] | None = None
    install: Install | None = None

    @property
    def config_file(self) -> Path:
        return self.home / "agent.yaml"

    @property
    def agent_id(self) -> str:
        identity = json.loads((self.home / "identity" / "agent.json").read_text())
        return str(identity["agent_id"])

    def configure(self, cp: ControlPlane, site: Site) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cp.state_dir / "ca" / "ca.pem", self.home / "ca.pem")
        self.config_file.write_text(yaml.safe_dump({
            "control_plane": {"address": f"127.0.0.1:{cp.agent_port}", "enroll_address": f"127.0.0.1:{cp.enroll_port}",
                              "ca_file": str(self.home / "ca.pem")},
            "identity_dir": str(self.home / "identity"),
            "name": self.name,
            "drain_grace_seconds": 10,
            "profiles": site.profiles(),
        }, sort_keys=False))

    def enroll(self, install: Install, cp: ControlPlane) -> None:
        token = cp.cli("create-enrollment-token", "--group", self.group, "--description", f"compat {self.name}")
        subprocess.run([install.command("onprem-agent"), "enroll", "--config", str(self.config_file), "--token", token],
                       check=True, capture_output=True, timeout=60, env={**os.environ, "DEMO_APP_KEY": APP_KEY})

    def start(self, install: Install) -> None:
        self.install = install
        with open(self.home / f"agent-{install.version}.log", "ab") as out:
            self.proc = subprocess.Popen(
                [install.command("onprem-agent"), "run", "--config", str(self.config_file)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.home, env={**os.environ, "DEMO_APP_KEY": APP_KEY})

    def stop(self) -> int:
        return stop(self.proc, timeout=30) if self.proc is not None else 0
