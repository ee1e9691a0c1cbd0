"""Read-only end to end: an operator's hostile calls through the control plane and the tunnel.

The agent's profile logs in as a role that owns the database. The statement sequences of issue 11
reach the agent as an operator sends them, and come back as the gRPC status and ErrorInfo reason the
operator sees; the database is byte-for-byte unchanged; a lock taken by one call is gone for the
next; CheckProfile carries the warning about the role to the operator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2, status_pb2

from onprem.v1 import agents_pb2, database_pb2, profiles_pb2
from tests.support.owned_database import OwnedDatabase, create_owned_database
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

GROUP = "readonly"
INSERT = "INSERT INTO accounts VALUES (99, 'mallory', 1)"


@pytest.fixture(scope="module")
def owned(postgres: PostgresServer) -> OwnedDatabase:
    return create_owned_database(postgres, "onprem_e2e_read_only")


@pytest.fixture(scope="module")
def cluster(owned: OwnedDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlaneProcess, str, str]]:
    home = tmp_path_factory.mktemp("e2e-ro")
    cp = ControlPlaneProcess(home / "cp")
    cp.start()
    agent = AgentProcess(home / "agent", cp, profiles={"databases": {
        "ro": {"url": owned.owner.url(), "read_only": True, "pool_size": 1}}})
    try:
        agent.enroll(GROUP)
        agent.start()
        yield cp, cp.admin_token(), agent.agent_id
    finally:
        agent.stop()
        cp.stop()


@pytest.fixture
async def channel(cluster: tuple[ControlPlaneProcess, str, str]) -> AsyncIterator[grpc.aio.Channel]:
    cp, token, agent_id = cluster
    async with operator_channel(cp) as ch:
        await wait_for_agent_state(ch, token, agent_id, agents_pb2.AGENT_STATE_ACTIVE)
        yield ch


def reason_of(error: grpc.aio.AioRpcError) -> str:
    trailers: list[tuple[str, bytes]] = list(error.trailing_metadata() or ())  # type: ignore[arg-type]
    status = status_pb2.Status.FromString(dict(trailers)["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return str(info.reason)


async def transaction(channel: grpc.aio.Channel, token: str, *sql: str) -> grpc.aio.AioRpcError:
    request = database_pb2.ExecuteTransactionRequest(
        group=GROUP, profile="ro", statements=[database_pb2.Statement(sql=s) for s in sql])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await database_stub(channel).ExecuteTransaction(request, metadata=bearer(token))
    return caught.value


@pytest.mark.parametrize(("statements", "reason", "message"), [
    (("COMMIT", INSERT, "COMMIT"), "READ_ONLY_TRANSACTION_ENDED", "statement 0 tried to end the read-only transaction"),
    (("COMMIT", "BEGIN", INSERT, "COMMIT"), "READ_ONLY_TRANSACTION_ENDED",
     "statement 0 tried to end the read-only transaction"),
    (("COMMIT", "SELECT nextval('s')"), "READ_ONLY_TRANSACTION_ENDED",
     "statement 0 tried to end the read-only transaction"),
    (("SET TRANSACTION READ WRITE", INSERT, "COMMIT"), "INVALID_TRANSACTION_STATE",
     "transaction read-write mode must be set before any query"),
    (("SELECT 1", "ROLLBACK AND CHAIN", "SET TRANSACTION READ WRITE", INSERT), "READ_ONLY_TRANSACTION_ENDED",
     "statement 1 (ROLLBACK) ended the read-only transaction and began another"),
], ids=["commit-insert-commit", "commit-begin-insert-commit", "commit-nextval", "read-write-first", "rollback-chain"])
async def test_the_issues_sequences_fail_precondition_and_change_nothing(
    channel: grpc.aio.Channel, cluster: tuple[ControlPlaneProcess, str, str], owned: OwnedDatabase,
    statements: tuple[str, ...], reason: str, message: str,
) -> None:
    before = owned.snapshot()
    error = await transaction(channel, cluster[1], *statements)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(error) == reason
    assert (error.details() or "").startswith(message)
    assert owned.snapshot() == before


async def test_an_advisory_lock_is_gone_after_the_call(
    channel: grpc.aio.Channel, cluster: tuple[ControlPlaneProcess, str, str], owned: OwnedDatabase
) -> None:
    async for _ in database_stub(channel).Query(database_pb2.QueryRequest(
            group=GROUP, profile="ro", sql="SELECT pg_advisory_lock(4242)"), metadata=bearer(cluster[1])):
        pass
    with psycopg.connect(owned.admin.dsn(), autocommit=True) as other:
        assert other.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (True,)


async def test_check_profile_carries_the_role_warning_to_the_operator(
    channel: grpc.aio.Channel, cluster: tuple[ControlPlaneProcess, str, str], owned: OwnedDatabase
) -> None:
    result = await agents_stub(channel).CheckProfile(profiles_pb2.CheckProfileRequest(
        group=GROUP, profile="ro", kind=profiles_pb2.PROFILE_KIND_DATABASE), metadata=bearer(cluster[1]))
    assert result.ok
    role = {c.name: c for c in result.checks}["role may not write"]
    assert role.warning and role.message.startswith("the role 'onprem_owner' could write outside this agent")
