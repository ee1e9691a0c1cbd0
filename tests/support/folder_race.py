"""The folder race: a hostile local process swaps folders and symlinks inside a root while every folder
operation runs against it, and nothing outside the root may be read, listed, created, changed or deleted.

`build` makes the two trees. Outside the root sits a sentinel folder holding the same names the operations use
(`file.txt`, `victim-3`, `mv-5`, `sub/deep.txt`, ...), so that any escape does something visible: its files
are larger than the inside ones and read "OUTSIDE", and it holds `OUTSIDE-MARKER`, a name that exists nowhere
in the root. Inside the root, `a` and `c` are folders the swapper (`tests.support.folder_swapper`) keeps
replacing with symlinks to the sentinel folder, and inside `a` it swaps a sub-folder and a file with symlinks.

`hammer` runs each operation many times through whatever runs it (the handler directly, or an operator client
through the real processes: an `Ops` implementation) and checks every result as it comes back:

- Stat, List, Read and Poll never return the marker, an outside size or outside bytes;
- a Delete or a Move never takes a sentinel file away, and a moved file never carries outside bytes;
- every refusal is PERMISSION_DENIED or NOT_FOUND: anything else (INTERNAL above all) is recorded.

`outside_snapshot` before and after proves that nothing was created, changed or deleted outside.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import grpc

from onprem.agent.handlers.base import RequestContext
from onprem.agent.handlers.folders import FolderHandler
from onprem.tunnel.errors import RequestError
from onprem.v1 import files_pb2, files_pb2_grpc, tunnel_pb2

INSIDE_FILE = b"inside file\n"
OUTSIDE_FILE = b"OUTSIDE " * 512
MARKER = "OUTSIDE-MARKER"
SLOTS = 8  # names reused round-robin, so the folders stay small however long the run
OPERATIONS = ("stat", "list", "read", "write", "delete", "move", "make_directory", "poll")
#: What a refusal may be while the tree changes under the operation: the path is a symlink (or passes through
#: one), or it is missing for a moment. OK is not a refusal.
ALLOWED = frozenset({"OK", "PERMISSION_DENIED", "NOT_FOUND"})

_T = TypeVar("_T")


@dataclass(frozen=True)
class Tree:
    root: Path
    outside: Path
    #: The test's own descriptors of the real folders `a` and `c` and of the root, opened before any swap.
    fds: dict[str, int]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def build(base: Path) -> Tree:
    """The root and the sentinel folder beside it (see the module docstring)."""
    root, outside = base / "root", base / "outside"
    for folder in (outside, outside / "sub"):
        folder.mkdir(parents=True)
    for name in ["file.txt", "sub/deep.txt", MARKER, *(f"victim-{k}" for k in range(SLOTS)),
                 *(f"mv-{k}" for k in range(SLOTS))]:
        (outside / name).write_bytes(OUTSIDE_FILE)
    for top in ("a", "c"):
        (root / top / "sub").mkdir(parents=True)
        (root / top / "file.txt").write_bytes(INSIDE_FILE)
        (root / top / "sub" / "deep.txt").write_bytes(INSIDE_FILE)
        for k in range(SLOTS):
            (root / top / f"victim-{k}").write_bytes(INSIDE_FILE)
            (root / top / f"mv-{k}").write_bytes(INSIDE_FILE)
    (root / "link").symlink_to(outside)
    (root / "a" / "sublink").symlink_to(outside / "sub")
    (root / "a" / "filelink").symlink_to(outside / "file.txt")
    # Old enough that a poll with a short settle time reports them.
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            os.utime(Path(dirpath) / name, (1_600_000_000, 1_600_000_000))
    fds = {top: os.open(root / top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW) for top in ("a", "c")}
    fds[""] = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    return Tree(root=root, outside=outside, fds=fds)


def outside_snapshot(tree: Tree) -> dict[str, tuple[str, bytes]]:
    """Every entry of the sentinel folder: its kind and its bytes (or a symlink's target)."""
    found: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirs, files in os.walk(tree.outside):
        for name in dirs + files:
            full = Path(dirpath) / name
            rel = str(full.relative_to(tree.outside))
            if full.is_symlink():
                found[rel] = ("symlink", os.readlink(full).encode())
            elif full.is_dir():
                found[rel] = ("folder", b"")
            else:
                found[rel] = ("file", full.read_bytes())
    return found


@contextmanager
def swapper(tree: Tree) -> Iterator[subprocess.Popen[str]]:
    """The hostile process, running until the block ends."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.folder_swapper", str(tree.root)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the swapper did not start")
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


class Ops(Protocol):
    """Runs one folder operation of the profile; returns its result or raises `Refused`."""

    async def stat(self, path: str) -> files_pb2.FileInfo: ...
    async def listing(self, path: str, recursive: bool) -> list[files_pb2.FileInfo]: ...
    async def read(self, path: str) -> bytes: ...
    async def write(self, path: str, data: bytes) -> None: ...
    async def delete(self, path: str) -> None: ...
    async def move(self, path: str, destination: str) -> None: ...
    async def make_directory(self, path: str) -> None: ...
    async def poll(self, path: str) -> list[files_pb2.FileInfo]: ...


class Refused(Exception):
    """An operation ended with a status other than OK; `code` is its name, e.g. "NOT_FOUND"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Report:
    """What the operations ended with, per operation, and every promise broken."""

    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: {op: Counter() for op in OPERATIONS})
    violations: list[str] = field(default_factory=list)

    def broken(self, op: str, path: str, what: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(f"{op} {path!r}: {what}")

    def unexpected_codes(self) -> dict[str, dict[str, int]]:
        return {op: {c: n for c, n in counts.items() if c not in ALLOWED}
                for op, counts in self.outcomes.items() if set(counts) - ALLOWED}

    def summary(self) -> str:
        return "; ".join(f"{op}: " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))
                         for op, counts in self.outcomes.items())


def _bad_entries(entries: list[files_pb2.FileInfo]) -> list[str]:
    return [e.path for e in entries if e.name == MARKER or e.size == len(OUTSIDE_FILE)]


class _Slots:
    """The test's own descriptors of the real folders `a` and `c`, whatever their names are at the moment."""

    def __init__(self, tree: Tree) -> None:
        self.fds = tree.fds
        self.root_fd = tree.fds[""]

    def put(self, top: str, name: str) -> None:
        """Make sure the real folder `top` holds the file `name` (a Delete or Move may have taken it)."""
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=self.fds[top])
        try:
            if os.fstat(fd).st_size == 0:
                os.write(fd, INSIDE_FILE)
        finally:
            os.close(fd)

    def root_file(self, name: str) -> bytes | None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.root_fd)
        except OSError:
            return None
        try:
            return os.read(fd, 1 << 20)
        finally:
            os.close(fd)


class _Hammer:
    """One run of every operation against the racing tree; each method is one attempt, checked as it returns."""

    def __init__(self, ops: Ops, tree: Tree) -> None:
        self.ops = ops
        self.tree = tree
        self.slots = _Slots(tree)
        self.report = Report()
        self.outside_names = {f"victim-{k}" for k in range(SLOTS)} | {f"mv-{k}" for k in range(SLOTS)}

    async def attempt(self, op: str, i: int) -> None:
        top = "a" if i % 3 else "c"
        path = top
        try:
            path = await getattr(self, f"_{op}")(i, top)
        except Refused as exc:
            self.report.outcomes[op][exc.code] += 1
            if exc.code not in ALLOWED:
                self.report.broken(op, path, f"{exc.code}: {exc.message}")
            if str(self.tree.root.parent) in exc.message:
                self.report.broken(op, path, f"the message shows an absolute path: {exc.message}")
            return
        except Exception as exc:  # the handler let something through that is no status at all
            self.report.outcomes[op][f"INTERNAL ({type(exc).__name__})"] += 1
            self.report.broken(op, path, f"raised {type(exc).__name__}: {exc}")
            return
        self.report.outcomes[op]["OK"] += 1

    @staticmethod
    def _target(i: int, top: str) -> str:
        # Alternate the depth at which the swap happens: the folder itself, a sub-folder, the final name.
        return [f"{top}/file.txt", f"{top}/sub/deep.txt", f"{top}/{MARKER}"][i % 3]

    async def _stat(self, i: int, top: str) -> str:
        path = self._target(i, top)
        info = await self.ops.stat(path)
        if info.name == MARKER or info.size == len(OUTSIDE_FILE):
            self.report.broken("stat", path, f"described a file outside the root (size {info.size})")
        return path

    async def _list(self, i: int, top: str) -> str:
        path = "" if i % 4 == 0 else top
        entries = await self.ops.listing(path, recursive=i % 2 == 0)
        if bad := _bad_entries(entries):
            self.report.broken("list", path, f"listed entries outside the root: {bad[:3]}")
        return path

    async def _read(self, i: int, top: str) -> str:
        path = self._target(i, top)
        data = await self.ops.read(path)
        if data != INSIDE_FILE:
            self.report.broken("read", path, f"returned {data[:16]!r}... ({len(data)} bytes), not the inside file")
        return path

    async def _write(self, i: int, top: str) -> str:
        path = f"{top}/new-{i % SLOTS}.txt" if i % 2 else f"{top}/sub/new-{i % SLOTS}.txt"
        await self.ops.write(path, INSIDE_FILE)
        return path

    async def _delete(self, i: int, top: str) -> str:
        name = f"victim-{i % SLOTS}"
        self.slots.put(top, name)
        await self.ops.delete(f"{top}/{name}")
        if not (self.tree.outside / name).exists():
            self.report.broken("delete", f"{top}/{name}", "deleted the sentinel file outside the root")
        return f"{top}/{name}"

    async def _move(self, i: int, top: str) -> str:
        k = i % SLOTS
        path = f"{top}/mv-{k}"
        self.slots.put(top, f"mv-{k}")
        if i % 2:
            await self.ops.move(path, f"moved-{k}")
            brought = self.slots.root_file(f"moved-{k}")
            if brought is not None and brought != INSIDE_FILE:
                self.report.broken("move", path, "brought a file from outside the root in")
        else:
            await self.ops.move(path, f"{top}/sub/back-{k}")
        if any(not (self.tree.outside / name).exists() for name in self.outside_names):
            self.report.broken("move", path, "took a sentinel file away from outside the root")
        return path

    async def _make_directory(self, i: int, top: str) -> str:
        path = f"{top}/newdir-{i % SLOTS}" if i % 2 else f"{top}/sub/newdir-{i % SLOTS}/x"
        await self.ops.make_directory(path)
        return path

    async def _poll(self, i: int, top: str) -> str:
        entries = await self.ops.poll(top)
        if bad := _bad_entries(entries):
            self.report.broken("poll", top, f"reported files outside the root: {bad[:3]}")
        return top


async def hammer(ops: Ops, tree: Tree, attempts: int) -> Report:
    """Run every operation `attempts` times against the racing tree; see the module docstring."""
    run = _Hammer(ops, tree)
    for i in range(attempts):
        for op in OPERATIONS:
            await run.attempt(op, i)
    return run.report


class HandlerOps:
    """`Ops` straight through a `FolderHandler` (no tunnel): the volume run."""

    def __init__(self, handler: FolderHandler, profile: str) -> None:
        self.handler = handler
        self.profile = profile

    async def _run(self, body: AsyncIterator[bytes] | None = None,
                   **op: object) -> list[tunnel_pb2.ResponseChunk]:
        file_op = files_pb2.FileOp(**op)  # type: ignore[arg-type]
        try:
            return [c async for c in self.handler.handle(file_op, RequestContext(request_id=1, body=body))]
        except RequestError as exc:
            raise Refused(exc.code.name, exc.message) from None

    async def stat(self, path: str) -> files_pb2.FileInfo:
        [chunk] = await self._run(stat=files_pb2.StatRequest(profile=self.profile, path=path))
        return chunk.stat.info

    async def listing(self, path: str, recursive: bool) -> list[files_pb2.FileInfo]:
        entries: list[files_pb2.FileInfo] = []
        token = ""
        while True:
            [chunk] = await self._run(list=files_pb2.ListRequest(profile=self.profile, path=path,
                                                                 recursive=recursive, page_token=token))
            entries += chunk.list.entries
            token = chunk.list.next_page_token
            if not token:
                return entries

    async def read(self, path: str) -> bytes:
        chunks = await self._run(read=files_pb2.ReadRequest(profile=self.profile, path=path))
        return b"".join(c.read.data for c in chunks)

    async def write(self, path: str, data: bytes) -> None:
        async def body() -> AsyncIterator[bytes]:
            yield data

        await self._run(body(), write=files_pb2.WriteHeader(profile=self.profile, path=path,
                                                            mode=files_pb2.WRITE_MODE_OVERWRITE))

    async def delete(self, path: str) -> None:
        await self._run(delete=files_pb2.DeleteRequest(profile=self.profile, path=path))

    async def move(self, path: str, destination: str) -> None:
        await self._run(move=files_pb2.MoveRequest(profile=self.profile, path=path, destination_path=destination,
                                                   overwrite=True))

    async def make_directory(self, path: str) -> None:
        await self._run(make_directory=files_pb2.MakeDirectoryRequest(profile=self.profile, path=path, parents=True))

    async def poll(self, path: str) -> list[files_pb2.FileInfo]:
        [chunk] = await self._run(poll=files_pb2.PollRequest(profile=self.profile, path=path, recursive=True,
                                                             settle_ms=50))
        return list(chunk.poll.entries)


class GrpcOps:
    """`Ops` through the operator API of a real control plane and agent: the end-to-end run."""

    def __init__(self, channel: grpc.aio.Channel, token: str, group: str, profile: str) -> None:
        self.stub: files_pb2_grpc.FileServiceAsyncStub = files_pb2_grpc.FileServiceStub(channel)  # type: ignore[assignment]
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.group = group
        self.profile = profile

    async def _call(self, awaitable: Awaitable[_T]) -> _T:
        try:
            return await asyncio.wait_for(awaitable, 30)
        except grpc.aio.AioRpcError as exc:
            raise Refused(exc.code().name, exc.details() or "") from None

    async def stat(self, path: str) -> files_pb2.FileInfo:
        response = await self._call(self.stub.Stat(
            files_pb2.StatRequest(group=self.group, profile=self.profile, path=path), metadata=self.metadata))
        return response.info

    async def listing(self, path: str, recursive: bool) -> list[files_pb2.FileInfo]:
        entries: list[files_pb2.FileInfo] = []
        token = ""
        while True:
            page = await self._call(self.stub.List(files_pb2.ListRequest(
                group=self.group, profile=self.profile, path=path, recursive=recursive, page_token=token),
                metadata=self.metadata))
            entries += page.entries
            token = page.next_page_token
            if not token:
                return entries

    async def read(self, path: str) -> bytes:
        async def drain() -> bytes:
            call = self.stub.Read(files_pb2.ReadRequest(group=self.group, profile=self.profile, path=path),
                                  metadata=self.metadata)
            return b"".join([m.data async for m in call])

        return await self._call(drain())

    async def write(self, path: str, data: bytes) -> None:
        async def requests() -> AsyncIterator[files_pb2.WriteRequest]:
            yield files_pb2.WriteRequest(header=files_pb2.WriteHeader(
                group=self.group, profile=self.profile, path=path, mode=files_pb2.WRITE_MODE_OVERWRITE))
            yield files_pb2.WriteRequest(data=data)

        await self._call(self.stub.Write(requests(), metadata=self.metadata))

    async def delete(self, path: str) -> None:
        await self._call(self.stub.Delete(files_pb2.DeleteRequest(group=self.group, profile=self.profile, path=path),
                                          metadata=self.metadata))

    async def move(self, path: str, destination: str) -> None:
        await self._call(self.stub.Move(files_pb2.MoveRequest(
            group=self.group, profile=self.profile, path=path, destination_path=destination, overwrite=True),
            metadata=self.metadata))

    async def make_directory(self, path: str) -> None:
        await self._call(self.stub.MakeDirectory(files_pb2.MakeDirectoryRequest(
            group=self.group, profile=self.profile, path=path, parents=True), metadata=self.metadata))

    async def poll(self, path: str) -> list[files_pb2.FileInfo]:
        response = await self._call(self.stub.Poll(files_pb2.PollRequest(
            group=self.group, profile=self.profile, path=path, recursive=True, settle_ms=50), metadata=self.metadata))
        return list(response.entries)
