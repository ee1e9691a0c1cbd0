"""W3C trace context from untrusted peers: what `tunnel.tracing` accepts, and what it starts instead."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from onprem.tunnel import logs, tracing
from onprem.v1 import tunnel_pb2

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"


def test_a_valid_traceparent_names_the_callers_trace_parent_and_sampled_flag() -> None:
    parsed = tracing.parse_traceparent(VALID)
    assert parsed is not None
    assert (f"{parsed.trace_id:032x}", f"{parsed.span_id:016x}", int(parsed.trace_flags), parsed.is_remote) == (
        TRACE_ID, PARENT_ID, 1, True)


@pytest.mark.parametrize("value", [
    "",
    f"01-{TRACE_ID}-{PARENT_ID}-01",                       # a version this receiver does not know
    f"ff-{TRACE_ID}-{PARENT_ID}-01",                       # the forbidden version
    f"00-{'0' * 32}-{PARENT_ID}-01",                       # all-zero trace id
    f"00-{TRACE_ID}-{'0' * 16}-01",                        # all-zero parent id
    f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",               # upper case
    f"00-{TRACE_ID}-{PARENT_ID}-01-extra",                 # fields a version 00 has not
    f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",                  # short trace id
    f"00-{TRACE_ID}-{PARENT_ID}-1",                        # short flags
    f" 00-{TRACE_ID}-{PARENT_ID}-01",                      # padding
    f"00-{TRACE_ID}-{PARENT_ID}-0g",                       # not hex
    f"00_{TRACE_ID}_{PARENT_ID}_01",                       # wrong separators
    f"00-{TRACE_ID}-{PARENT_ID}-01\n",                     # a trailing newline ($ would match it)
    "00-" + "\uff41" * 32 + f"-{PARENT_ID}-01",            # non-ASCII "hex" (fullwidth a)
    "x" * 100_000,                                         # huge
])
def test_a_malformed_traceparent_is_refused(value: str) -> None:
    assert tracing.parse_traceparent(value) is None


def test_flags_other_than_sampled_are_not_passed_on() -> None:
    parsed = tracing.parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-ff")
    assert parsed is not None and int(parsed.trace_flags) == 1


def test_a_wellformed_tracestate_is_kept_in_order() -> None:
    state = tracing.parse_tracestate("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7,,tenant@vendor=x")
    assert state is not None and state.to_header() == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7,tenant@vendor=x"


@pytest.mark.parametrize("value", [
    "a=" + "b" * 600,                                      # longer than 512 characters
    ",".join(f"k{i}=v" for i in range(33)),                # more than 32 members
    "Upper=v",                                             # keys are lower case
    "k=v,k=w",                                             # a key twice
    "k=v=w",                                               # '=' in a value
    "k=",                                                  # an empty value
    "novalue",                                             # no '='
    "k=v\x00",                                             # control characters
    ",,,",                                                 # nothing but empty members
])
def test_a_malformed_or_oversized_tracestate_is_dropped(value: str) -> None:
    assert tracing.parse_tracestate(value) is None


def test_metadata_with_one_valid_traceparent_gives_the_callers_context_and_state() -> None:
    found = tracing.from_metadata([("authorization", "Bearer x"), ("traceparent", VALID), ("tracestate", "a=1"),
                                   ("tracestate", "b=2")])
    assert found is not None and f"{found.trace_id:032x}" == TRACE_ID
    assert found.trace_state.to_header() == "a=1,b=2"


def test_metadata_with_two_traceparents_names_no_caller() -> None:
    assert tracing.from_metadata([("traceparent", VALID), ("traceparent", VALID)]) is None


def test_a_valid_traceparent_with_a_bad_tracestate_keeps_the_parent_without_state() -> None:
    found = tracing.from_metadata([("traceparent", VALID), ("tracestate", "BAD")])
    assert found is not None and f"{found.span_id:016x}" == PARENT_ID and not found.trace_state


def test_the_proto_form_round_trips_and_is_checked_like_metadata() -> None:
    context = tracing.from_metadata([("traceparent", VALID), ("tracestate", "a=1")])
    assert context is not None
    message = tracing.to_proto(context)
    assert (message.traceparent, message.tracestate) == (VALID, "a=1")
    back = tracing.from_proto(message)
    assert back is not None and (back.trace_id, back.span_id) == (context.trace_id, context.span_id)
    assert tracing.from_proto(tunnel_pb2.TraceContext(traceparent="00-nonsense")) is None


def test_with_tracing_off_a_request_gets_a_new_trace_id_and_no_span_is_recorded() -> None:
    tracing.install(None)
    with tracing.enter("call", None) as span:
        assert not span.is_recording()
        assert len(tracing.current_trace_id()) == 32 and int(tracing.current_trace_id(), 16) != 0
        with tracing.span("child") as child:
            assert not child.is_recording()
    assert tracing.current_trace_id() == ""


def test_with_tracing_off_the_callers_trace_id_is_the_requests() -> None:
    tracing.install(None)
    parent = tracing.parse_traceparent(VALID)
    with tracing.enter("call", parent):
        assert tracing.current_trace_id() == TRACE_ID
        assert tracing.current_span().get_span_context().span_id == int(PARENT_ID, 16)


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(tracing.Tracing(provider.get_tracer("test"), enabled=True, provider=provider))
    yield exporter
    tracing.install(None)
    provider.shutdown()


def test_with_tracing_on_spans_are_children_of_the_callers_parent(exported: InMemorySpanExporter) -> None:
    parent = tracing.parse_traceparent(VALID)
    with tracing.enter("call", parent) as root, tracing.span("child"):
        assert root.is_recording()
    spans = {s.name: s for s in exported.get_finished_spans()}
    assert spans["call"].context.trace_id == int(TRACE_ID, 16)
    assert spans["call"].parent is not None and spans["call"].parent.span_id == int(PARENT_ID, 16)
    assert spans["child"].parent is not None and spans["child"].parent.span_id == spans["call"].context.span_id


def test_log_lines_of_a_request_carry_its_trace_id(capsys: pytest.CaptureFixture[str]) -> None:
    tracing.install(None)
    logs.configure("INFO", "json")
    try:
        with tracing.enter("call", tracing.parse_traceparent(VALID)):
            logging.getLogger("onprem.test").info("inside")
        logging.getLogger("onprem.test").info("outside")
    finally:
        logging.getLogger().handlers.clear()
    inside, outside = capsys.readouterr().err.strip().splitlines()
    assert f'"trace_id": "{TRACE_ID}"' in inside
    assert "trace_id" not in outside



def test_with_no_endpoint_the_sdk_is_never_loaded_and_no_thread_starts() -> None:
    # In a fresh interpreter: this test process has loaded the SDK for the tests above.
    script = (
        "import sys, threading\n"
        "from onprem.tunnel import tracing\n"
        "import onprem.control_plane.server, onprem.agent.cli\n"
        "before = threading.active_count()\n"
        "state = tracing.configure('onprem-test', environ={})\n"
        "with tracing.enter('call', None) as root, tracing.span('child') as child:\n"
        "    assert not root.is_recording() and not child.is_recording()\n"
        "print(state.enabled, threading.active_count() - before,\n"
        "      sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False 0 []"


def test_an_endpoint_in_the_standard_environment_turns_exporting_on() -> None:
    state = tracing.configure("onprem-test", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    try:
        assert state.enabled and tracing.tracing() is state
    finally:
        state.shutdown()
        tracing.install(None)


def test_no_frame_an_agent_sends_can_carry_trace_context() -> None:
    # What keeps an agent from adding to the control plane's trace: nothing it sends names a span.
    from google.protobuf.descriptor import FieldDescriptor

    def reachable(message: Any, seen: set[str]) -> set[str]:
        """The full names of the messages a message of this descriptor can hold, itself included."""
        if message.full_name in seen:
            return seen
        seen.add(message.full_name)
        for field in message.fields:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                reachable(field.message_type, seen)
        return seen

    from_agent = reachable(tunnel_pb2.ConnectRequest.DESCRIPTOR, set())
    assert "onprem.v1.ConnectResponse" not in from_agent  # the walk stays on the agent's side
    assert tunnel_pb2.TraceContext.DESCRIPTOR.full_name not in from_agent
    assert tunnel_pb2.TraceContext.DESCRIPTOR.full_name in reachable(tunnel_pb2.ConnectResponse.DESCRIPTOR, set())


def test_a_span_entered_in_an_async_generator_closed_in_another_task_leaves_no_error(
        caplog: pytest.LogCaptureFixture) -> None:
    # grpc.aio may finalize a streaming handler (an async generator) from another task than the one that
    # iterated it, e.g. when the client cancels: its context is a copy, where the attach cannot be undone.
    async def stream() -> AsyncGenerator[int, None]:
        with tracing.enter("onprem.v1.DatabaseService/Query", None):
            yield 1
            yield 2

    async def main() -> str:
        generator = stream()
        assert await anext(generator) == 1
        await asyncio.get_running_loop().create_task(generator.aclose())
        return tracing.current_trace_id()

    with caplog.at_level(logging.ERROR, logger="opentelemetry.context"):
        assert asyncio.run(main()) != ""  # the iterating task still holds the span it entered
    assert [r.getMessage() for r in caplog.records if "detach" in r.getMessage()] == []


def test_a_span_left_in_its_own_task_is_no_longer_current() -> None:
    async def main() -> str:
        with tracing.enter("x", None):
            assert tracing.current_trace_id() != ""
        return tracing.current_trace_id()

    assert asyncio.run(main()) == ""
