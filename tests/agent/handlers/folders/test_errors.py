"""Every OS error a folder operation can meet becomes a precise status naming the profile-relative path only,
never INTERNAL and never an absolute path (issue 11, must-hold 9). Real errors where a folder can produce them,
injected ones (at each operation's own system call and at path resolution) for the rest."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from onprem.agent.handlers.base import RequestContext
from onprem.agent.handlers.folders import FolderHandler, paths
from onprem.agent.handlers.folders import common as files_common
from onprem.agent.handlers.folders import handler as files_module
from onprem.agent.handlers.folders import write as files_write
from onprem.agent.handlers.folders.common import os_error
from onprem.agent.profiles import FolderProfile
from onprem.tunnel.errors import Code, InvalidArgument, RequestError
from onprem.v1 import files_pb2

#: The specification: what each errno means to a caller.
EXPECTED: dict[int, tuple[Code, str]] = {
    errno.ENOENT: (Code.NOT_FOUND, "PATH_NOT_FOUND"),
    errno.EEXIST: (Code.ALREADY_EXISTS, "PATH_EXISTS"),
    errno.ENOTEMPTY: (Code.FAILED_PRECONDITION, "DIRECTORY_NOT_EMPTY"),
    errno.EISDIR: (Code.FAILED_PRECONDITION, "IS_A_DIRECTORY"),
    errno.ENOTDIR: (Code.FAILED_PRECONDITION, "NOT_A_DIRECTORY"),
    errno.ELOOP: (Code.PERMISSION_DENIED, "SYMLINK_NOT_FOLLOWED"),
    errno.EACCES: (Code.PERMISSION_DENIED, "OS_PERMISSION_DENIED"),
    errno.EPERM: (Code.PERMISSION_DENIED, "OS_PERMISSION_DENIED"),
    errno.ENXIO: (Code.PERMISSION_DENIED, "SPECIAL_FILE"),
    errno.EROFS: (Code.FAILED_PRECONDITION, "READ_ONLY_FILESYSTEM"),
    errno.EXDEV: (Code.FAILED_PRECONDITION, "CROSS_DEVICE"),
    errno.EBUSY: (Code.FAILED_PRECONDITION, "BUSY"),
    errno.EOPNOTSUPP: (Code.FAILED_PRECONDITION, "NOT_SUPPORTED"),
    errno.ENOSPC: (Code.RESOURCE_EXHAUSTED, "DISK_FULL"),
    errno.EDQUOT: (Code.RESOURCE_EXHAUSTED, "DISK_QUOTA"),
    errno.EFBIG: (Code.RESOURCE_EXHAUSTED, "FILE_TOO_LARGE"),
    errno.EMLINK: (Code.RESOURCE_EXHAUSTED, "TOO_MANY_LINKS"),
    errno.EMFILE: (Code.RESOURCE_EXHAUSTED, "TOO_MANY_OPEN_FILES"),
    errno.ENFILE: (Code.RESOURCE_EXHAUSTED, "TOO_MANY_OPEN_FILES"),
    errno.ENOMEM: (Code.RESOURCE_EXHAUSTED, "OUT_OF_MEMORY"),
    errno.ENAMETOOLONG: (Code.INVALID_ARGUMENT, "NAME_TOO_LONG"),
    errno.EINVAL: (Code.INVALID_ARGUMENT, "INVALID_PATH"),
    errno.EAGAIN: (Code.UNAVAILABLE, "TRY_AGAIN"),
    errno.EIO: (Code.UNAVAILABLE, "IO_ERROR"),
    errno.ESTALE: (Code.UNAVAILABLE, "STALE_FILE_HANDLE"),
    errno.ENOLINK: (Code.FAILED_PRECONDITION, "OS_ERROR"),  # no entry of its own: a generic, still no INTERNAL
}


@pytest.mark.parametrize("code", sorted(EXPECTED), ids=lambda c: errno.errorcode[c])
def test_each_errno_maps_to_its_status_naming_only_the_relative_path(code: int) -> None:
    exc = OSError(code, os.strerror(code), "/srv/exports/reports/2026.csv")
    error = os_error("reports/2026.csv", exc)
    assert (error.code, error.reason) == EXPECTED[code]
    assert "'reports/2026.csv'" in error.message
    assert "/srv" not in error.message


def test_an_invalid_argument_from_the_disk_names_the_field() -> None:
    error = os_error("x", OSError(errno.ENAMETOOLONG, "File name too long"), field="destination_path")
    assert isinstance(error, InvalidArgument)
    assert error.field == "destination_path"


# --- real errors ------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    top = tmp_path / "root"
    (top / "docs" / "deep").mkdir(parents=True)
    (top / "a.txt").write_text("alpha")
    (top / "docs" / "deep" / "c.csv").write_text("c")
    return top


def handler_for(root: Path) -> FolderHandler:
    return FolderHandler({"f": FolderProfile(name="f", root=str(root))}, sweep=False)


async def body_of(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def outcome(handler: FolderHandler, op: str, **fields: Any) -> RequestError:
    """The error a folder operation must end with; anything else (success, a raw exception) fails the test."""
    message = {"stat": files_pb2.StatRequest, "list": files_pb2.ListRequest, "read": files_pb2.ReadRequest,
               "write": files_pb2.WriteHeader, "delete": files_pb2.DeleteRequest, "move": files_pb2.MoveRequest,
               "make_directory": files_pb2.MakeDirectoryRequest, "poll": files_pb2.PollRequest}[op]
    file_op = files_pb2.FileOp(**{op: message(profile="f", **fields)})
    body = body_of(b"data") if op == "write" else None
    try:
        [_ async for _ in handler.handle(file_op, RequestContext(request_id=1, body=body))]
    except RequestError as exc:
        return exc
    raise AssertionError(f"{op} {fields} succeeded")


REAL = [
    ("stat", {"path": "a.txt/x"}, Code.FAILED_PRECONDITION, "NOT_A_DIRECTORY"),
    ("list", {"path": "a.txt"}, Code.FAILED_PRECONDITION, "NOT_A_DIRECTORY"),
    ("read", {"path": "docs"}, Code.FAILED_PRECONDITION, "IS_A_DIRECTORY"),
    ("write", {"path": "docs", "mode": files_pb2.WRITE_MODE_OVERWRITE}, Code.FAILED_PRECONDITION, "IS_A_DIRECTORY"),
    ("write", {"path": "a.txt"}, Code.ALREADY_EXISTS, "PATH_EXISTS"),
    ("write", {"path": "a.txt/new"}, Code.FAILED_PRECONDITION, "NOT_A_DIRECTORY"),
    ("delete", {"path": "docs"}, Code.FAILED_PRECONDITION, "DIRECTORY_NOT_EMPTY"),
    ("delete", {"path": "gone"}, Code.NOT_FOUND, "PATH_NOT_FOUND"),
    ("move", {"path": "gone", "destination_path": "b"}, Code.NOT_FOUND, "PATH_NOT_FOUND"),
    ("move", {"path": "a.txt", "destination_path": "docs", "overwrite": True}, Code.FAILED_PRECONDITION,
     "IS_A_DIRECTORY"),
    ("move", {"path": "docs", "destination_path": "a.txt", "overwrite": True}, Code.FAILED_PRECONDITION,
     "NOT_A_DIRECTORY"),
    ("move", {"path": "a.txt", "destination_path": "nowhere/a.txt"}, Code.NOT_FOUND, "PATH_NOT_FOUND"),
    ("make_directory", {"path": "docs"}, Code.ALREADY_EXISTS, "PATH_EXISTS"),
    ("make_directory", {"path": "a.txt", "parents": True}, Code.ALREADY_EXISTS, "PATH_EXISTS"),
    ("make_directory", {"path": "a.txt/x", "parents": True}, Code.FAILED_PRECONDITION, "NOT_A_DIRECTORY"),
    ("poll", {"path": "a.txt"}, Code.FAILED_PRECONDITION, "NOT_A_DIRECTORY"),
    ("poll", {"path": "gone"}, Code.NOT_FOUND, "PATH_NOT_FOUND"),
]


@pytest.mark.parametrize(("op", "fields", "code", "reason"), REAL,
                         ids=[f"{r[0]}-{r[3]}-{i}" for i, r in enumerate(REAL)])
async def test_a_real_os_error_is_its_precise_status(root: Path, op: str, fields: dict[str, Any], code: Code,
                                                     reason: str) -> None:
    error = await outcome(handler_for(root), op, **fields)
    assert (error.code, error.reason) == (code, reason), error.message
    assert str(root) not in error.message


async def test_a_move_of_a_folder_into_itself_is_invalid_argument(root: Path) -> None:
    error = await outcome(handler_for(root), "move", path="docs", destination_path="docs/deep/docs")
    assert error.code == Code.INVALID_ARGUMENT


async def test_a_root_that_is_gone_is_failed_precondition_naming_the_profile(tmp_path: Path) -> None:
    handler = FolderHandler({"f": FolderProfile(name="f", root=str(tmp_path / "gone"))}, sweep=False)
    error = await outcome(handler, "stat", path="a.txt")
    assert (error.code, error.reason) == (Code.FAILED_PRECONDITION, "ROOT_UNAVAILABLE")
    assert str(tmp_path) not in error.message


# --- injected errors, at every operation's own call and at resolution -----------------------------------

#: Where each operation meets the disk for its own work, after its path resolved: (operation, request fields,
#: module, function). Only calls made relative to a descriptor fail, so the test's own file calls still work.
CALLS: list[tuple[str, dict[str, Any], Any, str]] = [
    ("stat", {"path": "a.txt"}, os, "stat"),
    ("list", {"path": "docs", "recursive": True}, os, "listdir"),
    ("read", {"path": "a.txt"}, os, "pread"),
    ("write", {"path": "docs/new.txt"}, os, "fsync"),
    ("write", {"path": "docs/new.txt"}, files_write, "rename_noreplace"),
    ("write", {"path": "a.txt", "mode": files_pb2.WRITE_MODE_OVERWRITE}, os, "replace"),
    ("delete", {"path": "a.txt"}, os, "unlink"),
    ("delete", {"path": "docs", "recursive": True}, os, "rmdir"),
    ("move", {"path": "a.txt", "destination_path": "docs/a.txt"}, files_module, "rename_noreplace"),
    ("move", {"path": "a.txt", "destination_path": "docs/deep/c.csv", "overwrite": True}, os, "rename"),
    ("make_directory", {"path": "docs/new"}, os, "mkdir"),
    ("poll", {"path": "docs", "recursive": True}, os, "scandir"),
    *[(op, fields, paths, "_openat2") for op, fields in [
        ("stat", {"path": "docs/a"}), ("list", {"path": "docs"}), ("read", {"path": "a.txt"}),
        ("write", {"path": "docs/x"}), ("delete", {"path": "docs/deep/c.csv"}),
        ("move", {"path": "docs/deep/c.csv", "destination_path": "c.csv"}), ("make_directory", {"path": "docs/n"}),
        ("poll", {"path": "docs"})]],
    *[(op, {"path": "a.txt", "destination_path": "b"} if op == "move" else {"path": "a.txt"}, files_common,
       "open_root") for op in ("stat", "read", "write", "delete", "move", "make_directory")],
]
INJECTED = [errno.EACCES, errno.EIO, errno.ENOSPC, errno.EMFILE, errno.EROFS, errno.ESTALE, errno.EBUSY,
            errno.ENAMETOOLONG, errno.ENOLINK]


def failing(code: int, real: Callable[..., Any], root: Path) -> Callable[..., Any]:
    def fake(*args: Any, **kwargs: Any) -> Any:
        if "dir_fd" in kwargs or "src_dir_fd" in kwargs or real.__name__ in ("pread", "fsync", "_openat2",
                                                                             "rename_noreplace", "open_root",
                                                                             "listdir", "scandir"):
            raise OSError(code, os.strerror(code), str(root / "the-absolute-path"))
        return real(*args, **kwargs)
    fake.__name__ = real.__name__
    return fake


@pytest.mark.parametrize("code", INJECTED, ids=lambda c: errno.errorcode[c])
@pytest.mark.parametrize(("op", "fields", "module", "function"), CALLS,
                         ids=[f"{c[0]}-{c[3]}" for c in CALLS])
async def test_an_injected_os_error_on_every_operation_is_its_status_never_internal(
        root: Path, monkeypatch: pytest.MonkeyPatch, code: int, op: str, fields: dict[str, Any], module: Any,
        function: str) -> None:
    if module is paths and not paths.openat2_supported():
        pytest.skip("this kernel has no openat2")
    handler = handler_for(root)
    monkeypatch.setattr(module, function, failing(code, getattr(module, function), root))
    error = await outcome(handler, op, **fields)
    expected = EXPECTED[code]
    if function == "open_root" and code == errno.EACCES:
        expected = (Code.FAILED_PRECONDITION, "ROOT_UNAVAILABLE")  # the site's root, not the caller's path
    assert (error.code, error.reason) == expected, error.message
    assert str(root) not in error.message


async def test_names_on_disk_that_are_not_utf8_are_left_out_of_listings_and_polls(root: Path) -> None:
    top = os.fsencode(root)
    os.mkdir(top + b"/bad-\xff")
    for name in (b"/bad-\xff/inner.txt", b"/name-\xfe.txt"):
        os.close(os.open(top + name, os.O_WRONLY | os.O_CREAT, 0o644))
    await asyncio.sleep(0.1)  # past the poll's settle time
    handler = handler_for(root)
    for op in (files_pb2.FileOp(list=files_pb2.ListRequest(profile="f", recursive=True)),
               files_pb2.FileOp(poll=files_pb2.PollRequest(profile="f", recursive=True, settle_ms=50))):
        [chunk] = [c async for c in handler.handle(op,
                                                   RequestContext(request_id=1, body=None))]
        paths_seen = [e.path for e in (chunk.list.entries if op.HasField("list") else chunk.poll.entries)]
        assert "a.txt" in paths_seen
        assert [p for p in paths_seen if "bad-" in p or "name-" in p] == []
