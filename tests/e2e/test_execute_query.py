"""DatabaseService/ExecuteQuery: Query's result in one message, through a real control plane and agent.

ExecuteQuery runs the very request Query runs (the agent cannot tell them apart), so these tests hold
it to Query's answers, and to the one thing it adds: a result that does not fit one message of a
default gRPC client is refused whole, the statement cancelled, and the agent keeps serving.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from onprem.control_plane.api.database import MAX_RESULT_BYTES
from onprem.operator_cli.rows import as_stream
from onprem.v1 import agents_pb2, agents_pb2_grpc, database_pb2, database_pb2_grpc, values_pb2
from tools.cluster import (
    BIN,
    AgentProcess,
    ControlPlaneProcess,
    bearer,
    operator_channel,
    wait_for_agent_state,
)

GROUP = "unary"
#: n rows of (i, a 50-character text): about 56 bytes a row on the wire.
ROWS = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :n) "
        "SELECT i, printf('%050d', i) AS padded FROM n")


@dataclass
class Site:
    cp: ControlPlaneProcess
    agent: AgentProcess
    token: str
    db: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("execute-query")
    db = base / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE orders (id TEXT PRIMARY KEY, qty INTEGER NOT NULL)")
    cp = ControlPlaneProcess(base / "cp")
    cp.start()
    agent = AgentProcess(base / "agent", cp, profiles={"databases": {
        "shop": {"url": f"sqlite:///{db}", "idempotency_table": "onprem_idempotency"},
        "reports": {"url": f"sqlite:///{db}", "read_only": True},
    }})
    try:
        token = cp.admin_token()
        agent.enroll(GROUP)
        made = subprocess.run([str(BIN / "onprem-agent"), "create-idempotency-table", "--profile", "shop",
                               "--config", str(agent.config_file)], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        agent.start()

        async def ready() -> None:
            async with operator_channel(cp) as channel:
                await wait_for_agent_state(channel, token, agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)

        asyncio.run(ready())
        yield Site(cp, agent, token, db)
    finally:
        agent.stop()
        cp.stop()


@pytest.fixture
async def channel(site: Site) -> AsyncIterator[grpc.aio.Channel]:
    # A client with gRPC's defaults, a 4 MiB receive limit among them: what ExecuteQuery is sized for.
    async with operator_channel(site.cp) as channel:
        yield channel


def request(sql: str, profile: str = "shop", max_rows: int = 0, **parameters: int) -> database_pb2.QueryRequest:
    return database_pb2.QueryRequest(
        group=GROUP, profile=profile, sql=sql, max_rows=max_rows,
        parameters={k: values_pb2.Value(int64_value=v) for k, v in parameters.items()})


async def execute(channel: grpc.aio.Channel, site: Site, query: database_pb2.QueryRequest,
                  key: str | None = None) -> database_pb2.ExecuteQueryResponse:
    unary = database_pb2.ExecuteQueryRequest.FromString(query.SerializeToString())
    metadata = bearer(site.token) + ((("idempotency-key", key),) if key else ())
    response: database_pb2.ExecuteQueryResponse = await database_pb2_grpc.DatabaseServiceStub(
        channel).ExecuteQuery(unary, metadata=metadata, timeout=60)
    return response


async def stream(channel: grpc.aio.Channel, site: Site, query: database_pb2.QueryRequest,
                 key: str | None = None) -> list[database_pb2.QueryResponse]:
    metadata = bearer(site.token) + ((("idempotency-key", key),) if key else ())
    call = database_pb2_grpc.DatabaseServiceStub(channel).Query(query, metadata=metadata, timeout=60)
    return [message async for message in call]


async def failure(call: asyncio.Future[object] | object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def test_the_result_is_querys_header_batches_and_summary_in_one_message(
        site: Site, channel: grpc.aio.Channel) -> None:
    query = request(ROWS, n=20_000)
    response = await execute(channel, site, query)
    assert len(response.batches) > 1  # big enough to have come in several batches
    assert [c.name for c in response.header.columns] == ["i", "padded"]
    assert sum(b.row_count for b in response.batches) == response.summary.row_count == 20_000
    assert response.batches[0].columns[0].int64_values[:3] == [1, 2, 3]
    assert as_stream(response) == await stream(channel, site, query)


async def test_a_statement_without_rows_answers_with_no_columns_and_the_rows_affected(
        site: Site, channel: grpc.aio.Channel) -> None:
    response = await execute(channel, site, request("INSERT INTO orders VALUES ('plain-1', 1)"))
    assert response == database_pb2.ExecuteQueryResponse(
        header=database_pb2.QueryHeader(), summary=database_pb2.QuerySummary(row_count=0, rows_affected=1))


async def test_max_rows_cuts_the_result_and_says_so(site: Site, channel: grpc.aio.Channel) -> None:
    response = await execute(channel, site, request(ROWS, max_rows=10, n=1000))
    assert (response.summary.row_count, response.summary.truncated) == (10, True)


async def test_a_result_just_under_the_limit_reaches_a_client_with_the_default_receive_limit(
        site: Site, channel: grpc.aio.Channel) -> None:
    response = await execute(channel, site, request(ROWS, n=65_000))
    assert response.summary.row_count == 65_000
    assert MAX_RESULT_BYTES * 3 // 4 < response.ByteSize() <= MAX_RESULT_BYTES


async def test_a_result_over_4_mib_is_refused_whole_and_the_statement_cancelled(
        site: Site, channel: grpc.aio.Channel) -> None:
    error = await failure(execute(channel, site, request(ROWS, n=10_000_000)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error.details() or ""
    assert details.startswith("the result passed 4 MiB, the most one message carries, after ")
    assert details.endswith(" rows; stream it with Query, or set max_rows")
    # Ten million rows would take the agent a while: cancelled, it is idle again at once.
    agents = agents_pb2_grpc.AgentServiceStub(channel)
    for _ in range(100):
        got = await agents.GetAgent(agents_pb2.GetAgentRequest(agent_id=site.agent.agent_id),
                                    metadata=bearer(site.token), timeout=10)
        if got.agent.in_flight == 0:
            break
        await asyncio.sleep(0.1)
    assert got.agent.in_flight == 0
    assert (await execute(channel, site, request("SELECT 1 AS one"))).summary.row_count == 1


async def test_a_query_without_sql_is_refused_naming_the_field(site: Site, channel: grpc.aio.Channel) -> None:
    error = await failure(execute(channel, site, request("  ")))
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                               "'sql' is required: the statement to run")


async def test_a_write_on_a_read_only_profile_is_refused_as_query_refuses_it(
        site: Site, channel: grpc.aio.Channel) -> None:
    write = request("INSERT INTO orders VALUES ('sneaky', 1)", profile="reports")
    unary, streamed = await failure(execute(channel, site, write)), await failure(stream(channel, site, write))
    assert (unary.code(), unary.details()) == (streamed.code(), streamed.details())
    assert unary.code() == grpc.StatusCode.FAILED_PRECONDITION
    with sqlite3.connect(site.db) as conn:
        assert conn.execute("SELECT count(*) FROM orders WHERE id = 'sneaky'").fetchone() == (0,)


async def test_a_key_sent_with_execute_query_is_answered_by_query_and_the_write_runs_once(
        site: Site, channel: grpc.aio.Channel) -> None:
    insert = request("INSERT INTO orders VALUES ('keyed-1', 3)")
    first = await execute(channel, site, insert, key="unary-key-1")
    assert await stream(channel, site, insert, key="unary-key-1") == as_stream(first)
    assert await execute(channel, site, insert, key="unary-key-1") == first
    with sqlite3.connect(site.db) as conn:
        assert conn.execute("SELECT count(*) FROM orders WHERE id = 'keyed-1'").fetchone() == (1,)


@pytest.fixture(scope="module")
def small_budget(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("execute-query-budget")
    db = base / "empty.db"
    sqlite3.connect(db).close()
    cp = ControlPlaneProcess(base / "cp", extra_args=["--whole-results-mib", "1"])
    cp.start()
    agent = AgentProcess(base / "agent", cp, profiles={"databases": {"shop": {"url": f"sqlite:///{db}"}}})
    try:
        token = cp.admin_token()
        agent.enroll(GROUP)
        agent.start()

        async def ready() -> None:
            async with operator_channel(cp) as channel:
                await wait_for_agent_state(channel, token, agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)

        asyncio.run(ready())
        yield Site(cp, agent, token, db)
    finally:
        agent.stop()
        cp.stop()


async def test_results_past_the_control_planes_budget_are_refused_and_the_budget_comes_back(
        small_budget: Site) -> None:
    async with operator_channel(small_budget.cp) as channel:
        error = await failure(execute(channel, small_budget, request(ROWS, n=40_000)))  # about 2 MiB
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == ("the control plane holds 1 MiB of whole results for ExecuteQuery calls now, "
                                   "its limit; retry shortly, or stream the result with Query")
        # What the refused call held was given back: a result of most of the budget still fits.
        assert (await execute(channel, small_budget, request(ROWS, n=15_000))).summary.row_count == 15_000
