"""SIGKILL of the control plane, then a restart on the same state and ports.

The operators' in-flight calls fail UNAVAILABLE (their connection is gone), the agent notices and
reconnects by itself, abandons the work it was doing for the dead stream, and requests after the
restart work.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import grpc

from tests.faults.support import (
    ACTIVE,
    SLOW_SQLITE,
    agent_info,
    cluster,
    drain,
    error_of,
    log_of,
    query,
    rows_of,
    wait_state,
)
from tools.cluster import ControlPlaneProcess, bearer, database_stub, operator_channel

GROUP = "fault-cp"


async def test_sigkill_of_the_control_plane_fails_in_flight_calls_unavailable_and_the_agent_comes_back(
    tmp_path: Path,
) -> None:
    db = tmp_path / "site.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1, 8)])
    with cluster(tmp_path, {"databases": {"lite": {"url": f"sqlite:///{db}"}}}, GROUP) as (cp, agent, token):
        await wait_state(cp, token, agent.agent_id, ACTIVE)
        async with operator_channel(cp) as channel:
            calls = [database_stub(channel).Query(query(GROUP, "lite", SLOW_SQLITE), metadata=bearer(token))
                     for _ in range(3)]
            await asyncio.sleep(1.0)  # the three statements are running on the agent
            assert (await agent_info(cp, token, agent.agent_id)).in_flight == 3
            sessions_before = log_of(agent).count("connected to ")
            assert cp.stop(signal.SIGKILL) == -signal.SIGKILL
            failures = await asyncio.gather(*(error_of(drain(call)) for call in calls))
        assert [f.code for f in failures] == [grpc.StatusCode.UNAVAILABLE] * 3, failures
        # Nothing listens now: a new call fails UNAVAILABLE at once, it does not hang.
        async with operator_channel(cp) as channel:
            down = await error_of(drain(database_stub(channel).Query(query(GROUP, "lite", "SELECT 1"),
                                                                     metadata=bearer(token), timeout=10)))
        assert down.code == grpc.StatusCode.UNAVAILABLE, down
        assert agent.proc is not None and agent.proc.poll() is None  # the agent outlives its control plane
        cp.start()
        await wait_state(cp, token, agent.agent_id, ACTIVE, within=60)
        assert log_of(agent).count("connected to ") == sessions_before + 1
        # The statements of the dead stream were abandoned: the new session starts with nothing in flight.
        await until_in_flight_zero(cp, token, agent.agent_id)
        assert await rows_of(cp, token, query(GROUP, "lite", "SELECT id FROM t")) == 7
        assert (await agent_info(cp, token, agent.agent_id)).state == ACTIVE


async def until_in_flight_zero(cp: ControlPlaneProcess, token: str, agent_id: str) -> None:
    for _ in range(100):
        if (await agent_info(cp, token, agent_id)).in_flight == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the agent still reports requests in flight from the dead stream")
