"""The tunnel protocol as a pure state machine: both ends, no network (h11-style)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from onprem.tunnel.errors import Code, LocalProtocolError, RemoteProtocolError
from onprem.tunnel.protocol import (
    IDEMPOTENCY,
    SUPPORTED_REVISIONS,
    AgentConnection,
    AgentFrame,
    CancelReceived,
    ChunkReceived,
    ControlFrame,
    ControlPlaneConnection,
    CreditGranted,
    DataReceived,
    FrameIgnored,
    HelloReceived,
    Limits,
    PingReceived,
    RequestEnded,
    RequestStarted,
    Welcomed,
)
from onprem.v1 import database_pb2, files_pb2, tunnel_pb2, values_pb2

SMALL = Limits(response_window_bytes=4096, request_window_bytes=4096, max_chunk_bytes=1024)


@dataclass
class TunnelPair:
    """Both ends of one stream, with frames carried between them by hand."""

    cp: ControlPlaneConnection = field(default_factory=lambda: ControlPlaneConnection(SMALL))
    agent: AgentConnection = field(default_factory=lambda: AgentConnection(request_window_bytes=4096))

    def handshake(self) -> None:
        events = self.cp.receive(self.agent.hello_frame(tunnel_pb2.Hello(agent_version="t", max_in_flight=4)))
        assert isinstance(events[0], HelloReceived)
        events = self.agent.receive(self.cp.welcome_frame(agent_id="agent-1", group="g", session_id="s"))
        assert isinstance(events[0], Welcomed)

    def to_agent(self, frame: ControlFrame | None) -> list[object]:
        assert frame is not None
        return list(self.agent.receive(frame))

    def to_cp(self, frame: AgentFrame | None) -> list[object]:
        assert frame is not None
        return list(self.cp.receive(frame))

    def start(self, has_body: bool = False, *, query: bool = False) -> int:
        # A file read, whose answer is `read` chunks (what chunk_of makes), or a query.
        start = tunnel_pb2.RequestStart(
            file_op=files_pb2.FileOp(read=files_pb2.ReadRequest(profile="p", path="f")), has_body=has_body,
        )
        if query:
            start.database_query.query.CopyFrom(database_pb2.QueryRequest(profile="p", sql="select 1"))
        rid, frame = self.cp.start_request(start)
        events = self.to_agent(frame)
        assert events == [RequestStarted(rid, start)]
        return rid


def chunk_of(size: int) -> tunnel_pb2.ResponseChunk:
    """A chunk whose serialized size is exactly `size` bytes (size >= 5)."""
    for pad in range(size, 0, -1):
        chunk = tunnel_pb2.ResponseChunk(read=files_pb2.ReadResponse(data=b"x" * pad))
        if chunk.ByteSize() == size:
            return chunk
    raise AssertionError(size)


@pytest.fixture
def pair() -> TunnelPair:
    p = TunnelPair()
    p.handshake()
    return p


def test_the_first_agent_frame_must_be_hello() -> None:
    cp = ControlPlaneConnection(SMALL)
    with pytest.raises(RemoteProtocolError, match="first frame must be hello"):
        cp.receive(AgentFrame(ping=tunnel_pb2.Ping(nonce=1)))


def test_hello_without_a_common_revision_is_refused() -> None:
    cp = ControlPlaneConnection(SMALL)
    with pytest.raises(RemoteProtocolError, match="no common protocol revision"):
        cp.receive(AgentFrame(hello=tunnel_pb2.Hello(protocol_revisions=[99], request_window_bytes=4096)))


def test_the_welcome_names_the_highest_revision_both_sides_speak() -> None:
    # An agent a release ahead offers its new revision beside the ones this control plane speaks.
    cp = ControlPlaneConnection(SMALL)
    cp.receive(AgentFrame(hello=tunnel_pb2.Hello(protocol_revisions=[99, *SUPPORTED_REVISIONS],
                                                 request_window_bytes=4096)))
    welcome = cp.welcome_frame(agent_id="a", group="g", session_id="s").welcome
    assert (welcome.protocol_revision, cp.protocol_revision) == (max(SUPPORTED_REVISIONS), max(SUPPORTED_REVISIONS))


def test_the_first_control_frame_must_be_welcome() -> None:
    agent = AgentConnection()
    with pytest.raises(RemoteProtocolError, match="first frame must be welcome"):
        agent.receive(ControlFrame(request_id=1, start=tunnel_pb2.RequestStart()))


def test_welcome_carries_the_negotiated_limits(pair: TunnelPair) -> None:
    assert pair.agent.welcome is not None
    assert pair.agent.welcome.response_window_bytes == 4096
    assert pair.agent.max_chunk_bytes == 1024
    assert pair.agent.welcome.heartbeat_interval.ToTimedelta() == SMALL.heartbeat_interval


def test_a_request_flows_start_chunks_end(pair: TunnelPair) -> None:
    rid = pair.start(query=True)
    batch = tunnel_pb2.ResponseChunk(
        query=database_pb2.QueryResponse(rows=values_pb2.RowBatch(row_count=1))
    )
    events = pair.to_cp(pair.agent.send_chunk(rid, batch))
    assert events == [ChunkReceived(rid, batch, batch.ByteSize())]
    assert pair.cp.in_flight == 1 and pair.agent.in_flight == 1
    events = pair.to_cp(pair.agent.end(rid, Code.OK))
    assert events == [RequestEnded(rid, Code.OK, "", "")]
    assert pair.cp.in_flight == 0 and pair.agent.in_flight == 0


def test_many_requests_interleave_on_one_stream(pair: TunnelPair) -> None:
    rids = [pair.start() for _ in range(5)]
    assert rids == [1, 2, 3, 4, 5]
    for rid in reversed(rids):
        (event,) = pair.to_cp(pair.agent.send_chunk(rid, chunk_of(100)))
        assert isinstance(event, ChunkReceived) and event.request_id == rid
    for rid in rids:
        pair.to_cp(pair.agent.end(rid, Code.NOT_FOUND, "nope", "PROFILE_NOT_FOUND"))
    assert pair.cp.in_flight == 0


def test_the_agent_cannot_send_past_its_credit(pair: TunnelPair) -> None:
    rid = pair.start()
    for _ in range(4):
        pair.to_cp(pair.agent.send_chunk(rid, chunk_of(1024)))
    assert pair.agent.credit(rid) == 0
    with pytest.raises(LocalProtocolError, match="credit"):
        pair.agent.send_chunk(rid, chunk_of(10))


def test_consuming_half_a_window_grants_it_back(pair: TunnelPair) -> None:
    rid = pair.start()
    for _ in range(4):
        pair.to_cp(pair.agent.send_chunk(rid, chunk_of(1024)))
    assert pair.cp.consumed(rid, 1024) is None  # a quarter window: not worth a frame yet
    update = pair.cp.consumed(rid, 1024)
    assert update is not None and update.window_update.bytes == 2048
    assert pair.to_agent(update) == [CreditGranted(rid, 2048)]
    assert pair.agent.credit(rid) == 2048


def test_a_peer_that_overruns_its_credit_breaks_the_stream(pair: TunnelPair) -> None:
    rid = pair.start()
    for _ in range(4):
        pair.to_cp(pair.agent.send_chunk(rid, chunk_of(1024)))
    forged = AgentFrame(request_id=rid, chunk=chunk_of(200))  # bypasses the agent's own check
    with pytest.raises(RemoteProtocolError, match="window overrun"):
        pair.cp.receive(forged)


def test_an_oversized_chunk_breaks_the_stream(pair: TunnelPair) -> None:
    rid = pair.start()
    with pytest.raises(LocalProtocolError, match="exceeds the limit"):
        pair.agent.send_chunk(rid, chunk_of(2000))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        pair.cp.receive(AgentFrame(request_id=rid, chunk=chunk_of(2000)))


def test_frames_for_a_request_never_started_break_the_stream(pair: TunnelPair) -> None:
    with pytest.raises(RemoteProtocolError, match="never started"):
        pair.cp.receive(AgentFrame(request_id=7, chunk=chunk_of(10)))
    with pytest.raises(RemoteProtocolError, match="never started"):
        pair.agent.receive(ControlFrame(request_id=7, cancel=tunnel_pb2.Cancel()))


def test_a_frame_after_the_agents_own_end_breaks_the_stream(pair: TunnelPair) -> None:
    rid = pair.start()
    pair.to_cp(pair.agent.end(rid, Code.OK))
    with pytest.raises(RemoteProtocolError, match=f"chunk frame for request {rid} after the agent ended it"):
        pair.cp.receive(AgentFrame(request_id=rid, chunk=chunk_of(10)))


def test_a_second_end_for_a_request_breaks_the_stream(pair: TunnelPair) -> None:
    rid = pair.start()
    pair.to_cp(pair.agent.end(rid, Code.OK))
    with pytest.raises(RemoteProtocolError, match=f"end frame for request {rid} after the agent ended it"):
        pair.cp.receive(AgentFrame(request_id=rid, end=tunnel_pb2.ResponseEnd()))


def test_control_plane_frames_racing_the_agents_end_are_ignored(pair: TunnelPair) -> None:
    rid = pair.start()
    pair.agent.end(rid, Code.OK)  # not yet seen by the control plane, which may still cancel
    assert pair.to_agent(pair.cp.cancel(rid, "caller went away")) == [
        FrameIgnored(rid, "cancel after the request ended")
    ]


def test_ending_a_request_twice_is_a_local_error(pair: TunnelPair) -> None:
    rid = pair.start()
    pair.agent.end(rid, Code.OK)
    with pytest.raises(LocalProtocolError):
        pair.agent.end(rid, Code.OK)


def test_request_ids_must_increase(pair: TunnelPair) -> None:
    pair.start()
    pair.start()
    with pytest.raises(RemoteProtocolError, match="not above the last one"):
        pair.agent.receive(ControlFrame(request_id=1, start=tunnel_pb2.RequestStart()))


def test_cancel_reaches_the_agent_and_late_chunks_are_dropped(pair: TunnelPair) -> None:
    rid = pair.start()
    assert pair.to_agent(pair.cp.cancel(rid, "caller went away")) == [CancelReceived(rid, "caller went away")]
    assert pair.cp.cancel(rid, "again") is None
    assert pair.to_cp(pair.agent.send_chunk(rid, chunk_of(50))) == [FrameIgnored(rid, "chunk after cancel")]
    (ended,) = pair.to_cp(pair.agent.end(rid, Code.CANCELLED, "cancelled"))
    assert isinstance(ended, RequestEnded) and ended.code == Code.CANCELLED
    assert pair.cp.in_flight == 0


def test_request_data_is_flow_controlled_by_the_agent(pair: TunnelPair) -> None:
    rid = pair.start(has_body=True)
    for _ in range(4):
        (event,) = pair.to_agent(pair.cp.send_data(rid, b"d" * 1024, end_of_data=False))
        assert isinstance(event, DataReceived)
    assert pair.cp.credit(rid) == 0
    with pytest.raises(LocalProtocolError, match="credit"):
        pair.cp.send_data(rid, b"d", end_of_data=True)
    update = pair.agent.consumed(rid, 2048)
    assert pair.to_cp(update) == [CreditGranted(rid, 2048)]
    (last,) = pair.to_agent(pair.cp.send_data(rid, b"", end_of_data=True))
    assert last == DataReceived(rid, b"", True)


def test_data_for_a_request_without_body_breaks_the_stream(pair: TunnelPair) -> None:
    rid = pair.start(has_body=False)
    with pytest.raises(RemoteProtocolError, match="takes no"):
        pair.agent.receive(ControlFrame(request_id=rid, data=tunnel_pb2.RequestData(data=b"x")))


def test_data_credit_is_none_once_the_request_ended(pair: TunnelPair) -> None:
    rid = pair.start(has_body=True)
    pair.to_cp(pair.agent.end(rid, Code.ALREADY_EXISTS, "exists"))
    assert pair.cp.credit(rid) is None


def test_pings_are_session_level(pair: TunnelPair) -> None:
    assert pair.cp.receive(pair.agent.ping(42)) == [PingReceived(42)]
    assert pair.agent.receive(pair.cp.ping(7)) == [PingReceived(7)]


def test_limits_refuse_a_chunk_larger_than_half_a_window() -> None:
    with pytest.raises(ValueError, match="at most half"):
        Limits(response_window_bytes=1000, request_window_bytes=4096, max_chunk_bytes=600)


@pytest.mark.parametrize("seed", range(20))
def test_credit_never_deadlocks_with_chunks_up_to_half_a_window(seed: int) -> None:
    """Whatever the chunk sizes and however the consumer lags, the sender always gets to go on."""
    rng = random.Random(seed)
    pair = TunnelPair()
    pair.handshake()
    rid = pair.start()
    buffered: list[int] = []
    sent = 0
    for _ in range(500):
        chunk = tunnel_pb2.ResponseChunk(read=files_pb2.ReadResponse(data=b"x" * rng.randint(0, 1016)))
        size = chunk.ByteSize()
        while (pair.agent.credit(rid) or 0) < size:
            assert buffered, "sender starved with nothing left to consume: deadlock"
            update = pair.cp.consumed(rid, buffered.pop(0))
            if update is not None:
                pair.to_agent(update)
        (event,) = pair.to_cp(pair.agent.send_chunk(rid, chunk))
        assert isinstance(event, ChunkReceived)
        buffered.append(event.size)
        sent += size
        assert sum(buffered) <= 4096  # never more than one window held at the receiver
        if rng.random() < 0.3 and buffered:
            update = pair.cp.consumed(rid, buffered.pop(0))
            if update is not None:
                pair.to_agent(update)
    assert sent > 4096 * 10


def test_request_data_larger_than_a_chunk_breaks_the_stream(pair: TunnelPair) -> None:
    rid = pair.start(has_body=True)
    with pytest.raises(RemoteProtocolError, match="exceeds the chunk limit"):
        pair.agent.receive(ControlFrame(request_id=rid, data=tunnel_pb2.RequestData(data=b"d" * 1025)))


def test_frame_batches_are_agreed_in_the_handshake(pair: TunnelPair) -> None:
    assert pair.cp.batching and pair.agent.batching
    assert list(pair.agent.welcome.capabilities) == ["frame-batch", "idempotency"]  # type: ignore[union-attr]


def test_an_agent_that_offers_no_idempotency_is_not_welcomed_with_it() -> None:
    cp, agent = ControlPlaneConnection(), AgentConnection()
    hello = agent.hello_frame(tunnel_pb2.Hello(max_in_flight=4))
    hello.hello.capabilities.remove(IDEMPOTENCY)
    cp.receive(hello)
    welcome = cp.welcome_frame(agent_id="a", group="g", session_id="s")
    assert IDEMPOTENCY not in welcome.welcome.capabilities


def test_a_batch_delivers_its_frames_in_order_as_if_sent_one_by_one(pair: TunnelPair) -> None:
    rid = pair.start()
    chunk = chunk_of(100)
    batch = AgentConnection.batch([pair.agent.send_chunk(rid, chunk), pair.agent.ping(5), pair.agent.end(rid, Code.OK)])
    assert pair.cp.receive(batch) == [ChunkReceived(rid, chunk, 100), PingReceived(5), RequestEnded(rid, Code.OK, "", "")]
    assert pair.cp.in_flight == 0


def test_batches_do_not_nest(pair: TunnelPair) -> None:
    inner = AgentConnection.batch([pair.agent.ping(1)])
    with pytest.raises(RemoteProtocolError, match="inside a batch"):
        pair.cp.receive(AgentConnection.batch([inner]))


def test_a_batch_without_the_capability_breaks_the_stream() -> None:
    cp = ControlPlaneConnection(SMALL)
    hello = tunnel_pb2.Hello(protocol_revisions=[1], request_window_bytes=4096)  # an agent without batches
    cp.receive(AgentFrame(hello=hello))
    assert not cp.batching
    assert list(cp.welcome_frame(agent_id="a", group="g", session_id="s").welcome.capabilities) == []
    with pytest.raises(RemoteProtocolError, match="not agreed"):
        cp.receive(AgentConnection.batch([AgentConnection.ping(1)]))


# --- one state machine, errors that stick ----------------------------------------


def test_both_ends_are_the_same_state_machine_in_their_roles(pair: TunnelPair) -> None:
    from onprem.tunnel.protocol import Connection, Role

    assert isinstance(pair.cp, Connection) and isinstance(pair.agent, Connection)
    assert (pair.cp.role, pair.agent.role) == (Role.CONTROL_PLANE, Role.AGENT)
    assert pair.cp.peer == "the agent" and pair.agent.peer == "the control plane"


def test_a_peer_that_broke_the_protocol_stays_broken(pair: TunnelPair) -> None:
    rid = pair.start()
    with pytest.raises(RemoteProtocolError, match="never started"):
        pair.cp.receive(AgentFrame(request_id=99, chunk=chunk_of(10)))
    # Even a frame that would have been fine is refused now: nothing after a broken frame is trusted.
    with pytest.raises(RemoteProtocolError, match="the stream is broken: chunk frame for request 99"):
        pair.cp.receive(pair.agent.end(rid, Code.OK))


def test_once_broken_a_connection_refuses_to_send(pair: TunnelPair) -> None:
    rid = pair.start(has_body=True)
    with pytest.raises(RemoteProtocolError):
        pair.cp.receive(AgentFrame(request_id=99, chunk=chunk_of(10)))
    with pytest.raises(LocalProtocolError, match="the stream is broken"):
        pair.cp.send_data(rid, b"x", end_of_data=True)
    assert pair.cp.cancel(rid, "gone") is None


def test_our_own_mistake_sticks_too(pair: TunnelPair) -> None:
    rid, other = pair.start(), pair.start()
    pair.agent.end(rid, Code.OK)
    with pytest.raises(LocalProtocolError, match=f"end for request {rid}, which is not open"):
        pair.agent.end(rid, Code.OK)
    with pytest.raises(LocalProtocolError, match="the stream is broken"):
        pair.agent.send_chunk(other, chunk_of(10))


def test_no_data_may_follow_a_cancel(pair: TunnelPair) -> None:
    rid = pair.start(has_body=True)
    pair.to_agent(pair.cp.cancel(rid, "caller went away"))
    assert pair.cp.credit(rid) is None  # so a sender waiting for credit stops
    with pytest.raises(LocalProtocolError, match=f"request {rid} takes no \\(more\\) data: it has cancelled"):
        pair.cp.send_data(rid, b"late", end_of_data=True)


def test_data_after_a_cancel_breaks_the_agents_side(pair: TunnelPair) -> None:
    rid = pair.start(has_body=True)
    pair.to_agent(pair.cp.cancel(rid, "caller went away"))
    with pytest.raises(RemoteProtocolError, match="takes no \\(more\\) data"):
        pair.agent.receive(ControlFrame(request_id=rid, data=tunnel_pb2.RequestData(data=b"x")))


def test_a_second_cancel_for_a_request_breaks_the_stream(pair: TunnelPair) -> None:
    rid = pair.start()
    pair.to_agent(pair.cp.cancel(rid, "once"))
    with pytest.raises(RemoteProtocolError, match=f"cancel for request {rid}, which was already cancelled"):
        pair.agent.receive(ControlFrame(request_id=rid, cancel=tunnel_pb2.Cancel(reason="twice")))


def test_a_hello_after_the_hello_breaks_the_stream_even_before_the_welcome() -> None:
    cp = ControlPlaneConnection(SMALL)
    agent = AgentConnection(request_window_bytes=4096)
    cp.receive(agent.hello_frame(tunnel_pb2.Hello()))
    with pytest.raises(RemoteProtocolError, match="hello sent twice"):
        cp.receive(agent.hello_frame(tunnel_pb2.Hello()))


def test_a_chunk_of_another_kind_than_the_request_expects_breaks_the_stream(pair: TunnelPair) -> None:
    start = tunnel_pb2.RequestStart(
        database_query=database_pb2.DatabaseQuery(query=database_pb2.QueryRequest(profile="p", sql="select 1")))
    rid, frame = pair.cp.start_request(start)
    pair.to_agent(frame)
    with pytest.raises(RemoteProtocolError, match=f"chunk for request {rid} carries read; the request's answer is query"):
        pair.cp.receive(pair.agent.send_chunk(rid, chunk_of(50)))


def test_an_agent_cuts_a_message_that_quotes_a_huge_input(pair: TunnelPair) -> None:
    rid = pair.start()
    frame = pair.agent.end(rid, Code.INVALID_ARGUMENT, "decimal value '" + "9" * 3_000_000 + "' is not valid")
    assert frame.ByteSize() < 4096
    assert frame.end.message.endswith("…")
