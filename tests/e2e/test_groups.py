"""A group of agents as one highly available endpoint: routing, load, failover, drain, rolling restarts."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from onprem.v1 import agents_pb2, database_pb2
from tools.cluster import (
    AgentProcess,
    ControlPlaneProcess,
    agents_stub,
    bearer,
    database_stub,
    operator_channel,
    wait_for_agent_state,
)

GROUP = "ha"
ACTIVE, INACTIVE, DRAINING = (agents_pb2.AGENT_STATE_ACTIVE, agents_pb2.AGENT_STATE_INACTIVE,
                              agents_pb2.AGENT_STATE_DRAINING)
# About a second or two of work in SQLite, then one row naming the agent's database.
SLOW = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :n) "
        "SELECT (SELECT tag FROM who) AS tag, max(i) FROM n")


def tagged_db(path: Path, tag: str) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE who (tag TEXT)")
        db.execute("INSERT INTO who VALUES (?)", (tag,))
        db.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, at TEXT)")
    return path


class Group:
    def __init__(self, cp: ControlPlaneProcess, token: str, agents: dict[str, AgentProcess]) -> None:
        self.cp, self.token, self.agents = cp, token, agents

    async def query(self, profile: str, sql: str, **params: int) -> list[str]:
        """The tags of the rows the query returned (first column)."""
        from onprem.v1 import values_pb2

        request = database_pb2.QueryRequest(
            group=GROUP, profile=profile, sql=sql,
            parameters={k: values_pb2.Value(int64_value=v) for k, v in params.items()})
        tags: list[str] = []
        async with operator_channel(self.cp) as channel:
            async for response in database_stub(channel).Query(request, metadata=bearer(self.token)):
                if response.HasField("rows") and response.rows.columns:
                    tags.extend(response.rows.columns[0].string_values)
        return tags

    async def wait(self, name: str, state: int, within: float = 30) -> agents_pb2.Agent:
        async with operator_channel(self.cp) as channel:
            return await wait_for_agent_state(channel, self.token, self.agents[name].agent_id, state, within)

    async def in_flight_agent(self) -> str:
        """The name of the agent running a request now."""
        async with operator_channel(self.cp) as channel:
            for _ in range(100):
                listed = await agents_stub(channel).ListAgents(
                    agents_pb2.ListAgentsRequest(group=GROUP), metadata=bearer(self.token))
                busy = [a.name for a in listed.agents if a.in_flight]
                if busy:
                    return busy[0]
                await asyncio.sleep(0.05)
        raise AssertionError("no agent ever had a request in flight")


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    cp = ControlPlaneProcess(tmp_path / "cp")
    cp.start()
    token = cp.admin_token()
    agents = {}
    for name in ("a", "b"):
        db = tagged_db(tmp_path / f"{name}.db", name)
        profiles = {
            "shared": {"url": f"sqlite:///{db}", "read_only": True},
            "shared-rw": {"url": f"sqlite:///{db}"},
        }
        if name == "a":
            profiles["only-a"] = {"url": f"sqlite:///{db}", "read_only": True}
        agents[name] = AgentProcess(tmp_path / name, cp, name=name, profiles={"databases": profiles},
                                    extra_config={"drain_grace_seconds": 20})
        agents[name].enroll(GROUP)
        agents[name].start()
    g = Group(cp, token, agents)
    asyncio.run(_all_active(g))
    yield g
    for agent in agents.values():
        agent.stop()
    cp.stop()


async def _all_active(g: Group) -> None:
    for name in g.agents:
        await g.wait(name, ACTIVE)


async def test_a_profile_only_one_agent_offers_is_routed_only_to_it(group: Group) -> None:
    tags = await asyncio.gather(*(group.query("only-a", "SELECT tag FROM who") for _ in range(20)))
    assert {tag for t in tags for tag in t} == {"a"}


async def test_requests_are_spread_over_the_agents_of_the_group(group: Group) -> None:
    tags = await asyncio.gather(*(group.query("shared", SLOW, n=300_000) for _ in range(16)))
    counts = Counter(t[0] for t in tags)
    assert set(counts) == {"a", "b"}, counts


async def test_an_idempotent_read_is_retried_on_another_agent_when_its_agent_dies(group: Group) -> None:
    running = asyncio.ensure_future(group.query("shared", SLOW, n=8_000_000))
    victim = await group.in_flight_agent()
    group.agents[victim].kill()
    tags = await running
    survivor = ({"a", "b"} - {victim}).pop()
    assert tags == [survivor]


async def test_a_write_whose_agent_dies_is_not_retried_and_says_it_may_have_run(group: Group) -> None:
    slow_insert = ("INSERT INTO log (at) WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                   "WHERE i < 30000000) SELECT max(i) FROM n")
    running = asyncio.ensure_future(group.query("shared-rw", slow_insert))
    victim = await group.in_flight_agent()
    group.agents[victim].kill()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await running
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "it may have run in part or in full" in (info.value.details() or "")


async def test_drain_agent_lets_its_request_finish_then_the_agent_exits_0(group: Group) -> None:
    running = asyncio.ensure_future(group.query("only-a", SLOW, n=5_000_000))
    assert await group.in_flight_agent() == "a"
    async with operator_channel(group.cp) as channel:
        response = await agents_stub(channel).DrainAgent(
            agents_pb2.DrainAgentRequest(agent_id=group.agents["a"].agent_id, reason="maintenance"),
            metadata=bearer(group.token))
    assert response.agent.state == DRAINING
    assert await running == ["a"]
    proc = group.agents["a"].proc
    assert proc is not None
    assert await asyncio.to_thread(proc.wait, 30) == 0
    await group.wait("a", INACTIVE)


async def test_a_rolling_restart_under_steady_load_loses_no_request(group: Group) -> None:
    done = asyncio.Event()
    results: Counter[str] = Counter()
    failures: list[str] = []

    async def worker() -> None:
        while not done.is_set():
            try:
                tags = await group.query("shared", SLOW, n=200_000)
                results[tags[0]] += 1
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    workers = [asyncio.ensure_future(worker()) for _ in range(6)]
    try:
        for name in ("a", "b"):
            agent = group.agents[name]
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(agent.proc.wait, 60) == 0
            agent.start()
            await group.wait(name, ACTIVE)
            await asyncio.sleep(1)  # let the restarted agent take some of the load
    finally:
        done.set()
        await asyncio.gather(*workers)
    assert failures == []
    assert results["a"] > 0 and results["b"] > 0
