"""The agent's end of a trace: the control plane's trace context is input like any other from a peer.

Real sessions on both ends of an in-memory stream (`tunnel.testing.TunnelFor`), spans recorded by the
SDK's in-memory exporter installed in this process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from onprem.agent.dispatcher import Dispatcher
from onprem.agent.handlers.base import RequestContext
from onprem.tunnel import tracing
from onprem.tunnel.testing import TunnelFor
from onprem.v1 import files_pb2, profiles_pb2, tunnel_pb2

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
RELAY_SPAN_ID = "00f067aa0ba902b7"


class TraceIdFolder:
    """A folder handler that answers with the trace id its request runs in."""

    def profiles(self) -> list[profiles_pb2.Profile]:
        return [profiles_pb2.Profile(kind=profiles_pb2.PROFILE_KIND_FOLDER, name="f")]

    async def handle(self, op: files_pb2.FileOp, context: RequestContext) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        yield tunnel_pb2.ResponseChunk(read=files_pb2.ReadResponse(data=tracing.current_trace_id().encode()))

    async def check(self, profile: str) -> list[profiles_pb2.ProfileCheck]:
        return []

    async def aclose(self) -> None:
        pass


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(tracing.Tracing(provider.get_tracer("test"), enabled=True, provider=provider))
    yield exporter
    tracing.install(None)
    provider.shutdown()


def read(trace_context: tunnel_pb2.TraceContext | None) -> tunnel_pb2.RequestStart:
    start = tunnel_pb2.RequestStart(file_op=files_pb2.FileOp(read=files_pb2.ReadRequest(profile="f", path="p")))
    if trace_context is not None:
        start.trace_context.CopyFrom(trace_context)
    return start


async def served_trace_id(start: tunnel_pb2.RequestStart) -> str:
    async with TunnelFor(Dispatcher({"file_op": TraceIdFolder()})) as tunnel:
        chunks = [chunk async for chunk in tunnel.control_plane.start(start)]
    return b"".join(c.read.data for c in chunks).decode()


async def test_the_agents_request_span_is_a_child_of_the_control_planes_relay_span(
        exported: InMemorySpanExporter) -> None:
    parent = tunnel_pb2.TraceContext(traceparent=f"00-{TRACE_ID}-{RELAY_SPAN_ID}-01", tracestate="cp=1")
    assert await served_trace_id(read(parent)) == TRACE_ID
    [span] = [s for s in exported.get_finished_spans() if s.name == "agent file_op"]
    assert span.parent is not None and f"{span.parent.span_id:016x}" == RELAY_SPAN_ID
    assert span.context.trace_state.to_header() == "cp=1"


@pytest.mark.parametrize("traceparent", [
    "", "00-zz", f"00-{'0' * 32}-{RELAY_SPAN_ID}-01", f"ff-{TRACE_ID}-{RELAY_SPAN_ID}-01", "x" * 10_000])
async def test_a_malformed_trace_context_from_the_control_plane_starts_a_new_trace_and_the_request_is_served(
        exported: InMemorySpanExporter, traceparent: str) -> None:
    trace_id = await served_trace_id(read(tunnel_pb2.TraceContext(traceparent=traceparent)))
    assert len(trace_id) == 32 and trace_id not in traceparent
    [span] = [s for s in exported.get_finished_spans() if s.name == "agent file_op"]
    assert span.parent is None and f"{span.context.trace_id:032x}" == trace_id


async def test_an_oversized_tracestate_is_dropped_and_the_parent_kept(exported: InMemorySpanExporter) -> None:
    parent = tunnel_pb2.TraceContext(traceparent=f"00-{TRACE_ID}-{RELAY_SPAN_ID}-01", tracestate="a=" + "b" * 5000)
    assert await served_trace_id(read(parent)) == TRACE_ID
    [span] = [s for s in exported.get_finished_spans() if s.name == "agent file_op"]
    assert not span.context.trace_state


async def test_a_request_from_a_control_plane_that_sends_no_trace_context_runs_in_a_new_trace() -> None:
    tracing.install(None)  # tracing off: the trace id still reaches the request's log lines
    trace_id = await served_trace_id(read(None))
    assert len(trace_id) == 32 and int(trace_id, 16) != 0
