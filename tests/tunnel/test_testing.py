"""Both real sessions of one stream, joined in memory (tunnel.testing): cancel, deadlines, drains, flow control.

No sockets and no processes: each test runs in milliseconds, and the same
behaviours are proven with real processes in tests/e2e/test_tunnel.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from onprem.agent.dispatcher import Dispatcher
from onprem.agent.handlers.base import RequestContext
from onprem.tunnel.errors import Cancelled, DeadlineExceeded, NotFound, Unavailable
from onprem.tunnel.protocol import Limits
from onprem.tunnel.testing import TunnelFor
from onprem.v1 import files_pb2, profiles_pb2, tunnel_pb2

CHUNK = 200 * 1024


class FakeFolder:
    """A handler whose requests are scripted by the path they name."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.chunks_made: dict[str, int] = {}
        self.release = asyncio.Event()
        #: Set once a "wait" request runs.
        self.waiting = asyncio.Event()

    def profiles(self) -> list[profiles_pb2.Profile]:
        return [profiles_pb2.Profile(kind=profiles_pb2.PROFILE_KIND_FOLDER, name="f")]

    async def handle(self, op: files_pb2.FileOp, context: RequestContext,
                     ) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        path = op.read.path
        self.started.append(path)
        try:
            if path == "missing":
                raise NotFound("no such file 'missing'", reason="FILE_NOT_FOUND")
            if path == "wait":
                self.waiting.set()
                await self.release.wait()
            count = 3 if path in ("small", "wait") else 64
            for i in range(count):
                self.chunks_made[path] = i + 1
                yield tunnel_pb2.ResponseChunk(read=files_pb2.ReadResponse(data=b"x" * (CHUNK if count == 64 else 10)))
        except asyncio.CancelledError:
            self.cancelled.append(path)
            raise

    async def check(self, profile: str) -> list[profiles_pb2.ProfileCheck]:
        return []

    async def aclose(self) -> None:
        pass


def read(path: str, timeout: float | None = None) -> tunnel_pb2.RequestStart:
    start = tunnel_pb2.RequestStart(file_op=files_pb2.FileOp(read=files_pb2.ReadRequest(profile="f", path=path)))
    if timeout is not None:
        start.timeout.FromTimedelta(timedelta(seconds=timeout))
    return start


@pytest.fixture
def folder() -> FakeFolder:
    return FakeFolder()


async def test_a_request_crosses_the_stream_and_its_chunks_come_back(folder: FakeFolder) -> None:
    async with TunnelFor(Dispatcher({"file_op": folder})) as tunnel:
        chunks = [chunk async for chunk in tunnel.control_plane.start(read("small"))]
    assert [len(c.read.data) for c in chunks] == [10, 10, 10]


async def test_an_agents_error_reaches_the_caller_with_its_code_and_reason(folder: FakeFolder) -> None:
    async with TunnelFor(Dispatcher({"file_op": folder})) as tunnel:
        with pytest.raises(NotFound, match="no such file 'missing'") as caught:
            [chunk async for chunk in tunnel.control_plane.start(read("missing"))]
    assert caught.value.reason == "FILE_NOT_FOUND"


async def test_a_cancel_stops_the_work_on_the_agent(folder: FakeFolder) -> None:
    async with TunnelFor(Dispatcher({"file_op": folder})) as tunnel:
        exchange = tunnel.control_plane.start(read("wait"))
        await folder.waiting.wait()
        await exchange.aclose("the caller went away")
        with pytest.raises(Cancelled, match="cancelled by the caller"):
            [chunk async for chunk in exchange]
    assert folder.cancelled == ["wait"]


async def test_a_deadline_stops_the_work_on_the_agent(folder: FakeFolder) -> None:
    async with TunnelFor(Dispatcher({"file_op": folder})) as tunnel:
        with pytest.raises(DeadlineExceeded, match="the request's deadline passed on the agent"):
            [chunk async for chunk in tunnel.control_plane.start(read("wait", timeout=0.05))]
    assert folder.cancelled == ["wait"]


async def test_a_draining_agent_finishes_what_it_runs_and_refuses_new_work(folder: FakeFolder) -> None:
    async with TunnelFor(Dispatcher({"file_op": folder})) as tunnel:
        running = tunnel.control_plane.start(read("wait"))
        await folder.waiting.wait()
        tunnel.control_plane.drain("maintenance", timedelta(seconds=5))
        # The stream is ordered: the agent takes the drain before the next request's start.
        with pytest.raises(Unavailable, match="the agent is draining") as caught:
            [chunk async for chunk in tunnel.control_plane.start(read("small"))]
        assert caught.value.reason == "AGENT_DRAINING"
        folder.release.set()
        assert len([chunk async for chunk in running]) == 3


async def test_a_reader_that_does_not_read_holds_the_agent_to_one_window(folder: FakeFolder) -> None:
    window = 1024 * 1024
    limits = Limits(response_window_bytes=window, request_window_bytes=window, max_chunk_bytes=256 * 1024)
    async with TunnelFor(Dispatcher({"file_op": folder}), limits=limits) as tunnel:
        stalled = tunnel.control_plane.start(read("big"))
        await anext(stalled)  # then no more: the caller stops reading
        # A small request on the same stream is not held up by the stalled one.
        assert len([chunk async for chunk in tunnel.control_plane.start(read("small"))]) == 3
        # The agent made at most a window of chunks (plus the one waiting for credit), not all 64.
        assert folder.chunks_made["big"] <= window // CHUNK + 2
        # Reading on gives credit back, and the rest arrives.
        assert len([chunk async for chunk in stalled]) == 63


async def test_an_agent_that_goes_silent_is_lost_and_its_requests_fail_unavailable(folder: FakeFolder) -> None:
    limits = Limits(heartbeat_interval=timedelta(seconds=0.05))
    async with TunnelFor(Dispatcher({"file_op": folder}), limits=limits) as tunnel:
        exchange = tunnel.control_plane.start(read("wait"))
        tunnel.to_control_plane.reading.clear()  # the control plane hears nothing more
        with pytest.raises(Unavailable, match="was silent for 0 s \\(heartbeats missed\\)") as caught:
            [chunk async for chunk in exchange]
        assert caught.value.reason == "AGENT_LOST"
        await asyncio.wait_for(tunnel.control_plane_ended, 1)


async def test_an_agent_drained_to_exit_half_closes_and_writes_nothing_after(folder: FakeFolder) -> None:
    from onprem.tunnel.errors import DrainedToExit

    # Heartbeats every 50 ms: an agent that pinged after its half-close would fail inside grpc.
    limits = Limits(heartbeat_interval=timedelta(seconds=0.05))
    async with TunnelFor(Dispatcher({"file_op": folder}), limits=limits) as tunnel:
        tunnel.to_control_plane.reading.clear()  # the control plane is slow to see the half-close
        tunnel.control_plane.drain("maintenance", timedelta(seconds=1), exit_after=True)
        with pytest.raises(DrainedToExit, match="drained at the control plane's request \\(maintenance\\)"):
            await asyncio.wait_for(tunnel.agent_ended, 10)
        assert tunnel.to_control_plane.half_closed
