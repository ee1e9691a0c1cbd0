"""The agent as a service: health in status, reload, systemd notify, JSON logs, doctor, certificate renewal,
and a control plane that shuts down cleanly."""

from __future__ import annotations

import asyncio
import configparser
import datetime as dt
import json
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onprem.tunnel.aio import EOF
from onprem.v1 import agents_pb2, database_pb2
from tests.support.postgres import PostgresServer
from tools.cluster import (
    AgentProcess,
    ControlPlaneProcess,
    agents_stub,
    bearer,
    database_stub,
    operator_channel,
    wait_for_agent_state,
)

ROOT = Path(__file__).resolve().parents[2]
ACTIVE = agents_pb2.AGENT_STATE_ACTIVE


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    process = ControlPlaneProcess(tmp_path / "cp")
    process.start()
    yield process
    process.stop()


def sqlite_profile(path: Path) -> dict[str, str]:
    sqlite3.connect(path).close()
    return {"url": f"sqlite:///{path}"}


async def get_agent(cp: ControlPlaneProcess, token: str, agent_id: str) -> agents_pb2.Agent:
    async with operator_channel(cp) as channel:
        return (await agents_stub(channel).GetAgent(
            agents_pb2.GetAgentRequest(agent_id=agent_id), metadata=bearer(token))).agent


async def eventually(probe: object, within: float = 30) -> None:
    """Poll an async predicate until it holds (a hang guard, not a timing claim)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if await probe():  # type: ignore[operator]
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the condition never held")


async def test_status_shows_each_profiles_health_so_an_unreachable_database_is_visible(
    cp: ControlPlaneProcess, tmp_path: Path, postgres: PostgresServer,
) -> None:
    token = cp.admin_token()
    agent = AgentProcess(tmp_path / "agent", cp, profiles={"databases": {
        "good": sqlite_profile(tmp_path / "good.db"),
        "bad": {"url": postgres.url(with_password=False), "password_env": "PW"},
    }}, env={"PW": "wrong"}, extra_config={"health_check_interval_seconds": 2})
    agent.enroll("svc")
    agent.start()
    try:
        async def both_checked() -> bool:
            return len((await get_agent(cp, token, agent.agent_id)).profile_health) == 2

        await eventually(both_checked)
        status = await get_agent(cp, token, agent.agent_id)
        health = {h.profile: h for h in status.profile_health}
        assert status.state == ACTIVE
        assert health["good"].ok
        assert not health["bad"].ok
        assert "password authentication failed" in health["bad"].checks[-1].message
        assert status.uptime.ToTimedelta().total_seconds() > 0
        assert status.version and status.hostname and status.session_id
    finally:
        agent.stop()


async def test_sighup_reloads_profiles_without_dropping_the_stream(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    token = cp.admin_token()
    agent = AgentProcess(tmp_path / "agent", cp, profiles={"databases": {"one": sqlite_profile(tmp_path / "1.db")}})
    agent.enroll("svc")
    agent.start()
    try:
        async with operator_channel(cp) as channel:
            before = await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)
        config = yaml.safe_load(agent.config_file.read_text())
        config["profiles"]["databases"]["two"] = sqlite_profile(tmp_path / "2.db")
        agent.config_file.write_text(yaml.safe_dump(config))
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)

        async def advertised() -> bool:
            return {p.name for p in (await get_agent(cp, token, agent.agent_id)).profiles} == {"one", "two"}

        await eventually(advertised)
        after = await get_agent(cp, token, agent.agent_id)
        assert after.session_id == before.session_id  # the same stream: nothing was dropped
        async with operator_channel(cp) as channel:
            rows = [r async for r in database_stub(channel).Query(
                database_pb2.QueryRequest(group="svc", profile="two", sql="SELECT 2"), metadata=bearer(token))]
        assert rows[-1].summary.row_count == 1
    finally:
        agent.stop()


async def test_a_bad_config_on_reload_keeps_the_running_one(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    token = cp.admin_token()
    agent = AgentProcess(tmp_path / "agent", cp, profiles={"databases": {"one": sqlite_profile(tmp_path / "1.db")}})
    agent.enroll("svc")
    agent.start()
    try:
        async with operator_channel(cp) as channel:
            await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)
        agent.config_file.write_text("profiles: [this is not valid")
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(1)
        assert agent.proc.poll() is None
        assert [p.name for p in (await get_agent(cp, token, agent.agent_id)).profiles] == ["one"]
        assert "reload refused, keeping the running config" in (tmp_path / "agent" / "agent.log").read_text()
    finally:
        agent.stop()


def test_the_agent_speaks_the_systemd_notify_protocol(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    agent = AgentProcess(tmp_path / "agent", cp, profiles={"databases": {"one": sqlite_profile(tmp_path / "1.db")}},
                         env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"})
    agent.enroll("svc")
    agent.start()
    assert agent.proc is not None
    try:
        def receive_until(wanted: str) -> list[str]:
            seen: list[str] = []
            while True:
                message = sock.recv(4096).decode()
                seen.extend(message.splitlines())
                if wanted in seen:
                    return seen

        assert "READY=1" in receive_until("READY=1")
        assert "WATCHDOG=1" in receive_until("WATCHDOG=1")
        agent.proc.send_signal(signal.SIGHUP)
        reload = receive_until("RELOADING=1")
        assert "RELOADING=1" in reload
        assert "READY=1" in receive_until("READY=1")
        agent.proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in receive_until("STOPPING=1")
        assert agent.proc.wait(30) == 0
    finally:
        agent.stop()
        sock.close()


def test_the_control_plane_speaks_the_systemd_notify_protocol(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    cp = ControlPlaneProcess(tmp_path / "cp", env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"})
    cp.start()
    assert cp.proc is not None
    try:
        def receive_until(wanted: str) -> list[str]:
            seen: list[str] = []
            while True:
                seen.extend(sock.recv(4096).decode().splitlines())
                if wanted in seen:
                    return seen

        ready = receive_until("READY=1")
        assert any(line.startswith("STATUS=serving: operator 127.0.0.1:") for line in ready)
        assert "WATCHDOG=1" in receive_until("WATCHDOG=1")
        cp.proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in receive_until("STOPPING=1")
        assert cp.proc.wait(30) == 0
    finally:
        cp.stop()
        sock.close()


def test_json_logs_are_one_object_per_line(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent", cp, profiles={"databases": {"one": sqlite_profile(tmp_path / "1.db")}},
                         extra_args=["--log-format", "json"])
    agent.enroll("svc")
    agent.start()
    log = tmp_path / "agent" / "agent.log"
    try:
        for _ in range(100):
            if "connected to" in log.read_text():
                break
            asyncio.run(asyncio.sleep(0.1))
    finally:
        agent.stop()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(entry) for entry in lines)
    assert any(entry["msg"].startswith("connected to") for entry in lines)


def test_doctor_checks_the_control_plane_the_certificate_and_every_profile(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent", cp, profiles={
        "databases": {"one": sqlite_profile(tmp_path / "1.db")},
        "folders": {"gone": {"root": str(tmp_path)}},
    })
    agent.enroll("svc")
    doctor = [str(Path(sys.executable).parent / "onprem-agent"), "doctor", "--config", str(agent.config_file)]
    ok = subprocess.run(doctor, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "✓ certificate issuer: signed by the control plane's CA" in ok.stdout
    assert "✓ control plane:" in ok.stdout
    assert "✓ database profile one: " in ok.stdout
    cp.stop()
    down = subprocess.run(doctor, capture_output=True, text=True, timeout=60)
    assert down.returncode == 1
    assert "✗ control plane: cannot reach" in down.stdout


async def test_certificates_renew_over_the_tunnel_without_dropping_the_stream(tmp_path: Path) -> None:
    # Certificates of about 24 s: renewed after two thirds of that, while the stream stays up.
    cp = ControlPlaneProcess(tmp_path / "cp", extra_args=["--agent-cert-days", "0.00028"])
    cp.start()
    token = cp.admin_token()
    agent = AgentProcess(tmp_path / "agent", cp, profiles={"databases": {"one": sqlite_profile(tmp_path / "1.db")}})
    agent.enroll("renew")
    agent.start()
    try:
        async with operator_channel(cp) as channel:
            first = await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)

            async def renewed() -> bool:
                agent_now = await get_agent(cp, token, agent.agent_id)
                return agent_now.certificate_expires_at.ToDatetime() > first.certificate_expires_at.ToDatetime()

            await eventually(renewed, within=40)
            now = await get_agent(cp, token, agent.agent_id)
            assert now.session_id == first.session_id
            rows = [r async for r in database_stub(channel).Query(
                database_pb2.QueryRequest(group="renew", profile="one", sql="SELECT 1"), metadata=bearer(token))]
            assert rows[-1].summary.row_count == 1
        # The old certificate has expired by now: a reconnect must use the renewed one.
        first_expiry = first.certificate_expires_at.ToDatetime(dt.UTC)
        await asyncio.sleep(max(0.0, (first_expiry - dt.datetime.now(dt.UTC)).total_seconds() + 1))
        cp.stop()
        cp.start()
        async with operator_channel(cp) as channel:
            again = await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE, within=60)
        assert again.session_id != first.session_id
    finally:
        agent.stop()
        cp.stop()


async def test_sigterm_on_the_control_plane_reports_not_serving_and_finishes_in_flight_requests(
    cp: ControlPlaneProcess, tmp_path: Path,
) -> None:
    token = cp.admin_token()
    agent = AgentProcess(tmp_path / "agent", cp, profiles={"databases": {"one": sqlite_profile(tmp_path / "1.db")}})
    agent.enroll("svc")
    agent.start()
    try:
        async with operator_channel(cp) as channel:
            await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            slow = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 4000000) "
                    "SELECT max(i) FROM n")
            query = database_stub(channel).Query(
                database_pb2.QueryRequest(group="svc", profile="one", sql=slow), metadata=bearer(token))
            header = await query.read()
            assert isinstance(header, database_pb2.QueryResponse)
            cp.send_signal(signal.SIGTERM)
            status = await watch.read()
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            last: object = header
            while (message := await query.read()) is not EOF:
                last = message
            assert isinstance(last, database_pb2.QueryResponse) and last.summary.row_count == 1
        assert cp.proc is not None
        assert await asyncio.to_thread(cp.proc.wait, 30) == 0
    finally:
        agent.stop()


def test_the_systemd_unit_confines_the_agent() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "systemd" / "onprem-agent.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["User"] == "onprem-agent"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == "onprem-agent"
    assert "ReadWritePaths" in service
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "WatchdogSec" in service
    assert "run --config /etc/onprem-agent/agent.yaml" in service["ExecStart"]


def test_the_systemd_unit_confines_the_control_plane() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "systemd" / "onprem-control-plane.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["User"] == "onprem-control-plane"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == "onprem-control-plane"
    assert service["StateDirectoryMode"] == "0700"
    assert service["ReadWritePaths"] == "/var/lib/onprem-control-plane"
    assert service["CapabilityBoundingSet"] == ""
    assert "WatchdogSec" in service
    assert service["ExecStart"].endswith("serve --state-dir /var/lib/onprem-control-plane $ONPREM_SERVE_ARGS")


async def test_both_processes_serve_prometheus_metrics(tmp_path: Path) -> None:
    from tools.ports import free_port

    cp_port, agent_port = free_port(), free_port()
    cp = ControlPlaneProcess(tmp_path / "cp", extra_args=["--metrics-listen", f"127.0.0.1:{cp_port}"])
    cp.start()
    token = cp.admin_token()
    agent = AgentProcess(tmp_path / "agent", cp, profiles={"databases": {"one": sqlite_profile(tmp_path / "1.db")}},
                         extra_config={"metrics_listen": f"127.0.0.1:{agent_port}"})
    agent.enroll("metrics")
    agent.start()
    try:
        async with operator_channel(cp) as channel:
            await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)
            for _ in range(3):
                _ = [r async for r in database_stub(channel).Query(
                    database_pb2.QueryRequest(group="metrics", profile="one", sql="SELECT 1"), metadata=bearer(token))]
            with pytest.raises(grpc.aio.AioRpcError):
                _ = [r async for r in database_stub(channel).Query(
                    database_pb2.QueryRequest(group="metrics", profile="one", sql="SELEC nonsense"),
                    metadata=bearer(token))]

        def scrape(port: int) -> str:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                return str(response.read().decode())

        cp_metrics, agent_metrics = scrape(cp_port), scrape(agent_port)
        assert 'onprem_requests_total{code="OK",kind="database",method="Query"} 3.0' in cp_metrics
        assert 'onprem_requests_total{code="INVALID_ARGUMENT",kind="database",method="Query"} 1.0' in cp_metrics
        assert 'onprem_agents{group="metrics",state="active"} 1.0' in cp_metrics
        assert "onprem_request_duration_seconds_bucket" in cp_metrics
        assert 'onprem_agent_requests_total{code="OK",kind="database_query"} 3.0' in agent_metrics
        assert "onprem_agent_connected 1.0" in agent_metrics
    finally:
        agent.stop()
        cp.stop()


def test_a_notify_socket_nobody_reads_never_blocks_the_agent(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    sock_path = tmp_path / "deaf.sock"
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf.bind(str(sock_path))  # bound, never read: its small queue fills up at once
    token = cp.admin_token()
    agent = AgentProcess(tmp_path / "agent", cp, profiles={"databases": {"one": sqlite_profile(tmp_path / "1.db")}},
                         env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "100000"})
    agent.enroll("svc")
    agent.start()
    try:
        async def serving() -> None:
            async with operator_channel(cp) as channel:
                await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)
                await asyncio.sleep(2)  # dozens of watchdog pings into the full queue
                rows = [r async for r in database_stub(channel).Query(
                    database_pb2.QueryRequest(group="svc", profile="one", sql="SELECT 1"), metadata=bearer(token))]
                assert rows[-1].summary.row_count == 1

        asyncio.run(serving())
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(30) == 0
    finally:
        agent.stop()
        deaf.close()
