"""File operations confined to the agent's folder profiles.

Every blocking call runs in a thread (`asyncio.to_thread`); paths go through
`agent.handlers.paths` before they touch the disk. Uploads land in a temp
file beside the target and appear at their path only by an atomic rename (or
link, when an existing file must not be replaced), after fsync and after the
expected checksum has matched.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import AsyncIterator, Iterator, Mapping

from google.protobuf.timestamp_pb2 import Timestamp

from agent.handlers.base import RequestContext
from agent.handlers.paths import ConfinedPath, confine, follow, open_confined
from agent.profiles import FolderProfile
from onprem.v1 import files_pb2, profiles_pb2, tunnel_pb2
from tunnel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RequestError,
    ResourceExhausted,
)

__all__ = ["FolderHandler"]

DEFAULT_PAGE_SIZE = 1000
TEMP_PREFIX = ".onprem-tmp-"
#: Room left in each chunk for the ResponseChunk/ReadResponse framing.
_CHUNK_OVERHEAD = 64

# errno -> (error class, reason); the one table OS errors go through.
_ERRNO_TABLE: dict[int, tuple[type[RequestError], str]] = {
    errno.ENOENT: (NotFound, "PATH_NOT_FOUND"),
    errno.EEXIST: (AlreadyExists, "PATH_EXISTS"),
    errno.EACCES: (PermissionDenied, "OS_PERMISSION_DENIED"),
    errno.EPERM: (PermissionDenied, "OS_PERMISSION_DENIED"),
    errno.ENOSPC: (ResourceExhausted, "DISK_FULL"),
    errno.EDQUOT: (ResourceExhausted, "DISK_QUOTA"),
    errno.EISDIR: (FailedPrecondition, "IS_A_DIRECTORY"),
    errno.ENOTDIR: (FailedPrecondition, "NOT_A_DIRECTORY"),
    errno.ENOTEMPTY: (FailedPrecondition, "DIRECTORY_NOT_EMPTY"),
    errno.ELOOP: (PermissionDenied, "PATH_OUTSIDE_ROOT"),
    errno.ENAMETOOLONG: (InvalidArgument, "INVALID_PATH"),
    errno.EINVAL: (InvalidArgument, "INVALID_PATH"),
    errno.EROFS: (FailedPrecondition, "READ_ONLY_FILESYSTEM"),
    errno.EXDEV: (FailedPrecondition, "CROSS_DEVICE"),
}


@contextlib.contextmanager
def _os_errors(rel: str) -> Iterator[None]:
    """Turn OSError into a RequestError that names the relative path only."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, RequestError):  # pragma: no cover - RequestError is no OSError
            raise
        cls, reason = _ERRNO_TABLE.get(exc.errno or 0, (FailedPrecondition, "OS_ERROR"))
        raise cls(f"path {rel!r}: {exc.strerror or type(exc).__name__}", reason=reason) from None


def _info(rel: str, st: os.stat_result) -> files_pb2.FileInfo:
    kind = files_pb2.FILE_TYPE_DIRECTORY if stat.S_ISDIR(st.st_mode) else files_pb2.FILE_TYPE_FILE
    modified = Timestamp()
    modified.FromNanoseconds(st.st_mtime_ns)
    return files_pb2.FileInfo(
        path=rel,
        name=rel.rsplit("/", 1)[-1],
        type=kind,
        size=st.st_size if kind == files_pb2.FILE_TYPE_FILE else 0,
        modified_at=modified,
    )


def _stat_entry(path: ConfinedPath) -> os.stat_result:
    """Stat what `path` names, refusing symlinks that leave the root and special files."""
    with _os_errors(path.rel):
        st = os.stat(follow(path))
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise PermissionDenied(f"path {path.rel!r} is a device, FIFO or socket", reason="SPECIAL_FILE")
    return st


def _keep_both_name(name: str, n: int) -> str:
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:  # "README" or ".profile": no extension to keep apart
        return f"{name} ({n})"
    return f"{stem} ({n}).{ext}"


def _check_folder(profile: FolderProfile) -> list[profiles_pb2.ProfileCheck]:
    """The root exists, is a folder, and the agent may do what the profile allows there."""
    root = profile.root
    if not os.path.isdir(root):
        why = "does not exist" if not os.path.exists(root) else "is not a folder"
        return [profiles_pb2.ProfileCheck(name="root exists", ok=False, message=f"the profile's root {why}")]
    checks = [profiles_pb2.ProfileCheck(name="root exists", ok=True, message="the root is a folder")]
    readable = os.access(root, os.R_OK | os.X_OK)
    checks.append(profiles_pb2.ProfileCheck(
        name="readable", ok=readable,
        message="the agent may list and read the root" if readable
        else "the agent's user may not list the root: fix its permissions"))
    if not profile.read_only:
        writable = os.access(root, os.W_OK | os.X_OK)
        checks.append(profiles_pb2.ProfileCheck(
            name="writable", ok=writable,
            message="the agent may create files in the root" if writable
            else "the profile allows writes but the agent's user may not write to the root"))
    return checks


class FolderHandler:
    """Runs `FileOp` payloads against the configured folder profiles."""

    def __init__(self, profiles: Mapping[str, FolderProfile]) -> None:
        self._profiles = dict(profiles)

    def profiles(self) -> list[profiles_pb2.Profile]:
        return [
            profiles_pb2.Profile(name=p.name, kind=profiles_pb2.PROFILE_KIND_FOLDER, read_only=p.read_only)
            for p in self._profiles.values()
        ]

    async def aclose(self) -> None:
        """Nothing to release: every operation closes what it opens."""

    async def check(self, profile: str) -> list[profiles_pb2.ProfileCheck]:
        folder = self._profile(profile, writes=False)
        return await asyncio.to_thread(_check_folder, folder)

    def _profile(self, name: str, *, writes: bool) -> FolderProfile:
        profile = self._profiles.get(name)
        if profile is None:
            raise NotFound(f"folder profile '{name}' is not configured on this agent", reason="PROFILE_NOT_FOUND")
        if writes and profile.read_only:
            raise FailedPrecondition(f"folder profile '{name}' is read-only", reason="READ_ONLY_PROFILE")
        return profile

    async def handle(
        self, request: tunnel_pb2.RequestStart, context: RequestContext
    ) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        op = request.file_op
        kind = op.WhichOneof("operation") if request.WhichOneof("payload") == "file_op" else None
        if kind == "list":
            yield tunnel_pb2.ResponseChunk(list=await asyncio.to_thread(self._list, op.list))
        elif kind == "stat":
            yield tunnel_pb2.ResponseChunk(stat=await asyncio.to_thread(self._stat, op.stat))
        elif kind == "read":
            async for part in self._read(op.read, context.max_chunk_bytes):
                yield tunnel_pb2.ResponseChunk(read=part)
        elif kind == "write":
            yield tunnel_pb2.ResponseChunk(write=await self._write(op.write, context.body))
        elif kind == "delete":
            yield tunnel_pb2.ResponseChunk(delete=await asyncio.to_thread(self._delete, op.delete))
        elif kind == "move":
            yield tunnel_pb2.ResponseChunk(move=await asyncio.to_thread(self._move, op.move))
        elif kind == "make_directory":
            yield tunnel_pb2.ResponseChunk(make_directory=await asyncio.to_thread(self._mkdir, op.make_directory))
        else:
            raise InvalidArgument("expected a file_op with an operation", reason="INVALID_PAYLOAD")

    # --- reads -----------------------------------------------------------------------------------

    def _list(self, req: files_pb2.ListRequest) -> files_pb2.ListResponse:
        profile = self._profile(req.profile, writes=False)
        top = confine(profile.root, req.path)
        st = _stat_entry(top)
        if not stat.S_ISDIR(st.st_mode):
            raise FailedPrecondition(f"path {top.rel!r} is not a folder", reason="NOT_A_DIRECTORY")
        page_size = req.page_size or DEFAULT_PAGE_SIZE
        entries = sorted(self._walk(top, req.recursive, req.glob), key=lambda e: e.path)
        if req.page_token:
            entries = [e for e in entries if e.path > req.page_token]
        page = entries[:page_size]
        more = len(entries) > page_size
        return files_pb2.ListResponse(entries=page, next_page_token=page[-1].path if more else "")

    def _walk(self, top: ConfinedPath, recursive: bool, glob: str) -> Iterator[files_pb2.FileInfo]:
        with _os_errors(top.rel):
            fd = open_confined(top, os.O_RDONLY | os.O_DIRECTORY)
            try:
                names = os.listdir(fd)
            finally:
                os.close(fd)
        top_real = follow(top)
        for name in names:
            rel = f"{top.rel}/{name}" if top.rel else name
            child = ConfinedPath(root=top.root, rel=rel, real=os.path.join(top_real, name))
            try:
                st = _stat_entry(child)
            except (RequestError, OSError):
                continue  # vanished, a special file, or a symlink out of the root: not listed
            if not glob or fnmatch.fnmatchcase(name, glob):
                yield _info(rel, st)
            # Only real folders are descended into, so symlink loops cannot recurse.
            if recursive and stat.S_ISDIR(st.st_mode) and not os.path.islink(child.real):
                yield from self._walk(child, recursive, glob)

    def _stat(self, req: files_pb2.StatRequest) -> files_pb2.StatResponse:
        profile = self._profile(req.profile, writes=False)
        path = confine(profile.root, req.path)
        return files_pb2.StatResponse(info=_info(path.rel, _stat_entry(path)))

    async def _read(self, req: files_pb2.ReadRequest, max_chunk_bytes: int) -> AsyncIterator[files_pb2.ReadResponse]:
        profile = self._profile(req.profile, writes=False)
        path = confine(profile.root, req.path)
        with _os_errors(path.rel):
            fd = await asyncio.to_thread(open_confined, path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise FailedPrecondition(f"path {path.rel!r} is a folder, not a file", reason="IS_A_DIRECTORY")
            yield files_pb2.ReadResponse(info=_info(path.rel, st))
            digest = hashlib.sha256()
            position = req.offset
            end = position + req.length if req.length else None
            chunk_size = max(1, max_chunk_bytes - _CHUNK_OVERHEAD)
            while end is None or position < end:
                want = chunk_size if end is None else min(chunk_size, end - position)
                with _os_errors(path.rel):
                    data = await asyncio.to_thread(os.pread, fd, want, position)
                if not data:
                    break
                position += len(data)
                digest.update(data)
                yield files_pb2.ReadResponse(data=data)
            yield files_pb2.ReadResponse(sha256=digest.hexdigest())
        finally:
            os.close(fd)

    # --- writes ----------------------------------------------------------------------------------

    async def _write(self, header: files_pb2.WriteHeader, body: AsyncIterator[bytes] | None) -> files_pb2.WriteResponse:
        profile = self._profile(header.profile, writes=True)
        path = confine(profile.root, header.path)
        if path.is_root:
            raise InvalidArgument("a write needs a file path, not the root", reason="INVALID_PATH")
        follow(path)  # never replace a symlink that leads out of the root
        expected = header.expected_sha256.lower()
        if expected and (len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected)):
            raise InvalidArgument("expected_sha256 must be 64 hex digits", reason="INVALID_CHECKSUM")
        parent = ConfinedPath(root=path.root, rel=path.rel.rpartition("/")[0], real=path.parent_real)
        dir_fd = await asyncio.to_thread(self._open_parent, parent, header.create_parents)
        temp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        finished = False
        try:
            with _os_errors(path.rel):
                fd = await asyncio.to_thread(
                    os.open, temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                    dir_fd=dir_fd,
                )
            digest = hashlib.sha256()
            try:
                if body is not None:
                    async for data in body:
                        digest.update(data)
                        with _os_errors(path.rel):
                            await asyncio.to_thread(_write_all, fd, data)
                with _os_errors(path.rel):
                    await asyncio.to_thread(os.fsync, fd)
                    st = os.fstat(fd)
            finally:
                os.close(fd)
            actual = digest.hexdigest()
            if expected and actual != expected:
                raise FailedPrecondition(
                    f"path {path.rel!r}: the upload's SHA-256 is {actual}, not the expected {expected}; nothing written",
                    reason="CHECKSUM_MISMATCH",
                )
            final_rel = await asyncio.to_thread(self._publish, dir_fd, temp, path, header.mode)
            finished = True
            return files_pb2.WriteResponse(info=_info(final_rel, st), sha256=actual)
        finally:
            if not finished:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
            os.close(dir_fd)

    def _open_parent(self, parent: ConfinedPath, create: bool) -> int:
        with _os_errors(parent.rel or "."):
            if create:
                os.makedirs(follow(parent), exist_ok=True)
            try:
                return open_confined(parent, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                raise NotFound(
                    f"folder {parent.rel!r} does not exist; set create_parents to create it", reason="PATH_NOT_FOUND"
                ) from None

    def _publish(self, dir_fd: int, temp: str, path: ConfinedPath, mode: int) -> str:
        """Give the temp file its final name; returns the relative path it got."""
        name = path.name
        prefix = path.rel[: -len(name)]
        with _os_errors(path.rel):
            if mode == files_pb2.WRITE_MODE_OVERWRITE:
                if os.path.isdir(os.path.join(path.parent_real, name)):
                    raise FailedPrecondition(f"path {path.rel!r} is a folder", reason="IS_A_DIRECTORY")
                os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:
                # link() fails if the name exists, where rename() would silently replace it.
                for n in range(0, 10_000 if mode == files_pb2.WRITE_MODE_KEEP_BOTH else 1):
                    candidate = name if n == 0 else _keep_both_name(name, n)
                    try:
                        os.link(temp, candidate, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                    except FileExistsError:
                        if mode != files_pb2.WRITE_MODE_KEEP_BOTH:
                            raise AlreadyExists(f"path {path.rel!r} already exists", reason="PATH_EXISTS") from None
                        continue
                    os.unlink(temp, dir_fd=dir_fd)
                    name = candidate
                    break
                else:
                    raise AlreadyExists(f"path {path.rel!r}: no free numbered name left", reason="PATH_EXISTS")
            os.fsync(dir_fd)  # make the rename itself durable
        return prefix + name

    def _delete(self, req: files_pb2.DeleteRequest) -> files_pb2.DeleteResponse:
        profile = self._profile(req.profile, writes=True)
        path = confine(profile.root, req.path)
        if path.is_root:
            raise PermissionDenied("the folder profile's root cannot be deleted", reason="ROOT_NOT_DELETABLE")
        follow(path)  # refuse consistently, even though only the link itself would go
        with _os_errors(path.rel):
            st = os.lstat(path.real)
            info = _info(path.rel, st)
            if stat.S_ISDIR(st.st_mode):
                if req.recursive:
                    shutil.rmtree(path.real)  # fd-based on Linux: does not follow symlinks inside
                else:
                    os.rmdir(path.real)
            else:
                os.unlink(path.real)  # a symlink goes, never what it points to
        return files_pb2.DeleteResponse(info=info)

    def _move(self, req: files_pb2.MoveRequest) -> files_pb2.MoveResponse:
        profile = self._profile(req.profile, writes=True)
        source = confine(profile.root, req.path)
        target = confine(profile.root, req.destination_path)
        if source.is_root or target.is_root:
            raise PermissionDenied("the folder profile's root cannot be moved or replaced", reason="ROOT_NOT_MOVABLE")
        follow(source)
        follow(target)
        if _is_within(target.real, source.real):
            raise InvalidArgument(f"cannot move {source.rel!r} into itself", reason="INVALID_PATH")
        with _os_errors(source.rel):
            os.lstat(source.real)
        with _os_errors(target.rel):
            if os.path.lexists(target.real):
                if not req.overwrite:
                    raise AlreadyExists(f"path {target.rel!r} already exists; set overwrite to replace it",
                                        reason="PATH_EXISTS")
                if os.path.isdir(target.real) and not os.path.islink(target.real):
                    raise FailedPrecondition(f"path {target.rel!r} is a folder and is never replaced",
                                             reason="IS_A_DIRECTORY")
                os.replace(source.real, target.real)
            elif os.path.isdir(source.real) and not os.path.islink(source.real):
                os.rename(source.real, target.real)
            else:
                os.link(source.real, target.real, follow_symlinks=False)  # fails rather than replace
                os.unlink(source.real)
            st = os.stat(follow(target))
        return files_pb2.MoveResponse(info=_info(target.rel, st))

    def _mkdir(self, req: files_pb2.MakeDirectoryRequest) -> files_pb2.MakeDirectoryResponse:
        profile = self._profile(req.profile, writes=True)
        path = confine(profile.root, req.path)
        follow(path)
        with _os_errors(path.rel):
            if req.parents:
                os.makedirs(path.real, exist_ok=True)
            else:
                os.mkdir(path.real)
            real = follow(path)  # a symlink racing in must not make us report outside
            st = os.stat(real)
        if not stat.S_ISDIR(st.st_mode):
            raise AlreadyExists(f"path {path.rel!r} exists and is not a folder", reason="PATH_EXISTS")
        return files_pb2.MakeDirectoryResponse(info=_info(path.rel, st))


def _is_within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor.rstrip("/") + "/")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

