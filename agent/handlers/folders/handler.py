"""File operations confined to the agent's folder profiles.

Every blocking call runs in a thread (`asyncio.to_thread`), hashing too.
Where a path is confined: `agent.handlers.folders.paths`. Each operation splits its
path there (the text checks), opens the profile's root, resolves from that
descriptor without following a symlink, and acts with the *at calls on the
parent folder's descriptor; there is no path string that is checked and then
used. OS errors become statuses in `common.os_errors`, always naming
the profile-relative path.

Uploads live in `write`, listings and polls in `scan`.

Name patterns hold for every way a name can change: Write, Move and Delete
need writable names (both names, for a Move); a Move never gives a file the
read patterns hide a name they allow; and, with read patterns, Read streams
only files with one name (a hard link made by a local user could give a
hidden file's content a readable name; the agent cannot cheaply find the
other names, so it refuses them all). Symlinks are never followed, so no
link's name can expose its target.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import AsyncIterator, Callable, Mapping

from onprem.agent import failpoints
from onprem.agent.handlers.base import RequestContext
from onprem.agent.handlers.folders.common import (
    TEMP_PREFIX,
    file_info,
    name_allowed,
    open_profile_root,
    os_error,
    os_errors,
    readable_content,
    refuse_reserved,
    rel_of,
    require_entry,
    require_name,
)
from onprem.agent.handlers.folders.ledger import Ledger
from onprem.agent.handlers.folders.paths import (
    Parts,
    open_at,
    open_parent,
    open_root,
    remove_tree,
    rename_noreplace,
    split,
)
from onprem.agent.handlers.folders.scan import DEFAULT_PAGE_SIZE, checked_count, list_page, poll
from onprem.agent.handlers.folders.temp import Sweeper
from onprem.agent.handlers.folders.write import write
from onprem.agent.handlers.traced import traced
from onprem.agent.profiles.folders import FolderProfile
from onprem.tunnel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from onprem.v1 import files_pb2, profiles_pb2, tunnel_pb2

__all__ = ["TEMP_PREFIX", "FolderHandler"]

#: Room left in each chunk for the ResponseChunk/ReadResponse framing.
_CHUNK_OVERHEAD = 64


def _check_folder(profile: FolderProfile) -> list[profiles_pb2.ProfileCheck]:
    """The root exists, is a folder, and the agent may do what the profile allows there."""
    try:
        fd = open_root(profile.root)
    except OSError as exc:
        why = {errno.ENOENT: "does not exist", errno.ENOTDIR: "is not a folder",
               errno.ELOOP: "is a symbolic link"}.get(exc.errno or 0, f"cannot be opened ({exc.strerror})")
        return [profiles_pb2.ProfileCheck(name="root exists", ok=False, message=f"the profile's root {why}")]
    try:
        checks = [profiles_pb2.ProfileCheck(name="root exists", ok=True, message="the root is a folder")]
        readable = os.access(".", os.R_OK | os.X_OK, dir_fd=fd)
        checks.append(profiles_pb2.ProfileCheck(
            name="readable", ok=readable,
            message="the agent may list and read the root" if readable
            else "the agent's user may not list the root: fix its permissions"))
        if not profile.read_only:
            writable = os.access(".", os.W_OK | os.X_OK, dir_fd=fd)
            checks.append(profiles_pb2.ProfileCheck(
                name="writable", ok=writable,
                message="the agent may create files in the root" if writable
                else "the profile allows writes but the agent's user may not write to the root"))
        return checks
    finally:
        os.close(fd)


#: The operations whose idempotency key is recorded in the profile's ledger.
_KEYED = frozenset({"write", "delete", "move", "make_directory"})


def _run_keyed(profile: FolderProfile, key: tunnel_pb2.Idempotency,
               run: Callable[[], tunnel_pb2.ResponseChunk]) -> tunnel_pb2.ResponseChunk:
    """In a thread: the key's recorded outcome, or `run`'s, recorded before the reply."""
    with open_profile_root(profile) as root, Ledger(root, profile.name, key).held() as ledger:
        recorded = ledger.recorded()
        if recorded is not None:
            return recorded[0]
        failpoints.hit("files.before_rename")
        chunk = run()
        ledger.record([chunk])
        failpoints.hit("files.after_rename")
        return chunk


def _primary_path(op: files_pb2.FileOp) -> str:
    kind = op.WhichOneof("operation")
    return str(getattr(getattr(op, kind), "path", "")) if kind else ""


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

    def handle(self, op: files_pb2.FileOp, context: RequestContext) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        kind = op.WhichOneof("operation") or ""

        def attributes() -> dict[str, str | int | bool]:
            # The profile, never the path: paths may name what a site keeps private.
            return {"file.operation": kind, "onprem.profile": getattr(op, kind).profile if kind else ""}

        return traced(f"file {kind}", attributes, lambda _span: self._handle(op, context))

    async def _handle(self, op: files_pb2.FileOp, context: RequestContext) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        kind = op.WhichOneof("operation")
        try:
            if kind == "list":
                yield tunnel_pb2.ResponseChunk(list=await asyncio.to_thread(self._list, op.list,
                                                                            context.max_chunk_bytes))
            elif kind == "stat":
                yield tunnel_pb2.ResponseChunk(stat=await asyncio.to_thread(self._stat, op.stat))
            elif kind == "read":
                async for chunk in self._read(op.read, context.max_chunk_bytes):
                    yield chunk
            elif context.idempotency is not None and kind in _KEYED:
                yield await self._keyed(op, context)
            elif kind == "write":
                yield tunnel_pb2.ResponseChunk(write=await self._write(op.write, context.body))
            elif kind == "delete":
                yield tunnel_pb2.ResponseChunk(delete=await asyncio.to_thread(self._delete, op.delete))
            elif kind == "move":
                yield tunnel_pb2.ResponseChunk(move=await asyncio.to_thread(self._move, op.move))
            elif kind == "make_directory":
                yield tunnel_pb2.ResponseChunk(make_directory=await asyncio.to_thread(self._mkdir,
                                                                                      op.make_directory))
            elif kind == "poll":
                yield tunnel_pb2.ResponseChunk(poll=await asyncio.to_thread(self._poll, op.poll,
                                                                            context.max_chunk_bytes))
            else:
                raise InvalidArgument("expected a file_op with an operation", reason="INVALID_PAYLOAD")
        except OSError as exc:
            # The net under every operation: each maps its own OS errors with the path they concern, and
            # anything that slips past is still a status naming the request's path, never INTERNAL.
            raise os_error(_primary_path(op), exc) from None

    async def _keyed(self, op: files_pb2.FileOp, context: RequestContext) -> tunnel_pb2.ResponseChunk:
        """A write with an idempotency key: answered from the profile's ledger, or run and recorded there."""
        key = context.idempotency
        assert key is not None
        kind = op.WhichOneof("operation")
        if kind == "write":
            profile = self._profile(op.write.profile, writes=True)
            return tunnel_pb2.ResponseChunk(write=await write(profile, op.write, context.body, key))
        request = getattr(op, kind or "")
        profile = self._profile(request.profile, writes=True)
        run = {"delete": lambda: tunnel_pb2.ResponseChunk(delete=self._delete(op.delete)),
               "move": lambda: tunnel_pb2.ResponseChunk(move=self._move(op.move)),
               "make_directory": lambda: tunnel_pb2.ResponseChunk(make_directory=self._mkdir(op.make_directory))}
        return await asyncio.to_thread(_run_keyed, profile, key, run[kind or ""])

    # --- reads -----------------------------------------------------------------------------------

    def _list(self, req: files_pb2.ListRequest, max_chunk_bytes: int) -> files_pb2.ListResponse:
        profile = self._profile(req.profile, writes=False)
        page_size = checked_count(req.page_size, DEFAULT_PAGE_SIZE, "page_size")
        parts = split(req.path)
        with open_profile_root(profile) as root_fd, os_errors(rel_of(parts)):
            return list_page(root_fd, parts, recursive=req.recursive, glob=req.glob, page_token=req.page_token,
                             page_size=page_size, max_chunk_bytes=max_chunk_bytes)

    def _poll(self, req: files_pb2.PollRequest, max_chunk_bytes: int) -> files_pb2.PollResponse:
        profile = self._profile(req.profile, writes=False)
        parts = split(req.path)
        with open_profile_root(profile) as root_fd, os_errors(rel_of(parts)):
            return poll(root_fd, parts, req, profile.read_patterns, max_chunk_bytes)

    def _stat(self, req: files_pb2.StatRequest) -> files_pb2.StatResponse:
        profile = self._profile(req.profile, writes=False)
        parts = split(req.path)
        rel = rel_of(parts)
        with open_profile_root(profile) as root_fd, os_errors(rel):
            if not parts:
                st = os.fstat(root_fd)
            else:
                parent = open_parent(root_fd, parts)
                try:
                    st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
                finally:
                    os.close(parent)
        return files_pb2.StatResponse(info=file_info(rel, require_entry(rel, st)))

    @staticmethod
    def _open_file(profile: FolderProfile, parts: Parts) -> tuple[int, os.stat_result]:
        """Resolve once and open: the read then works on the descriptor alone, whatever happens to the names."""
        rel = rel_of(parts)
        with open_profile_root(profile) as root_fd, os_errors(rel):
            # Non-blocking: a FIFO would block open() itself; the flag is cleared once it is known to be a file.
            fd = open_at(root_fd, parts, os.O_RDONLY | os.O_NONBLOCK)
            try:
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    raise FailedPrecondition(f"path {rel!r} is a folder, not a file", reason="IS_A_DIRECTORY")
                require_entry(rel, st)
                readable_content(rel, st, profile.read_patterns)
                os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
        return fd, st

    async def _read(self, req: files_pb2.ReadRequest, max_chunk_bytes: int) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        profile = self._profile(req.profile, writes=False)
        parts = split(req.path)
        rel = rel_of(parts)
        require_name(rel, profile.read_patterns, "reading")
        fd, st = await asyncio.to_thread(self._open_file, profile, parts)
        try:
            yield tunnel_pb2.ResponseChunk(read=files_pb2.ReadResponse(info=file_info(rel, st)))
            digest = hashlib.sha256()
            position = req.offset
            end = position + req.length if req.length else None
            chunk_size = max(1, max_chunk_bytes - _CHUNK_OVERHEAD)
            while end is None or position < end:
                want = chunk_size if end is None else min(chunk_size, end - position)
                with os_errors(rel):
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

    # --- changes ---------------------------------------------------------------------------------

    async def _write(self, header: files_pb2.WriteHeader,
                     body: AsyncIterator[bytes] | None) -> files_pb2.WriteResponse:
        return await write(self._profile(header.profile, writes=True), header, body)

    def _delete(self, req: files_pb2.DeleteRequest) -> files_pb2.DeleteResponse:
        profile = self._profile(req.profile, writes=True)
        parts = split(req.path)
        if not parts:
            raise PermissionDenied("the folder profile's root cannot be deleted", reason="ROOT_NOT_DELETABLE")
        rel, name = rel_of(parts), parts[-1]
        with open_profile_root(profile) as root_fd, os_errors(rel):
            parent = open_parent(root_fd, parts)
            try:
                st = require_entry(rel, os.stat(name, dir_fd=parent, follow_symlinks=False))
                info = file_info(rel, st)
                if stat.S_ISDIR(st.st_mode):
                    if req.recursive and profile.write_patterns:
                        raise PermissionDenied(
                            f"path {rel!r}: the folder profile limits writes to some names, so folders are "
                            "deleted only when empty", reason="NAME_NOT_ALLOWED")
                    if req.recursive:
                        remove_tree(parent, name)
                    else:
                        os.rmdir(name, dir_fd=parent)
                else:
                    require_name(rel, profile.write_patterns, "deleting")
                    # The name goes; a hard link's other names stay. Should the name have become a folder
                    # since the stat, unlink fails (EISDIR); a symlink, only the link would go.
                    os.unlink(name, dir_fd=parent)
            finally:
                os.close(parent)
        return files_pb2.DeleteResponse(info=info)

    def _move(self, req: files_pb2.MoveRequest) -> files_pb2.MoveResponse:
        profile = self._profile(req.profile, writes=True)
        source = split(req.path)
        target = split(req.destination_path, "destination_path")
        if not source or not target:
            raise PermissionDenied("the folder profile's root cannot be moved or replaced", reason="ROOT_NOT_MOVABLE")
        src_rel, dst_rel = rel_of(source), rel_of(target)
        refuse_reserved(target, "destination_path")
        if target[: len(source)] == source:
            raise InvalidArgument(f"cannot move {src_rel!r} into itself", reason="INVALID_PATH",
                                  field="destination_path")
        with open_profile_root(profile) as root_fd, contextlib.ExitStack() as fds:
            with os_errors(src_rel):
                src_dir = open_parent(root_fd, source)
                fds.callback(os.close, src_dir)
                src_st = require_entry(src_rel, os.stat(source[-1], dir_fd=src_dir, follow_symlinks=False))
            if not stat.S_ISDIR(src_st.st_mode):
                self._check_rename(profile, src_rel, dst_rel)
            with os_errors(dst_rel, "destination_path"):
                dst_dir = open_parent(root_fd, target)
                fds.callback(os.close, dst_dir)
                try:
                    dst_st: os.stat_result | None = os.stat(target[-1], dir_fd=dst_dir, follow_symlinks=False)
                except FileNotFoundError:
                    dst_st = None
            if dst_st is not None:
                if not req.overwrite:
                    raise AlreadyExists(f"path {dst_rel!r} already exists; set overwrite to replace it",
                                        reason="PATH_EXISTS")
                if stat.S_ISDIR(dst_st.st_mode):
                    raise FailedPrecondition(f"path {dst_rel!r} is a folder and is never replaced",
                                             reason="IS_A_DIRECTORY")
                require_entry(dst_rel, dst_st)
            try:
                if dst_st is not None:
                    os.rename(source[-1], target[-1], src_dir_fd=src_dir, dst_dir_fd=dst_dir)
                elif not rename_noreplace(src_dir, source[-1], dst_dir, target[-1]):
                    if stat.S_ISDIR(src_st.st_mode):
                        os.rename(source[-1], target[-1], src_dir_fd=src_dir, dst_dir_fd=dst_dir)
                    else:
                        # link() fails rather than replace a file that appeared meanwhile.
                        os.link(source[-1], target[-1], src_dir_fd=src_dir, dst_dir_fd=dst_dir,
                                follow_symlinks=False)
                        os.unlink(source[-1], dir_fd=src_dir)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINVAL, errno.EXDEV):
                    raise os_error(src_rel, exc) from None
                raise os_error(dst_rel, exc, "destination_path") from None
            with os_errors(dst_rel, "destination_path"):
                st = os.stat(target[-1], dir_fd=dst_dir, follow_symlinks=False)
        return files_pb2.MoveResponse(info=file_info(dst_rel, st))

    @staticmethod
    def _check_rename(profile: FolderProfile, src_rel: str, dst_rel: str) -> None:
        """Renaming a file removes one name and creates another: the patterns must allow both changes."""
        if profile.write_patterns:
            require_name(src_rel, profile.write_patterns, "moving")
            require_name(dst_rel, profile.write_patterns, "writing")
        src_name, dst_name = src_rel.rsplit("/", 1)[-1], dst_rel.rsplit("/", 1)[-1]
        if not name_allowed(src_name, profile.read_patterns) and name_allowed(dst_name, profile.read_patterns):
            raise PermissionDenied(
                f"path {src_rel!r}: the folder profile's read patterns hide it, and {dst_rel!r} would be a name "
                "they allow reading; a move may not make a hidden file readable", reason="NAME_NOT_ALLOWED")

    def _mkdir(self, req: files_pb2.MakeDirectoryRequest) -> files_pb2.MakeDirectoryResponse:
        profile = self._profile(req.profile, writes=True)
        parts = split(req.path)
        refuse_reserved(parts)
        rel = rel_of(parts)
        with open_profile_root(profile) as root_fd, os_errors(rel):
            if not parts:
                if not req.parents:
                    raise AlreadyExists("the folder profile's root already exists", reason="PATH_EXISTS")
                return files_pb2.MakeDirectoryResponse(info=file_info(rel, os.fstat(root_fd)))
            try:
                parent = open_parent(root_fd, parts, create=req.parents)
            except FileNotFoundError:
                raise NotFound(f"folder {rel_of(parts[:-1])!r} does not exist; set parents to create it",
                               reason="PATH_NOT_FOUND") from None
            try:
                try:
                    os.mkdir(parts[-1], 0o777, dir_fd=parent)
                except FileExistsError:
                    if not req.parents:
                        raise AlreadyExists(f"path {rel!r} already exists", reason="PATH_EXISTS") from None
                st = require_entry(rel, os.stat(parts[-1], dir_fd=parent, follow_symlinks=False))
            finally:
                os.close(parent)
        if not stat.S_ISDIR(st.st_mode):
            raise AlreadyExists(f"path {rel!r} exists and is not a folder", reason="PATH_EXISTS")
        return files_pb2.MakeDirectoryResponse(info=file_info(rel, st))


def _read_and_hash(fd: int, size: int, position: int, digest: hashlib._Hash) -> bytes:
    data = os.pread(fd, size, position)
    digest.update(data)
    return data
