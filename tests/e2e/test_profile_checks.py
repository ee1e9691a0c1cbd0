"""`AgentService/CheckProfile`: an agent checks its profiles on request, through the tunnel."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from onprem.v1 import agents_pb2, profiles_pb2
from tests.support.postgres import PostgresServer
from tools.cluster import (
    AgentProcess,
    ControlPlaneProcess,
    agents_stub,
    bearer,
    operator_channel,
    wait_for_agent_state,
)

DATABASE, FOLDER, APP = (profiles_pb2.PROFILE_KIND_DATABASE, profiles_pb2.PROFILE_KIND_FOLDER,
                         profiles_pb2.PROFILE_KIND_APP)


class _Guarded(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.headers.get("X-Key") == "right" else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Iterator[tuple[ControlPlaneProcess, str]]:
    base = tmp_path_factory.mktemp("checks")
    sqlite3.connect(base / "ok.db").close()
    (base / "files").mkdir()
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Guarded)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    app_url = f"http://127.0.0.1:{http.server_address[1]}/"
    cp = ControlPlaneProcess(base / "cp")
    cp.start()
    token = cp.admin_token()
    agent = AgentProcess(base / "agent", cp, profiles={
        "databases": {
            "good": {"url": f"sqlite:///{base / 'ok.db'}"},
            "badpw": {"url": postgres.url(with_password=False), "password_env": "WRONG_PW"},
        },
        "folders": {"files": {"root": str(base / "files")}},
        "apps": {
            "app-ok": {"base_url": app_url, "headers_from_env": {"X-Key": "GOOD_KEY"}},
            "app-bad": {"base_url": app_url, "headers_from_env": {"X-Key": "BAD_KEY"}},
        },
    }, env={"WRONG_PW": "not-the-password", "GOOD_KEY": "right", "BAD_KEY": "wrong"})
    agent.enroll("checks")
    agent.start()

    async def ready() -> None:
        async with operator_channel(cp) as channel:
            await wait_for_agent_state(channel, token, agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)

    asyncio.run(ready())
    yield cp, token
    agent.stop()
    cp.stop()
    http.shutdown()


async def check(cp: ControlPlaneProcess, token: str, profile: str, kind: profiles_pb2.ProfileKind) -> profiles_pb2.CheckProfileResponse:
    async with operator_channel(cp) as channel:
        return await agents_stub(channel).CheckProfile(
            profiles_pb2.CheckProfileRequest(group="checks", profile=profile, kind=kind), metadata=bearer(token))


async def test_a_working_database_profile_passes(checked: tuple[ControlPlaneProcess, str]) -> None:
    result = await check(*checked, "good", DATABASE)
    assert result.ok and result.agent_id.startswith("agent-")


async def test_a_database_profile_with_a_wrong_password_fails_without_showing_it(
    checked: tuple[ControlPlaneProcess, str],
) -> None:
    result = await check(*checked, "badpw", DATABASE)
    assert not result.ok
    assert "password authentication failed" in result.checks[-1].message
    assert "not-the-password" not in str(result)


async def test_a_folder_profile_reports_root_and_permissions(checked: tuple[ControlPlaneProcess, str]) -> None:
    result = await check(*checked, "files", FOLDER)
    assert [(c.name, c.ok) for c in result.checks] == [("root exists", True), ("readable", True), ("writable", True)]


async def test_an_app_profile_whose_credentials_are_refused_says_so(checked: tuple[ControlPlaneProcess, str]) -> None:
    good, bad = await check(*checked, "app-ok", APP), await check(*checked, "app-bad", APP)
    assert good.ok
    assert [(c.name, c.ok) for c in bad.checks] == [("reachable", True), ("credentials", False)]
    assert "HTTP 401" in bad.checks[1].message


async def test_checking_an_unknown_profile_is_not_found(checked: tuple[ControlPlaneProcess, str]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check(*checked, "nope", FOLDER)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_check_without_a_kind_is_invalid(checked: tuple[ControlPlaneProcess, str]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check(*checked, "good", profiles_pb2.PROFILE_KIND_UNSPECIFIED)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
