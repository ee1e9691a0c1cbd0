"""Hostile and malformed frames fed to both ends of the tunnel protocol (property-based, no network).

Whatever a peer sends, `ControlPlaneConnection.receive` and `AgentConnection.receive` either return
events or raise exactly `RemoteProtocolError`; never another exception. And the books stay straight:
credit never goes negative, `in_flight` matches the open requests, an ended request yields nothing
but `FrameIgnored` (or a protocol error), and a duplicate request id never starts a second request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onprem.tunnel.errors import Code, RemoteProtocolError
from onprem.tunnel.protocol import (
    AgentConnection,
    AgentFrame,
    CancelReceived,
    ChunkReceived,
    ControlFrame,
    ControlPlaneConnection,
    CreditGranted,
    DataReceived,
    DrainReceived,
    Event,
    FrameIgnored,
    HelloReceived,
    Limits,
    PingReceived,
    PongReceived,
    RequestEnded,
    RequestStarted,
    StatusReceived,
    Welcomed,
)
from onprem.v1 import database_pb2, files_pb2, tunnel_pb2

F = TypeVar("F", AgentFrame, ControlFrame)

WINDOW = 4096
MAX_CHUNK = 1024
SMALL = Limits(response_window_bytes=WINDOW, request_window_bytes=WINDOW, max_chunk_bytes=MAX_CHUNK)

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=os.environ.get("CI", "").lower() == "true",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

EVENT_TYPES = (
    HelloReceived, Welcomed, RequestStarted, DataReceived, CancelReceived, ChunkReceived, RequestEnded,
    CreditGranted, PingReceived, PongReceived, DrainReceived, StatusReceived, FrameIgnored,
)

# Request ids near the ones in use, and anywhere in uint64.
request_ids = st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1))
# Payload sizes around every boundary: empty, the chunk limit, the window, far beyond.
sizes = st.one_of(
    st.integers(0, 64),
    st.integers(MAX_CHUNK - 16, MAX_CHUNK + 16),
    st.integers(WINDOW - 16, WINDOW + 16),
    st.sampled_from([2 * WINDOW, 64 * 1024, 300 * 1024]),
)
uint32s = st.one_of(st.integers(0, 2 * WINDOW), st.integers(0, 2**32 - 1))


def _padded(size: int) -> bytes:
    return b"\xa5" * size


@st.composite
def agent_frames(draw: st.DrawFn) -> AgentFrame:
    """Frames an agent could send, well-formed or not, for any request id."""
    rid = draw(request_ids)
    kind = draw(st.sampled_from(["hello", "chunk", "end", "window_update", "ping", "pong", "status", "empty"]))
    if kind == "hello":
        hello = tunnel_pb2.Hello(
            protocol_revisions=draw(st.lists(st.integers(0, 2**32 - 1), max_size=3)),
            request_window_bytes=draw(uint32s),
        )
        return AgentFrame(request_id=rid, hello=hello)
    if kind == "chunk":
        chunk = draw(st.sampled_from(["read", "query", "empty"]))
        if chunk == "read":
            body = tunnel_pb2.ResponseChunk(read=files_pb2.ReadResponse(data=_padded(draw(sizes))))
        elif chunk == "query":
            body = tunnel_pb2.ResponseChunk(query=database_pb2.QueryResponse(
                summary=database_pb2.QuerySummary(row_count=draw(st.integers(0, 2**64 - 1)))))
        else:
            body = tunnel_pb2.ResponseChunk()
        return AgentFrame(request_id=rid, chunk=body)
    if kind == "end":
        end = tunnel_pb2.ResponseEnd(code=draw(st.integers(-(2**31), 2**31 - 1)),
                                     message=draw(st.text(max_size=20)), reason=draw(st.text(max_size=10)))
        return AgentFrame(request_id=rid, end=end)
    if kind == "window_update":
        return AgentFrame(request_id=rid, window_update=tunnel_pb2.WindowUpdate(bytes=draw(uint32s)))
    if kind == "ping":
        return AgentFrame(request_id=rid, ping=tunnel_pb2.Ping(nonce=draw(st.integers(0, 2**64 - 1))))
    if kind == "pong":
        return AgentFrame(request_id=rid, pong=tunnel_pb2.Pong(nonce=draw(st.integers(0, 2**64 - 1))))
    if kind == "status":
        return AgentFrame(request_id=rid, status=tunnel_pb2.AgentStatus(
            draining=draw(st.booleans()), in_flight=draw(uint32s)))
    return AgentFrame(request_id=rid)


@st.composite
def control_frames(draw: st.DrawFn) -> ControlFrame:
    """Frames a control plane could send, well-formed or not, for any request id."""
    rid = draw(request_ids)
    kind = draw(st.sampled_from(
        ["welcome", "start", "start", "data", "cancel", "window_update", "ping", "pong", "drain", "empty"]))
    if kind == "welcome":
        welcome = tunnel_pb2.Welcome(protocol_revision=draw(st.integers(0, 3)), max_chunk_bytes=draw(uint32s),
                                     response_window_bytes=draw(uint32s))
        return ControlFrame(request_id=rid, welcome=welcome)
    if kind == "start":
        start = tunnel_pb2.RequestStart(has_body=draw(st.booleans()), attempt=draw(uint32s))
        if draw(st.booleans()):
            start.database_query.query.sql = draw(st.text(max_size=20))
        return ControlFrame(request_id=rid, start=start)
    if kind == "data":
        data = tunnel_pb2.RequestData(data=_padded(draw(sizes)), end_of_data=draw(st.booleans()))
        return ControlFrame(request_id=rid, data=data)
    if kind == "cancel":
        return ControlFrame(request_id=rid, cancel=tunnel_pb2.Cancel(reason=draw(st.text(max_size=20))))
    if kind == "window_update":
        return ControlFrame(request_id=rid, window_update=tunnel_pb2.WindowUpdate(bytes=draw(uint32s)))
    if kind == "ping":
        return ControlFrame(request_id=rid, ping=tunnel_pb2.Ping(nonce=draw(st.integers(0, 2**64 - 1))))
    if kind == "pong":
        return ControlFrame(request_id=rid, pong=tunnel_pb2.Pong(nonce=draw(st.integers(0, 2**64 - 1))))
    if kind == "drain":
        return ControlFrame(request_id=rid, drain=tunnel_pb2.Drain(reason="x", exit_after=draw(st.booleans())))
    return ControlFrame(request_id=rid)


def _decoded(cls: type[F], raw: bytes) -> F | None:
    """What gRPC would hand the shell for these bytes; None when protobuf refuses them (gRPC's layer)."""
    try:
        return cls.FromString(raw)
    except DecodeError:
        return None


@st.composite
def garbled_agent_frames(draw: st.DrawFn) -> AgentFrame | None:
    """Random bytes, or a valid frame truncated or with bytes flipped, decoded as an agent frame."""
    if draw(st.booleans()):
        return _decoded(AgentFrame, draw(st.binary(max_size=300)))
    raw = bytearray(draw(agent_frames()).SerializeToString())
    if raw and draw(st.booleans()):
        del raw[draw(st.integers(0, len(raw) - 1)):]
    elif raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw[at] = draw(st.integers(0, 255))
    return _decoded(AgentFrame, bytes(raw))


@st.composite
def garbled_control_frames(draw: st.DrawFn) -> ControlFrame | None:
    if draw(st.booleans()):
        return _decoded(ControlFrame, draw(st.binary(max_size=300)))
    raw = bytearray(draw(control_frames()).SerializeToString())
    if raw and draw(st.booleans()):
        del raw[draw(st.integers(0, len(raw) - 1)):]
    elif raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw[at] = draw(st.integers(0, 255))
    return _decoded(ControlFrame, bytes(raw))


# --- the control plane's end --------------------------------------------------------------------


def check_control_plane_books(cp: ControlPlaneConnection) -> None:
    assert cp.in_flight == len(cp.open_request_ids()) == len(set(cp.open_request_ids()))
    for request in cp._requests.values():
        assert request.inbound.available >= 0, "the agent's chunk credit went negative"
        assert request.inbound.pending_grant >= 0
        assert request.outbound.credit >= 0, "our data credit went negative"


@dataclass
class ControlPlaneModel:
    """A control plane connection with some requests open, and what the test knows about them."""

    cp: ControlPlaneConnection = field(default_factory=lambda: ControlPlaneConnection(SMALL))
    ended: set[int] = field(default_factory=set)
    closed: bool = False

    def feed(self, frame: AgentFrame) -> None:
        if self.closed:
            return
        open_before = set(self.cp.open_request_ids())
        try:
            events = self.cp.receive(frame)
        except RemoteProtocolError:
            self.closed = True  # the shell ends the stream; nothing else arrives
            check_control_plane_books(self.cp)
            return
        assert isinstance(events, list)
        for event in events:
            assert isinstance(event, EVENT_TYPES), event
            self.check(event, open_before)
        check_control_plane_books(self.cp)

    def check(self, event: Event, open_before: set[int]) -> None:
        if isinstance(event, ChunkReceived):
            assert event.request_id in open_before and event.request_id not in self.ended
            assert event.size <= SMALL.max_chunk_bytes
            # The shell hands the chunk to the operator, which consumes it: credit flows back.
            grant = self.cp.consumed(event.request_id, event.size)
            assert grant is None or grant.window_update.bytes > 0
        elif isinstance(event, RequestEnded):
            assert event.request_id in open_before and event.request_id not in self.ended
            assert not self.cp.is_open(event.request_id)
            self.ended.add(event.request_id)
        elif isinstance(event, CreditGranted):
            assert event.request_id in open_before


def _started_control_plane(requests: list[bool], cancelled: list[bool], handshake: bool) -> ControlPlaneModel:
    model = ControlPlaneModel()
    if handshake:
        hello = AgentConnection(request_window_bytes=WINDOW).hello_frame(tunnel_pb2.Hello(agent_version="fuzz"))
        assert isinstance(model.cp.receive(hello)[0], HelloReceived)
        for has_body, cancel in zip(requests, cancelled, strict=False):
            rid, _ = model.cp.start_request(tunnel_pb2.RequestStart(has_body=has_body))
            if cancel:
                model.cp.cancel(rid, "fuzz")
    return model


@FUZZ
@given(
    handshake=st.booleans(),
    requests=st.lists(st.booleans(), max_size=5),
    cancelled=st.lists(st.booleans(), max_size=5),
    frames=st.lists(st.one_of(agent_frames(), garbled_agent_frames()), max_size=40),
)
def test_control_plane_answers_any_agent_frames_with_events_or_a_remote_protocol_error(
    handshake: bool, requests: list[bool], cancelled: list[bool], frames: list[AgentFrame | None],
) -> None:
    model = _started_control_plane(requests, cancelled, handshake)
    for frame in frames:
        if frame is not None:
            model.feed(frame)


@FUZZ
@given(
    requests=st.integers(1, 4),
    frames=st.lists(st.tuples(st.integers(1, 4), st.sampled_from(["chunk", "end", "window_update"]), sizes),
                    max_size=60),
)
def test_control_plane_never_lets_an_ended_request_come_back_or_credit_overflow(
    requests: int, frames: list[tuple[int, str, int]],
) -> None:
    """Plausible frames for the requests in use: duplicates of `end`, chunks after the final status,
    chunks that overrun the window (the agent ignoring credit), grants beyond the window."""
    model = _started_control_plane([False] * requests, [], handshake=True)
    for rid, kind, size in frames:
        if kind == "chunk":
            frame = AgentFrame(request_id=rid, chunk=tunnel_pb2.ResponseChunk(
                read=files_pb2.ReadResponse(data=_padded(max(0, size - 8)))))
        elif kind == "end":
            frame = AgentFrame(request_id=rid, end=tunnel_pb2.ResponseEnd(code=size % 20))
        else:
            frame = AgentFrame(request_id=rid, window_update=tunnel_pb2.WindowUpdate(bytes=size))
        model.feed(frame)
        if model.closed:
            break


# --- the agent's end ----------------------------------------------------------------------------


def check_agent_books(agent: AgentConnection) -> None:
    assert agent.in_flight == len(agent.open_request_ids()) == len(set(agent.open_request_ids()))
    for request in agent._requests.values():
        assert request.outbound.credit >= 0, "our chunk credit went negative"
        assert request.inbound.available >= 0, "the control plane's data credit went negative"
        assert request.inbound.pending_grant >= 0


@dataclass
class AgentModel:
    agent: AgentConnection = field(default_factory=lambda: AgentConnection(request_window_bytes=WINDOW))
    started: set[int] = field(default_factory=set)
    ended: set[int] = field(default_factory=set)
    closed: bool = False

    def feed(self, frame: ControlFrame, respond: bool) -> None:
        if self.closed:
            return
        open_before = set(self.agent.open_request_ids())
        try:
            events = self.agent.receive(frame)
        except RemoteProtocolError:
            self.closed = True
            check_agent_books(self.agent)
            return
        assert isinstance(events, list)
        for event in events:
            assert isinstance(event, EVENT_TYPES), event
            if isinstance(event, RequestStarted):
                assert event.request_id not in self.started, "a duplicate request id started a second request"
                assert event.request_id > 0
                self.started.add(event.request_id)
            elif isinstance(event, DataReceived | CancelReceived | CreditGranted):
                assert event.request_id in open_before and event.request_id not in self.ended
                if isinstance(event, DataReceived):
                    self.agent.consumed(event.request_id, len(event.data))
        check_agent_books(self.agent)
        if respond:
            self.respond()

    def respond(self) -> None:
        """What the agent's handlers do: send chunks within credit, then end the request."""
        for rid in self.agent.open_request_ids():
            credit = self.agent.credit(rid)
            assert credit is not None
            if credit >= 64:
                self.agent.send_chunk(rid, tunnel_pb2.ResponseChunk(
                    read=files_pb2.ReadResponse(data=_padded(min(credit, self.agent.max_chunk_bytes) - 8))))
            else:
                self.agent.end(rid, Code.OK)
                self.ended.add(rid)
        check_agent_books(self.agent)


def _welcomed_agent(welcome: bool) -> AgentModel:
    model = AgentModel()
    if welcome:
        cp = ControlPlaneConnection(SMALL)
        cp.receive(model.agent.hello_frame(tunnel_pb2.Hello()))
        assert isinstance(model.agent.receive(cp.welcome_frame(agent_id="a", group="g", session_id="s"))[0], Welcomed)
    return model


@FUZZ
@given(
    welcome=st.booleans(),
    frames=st.lists(st.tuples(st.one_of(control_frames(), garbled_control_frames()), st.booleans()), max_size=40),
)
def test_agent_answers_any_control_frames_with_events_or_a_remote_protocol_error(
    welcome: bool, frames: list[tuple[ControlFrame | None, bool]],
) -> None:
    model = _welcomed_agent(welcome)
    for frame, respond in frames:
        if frame is not None:
            model.feed(frame, respond and model.agent.welcome is not None)


@FUZZ
@given(
    frames=st.lists(
        st.tuples(st.integers(1, 5), st.sampled_from(["start", "data", "data_end", "cancel", "window_update"]),
                  sizes, st.booleans()),
        max_size=60),
)
def test_agent_refuses_duplicate_ids_data_overruns_and_frames_after_the_end(
    frames: list[tuple[int, str, int, bool]],
) -> None:
    model = _welcomed_agent(True)
    for rid, kind, size, respond in frames:
        if kind == "start":
            frame = ControlFrame(request_id=rid, start=tunnel_pb2.RequestStart(has_body=size % 2 == 0))
        elif kind in ("data", "data_end"):
            frame = ControlFrame(request_id=rid, data=tunnel_pb2.RequestData(
                data=_padded(size), end_of_data=kind == "data_end"))
        elif kind == "cancel":
            frame = ControlFrame(request_id=rid, cancel=tunnel_pb2.Cancel(reason="fuzz"))
        else:
            frame = ControlFrame(request_id=rid, window_update=tunnel_pb2.WindowUpdate(bytes=size))
        model.feed(frame, respond)
        if model.closed:
            break
