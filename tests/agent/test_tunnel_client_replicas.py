"""A real agent `TunnelClient` holding streams to two or three control-plane replicas in memory.

Each replica (`tunnel.testing.MemoryReplica`) runs the control plane's real `AgentSession` for every
stream the agent dials to it, and the agent runs its real sessions: no sockets, no processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from onprem.agent import metrics
from onprem.agent.config import AgentConfig, ControlPlaneConfig
from onprem.agent.dispatcher import Dispatcher
from onprem.agent.identity import Identity
from onprem.agent.profiles import Profiles
from onprem.agent.session import StatusPacer
from onprem.agent.tunnel_client import Backoff, TunnelClient
from onprem.control_plane.sessions import AgentSession
from onprem.tunnel.errors import ResourceExhausted
from onprem.tunnel.testing import MemoryReplica, MemoryReplicas
from onprem.v1 import tunnel_pb2
from tests.tunnel.test_testing import FakeFolder, read

LB = "cp:8444"


@dataclass(frozen=True)
class QuickBackoff(Backoff):
    """The real full-jitter backoff, in milliseconds; it records the attempt of every wait."""

    base: float = 0.005
    cap: float = 0.05
    waits: list[int] = field(default_factory=list)

    def delay(self, attempt: int) -> float:
        self.waits.append(attempt)
        return super().delay(attempt)


def make_identity() -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-memory")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Identity("agent-memory", "g", key_pem, cert.public_bytes(serialization.Encoding.PEM))


IDENTITY = make_identity()


def config(*, max_streams: int = 3, max_in_flight: int = 16, grace: float = 5.0) -> AgentConfig:
    return AgentConfig(
        control_plane=ControlPlaneConfig(address=LB, enroll_address="cp:8445", ca_file=Path("/nonexistent"),
                                         max_streams=max_streams),
        identity_dir=Path("/nonexistent"), profiles=Profiles(), max_in_flight=max_in_flight,
        drain_grace_seconds=grace, health_check_interval_seconds=3600)


def replica(rid: str | None, address: str | None = None, **kwargs: object) -> MemoryReplica:
    return MemoryReplica(rid, f"{rid}:8444" if address is None else address, **kwargs)  # type: ignore[arg-type]


@dataclass
class Agent:
    client: TunnelClient
    replicas: MemoryReplicas
    backoff: QuickBackoff
    folder: FakeFolder
    task: asyncio.Task[None]
    stop: asyncio.Event

    async def streams(self, count: int, within: float = 10.0) -> None:
        await until(lambda: len(self.client.streams) == count, within)


@contextlib.asynccontextmanager
async def agent(*replicas: MemoryReplica, max_streams: int = 3, max_in_flight: int = 16,
                pick: Callable[[list[MemoryReplica]], MemoryReplica] | None = None) -> AsyncIterator[Agent]:
    network = MemoryReplicas(*replicas, lb_address=LB, pick=pick)
    folder = FakeFolder()
    backoff = QuickBackoff()
    client = TunnelClient(config(max_streams=max_streams, max_in_flight=max_in_flight), IDENTITY,
                          Dispatcher({"file_op": folder}), backoff, dial=network.dial)
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(client.run(stop))
    try:
        yield Agent(client, network, backoff, folder, task, stop)
    finally:
        folder.release.set()
        stop.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 20)
        await network.aclose()


def live_replicas(a: Agent) -> set[str | None]:
    return {stream.replica_id for stream in a.client.streams.values()}


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll `condition` until it holds (a hang guard, not a timing claim)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


async def test_the_agent_holds_one_stream_to_each_replica_and_logs_each_join(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "onprem.agent.tunnel")
    async with agent(replica("r1"), replica("r2"), replica("r3")) as a:
        await a.streams(3)
        assert live_replicas(a) == {"r1", "r2", "r3"}
        assert [len(r.live) for r in a.replicas.replicas] == [1, 1, 1]
        assert metrics.REGISTRY.get_sample_value("onprem_agent_streams") == 3
        # The first dial went to the configured address, the others to each replica's own.
        assert a.replicas.dials[0] == LB and sorted(a.replicas.dials[1:]) == ["r2:8444", "r3:8444"]
        assert a.client.describe_streams().startswith("3 streams: replica r1 at cp:8444, replica r")
    joins = [m for m in caplog.messages if m.startswith("stream joined")]
    assert len(joins) == 3 and any("replica r2 at r2:8444" in m for m in joins)
    assert len([m for m in caplog.messages if m.startswith("stream left")]) == 3


async def test_max_in_flight_holds_over_all_streams_together() -> None:
    async with agent(replica("r1"), replica("r2"), max_in_flight=2) as a:
        await a.streams(2)
        on_r1, on_r2 = await a.replicas["r1"].stream(), await a.replicas["r2"].stream()
        first, second = on_r1.start(read("wait")), on_r2.start(read("wait"))
        await until(lambda: a.folder.started.count("wait") == 2)
        for session in (on_r1, on_r2):
            with pytest.raises(ResourceExhausted, match="the agent runs at most 2 requests at once") as caught:
                [chunk async for chunk in session.start(read("small"))]
            assert caught.value.reason == "AGENT_BUSY"
        a.folder.release.set()
        assert len([c async for c in first]) == 3 and len([c async for c in second]) == 3
        assert len([c async for c in on_r2.start(read("small"))]) == 3


def reported(session: AgentSession, statuses: list[tuple[AgentSession, tunnel_pb2.AgentStatus]],
             in_flight: int, agent_in_flight: int) -> bool:
    return any(s is session and (st.in_flight, st.agent_in_flight) == (in_flight, agent_in_flight)
               for s, st in statuses)


async def test_every_replica_hears_the_agents_total_of_requests() -> None:
    async with agent(replica("r1"), replica("r2")) as a:
        await a.streams(2)
        r1, r2 = a.replicas["r1"], a.replicas["r2"]
        on_r1, on_r2 = await r1.stream(), await r2.stream()
        running = [on_r1.start(read("wait")), on_r2.start(read("wait"))]
        # Each stream reports its own requests and the agent's over both.
        await r1.wait_for(lambda: reported(on_r1, r1.statuses, 1, 2))
        await r2.wait_for(lambda: reported(on_r2, r2.statuses, 1, 2))
        a.folder.release.set()
        for exchange in running:
            assert len([c async for c in exchange]) == 3
        await r1.wait_for(lambda: reported(on_r1, r1.statuses, 0, 0))
        await r2.wait_for(lambda: reported(on_r2, r2.statuses, 0, 0))


async def test_load_reports_keep_within_the_status_budget_of_each_stream() -> None:
    async with agent(replica("r1"), max_in_flight=64) as a:
        await a.streams(1)
        r1 = a.replicas["r1"]
        session = await r1.stream()
        loop = asyncio.get_running_loop()
        began = loop.time()
        while loop.time() - began < 1.5:
            # Bursts of requests starting and ending: the load changes hundreds of times.
            exchanges = [session.start(read("small")) for _ in range(10)]
            for exchange in exchanges:
                [c async for c in exchange]
        elapsed = loop.time() - began
        await r1.wait_for(lambda: reported(session, r1.statuses, 0, 0), within=2)
        loads = [st for s, st in r1.statuses if s is session]
        # At most one report every 0.5 s (two a second: the control plane's budget), and the stream held.
        assert 1 <= len(loads) <= 2 * (elapsed + 1.0) + 1
        assert session.is_open and session.budget_error is None


def test_the_pacer_keeps_half_a_second_and_a_reserve_of_the_budget() -> None:
    pacer = StatusPacer(2.0, 20)
    assert pacer.wait(0.0) == 0.0
    pacer.sent(0.0)
    assert pacer.wait(0.1) == pytest.approx(0.4)
    # Health, reloads and drains spent the budget down to its reserve: load reports wait for it to refill.
    for _ in range(12):
        pacer.sent(1.0)
    assert pacer.wait(1.0) == pytest.approx(1.5)  # 8 tokens left of 20; 11 wanted, at 2 a second
    assert pacer.wait(2.5) == 0.0


async def test_a_drain_without_exit_on_one_stream_leaves_the_others_serving() -> None:
    async with agent(replica("r1"), replica("r2")) as a:
        await a.streams(2)
        r1, r2 = a.replicas["r1"], a.replicas["r2"]
        on_r1, on_r2 = await r1.stream(), await r2.stream()
        running = on_r1.start(read("wait"))
        await until(lambda: "wait" in a.folder.started)
        on_r1.drain("replica stopping", timedelta(seconds=5), exit_after=False)
        await r1.wait_for(lambda: any(s is on_r1 and st.draining for s, st in r1.statuses))
        # r1's stream takes no more; r2's serves on.
        assert len([c async for c in on_r2.start(read("small"))]) == 3
        a.folder.release.set()
        assert len([c async for c in running]) == 3
        # r1's stream closed cleanly once its request finished; the agent dialed r1 again.
        await r1.wait_for(lambda: len(r1.live) == 1 and r1.live[0] is not on_r1)
        assert [(e.session, e.how) for e in r1.ended] == [(on_r1, "closed")]
        assert r2.live == [on_r2] and not a.task.done()
        assert len([c async for c in r1.live[0].start(read("small"))]) == 3


async def test_a_replica_dropped_from_the_set_is_closed_after_its_request_finished() -> None:
    async with agent(replica("r1"), replica("r2")) as a:
        await a.streams(2)
        r1, r2 = a.replicas["r1"], a.replicas["r2"]
        on_r2 = await r2.stream()
        running = on_r2.start(read("wait"))
        await until(lambda: "wait" in a.folder.started)
        assert r1.replica is not None
        r1.names([r1.replica])  # r2 is gone, says r1
        await r2.wait_for(lambda: any(s is on_r2 and st.draining for s, st in r2.statuses))
        assert on_r2.is_open  # its request still runs
        a.folder.release.set()
        assert len([c async for c in running]) == 3
        await r2.wait_for(lambda: bool(r2.ended))
        assert [(e.session, e.how) for e in r2.ended] == [(on_r2, "closed")]
        await asyncio.sleep(0.2)
        assert live_replicas(a) == {"r1"} and r2.dials == 1


async def test_behind_a_load_balancer_the_agent_dials_until_it_holds_every_replica() -> None:
    behind = [replica("r1", ""), replica("r2", ""), replica("r3", "")]
    # The balancer lands dial after dial on r1 before it spreads them.
    script = iter([0, 0, 0, 0, 1, 0, 1, 2])

    def pick(accepting: list[MemoryReplica]) -> MemoryReplica:
        return accepting[next(script, 2)]

    async with agent(*behind, pick=pick) as a:
        await a.streams(3)
        assert live_replicas(a) == {"r1", "r2", "r3"}
        assert set(a.replicas.dials) == {LB}
        r1 = a.replicas["r1"]
        duplicates = [e for e in r1.ended]
        # Each landing on a replica held ended politely at once: a clean close, no request on it.
        assert len(duplicates) >= 2
        assert all(e.how == "closed" and e.started == 0 for e in duplicates)
        assert len(r1.live) == 1


async def test_a_control_plane_that_names_no_replica_gets_one_stream_as_before() -> None:
    old = MemoryReplica(None, "")
    async with agent(old) as a:
        await a.streams(1)
        await asyncio.sleep(0.2)
        assert a.replicas.dials == [LB] and live_replicas(a) == {None}
        first = await old.stream()
        assert not first.conn.replicas
        first.close("restarting")
        await old.wait_for(lambda: len(old.live) == 1 and old.live[0] is not first)
        assert a.replicas.dials == [LB, LB] and len(a.client.streams) == 1


async def test_a_drain_to_exit_on_one_stream_drains_every_stream_and_stops_the_agent() -> None:
    async with agent(replica("r1"), replica("r2")) as a:
        await a.streams(2)
        r1, r2 = a.replicas["r1"], a.replicas["r2"]
        on_r1, on_r2 = await r1.stream(), await r2.stream()
        running = on_r2.start(read("wait"))
        await until(lambda: "wait" in a.folder.started)
        on_r1.drain("maintenance", timedelta(seconds=5), exit_after=True)
        await r2.wait_for(lambda: any(s is on_r2 and st.draining for s, st in r2.statuses))
        assert not a.task.done()
        a.folder.release.set()
        assert len([c async for c in running]) == 3
        await asyncio.wait_for(a.task, 10)
        assert sorted(e.how for r in (r1, r2) for e in r.ended) == ["closed", "closed"]


# -- a control plane that lies --
async def watch_slots(a: Agent, seen: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        seen.append(a.client.slot_tasks)
        await asyncio.sleep(0.001)


async def test_64_bogus_replicas_never_make_the_agent_dial_more_than_max_streams() -> None:
    liar = replica("r1")
    async with agent(liar) as a:
        assert liar.replica is not None
        a.replicas.named = [liar.replica, *(tunnel_pb2.Replica(replica_id=f"bogus{i}", agent_address=f"10.9.{i}.1:1")
                                            for i in range(63))]
        seen: list[int] = []
        done = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(watch_slots(a, seen, done))
        await asyncio.sleep(1.0)
        done.set()
        await watcher
        assert max(seen) <= 3
        bogus = [d for d in a.replicas.dials if d.startswith("10.9.")]
        # Two slots dial the first two named (past max_streams, the rest are never wanted) ...
        assert bogus and set(bogus) == {"10.9.0.1:1", "10.9.1.1:1"}
        # ... and every dial waits out its slot's backoff, whose attempts climb.
        assert len(a.replicas.dials) <= len(a.backoff.waits) + 1
        assert max(a.backoff.waits) >= 4
        assert live_replicas(a) == {"r1"}


async def test_one_address_named_under_many_ids_is_dialed_once() -> None:
    r1, r2 = replica("r1"), replica("r2")
    async with agent(r1, r2) as a:
        assert r1.replica is not None and r2.replica is not None
        a.replicas.named = [r1.replica, *(tunnel_pb2.Replica(replica_id=f"alias{i}", agent_address="r2:8444")
                                          for i in range(40))]
        await a.streams(2)
        await asyncio.sleep(0.3)
        # r2 answered the dial of "alias0": one stream there, and no other alias is dialed.
        assert a.replicas.dials.count("r2:8444") == 1
        assert live_replicas(a) == {"r1", "r2"}


async def test_a_set_that_flaps_every_millisecond_does_not_make_the_agent_dial_in_a_loop() -> None:
    r1, r2 = replica("r1"), replica("r2")
    async with agent(r1, r2) as a:
        assert r1.replica is not None and r2.replica is not None
        a.replicas.named = [r1.replica]
        await a.streams(1)
        tasks_before = len(asyncio.all_tasks())
        seen: list[int] = []
        done = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(watch_slots(a, seen, done))
        loop = asyncio.get_running_loop()
        began = loop.time()
        while loop.time() - began < 1.0:
            for _ in range(3):  # a few flaps each millisecond, however busy the machine is
                r1.names([r1.replica, r2.replica])
                r1.names([r1.replica])
            await asyncio.sleep(0.001)
        done.set()
        await watcher
        assert max(seen) <= 3
        # The agent broke r1's stream for its flood of frames (past its budget of stream-level frames),
        # and dialed again; each dial, to r1 or r2, waited out its backoff.
        assert any(e.how == "cancelled" for e in r1.ended)
        assert len(a.replicas.dials) <= len(a.backoff.waits) + 1
        assert r2.dials <= len(a.backoff.waits)
        # Once the set holds still, the agent settles on it, with no task left over from the flapping.
        a.replicas.named = [r1.replica, r2.replica]
        r1.names([r1.replica, r2.replica])
        await until(lambda: live_replicas(a) == {"r1", "r2"})
        await asyncio.sleep(0.2)
        assert a.client.slot_tasks == 2
        assert len(asyncio.all_tasks()) <= tasks_before + 12  # one more stream: its session's tasks


async def test_stopping_leaves_no_task_behind() -> None:
    before = set(asyncio.all_tasks())
    async with agent(replica("r1"), replica("r2"), replica("r3")) as a:
        await a.streams(3)
        a.stop.set()
        await asyncio.wait_for(a.task, 10)
        assert a.client.slot_tasks == 0
    await asyncio.sleep(0.05)
    assert set(asyncio.all_tasks()) - before == set()
