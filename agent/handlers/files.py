"""File operations confined to the agent's folder profiles.

Every blocking call runs in a thread (`asyncio.to_thread`), hashing too;
paths go through `agent.handlers.paths` before they touch the disk. Uploads
land in a locked temp file beside the target (`files_temp`) and appear at
their path only by an atomic rename (or link, when an existing file must not
be replaced), after fsync and after the size limit and the expected checksum
have held. Listings and polls live in `files_scan`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import stat
from collections.abc import AsyncIterator, Mapping

from agent.handlers.base import RequestContext
from agent.handlers.files_common import (
    TEMP_PREFIX,
    file_info,
    os_errors,
    refuse_reserved,
    require_name,
    stat_entry,
)
from agent.handlers.files_scan import list_page, poll
from agent.handlers.files_temp import Sweeper, new_temp
from agent.handlers.paths import ConfinedPath, confine, follow, open_confined
from agent.profiles import FolderProfile
from onprem.v1 import files_pb2, profiles_pb2, tunnel_pb2
from tunnel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)

__all__ = ["TEMP_PREFIX", "FolderHandler"]

DEFAULT_PAGE_SIZE = 1000
#: Room left in each chunk for the ResponseChunk/ReadResponse framing.
_CHUNK_OVERHEAD = 64

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

    def __init__(self, profiles: Mapping[str, FolderProfile], *, sweep: bool = True) -> None:
        self._profiles = dict(profiles)
        #: The sweep of stale temp files left by a killed agent; `done` is set once it has run.
        self.sweeper = Sweeper((p.name, p.root) for p in self._profiles.values() if not p.read_only)
        if sweep:
            self.sweeper.start()
        else:
            self.sweeper.done.set()

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
            async for chunk in self._read(op.read, context.max_chunk_bytes):
                yield chunk
        elif kind == "write":
            yield tunnel_pb2.ResponseChunk(write=await self._write(op.write, context.body))
        elif kind == "delete":
            yield tunnel_pb2.ResponseChunk(delete=await asyncio.to_thread(self._delete, op.delete))
        elif kind == "move":
            yield tunnel_pb2.ResponseChunk(move=await asyncio.to_thread(self._move, op.move))
        elif kind == "make_directory":
            yield tunnel_pb2.ResponseChunk(make_directory=await asyncio.to_thread(self._mkdir, op.make_directory))
        elif kind == "poll":
            yield tunnel_pb2.ResponseChunk(poll=await asyncio.to_thread(self._poll, op.poll))
        else:
            raise InvalidArgument("expected a file_op with an operation", reason="INVALID_PAYLOAD")

    # --- reads -----------------------------------------------------------------------------------

    def _folder(self, profile: FolderProfile, rel: str) -> ConfinedPath:
        top = confine(profile.root, rel)
        if not stat.S_ISDIR(stat_entry(top).st_mode):
            raise FailedPrecondition(f"path {top.rel!r} is not a folder", reason="NOT_A_DIRECTORY")
        return top

    def _list(self, req: files_pb2.ListRequest) -> files_pb2.ListResponse:
        profile = self._profile(req.profile, writes=False)
        top = self._folder(profile, req.path)
        with os_errors(top.rel):
            return list_page(top, recursive=req.recursive, glob=req.glob, page_token=req.page_token,
                             page_size=req.page_size or DEFAULT_PAGE_SIZE)

    def _poll(self, req: files_pb2.PollRequest) -> files_pb2.PollResponse:
        profile = self._profile(req.profile, writes=False)
        top = self._folder(profile, req.path)
        with os_errors(top.rel):
            return poll(top, req, profile.read_patterns)

    def _stat(self, req: files_pb2.StatRequest) -> files_pb2.StatResponse:
        profile = self._profile(req.profile, writes=False)
        path = confine(profile.root, req.path)
        return files_pb2.StatResponse(info=file_info(path.rel, stat_entry(path)))

    async def _read(self, req: files_pb2.ReadRequest, max_chunk_bytes: int) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        profile = self._profile(req.profile, writes=False)
        path = confine(profile.root, req.path)
        require_name(path, profile.read_patterns, "reading")
        with os_errors(path.rel):
            fd = await asyncio.to_thread(open_confined, path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise FailedPrecondition(f"path {path.rel!r} is a folder, not a file", reason="IS_A_DIRECTORY")
            yield tunnel_pb2.ResponseChunk(read=files_pb2.ReadResponse(info=file_info(path.rel, st)))
            digest = hashlib.sha256()
            position = req.offset
            end = position + req.length if req.length else None
            chunk_size = max(1, max_chunk_bytes - _CHUNK_OVERHEAD)
            while end is None or position < end:
                want = chunk_size if end is None else min(chunk_size, end - position)
                with os_errors(path.rel):
                    data = await asyncio.to_thread(_read_and_hash, fd, want, position, digest)
                if not data:
                    break  # the end of the file, even when the range asked for more
                position += len(data)
                # Built in place: ReadResponse(data=...) wrapped in a ResponseChunk would copy the bytes twice.
                chunk = tunnel_pb2.ResponseChunk()
                chunk.read.data = data
                yield chunk
            yield tunnel_pb2.ResponseChunk(read=files_pb2.ReadResponse(sha256=digest.hexdigest()))
        finally:
            os.close(fd)

    # --- writes ----------------------------------------------------------------------------------

    async def _write(self, header: files_pb2.WriteHeader, body: AsyncIterator[bytes] | None) -> files_pb2.WriteResponse:
        profile = self._profile(header.profile, writes=True)
        path = confine(profile.root, header.path)
        if path.is_root:
            raise InvalidArgument("a write needs a file path, not the root", reason="INVALID_PATH")
        refuse_reserved(path)
        require_name(path, profile.write_patterns, "writing")
        follow(path)  # never replace a symlink that leads out of the root
        expected = header.expected_sha256.lower()
        if expected and (len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected)):
            raise InvalidArgument("expected_sha256 must be 64 hex digits", reason="INVALID_CHECKSUM")
        parent = ConfinedPath(root=path.root, rel=path.rel.rpartition("/")[0], real=path.parent_real)
        dir_fd = await asyncio.to_thread(self._open_parent, parent, header.create_parents)
        temp: str | None = None
        finished = False
        try:
            with os_errors(path.rel):
                temp, fd = await asyncio.to_thread(new_temp, dir_fd)
            digest = hashlib.sha256()
            try:
                if body is not None:
                    await self._receive(body, fd, digest, path, profile.max_file_size)
                with os_errors(path.rel):
                    await asyncio.to_thread(os.fsync, fd)
                    st = os.fstat(fd)
            finally:
                os.close(fd)  # also drops the lock: publishing needs none, the name is still ours
            actual = digest.hexdigest()
            if expected and actual != expected:
                raise FailedPrecondition(
                    f"path {path.rel!r}: the upload's SHA-256 is {actual}, not the expected {expected}; nothing written",
                    reason="CHECKSUM_MISMATCH",
                )
            assert temp is not None
            final_rel = await asyncio.to_thread(self._publish, dir_fd, temp, path, header.mode)
            finished = True
            return files_pb2.WriteResponse(info=file_info(final_rel, st), sha256=actual)
        finally:
            if not finished and temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
            os.close(dir_fd)

    @staticmethod
    async def _receive(body: AsyncIterator[bytes], fd: int, digest: hashlib._Hash, path: ConfinedPath,
                       limit: int | None) -> None:
        """Write the upload to `fd` as it arrives, refusing it as soon as it passes the size limit."""
        received = 0
        async for data in body:
            received += len(data)
            if limit is not None and received > limit:
                raise ResourceExhausted(
                    f"path {path.rel!r}: the upload is larger than the folder profile's limit of {limit} bytes; "
                    "nothing written", reason="FILE_TOO_LARGE")
            with os_errors(path.rel):
                await asyncio.to_thread(_write_and_hash, fd, data, digest)

    def _open_parent(self, parent: ConfinedPath, create: bool) -> int:
        with os_errors(parent.rel or "."):
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
        with os_errors(path.rel):
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
        with os_errors(path.rel):
            st = os.lstat(path.real)
            info = file_info(path.rel, st)
            if stat.S_ISDIR(st.st_mode):
                if req.recursive and profile.write_patterns:
                    raise PermissionDenied(
                        f"path {path.rel!r}: the folder profile limits writes to some names, so folders are "
                        "deleted only when empty", reason="NAME_NOT_ALLOWED")
                if req.recursive:
                    shutil.rmtree(path.real)  # fd-based on Linux: does not follow symlinks inside
                else:
                    os.rmdir(path.real)
            else:
                require_name(path, profile.write_patterns, "deleting")
                os.unlink(path.real)  # a symlink goes, never what it points to
        return files_pb2.DeleteResponse(info=info)

    def _move(self, req: files_pb2.MoveRequest) -> files_pb2.MoveResponse:
        profile = self._profile(req.profile, writes=True)
        source = confine(profile.root, req.path)
        target = confine(profile.root, req.destination_path)
        if source.is_root or target.is_root:
            raise PermissionDenied("the folder profile's root cannot be moved or replaced", reason="ROOT_NOT_MOVABLE")
        refuse_reserved(target)
        follow(source)
        follow(target)
        if profile.write_patterns and not (os.path.isdir(source.real) and not os.path.islink(source.real)):
            # Renaming a file both removes one name and creates another: both must be writable names.
            require_name(source, profile.write_patterns, "moving")
            require_name(target, profile.write_patterns, "writing")
        if _is_within(target.real, source.real):
            raise InvalidArgument(f"cannot move {source.rel!r} into itself", reason="INVALID_PATH")
        with os_errors(source.rel):
            os.lstat(source.real)
        with os_errors(target.rel):
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
        return files_pb2.MoveResponse(info=file_info(target.rel, st))

    def _mkdir(self, req: files_pb2.MakeDirectoryRequest) -> files_pb2.MakeDirectoryResponse:
        profile = self._profile(req.profile, writes=True)
        path = confine(profile.root, req.path)
        refuse_reserved(path)
        follow(path)
        with os_errors(path.rel):
            if req.parents:
                os.makedirs(path.real, exist_ok=True)
            else:
                os.mkdir(path.real)
            real = follow(path)  # a symlink racing in must not make us report outside
            st = os.stat(real)
        if not stat.S_ISDIR(st.st_mode):
            raise AlreadyExists(f"path {path.rel!r} exists and is not a folder", reason="PATH_EXISTS")
        return files_pb2.MakeDirectoryResponse(info=file_info(path.rel, st))


def _is_within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor.rstrip("/") + "/")


def _write_and_hash(fd: int, data: bytes, digest: hashlib._Hash) -> None:
    # In the worker thread: hashlib releases the GIL, so hashing overlaps the event loop's work.
    digest.update(data)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_and_hash(fd: int, size: int, position: int, digest: hashlib._Hash) -> bytes:
    data = os.pread(fd, size, position)
    digest.update(data)
    return data

