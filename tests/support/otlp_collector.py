"""A test OTLP collector: a real gRPC server implementing OpenTelemetry's TraceService on loopback.

Real control-plane and agent processes export their spans to it exactly as they would to a user's
collector (OTLP/gRPC, `--otlp-endpoint` / `tracing.otlp_endpoint`); the test reads what arrived, one
`ReceivedSpan` per span with the service that sent it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from tools.ports import free_port


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, ids as hex as W3C writes them."""

    service: str
    name: str
    trace_id: str
    span_id: str
    #: "" for a root span.
    parent_span_id: str
    #: SPAN_KIND_* name without the prefix, e.g. "SERVER".
    kind: str
    attributes: dict[str, Any]
    #: STATUS_CODE_* name without the prefix: "UNSET", "OK" or "ERROR".
    status: str


def _value(any_value: Any) -> Any:
    which = any_value.WhichOneof("value")
    return getattr(any_value, which) if which else None


class Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        # In the server's threads: appending to a list is atomic, and readers copy it.
        self.requests += 1
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(ReceivedSpan(
                        service=str(resource.get("service.name", "")), name=span.name,
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        status=trace_pb2.Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
                    ))
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def wait_for(self, found: Callable[[list[ReceivedSpan]], bool], within: float = 60) -> list[ReceivedSpan]:
        """The spans received, once `found` holds for them; AssertionError naming what came otherwise."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if found(self.spans):
                return list(self.spans)
            await asyncio.sleep(0.1)
        names = sorted({(s.service, s.name) for s in self.spans})
        raise AssertionError(f"the spans looked for did not arrive within {within} s; received: {names}")


@contextmanager
def running_collector() -> Iterator[tuple[Collector, str]]:
    """A collector listening on loopback, and its endpoint ("http://127.0.0.1:<port>", plain gRPC).

    A threaded (not asyncio) server: it outlives the event loop of each test that reads it.
    """
    collector = Collector()
    server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-collector"))
    # OpenTelemetry's generated service module has no type hints.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield collector, f"http://127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait()
