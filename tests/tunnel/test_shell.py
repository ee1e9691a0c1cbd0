"""The asyncio pieces around the protocol, without a network: writer, backoff, routing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import cast

import pytest

from onprem.agent.tunnel_client import Backoff
from onprem.control_plane.router import GroupFacts, Registry, Router
from onprem.tunnel.aio import FrameWriter, StreamClosed
from onprem.tunnel.errors import NotFound, ResourceExhausted, Unavailable
from onprem.v1 import profiles_pb2, tunnel_pb2

DB = profiles_pb2.PROFILE_KIND_DATABASE


async def test_the_writer_sends_frames_in_order_one_write_at_a_time() -> None:
    written: list[int] = []
    writing = 0

    async def write(frame: int) -> None:
        nonlocal writing
        writing += 1
        assert writing == 1, "two writes outstanding at once"
        await asyncio.sleep(0)
        written.append(frame)
        writing -= 1

    writer: FrameWriter[int] = FrameWriter(write)
    task = asyncio.create_task(writer.run())
    for i in range(5):
        await writer.send(i, 10)
    writer.send_nowait(5)
    await writer.flush()
    assert written == [0, 1, 2, 3, 4, 5]
    writer.close(StreamClosed("done"))
    await task


async def test_data_frames_wait_while_the_queue_is_full_but_control_frames_do_not() -> None:
    release = asyncio.Event()

    async def write(frame: str) -> None:
        await release.wait()

    writer: FrameWriter[str] = FrameWriter(write, max_queued_bytes=100)
    task = asyncio.create_task(writer.run())
    await writer.send("first", 60)
    await asyncio.sleep(0)  # the writer is now stuck writing "first", which still counts
    await writer.send("second", 60)  # 60 < 100: accepted
    blocked = asyncio.create_task(writer.send("third", 1))  # 120 >= 100: must wait
    await asyncio.sleep(0.01)
    assert not blocked.done()
    writer.send_nowait("pong")  # never waits
    release.set()
    await asyncio.wait_for(blocked, 1)
    writer.close(StreamClosed("done"))
    await task


async def test_a_closed_writer_refuses_frames_and_wakes_waiting_senders() -> None:
    async def write(frame: str) -> None:
        await asyncio.Event().wait()

    writer: FrameWriter[str] = FrameWriter(write, max_queued_bytes=10)
    task = asyncio.create_task(writer.run())
    await writer.send("a", 10)
    waiting = asyncio.create_task(writer.send("b", 10))
    await asyncio.sleep(0.01)
    writer.close(StreamClosed("stream ended"))
    with pytest.raises(StreamClosed):
        await waiting
    with pytest.raises(StreamClosed):
        writer.send_nowait("c")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_backoff_is_full_jitter_and_capped() -> None:
    backoff = Backoff(base=0.5, cap=30.0)
    for attempt in range(40):
        ceiling = min(30.0, 0.5 * 2**attempt)
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # spread over the whole range, not clustered
    assert max(backoff.delay(1000) for _ in range(200)) <= 30.0


@dataclass
class FakeSession:
    agent_id: str
    group: str
    profiles: set[tuple[int, str]]
    in_flight: int = 0
    max_in_flight: int = 2
    draining: bool = False
    is_open: bool = True
    session_id: str = "s"
    honours_keys: bool = True
    opened: list[tunnel_pb2.RequestStart] = field(default_factory=list)

    def offers(self, kind: int, profile: str) -> bool:
        return (kind, profile) in self.profiles

    def has_capacity(self) -> bool:
        return self.in_flight < self.max_in_flight

    #: The agent's requests over all replicas, as it reported them.
    agent_in_flight: int = 0

    @property
    def load(self) -> float:
        return max(self.in_flight, self.agent_in_flight) / self.max_in_flight

    def start(self, start: tunnel_pb2.RequestStart) -> str:
        self.in_flight += 1
        self.opened.append(start)
        return self.agent_id

    def close(self, reason: str) -> None:
        self.is_open = False

    on_change: object = None


def router_with(*sessions: FakeSession, facts: GroupFacts | None = None, wait: float = 0.05) -> Router:
    registry = Registry()
    for s in sessions:
        registry.add(s)  # type: ignore[arg-type]

    async def group_facts(group: str) -> GroupFacts:
        return facts or GroupFacts(exists=False, known_profiles=frozenset())

    return Router(registry, group_facts, queue_wait=wait)


async def pick(router: Router, profile: str) -> object:
    """The fake session's id that the router opened the request on."""
    return await router.route("g", DB, profile, tunnel_pb2.RequestStart())


async def test_the_router_counts_the_load_an_agent_reports_from_other_replicas() -> None:
    # b runs nothing here but 2 of its 4 on other replicas; a runs 1 of 4 here and nowhere else.
    a = FakeSession("a", "g", {(DB, "erp")}, in_flight=1, max_in_flight=4)
    b = FakeSession("b", "g", {(DB, "erp")}, in_flight=0, max_in_flight=4, agent_in_flight=2)
    assert await pick(router_with(a, b), "erp") == "a"


async def test_the_router_picks_the_least_loaded_agent_offering_the_profile() -> None:
    busy = FakeSession("a1", "g", {(DB, "erp")}, in_flight=1)
    idle = FakeSession("a2", "g", {(DB, "erp")})
    other = FakeSession("a3", "g", {(DB, "crm")})
    router = router_with(busy, idle, other)
    assert await pick(router, "erp") == "a2"


async def test_the_router_skips_draining_agents() -> None:
    draining = FakeSession("a1", "g", {(DB, "erp")}, draining=True)
    active = FakeSession("a2", "g", {(DB, "erp")}, in_flight=1)
    assert await pick(router_with(draining, active), "erp") == "a2"


async def test_an_unknown_group_is_not_found() -> None:
    with pytest.raises(NotFound, match="group 'nope' does not exist"):
        await router_with().route("nope", DB, "erp", tunnel_pb2.RequestStart())


async def test_a_profile_no_agent_of_the_group_offers_is_not_found() -> None:
    router = router_with(FakeSession("a1", "g", {(DB, "erp")}))
    with pytest.raises(NotFound, match=r"offers a database profile named 'crm' \(offered: erp\)"):
        await router.route("g", DB, "crm", tunnel_pb2.RequestStart())


async def test_a_known_group_with_no_connected_agent_is_unavailable() -> None:
    router = router_with(facts=GroupFacts(exists=True, known_profiles=frozenset({(DB, "erp")})))
    with pytest.raises(Unavailable, match="no agent of group 'g' is connected"):
        await router.route("g", DB, "erp", tunnel_pb2.RequestStart())


async def test_when_every_agent_is_full_the_request_waits_then_is_resource_exhausted() -> None:
    full = FakeSession("a1", "g", {(DB, "erp")}, in_flight=2)
    with pytest.raises(ResourceExhausted, match="running its maximum of requests"):
        await router_with(full).route("g", DB, "erp", tunnel_pb2.RequestStart())


async def test_a_waiting_request_takes_capacity_as_soon_as_it_frees_up() -> None:
    full = FakeSession("a1", "g", {(DB, "erp")}, in_flight=2)
    router = router_with(full, wait=5)
    waiting = asyncio.create_task(pick(router, "erp"))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    full.in_flight = 1
    router._registry.notify()
    assert await asyncio.wait_for(waiting, 1) == "a1"


def test_a_newer_session_of_the_same_agent_supersedes_the_older() -> None:
    registry = Registry()
    old, new = FakeSession("a1", "g", set()), FakeSession("a1", "g", set())
    registry.add(old)  # type: ignore[arg-type]
    registry.add(new)  # type: ignore[arg-type]
    assert not old.is_open
    assert registry.get("a1") is cast(object, new)
    registry.remove(old)  # type: ignore[arg-type]  # the old session's cleanup must not evict the new one
    assert registry.get("a1") is cast(object, new)


async def test_frames_that_queue_up_during_a_write_go_out_combined() -> None:
    release = asyncio.Event()
    written: list[object] = []

    async def write(frame: object) -> None:
        written.append(frame)
        await release.wait()

    writer: FrameWriter[object] = FrameWriter(write, combine=lambda frames: tuple(frames))
    task = asyncio.create_task(writer.run())
    writer.send_nowait("first")
    await asyncio.sleep(0)  # "first" is being written; the next three queue behind it
    for frame in ("a", "b", "c"):
        await writer.send(frame, 10)
    release.set()
    await writer.flush()
    assert written == ["first", ("a", "b", "c")]
    writer.close(StreamClosed("done"))
    await task


async def test_a_replica_warming_up_waits_for_an_agent_that_other_replicas_hold() -> None:
    registry = Registry()

    async def group_facts(group: str) -> GroupFacts:
        return GroupFacts(exists=True, known_profiles=frozenset({(DB, "erp")}))

    async def elsewhere(group: str) -> bool:
        return True  # the store says the group's agent holds a stream to another replica

    router = Router(registry, group_facts, queue_wait=0.05, elsewhere=elsewhere)
    router.warm_until = asyncio.get_running_loop().time() + 5
    routed = asyncio.ensure_future(pick(router, "erp"))
    await asyncio.sleep(0.1)
    assert not routed.done()
    registry.add(FakeSession("late", "g", {(DB, "erp")}))  # type: ignore[arg-type]
    assert await routed == "late"


async def test_a_replica_past_its_warm_up_says_at_once_that_no_agent_is_connected() -> None:
    async def group_facts(group: str) -> GroupFacts:
        return GroupFacts(exists=True, known_profiles=frozenset({(DB, "erp")}))

    async def elsewhere(group: str) -> bool:
        return True

    router = Router(Registry(), group_facts, queue_wait=0.05, elsewhere=elsewhere)
    with pytest.raises(Unavailable) as info:
        await router.route("g", DB, "erp", tunnel_pb2.RequestStart())
    assert info.value.reason == "NO_ACTIVE_AGENT"
