"""Liveness across the tunnel: a silent agent is noticed by heartbeats, and comes back by itself."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from onprem.v1 import agents_pb2, database_pb2
from tools.cluster import (
    AgentProcess,
    ControlPlaneProcess,
    bearer,
    database_stub,
    operator_channel,
    wait_for_agent_state,
)

ACTIVE, INACTIVE = agents_pb2.AGENT_STATE_ACTIVE, agents_pb2.AGENT_STATE_INACTIVE
SLOW = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000000) "
        "SELECT max(i) FROM n")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[ControlPlaneProcess, AgentProcess, str]]:
    db = tmp_path / "x.db"
    sqlite3.connect(db).close()
    # A 1 s heartbeat, so that three missed beats take seconds, not half a minute.
    cp = ControlPlaneProcess(tmp_path / "cp", extra_args=["--heartbeat-interval", "1"])
    cp.start()
    token = cp.admin_token()
    agent = AgentProcess(tmp_path / "agent", cp, profiles={"databases": {"db": {"url": f"sqlite:///{db}"}}})
    agent.enroll("live")
    agent.start()
    yield cp, agent, token
    if agent.proc is not None and agent.proc.poll() is None:
        agent.proc.send_signal(signal.SIGCONT)
    agent.stop()
    cp.stop()


async def test_a_silent_agent_is_declared_lost_and_its_requests_fail_unavailable(
    pair: tuple[ControlPlaneProcess, AgentProcess, str],
) -> None:
    cp, agent, token = pair
    assert agent.proc is not None
    async with operator_channel(cp) as channel:
        await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)
        call = database_stub(channel).Query(
            database_pb2.QueryRequest(group="live", profile="db", sql=SLOW), metadata=bearer(token))
        await asyncio.sleep(0.5)
        agent.proc.send_signal(signal.SIGSTOP)  # alive, holding its TCP connection, but silent
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:  # pytest-timeout guards against a hang
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "heartbeats missed" in (info.value.details() or "")
        await wait_for_agent_state(channel, token, agent.agent_id, INACTIVE, within=5)


async def test_a_resumed_agent_reconnects_by_itself(pair: tuple[ControlPlaneProcess, AgentProcess, str]) -> None:
    cp, agent, token = pair
    assert agent.proc is not None
    async with operator_channel(cp) as channel:
        await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE)
        agent.proc.send_signal(signal.SIGSTOP)
        await wait_for_agent_state(channel, token, agent.agent_id, INACTIVE, within=20)
        agent.proc.send_signal(signal.SIGCONT)
        await wait_for_agent_state(channel, token, agent.agent_id, ACTIVE, within=60)
        rows = 0
        async for r in database_stub(channel).Query(
            database_pb2.QueryRequest(group="live", profile="db", sql="SELECT 1"), metadata=bearer(token)
        ):
            rows += r.rows.row_count
        assert rows == 1
