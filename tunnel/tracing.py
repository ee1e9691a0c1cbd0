"""Traces through the tunnel: W3C trace context carried with each request, and the spans of both processes.

A call's trace context comes from the operator's `traceparent` (and `tracestate`) metadata, or is new
when there is none or it is malformed. The control plane sends it to the agent in
`RequestStart.trace_context`, with its own relay span as the parent; the agent's spans (the request,
and the database statement, file operation or upstream HTTP call under it) are its children. Both
processes put the trace id in the log lines of the request (`tunnel.logs`), and the control plane in
its audit row.

Spans are made only when an OTLP endpoint is configured (`configure`): otherwise the tracer is the
OpenTelemetry API's no-op one, no SDK object exists and no exporter thread runs; a request then costs
one parse of its metadata and one context variable set (`enter`), which is what carries the trace id
to its log lines and to the agent.

What comes from a peer is untrusted: `traceparent` must be exactly version 00 with ids that are not
all zeros (anything else starts a new trace, and the request is served all the same), `tracestate`
is kept only when it has at most 512 characters in at most 32 well-formed members. Nothing flows
back: no frame from an agent carries trace context or spans, so an agent cannot add to the control
plane's trace anything beyond its own spans, which it exports itself.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    INVALID_SPAN,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from onprem.v1 import tunnel_pb2

__all__ = [
    "ENDPOINT_ENV", "MAX_TRACESTATE_CHARS", "MAX_TRACESTATE_MEMBERS", "SERVICE_NAME_ENV", "TRACEPARENT",
    "TRACESTATE", "Tracing", "configure", "current_span", "current_trace_id", "enter", "format_traceparent", "from_metadata",
    "from_proto", "install", "parse_traceparent", "parse_tracestate", "span", "to_proto", "tracing",
]

log = logging.getLogger("onprem.tunnel.tracing")

#: The metadata (HTTP headers) of W3C Trace Context.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: The environment variables users of OpenTelemetry expect.
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
SERVICE_NAME_ENV = "OTEL_SERVICE_NAME"
#: W3C's limits on tracestate: 32 members; 512 characters is what a receiver must at least propagate.
MAX_TRACESTATE_CHARS = 512
MAX_TRACESTATE_MEMBERS = 32

# version 00 only: a later version may add fields we would pass on unchecked.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACESTATE_KEY = re.compile(r"[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13}")
_TRACESTATE_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def parse_traceparent(value: str) -> SpanContext | None:
    """The remote span context `value` names; None unless it is a well-formed version-00 traceparent."""
    match = _TRACEPARENT.fullmatch(value) if len(value) == 55 else None
    if match is None:
        return None
    trace_id, span_id = int(match.group(1), 16), int(match.group(2), 16)
    if trace_id == 0 or span_id == 0:
        return None
    # Only the sampled bit means anything in version 00; the others are passed on as zero.
    flags = TraceFlags(int(match.group(3), 16) & TraceFlags.SAMPLED)
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)


def parse_tracestate(value: str) -> TraceState | None:
    """`value` as a TraceState; None when it is empty, too long, or any member is malformed."""
    if not value or len(value) > MAX_TRACESTATE_CHARS:
        return None
    entries: list[tuple[str, str]] = []
    seen: set[str] = set()
    for member in value.split(","):
        member = member.strip(" \t")
        if not member:
            continue  # empty list members are allowed, and dropped
        key, sep, item = member.partition("=")
        if not sep or key in seen or not _TRACESTATE_KEY.fullmatch(key) or not _TRACESTATE_VALUE.fullmatch(item):
            return None
        seen.add(key)
        entries.append((key, item))
    if not entries or len(entries) > MAX_TRACESTATE_MEMBERS:
        return None
    return TraceState(entries)


def format_traceparent(span_context: SpanContext) -> str:
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"


def from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> SpanContext | None:
    """The caller's span context from gRPC metadata: one valid `traceparent`, with its `tracestate`."""
    parents: list[str | bytes] = []
    states: list[str | bytes] = []
    for name, value in metadata or ():
        if name == TRACEPARENT:
            parents.append(value)
        elif name == TRACESTATE:
            states.append(value)
    if len(parents) != 1 or not isinstance(parents[0], str):
        return None  # none, several (which one is the caller's?), or binary
    parent = parse_traceparent(parents[0])
    if parent is None:
        return None
    # Several tracestate headers are one list, joined (RFC 9110); binary ones are not headers.
    state = parse_tracestate(",".join(s for s in states if isinstance(s, str))) if states else None
    if state is None:
        return parent
    return SpanContext(parent.trace_id, parent.span_id, is_remote=True, trace_flags=parent.trace_flags,
                       trace_state=state)


def to_proto(span_context: SpanContext) -> tunnel_pb2.TraceContext:
    """What `RequestStart.trace_context` carries for a request whose parent is `span_context`."""
    message = tunnel_pb2.TraceContext(traceparent=format_traceparent(span_context))
    if span_context.trace_state:
        message.tracestate = span_context.trace_state.to_header()
    return message


def from_proto(message: tunnel_pb2.TraceContext) -> SpanContext | None:
    """The control plane's span context from a `RequestStart`, checked like the operator's metadata."""
    parent = parse_traceparent(message.traceparent)
    if parent is None:
        return None
    state = parse_tracestate(message.tracestate)
    if state is None:
        return parent
    return SpanContext(parent.trace_id, parent.span_id, is_remote=True, trace_flags=parent.trace_flags,
                       trace_state=state)


def _new_context(parent: SpanContext | None) -> SpanContext:
    """Where a request sits when this process records nothing: under its caller, or a new trace.

    A new trace is marked sampled: this process leaves the choice to the next one's sampler.
    """
    if parent is not None:
        return parent
    trace_id = random.getrandbits(128) or 1
    return SpanContext(trace_id, random.getrandbits(64) or 1, is_remote=False, trace_flags=_SAMPLED)


@dataclass(frozen=True)
class Tracing:
    """The process's tracer: the API's no-op one, or the SDK's exporting over OTLP."""

    tracer: trace.Tracer
    #: Whether spans are made (an endpoint was configured); when False, `tracer` is a no-op.
    enabled: bool = False
    #: What `shutdown` flushes and stops: the SDK's TracerProvider, None when off.
    provider: object | None = None

    def shutdown(self) -> None:
        """Export the spans still queued, and stop the exporter's thread."""
        shutdown = getattr(self.provider, "shutdown", None)
        if shutdown is not None:
            shutdown()


_OFF = Tracing(trace.NoOpTracer())
_tracing = _OFF


def tracing() -> Tracing:
    return _tracing


def install(value: Tracing | None) -> None:
    """Make `value` the process's tracing (None: off). Tests install one with an in-memory exporter."""
    global _tracing
    _tracing = value or _OFF


def configure(service: str, *, endpoint: str | None = None, attributes: Mapping[str, str] | None = None,
              environ: Mapping[str, str] = os.environ) -> Tracing:
    """Export spans over OTLP/gRPC to `endpoint` (or OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT); off when none.

    `service` is the service.name unless OTEL_SERVICE_NAME names another. The exporter reads the other
    OTEL_EXPORTER_OTLP_* variables itself (headers, certificate, insecure, timeout), and the sampler
    OTEL_TRACES_SAMPLER (default: follow the caller's sampled flag, sample new traces). Installs and
    returns the result; call `Tracing.shutdown` before the process exits.
    """
    endpoint = endpoint or environ.get(TRACES_ENDPOINT_ENV) or environ.get(ENDPOINT_ENV)
    if not endpoint:
        install(None)
        return _OFF
    # Imported here: a process that exports nothing loads none of the SDK.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from onprem.tunnel.version import installed_version

    resource = Resource.create({"service.name": environ.get(SERVICE_NAME_ENV) or service,
                                "service.version": installed_version(), **(attributes or {})})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    result = Tracing(provider.get_tracer("onprem"), enabled=True, provider=provider)
    install(result)
    log.info("exporting spans over OTLP to %s as service %s", endpoint, resource.attributes["service.name"])
    return result


def current_span() -> Span:
    """The span of the request this task serves (INVALID_SPAN outside one)."""
    return trace.get_current_span()


def current_trace_id() -> str:
    """The trace id of the request this task serves, as 32 hex digits; "" outside a request."""
    span_context = trace.get_current_span().get_span_context()
    return f"{span_context.trace_id:032x}" if span_context.is_valid else ""


#: The span `enter` made current: its reset checks that a block ends in the context it began in.
_ENTERED: ContextVar[Span | None] = ContextVar("onprem_entered_span", default=None)


@contextmanager
def enter(name: str, parent: SpanContext | None, *, kind: SpanKind = SpanKind.SERVER,
          attributes: Mapping[str, str | int] | None = None) -> Iterator[Span]:
    """The span of one request in this process, current for as long as the block runs.

    Under `parent` (the caller's, already checked) or in a new trace. With tracing off it is a
    non-recording span that only carries the trace context: its trace id goes to the logs, the audit
    and the agent all the same.
    """
    state = _tracing
    if state.enabled:
        # No parent: an empty context, so that the span is a root whatever this task's context holds.
        parent_context = trace.set_span_in_context(NonRecordingSpan(parent), otel_context.Context()) \
            if parent is not None else otel_context.Context()
        current: Span = state.tracer.start_span(name, context=parent_context, kind=kind, attributes=attributes,
                                                record_exception=False, set_status_on_exception=False)
    else:
        current = NonRecordingSpan(_new_context(parent))
    token = otel_context.attach(trace.set_span_in_context(current))
    entered = _ENTERED.set(current)
    try:
        yield current
    finally:
        current.end()
        try:
            # Resetting our own variable first tells whether this is still the context the span was
            # entered in: a streaming handler (an async generator) may be finalized in another task,
            # whose context is a copy where otel's detach would fail and log an error.
            _ENTERED.reset(entered)
        except ValueError:
            pass  # another context: it holds a copy of the span, and is thrown away with its task
        else:
            otel_context.detach(token)


@contextmanager
def span(name: str, *, parent: Span | None = None, kind: SpanKind = SpanKind.INTERNAL,
         attributes: Mapping[str, str | int | bool] | None = None) -> Iterator[Span]:
    """A child of `parent` (default: the current span) for as long as the block runs; nothing when off.

    Never made current: a block may sit in an async generator that is finalized in another context
    (where restoring the context would fail); children name their parent instead.
    """
    state = _tracing
    if not state.enabled:
        yield INVALID_SPAN
        return
    context = trace.set_span_in_context(parent) if parent is not None else None
    child = state.tracer.start_span(name, context=context, kind=kind, attributes=attributes,
                                    record_exception=False, set_status_on_exception=False)
    try:
        yield child
    finally:
        child.end()


def failed(target: Span, code_name: str, reason: str = "") -> None:
    """Mark `target` as failed with a gRPC status (by name) and the error's reason, never its message
    (which may quote SQL or paths)."""
    if target.is_recording():
        target.set_attribute("rpc.grpc.status_code", code_name)
        if reason:
            target.set_attribute("onprem.error.reason", reason)
        target.set_status(Status(StatusCode.ERROR, code_name))
