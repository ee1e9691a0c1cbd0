"""Who may connect and call: enrollment, mTLS on the tunnel, revocation, tokens and groups."""

from __future__ import annotations

import datetime as dt
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from onprem.agent.identity import load_identity, make_key_and_csr
from onprem.control_plane.ca import CertificateAuthority
from onprem.v1 import agents_pb2, database_pb2, tunnel_pb2, tunnel_pb2_grpc
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

ACTIVE, REVOKED = agents_pb2.AGENT_STATE_ACTIVE, agents_pb2.AGENT_STATE_REVOKED


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    process = ControlPlaneProcess(tmp_path_factory.mktemp("sec") / "cp")
    process.start()
    yield process
    process.stop()


def sqlite_agent(cp: ControlPlaneProcess, home: Path, name: str = "agent") -> AgentProcess:
    db = home.parent / f"{name}.db"
    return AgentProcess(home, cp, name=name, profiles={"databases": {"db": {"url": f"sqlite:///{db}"}}})


async def _connect(cp: ControlPlaneProcess, creds: grpc.ChannelCredentials) -> None:
    async with grpc.aio.secure_channel(f"127.0.0.1:{cp.agent_port}", creds) as channel:
        call = tunnel_pb2_grpc.AgentTunnelStub(channel).Connect()  # type: ignore[call-arg]
        await call.write(tunnel_pb2.ConnectRequest(hello=tunnel_pb2.Hello(protocol_revisions=[1],
                                                                          request_window_bytes=1 << 20)))
        await call.read()
        await call.read()  # raises the call's error status


def test_enrollment_with_an_unknown_token_is_refused(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    agent = sqlite_agent(cp, tmp_path / "a")
    result = agent.enroll("g", token="onpe_0123456789abcdef_" + "x" * 43, check=False)
    assert result.returncode == 1
    assert "PERMISSION_DENIED: the enrollment token is not valid" in result.stderr
    assert not (tmp_path / "a" / "identity" / "agent.pem").exists()


def test_an_enrollment_token_works_only_once(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    token = cp.enrollment_token("once")
    first = sqlite_agent(cp, tmp_path / "first").enroll("once", token=token, check=False)
    assert first.returncode == 0, first.stderr
    second = sqlite_agent(cp, tmp_path / "second").enroll("once", token=token, check=False)
    assert second.returncode == 1
    assert "was already used by agent" in second.stderr


def test_enrollment_keeps_the_private_key_on_the_host_and_private(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    agent = sqlite_agent(cp, tmp_path / "k")
    agent.enroll("keys")
    key = tmp_path / "k" / "identity" / "agent.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    identity = load_identity(tmp_path / "k" / "identity")
    assert identity.group == "keys"
    # The control plane's state holds no copy of the agent's key.
    assert all(key.read_bytes() not in p.read_bytes() for p in cp.state_dir.rglob("*") if p.is_file())


async def test_the_tunnel_refuses_a_client_without_a_certificate(cp: ControlPlaneProcess) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=cp.ca_file.read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _connect(cp, creds)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_tunnel_refuses_a_certificate_from_another_ca(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    rogue = CertificateAuthority.load_or_create(tmp_path / "rogue")
    key, csr = make_key_and_csr("rogue")
    cert = rogue.sign_agent_csr(csr, "agent-rogue", dt.timedelta(days=1))
    creds = grpc.ssl_channel_credentials(cp.ca_file.read_bytes(), key, cert.pem)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _connect(cp, creds)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_revoked_agent_is_cut_off_and_refused_on_reconnect(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    token = cp.admin_token()
    agent = sqlite_agent(cp, tmp_path / "r", name="to-revoke")
    agent.enroll("revoke")
    agent.start()
    try:
        async with operator_channel(cp) as channel:
            await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)
            response = await agents_stub(channel).RevokeAgent(
                agents_pb2.RevokeAgentRequest(agent_id=agent.agent_id, reason="laptop stolen"), metadata=bearer(token))
            assert response.agent.state == REVOKED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in database_stub(channel).Query(
                    database_pb2.QueryRequest(group="revoke", profile="db", sql="SELECT 1"), metadata=bearer(token)
                ):
                    pass
            # Its only agent revoked, the group offers nothing any more.
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "offers a database profile named 'db' (offered: none)" in (info.value.details() or "")
        identity = load_identity(tmp_path / "r" / "identity")
        creds = grpc.ssl_channel_credentials(cp.ca_file.read_bytes(), identity.key_pem, identity.cert_pem)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _connect(cp, creds)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "was revoked (laptop stolen)" in (refused.value.details() or "")
        # The tunnel's refusals go through the same error boundary as the operator API's.
        assert _reason(refused.value) == "AGENT_REVOKED"
    finally:
        agent.stop()


def _reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason the control plane attached to a status."""
    from google.rpc import error_details_pb2, status_pb2

    trailers: list[tuple[str, bytes]] = list(error.trailing_metadata() or ())  # type: ignore[arg-type]
    status = status_pb2.Status.FromString(dict(trailers)["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return str(info.reason)


async def test_a_token_limited_to_other_groups_is_permission_denied(cp: ControlPlaneProcess) -> None:
    token = cp.token("team-a", "operator", "team-a")
    async with operator_channel(cp) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in database_stub(channel).Query(
                database_pb2.QueryRequest(group="team-b", profile="db", sql="SELECT 1"), metadata=bearer(token)
            ):
                pass
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == f"token 'team-a' (onp_{token.split('_')[1]}) may not use group 'team-b' (its groups: team-a)"


async def test_an_operator_token_cannot_create_enrollment_tokens(cp: ControlPlaneProcess) -> None:
    token = cp.token("ops", "operator", "*")
    async with operator_channel(cp) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await agents_stub(channel).CreateEnrollmentToken(
                agents_pb2.CreateEnrollmentTokenRequest(group="g"), metadata=bearer(token))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == f"token 'ops' (onp_{token.split('_')[1]}) is not an admin token; ask an admin to do this"


async def test_errors_carry_a_machine_readable_reason(cp: ControlPlaneProcess) -> None:
    from google.rpc import error_details_pb2, status_pb2

    token = cp.admin_token()
    async with operator_channel(cp) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in database_stub(channel).Query(
                database_pb2.QueryRequest(group="nowhere", profile="db", sql="SELECT 1"), metadata=bearer(token)
            ):
                pass
    trailers: list[tuple[str, bytes]] = list(info.value.trailing_metadata() or ())  # type: ignore[arg-type]
    details = dict(trailers)["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    error = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(error)
    assert (error.reason, error.domain) == ("GROUP_NOT_FOUND", "onprem.dev")


async def test_the_control_plane_runs_on_a_postgresql_store(postgres: PostgresServer) -> None:
    postgres.create_database("onprem_cp_store")
    home = Path(tempfile.mkdtemp(prefix="onprem-pgstore-"))
    cp = ControlPlaneProcess(home / "cp", database_url=postgres.url("onprem_cp_store"))
    cp.start()
    try:
        token = cp.admin_token()
        agent = sqlite_agent(cp, home / "agent")
        agent.enroll("pgstore")
        agent.start()
        try:
            async with operator_channel(cp) as channel:
                await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)
                rows = 0
                async for r in database_stub(channel).Query(
                    database_pb2.QueryRequest(group="pgstore", profile="db", sql="SELECT 1 AS one"),
                    metadata=bearer(token),
                ):
                    rows += r.rows.row_count
                assert rows == 1
        finally:
            agent.stop()
    finally:
        cp.stop()
    import psycopg

    with psycopg.connect(postgres.dsn("onprem_cp_store")) as conn:
        audit = conn.execute("SELECT method, outcome FROM audit WHERE method LIKE '%Query'").fetchall()
    assert ("/onprem.v1.DatabaseService/Query", "OK") in audit

