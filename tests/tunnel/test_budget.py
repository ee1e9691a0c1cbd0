"""What a peer may make us do: budgets, limits of what it says, and screened statuses (no network)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from onprem.control_plane.sessions import AgentSession
from onprem.tunnel.aio import FrameWriter, StreamClosed
from onprem.tunnel.budget import BudgetExceeded, Budgets, PeerMeter, TokenBucket
from onprem.tunnel.errors import Code, RemoteProtocolError, Unavailable
from onprem.tunnel.protocol import (
    MAX_END_MESSAGE,
    MAX_IN_FLIGHT,
    MAX_PROFILES,
    AgentConnection,
    AgentFrame,
    ControlFrame,
    ControlPlaneConnection,
    Limits,
    RequestEnded,
    RequestStarted,
)
from onprem.v1 import profiles_pb2, tunnel_pb2

SMALL = Limits(response_window_bytes=4096, request_window_bytes=4096, max_chunk_bytes=1024)


def hello(**fields: object) -> AgentFrame:
    return AgentConnection(request_window_bytes=4096).hello_frame(tunnel_pb2.Hello(**fields))  # type: ignore[arg-type]


def db_profile(name: str) -> profiles_pb2.Profile:
    return profiles_pb2.Profile(name=name, kind=profiles_pb2.PROFILE_KIND_DATABASE)


def connected() -> tuple[ControlPlaneConnection, AgentConnection]:
    cp, agent = ControlPlaneConnection(SMALL), AgentConnection(request_window_bytes=4096)
    cp.receive(agent.hello_frame(tunnel_pb2.Hello(max_in_flight=4)))
    agent.receive(cp.welcome_frame(agent_id="a", group="g", session_id="s"))
    return cp, agent


def started(cp: ControlPlaneConnection, agent: AgentConnection, *, has_body: bool = False) -> int:
    rid, frame = cp.start_request(tunnel_pb2.RequestStart(has_body=has_body))
    assert isinstance(agent.receive(frame)[0], RequestStarted)
    return rid


def end_frame(rid: int, code: int, reason: str = "", message: str = "m") -> AgentFrame:
    return AgentFrame(request_id=rid, end=tunnel_pb2.ResponseEnd(code=code, message=message, reason=reason))


# --- the meter ---------------------------------------------------------------


def test_a_batch_above_the_frame_limit_exceeds_the_frames_per_message_budget() -> None:
    meter = PeerMeter(Budgets(max_frames_per_message=1024), "agent x")
    meter.message(1024)
    with pytest.raises(BudgetExceeded, match="agent x sent a batch of 1025 frames; the limit is 1024") as caught:
        meter.message(1025)
    assert caught.value.budget == "frames per message"


def test_control_frames_beyond_the_burst_exceed_the_rate_budget() -> None:
    meter = PeerMeter(Budgets(control_frames_per_second=10, control_frame_burst=5), "agent x")
    for _ in range(5):
        meter.control("ping", 100.0)
    with pytest.raises(BudgetExceeded, match=r"agent x sent stream-level frames \(ping\) faster than 10 a second"):
        meter.control("ping", 100.0)


def test_the_rate_budget_refills_with_time() -> None:
    meter = PeerMeter(Budgets(control_frames_per_second=10, control_frame_burst=5))
    for second in range(100):
        for tick in range(10):
            meter.control("pong", second + tick / 10)  # ten a second for 100 s: within budget


def test_status_frames_have_a_budget_of_their_own() -> None:
    meter = PeerMeter(Budgets(status_frames_per_second=1, status_frame_burst=3))
    for _ in range(3):
        meter.control("status", 5.0)
    with pytest.raises(BudgetExceeded, match="status frames faster than 1 a second") as caught:
        meter.control("status", 5.0)
    assert caught.value.budget == "status frames per second"
    meter.control("ping", 5.0)  # other control frames still have budget


def test_a_budget_error_is_a_remote_protocol_error() -> None:
    assert issubclass(BudgetExceeded, RemoteProtocolError)


def test_a_token_bucket_never_holds_more_than_its_burst() -> None:
    bucket = TokenBucket(rate=100, burst=2)
    assert bucket.take(0.0)
    assert bucket.take(1000.0) and bucket.take(1000.0)
    assert not bucket.take(1000.0)


@pytest.mark.parametrize("budgets", [
    dict(max_frames_per_message=0), dict(control_frames_per_second=0), dict(status_frame_burst=0),
    dict(write_stall_intervals=0),
])
def test_nonsensical_budgets_are_refused(budgets: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Budgets(**budgets)  # type: ignore[arg-type]


# --- what an agent may say in Hello and status -------------------------------


def test_a_hello_with_too_many_profiles_breaks_the_stream() -> None:
    frame = hello(profiles=[db_profile(f"p{i}") for i in range(MAX_PROFILES + 1)])
    with pytest.raises(RemoteProtocolError, match=f"hello offers {MAX_PROFILES + 1} profiles; the limit is 1024"):
        ControlPlaneConnection(SMALL).receive(frame)


def test_a_hello_with_an_overlong_profile_name_breaks_the_stream() -> None:
    with pytest.raises(RemoteProtocolError, match="names have 1 to 255 characters"):
        ControlPlaneConnection(SMALL).receive(hello(profiles=[db_profile("p" * 256)]))


def test_a_hello_asking_for_more_requests_than_any_agent_may_run_breaks_the_stream() -> None:
    with pytest.raises(RemoteProtocolError, match=f"asks to run {MAX_IN_FLIGHT + 1} requests at once"):
        ControlPlaneConnection(SMALL).receive(hello(max_in_flight=MAX_IN_FLIGHT + 1))


def test_a_status_with_too_many_profiles_breaks_the_stream() -> None:
    cp, _ = connected()
    status = tunnel_pb2.AgentStatus(profiles_changed=True,
                                    profiles=[db_profile(f"p{i}") for i in range(MAX_PROFILES + 1)])
    with pytest.raises(RemoteProtocolError, match="status offers 1025 profiles"):
        cp.receive(AgentFrame(status=status))


# --- credit games ------------------------------------------------------------


def test_a_window_update_beyond_the_window_breaks_the_stream() -> None:
    cp, agent = connected()
    rid = started(cp, agent)
    with pytest.raises(RemoteProtocolError, match="would give 4097 bytes of credit; the window is 4096"):
        agent.receive(ControlFrame(request_id=rid, window_update=tunnel_pb2.WindowUpdate(bytes=1)))


def test_an_empty_window_update_breaks_the_stream() -> None:
    cp, agent = connected()
    rid = started(cp, agent, has_body=True)
    with pytest.raises(RemoteProtocolError, match="window update of 0 bytes"):
        cp.receive(AgentFrame(request_id=rid, window_update=tunnel_pb2.WindowUpdate(bytes=0)))


def test_an_agent_granting_more_request_credit_than_it_has_window_breaks_the_stream() -> None:
    cp, agent = connected()
    rid = started(cp, agent, has_body=True)
    with pytest.raises(RemoteProtocolError, match="the window is 4096"):
        cp.receive(AgentFrame(request_id=rid, window_update=tunnel_pb2.WindowUpdate(bytes=2**31)))


# --- screened statuses ---------------------------------------------------------


@pytest.mark.parametrize(("code", "why"), [
    (Code.UNAUTHENTICATED, "status UNAUTHENTICATED, which agents may not give"),
    (Code.UNKNOWN, "status UNKNOWN, which agents may not give"),
    (Code.OUT_OF_RANGE, "status OUT_OF_RANGE, which agents may not give"),
    (Code.DATA_LOSS, "status DATA_LOSS, which agents may not give"),
    (99, "status code 99, which gRPC does not define"),
    (-1, "status code -1, which gRPC does not define"),
])
def test_a_status_code_agents_may_not_give_reaches_the_operator_as_internal(code: int, why: str) -> None:
    cp, agent = connected()
    rid = started(cp, agent)
    (ended,) = cp.receive(end_frame(rid, code, "BAD_TOKEN", "your token was revoked"))
    assert ended == RequestEnded(
        rid, Code.INTERNAL,
        "the agent answered with a status it may not give; the control plane's log names the agent",
        "AGENT_PROTOCOL_ERROR", "", why,
    )


@pytest.mark.parametrize(("reason", "why"), [
    ("AGENT_LOST", "reason 'AGENT_LOST', which agents may not give"),
    ("AGENT_PROTOCOL_ERROR", "reason 'AGENT_PROTOCOL_ERROR', which agents may not give"),
    ("lower_case", "reason 'lower_case', which agents may not give"),
    ("A" * 65, f"reason {'A' * 65!r}, which agents may not give"),
])
def test_a_reason_agents_may_not_give_reaches_the_operator_as_internal(reason: str, why: str) -> None:
    cp, agent = connected()
    rid = started(cp, agent)
    (ended,) = cp.receive(end_frame(rid, Code.UNAVAILABLE, reason))
    assert isinstance(ended, RequestEnded)
    assert (ended.code, ended.reason, ended.screened) == (Code.INTERNAL, "AGENT_PROTOCOL_ERROR", why)


@pytest.mark.parametrize("code", [Code.OK, Code.CANCELLED, Code.INVALID_ARGUMENT, Code.DEADLINE_EXCEEDED,
                                  Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.PERMISSION_DENIED,
                                  Code.RESOURCE_EXHAUSTED, Code.FAILED_PRECONDITION, Code.ABORTED,
                                  Code.UNIMPLEMENTED, Code.INTERNAL, Code.UNAVAILABLE])
def test_the_codes_agents_may_give_pass_unchanged(code: Code) -> None:
    cp, agent = connected()
    rid = started(cp, agent)
    (ended,) = cp.receive(end_frame(rid, code, "PATH_OUTSIDE_ROOT", "path 'x' leads outside"))
    assert ended == RequestEnded(rid, code, "path 'x' leads outside", "PATH_OUTSIDE_ROOT")


def test_an_agents_overlong_message_is_cut() -> None:
    cp, agent = connected()
    rid = started(cp, agent)
    (ended,) = cp.receive(end_frame(rid, Code.NOT_FOUND, "NOT_FOUND", "x" * 100_000))
    assert isinstance(ended, RequestEnded)
    assert ended.message == "x" * MAX_END_MESSAGE + "…"


# --- the writer ----------------------------------------------------------------


async def test_a_peer_that_leaves_too_many_frames_unread_overflows_the_writer() -> None:
    overflows: list[BudgetExceeded] = []

    async def never(frame: str) -> None:
        await asyncio.Event().wait()

    writer: FrameWriter[str] = FrameWriter(never, max_queued_frames=3, on_overflow=overflows.append)
    task = asyncio.create_task(writer.run())
    for frame in ("a", "b", "c"):
        writer.send_nowait(frame)
    await asyncio.sleep(0)  # "a" is being written, forever
    writer.send_nowait("d")
    with pytest.raises(StreamClosed, match="the peer left 3 frames unread"):
        writer.send_nowait("e")
    assert [o.budget for o in overflows] == ["queued frames"]
    with pytest.raises(StreamClosed):
        writer.send_nowait("f")  # closed for good
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_writer_says_since_when_a_write_waits() -> None:
    release = asyncio.Event()

    async def write(frame: str) -> None:
        await release.wait()

    writer: FrameWriter[str] = FrameWriter(write)
    task = asyncio.create_task(writer.run())
    assert writer.writing_since is None
    writer.send_nowait("a")
    await asyncio.sleep(0)
    assert writer.writing_since is not None
    release.set()
    await writer.flush()
    assert writer.writing_since is None
    writer.close(StreamClosed("done"))
    await task


# --- the control plane's session against a hostile agent, in memory ---------------


class FakeAgentStream:
    """The agent's half of a Connect call: frames it sends are read by the session; the
    session's writes block while `reading` is clear (an agent that does not read)."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.written: list[ControlFrame] = []
        self.reading = asyncio.Event()
        self.reading.set()
        #: Set when the session has taken every frame sent so far.
        self.drained = asyncio.Event()

    async def read(self) -> object:
        frame = await self.inbox.get()
        if self.inbox.empty():
            self.drained.set()
        return frame

    async def write(self, frame: ControlFrame) -> None:
        await self.reading.wait()
        self.written.append(frame)


def session_for(stream: FakeAgentStream, budgets: Budgets, heartbeat: float = 10.0) -> AgentSession:
    conn = ControlPlaneConnection(Limits(heartbeat_interval=timedelta(seconds=heartbeat)))
    conn.receive(AgentConnection().hello_frame(tunnel_pb2.Hello(max_in_flight=4, profiles=[db_profile("db")])))
    conn.welcome_frame(agent_id="a-1", group="g", session_id="s")
    return AgentSession(conn, stream.write, stream.read, agent_id="a-1", name="mallory", group="g",
                        cert_expires_at=None, budgets=budgets)


async def test_a_ping_flood_ends_the_session_and_fails_its_requests_unavailable(
        caplog: pytest.LogCaptureFixture) -> None:
    stream = FakeAgentStream()
    session = session_for(stream, Budgets(control_frames_per_second=10, control_frame_burst=20))
    exchange = session.start(tunnel_pb2.RequestStart())
    for nonce in range(100):
        stream.inbox.put_nowait(AgentFrame(ping=tunnel_pb2.Ping(nonce=nonce)))
    await asyncio.wait_for(session.serve(), 5)
    assert session.budget_error is not None and session.budget_error.budget == "control frames per second"
    with pytest.raises(Unavailable, match="exceeded its budget of control frames per second"):
        await exchange.__anext__()
    assert "agent mallory (a-1) exceeded its budget of control frames per second" in caplog.text


async def test_an_agent_that_never_reads_its_pongs_is_cut_off_when_its_queue_overflows() -> None:
    stream = FakeAgentStream()
    stream.reading.clear()
    session = session_for(stream, Budgets(max_queued_frames=50))
    for nonce in range(60):
        stream.inbox.put_nowait(AgentFrame(ping=tunnel_pb2.Ping(nonce=nonce)))
    await asyncio.wait_for(session.serve(), 5)
    assert session.budget_error is not None and session.budget_error.budget == "queued frames"


async def test_an_agent_that_stops_reading_is_cut_off_after_the_write_stall_budget() -> None:
    stream = FakeAgentStream()
    stream.reading.clear()
    session = session_for(stream, Budgets(write_stall_intervals=2), heartbeat=0.05)

    async def keep_talking() -> None:  # pongs to nothing: the agent is alive, it just does not read
        for nonce in range(10_000):
            stream.inbox.put_nowait(AgentFrame(pong=tunnel_pb2.Pong(nonce=nonce)))
            await asyncio.sleep(0.02)

    talker = asyncio.create_task(keep_talking())
    stream.inbox.put_nowait(AgentFrame(ping=tunnel_pb2.Ping(nonce=1)))  # one pong to write, forever
    await asyncio.wait_for(session.serve(), 5)
    talker.cancel()
    assert session.budget_error is not None and session.budget_error.budget == "write stall"


async def test_profile_updates_keep_only_the_latest_list_for_the_store() -> None:
    stream = FakeAgentStream()
    session = session_for(stream, Budgets())
    serving = asyncio.create_task(session.serve())
    for i in range(10):
        status = tunnel_pb2.AgentStatus(profiles_changed=True, profiles=[db_profile(f"p{i}")])
        stream.inbox.put_nowait(AgentFrame(status=status))
    await asyncio.wait_for(stream.drained.wait(), 5)
    await asyncio.sleep(0)  # the reader handles the last frame before it reads again
    assert session.profiles_updated.is_set()
    assert [p.name for p in session.profile_update or []] == ["p9"]
    session.close("test over")
    with pytest.raises(asyncio.CancelledError):
        await serving
