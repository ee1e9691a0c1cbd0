"""Replicas sharing one PostgreSQL store: the registry, one CA, schema versions, changes that reach all.

Real processes: a PostgreSQL server, three control-plane replicas on one database, real agents.
"""

from __future__ import annotations

import asyncio
import shlex
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from onprem.control_plane.server import STORE_SERVICE
from onprem.control_plane.store import upgrade
from onprem.control_plane.store.migrations import head_revision
from onprem.v1 import agents_pb2, database_pb2, tokens_pb2, tokens_pb2_grpc
from tests.faults.support import pg_ctl, pg_data_directory
from tests.support.postgres import PostgresServer, running_postgres
from tests.support.replicas import Replicas, new_database, replica, share_ca
from tools.cluster import (
    AgentProcess,
    ControlPlaneProcess,
    _bin,
    agents_stub,
    bearer,
    database_stub,
    operator_channel,
    wait_for_agent_state,
)

#: The newest schema revision this version knows (the one `migrate` brings a store to).
HEAD = head_revision()

pytestmark = pytest.mark.postgres
S = grpc.StatusCode
ACTIVE, REVOKED = agents_pb2.AGENT_STATE_ACTIVE, agents_pb2.AGENT_STATE_REVOKED


@pytest.fixture
def replicas(tmp_path: Path, postgres: PostgresServer) -> Iterator[Replicas]:
    cluster = Replicas(tmp_path, new_database(postgres))
    cluster.start()
    yield cluster
    cluster.stop()


def sqlite_agent(tmp_path: Path, cp: ControlPlaneProcess, name: str = "a1", *,
                 max_streams: int | None = None) -> AgentProcess:
    db = tmp_path / f"{name}.db"
    db.touch()
    agent = AgentProcess(tmp_path / name, cp, {"databases": {"lite": {"url": f"sqlite:///{db}"}}}, name=name)
    if max_streams is not None:
        agent.extra_config = {"control_plane": {
            "address": f"127.0.0.1:{cp.agent_port}", "enroll_address": f"127.0.0.1:{cp.enroll_port}",
            "ca_file": str(cp.ca_file), "max_streams": max_streams}}
    return agent


async def list_replicas(cp: ControlPlaneProcess, token: str) -> agents_pb2.ListReplicasResponse:
    async with operator_channel(cp) as channel:
        return await agents_stub(channel).ListReplicas(agents_pb2.ListReplicasRequest(), metadata=bearer(token))


async def wait_for_streams(cp: ControlPlaneProcess, token: str, agent_id: str, replica_ids: list[str],
                           within: float = 60) -> agents_pb2.Agent:
    """The agent, once `cp` lists it ACTIVE with a stream to exactly `replica_ids`."""
    agent = None
    async with operator_channel(cp) as channel:
        for _ in range(int(within * 10)):
            agent = (await agents_stub(channel).GetAgent(agents_pb2.GetAgentRequest(agent_id=agent_id),
                                                         metadata=bearer(token))).agent
            if agent.state == ACTIVE and list(agent.replica_ids) == replica_ids:
                return agent
            await asyncio.sleep(0.1)
    raise AssertionError(f"agent {agent_id} never held streams to {replica_ids}: {agent}")


def start_fails(cp: ControlPlaneProcess) -> str:
    """Start `cp`, expecting it to refuse; its log."""
    with pytest.raises(RuntimeError, match="exited with 1 before listening"):
        cp.start()
    return (cp.state_dir.parent / f"{cp.state_dir.name}.log").read_text()


async def test_every_replica_lists_the_same_three_serving_replicas(replicas: Replicas) -> None:
    token = replicas[0].admin_token()
    answers = [await list_replicas(cp, token) for cp in replicas.members]
    assert [a.answered_by for a in answers] == ["r1", "r2", "r3"]
    for answer in answers:
        assert [(r.replica_id, r.state) for r in answer.replicas] == [
            ("r1", agents_pb2.REPLICA_STATE_SERVING), ("r2", agents_pb2.REPLICA_STATE_SERVING),
            ("r3", agents_pb2.REPLICA_STATE_SERVING)]
        assert [r.agent_address for r in answer.replicas] == [
            f"127.0.0.1:{cp.agent_port}" for cp in replicas.members]


async def test_a_replica_that_stops_leaves_the_registry_at_once(replicas: Replicas) -> None:
    token = replicas[0].admin_token()
    assert replicas[2].stop() == 0
    answer = await list_replicas(replicas[0], token)
    assert [r.replica_id for r in answer.replicas] == ["r1", "r2"]


async def test_a_killed_replica_is_gone_after_its_missed_heartbeats(replicas: Replicas) -> None:
    token = replicas[0].admin_token()
    replicas[1].stop(sig=signal.SIGKILL)
    for _ in range(100):
        if [r.replica_id for r in (await list_replicas(replicas[0], token)).replicas] == ["r1", "r3"]:
            break
        await asyncio.sleep(0.1)
    assert [r.replica_id for r in (await list_replicas(replicas[0], token)).replicas] == ["r1", "r3"]


def test_a_replica_with_a_ca_of_its_own_refuses_to_start_and_says_how_to_fix_it(
    replicas: Replicas, tmp_path: Path,
) -> None:
    stranger = replica(tmp_path, "r4", replicas.url)
    log = start_fails(stranger)
    assert "this replica's CA (sha256 " in log
    assert ("is not the one the other replicas of this store use (sha256 " in log
            and "copy ca/ca.pem and ca/ca.key from an existing replica's state folder into this one's" in log)


def test_a_replica_refuses_a_schema_newer_than_it_knows_naming_the_version(
    tmp_path: Path, postgres: PostgresServer,
) -> None:
    url = new_database(postgres)
    first = replica(tmp_path, "r1", url)
    first.start()
    first.stop()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0042'"))
        conn.execute(text("UPDATE settings SET value = 'onprem 9.0.0 (revision 0042)' "
                          "WHERE name = 'schema_written_by'"))
    engine.dispose()
    log = start_fails(replica(tmp_path, "r1b", url))
    assert (f"is at schema revision 0042, which this version of onprem does not know (it knows up to {HEAD}); it "
            "was written by onprem 9.0.0 (revision 0042): run that version or a newer one") in log


def test_an_older_schema_is_refused_until_migrate_upgrades_it(tmp_path: Path, postgres: PostgresServer) -> None:
    url = new_database(postgres)
    upgrade(url, "0002")
    cp = replica(tmp_path, "r1", url)
    log = start_fails(cp)
    assert f"is at schema revision 0002, older than this version's {HEAD}: run `onprem-control-plane migrate" in log
    out = subprocess.run([_bin("onprem-control-plane"), "migrate", "--state-dir", str(cp.state_dir),
                          "--database-url", url], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout == f"the store was at schema revision 0002; it is at {HEAD} now\n"
    again = subprocess.run([_bin("onprem-control-plane"), "migrate", "--state-dir", str(cp.state_dir),
                            "--database-url", url], capture_output=True, text=True, check=True, timeout=60)
    assert again.stdout == f"the store is at schema revision {HEAD} already: nothing to do\n"
    cp.start()
    assert cp.stop() == 0


async def test_an_agent_enrolled_through_one_replica_connects_to_another_and_all_of_them_list_it(
    replicas: Replicas, tmp_path: Path,
) -> None:
    r1, r2, r3 = replicas.members
    token = r1.admin_token()
    agent = sqlite_agent(tmp_path, r1)
    agent.write_config()
    agent.enroll("plant", token=r2.enrollment_token("plant"))  # the token from r2's CLI; enrolled at r1's port
    agent.start()
    try:
        async with operator_channel(r1) as channel:
            await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)
        for cp in (r2, r3):
            async with operator_channel(cp) as channel:
                seen = await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)
            assert "r1" in seen.replica_ids
    finally:
        agent.stop()


async def test_a_revocation_through_one_replica_ends_the_agents_stream_on_the_one_holding_it(
    replicas: Replicas, tmp_path: Path,
) -> None:
    r1, r2, _ = replicas.members
    token = r1.admin_token()
    agent = sqlite_agent(tmp_path, r1)
    agent.enroll("plant", token=r1.enrollment_token("plant"))
    agent.start()
    try:
        async with operator_channel(r1) as channel:
            await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)
        async with operator_channel(r2) as channel:
            await agents_stub(channel).RevokeAgent(agents_pb2.RevokeAgentRequest(agent_id=agent.agent_id,
                                                                                  reason="leaked key"),
                                                   metadata=bearer(token))
        # r1 closes the revoked agent's stream (a query caught on it meanwhile fails UNAVAILABLE, AGENT_LOST);
        # then the group offers nothing: a revoked agent's profiles are offered by nobody.
        last: grpc.aio.AioRpcError | None = None
        async with operator_channel(r1) as channel:
            for _ in range(200):
                try:
                    async for _chunk in database_stub(channel).Query(
                            database_pb2.QueryRequest(group="plant", profile="lite", sql="SELECT 1"),
                            metadata=bearer(token)):
                        pass
                except grpc.aio.AioRpcError as exc:
                    last = exc
                    if exc.code() != S.UNAVAILABLE:
                        break
                await asyncio.sleep(0.05)
        assert last is not None
        assert (last.code(), last.details()) == (
            S.NOT_FOUND, "no agent of group 'plant' offers a database profile named 'lite' (offered: none)")
        log = (r1.state_dir.parent / "r1.log").read_text()
        assert f"agent {agent.agent_id} was revoked (by another replica): closing its stream" in log
    finally:
        agent.stop()


async def test_a_drain_asked_of_a_replica_the_agent_is_not_connected_to_reaches_it(
    replicas: Replicas, tmp_path: Path,
) -> None:
    r1, _, r3 = replicas.members
    token = r1.admin_token()
    agent = sqlite_agent(tmp_path, r1, max_streams=1)  # one stream: to r1, its configured address
    agent.enroll("plant", token=r1.enrollment_token("plant"))
    agent.start()
    await wait_for_streams(r3, token, agent.agent_id, ["r1"])  # r3 sees r1's stream in the store
    async with operator_channel(r3) as channel:
        await agents_stub(channel).DrainAgent(agents_pb2.DrainAgentRequest(agent_id=agent.agent_id, reason="patch"),
                                              metadata=bearer(token))
    # DrainAgent ends with the agent's exit: r1 carried out what r3 was asked.
    assert agent.proc is not None
    assert await asyncio.to_thread(agent.proc.wait, 30) == 0


async def test_a_token_revoked_on_one_replica_is_refused_by_the_others(replicas: Replicas) -> None:
    r1, r2, r3 = replicas.members
    admin = r1.admin_token()
    victim = r1.token("victim", "operator", "*")
    for cp in (r2, r3):  # each replica has the token in its cache
        async with operator_channel(cp) as channel:
            await agents_stub(channel).ListGroups(agents_pb2.ListGroupsRequest(), metadata=bearer(victim))
    async with operator_channel(r1) as channel:
        listed = await tokens_pb2_grpc.TokenServiceStub(channel).ListTokens(
            tokens_pb2.ListTokensRequest(), metadata=bearer(admin))
        [row] = [t for t in listed.tokens if t.display_name == "victim"]
        await tokens_pb2_grpc.TokenServiceStub(channel).RevokeToken(
            tokens_pb2.RevokeTokenRequest(name=row.name, reason="leaked"), metadata=bearer(admin))
    for cp in (r2, r3):
        async with operator_channel(cp) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agents_stub(channel).ListGroups(agents_pb2.ListGroupsRequest(), metadata=bearer(victim))
        assert info.value.code() == S.UNAUTHENTICATED
        assert "was revoked at" in (info.value.details() or "")


async def test_replicas_answer_the_same_agent_listing(replicas: Replicas, tmp_path: Path) -> None:
    r1 = replicas[0]
    token = r1.admin_token()
    agent = sqlite_agent(tmp_path, r1)
    agent.enroll("plant", token=r1.enrollment_token("plant"))
    agent.start()
    try:
        await wait_for_streams(r1, token, agent.agent_id, ["r1", "r2", "r3"])
        listings = []
        for cp in replicas.members:
            async with operator_channel(cp) as channel:
                agents = (await agents_stub(channel).ListAgents(agents_pb2.ListAgentsRequest(),
                                                                metadata=bearer(token))).agents
            listings.append([(a.agent_id, a.name, a.group, a.state, list(a.replica_ids)) for a in agents])
        assert listings[0] == listings[1] == listings[2]
        assert listings[0] == [(agent.agent_id, "a1", "plant", ACTIVE, ["r1", "r2", "r3"])]
    finally:
        agent.stop()


def test_share_ca_copies_only_the_ca(tmp_path: Path) -> None:
    source, target = ControlPlaneProcess(tmp_path / "a"), ControlPlaneProcess(tmp_path / "b")
    (source.state_dir / "ca").mkdir(parents=True)
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
        (source.state_dir / "ca" / name).write_text(name)
    share_ca(source, target)
    assert sorted(p.name for p in (target.state_dir / "ca").iterdir()) == ["ca.key", "ca.pem"]


# --- PostgreSQL restarted under the replicas ---------------------------------------------------------------------------


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own, to stop and start (the session's serves other tests)."""
    with running_postgres() as server:
        yield server


async def store_health(cp: ControlPlaneProcess) -> int:
    async with operator_channel(cp) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=STORE_SERVICE))
        return int(response.status)


async def until_store_health(cp: ControlPlaneProcess, status: int) -> None:
    for _ in range(200):
        if await store_health(cp) == status:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the store's health never became {status}")


async def test_postgres_down_keeps_known_routes_serving_reports_it_on_health_and_recovers(
    tmp_path: Path, own_postgres: PostgresServer,
) -> None:
    cluster = Replicas(tmp_path, new_database(own_postgres), count=2)
    cluster.start()
    r1 = cluster[0]
    token, unseen = r1.admin_token(), r1.token("unseen", "operator", "*")
    agent = sqlite_agent(tmp_path, r1)
    agent.enroll("plant", token=r1.enrollment_token("plant"))
    agent.start()
    data = pg_data_directory(own_postgres)
    query = database_pb2.QueryRequest(group="plant", profile="lite", sql="SELECT 42 AS answer")
    try:
        async with operator_channel(r1) as channel:
            await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)
        assert await store_health(r1) == health_pb2.HealthCheckResponse.SERVING
        # Started again as it ran: its port and socket folder come from the options it was started with.
        options = shlex.split((data / "postmaster.opts").read_text())[3:]
        await asyncio.to_thread(pg_ctl, data, "-m", "fast", "-w", "stop")
        await until_store_health(r1, health_pb2.HealthCheckResponse.NOT_SERVING)
        async with operator_channel(r1) as channel:
            rows = [chunk async for chunk in database_stub(channel).Query(query, metadata=bearer(token))]
            assert rows and rows[-1].rows, rows
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agents_stub(channel).ListGroups(agents_pb2.ListGroupsRequest(), metadata=bearer(unseen))
        assert (info.value.code(), info.value.details()) == (
            S.UNAVAILABLE, "the control plane cannot reach its store to check this token; retry shortly")
        await asyncio.to_thread(pg_ctl, data, "-w", "-o", shlex.join(options), "start")
        await until_store_health(r1, health_pb2.HealthCheckResponse.SERVING)
        async with operator_channel(r1) as channel:
            await agents_stub(channel).ListGroups(agents_pb2.ListGroupsRequest(), metadata=bearer(unseen))
            rows = [chunk async for chunk in database_stub(channel).Query(query, metadata=bearer(token))]
            assert rows
        assert r1.proc is not None and r1.proc.poll() is None
    finally:
        agent.stop()
        cluster.stop()
