"""FolderHandler on a real temporary folder, including a corpus of hostile paths."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from onprem.agent.handlers.base import RequestContext
from onprem.agent.handlers.folders import FolderHandler
from onprem.agent.handlers.folders import handler as files_module
from onprem.agent.handlers.folders import write as files_write
from onprem.agent.profiles import FolderProfile
from onprem.tunnel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RequestError,
)
from onprem.v1 import files_pb2, profiles_pb2, tunnel_pb2

FT = files_pb2.FileType


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/root is the profile's root; tmp/outside must never be touched."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "docs" / "deep").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (root / "a.txt").write_text("alpha")
    (root / "b.csv").write_text("x,y\n1,2\n")
    (root / "docs" / "readme.md").write_text("# readme")
    (root / "docs" / "deep" / "c.csv").write_text("c")
    (root / "etc_link").symlink_to("/etc")
    (root / "escape").symlink_to(outside)
    (root / "escape_file").symlink_to(outside / "secret.txt")
    (root / "chain1").symlink_to("chain2")
    (root / "chain2").symlink_to("docs/up")
    (root / "docs" / "up").symlink_to("../../outside")
    (root / "inside_link").symlink_to("docs")
    return tmp_path


@pytest.fixture
def handler(tree: Path) -> FolderHandler:
    return FolderHandler(
        {
            "f": FolderProfile(name="f", root=str(tree / "root")),
            "ro": FolderProfile(name="ro", root=str(tree / "root"), read_only=True),
        }
    )


def req(**op: object) -> tunnel_pb2.RequestStart:
    return tunnel_pb2.RequestStart(file_op=files_pb2.FileOp(**op))  # type: ignore[arg-type]


async def body_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def run(
    handler: FolderHandler, start: tunnel_pb2.RequestStart, body: AsyncIterator[bytes] | None = None,
    max_chunk_bytes: int = 256 * 1024,
) -> list[tunnel_pb2.ResponseChunk]:
    context = RequestContext(request_id=1, body=body, max_chunk_bytes=max_chunk_bytes)
    return [chunk async for chunk in handler.handle(start.file_op, context)]


def write_req(path: str, mode: int = files_pb2.WRITE_MODE_CREATE, profile: str = "f", **kw: object) -> tunnel_pb2.RequestStart:
    return req(write=files_pb2.WriteHeader(profile=profile, path=path, mode=mode, **kw))  # type: ignore[arg-type]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            found[str(full.relative_to(folder))] = None if full.is_dir() else full.read_bytes()
    return found


# --- hostile paths ---------------------------------------------------------------------------------

HOSTILE = [
    "..", "../", "../..", "../outside/secret.txt", "a/../../x", "docs/../../outside", "./..", "docs/./../..",
    "docs/deep/../../..", "etc_link/..",
    "/etc/passwd", "/", "//etc", "/tmp", "///",
    "a\x00b", "docs/\x00", "\x00",
    "..\\outside", "docs\\..\\..\\x", "\\etc\\passwd", "C:\\x", "C:/x", "c:x", "Z:",
    "%2e%2e/outside", "%2E%2E/%2E%2E/etc", "..%2foutside", "%2fetc%2fpasswd", "docs%5c..", "%00", "a%2Fb",
    "x" * 256, "a/" * 2100, "docs/" + "y" * 300,
    "escape", "escape/secret.txt", "escape/new.txt", "escape/sub/dir", "escape_file", "chain1", "chain1/secret.txt",
    "docs/up", "docs/up/secret.txt", "inside_link/up/secret.txt",
    "line\nbreak", "carriage\rreturn", "del\x7f",
]
# Only read-only operations get the links into /etc: a bug there must not be able to write to it.
READ_ONLY_EXTRA = ["etc_link", "etc_link/passwd", "etc_link/", "etc_link/./hostname"]

OPERATIONS: dict[str, Callable[[str], tunnel_pb2.RequestStart]] = {
    "list": lambda p: req(list=files_pb2.ListRequest(profile="f", path=p, recursive=True)),
    "stat": lambda p: req(stat=files_pb2.StatRequest(profile="f", path=p)),
    "read": lambda p: req(read=files_pb2.ReadRequest(profile="f", path=p)),
    "write": lambda p: write_req(p, files_pb2.WRITE_MODE_OVERWRITE, create_parents=True),
    "delete": lambda p: req(delete=files_pb2.DeleteRequest(profile="f", path=p, recursive=True)),
    "move_from": lambda p: req(move=files_pb2.MoveRequest(profile="f", path=p, destination_path="moved")),
    "move_to": lambda p: req(move=files_pb2.MoveRequest(profile="f", path="a.txt", destination_path=p, overwrite=True)),
    "make_directory": lambda p: req(make_directory=files_pb2.MakeDirectoryRequest(profile="f", path=p, parents=True)),
}


def test_hostile_corpus_is_large_enough() -> None:
    assert len(set(HOSTILE)) >= 40


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
async def test_hostile_paths_are_refused_and_touch_nothing_outside(
    handler: FolderHandler, tree: Path, operation: str
) -> None:
    paths = HOSTILE + (READ_ONLY_EXTRA if operation in ("list", "stat", "read") else [])
    outside_before, root_before = snapshot(tree / "outside"), snapshot(tree / "root")
    wrong = []
    for path in paths:
        try:
            await run(handler, OPERATIONS[operation](path), body_of(b"pwned"))
        except (PermissionDenied, InvalidArgument) as exc:
            assert str(tree) not in exc.message, f"{path!r}: message shows the absolute path"
            continue
        except RequestError as exc:
            wrong.append((path, type(exc).__name__, exc.message))
            continue
        wrong.append((path, "succeeded", ""))
    assert wrong == []
    assert snapshot(tree / "outside") == outside_before
    assert snapshot(tree / "root") == root_before


async def test_dot_dot_gives_path_outside_root_reason(handler: FolderHandler) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, req(read=files_pb2.ReadRequest(profile="f", path="docs/../../outside/secret.txt")))
    assert info.value.reason == "PATH_OUTSIDE_ROOT"


async def test_a_path_through_a_symlink_gives_symlink_not_followed_reason(handler: FolderHandler) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, req(read=files_pb2.ReadRequest(profile="f", path="escape/secret.txt")))
    assert info.value.reason == "SYMLINK_NOT_FOLLOWED"
    assert "escape/secret.txt" in info.value.message


# --- list and stat ---------------------------------------------------------------------------------


async def test_list_root_is_sorted_and_leaves_symlinks_out(handler: FolderHandler) -> None:
    [chunk] = await run(handler, req(list=files_pb2.ListRequest(profile="f")))
    entries = {e.path: e.type for e in chunk.list.entries}
    assert entries == {"a.txt": FT.FILE_TYPE_FILE, "b.csv": FT.FILE_TYPE_FILE, "docs": FT.FILE_TYPE_DIRECTORY}
    assert [e.path for e in chunk.list.entries] == sorted(entries)
    assert chunk.list.next_page_token == ""


async def test_list_recursive_with_glob(handler: FolderHandler) -> None:
    [chunk] = await run(handler, req(list=files_pb2.ListRequest(profile="f", recursive=True, glob="*.csv")))
    assert [e.path for e in chunk.list.entries] == ["b.csv", "docs/deep/c.csv"]
    assert chunk.list.entries[0].size == 8
    assert chunk.list.entries[0].name == "b.csv"


async def test_list_pages_with_opaque_token(handler: FolderHandler) -> None:
    seen: list[str] = []
    token = ""
    for _ in range(10):
        [chunk] = await run(handler, req(list=files_pb2.ListRequest(profile="f", recursive=True, page_size=2,
                                                                     page_token=token)))
        assert len(chunk.list.entries) <= 2
        seen += [e.path for e in chunk.list.entries]
        token = chunk.list.next_page_token
        if not token:
            break
    assert seen == ["a.txt", "b.csv", "docs", "docs/deep", "docs/deep/c.csv", "docs/readme.md"]


async def test_list_of_a_file_is_failed_precondition(handler: FolderHandler) -> None:
    with pytest.raises(FailedPrecondition):
        await run(handler, req(list=files_pb2.ListRequest(profile="f", path="a.txt")))


async def test_stat_file_folder_and_root(handler: FolderHandler) -> None:
    [f] = await run(handler, req(stat=files_pb2.StatRequest(profile="f", path="docs/readme.md")))
    assert (f.stat.info.path, f.stat.info.name, f.stat.info.type, f.stat.info.size) == (
        "docs/readme.md", "readme.md", FT.FILE_TYPE_FILE, 8)
    assert f.stat.info.modified_at.seconds > 0
    [d] = await run(handler, req(stat=files_pb2.StatRequest(profile="f", path="docs/")))
    assert (d.stat.info.path, d.stat.info.type, d.stat.info.size) == ("docs", FT.FILE_TYPE_DIRECTORY, 0)
    [r] = await run(handler, req(stat=files_pb2.StatRequest(profile="f", path=".")))
    assert r.stat.info.type == FT.FILE_TYPE_DIRECTORY


async def test_missing_path_is_not_found_naming_only_the_relative_path(handler: FolderHandler, tree: Path) -> None:
    with pytest.raises(NotFound) as info:
        await run(handler, req(stat=files_pb2.StatRequest(profile="f", path="docs/none.txt")))
    assert "'docs/none.txt'" in info.value.message
    assert str(tree) not in info.value.message


async def test_unknown_profile_is_not_found(handler: FolderHandler) -> None:
    with pytest.raises(NotFound, match="folder profile 'zz' is not configured"):
        await run(handler, req(stat=files_pb2.StatRequest(profile="zz", path="a.txt")))


async def test_fifo_is_refused_not_opened(handler: FolderHandler, tree: Path) -> None:
    os.mkfifo(tree / "root" / "pipe")
    with pytest.raises(PermissionDenied):
        await asyncio.wait_for(run(handler, req(read=files_pb2.ReadRequest(profile="f", path="pipe"))), 2)
    with pytest.raises(PermissionDenied):
        await run(handler, req(stat=files_pb2.StatRequest(profile="f", path="pipe")))


# --- read --------------------------------------------------------------------------------------------


async def test_read_streams_info_bounded_chunks_and_sha256(handler: FolderHandler, tree: Path) -> None:
    data = os.urandom(100_000)
    (tree / "root" / "big.bin").write_bytes(data)
    chunks = await run(handler, req(read=files_pb2.ReadRequest(profile="f", path="big.bin")), max_chunk_bytes=8192)
    parts = [c.read for c in chunks]
    assert parts[0].info.size == 100_000
    assert parts[-1].sha256 == hashlib.sha256(data).hexdigest()
    assert all(c.ByteSize() <= 8192 for c in chunks)
    assert b"".join(p.data for p in parts[1:-1]) == data
    assert len(parts) > 10


async def test_read_honours_offset_and_length(handler: FolderHandler) -> None:
    chunks = await run(handler, req(read=files_pb2.ReadRequest(profile="f", path="a.txt", offset=1, length=3)))
    assert b"".join(c.read.data for c in chunks) == b"lph"
    assert chunks[-1].read.sha256 == hashlib.sha256(b"lph").hexdigest()


async def test_read_through_a_link_that_stays_inside_the_root_is_refused_too(handler: FolderHandler) -> None:
    # Whether a link stays inside can only be known by following it, which a racing local user exploits.
    with pytest.raises(PermissionDenied) as info:
        await run(handler, req(read=files_pb2.ReadRequest(profile="f", path="inside_link/readme.md")))
    assert info.value.reason == "SYMLINK_NOT_FOLLOWED"


async def test_read_of_folder_is_failed_precondition(handler: FolderHandler) -> None:
    with pytest.raises(FailedPrecondition):
        await run(handler, req(read=files_pb2.ReadRequest(profile="f", path="docs")))


# --- write -------------------------------------------------------------------------------------------


def temp_files(folder: Path) -> list[Path]:
    return list(folder.rglob(".onprem-tmp-*"))


async def test_write_creates_file_atomically_with_checksum(handler: FolderHandler, tree: Path) -> None:
    digest = hashlib.sha256(b"hello world").hexdigest()
    [chunk] = await run(handler, write_req("new.txt", expected_sha256=digest), body_of(b"hello ", b"world"))
    assert chunk.write.sha256 == digest
    assert (chunk.write.info.path, chunk.write.info.size) == ("new.txt", 11)
    assert (tree / "root" / "new.txt").read_bytes() == b"hello world"
    assert temp_files(tree) == []


async def test_write_without_body_creates_empty_file(handler: FolderHandler, tree: Path) -> None:
    await run(handler, write_req("empty.txt"), None)
    assert (tree / "root" / "empty.txt").read_bytes() == b""


async def test_write_create_refuses_existing_file(handler: FolderHandler, tree: Path) -> None:
    with pytest.raises(AlreadyExists):
        await run(handler, write_req("a.txt"), body_of(b"new"))
    assert (tree / "root" / "a.txt").read_text() == "alpha"
    assert temp_files(tree) == []


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "link-fallback"])
async def test_write_create_never_replaces_a_file_with_or_without_renameat2(
        handler: FolderHandler, tree: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool) -> None:
    if not renameat2:
        monkeypatch.setattr(files_write, "rename_noreplace", lambda *args: False)
    await run(handler, write_req("fresh.txt"), body_of(b"one"))
    with pytest.raises(AlreadyExists):
        await run(handler, write_req("fresh.txt"), body_of(b"two"))
    assert (tree / "root" / "fresh.txt").read_bytes() == b"one"
    assert os.stat(tree / "root" / "fresh.txt").st_nlink == 1
    assert temp_files(tree) == []


async def test_write_overwrite_replaces(handler: FolderHandler, tree: Path) -> None:
    await run(handler, write_req("a.txt", files_pb2.WRITE_MODE_OVERWRITE), body_of(b"new"))
    assert (tree / "root" / "a.txt").read_text() == "new"


async def test_write_keep_both_numbers_the_name(handler: FolderHandler, tree: Path) -> None:
    [one] = await run(handler, write_req("b.csv", files_pb2.WRITE_MODE_KEEP_BOTH), body_of(b"1"))
    [two] = await run(handler, write_req("b.csv", files_pb2.WRITE_MODE_KEEP_BOTH), body_of(b"2"))
    assert (one.write.info.path, two.write.info.path) == ("b (1).csv", "b (2).csv")
    assert (tree / "root" / "b (2).csv").read_text() == "2"
    assert (tree / "root" / "b.csv").read_text() == "x,y\n1,2\n"


async def test_write_checksum_mismatch_leaves_nothing_behind(handler: FolderHandler, tree: Path) -> None:
    with pytest.raises(FailedPrecondition) as info:
        await run(handler, write_req("bad.txt", expected_sha256="0" * 64), body_of(b"data"))
    assert info.value.reason == "CHECKSUM_MISMATCH"
    assert not (tree / "root" / "bad.txt").exists()
    assert temp_files(tree) == []


async def test_write_needs_parent_unless_create_parents(handler: FolderHandler, tree: Path) -> None:
    with pytest.raises(NotFound):
        await run(handler, write_req("x/y/z.txt"), body_of(b"z"))
    await run(handler, write_req("x/y/z.txt", create_parents=True), body_of(b"z"))
    assert (tree / "root" / "x" / "y" / "z.txt").read_text() == "z"


async def test_cancelled_upload_leaves_no_temp_file(handler: FolderHandler, tree: Path) -> None:
    gate = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"first part"
        await gate.wait()
        yield b"never"

    task = asyncio.create_task(run(handler, write_req("slow.txt"), stalled()))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if temp_files(tree):
            break
    assert temp_files(tree), "the upload never started"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert temp_files(tree) == []
    assert not (tree / "root" / "slow.txt").exists()


# --- delete, move, mkdir ---------------------------------------------------------------------------


async def test_delete_file_and_folders(handler: FolderHandler, tree: Path) -> None:
    [chunk] = await run(handler, req(delete=files_pb2.DeleteRequest(profile="f", path="a.txt")))
    assert chunk.delete.info.path == "a.txt"
    assert not (tree / "root" / "a.txt").exists()
    with pytest.raises(FailedPrecondition) as info:
        await run(handler, req(delete=files_pb2.DeleteRequest(profile="f", path="docs")))
    assert info.value.reason == "DIRECTORY_NOT_EMPTY"
    await run(handler, req(delete=files_pb2.DeleteRequest(profile="f", path="docs", recursive=True)))
    assert not (tree / "root" / "docs").exists()
    assert (tree / "outside" / "secret.txt").exists()  # docs/up led there; rmtree did not follow it


async def test_delete_of_a_symlink_is_refused_and_removes_nothing(handler: FolderHandler, tree: Path) -> None:
    with pytest.raises(PermissionDenied) as info:
        await run(handler, req(delete=files_pb2.DeleteRequest(profile="f", path="inside_link", recursive=True)))
    assert info.value.reason == "SYMLINK_NOT_FOLLOWED"
    assert (tree / "root" / "inside_link").is_symlink()
    assert (tree / "root" / "docs" / "readme.md").exists()


async def test_recursive_delete_removes_a_symlink_inside_as_a_name_only(handler: FolderHandler, tree: Path) -> None:
    (tree / "root" / "docs" / "to_outside").symlink_to(tree / "outside")
    await run(handler, req(delete=files_pb2.DeleteRequest(profile="f", path="docs", recursive=True)))
    assert not (tree / "root" / "docs").exists()
    assert (tree / "outside" / "secret.txt").read_text() == "secret"


@pytest.mark.parametrize("path", ["", ".", "./", "docs/.."])
async def test_root_cannot_be_deleted(handler: FolderHandler, path: str) -> None:
    with pytest.raises((PermissionDenied, InvalidArgument)):
        await run(handler, req(delete=files_pb2.DeleteRequest(profile="f", path=path, recursive=True)))


async def test_move_renames_and_refuses_to_overwrite_unless_asked(handler: FolderHandler, tree: Path) -> None:
    [chunk] = await run(handler, req(move=files_pb2.MoveRequest(profile="f", path="a.txt", destination_path="docs/a2.txt")))
    assert chunk.move.info.path == "docs/a2.txt"
    assert (tree / "root" / "docs" / "a2.txt").read_text() == "alpha"
    with pytest.raises(AlreadyExists):
        await run(handler, req(move=files_pb2.MoveRequest(profile="f", path="b.csv", destination_path="docs/a2.txt")))
    assert (tree / "root" / "b.csv").exists()
    await run(handler, req(move=files_pb2.MoveRequest(profile="f", path="b.csv", destination_path="docs/a2.txt",
                                                      overwrite=True)))
    assert (tree / "root" / "docs" / "a2.txt").read_text() == "x,y\n1,2\n"
    assert not (tree / "root" / "b.csv").exists()


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
async def test_move_never_replaces_without_overwrite_with_or_without_renameat2(
        handler: FolderHandler, tree: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool) -> None:
    if not renameat2:
        monkeypatch.setattr(files_module, "rename_noreplace", lambda *args: False)
    with pytest.raises(AlreadyExists):
        await run(handler, req(move=files_pb2.MoveRequest(profile="f", path="a.txt", destination_path="b.csv")))
    await run(handler, req(move=files_pb2.MoveRequest(profile="f", path="a.txt", destination_path="docs/a.txt")))
    await run(handler, req(move=files_pb2.MoveRequest(profile="f", path="docs/deep", destination_path="deep")))
    assert (tree / "root" / "docs" / "a.txt").read_text() == "alpha"
    assert os.stat(tree / "root" / "docs" / "a.txt").st_nlink == 1
    assert (tree / "root" / "deep" / "c.csv").read_text() == "c"
    assert (tree / "root" / "b.csv").read_text() == "x,y\n1,2\n"


async def test_move_folder_into_itself_is_invalid(handler: FolderHandler) -> None:
    with pytest.raises(InvalidArgument):
        await run(handler, req(move=files_pb2.MoveRequest(profile="f", path="docs", destination_path="docs/deep/x")))


async def test_make_directory_with_and_without_parents(handler: FolderHandler, tree: Path) -> None:
    [chunk] = await run(handler, req(make_directory=files_pb2.MakeDirectoryRequest(profile="f", path="new")))
    assert chunk.make_directory.info.type == FT.FILE_TYPE_DIRECTORY
    with pytest.raises(AlreadyExists):
        await run(handler, req(make_directory=files_pb2.MakeDirectoryRequest(profile="f", path="new")))
    with pytest.raises(NotFound):
        await run(handler, req(make_directory=files_pb2.MakeDirectoryRequest(profile="f", path="p/q/r")))
    await run(handler, req(make_directory=files_pb2.MakeDirectoryRequest(profile="f", path="p/q/r", parents=True)))
    await run(handler, req(make_directory=files_pb2.MakeDirectoryRequest(profile="f", path="p/q/r", parents=True)))
    assert (tree / "root" / "p" / "q" / "r").is_dir()


# --- read-only profiles ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "start",
    [
        write_req("ro.txt", profile="ro"),
        req(delete=files_pb2.DeleteRequest(profile="ro", path="a.txt")),
        req(move=files_pb2.MoveRequest(profile="ro", path="a.txt", destination_path="z.txt")),
        req(make_directory=files_pb2.MakeDirectoryRequest(profile="ro", path="newdir")),
    ],
    ids=["write", "delete", "move", "make_directory"],
)
async def test_read_only_profile_refuses_changes(
    handler: FolderHandler, tree: Path, start: tunnel_pb2.RequestStart
) -> None:
    before = snapshot(tree / "root")
    with pytest.raises(FailedPrecondition) as info:
        await run(handler, start, body_of(b"x"))
    assert info.value.reason == "READ_ONLY_PROFILE"
    assert snapshot(tree / "root") == before


async def test_read_only_profile_reads(handler: FolderHandler) -> None:
    chunks = await run(handler, req(read=files_pb2.ReadRequest(profile="ro", path="a.txt")))
    assert b"".join(c.read.data for c in chunks) == b"alpha"


def test_profiles_are_advertised(handler: FolderHandler) -> None:
    assert handler.profiles() == [
        profiles_pb2.Profile(name="f", kind=profiles_pb2.PROFILE_KIND_FOLDER, read_only=False),
        profiles_pb2.Profile(name="ro", kind=profiles_pb2.PROFILE_KIND_FOLDER, read_only=True),
    ]
