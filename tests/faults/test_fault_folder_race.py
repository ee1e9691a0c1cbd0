"""The long folder race (`make test-faults`): a local process swaps folders and symlinks inside a folder profile's
root while every folder operation runs against it 10,000 times, through the handler with each way of resolving
(openat2, and the O_NOFOLLOW walk used where the kernel has none), then through the real processes. Nothing
outside the root is read, listed, created, changed or deleted, and every refusal is PERMISSION_DENIED or
NOT_FOUND. tests/support/folder_race.py has the trees and the checks; tests/agent/handlers/folders/test_race.py is the short run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from onprem.agent.handlers.folders import FolderHandler, paths
from onprem.agent.profiles import FolderProfile
from tests.faults.support import ACTIVE, cluster, log_of, wait_state
from tests.support.folder_race import (
    OPERATIONS,
    GrpcOps,
    HandlerOps,
    Report,
    Tree,
    build,
    hammer,
    outside_snapshot,
    swapper,
)
from tools.cluster import operator_channel

ATTEMPTS = 10_000  # per operation
E2E_ATTEMPTS = 500  # per operation, through the control plane and the agent


def assert_confined(report: Report, tree: Tree, before: dict[str, tuple[str, bytes]]) -> None:
    assert report.violations == [], report.summary()
    assert report.unexpected_codes() == {}, report.summary()
    assert outside_snapshot(tree) == before
    for op in OPERATIONS:
        assert report.outcomes[op]["OK"] > 0, f"{op} never succeeded: {report.summary()}"
        assert sum(report.outcomes[op].values()) > report.outcomes[op]["OK"], f"{op} never refused: {report.summary()}"


@pytest.mark.parametrize("resolver", ["openat2", "walk"])
async def test_ten_thousand_attempts_per_operation_never_leave_the_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resolver: str) -> None:
    if resolver == "walk":
        monkeypatch.setattr(paths, "_openat2_available", False)
    elif not paths.openat2_supported():
        pytest.skip("this kernel has no openat2")
    tree = build(tmp_path)
    handler = FolderHandler({"f": FolderProfile(name="f", root=str(tree.root))}, sweep=False)
    before = outside_snapshot(tree)
    began = time.monotonic()
    try:
        with swapper(tree):
            report = await hammer(HandlerOps(handler, "f"), tree, ATTEMPTS)
    finally:
        tree.close()
    print(f"\n{resolver}: {ATTEMPTS} attempts per operation in {time.monotonic() - began:.0f} s; {report.summary()}")
    assert_confined(report, tree, before)


async def test_the_race_through_the_real_processes_never_leaves_the_root(tmp_path: Path) -> None:
    tree = build(tmp_path / "site")
    group = "race"
    try:
        with cluster(tmp_path, {"folders": {"race": {"root": str(tree.root)}}}, group) as (cp, agent, token):
            await wait_state(cp, token, agent.agent_id, ACTIVE)
            before = outside_snapshot(tree)
            logged_before = len(log_of(agent))
            began = time.monotonic()
            async with operator_channel(cp) as channel:
                with swapper(tree):
                    report = await hammer(GrpcOps(channel, token, group, "race"), tree, E2E_ATTEMPTS)
            print(f"\nend to end: {E2E_ATTEMPTS} attempts per operation in {time.monotonic() - began:.0f} s; "
                  f"{report.summary()}")
            assert_confined(report, tree, before)
            logged = log_of(agent)[logged_before:]
            assert "Traceback" not in logged
            assert str(tmp_path) not in logged
    finally:
        tree.close()
