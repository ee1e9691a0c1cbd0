"""Real control-plane and agent processes, for end-to-end tests and benchmarks.

Each process is started from the installed console scripts, on free
loopback ports, with its own state folder; tests stop them with real
signals (SIGTERM, SIGKILL) and the fixtures clean up whatever is left.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from onprem.v1 import agents_pb2, agents_pb2_grpc, database_pb2_grpc
from tools.ports import free_port

BIN = Path(sys.executable).parent

#: Every process started here, so that none outlives its test run, even when a fixture
#: fails halfway through its setup and never reaches its own cleanup.
_STARTED: list[subprocess.Popen[bytes]] = []


def _kill_leftovers() -> None:
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


atexit.register(_kill_leftovers)


def _stop(proc: subprocess.Popen[bytes] | None, sig: signal.Signals, timeout: float) -> int:
    """Signal a process and return its exit code; SIGKILL it if it outlasts `timeout`."""
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc else 0
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _bin(name: str) -> str:
    return str(BIN / name)


@dataclass
class ControlPlaneProcess:
    state_dir: Path
    operator_port: int = field(default_factory=free_port)
    agent_port: int = field(default_factory=free_port)
    enroll_port: int = field(default_factory=free_port)
    database_url: str | None = None
    extra_args: list[str] = field(default_factory=list)
    #: DEBUG by default so a failing test's log says everything; benchmarks pass INFO, what a service runs at.
    log_level: str = "DEBUG"
    #: More environment for the serving process, e.g. OTEL_*, ONPREM_LOG_FORMAT or NOTIFY_SOCKET.
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.state_dir.parent / f"{self.state_dir.name}.log"

    @property
    def operator_address(self) -> str:
        return f"127.0.0.1:{self.operator_port}"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "ca" / "ca.pem"

    def _common(self) -> list[str]:
        args = ["--state-dir", str(self.state_dir)]
        if self.database_url:
            args += ["--database-url", self.database_url]
        return args

    def start(self) -> None:
        log = open(self.log_file, "ab")  # noqa: SIM115
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [_bin("onprem-control-plane"), "--log-level", self.log_level, "serve", *self._common(),
             "--operator-listen", f"127.0.0.1:{self.operator_port}",
             "--agent-listen", f"127.0.0.1:{self.agent_port}",
             "--enroll-listen", f"127.0.0.1:{self.enroll_port}",
             "--grace-period", "5", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
        )
        _STARTED.append(self.proc)
        for port in (self.operator_port, self.agent_port, self.enroll_port):
            _wait_for_port(port, self.proc)

    def admin_token(self, name: str = "admin") -> str:
        return self.cli("create-admin-token", "--name", name)

    def token(self, name: str, role: str, groups: str) -> str:
        return self.cli("create-token", "--name", name, "--role", role, "--groups", groups)

    def enrollment_token(self, group: str) -> str:
        return self.cli("create-enrollment-token", "--group", group)

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [_bin("onprem-control-plane"), args[0], *self._common(), *args[1:]],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> int:
        return _stop(self.proc, sig, timeout)


@dataclass
class AgentProcess:
    home: Path
    control_plane: ControlPlaneProcess
    profiles: dict[str, Any]
    name: str = "agent"
    max_in_flight: int = 64
    env: dict[str, str] = field(default_factory=dict)
    #: More top-level keys for the agent's YAML config.
    extra_config: dict[str, Any] = field(default_factory=dict)
    #: More arguments for `onprem-agent` before `run`, e.g. ["--log-format", "json"].
    extra_args: list[str] = field(default_factory=list)
    #: As for the control plane: DEBUG for tests, INFO for benchmarks.
    log_level: str = "DEBUG"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_file(self) -> Path:
        return self.home / "agent.yaml"

    def write_config(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        config = {
            "control_plane": {
                "address": f"127.0.0.1:{self.control_plane.agent_port}",
                "enroll_address": f"127.0.0.1:{self.control_plane.enroll_port}",
                "ca_file": str(self.control_plane.ca_file),
            },
            "identity_dir": str(self.home / "identity"),
            "max_in_flight": self.max_in_flight,
            "name": self.name,
            "profiles": self.profiles,
            **self.extra_config,
        }
        self.config_file.write_text(yaml.safe_dump(config))

    def enroll(self, group: str, token: str | None = None, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        self.write_config()
        token = token or self.control_plane.enrollment_token(group)
        result = subprocess.run(
            [_bin("onprem-agent"), "enroll", "--config", str(self.config_file), "--token", token],
            capture_output=True, text=True, env={**os.environ, **self.env},
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"enrollment failed ({result.returncode}): {result.stderr.strip()}")
        return result

    @property
    def agent_id(self) -> str:
        import json

        return str(json.loads((self.home / "identity" / "agent.json").read_text())["agent_id"])

    def start(self) -> None:
        log = open(self.home / "agent.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [_bin("onprem-agent"), "--log-level", self.log_level, *self.extra_args, "run", "--config", str(self.config_file)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
        )
        _STARTED.append(self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> int:
        return _stop(self.proc, sig, timeout)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {timeout} s")


@asynccontextmanager
async def operator_channel(cp: ControlPlaneProcess) -> AsyncIterator[grpc.aio.Channel]:
    creds = grpc.ssl_channel_credentials(root_certificates=cp.ca_file.read_bytes())
    async with grpc.aio.secure_channel(cp.operator_address, creds) as channel:
        yield channel


def database_stub(channel: grpc.aio.Channel) -> database_pb2_grpc.DatabaseServiceAsyncStub:
    # Typed through an aio channel, the generated stub's overload gives the async flavour.
    return database_pb2_grpc.DatabaseServiceStub(channel)


def agents_stub(channel: grpc.aio.Channel) -> agents_pb2_grpc.AgentServiceAsyncStub:
    return agents_pb2_grpc.AgentServiceStub(channel)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def wait_for_agent_state(
    channel: grpc.aio.Channel, token: str, agent_id: str, state: int, within: float = 30
) -> agents_pb2.Agent:
    stub = agents_stub(channel)
    deadline = time.monotonic() + within
    agent = None
    while time.monotonic() < deadline:
        agent = (await stub.GetAgent(agents_pb2.GetAgentRequest(agent_id=agent_id), metadata=bearer(token))).agent
        if agent.state == state:
            return agent
        await asyncio.sleep(0.1)
    raise TimeoutError(f"agent {agent_id} did not reach state {state} within {within} s (last: {agent})")
