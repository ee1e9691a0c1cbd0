"""One enrolled agent cannot hurt the control plane: raw frames from a real identity, against real processes.

A compromised agent host holds a certificate our CA signed. With it, it floods pings and status
frames, packs batches far past their limit, never reads what it is sent, plays with credit, names
requests it does not own, sends frames after a request's end and answers with statuses it may not
give. Throughout, a well-behaved agent of another group keeps answering queries, ListAgents keeps
answering, the control plane's memory grows by less than 50 MiB, and the hostile session is closed
with a status that says which budget or rule it broke.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from onprem.v1 import (
    agents_pb2,
    database_pb2,
    files_pb2,
    files_pb2_grpc,
    profiles_pb2,
    tunnel_pb2,
)
from tools.bench.common import rss_mib
from tools.cluster import (
    AgentProcess,
    ControlPlaneProcess,
    agents_stub,
    bearer,
    database_stub,
    operator_channel,
    wait_for_agent_state,
)
from tools.hostile_agent import AgentFrame, HostileAgent, Stream, hello, pings

DB, FOLDER = profiles_pb2.PROFILE_KIND_DATABASE, profiles_pb2.PROFILE_KIND_FOLDER
RESOURCE_EXHAUSTED, FAILED_PRECONDITION = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION
#: How much the control plane's resident memory may grow over one attack (a test's `bystanders` block).
RSS_BUDGET_MIB = 50
#: And over all the attacks of this module, one after the other on one control plane: what one attack
#: took is freed and reused by the next (the allocator keeps it), so the total stays near one attack's.
MODULE_RSS_BUDGET_MIB = 80


@dataclass
class Site:
    cp: ControlPlaneProcess
    good: AgentProcess
    token: str
    root: Path
    baseline_rss: float = 0.0

    @property
    def log(self) -> Path:
        return self.root / "cp.log"

    @property
    def cp_rss(self) -> float:
        assert self.cp.proc is not None
        return rss_mib(self.cp.proc.pid)

    def cp_log(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("hostile")
    # Short heartbeats make the write-stall budget (three intervals) a matter of seconds.
    cp = ControlPlaneProcess(root / "cp", extra_args=["--heartbeat-interval", "2"])
    cp.start()
    good = AgentProcess(root / "good", cp, name="good",
                        profiles={"databases": {"db": {"url": f"sqlite:///{root / 'good.db'}"}}})
    good.enroll("good")
    good.start()
    site = Site(cp, good, cp.admin_token(), root)

    async def warm_up() -> None:
        async with operator_channel(cp) as channel:
            await wait_for_agent_state(channel, site.token, good.agent_id, agents_pb2.AGENT_STATE_ACTIVE)
            for _ in range(20):
                await query_good(channel, site.token)

    asyncio.run(warm_up())
    site.baseline_rss = site.cp_rss
    yield site
    grown = site.cp_rss - site.baseline_rss
    good.stop()
    cp.stop()
    assert grown < MODULE_RSS_BUDGET_MIB, f"the control plane grew by {grown:.1f} MiB over this module's attacks"


@pytest.fixture
def mallory(site: Site, request: pytest.FixtureRequest) -> HostileAgent:
    """A new hostile identity for each test (each has its own reconnect budget), enrolled in group 'evil'."""
    name = f"mallory-{request.node.name[5:40]}"
    evil = AgentProcess(site.root / name, site.cp, name="mallory", profiles={})
    evil.enroll("evil")  # only the identity: mallory's frames are hand-made
    return HostileAgent(site.root / name / "identity", site.cp.ca_file, f"127.0.0.1:{site.cp.agent_port}")


async def query_good(channel: grpc.aio.Channel, token: str) -> None:
    request = database_pb2.QueryRequest(group="good", profile="db", sql="SELECT 1 AS one")
    responses = [r async for r in database_stub(channel).Query(request, metadata=bearer(token), timeout=10)]
    assert responses[-1].summary.row_count == 1


@dataclass
class Bystanders:
    """What other users saw while the attack ran."""

    queries: int = 0
    listings: int = 0
    failures: list[str] = field(default_factory=list)
    slowest_listing: float = 0.0
    #: Set after each round of a query and a listing.
    answered: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def bystanders(site: Site) -> AsyncIterator[Bystanders]:
    """Another agent's queries and ListAgents, over and over, for as long as the block runs."""
    seen = Bystanders()
    before = site.cp_rss

    async def keep_asking(channel: grpc.aio.Channel) -> None:
        agents = agents_stub(channel)
        while True:
            try:
                await query_good(channel, site.token)
                seen.queries += 1
                began = time.monotonic()
                await agents.ListAgents(agents_pb2.ListAgentsRequest(), metadata=bearer(site.token), timeout=10)
                seen.slowest_listing = max(seen.slowest_listing, time.monotonic() - began)
                seen.listings += 1
            except grpc.aio.AioRpcError as exc:
                seen.failures.append(f"{exc.code().name}: {exc.details()}")
            seen.answered.set()
            await asyncio.sleep(0.05)

    async with operator_channel(site.cp) as channel:
        task = asyncio.create_task(keep_asking(channel))
        try:
            yield seen
            # And once more after the attack: the control plane still serves.
            seen.answered.clear()
            async with asyncio.timeout(30):
                await seen.answered.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert seen.failures == []
    assert seen.queries > 0 and seen.listings > 0
    assert site.cp_rss - before < RSS_BUDGET_MIB, f"the control plane grew by {site.cp_rss - before:.1f} MiB"


async def operator_query(site: Site, sql: str = "SELECT 1") -> list[database_pb2.QueryResponse]:
    async with operator_channel(site.cp) as channel:
        request = database_pb2.QueryRequest(group="evil", profile="db", sql=sql)
        return [r async for r in database_stub(channel).Query(request, metadata=bearer(site.token), timeout=20)]


def mallory_hello(*kinds: profiles_pb2.ProfileKind) -> tunnel_pb2.Hello:
    names = {DB: "db", FOLDER: "files"}
    return hello(*(profiles_pb2.Profile(kind=k, name=names[k]) for k in kinds or (DB,)))


def chunk(size: int) -> tunnel_pb2.ResponseChunk:
    """A result chunk of about `size` bytes."""
    return tunnel_pb2.ResponseChunk(read=files_pb2.ReadResponse(data=b"x" * size))


# --- floods ------------------------------------------------------------------------


async def test_a_batch_far_past_the_frame_limit_ends_the_session_with_resource_exhausted(
        site: Site, mallory: HostileAgent) -> None:
    flood = pings(200_000)
    async with bystanders(site), mallory.channel() as channel, mallory.stream(channel) as stream:
        assert await stream.flood([flood]) == RESOURCE_EXHAUSTED
    assert f"agent mallory ({mallory.identity.agent_id}) exceeded its budget of frames per message" in site.cp_log()


async def test_a_message_above_the_agent_message_limit_is_refused_by_the_transport(
        site: Site, mallory: HostileAgent) -> None:
    flood = pings(1_400_000)  # about 8 MiB, built before the clock of the bystanders starts
    async with bystanders(site), mallory.channel() as channel, mallory.stream(channel) as stream:
        code = await stream.flood([flood])
    assert code == RESOURCE_EXHAUSTED
    assert stream.details.startswith("SERVER: Received message larger than max (11")


async def test_a_ping_flood_ends_the_session_with_resource_exhausted(
        site: Site, mallory: HostileAgent) -> None:
    # One message, so that the status is read back rather than racing a write (the Python client
    # then reports an INTERNAL of its own); floods over many messages are the next tests' and the
    # in-memory tests'.
    async with bystanders(site), mallory.channel() as channel, mallory.stream(channel) as stream:
        code = await stream.flood([pings(1000)])
    assert (code, stream.details) == (
        RESOURCE_EXHAUSTED, "budget of control frames per second exceeded: agent mallory "
        f"({mallory.identity.agent_id}) sent stream-level frames (ping) faster than 50 a second (bursts of 500)")
    assert (f"agent mallory ({mallory.identity.agent_id}) exceeded its budget of control frames per second; "
            "closing its session") in site.cp_log()


async def test_pings_flooded_over_many_messages_end_the_session(site: Site, mallory: HostileAgent) -> None:
    flood = pings(400)
    async with bystanders(site), mallory.channel() as channel, mallory.stream(channel) as stream:
        await stream.flood(flood for _ in range(10_000))
    assert (f"agent mallory ({mallory.identity.agent_id}) exceeded its budget of control frames per second; "
            "closing its session") in site.cp_log()


async def test_eight_mib_batches_of_pings_never_read_cost_the_control_plane_nothing_lasting(
        site: Site, mallory: HostileAgent) -> None:
    """The attack as first reported: 8 MiB batches of about 1.4 million pings, pongs never read, again and again."""
    flood = pings(1_400_000)
    async with bystanders(site) as seen, mallory.channel() as channel:
        until = time.monotonic() + 10
        attempts = 0
        while time.monotonic() < until:
            with contextlib.suppress(grpc.aio.AioRpcError, ConnectionError):
                async with mallory.stream(channel) as stream:
                    await stream.flood([flood, flood, flood])
            attempts += 1
    assert attempts > 1 and seen.queries > 10


async def test_a_status_flood_ends_the_session_with_resource_exhausted(
        site: Site, mallory: HostileAgent) -> None:
    profiles = [profiles_pb2.Profile(kind=DB, name=f"p{i}") for i in range(100)]
    status = AgentFrame(status=tunnel_pb2.AgentStatus(profiles_changed=True, profiles=profiles))
    statuses = AgentFrame(batch=tunnel_pb2.AgentFrameBatch(frames=[status] * 30))
    async with bystanders(site), mallory.channel() as channel, mallory.stream(channel) as stream:
        code = await stream.flood([statuses])
    assert (code, stream.details) == (
        RESOURCE_EXHAUSTED, "budget of status frames per second exceeded: agent mallory "
        f"({mallory.identity.agent_id}) sent status frames faster than 2 a second (bursts of 20)")
    assert f"agent mallory ({mallory.identity.agent_id}) exceeded its budget of status frames" in site.cp_log()


async def test_pings_within_budget_whose_pongs_are_never_read_leave_the_session_up(
        site: Site, mallory: HostileAgent) -> None:
    async with bystanders(site), mallory.channel() as channel, mallory.stream(channel) as stream:
        for i in range(200):  # 40 a second for 5 s, never reading a pong
            await stream.send(AgentFrame(ping=tunnel_pb2.Ping(nonce=i)))
            await asyncio.sleep(0.025)
        async with operator_channel(site.cp) as operator:
            agent = await wait_for_agent_state(operator, site.token, mallory.identity.agent_id,
                                               agents_pb2.AGENT_STATE_ACTIVE)
    assert agent.name == "mallory"


async def test_reconnecting_over_and_over_is_refused_with_resource_exhausted(
        site: Site, mallory: HostileAgent) -> None:
    codes: list[grpc.StatusCode] = []
    async with bystanders(site), mallory.channel() as channel:
        for _ in range(60):
            try:
                async with mallory.stream(channel):
                    codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
    assert codes[:10] == [grpc.StatusCode.OK] * 10
    assert RESOURCE_EXHAUSTED in codes
    assert f"agent {mallory.identity.agent_id} reconnects faster than 1 a second" in site.cp_log()


# --- lies about requests -----------------------------------------------------------


@contextlib.asynccontextmanager
async def serving_mallory(site: Site, mallory: HostileAgent,
                          *kinds: profiles_pb2.ProfileKind) -> AsyncIterator[Stream]:
    async with mallory.channel() as channel, mallory.stream(channel, mallory_hello(*kinds)) as stream:
        async with operator_channel(site.cp) as operator:
            await wait_for_agent_state(operator, site.token, mallory.identity.agent_id,
                                       agents_pb2.AGENT_STATE_ACTIVE)
        yield stream


async def test_frames_for_a_request_never_started_end_the_session(site: Site, mallory: HostileAgent) -> None:
    async with bystanders(site), serving_mallory(site, mallory) as stream:
        await stream.send(AgentFrame(request_id=4242, chunk=chunk(10)))
        assert await stream.ended() == FAILED_PRECONDITION
    assert "chunk frame for request 4242, which was never started" in site.cp_log()


async def test_a_frame_after_the_agents_own_end_ends_the_session_and_the_result_stands(
        site: Site, mallory: HostileAgent) -> None:
    async with bystanders(site), serving_mallory(site, mallory) as stream:
        asked = asyncio.create_task(operator_query(site))
        rid, _ = await stream.next_start()
        await stream.send(AgentFrame(request_id=rid, end=tunnel_pb2.ResponseEnd(code=0)))
        await stream.send(AgentFrame(request_id=rid, chunk=chunk(10)))
        assert await stream.ended() == FAILED_PRECONDITION
        assert await asked == []
    assert f"chunk frame for request {rid} after the agent ended it" in site.cp_log()


async def test_a_chunk_above_the_chunk_limit_ends_the_session_and_the_request_is_unavailable(
        site: Site, mallory: HostileAgent) -> None:
    # Credit overruns are deterministic only where nothing consumes meanwhile: see tests/tunnel/test_budget.py.
    async with bystanders(site), serving_mallory(site, mallory) as stream:
        asked = asyncio.create_task(operator_query(site))
        rid, _ = await stream.next_start()
        await stream.send(AgentFrame(request_id=rid, chunk=chunk(300 * 1024)))
        assert await stream.ended() == FAILED_PRECONDITION
        assert stream.details.startswith("tunnel protocol: chunk of 307")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asked
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "was lost while running the request" in (caught.value.details() or "")


async def test_a_chunk_of_another_kind_than_the_request_ends_the_session(
        site: Site, mallory: HostileAgent) -> None:
    async with bystanders(site), serving_mallory(site, mallory) as stream:
        asked = asyncio.create_task(operator_query(site))
        rid, _ = await stream.next_start()
        await stream.send(AgentFrame(request_id=rid, chunk=chunk(10)))  # a file's bytes as a query's answer
        assert await stream.ended() == FAILED_PRECONDITION
        assert stream.details == f"tunnel protocol: chunk for request {rid} carries read; the request's answer is query"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asked
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_credit_beyond_the_window_ends_the_session(site: Site, mallory: HostileAgent) -> None:
    async with bystanders(site), serving_mallory(site, mallory, FOLDER) as stream, operator_channel(site.cp) as operator:
        upload = files_pb2_grpc.FileServiceStub(operator).Write(  # type: ignore[call-arg]
            metadata=bearer(site.token), timeout=20)
        await upload.write(files_pb2.WriteRequest(header=files_pb2.WriteHeader(
            group="evil", profile="files", path="x.bin")))
        rid, _ = await stream.next_start()
        await stream.send(AgentFrame(request_id=rid, window_update=tunnel_pb2.WindowUpdate(bytes=2**31)))
        assert await stream.ended() == FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await upload
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "would give" in site.cp_log()


async def test_an_agent_that_stops_reading_is_cut_off_after_the_write_stall_budget(
        site: Site, mallory: HostileAgent) -> None:
    """Mallory takes 4 uploads, then reads nothing more (but keeps pinging, so it is not silent):
    the control plane's writes back up behind it until one waits past three heartbeat intervals."""
    uploads = 4
    folder = profiles_pb2.Profile(kind=FOLDER, name="files")
    async with bystanders(site), mallory.channel(small_window=True) as channel, \
            mallory.stream(channel, hello(folder, max_in_flight=uploads)) as stream, \
            operator_channel(site.cp) as operator:
        await wait_for_agent_state(operator, site.token, mallory.identity.agent_id, agents_pb2.AGENT_STATE_ACTIVE)

        def upload(n: int) -> grpc.StatusCode:
            # A blocking client: grpc.aio's reports an INTERNAL of its own when the server ends an
            # upload it is still writing; the blocking one reports the status the server sent.
            def messages() -> Iterator[files_pb2.WriteRequest]:
                yield files_pb2.WriteRequest(header=files_pb2.WriteHeader(
                    group="evil", profile="files", path=f"f{n}.bin"))
                for _ in range(64):  # 64 MiB each: far more than every buffer on the way holds
                    yield files_pb2.WriteRequest(data=b"u" * (1024 * 1024))

            creds = grpc.ssl_channel_credentials(root_certificates=site.cp.ca_file.read_bytes())
            with grpc.secure_channel(site.cp.operator_address, creds) as blocking:
                try:
                    files_pb2_grpc.FileServiceStub(blocking).Write(messages(), metadata=bearer(site.token),
                                                                    timeout=60)
                except grpc.RpcError as exc:
                    return exc.code()  # type: ignore[no-any-return,attr-defined]
            return grpc.StatusCode.OK

        sending = [asyncio.create_task(asyncio.to_thread(upload, n)) for n in range(uploads)]
        for _ in range(uploads):
            await stream.next_start()
        agents = agents_stub(operator)
        for nonce in range(120):  # alive for a minute at most, never reading
            # The stream's own end waits behind the data it never read: ask the operator API instead.
            got = await agents.GetAgent(agents_pb2.GetAgentRequest(agent_id=mallory.identity.agent_id),
                                        metadata=bearer(site.token))
            if got.agent.state != agents_pb2.AGENT_STATE_ACTIVE:
                break
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await stream.send(AgentFrame(ping=tunnel_pb2.Ping(nonce=nonce)))
            await asyncio.sleep(0.5)
        code = await stream.ended()
        outcomes = await asyncio.gather(*sending)
    assert code == RESOURCE_EXHAUSTED
    assert stream.details.startswith("budget of write stall exceeded: the agent has not read its stream for")
    assert outcomes == [grpc.StatusCode.UNAVAILABLE] * uploads
    assert f"agent mallory ({mallory.identity.agent_id}) exceeded its budget of write stall" in site.cp_log()


async def test_a_status_code_agents_may_not_give_reaches_the_operator_as_internal(
        site: Site, mallory: HostileAgent) -> None:
    async with bystanders(site), serving_mallory(site, mallory) as stream:
        asked = asyncio.create_task(operator_query(site))
        rid, _ = await stream.next_start()
        await stream.send(AgentFrame(request_id=rid, end=tunnel_pb2.ResponseEnd(
            code=grpc.StatusCode.UNAUTHENTICATED.value[0], message="your token was revoked", reason="BAD_TOKEN")))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asked
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == (
        "the agent answered with a status it may not give; the control plane's log names the agent")
    assert (f"agent mallory ({mallory.identity.agent_id}) ended request {rid} with status UNAUTHENTICATED, "
            "which agents may not give") in site.cp_log()
