"""What a folder profile limits (size, names), a full disk, byte ranges, and the sweep of stale uploads."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from onprem.agent.handlers.base import RequestContext
from onprem.agent.handlers.folders import FolderHandler
from onprem.agent.profiles import ConfigError, FolderProfile, parse_profiles
from onprem.tunnel.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from onprem.v1 import files_pb2, tunnel_pb2

MiB = 1024 * 1024


def handler_for(root: Path, sweep: bool = False, **kw: object) -> FolderHandler:
    return FolderHandler({"f": FolderProfile(name="f", root=str(root.resolve()), **kw)},  # type: ignore[arg-type]
                         sweep=sweep)


async def body_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def run(handler: FolderHandler, body: AsyncIterator[bytes] | None = None,
              **op: object) -> list[tunnel_pb2.ResponseChunk]:
    file_op = files_pb2.FileOp(**op)  # type: ignore[arg-type]
    return [c async for c in handler.handle(file_op, RequestContext(request_id=1, body=body))]


def write(path: str, mode: files_pb2.WriteMode = files_pb2.WRITE_MODE_CREATE) -> files_pb2.WriteHeader:
    return files_pb2.WriteHeader(profile="f", path=path, mode=mode)


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".onprem-tmp-*"))


# --- profile settings --------------------------------------------------------------------------------


def test_folder_profile_parses_size_limit_and_name_patterns(tmp_path: Path) -> None:
    profiles = parse_profiles({"folders": {"f": {
        "root": str(tmp_path), "max_file_size": 1024, "read_patterns": ["*.csv", "*.txt"], "write_patterns": ["*.csv"],
    }}})
    assert profiles.folders["f"] == FolderProfile(
        name="f", root=os.path.realpath(tmp_path), max_file_size=1024,
        read_patterns=("*.csv", "*.txt"), write_patterns=("*.csv",))


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"max_file_size": 0}, r"max_file_size: expected a positive integer"),
        ({"max_file_size": "1GB"}, r"max_file_size: expected a positive integer"),
        ({"read_patterns": "*.csv"}, r"read_patterns: expected a non-empty list"),
        ({"write_patterns": []}, r"write_patterns: expected a non-empty list"),
        ({"write_patterns": [""]}, r"write_patterns: expected non-empty strings"),
        ({"read_patterns": ["in/*.csv"]}, r"read_patterns: 'in/\*.csv' contains '/'"),
    ],
)
def test_folder_profile_refuses_bad_limits(tmp_path: Path, settings: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError, match=r"profiles\.folders\.f\." + error):
        parse_profiles({"folders": {"f": {"root": str(tmp_path), **settings}}})


# --- size limit and name patterns --------------------------------------------------------------------


async def test_upload_over_the_size_limit_is_resource_exhausted_and_leaves_nothing(tmp_path: Path) -> None:
    handler = handler_for(tmp_path, max_file_size=10)
    with pytest.raises(ResourceExhausted) as info:
        await run(handler, body_of(b"123456", b"78901", b"never read"), write=write("big.txt"))
    assert info.value.reason == "FILE_TOO_LARGE"
    assert "'big.txt'" in info.value.message and str(tmp_path) not in info.value.message
    assert sorted(os.listdir(tmp_path)) == []
    [ok] = await run(handler, body_of(b"12345", b"67890"), write=write("exact.txt"))
    assert ok.write.info.size == 10


async def test_names_outside_the_patterns_are_permission_denied(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b")
    (tmp_path / "secret.key").write_text("k")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "inner.key").write_text("k")
    handler = handler_for(tmp_path, read_patterns=("*.csv",), write_patterns=("*.csv",))
    refused: list[dict[str, Any]] = [
        {"read": files_pb2.ReadRequest(profile="f", path="secret.key")},
        {"write": write("upload.exe")},
        {"delete": files_pb2.DeleteRequest(profile="f", path="secret.key")},
        {"delete": files_pb2.DeleteRequest(profile="f", path="folder", recursive=True)},
        {"move": files_pb2.MoveRequest(profile="f", path="secret.key", destination_path="key.csv")},
        {"move": files_pb2.MoveRequest(profile="f", path="data.csv", destination_path="data.exe")},
    ]
    for op in refused:
        with pytest.raises(PermissionDenied) as info:
            await run(handler, body_of(b"x"), **op)
        assert info.value.reason == "NAME_NOT_ALLOWED", op
        assert str(tmp_path) not in info.value.message
    assert sorted(os.listdir(tmp_path)) == ["data.csv", "folder", "secret.key"]
    chunks = await run(handler, read=files_pb2.ReadRequest(profile="f", path="data.csv"))
    assert b"".join(c.read.data for c in chunks) == b"a,b"
    await run(handler, body_of(b"1,2"), write=write("new.csv"))
    await run(handler, move=files_pb2.MoveRequest(profile="f", path="new.csv", destination_path="folder/moved.csv"))
    # Listing is not reading: every name is still shown.
    [listing] = await run(handler, list=files_pb2.ListRequest(profile="f", recursive=True))
    assert [e.path for e in listing.list.entries] == [
        "data.csv", "folder", "folder/inner.key", "folder/moved.csv", "secret.key"]


@pytest.mark.parametrize("op", ["write", "move_to", "make_directory"])
async def test_temp_names_are_reserved(tmp_path: Path, op: str) -> None:
    (tmp_path / "a.txt").write_text("a")
    name = ".onprem-tmp-0123456789abcdef"
    ops: dict[str, dict[str, Any]] = {
        "write": {"write": write(name)},
        "move_to": {"move": files_pb2.MoveRequest(profile="f", path="a.txt", destination_path=name)},
        "make_directory": {"make_directory": files_pb2.MakeDirectoryRequest(profile="f", path=name)},
    }
    with pytest.raises(InvalidArgument) as info:
        await run(handler_for(tmp_path), body_of(b"x"), **ops[op])
    assert info.value.reason == "RESERVED_NAME"
    assert not (tmp_path / name).exists()


# --- a full disk -------------------------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs, so that the disk is really full."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


async def test_disk_full_is_resource_exhausted_and_leaves_no_partial_file(tiny_tmpfs: Path) -> None:
    handler = handler_for(tiny_tmpfs)
    with pytest.raises(ResourceExhausted) as info:
        await run(handler, body_of(*[os.urandom(256 * 1024)] * 12), write=write("huge.bin"))
    assert info.value.reason == "DISK_FULL"
    assert "'huge.bin'" in info.value.message and str(tiny_tmpfs) not in info.value.message
    assert os.listdir(tiny_tmpfs) == []
    # The space came back: a file that fits is written.
    [ok] = await run(handler, body_of(b"x" * MiB), write=write("fits.bin"))
    assert ok.write.info.size == MiB


# --- byte ranges -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, 0, slice(0, None)),
        (0, 1, slice(0, 1)),
        (99_999, 0, slice(99_999, None)),
        (99_999, 10, slice(99_999, None)),  # a range past the end stops at the end
        (100_000, 0, slice(100_000, None)),  # at the end: no bytes, the hash of nothing
        (250_000, 5, slice(250_000, None)),  # beyond the end: likewise
        (70_000, 40_000, slice(70_000, 100_000)),
        (1, 65_536 * 2, slice(1, 1 + 65_536 * 2)),  # spans chunk boundaries
    ],
)
async def test_read_range_streams_exactly_those_bytes_with_their_sha256(
    tmp_path: Path, offset: int, length: int, expected: slice
) -> None:
    data = os.urandom(100_000)
    (tmp_path / "f.bin").write_bytes(data)
    file_op = files_pb2.FileOp(
        read=files_pb2.ReadRequest(profile="f", path="f.bin", offset=offset, length=length))
    chunks = [c async for c in handler_for(tmp_path).handle(
        file_op, RequestContext(request_id=1, body=None, max_chunk_bytes=16 * 1024))]
    parts = [c.read for c in chunks]
    assert parts[0].HasField("info") and parts[0].info.size == 100_000
    sent = b"".join(p.data for p in parts[1:-1])
    assert sent == data[expected]
    assert parts[-1].sha256 == hashlib.sha256(data[expected]).hexdigest()


# --- stale uploads -----------------------------------------------------------------------------------


async def test_startup_sweep_removes_only_unlocked_temp_files_of_ours(tmp_path: Path) -> None:
    (tmp_path / "deep" / "er").mkdir(parents=True)
    stale = [tmp_path / ".onprem-tmp-00000000000000aa", tmp_path / "deep" / "er" / ".onprem-tmp-00000000000000bb"]
    for path in stale:
        path.write_bytes(b"half an upload")
    live = tmp_path / ".onprem-tmp-00000000000000cc"
    live.write_bytes(b"an upload in progress elsewhere")
    not_ours = [tmp_path / ".onprem-tmp-notours", tmp_path / ".onprem-tmp-00000000000000AA"]
    for path in not_ours:
        path.write_text("a user's file")
    with live.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process's writer holds its temp file like this
        handler = handler_for(tmp_path, sweep=True)
        assert handler.sweeper.done.wait(10)
        assert leftovers(tmp_path) == sorted(
            [".onprem-tmp-00000000000000AA", ".onprem-tmp-00000000000000cc", ".onprem-tmp-notours"])


async def test_read_only_profiles_are_not_swept(tmp_path: Path) -> None:
    (tmp_path / ".onprem-tmp-00000000000000aa").write_bytes(b"x")
    handler = handler_for(tmp_path, sweep=True, read_only=True)
    assert handler.sweeper.done.wait(10)
    assert leftovers(tmp_path) == [".onprem-tmp-00000000000000aa"]
