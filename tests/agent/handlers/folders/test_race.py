"""No race leaves a folder profile's root: a local process swaps folders and symlinks inside it while every folder
operation runs against it (the short run; tests/faults/test_fault_folder_race.py runs 10,000 attempts per
operation). See tests/support/folder_race.py for the trees and what each result is checked for.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from onprem.agent.handlers.folders import FolderHandler, paths
from onprem.agent.profiles import FolderProfile
from tests.support.folder_race import OPERATIONS, HandlerOps, build, hammer, outside_snapshot, swapper

ATTEMPTS = 300


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of resolving: the kernel's openat2, and the O_NOFOLLOW walk used where openat2 is missing."""
    if request.param == "walk":
        monkeypatch.setattr(paths, "_openat2_available", False)
    elif not paths.openat2_supported():
        pytest.skip("this kernel has no openat2")
    return str(request.param)


async def test_no_folder_operation_leaves_the_root_while_a_local_process_swaps_symlinks_in(
        tmp_path: Path, resolver: str) -> None:
    tree = build(tmp_path)
    handler = FolderHandler({"f": FolderProfile(name="f", root=str(tree.root))}, sweep=False)
    before = outside_snapshot(tree)
    try:
        with swapper(tree):
            report = await hammer(HandlerOps(handler, "f"), tree, ATTEMPTS)
    finally:
        tree.close()
    assert report.violations == [], report.summary()
    assert report.unexpected_codes() == {}, report.summary()
    assert outside_snapshot(tree) == before
    # The race really ran: every operation both succeeded and was refused.
    for op in OPERATIONS:
        assert report.outcomes[op]["OK"] > 0, f"{op} never succeeded: {report.summary()}"
        assert sum(report.outcomes[op].values()) > report.outcomes[op]["OK"], f"{op} never refused: {report.summary()}"
