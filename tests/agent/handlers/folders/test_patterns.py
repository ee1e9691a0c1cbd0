"""A folder profile's name patterns hold for every way a name can change (issue 11, finding 4): no operation
gives a file the read patterns hide a name they allow, or a file the write patterns protect a writable name,
and no link with a readable name exposes a hidden file's content."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from onprem.agent.handlers.base import RequestContext
from onprem.agent.handlers.folders import FolderHandler
from onprem.agent.profiles import FolderProfile
from onprem.tunnel.errors import PermissionDenied
from onprem.v1 import files_pb2, tunnel_pb2

SECRET = b"hidden by read_patterns"


def handler_for(root: Path, **kw: object) -> FolderHandler:
    return FolderHandler({"f": FolderProfile(name="f", root=str(root.resolve()), **kw)},  # type: ignore[arg-type]
                         sweep=False)


async def run(handler: FolderHandler, body: AsyncIterator[bytes] | None = None,
              **op: object) -> list[tunnel_pb2.ResponseChunk]:
    file_op = files_pb2.FileOp(**op)  # type: ignore[arg-type]
    return [c async for c in handler.handle(file_op, RequestContext(request_id=1, body=body))]


async def body_of(data: bytes) -> AsyncIterator[bytes]:
    yield data


def move(path: str, destination: str, overwrite: bool = False) -> files_pb2.MoveRequest:
    return files_pb2.MoveRequest(profile="f", path=path, destination_path=destination, overwrite=overwrite)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "secret.key").write_bytes(SECRET)
    (tmp_path / "report.csv").write_bytes(b"a,b\n")
    (tmp_path / "sub").mkdir()
    return tmp_path


# --- Move and read patterns --------------------------------------------------------------------------


async def test_move_refuses_to_give_a_file_hidden_by_read_patterns_a_readable_name(root: Path) -> None:
    handler = handler_for(root, read_patterns=("*.csv",))
    with pytest.raises(PermissionDenied) as info:
        await run(handler, move=move("secret.key", "sub/exposed.csv"))
    assert info.value.reason == "NAME_NOT_ALLOWED"
    assert (root / "secret.key").read_bytes() == SECRET
    assert not (root / "sub" / "exposed.csv").exists()


async def test_move_refuses_to_overwrite_a_readable_name_with_a_hidden_file(root: Path) -> None:
    handler = handler_for(root, read_patterns=("*.csv",))
    with pytest.raises(PermissionDenied):
        await run(handler, move=move("secret.key", "report.csv", overwrite=True))
    assert (root / "report.csv").read_bytes() == b"a,b\n"


async def test_move_lets_a_hidden_file_keep_a_hidden_name(root: Path) -> None:
    handler = handler_for(root, read_patterns=("*.csv",))
    await run(handler, move=move("secret.key", "sub/secret.old"))
    assert (root / "sub" / "secret.old").read_bytes() == SECRET


async def test_move_lets_a_readable_file_take_a_hidden_name(root: Path) -> None:
    handler = handler_for(root, read_patterns=("*.csv",))
    await run(handler, move=move("report.csv", "report.bak"))
    assert (root / "report.bak").exists()


async def test_moving_a_folder_keeps_the_files_in_it_hidden(root: Path) -> None:
    (root / "sub" / "inner.key").write_bytes(SECRET)
    handler = handler_for(root, read_patterns=("*.csv",))
    await run(handler, move=move("sub", "moved.csv"))  # a folder's name is not a file name the patterns read
    with pytest.raises(PermissionDenied):
        await run(handler, read=files_pb2.ReadRequest(profile="f", path="moved.csv/inner.key"))


# --- Move and write patterns -------------------------------------------------------------------------


async def test_move_refuses_to_give_a_file_protected_by_write_patterns_a_writable_name(root: Path) -> None:
    handler = handler_for(root, write_patterns=("*.csv",))
    with pytest.raises(PermissionDenied) as info:
        await run(handler, move=move("secret.key", "writable.csv"))
    assert info.value.reason == "NAME_NOT_ALLOWED"
    assert (root / "secret.key").exists()


async def test_move_refuses_to_take_a_writable_file_to_a_protected_name(root: Path) -> None:
    handler = handler_for(root, write_patterns=("*.csv",))
    with pytest.raises(PermissionDenied):
        await run(handler, move=move("report.csv", "secret.key", overwrite=True))
    assert (root / "secret.key").read_bytes() == SECRET


async def test_write_keep_both_refuses_a_numbered_name_the_write_patterns_do_not_allow(root: Path) -> None:
    handler = handler_for(root, write_patterns=("report.csv",))
    with pytest.raises(PermissionDenied) as info:
        await run(handler, body_of(b"new"), write=files_pb2.WriteHeader(
            profile="f", path="report.csv", mode=files_pb2.WRITE_MODE_KEEP_BOTH))
    assert info.value.reason == "NAME_NOT_ALLOWED"
    assert sorted(os.listdir(root)) == ["report.csv", "secret.key", "sub"]


# --- links -------------------------------------------------------------------------------------------


async def test_a_hard_link_with_a_readable_name_to_a_hidden_file_is_not_read(root: Path) -> None:
    os.link(root / "secret.key", root / "linked.csv")  # made by a local user: the API makes no links
    handler = handler_for(root, read_patterns=("*.csv",))
    with pytest.raises(PermissionDenied) as info:
        await run(handler, read=files_pb2.ReadRequest(profile="f", path="linked.csv"))
    assert info.value.reason == "HARD_LINK"


async def test_a_hard_linked_file_is_not_reported_by_poll_when_read_patterns_are_set(root: Path) -> None:
    os.link(root / "secret.key", root / "linked.csv")
    await asyncio.sleep(0.1)  # past the settle time
    [chunk] = await run(handler_for(root, read_patterns=("*.csv",)),
                        poll=files_pb2.PollRequest(profile="f", settle_ms=50))
    assert [e.path for e in chunk.poll.entries] == ["report.csv"]


async def test_a_hard_linked_file_is_read_when_no_read_patterns_are_set(root: Path) -> None:
    os.link(root / "secret.key", root / "linked.csv")
    chunks = await run(handler_for(root), read=files_pb2.ReadRequest(profile="f", path="linked.csv"))
    assert b"".join(c.read.data for c in chunks) == SECRET


async def test_a_symlink_with_a_readable_name_to_a_hidden_file_is_not_read(root: Path) -> None:
    (root / "alias.csv").symlink_to("secret.key")
    handler = handler_for(root, read_patterns=("*.csv",))
    with pytest.raises(PermissionDenied) as info:
        await run(handler, read=files_pb2.ReadRequest(profile="f", path="alias.csv"))
    assert info.value.reason == "SYMLINK_NOT_FOLLOWED"


async def test_a_symlink_with_a_readable_name_is_not_reported_by_poll(root: Path) -> None:
    (root / "alias.csv").symlink_to("secret.key")
    await asyncio.sleep(0.1)
    [chunk] = await run(handler_for(root, read_patterns=("*.csv",)),
                        poll=files_pb2.PollRequest(profile="f", settle_ms=50))
    assert [e.path for e in chunk.poll.entries] == ["report.csv"]


async def test_a_symlink_to_a_hidden_file_cannot_be_moved_to_another_readable_name(root: Path) -> None:
    (root / "alias.txt").symlink_to("secret.key")
    handler = handler_for(root, read_patterns=("*.csv",))
    with pytest.raises(PermissionDenied) as info:
        await run(handler, move=move("alias.txt", "alias.csv"))
    assert info.value.reason == "SYMLINK_NOT_FOLLOWED"
    assert (root / "alias.txt").is_symlink()
