"""A control plane reachable from a network namespace, and an agent and a
PostgreSQL server running inside one: the pieces of the network tests.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.postgres import PASSWORD, PostgresServer
from tools.cluster import ControlPlaneProcess
from tools.netns import Namespace, NetLab, probe_tcp, wait_for_tcp
from tools.ports import free_port

BIN = Path(sys.executable).parent


@dataclass
class NetControlPlane(ControlPlaneProcess):
    """A control plane whose agent and enrollment listeners are on `host` (a veth address), with a
    server certificate that names it; the operator API stays on 127.0.0.1 for the test process.

    tools/cluster.py binds everything to 127.0.0.1, so `start` is its own here.
    """

    host: str = "127.0.0.1"

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir.parent / f"{self.state_dir.name}.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "onprem-control-plane"), "--log-level", "DEBUG", "serve", *self._common(),
                 "--operator-listen", f"127.0.0.1:{self.operator_port}",
                 "--agent-listen", f"{self.host}:{self.agent_port}",
                 "--enroll-listen", f"{self.host}:{self.enroll_port}",
                 "--hostname", "localhost", "--hostname", "127.0.0.1", "--hostname", self.host,
                 "--grace-period", "5", *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT,
            )
        wait_for_tcp("127.0.0.1", self.operator_port, self.proc)
        for port in (self.agent_port, self.enroll_port):
            wait_for_tcp(self.host, port, self.proc)


def control_plane_on(state_dir: Path, host: str) -> NetControlPlane:
    """A control plane that agents reach at `host`."""
    return NetControlPlane(state_dir, host=host)


@dataclass
class NamespacedAgent:
    """An `onprem-agent` whose enroll and run commands execute inside a namespace."""

    lab: NetLab
    namespace: Namespace
    home: Path
    control_plane: ControlPlaneProcess
    #: The control plane's host as the agent dials it.
    cp_host: str
    profiles: dict[str, Any]
    name: str = "agent"
    proxy: str | None = None
    proxy_username: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_file(self) -> Path:
        return self.home / "agent.yaml"

    @property
    def log_file(self) -> Path:
        return self.home / "agent.log"

    def write_config(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cp: dict[str, Any] = {
            "address": f"{self.cp_host}:{self.control_plane.agent_port}",
            "enroll_address": f"{self.cp_host}:{self.control_plane.enroll_port}",
            "ca_file": str(self.control_plane.ca_file),
        }
        if self.proxy:
            cp["proxy"] = self.proxy
        if self.proxy_username:
            cp |= {"proxy_username": self.proxy_username, "proxy_password_env": "ONPREM_TEST_PROXY_PW"}
        config = {"control_plane": cp, "identity_dir": str(self.home / "identity"), "name": self.name,
                  "drain_grace_seconds": 2, "profiles": self.profiles}
        self.config_file.write_text(yaml.safe_dump(config))

    def enroll(self, group: str) -> subprocess.CompletedProcess[str]:
        """Enroll from inside the namespace (through the proxy, when there is one); never raises."""
        self.write_config()
        token = self.control_plane.enrollment_token(group)
        return subprocess.run(
            [*self.namespace.prefix(), str(BIN / "onprem-agent"), "enroll", "--config", str(self.config_file),
             "--token", token],
            capture_output=True, text=True, timeout=60, env={**os.environ, **self.env},
        )

    @property
    def agent_id(self) -> str:
        return str(json.loads((self.home / "identity" / "agent.json").read_text())["agent_id"])

    def start(self) -> None:
        self.write_config()
        self.proc = self.lab.popen(
            self.namespace,
            [str(BIN / "onprem-agent"), "--log-level", "DEBUG", "run", "--config", str(self.config_file)],
            log=self.log_file, env=self.env,
        )

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


def _pg_bindir() -> Path:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("PostgreSQL server binaries not found: install the 'postgresql' package")


@contextmanager
def postgres_in(namespace: Namespace, listen: str) -> Iterator[PostgresServer]:
    """A PostgreSQL server running inside `namespace`, on 127.0.0.1 and on `listen` (a veth address).

    Like tests/support/postgres.py's `running_postgres`, but the server (run as the
    `postgres` user when we are root) starts with `ip netns exec`, so it lives in the
    namespace's network stack. The server returned is addressed at 127.0.0.1, as seen
    from inside the namespace.
    """
    bindir = _pg_bindir()
    root = Path(tempfile.mkdtemp(prefix="onprem-nspg-"))
    data, sock = root / "data", root / "sock"
    data.mkdir()
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for p in (root, data, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD)
    if os.geteuid() == 0:
        os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
    port = free_port()  # the namespace has its own ports; any number is free there
    subprocess.run(
        [*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "onprem", "--pwfile", str(pwfile),
         "-A", "scram-sha-256", "--no-sync", "-E", "UTF8", "--locale", "C"],
        check=True, capture_output=True,
    )
    (data / "pg_hba.conf").write_text(
        "local all all scram-sha-256\nhost all all 0.0.0.0/0 scram-sha-256\n")
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1,{listen} -c fsync=off"
    pg_ctl = [*namespace.prefix(), *prefix, str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run([*pg_ctl, "-o", opts, "-l", str(root / "log"), "-w", "start"],
                       check=True, capture_output=True, timeout=60)
        # Seen from inside the namespace, the server accepts on both addresses.
        deadline = time.monotonic() + 10
        while probe_tcp(listen, port, 1.0, namespace) != "connected":
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL does not accept on {listen}:{port} in {namespace.name}")
            time.sleep(0.1)
        yield PostgresServer("127.0.0.1", port, "onprem", PASSWORD, "postgres")
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
