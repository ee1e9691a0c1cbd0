"""Traces through the tunnel, with real processes: a control plane and an agent exporting their spans
over OTLP to a test collector (a real gRPC TraceService), a SQLite and a PostgreSQL profile.

One request makes one trace: the control plane's call span (a child of the caller's traceparent when it
sent a valid one), its auth, relay and route spans, and, in the agent's process, the request span under
the relay span and the database statement span under that. The audit row and both processes' log lines
carry the same trace id. A malformed traceparent starts a new trace and the request is served; with no
endpoint configured nothing is exported, and the trace id still reaches the audit row and the logs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from onprem.v1 import agents_pb2, audit_pb2, audit_pb2_grpc, database_pb2, database_pb2_grpc
from tests.support.otlp_collector import Collector, ReceivedSpan, running_collector
from tests.support.postgres import PostgresServer
from tools.cluster import AgentProcess, ControlPlaneProcess, bearer, operator_channel, wait_for_agent_state

GROUP = "traced"
QUERY_METHOD = "/onprem.v1.DatabaseService/Query"
#: The batch processors' delay, in ms: spans reach the collector soon after their request ends.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100", "ONPREM_LOG_FORMAT": "json"}


@dataclass
class Site:
    cp: ControlPlaneProcess
    agent: AgentProcess
    token: str
    collector: Collector | None


def _site(base: Path, postgres: PostgresServer, endpoint: str | None, collector: Collector | None) -> Iterator[Site]:
    db = base / "traced.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
        conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"row {i}") for i in range(1, 6)])
    # Off means off whatever the environment running the tests says.
    env = FAST_EXPORT if endpoint else {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": "",
                                        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
    cp = ControlPlaneProcess(base / "cp", extra_args=["--otlp-endpoint", endpoint] if endpoint else [], env=env)
    cp.start()
    token = cp.admin_token()
    agent = AgentProcess(
        base / "agent", cp,
        profiles={"databases": {
            "lite": {"url": f"sqlite:///{db}"},
            "pg": {"url": postgres.url(with_password=False), "password_env": "TRACED_PG_PASSWORD"},
        }},
        env={"TRACED_PG_PASSWORD": postgres.password, **env},
        extra_config={"tracing": {"otlp_endpoint": endpoint, "service_name": "site-agent"}} if endpoint else {},
    )
    agent.enroll(GROUP)
    agent.start()
    try:
        yield Site(cp, agent, token, collector)
    finally:
        agent.stop()
        cp.stop()


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Iterator[Site]:
    with running_collector() as (collector, endpoint):
        yield from _site(tmp_path_factory.mktemp("traced"), postgres, endpoint, collector)


@pytest.fixture(scope="module")
def untraced(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Iterator[Site]:
    # A collector that nobody is told about: the processes must not find it, and send nothing anywhere.
    with running_collector() as (collector, _endpoint):
        for site in _site(tmp_path_factory.mktemp("untraced"), postgres, None, None):
            site.collector = collector
            yield site


async def _query(site: Site, profile: str, sql: str, metadata: tuple[tuple[str, str], ...] = ()) -> int:
    """Run `sql` through the tunnel once the agent is active; the rows it returned."""
    async with operator_channel(site.cp) as channel:
        await wait_for_agent_state(channel, site.token, site.agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)
        stub = database_pb2_grpc.DatabaseServiceStub(channel)
        rows = 0
        request = database_pb2.QueryRequest(group=GROUP, profile=profile, sql=sql)
        async for response in stub.Query(request, metadata=bearer(site.token) + metadata, timeout=60):
            if response.HasField("rows"):
                rows += response.rows.row_count
        return rows


async def _audit_event(site: Site, *, trace_id: str | None = None, after: int = -1,
                       within: float = 30) -> audit_pb2.AuditEvent:
    """The newest audit event of a Query (of `trace_id`, when given; with an id above `after`), once it was
    written."""
    async with operator_channel(site.cp) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            response = await stub.ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(kind="database", trace_id=trace_id or "", page_size=10),
                metadata=bearer(site.token))
            events = [e for e in response.events if e.method == QUERY_METHOD and e.id > after]
            if events:
                return events[0]
            await asyncio.sleep(0.1)
    raise AssertionError(f"no audit event of a Query{f' in trace {trace_id}' if trace_id else ''} within {within} s")


def _by_name(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    named: dict[str, ReceivedSpan] = {}
    for span in spans:
        assert span.name not in named, f"two spans named {span.name!r} in one trace: {spans}"
        named[span.name] = span
    return named


#: Every span one Query makes, by name, with the service that exports it.
EXPECTED = {
    "onprem.v1.DatabaseService/Query": "onprem-control-plane",
    "auth": "onprem-control-plane",
    "relay": "onprem-control-plane",
    "route": "onprem-control-plane",
    "agent database_query": "site-agent",
    "db query": "site-agent",
}


async def _trace(collector: Collector, trace_id: str) -> dict[str, ReceivedSpan]:
    spans = await collector.wait_for(lambda received: {s.name for s in received if s.trace_id == trace_id}
                                     >= set(EXPECTED))
    return _by_name([s for s in spans if s.trace_id == trace_id])


async def _last_event_id(site: Site) -> int:
    """The id of the newest audit event of a Query so far (-1: none), once the rows of earlier calls are in."""
    await asyncio.sleep(0.5)  # rows are written in batches, a few milliseconds after their call ends
    try:
        return (await _audit_event(site, within=0.5)).id
    except AssertionError:
        return -1


async def test_one_query_makes_one_trace_across_both_processes_down_to_the_database_statement(
        traced: Site) -> None:
    before = await _last_event_id(traced)
    assert await _query(traced, "pg", "SELECT generate_series(1, 3) AS n") == 3
    event = await _audit_event(traced, after=before)
    assert len(event.trace_id) == 32
    assert traced.collector is not None
    spans = await _trace(traced.collector, event.trace_id)
    assert {name: span.service for name, span in spans.items()} == EXPECTED
    call, relay = spans["onprem.v1.DatabaseService/Query"], spans["relay"]
    agent, statement = spans["agent database_query"], spans["db query"]
    # The links: call <- auth, relay; relay <- route, and across the tunnel relay <- agent <- statement.
    assert call.parent_span_id == "" and call.kind == "SERVER"
    assert spans["auth"].parent_span_id == call.span_id
    assert relay.parent_span_id == call.span_id and relay.kind == "CLIENT"
    assert spans["route"].parent_span_id == relay.span_id
    assert agent.parent_span_id == relay.span_id and agent.kind == "SERVER"
    assert statement.parent_span_id == agent.span_id and statement.kind == "CLIENT"
    assert statement.attributes["db.system.name"] == "postgresql"
    assert statement.attributes["onprem.profile"] == "pg"
    assert relay.attributes["onprem.agent_id"] == traced.agent.agent_id
    # Spans name what ran, never what it carried.
    assert not any("generate_series" in str(value) for span in spans.values() for value in span.attributes.values())


async def test_a_callers_traceparent_is_honoured_its_trace_id_everywhere_and_its_span_the_parent(
        traced: Site) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    metadata = (("traceparent", f"00-{trace_id}-{parent_id}-01"), ("tracestate", "vendor=abc"))
    assert await _query(traced, "lite", "SELECT id FROM t", metadata) == 5
    assert traced.collector is not None
    spans = await _trace(traced.collector, trace_id)
    assert spans["onprem.v1.DatabaseService/Query"].parent_span_id == parent_id
    assert spans["agent database_query"].parent_span_id == spans["relay"].span_id
    assert spans["db query"].attributes["db.system.name"] == "sqlite"
    assert (await _audit_event(traced, trace_id=trace_id)).trace_id == trace_id


async def test_the_log_lines_of_a_request_in_both_processes_carry_its_trace_id(traced: Site) -> None:
    trace_id = secrets.token_hex(16)
    await _query(traced, "lite", "SELECT 1", (("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"),))
    await _audit_event(traced, trace_id=trace_id)  # the control plane's line is logged as the call ends

    def lines_of_trace(log: Path) -> list[dict[str, object]]:
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        return [e for e in entries if e.get("trace_id") == trace_id]

    assert [e["logger"] for e in lines_of_trace(traced.cp.log_file)] == ["onprem.control_plane.observe"]
    assert [e["logger"] for e in lines_of_trace(traced.agent.home / "agent.log")] == ["onprem.agent.session"]


@pytest.mark.parametrize("traceparent", [
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",   # all-zero trace id
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",   # an unknown version
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",      # no flags
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",   # upper case
    "garbage" * 1000,                                            # long
])
async def test_a_malformed_traceparent_starts_a_new_trace_and_the_request_is_served(
        traced: Site, traceparent: str) -> None:
    before = await _last_event_id(traced)
    assert await _query(traced, "lite", "SELECT id FROM t", (("traceparent", traceparent),)) == 5
    event = await _audit_event(traced, after=before)
    assert len(event.trace_id) == 32 and event.trace_id not in traceparent.lower()
    assert traced.collector is not None
    spans = await _trace(traced.collector, event.trace_id)
    assert spans["onprem.v1.DatabaseService/Query"].parent_span_id == ""


async def test_with_no_endpoint_nothing_is_exported_and_the_trace_id_still_reaches_the_audit_and_logs(
        untraced: Site) -> None:
    trace_id = secrets.token_hex(16)
    assert await _query(untraced, "lite", "SELECT id FROM t",
                        (("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"),)) == 5
    assert (await _audit_event(untraced, trace_id=trace_id)).trace_id == trace_id
    agent_lines = [json.loads(line) for line in (untraced.agent.home / "agent.log").read_text().splitlines()
                   if line.startswith("{")]
    assert any(e.get("trace_id") == trace_id for e in agent_lines)
    await asyncio.sleep(1)  # longer than the processes' export delay, were they exporting
    assert untraced.collector is not None and untraced.collector.requests == 0


async def test_the_audit_api_refuses_a_trace_id_that_is_not_32_lower_case_hex_digits(traced: Site) -> None:
    async with operator_channel(traced.cp) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListAuditEvents(audit_pb2.ListAuditEventsRequest(trace_id="4BF92F35"),
                                       metadata=bearer(traced.token))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "32 lower-case hex digits" in (info.value.details() or "")



async def test_a_query_the_caller_cancels_midway_ends_its_spans_with_the_cancellation(traced: Site) -> None:
    trace_id = secrets.token_hex(16)
    metadata = (*bearer(traced.token), ("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"))
    many = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000000) "
            "SELECT i, printf('%.200d', i) AS pad FROM n")
    async with operator_channel(traced.cp) as channel:
        await wait_for_agent_state(channel, traced.token, traced.agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)
        call = database_pb2_grpc.DatabaseServiceStub(channel).Query(
            database_pb2.QueryRequest(group=GROUP, profile="lite", sql=many), metadata=metadata, timeout=60)
        async for response in call:
            if response.HasField("rows"):
                break
        call.cancel()
    assert traced.collector is not None
    spans = await _trace(traced.collector, trace_id)
    assert spans["onprem.v1.DatabaseService/Query"].status == "ERROR"
    assert spans["onprem.v1.DatabaseService/Query"].attributes["rpc.grpc.status_code"] == "CANCELLED"
    assert (await _audit_event(traced, trace_id=trace_id)).outcome == "CANCELLED"


def test_neither_process_logged_a_tracing_failure(traced: Site) -> None:
    # Runs after the others of the module: a span context restored in the wrong task, or an export that
    # failed, is logged by OpenTelemetry itself.
    for log in (traced.cp.log_file, traced.agent.home / "agent.log"):
        failures = [line for line in log.read_text().splitlines()
                    if any(sign in line for sign in ("Failed to detach context", "Failed to export", "Transient error"))]
        assert failures == [], log
