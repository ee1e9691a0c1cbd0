"""PostgreSQL failing under the agent: restarted mid-query, and a backend that stops answering.

The session's PostgreSQL server (the `postgres` fixture) is restarted with `pg_ctl restart -m fast`
while a statement runs: the operator gets UNAVAILABLE (the server ended the session, SQLSTATE 57P01,
the agent's table maps 57P0x to UNAVAILABLE: the database was unreachable, retry later), and the next
query works through the same agent, whose pool throws the dead connections away.

A backend that stops answering (SIGSTOP of the process serving the statement) is a database that is
alive but silent: the operator's deadline gives DEADLINE_EXCEEDED, and the agent keeps serving other
requests, on the same profile and on others.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.faults.support import (
    ACTIVE,
    cluster,
    drain,
    error_of,
    pg_backends,
    pg_ctl,
    pg_data_directory,
    pg_terminate_sleepers,
    query,
    rows_of,
    until,
    wait_state,
)
from tests.support.postgres import PostgresServer
from tools.cluster import AgentProcess, ControlPlaneProcess, bearer, database_stub, operator_channel

GROUP = "fault-pg"

Site = tuple[ControlPlaneProcess, AgentProcess, str]


@pytest.fixture
def site(tmp_path: Path, postgres: PostgresServer) -> Iterator[Site]:
    db = tmp_path / "site.db"
    sqlite3.connect(db).close()
    profiles = {"databases": {
        "pg": {"url": postgres.url(with_password=False), "password_env": "FAULT_PG_PASSWORD"},
        "lite": {"url": f"sqlite:///{db}"},
    }}
    with cluster(tmp_path, profiles, GROUP, env={"FAULT_PG_PASSWORD": postgres.password}) as (cp, agent, token):
        yield cp, agent, token


async def test_postgresql_restarted_mid_query_fails_it_unavailable_and_the_next_query_works(
    site: Site, postgres: PostgresServer,
) -> None:
    cp, agent, token = site
    await wait_state(cp, token, agent.agent_id, ACTIVE)
    # Warm the pool first, so that the restart leaves dead pooled connections behind.
    assert await rows_of(cp, token, query(GROUP, "pg", "SELECT generate_series(1, 3)")) == 3
    data = pg_data_directory(postgres)
    async with operator_channel(cp) as channel:
        call = database_stub(channel).Query(query(GROUP, "pg", "SELECT pg_sleep(60)"), metadata=bearer(token))
        running = asyncio.ensure_future(error_of(drain(call)))
        await until(lambda: bool(pg_backends(postgres)), 15, "pg_sleep starting on PostgreSQL")
        await asyncio.to_thread(pg_ctl, data, "-m", "fast", "-w", "restart")
        failure = await running
    assert failure.code == grpc.StatusCode.UNAVAILABLE, failure
    assert "57P01" in failure.details or "terminat" in failure.details, failure
    # The same agent, not restarted: the pool's dead connections are replaced on the next checkout.
    for _ in range(3):  # more than one pooled connection may have died
        assert await rows_of(cp, token, query(GROUP, "pg", "SELECT generate_series(1, 5)")) == 5
    assert agent.proc is not None and agent.proc.poll() is None


async def test_a_silent_postgresql_backend_gives_deadline_exceeded_and_the_agent_keeps_serving(
    site: Site, postgres: PostgresServer,
) -> None:
    cp, agent, token = site
    await wait_state(cp, token, agent.agent_id, ACTIVE)
    stopped: list[int] = []
    try:
        async with operator_channel(cp) as channel:
            stub = database_stub(channel)
            call = stub.Query(query(GROUP, "pg", "SELECT pg_sleep(30)"), metadata=bearer(token), timeout=4)
            running = asyncio.ensure_future(error_of(drain(call)))
            await until(lambda: bool(pg_backends(postgres)), 15, "pg_sleep starting on PostgreSQL")
            stopped = pg_backends(postgres)
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)  # the backend neither answers nor honours a cancel now
            failure = await running
            assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED, failure
            # Other requests still run: on the same PostgreSQL profile (another pooled connection)...
            assert await rows_of(cp, token, query(GROUP, "pg", "SELECT generate_series(1, 4)")) == 4
            # ...and on another profile, several at once.
            counts = await asyncio.gather(*(rows_of(cp, token, query(GROUP, "lite", "SELECT 1")) for _ in range(5)))
            assert counts == [1] * 5
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        pg_terminate_sleepers(postgres)
    # Once the backend is back, nothing is wedged: PostgreSQL queries still work.
    assert await rows_of(cp, token, query(GROUP, "pg", "SELECT 1")) == 1
