"""1,000 requests in flight on one agent: all complete, none lost.

A real control plane and one real agent whose `max_in_flight` is raised to
1,000, with a PostgreSQL profile of 100 pooled connections. 1,000 clients each
send a query that takes a shared advisory lock and then sleeps 1 s, at once,
through the control plane, down the agent's one stream. The agent takes them
all (each is a task with its own credit window on the stream) and runs them
100 at a time as its pool allows.

This process holds the advisory lock exclusively until the control plane
reports all 1,000 in flight on the agent (or 60 s have passed), so that all of
them are provably in flight together however slowly they arrive; then it
lets go, and the agent works through them in about 10 s.

The figures: how many came back with exactly one row and status OK; the peak
in-flight count the control plane reported for the agent; and the time from
letting go to the last answer, against the ideal (requests / connections x 1 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import grpc
import psycopg

from onprem.v1 import agents_pb2, database_pb2
from tests.support.postgres import PostgresServer, running_postgres
from tools.bench.common import Figure
from tools.bench.small_requests import GROUP, Cluster, start_cluster, wait_active
from tools.cluster import agents_stub, bearer, database_stub, operator_channel

REQUESTS = 1000
POOL = 100
LOCK = 8_000_001
SQL = "SELECT pg_advisory_xact_lock_shared(:k) AS locked, pg_sleep(:s) AS slept"
#: How long the lock is held at most while waiting for every request to arrive.
ARRIVAL_WAIT = 60.0


async def _measure(cluster: Cluster, server: PostgresServer, requests: int,
                   sleep: float) -> tuple[int, Counter[str], int, float]:
    await wait_active(cluster)
    outcomes: Counter[str] = Counter()
    peak = 0
    all_in = asyncio.Event()
    async with (await psycopg.AsyncConnection.connect(server.dsn(), autocommit=True) as lock,
                operator_channel(cluster.cp) as channel, operator_channel(cluster.cp) as watch_channel):
        await lock.execute("SELECT pg_advisory_lock(%s)", (LOCK,))
        stub = database_stub(channel)
        agents = agents_stub(watch_channel)
        metadata = bearer(cluster.token)
        request = database_pb2.QueryRequest(group=GROUP, profile="pg", sql=SQL)
        request.parameters["s"].double_value = sleep
        request.parameters["k"].int64_value = LOCK

        async def one() -> None:
            rows = -1
            try:
                async for response in stub.Query(request, metadata=metadata, timeout=300):
                    if response.HasField("summary"):
                        rows = response.summary.row_count
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1
                return
            outcomes["OK" if rows == 1 else f"OK with {rows} rows"] += 1

        async def watch() -> None:
            nonlocal peak
            while True:
                agent = (await agents.GetAgent(agents_pb2.GetAgentRequest(agent_id=cluster.agent.agent_id),
                                               metadata=metadata)).agent
                peak = max(peak, agent.in_flight)
                if peak >= requests:
                    all_in.set()
                await asyncio.sleep(0.1)

        watcher = asyncio.get_running_loop().create_task(watch())
        calls = asyncio.gather(*(one() for _ in range(requests)))
        began = time.perf_counter()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_in.wait(), ARRIVAL_WAIT)
            await lock.execute("SELECT pg_advisory_unlock(%s)", (LOCK,))
            began = time.perf_counter()
            await calls
        finally:
            elapsed = time.perf_counter() - began
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    return outcomes["OK"], outcomes, peak, elapsed


def run_small(workdir: Path, *, requests: int = REQUESTS, pool: int = POOL, sleep: float = 1.0) -> list[Figure]:
    with running_postgres() as server:
        profiles = {"databases": {"pg": {"url": server.url(with_password=False), "password_env": "BENCH_PG_PW",
                                         "pool_size": pool}}}
        with start_cluster(workdir, profiles, max_in_flight=requests,
                           env={"BENCH_PG_PW": server.password}) as cluster:
            completed, outcomes, peak, elapsed = asyncio.run(_measure(cluster, server, requests, sleep))
    if completed != requests:
        print(f"   in_flight: outcomes {dict(outcomes)}", flush=True)
    return [
        Figure(f"{requests:,} requests in flight on one agent (a lock, then pg_sleep({sleep:g}), {pool} connections): "
               "completed OK", completed, "requests", target=f"{requests} of {requests}", met=completed == requests),
        Figure(f"{requests:,} in flight: peak in flight on the agent, as the control plane saw it", peak,
               "requests", target=f"{requests}", met=peak == requests),
        Figure(f"{requests:,} in flight: time from their release to the last answer", elapsed, "s", target="—",
               met=None,
               baseline_name="ideal: requests / connections x sleep", baseline=requests / pool * sleep),
    ]


def run(workdir: Path) -> list[Figure]:
    return run_small(workdir)
