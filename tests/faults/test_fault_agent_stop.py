"""SIGSTOP of the agent: a peer that is alive, holds its TCP connection, and says nothing.

Only heartbeats can tell. With a 1 s heartbeat the control plane gives up on the stream after three
silent intervals: the operator's in-flight call fails UNAVAILABLE within seconds (not at its own
deadline), new calls fail UNAVAILABLE at once, and after SIGCONT the agent reconnects by itself.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path

import grpc

from tests.faults.support import (
    ACTIVE,
    INACTIVE,
    SLOW_SQLITE,
    cluster,
    drain,
    error_of,
    query,
    rows_of,
    wait_state,
)
from tools.cluster import bearer, database_stub, operator_channel

GROUP = "fault-stop"


async def test_a_stopped_agent_fails_the_request_unavailable_within_seconds_and_recovers_after_sigcont(
    tmp_path: Path,
) -> None:
    db = tmp_path / "site.db"
    sqlite3.connect(db).close()
    profiles = {"databases": {"lite": {"url": f"sqlite:///{db}"}}}
    with cluster(tmp_path, profiles, GROUP, cp_args=["--heartbeat-interval", "1"]) as (cp, agent, token):
        assert agent.proc is not None
        await wait_state(cp, token, agent.agent_id, ACTIVE)
        async with operator_channel(cp) as channel:
            stub = database_stub(channel)
            # The operator would wait up to 120 s; heartbeats must end it long before.
            call = stub.Query(query(GROUP, "lite", SLOW_SQLITE), metadata=bearer(token), timeout=120)
            await asyncio.sleep(0.5)
            agent.proc.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            failure = await error_of(drain(call))
            noticed_after = time.monotonic() - stopped_at
            assert failure.code == grpc.StatusCode.UNAVAILABLE, failure
            assert "was lost while running the request" in failure.details
            # Three missed 1 s beats, plus the beat in progress and scheduling: seconds, far from 120.
            assert noticed_after < 10, f"the silent agent was noticed only after {noticed_after:.1f} s"
            await wait_state(cp, token, agent.agent_id, INACTIVE, within=5)
            refused = await error_of(drain(stub.Query(query(GROUP, "lite", "SELECT 1"), metadata=bearer(token))),
                                     within=10)
            assert refused.code == grpc.StatusCode.UNAVAILABLE, refused
        agent.proc.send_signal(signal.SIGCONT)
        await wait_state(cp, token, agent.agent_id, ACTIVE, within=60)
        assert await rows_of(cp, token, query(GROUP, "lite", "SELECT 1")) == 1
