"""Paged listings and polls of FolderHandler on real folders: order, scale, and never missing a file."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from onprem.agent.handlers.base import RequestContext
from onprem.agent.handlers.folders import FolderHandler
from onprem.agent.handlers.folders.scan import MAX_PAGE_SIZE
from onprem.agent.profiles import FolderProfile
from onprem.tunnel.errors import FailedPrecondition, InvalidArgument
from onprem.v1 import files_pb2, tunnel_pb2

SETTLE_MS = 50


def handler_for(root: Path, **kw: object) -> FolderHandler:
    return FolderHandler({"f": FolderProfile(name="f", root=str(root.resolve()), **kw)},  # type: ignore[arg-type]
                         sweep=False)


async def call(handler: FolderHandler, **op: object) -> tunnel_pb2.ResponseChunk:
    file_op = files_pb2.FileOp(**op)  # type: ignore[arg-type]
    [chunk] = [c async for c in handler.handle(file_op, RequestContext(request_id=1, body=None))]
    return chunk


async def list_all(handler: FolderHandler, page_size: int, **kw: object) -> list[str]:
    seen: list[str] = []
    token = ""
    while True:
        chunk = await call(handler, list=files_pb2.ListRequest(profile="f", page_size=page_size, page_token=token,
                                                                **kw))  # type: ignore[arg-type]
        seen += [e.path for e in chunk.list.entries]
        token = chunk.list.next_page_token
        if not token:
            return seen


async def poll(handler: FolderHandler, marker: str = "", **kw: object) -> files_pb2.PollResponse:
    kw.setdefault("settle_ms", SETTLE_MS)
    chunk = await call(handler, poll=files_pb2.PollRequest(profile="f", marker=marker, **kw))  # type: ignore[arg-type]
    return chunk.poll


async def settle() -> None:
    await asyncio.sleep(2 * SETTLE_MS / 1000)


# --- listing -----------------------------------------------------------------------------------------


@pytest.fixture
def awkward_tree(tmp_path: Path) -> Path:
    """Names whose full-path order differs from per-folder depth-first order ("a-b" between "a" and "a/x")."""
    root = tmp_path / "root"
    for folder in ["a/x", "a/y", "b/c/d", "b/c-d"]:
        (root / folder).mkdir(parents=True)
    for file in ["a/y/z", "a-b", "a.txt", "a0", "b/c/d/e", "b-", "zz", "a/x-1", "a/x/deep"]:
        (root / file).write_text(file)
    (root / ".onprem-tmp-0123456789abcdef").write_text("an upload in progress")
    os.mkfifo(root / "b" / "pipe")
    (root / "b" / "out").symlink_to("/etc")
    return root


def sorted_tree(root: Path) -> list[str]:
    """Every listable path under `root`, by brute force."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if not p.name.startswith(".onprem-tmp-") and p.name not in ("pipe", "out"))


@pytest.mark.parametrize("page_size", [1, 2, 3, 5, 1000])
async def test_recursive_pages_concatenate_to_the_full_sorted_listing(awkward_tree: Path, page_size: int) -> None:
    expected = sorted_tree(awkward_tree)
    assert await list_all(handler_for(awkward_tree), page_size, recursive=True) == expected


async def test_listing_hides_uploads_in_progress_fifos_and_links_out(awkward_tree: Path) -> None:
    names = await list_all(handler_for(awkward_tree), 1000, path="b", recursive=False)
    assert names == ["b/c", "b/c-d"]
    assert ".onprem-tmp-0123456789abcdef" not in await list_all(handler_for(awkward_tree), 1000)


async def test_list_of_a_file_is_failed_precondition(awkward_tree: Path) -> None:
    with pytest.raises(FailedPrecondition):
        await call(handler_for(awkward_tree), list=files_pb2.ListRequest(profile="f", path="a.txt"))


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder in RAM when the machine has /dev/shm: making 100,000 files there takes a second, not four."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else str(tmp_path)
    with tempfile.TemporaryDirectory(dir=base, prefix="onprem-test-") as folder:
        yield Path(folder)


async def test_pages_of_a_flat_folder_of_100k_entries_resume_at_their_token_and_paging_is_complete(fast_dir: Path) -> None:
    root = fast_dir
    names = [f"file-{i:06d}.dat" for i in range(100_000)]

    def make() -> None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in names:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        finally:
            os.close(fd)

    await asyncio.to_thread(make)
    handler = handler_for(root)
    # How cheap a page is belongs to `make bench`, not to a timed assertion here.
    first = await call(handler, list=files_pb2.ListRequest(profile="f", page_size=1000))
    middle = await call(handler, list=files_pb2.ListRequest(profile="f", page_size=1000,
                                                            page_token="file-050000.dat"))
    assert [e.path for e in first.list.entries] == names[:1000]
    assert [e.path for e in middle.list.entries] == names[50_001:51_001]
    assert await list_all(handler, MAX_PAGE_SIZE) == names


# --- polls -------------------------------------------------------------------------------------------


async def test_first_poll_reports_settled_files_then_nothing_until_one_changes(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("a")
    (tmp_path / "b.csv").write_text("b")
    handler = handler_for(tmp_path)
    await settle()
    first = await poll(handler)
    assert sorted(e.path for e in first.entries) == ["a.csv", "b.csv"]
    keys = [(e.changed_at.ToNanoseconds(), e.path) for e in first.entries]
    assert keys == sorted(keys)
    assert not first.has_more
    again = await poll(handler, first.marker)
    assert list(again.entries) == []
    (tmp_path / "a.csv").write_text("a, changed")
    await settle()
    changed = await poll(handler, again.marker)
    assert [e.path for e in changed.entries] == ["a.csv"]
    assert list((await poll(handler, changed.marker)).entries) == []


async def test_poll_reports_a_file_with_an_old_mtime_moved_into_the_folder(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    handler = handler_for(root)
    await settle()
    marker = (await poll(handler)).marker
    (elsewhere / "old.csv").write_text("made long ago")
    os.utime(elsewhere / "old.csv", (1_000_000_000, 1_000_000_000))  # as `cp -p` or `tar x` would leave it
    os.rename(elsewhere / "old.csv", root / "old.csv")
    await settle()
    assert [e.path for e in (await poll(handler, marker)).entries] == ["old.csv"]


async def test_poll_waits_until_a_file_being_written_has_settled(tmp_path: Path) -> None:
    handler = handler_for(tmp_path)
    with (tmp_path / "growing.csv").open("w") as f:
        for _ in range(5):
            f.write("row\n")
            f.flush()
            assert list((await poll(handler, settle_ms=400)).entries) == []
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert [e.size for e in (await poll(handler, settle_ms=400)).entries] == [20]


async def test_poll_under_concurrent_writes_delivers_every_file_exactly_once(tmp_path: Path) -> None:
    """Files created in bursts (many with the same change time) while a caller polls in small batches."""
    root, staging = tmp_path / "root", tmp_path / "staging"
    root.mkdir()
    staging.mkdir()
    handler = handler_for(root)
    created: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 400:
            for _ in range(8):  # a burst: these mostly share one coarse change time
                name = f"f{(i * 7919) % 1000:03d}-{i}.csv"  # names not in creation order
                # Written aside and renamed in, as a well-behaved producer does: a file must not be
                # seen half-written however long this thread waits for the GIL between two writes.
                (staging / name).write_text(str(i))
                os.rename(staging / name, root / name)
                created.append(name)
                i += 1
            time.sleep(0.003)

    thread = threading.Thread(target=writer)
    thread.start()
    seen: list[str] = []
    marker = ""
    try:
        deadline = time.monotonic() + 20
        while thread.is_alive() and time.monotonic() < deadline:
            result = await poll(handler, marker, max_files=7)
            seen += [e.path for e in result.entries]
            marker = result.marker
            await asyncio.sleep(0.005)
    finally:
        stop.set()
        thread.join()
    await settle()
    while True:
        result = await poll(handler, marker, max_files=7)
        seen += [e.path for e in result.entries]
        marker = result.marker
        if not result.has_more:
            break
    assert len(seen) == len(set(seen)), f"reported twice: {sorted({n for n in seen if seen.count(n) > 1})}"
    assert set(created) - set(seen) == set(), "missed"
    assert sorted(seen) == sorted(created)


async def test_poll_pages_with_has_more_in_change_order(tmp_path: Path) -> None:
    for i in range(10):
        (tmp_path / f"{9 - i}.txt").write_text("x")
    handler = handler_for(tmp_path)
    await settle()
    got: list[files_pb2.FileInfo] = []
    marker = ""
    for _ in range(10):
        result = await poll(handler, marker, max_files=3)
        got += result.entries
        marker = result.marker
        if not result.has_more:
            break
    keys = [(e.changed_at.ToNanoseconds(), e.path) for e in got]
    assert keys == sorted(keys) and len(keys) == 10


async def test_poll_filters_by_glob_recursion_and_read_patterns_and_hides_temp_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for rel in ["a.csv", "a.txt", "sub/b.csv", "secret.csv.bak", ".onprem-tmp-0123456789abcdef"]:
        (tmp_path / rel).write_text(rel)
    await settle()
    flat = await poll(handler_for(tmp_path), glob="*.csv")
    assert [e.path for e in flat.entries] == ["a.csv"]
    deep = await poll(handler_for(tmp_path, read_patterns=("*.csv", "*.txt")), recursive=True)
    assert sorted(e.path for e in deep.entries) == ["a.csv", "a.txt", "sub/b.csv"]


@pytest.mark.parametrize("marker", ["nonsense", "eyJ2IjoyfQ", "e30", "!!!"])
async def test_poll_with_a_marker_it_did_not_make_is_invalid_argument(tmp_path: Path, marker: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        await poll(handler_for(tmp_path), marker)
    assert info.value.reason == "INVALID_MARKER"


async def test_poll_of_a_file_is_failed_precondition(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("a")
    with pytest.raises(FailedPrecondition):
        await poll(handler_for(tmp_path), path="a.csv")
