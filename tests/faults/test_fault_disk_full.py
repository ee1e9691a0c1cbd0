"""A disk that fills during an upload: a 1 MiB tmpfs mounted as a folder profile's root.

The operator gets RESOURCE_EXHAUSTED, the target path stays empty, no temp file is left behind, and
once there is room again the agent writes files there as before.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from onprem.v1 import files_pb2
from tests.faults.support import ACTIVE, cluster, names_in, sync_write, temp_files, wait_state
from tools.cluster import AgentProcess, ControlPlaneProcess

GROUP = "fault-disk"
PIECE = 128 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def site(tmp_path: Path, small_disk: Path) -> Iterator[tuple[ControlPlaneProcess, AgentProcess, str]]:
    with cluster(tmp_path, {"folders": {"small": {"root": str(small_disk)}}}, GROUP) as running:
        yield running  # stopped before the tmpfs is unmounted (fixtures end in reverse order)


def pieces(total: int) -> Iterator[bytes]:
    for _ in range(0, total, PIECE):
        yield os.urandom(PIECE)


async def test_a_disk_that_fills_mid_upload_gives_resource_exhausted_and_leaves_no_partial_file(
    site: tuple[ControlPlaneProcess, AgentProcess, str], small_disk: Path,
) -> None:
    cp, agent, token = site
    await wait_state(cp, token, agent.agent_id, ACTIVE)
    header = files_pb2.WriteHeader(group=GROUP, profile="small", path="big.bin")
    code, details, _ = await asyncio.to_thread(sync_write, cp, token, header, pieces(4 * 1024 * 1024))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "big.bin" in details and str(small_disk) not in details
    assert names_in(small_disk) == [], "a partial file or a temp file was left on the full disk"
    assert temp_files(small_disk) == []
    # The space came back with the temp file: a file that fits is written whole.
    fits = files_pb2.WriteHeader(group=GROUP, profile="small", path="fits.bin")
    code, details, done = await asyncio.to_thread(sync_write, cp, token, fits, pieces(512 * 1024))
    assert code == grpc.StatusCode.OK, details
    assert done is not None and done.info.size == 512 * 1024
    assert names_in(small_disk) == ["fits.bin"]
    assert len((small_disk / "fits.bin").read_bytes()) == 512 * 1024
