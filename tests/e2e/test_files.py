"""FileService end to end: an operator client, a real control plane and a real agent process,
real folders, and real signals.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from onprem.v1 import agents_pb2, files_pb2, files_pb2_grpc
from tools.bench.common import peak_rss_mib, rss_mib
from tools.cluster import AgentProcess, ControlPlaneProcess, bearer, operator_channel, wait_for_agent_state

GROUP = "e2e-files"
PIECE = 256 * 1024
GiB = 1024 ** 3

Cluster = tuple[ControlPlaneProcess, AgentProcess, str, Path]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("e2e-files")
    root = base / "folder"
    root.mkdir()
    cp = ControlPlaneProcess(base / "cp")
    cp.start()
    token = cp.admin_token()
    agent = AgentProcess(base / "agent", cp, profiles={"folders": {
        "drop": {"root": str(root)},
        "ro": {"root": str(root), "read_only": True},
        "small": {"root": str(root), "max_file_size": 1000, "write_patterns": ["*.csv"]},
    }})
    agent.enroll(GROUP)
    agent.start()
    yield cp, agent, token, root
    agent.stop()
    cp.stop()


async def active(cluster: Cluster) -> None:
    cp, agent, token, _ = cluster
    if agent.proc is not None and agent.proc.poll() is not None:
        agent.start()  # a test that killed it failed before starting it again: the others still run
    async with operator_channel(cp) as channel:
        await wait_for_agent_state(channel, token, agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)


def files_stub(channel: grpc.aio.Channel) -> files_pb2_grpc.FileServiceAsyncStub:
    return files_pb2_grpc.FileServiceStub(channel)  # type: ignore[return-value]


def temp_files(root: Path) -> list[Path]:
    return list(root.rglob(".onprem-tmp-*"))


async def upload(header: files_pb2.WriteHeader, pieces: AsyncIterator[bytes]) -> AsyncIterator[files_pb2.WriteRequest]:
    yield files_pb2.WriteRequest(header=header)
    async for piece in pieces:
        yield files_pb2.WriteRequest(data=piece)


async def pieces_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_sigkill_mid_upload_leaves_no_file_and_the_next_start_sweeps_the_temp_file(cluster: Cluster) -> None:
    cp, agent, token, root = cluster
    await active(cluster)
    header = files_pb2.WriteHeader(group=GROUP, profile="drop", path="inbox/report.bin", create_parents=True)
    async with operator_channel(cp) as channel:
        # Explicit writes, not a request iterator, so that nothing is written after the kill.
        call = files_stub(channel).Write(metadata=bearer(token))  # type: ignore[call-arg]
        await call.write(files_pb2.WriteRequest(header=header))
        for _ in range(2000):
            await call.write(files_pb2.WriteRequest(data=os.urandom(PIECE)))
            if temp_files(root):
                break
        assert temp_files(root), "the upload never reached the agent"
        agent.kill()  # SIGKILL: no handler of ours runs
        # No more writes: one racing the control plane's answer comes back as a bare INTERNAL
        # from gRPC's client core (the server's RST_STREAM after its trailers), not as the status.
        code = await asyncio.wait_for(call.code(), 20)
        assert code == grpc.StatusCode.UNAVAILABLE, await call.details()
    assert not (root / "inbox" / "report.bin").exists()
    assert len(temp_files(root)) == 1, "the killed upload's temp file is what the next start must remove"
    agent.start()
    await active(cluster)
    for _ in range(200):  # the sweep runs in the background, off the start-up path
        if not temp_files(root):
            break
        await asyncio.sleep(0.05)
    assert temp_files(root) == []
    assert not (root / "inbox" / "report.bin").exists()


async def test_operator_sees_precise_status_codes_with_profile_relative_paths(cluster: Cluster) -> None:
    cp, _, token, root = cluster
    await active(cluster)
    (root / "exists.csv").write_text("a,b")
    (root / "full").mkdir(exist_ok=True)
    (root / "full" / "x.txt").write_text("x")
    async with operator_channel(cp) as channel:
        stub = files_stub(channel)
        md = bearer(token)
        cases: list[tuple[Any, grpc.StatusCode, str]] = [
            (stub.Stat(files_pb2.StatRequest(group=GROUP, profile="drop", path="nope/none.txt"), metadata=md),
             grpc.StatusCode.NOT_FOUND, "nope/none.txt"),
            (stub.Write(upload(files_pb2.WriteHeader(group=GROUP, profile="drop", path="exists.csv"),
                               pieces_of(b"x")), metadata=md),
             grpc.StatusCode.ALREADY_EXISTS, "exists.csv"),
            (stub.Stat(files_pb2.StatRequest(group=GROUP, profile="drop", path="../etc/passwd"), metadata=md),
             grpc.StatusCode.PERMISSION_DENIED, "../etc/passwd"),
            (stub.Write(upload(files_pb2.WriteHeader(group=GROUP, profile="small", path="run.sh"),
                               pieces_of(b"x")), metadata=md),
             grpc.StatusCode.PERMISSION_DENIED, "run.sh"),
            (stub.Delete(files_pb2.DeleteRequest(group=GROUP, profile="drop", path="full"), metadata=md),
             grpc.StatusCode.FAILED_PRECONDITION, "full"),
            (stub.Delete(files_pb2.DeleteRequest(group=GROUP, profile="ro", path="exists.csv"), metadata=md),
             grpc.StatusCode.FAILED_PRECONDITION, "ro"),
            (stub.Write(upload(files_pb2.WriteHeader(group=GROUP, profile="small", path="big.csv"),
                               pieces_of(b"x" * 600, b"y" * 600)), metadata=md),
             grpc.StatusCode.RESOURCE_EXHAUSTED, "big.csv"),
        ]
        for call, code, named in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert (info.value.code(), named in (info.value.details() or "")) == (code, True), info.value.details()
            assert str(root) not in (info.value.details() or "")
    assert not (root / "big.csv").exists() and temp_files(root) == []


async def test_poll_through_the_operator_api_reports_a_new_file_once(cluster: Cluster) -> None:
    cp, _, token, root = cluster
    await active(cluster)
    (root / "watch").mkdir()
    async with operator_channel(cp) as channel:
        stub = files_stub(channel)
        request = files_pb2.PollRequest(group=GROUP, profile="drop", path="watch", settle_ms=50)
        first = await stub.Poll(request, metadata=bearer(token))
        assert list(first.entries) == []
        await stub.Write(upload(files_pb2.WriteHeader(group=GROUP, profile="drop", path="watch/new.csv"),
                                pieces_of(b"1,2\n")), metadata=bearer(token))
        await asyncio.sleep(0.2)
        request.marker = first.marker
        second = await stub.Poll(request, metadata=bearer(token))
        assert [(e.path, e.size) for e in second.entries] == [("watch/new.csv", 4)]
        request.marker = second.marker
        assert list((await stub.Poll(request, metadata=bearer(token))).entries) == []


async def test_a_2_gib_file_is_written_and_read_through_the_tunnel_with_flat_memory(cluster: Cluster) -> None:
    cp, agent, token, root = cluster
    await active(cluster)
    assert agent.proc is not None and cp.proc is not None
    before = rss_mib(agent.proc.pid), rss_mib(cp.proc.pid)
    size = 2 * GiB
    block = os.urandom(4 * 1024 * 1024)  # varied bytes, so that nothing along the way can compress them
    sent = hashlib.sha256()

    async def generated() -> AsyncIterator[bytes]:
        for offset in range(0, size, PIECE):
            piece = block[offset % len(block):][:PIECE]
            sent.update(piece)
            yield piece

    try:
        async with operator_channel(cp) as channel:
            stub = files_stub(channel)
            began = time.perf_counter()
            written = await stub.Write(
                upload(files_pb2.WriteHeader(group=GROUP, profile="drop", path="big/2gib.bin", create_parents=True),
                       generated()), metadata=bearer(token))
            write_s = time.perf_counter() - began
            assert (written.info.size, written.sha256) == (size, sent.hexdigest())
            received, trailer, began = hashlib.sha256(), "", time.perf_counter()
            count = 0
            async for part in stub.Read(files_pb2.ReadRequest(group=GROUP, profile="drop", path="big/2gib.bin"),
                                        metadata=bearer(token)):
                if part.HasField("data"):
                    received.update(part.data)
                    count += len(part.data)
                elif part.HasField("sha256"):
                    trailer = part.sha256
            read_s = time.perf_counter() - began
        assert count == size
        assert received.hexdigest() == trailer == sent.hexdigest()
        agent_peak, cp_peak = peak_rss_mib(agent.proc.pid), peak_rss_mib(cp.proc.pid)
        print(f"2 GiB: write {size / write_s / 1e6:.0f} MB/s, read {size / read_s / 1e6:.0f} MB/s; "
              f"peak RSS agent {agent_peak:.0f} MiB (RSS before {before[0]:.0f}), "
              f"control plane {cp_peak:.0f} MiB (RSS before {before[1]:.0f})")
        # 2 GiB went through each process twice; "flat" means a small multiple of the tunnel's windows.
        assert agent_peak < 200, f"agent peak RSS {agent_peak:.0f} MiB"
        assert cp_peak < 200, f"control plane peak RSS {cp_peak:.0f} MiB"
    finally:
        (root / "big" / "2gib.bin").unlink(missing_ok=True)



async def test_a_read_arrives_whole_in_messages_of_at_most_1_mib_when_its_chunks_are_merged(cluster: Cluster) -> None:
    # The control plane merges chunks that arrived together (FileService.Read, `_coalesced`); whether
    # any did depends on timing, so what is checked is what must hold either way.
    cp, _, token, root = cluster
    await active(cluster)
    data = os.urandom(6 * 1024 * 1024 + 123)
    (root / "merged.bin").write_bytes(data)
    sizes: list[int] = []
    received = bytearray()
    digest = ""
    async with operator_channel(cp) as channel:
        async for part in files_stub(channel).Read(files_pb2.ReadRequest(group=GROUP, profile="ro", path="merged.bin"),
                                                   metadata=bearer(token)):
            if part.WhichOneof("part") == "data":
                sizes.append(len(part.data))
                received += part.data
            elif part.WhichOneof("part") == "sha256":
                digest = part.sha256
    assert bytes(received) == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert 0 < max(sizes) <= 1024 * 1024
