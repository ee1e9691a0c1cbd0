"""SIGKILL of the agent in the middle of work: a streamed query and an upload.

No handler of the agent runs on SIGKILL. The operator must get UNAVAILABLE by itself (no hang), what
reached it must be intact, nothing half-written may appear at the target path, and the restarted
agent must clean up after the dead one and serve again.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from onprem.v1 import files_pb2
from tests.faults.support import (
    ACTIVE,
    MANY_ROWS_SQLITE,
    cluster,
    error_of,
    names_in,
    query,
    rows_of,
    sync_write,
    temp_files,
    until,
    wait_state,
)
from tools.cluster import AgentProcess, ControlPlaneProcess, bearer, database_stub, operator_channel

GROUP = "fault-kill"
PIECE = 256 * 1024

Site = tuple[ControlPlaneProcess, AgentProcess, str, Path]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    db = tmp_path / "site.db"
    sqlite3.connect(db).close()
    root = tmp_path / "folder"
    root.mkdir()
    profiles = {"databases": {"lite": {"url": f"sqlite:///{db}"}}, "folders": {"drop": {"root": str(root)}}}
    with cluster(tmp_path, profiles, GROUP) as (cp, agent, token):
        yield cp, agent, token, root


async def test_sigkill_mid_stream_fails_the_query_unavailable_after_an_intact_prefix_and_the_restarted_agent_serves(
    site: Site,
) -> None:
    cp, agent, token, _ = site
    await wait_state(cp, token, agent.agent_id, ACTIVE)
    received: list[int] = []
    async with operator_channel(cp) as channel:
        call = database_stub(channel).Query(query(GROUP, "lite", MANY_ROWS_SQLITE, rows=5_000_000),
                                            metadata=bearer(token))

        async def read_all() -> None:
            async for response in call:
                if response.HasField("rows"):
                    received.extend(response.rows.columns[0].int64_values)
                    if len(received) >= 20_000 and agent.proc is not None and agent.proc.poll() is None:
                        agent.kill()  # mid-stream: rows have reached the operator, more were coming

        failure = await error_of(read_all())
    assert failure.code == grpc.StatusCode.UNAVAILABLE, failure
    assert "was lost after part of the result was sent" in failure.details
    # What reached the operator before the kill is whole and in order: ids 1..n, no gap, no repeat.
    assert len(received) >= 20_000
    assert received == list(range(1, len(received) + 1))
    agent.start()
    await wait_state(cp, token, agent.agent_id, ACTIVE)
    assert await rows_of(cp, token, query(GROUP, "lite", MANY_ROWS_SQLITE, rows=30_000)) == 30_000


@pytest.mark.parametrize("existing", [None, b"the original contents\n"], ids=["new-file", "overwrite"])
async def test_sigkill_mid_write_leaves_no_half_written_file_and_the_restart_sweeps_the_temp_file(
    site: Site, existing: bytes | None,
) -> None:
    cp, agent, token, root = site
    await wait_state(cp, token, agent.agent_id, ACTIVE)
    target = root / "inbox" / "report.bin"
    target.parent.mkdir()
    if existing is not None:
        target.write_bytes(existing)
    mode = files_pb2.WRITE_MODE_OVERWRITE if existing is not None else files_pb2.WRITE_MODE_CREATE
    header = files_pb2.WriteHeader(group=GROUP, profile="drop", path="inbox/report.bin", mode=mode)
    sent = 0

    def endless() -> Iterator[bytes]:
        nonlocal sent
        while True:  # the operator keeps sending while the agent dies under it
            yield os.urandom(PIECE)
            sent += PIECE
            if sent >= 8 * PIECE and temp_files(root) and agent.proc is not None and agent.proc.poll() is None:
                agent.kill()  # 2 MiB are on the agent's disk, in its temp file
            time.sleep(0.005)

    code, details, _ = await asyncio.to_thread(sync_write, cp, token, header, endless())
    assert code == grpc.StatusCode.UNAVAILABLE, details
    # Nothing half-written at the target: absent, or exactly what it was.
    if existing is None:
        assert not target.exists()
    else:
        assert target.read_bytes() == existing
    assert len(temp_files(root)) == 1  # the dead agent's; its restart must remove it
    agent.start()
    await wait_state(cp, token, agent.agent_id, ACTIVE)
    await until(lambda: not temp_files(root), 10, "the sweep of the dead upload's temp file")
    assert names_in(root) == (["inbox"] if existing is None else ["inbox", "inbox/report.bin"])
    # And the same upload, done again, lands whole.
    again = files_pb2.WriteHeader(group=GROUP, profile="drop", path="inbox/report.bin",
                                  mode=files_pb2.WRITE_MODE_OVERWRITE)
    code, details, done = await asyncio.to_thread(sync_write, cp, token, again, iter([b"complete\n"]))
    assert code == grpc.StatusCode.OK, details
    assert done is not None and done.info.size == len(b"complete\n")
    assert target.read_bytes() == b"complete\n"
