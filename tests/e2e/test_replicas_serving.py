"""Three replicas serving two groups: any replica serves any group, and losing one loses only its own calls.

Real processes: PostgreSQL, three control-plane replicas on one database, one agent in each of two groups,
every agent holding a stream to every replica. Load comes from clients of the replicas that stay up; the
rolling restart's clients use the documented service config over all three addresses.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from onprem.operator_cli.service_config import channel_options
from onprem.v1 import agents_pb2, files_pb2, files_pb2_grpc
from tests.e2e.test_replicas_store import wait_for_streams
from tests.support.postgres import PostgresServer
from tests.support.replicas import Replicas, new_database
from tools.cluster import AgentProcess, agents_stub, bearer, operator_channel

pytestmark = pytest.mark.postgres
S = grpc.StatusCode
ALL = ["r1", "r2", "r3"]
GROUPS = ("north", "south")


@dataclass
class Site:
    replicas: Replicas
    token: str
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    async def all_held(self, holding: list[str] = ALL) -> None:
        for agent in self.agents.values():
            await wait_for_streams(self.replicas[0], self.token, agent.agent_id, holding)


@pytest.fixture
def site(tmp_path: Path, postgres: PostgresServer) -> Iterator[Site]:
    replicas = Replicas(tmp_path, new_database(postgres))
    replicas.start()
    token = replicas[0].admin_token()
    site = Site(replicas, token)
    try:
        for group in GROUPS:
            folder = tmp_path / f"{group}-files"
            folder.mkdir()
            (folder / "hello.txt").write_text(f"hello from {group}\n")
            agent = AgentProcess(tmp_path / group, replicas[0], {"folders": {"files": {"root": str(folder)}}},
                                 name=f"{group}-agent")
            agent.enroll(group, token=replicas[0].enrollment_token(group))
            agent.start()
            site.agents[group] = agent
        asyncio.run(site.all_held())
        yield site
    finally:
        for agent in site.agents.values():
            agent.stop()
        replicas.stop()


def stat(group: str) -> files_pb2.StatRequest:
    return files_pb2.StatRequest(group=group, profile="files", path="hello.txt")


async def read_text(channel: grpc.aio.Channel, token: str, group: str) -> str:
    stub = files_pb2_grpc.FileServiceStub(channel)
    chunks = stub.Read(files_pb2.ReadRequest(group=group, profile="files", path="hello.txt"), metadata=bearer(token),
                       timeout=10)
    return b"".join([c.data async for c in chunks]).decode()


async def test_any_replica_serves_any_group(site: Site) -> None:
    for cp in site.replicas.members:
        async with operator_channel(cp) as channel:
            for group in GROUPS:
                assert await read_text(channel, site.token, group) == f"hello from {group}\n"


def test_grpcurl_against_each_replica_gives_the_same_answers(site: Site) -> None:
    answers = []
    for cp in site.replicas.members:
        out = subprocess.run(
            [str(Path(_grpcurl())), "-cacert", str(cp.ca_file), "-H", f"authorization: Bearer {site.token}",
             "-d", json.dumps({"group": "south", "profile": "files", "path": "hello.txt"}), cp.operator_address,
             "onprem.v1.FileService/Stat"], capture_output=True, text=True, check=True, timeout=60)
        stat = json.loads(out.stdout)
        answers.append((stat["info"]["path"], stat["info"]["size"]))
    assert answers == [("hello.txt", "17")] * 3


def _grpcurl() -> str:
    import shutil
    import sys

    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert found, "grpcurl is installed in the venv by make setup"
    return found


@dataclass
class Load:
    """Reads in a loop through one channel; counts what succeeded and what failed, by code."""

    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)

    async def run(self, channel: grpc.aio.Channel, token: str, stop: asyncio.Event) -> None:
        stub = files_pb2_grpc.FileServiceStub(channel)
        while not stop.is_set():
            for group in GROUPS:
                try:
                    await stub.Stat(stat(group), metadata=bearer(token), timeout=10)
                    self.ok += 1
                except grpc.aio.AioRpcError as exc:
                    self.failed[exc.code().name] = self.failed.get(exc.code().name, 0) + 1
            await asyncio.sleep(0.01)


class under_load:
    """Reads through each channel until the block ends; yields their counts."""

    def __init__(self, channels: list[grpc.aio.Channel], token: str) -> None:
        self.loads = [Load() for _ in channels]
        self._channels, self._token = channels, token
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> list[Load]:
        self._tasks = [asyncio.ensure_future(load.run(ch, self._token, self._stop))
                       for load, ch in zip(self.loads, self._channels, strict=True)]
        await asyncio.sleep(0.5)
        return self.loads

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_sigkill_of_one_replica_fails_none_of_the_others_requests_and_its_restart_gets_every_agent_back(
    site: Site,
) -> None:
    r1, r2, r3 = site.replicas.members
    async with operator_channel(r1) as c1, operator_channel(r3) as c3, operator_channel(r2) as c2:
        async with under_load([c1, c3], site.token) as (l1, l3):
            r2.stop(sig=signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await files_pb2_grpc.FileServiceStub(c2).Stat(stat("north"), metadata=bearer(site.token), timeout=10)
            await asyncio.sleep(2.0)  # the others notice r2 is gone; the agents drop its stream
            await site.all_held(["r1", "r3"])
        assert info.value.code() == S.UNAVAILABLE
        assert (l1.failed, l3.failed) == ({}, {})
        assert l1.ok > 0 and l3.ok > 0
    r2.start()
    await site.all_held(ALL)
    async with operator_channel(r2) as channel:
        agents = (await agents_stub(channel).ListAgents(agents_pb2.ListAgentsRequest(),
                                                        metadata=bearer(site.token))).agents
        assert sorted((a.name, a.state, list(a.replica_ids)) for a in agents) == [
            ("north-agent", agents_pb2.AGENT_STATE_ACTIVE, ALL), ("south-agent", agents_pb2.AGENT_STATE_ACTIVE, ALL)]
        assert await read_text(channel, site.token, "north") == "hello from north\n"


async def test_a_stopping_replica_drains_only_its_streams_and_the_agents_serve_through_the_others(site: Site) -> None:
    r1, r2, r3 = site.replicas.members
    async with operator_channel(r1) as c1, operator_channel(r3) as c3:
        async with under_load([c1, c3], site.token) as (l1, l3):
            assert r2.stop() == 0
            await site.all_held(["r1", "r3"])
        assert (l1.failed, l3.failed) == ({}, {})
    for agent in site.agents.values():
        assert agent.proc is not None and agent.proc.poll() is None
        log = (agent.home / "agent.log").read_text()
        # r2's stream alone went (drained, or closed by r2 once its calls were done), the others stayed.
        assert "stream left: replica r2 at " in log
        assert "(2 streams: replica r1 at " in log


def all_replicas_channel(site: Site) -> grpc.aio.Channel:
    """One channel over the three replicas' addresses, with the documented service config."""
    target = "ipv4:" + ",".join(cp.operator_address for cp in site.replicas.members)
    credentials = grpc.ssl_channel_credentials(site.replicas[0].ca_file.read_bytes())
    return grpc.aio.secure_channel(target, credentials,
                                   options=[*channel_options(), ("grpc.ssl_target_name_override", "localhost")])


async def test_a_rolling_restart_of_all_three_replicas_fails_no_read_of_a_client_using_the_service_config(
    site: Site,
) -> None:
    async with all_replicas_channel(site) as channel:
        async with under_load([channel], site.token) as (load,):
            for cp in site.replicas.members:
                assert cp.stop() == 0
                cp.start()
                await site.all_held(ALL)
        assert load.failed == {}
        assert load.ok > 0


async def test_a_certificate_renewed_through_one_replica_is_accepted_by_all(
    tmp_path: Path, postgres: PostgresServer,
) -> None:
    replicas = Replicas(tmp_path, new_database(postgres))
    for cp in replicas.members:
        cp.extra_args += ["--agent-cert-days", "0.0003"]  # 26 s: renewed after about 17 s
    replicas.start()
    token = replicas[0].admin_token()
    folder = tmp_path / "files"
    folder.mkdir()
    agent = AgentProcess(tmp_path / "a", replicas[0], {"folders": {"files": {"root": str(folder)}}}, name="renewer")
    agent.enroll("north", token=replicas[0].enrollment_token("north"))
    agent.start()
    try:
        first = await wait_for_streams(replicas[0], token, agent.agent_id, ALL)
        renewed = first
        async with operator_channel(replicas[1]) as channel:
            for _ in range(600):
                renewed = (await agents_stub(channel).GetAgent(agents_pb2.GetAgentRequest(agent_id=agent.agent_id),
                                                               metadata=bearer(token))).agent
                if renewed.certificate_expires_at.ToDatetime() > first.certificate_expires_at.ToDatetime():
                    break
                await asyncio.sleep(0.1)
        assert renewed.certificate_expires_at.ToDatetime() > first.certificate_expires_at.ToDatetime()
        # Every replica takes the renewed certificate on a new stream.
        for cp in replicas.members:
            cp.stop(sig=signal.SIGKILL)
            cp.start()
        await wait_for_streams(replicas[0], token, agent.agent_id, ALL)
        log = (agent.home / "agent.log").read_text()
        assert "renewed" in log.lower()
    finally:
        agent.stop()
        replicas.stop()

