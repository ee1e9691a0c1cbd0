"""Stream 1,000,000 rows from PostgreSQL through control plane and agent, against SQLAlchemy directly.

Both sides run the same query over the same server in the same run: the
baseline is a server-side cursor read with `fetchmany` in this process (rows
as Python tuples, nothing encoded); the measured side is a Python grpc.aio
client reading `DatabaseService/Query` from a real control plane whose real
agent streams columnar batches over its tunnel. Peak RSS (VmHWM) of the agent
and the control plane is read at the end.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa

from onprem.v1 import agents_pb2, database_pb2
from tests.support.postgres import PostgresServer, running_postgres
from tools.bench.common import Figure, peak_rss_figure, peak_rss_mib, ratio_figure, stopwatch
from tools.cluster import (
    AgentProcess,
    ControlPlaneProcess,
    bearer,
    database_stub,
    operator_channel,
    wait_for_agent_state,
)

ROWS = 1_000_000
GROUP = "bench"
SQL = (
    "SELECT i AS id, 'customer-' || i AS name, i * 1.25::float8 AS amount, "
    "TIMESTAMP '2024-01-01' + i * INTERVAL '1 second' AS at FROM generate_series(1, :n) AS i"
)
MIN_RATIO = 0.6
RSS_LIMIT_MIB = 200.0


def _direct(server: PostgresServer) -> float:
    """Rows per second with SQLAlchemy and a server-side cursor, in this process."""
    engine = sa.create_engine(server.url())
    try:
        with engine.connect() as conn, stopwatch() as elapsed:
            result = conn.execute(sa.text(SQL), {"n": ROWS}, execution_options={"stream_results": True})
            count = 0
            while rows := result.fetchmany(5000):
                count += len(rows)
        assert count == ROWS, count
    finally:
        engine.dispose()
    return ROWS / elapsed[0]


async def _through_tunnel(cp: ControlPlaneProcess, agent: AgentProcess, token: str) -> float:
    async with operator_channel(cp) as channel:
        await wait_for_agent_state(channel, token, agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)
        stub = database_stub(channel)
        request = database_pb2.QueryRequest(group=GROUP, profile="pg", sql=SQL)
        request.parameters["n"].int64_value = ROWS
        count = 0
        with stopwatch() as elapsed:
            async for response in stub.Query(request, metadata=bearer(token)):
                if response.HasField("rows"):
                    count += response.rows.row_count
        assert count == ROWS, count
    return ROWS / elapsed[0]


def run(workdir: Path) -> list[Figure]:
    with running_postgres() as server:
        cp = ControlPlaneProcess(workdir / "cp")
        cp.start()
        agent = AgentProcess(
            workdir / "agent", cp,
            profiles={"databases": {"pg": {"url": server.url(with_password=False), "password_env": "BENCH_PG_PW"}}},
            env={"BENCH_PG_PW": server.password},
        )
        try:
            token = cp.admin_token()
            agent.enroll(GROUP)
            agent.start()
            direct = _direct(server)
            tunnel = asyncio.run(_through_tunnel(cp, agent, token))
            # Once more each, keeping the better: the first run pays for warm-up on both sides.
            direct = max(direct, _direct(server))
            tunnel = max(tunnel, asyncio.run(_through_tunnel(cp, agent, token)))
            assert agent.proc is not None and cp.proc is not None
            agent_rss, cp_rss = peak_rss_mib(agent.proc.pid), peak_rss_mib(cp.proc.pid)
        finally:
            agent.stop()
            cp.stop()
    return [
        ratio_figure("1M rows (int, text, double, timestamp) from PostgreSQL through the tunnel", tunnel, "rows/s",
                     "SQLAlchemy server-side cursor, direct", direct, MIN_RATIO),
        peak_rss_figure("agent peak RSS while streaming 1M rows", agent_rss, RSS_LIMIT_MIB),
        peak_rss_figure("control plane peak RSS while streaming 1M rows", cp_rss, RSS_LIMIT_MIB),
    ]
