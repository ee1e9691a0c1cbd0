"""The tunnel's promises, proven with real processes: a control plane, agents,
PostgreSQL and SQLite, and real signals.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from onprem.v1 import agents_pb2, database_pb2, database_pb2_grpc, values_pb2
from tests.support.postgres import PostgresServer
from tools.bench.common import rss_mib
from tools.cluster import (
    AgentProcess,
    ControlPlaneProcess,
    bearer,
    database_stub,
    operator_channel,
    wait_for_agent_state,
)

GROUP = "e2e"
ACTIVE = agents_pb2.AGENT_STATE_ACTIVE
INACTIVE = agents_pb2.AGENT_STATE_INACTIVE

# A statement that produces `n` rows of ~200 bytes each in SQLite, lazily.
BIG_SQLITE = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :rows) "
    "SELECT i, printf('%.200d', i) AS pad FROM n"
)


def established_streams(pid: int, port: int) -> int:
    """TCP connections of process `pid` to the control plane's agent port."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if f"pid={pid}," in line)


def pg_sleepers(postgres: PostgresServer) -> int:
    """Backends of the test database sleeping in pg_sleep right now.

    The statement text in pg_stat_activity is the server-side cursor's FETCH,
    not the SELECT, so the wait event is what identifies a running probe.
    """
    with psycopg.connect(postgres.dsn()) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND wait_event = 'PgSleep' "
            "AND datname = current_database() AND pid <> pg_backend_pid()",
        ).fetchone()
    assert row is not None
    return int(row[0])


async def wait_until_pg(postgres: PostgresServer, running: bool, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if (pg_sleepers(postgres) > 0) == running:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"pg_sleep {'never started' if running else 'still runs'} on PostgreSQL")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Iterator[tuple[ControlPlaneProcess, AgentProcess, str]]:
    base = tmp_path_factory.mktemp("e2e")
    db = base / "e2e.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
        conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"row {i}") for i in range(1, 11)])
    cp = ControlPlaneProcess(base / "cp")
    cp.start()
    token = cp.admin_token()
    agent = AgentProcess(
        base / "agent", cp,
        profiles={
            "databases": {
                "lite": {"url": f"sqlite:///{db}"},
                "pg": {"url": postgres.url(with_password=False), "password_env": "E2E_PG_PASSWORD"},
            },
        },
        env={"E2E_PG_PASSWORD": postgres.password},
    )
    agent.enroll(GROUP)
    agent.start()
    yield cp, agent, token
    agent.stop()
    cp.stop()


async def _active(cp: ControlPlaneProcess, agent: AgentProcess, token: str) -> None:
    async with operator_channel(cp) as channel:
        await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)


def query(group: str, profile: str, sql: str, **params: int | str) -> database_pb2.QueryRequest:
    values = {
        k: values_pb2.Value(int64_value=v) if isinstance(v, int) else values_pb2.Value(string_value=v)
        for k, v in params.items()
    }
    return database_pb2.QueryRequest(group=group, profile=profile, sql=sql, parameters=values)


async def collect_rows(stub: database_pb2_grpc.DatabaseServiceAsyncStub, request: database_pb2.QueryRequest,
                       token: str) -> int:
    rows = 0
    async for response in stub.Query(request, metadata=bearer(token)):
        if response.HasField("rows"):
            rows += response.rows.row_count
    return rows


async def test_many_concurrent_requests_share_the_agents_one_stream(cluster: tuple[ControlPlaneProcess, AgentProcess, str]) -> None:
    cp, agent, token = cluster
    await _active(cp, agent, token)
    async with operator_channel(cp) as channel:
        stub = database_stub(channel)

        async def one(i: int) -> list[int]:
            ids: list[int] = []
            async for r in stub.Query(query(GROUP, "lite", "SELECT id FROM t WHERE id <= :n ORDER BY id", n=i % 10 + 1),
                                      metadata=bearer(token)):
                if r.HasField("rows"):
                    ids.extend(r.rows.columns[0].int64_values)
            return ids

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 60)
    assert [len(r) for r in results] == [i % 10 + 1 for i in range(200)]
    assert all(r == list(range(1, len(r) + 1)) for r in results)
    assert agent.proc is not None
    assert established_streams(agent.proc.pid, cp.agent_port) == 1


async def test_a_slow_consumer_does_not_stall_a_small_query_on_the_same_agent(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str],
) -> None:
    cp, agent, token = cluster
    await _active(cp, agent, token)
    async with operator_channel(cp) as channel:
        stub = database_stub(channel)
        big = stub.Query(query(GROUP, "lite", BIG_SQLITE, rows=2_000_000), metadata=bearer(token))
        first = await big.read()
        assert isinstance(first, database_pb2.QueryResponse) and first.HasField("header")
        second = await big.read()
        assert isinstance(second, database_pb2.QueryResponse) and second.HasField("rows")
        # The big result now sits unread: its window is full, the agent waits for credit.
        for _ in range(20):
            rows = await asyncio.wait_for(collect_rows(stub, query(GROUP, "lite", "SELECT id FROM t"), token), 10)
            assert rows == 10
        assert not big.done()
        big.cancel()


async def test_operators_cancelling_streams_mid_write_leave_the_control_plane_serving(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str],
) -> None:
    """A cancel while the control plane's write to the operator waits: grpc then ends the call under the
    handler, and asking the dead call for its peer crashed the process (SIGSEGV) within a few dozen."""
    cp, agent, token = cluster
    await _active(cp, agent, token)
    async with operator_channel(cp) as channel:
        stub = database_stub(channel)
        for _ in range(60):
            big = stub.Query(query(GROUP, "lite", BIG_SQLITE, rows=2_000_000), metadata=bearer(token))
            await big.read()
            await big.read()
            await asyncio.sleep(0.1)  # the result fills the operator's window: a write is waiting
            big.cancel()
        assert cp.proc is not None and cp.proc.poll() is None
        assert await collect_rows(stub, query(GROUP, "lite", "SELECT id FROM t"), token) == 10


async def test_an_error_quoting_a_huge_input_reaches_the_operator_cut_and_the_stream_stays_up(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str],
) -> None:
    cp, agent, token = cluster
    await _active(cp, agent, token)
    request = query(GROUP, "lite", "SELECT :d AS d")
    request.parameters["d"].decimal_value = "9x" * 1_500_000  # 3 MB, quoted back by the agent's error
    async with operator_channel(cp) as channel:
        stub = database_stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect_rows(stub, request, token)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(info.value.details() or "") < 4096
        assert await collect_rows(stub, query(GROUP, "lite", "SELECT id FROM t"), token) == 10
    assert agent.proc is not None and agent.proc.poll() is None
    assert "Received message larger than max" not in (agent.home / "agent.log").read_text()


async def test_memory_stays_bounded_while_a_result_far_larger_than_the_window_streams(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str],
) -> None:
    cp, agent, token = cluster
    await _active(cp, agent, token)
    assert agent.proc is not None and cp.proc is not None
    base_agent, base_cp = rss_mib(agent.proc.pid), rss_mib(cp.proc.pid)
    peak_agent, peak_cp, received = base_agent, base_cp, 0
    async with operator_channel(cp) as channel:
        stub = database_stub(channel)
        # ~1.5M rows of ~210 bytes: about 300 MiB through a 1 MiB window, read slowly at first.
        call = stub.Query(query(GROUP, "lite", BIG_SQLITE, rows=1_500_000), metadata=bearer(token))
        n = 0
        async for response in call:
            if response.HasField("rows"):
                received += response.ByteSize()
            n += 1
            if n < 50:
                await asyncio.sleep(0.02)
            if n % 50 == 0:
                peak_agent = max(peak_agent, rss_mib(agent.proc.pid))
                peak_cp = max(peak_cp, rss_mib(cp.proc.pid))
    assert received > 250 * 1024 * 1024
    growth_agent, growth_cp = peak_agent - base_agent, peak_cp - base_cp
    assert growth_agent < 100, f"agent RSS grew by {growth_agent:.1f} MiB"
    assert growth_cp < 100, f"control plane RSS grew by {growth_cp:.1f} MiB"


async def test_an_operators_deadline_stops_the_statement_on_postgresql(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str], postgres: PostgresServer,
) -> None:
    cp, agent, token = cluster
    await _active(cp, agent, token)
    async with operator_channel(cp) as channel:
        stub = database_stub(channel)
        running = asyncio.ensure_future(_with_timeout(stub, query(GROUP, "pg", "SELECT pg_sleep(60)"), token, 3.0))
        await wait_until_pg(postgres, running=True)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until_pg(postgres, running=False)


async def _with_timeout(stub: database_pb2_grpc.DatabaseServiceAsyncStub, request: database_pb2.QueryRequest,
                        token: str, seconds: float) -> None:
    async for _ in stub.Query(request, metadata=bearer(token), timeout=seconds):
        pass


async def test_an_operators_cancel_stops_the_statement_on_postgresql(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str], postgres: PostgresServer,
) -> None:
    cp, agent, token = cluster
    await _active(cp, agent, token)
    async with operator_channel(cp) as channel:
        stub = database_stub(channel)
        call = stub.Query(query(GROUP, "pg", "SELECT pg_sleep(60)"), metadata=bearer(token))
        await wait_until_pg(postgres, running=True)
        call.cancel()
        await wait_until_pg(postgres, running=False)
        assert call.cancelled()


@pytest.fixture
def fresh_cluster(tmp_path: Path, postgres: PostgresServer) -> Iterator[tuple[ControlPlaneProcess, AgentProcess, str]]:
    """A control plane and an agent of their own, for tests that kill one of them."""
    cp = ControlPlaneProcess(tmp_path / "cp")
    cp.start()
    token = cp.admin_token()
    agent = AgentProcess(
        tmp_path / "agent", cp,
        profiles={"databases": {"pg": {"url": postgres.url(with_password=False), "password_env": "PGPW"}}},
        env={"PGPW": postgres.password},
    )
    agent.enroll(GROUP)
    agent.start()
    yield cp, agent, token
    agent.stop()
    cp.stop()


async def test_sigkill_of_the_agent_fails_its_in_flight_requests_with_unavailable(
    fresh_cluster: tuple[ControlPlaneProcess, AgentProcess, str], postgres: PostgresServer,
) -> None:
    cp, agent, token = fresh_cluster
    await _active(cp, agent, token)
    async with operator_channel(cp) as channel:
        stub = database_stub(channel)
        call = stub.Query(query(GROUP, "pg", "SELECT pg_sleep(60)"), metadata=bearer(token))
        await wait_until_pg(postgres, running=True)
        agent.kill()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            # A hang guard, not a timing claim: the failure must come, and come by itself.
            await asyncio.wait_for(_drain(call), 20)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "was lost while running the request" in (info.value.details() or "")
        # With its only agent gone, the group now answers UNAVAILABLE at once.
        with pytest.raises(grpc.aio.AioRpcError) as offline:
            await collect_rows(stub, query(GROUP, "pg", "SELECT 1"), token)
        assert offline.value.code() == grpc.StatusCode.UNAVAILABLE
    # The killed agent could not cancel its statement; end it so later tests start clean.
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
                     "AND datname = current_database()")


async def _drain(call: grpc.aio.UnaryStreamCall) -> None:  # type: ignore[type-arg]
    async for _ in call:
        pass


async def test_a_restarted_control_plane_sees_the_agent_come_back_by_itself(
    fresh_cluster: tuple[ControlPlaneProcess, AgentProcess, str],
) -> None:
    cp, agent, token = fresh_cluster
    await _active(cp, agent, token)
    assert cp.stop(signal.SIGTERM) == 0
    cp.start()
    async with operator_channel(cp) as channel:
        await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE, within=60)
        stub = database_stub(channel)
        assert await collect_rows(stub, query(GROUP, "pg", "SELECT generate_series(1, 5)"), token) == 5


async def test_sigterm_lets_the_agents_in_flight_request_finish_then_exits_0(
    fresh_cluster: tuple[ControlPlaneProcess, AgentProcess, str], postgres: PostgresServer,
) -> None:
    cp, agent, token = fresh_cluster
    await _active(cp, agent, token)
    async with operator_channel(cp) as channel:
        stub = database_stub(channel)
        running = asyncio.ensure_future(collect_rows(stub, query(GROUP, "pg", "SELECT pg_sleep(3)"), token))
        await wait_until_pg(postgres, running=True)
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        await wait_for_agent_state(channel, token, agent.agent_id, agents_pb2.AGENT_STATE_DRAINING)
        # While draining it takes no new work...
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect_rows(stub, query(GROUP, "pg", "SELECT 1"), token)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "is draining" in (refused.value.details() or "")
        # ...but what it had started finishes.
        assert await running == 1
    assert await asyncio.to_thread(agent.proc.wait, 30) == 0
