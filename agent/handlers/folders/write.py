"""Uploads: a locked temp file beside the target, then an atomic rename, on the parent folder's descriptor.

The parent folder is resolved once from the root's descriptor (`paths.open_parent`, never through a
symlink), the temp file is created in it (`temp.new_temp`), and the upload appears at its path only by a
rename on that same descriptor (renameat2 RENAME_NOREPLACE when an existing file must not be replaced, a link
where the kernel lacks it), after fsync, the profile's size limit and the expected checksum have held. The
parent's descriptor is readable because fsync of a folder needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
from collections.abc import AsyncIterator

from onprem.agent import failpoints
from onprem.agent.handlers.folders.common import (
    file_info,
    name_allowed,
    open_profile_root,
    os_error,
    os_errors,
    refuse_reserved,
    rel_of,
    require_entry,
    require_name,
)
from onprem.agent.handlers.folders.ledger import Ledger
from onprem.agent.handlers.folders.paths import Parts, open_parent, rename_noreplace, split
from onprem.agent.handlers.folders.temp import new_temp
from onprem.agent.profiles.folders import FolderProfile
from onprem.tunnel import idempotency
from onprem.tunnel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from onprem.v1 import files_pb2, tunnel_pb2

__all__ = ["write"]


async def write(profile: FolderProfile, header: files_pb2.WriteHeader,
                body: AsyncIterator[bytes] | None, key: tunnel_pb2.Idempotency | None = None) -> files_pb2.WriteResponse:
    """Receive an upload into a temp file beside its target and give it its name once it has all held.

    With an idempotency `key`, the rename happens under the key's lock in the profile's ledger, and only
    when the ledger holds no outcome for the key (which then answers, and the upload is dropped).
    """
    parts = split(header.path)
    if not parts:
        raise InvalidArgument("a write needs a file path, not the root", reason="INVALID_PATH", field="path")
    rel = rel_of(parts)
    refuse_reserved(parts)
    require_name(rel, profile.write_patterns, "writing")
    expected = header.expected_sha256.lower()
    if expected and (len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected)):
        raise InvalidArgument("expected_sha256 must be 64 hex digits", reason="INVALID_CHECKSUM",
                              field="expected_sha256")
    dir_fd = await asyncio.to_thread(_open_parent, profile, parts, header.create_parents)
    temp: str | None = None
    finished = False
    try:
        try:
            made = await asyncio.to_thread(new_temp, dir_fd)
        except OSError as exc:
            raise os_error(rel, exc) from None
        temp, fd = made
        digest = hashlib.sha256()
        try:
            if body is not None:
                await _receive(body, fd, digest, rel, profile.max_file_size)
            with os_errors(rel):
                await asyncio.to_thread(os.fsync, fd)
                st = os.fstat(fd)
        finally:
            os.close(fd)  # also drops the lock: publishing needs none, the name is still ours
        actual = digest.hexdigest()
        if expected and actual != expected:
            raise FailedPrecondition(
                f"path {rel!r}: the upload's SHA-256 is {actual}, not the expected {expected}; nothing written",
                reason="CHECKSUM_MISMATCH",
            )
        if key is not None:
            fingerprint = idempotency.with_body(key.fingerprint, bytes.fromhex(actual))
            response, finished = await asyncio.to_thread(_publish_keyed, profile, key, fingerprint, dir_fd,
                                                         made[0], parts, header.mode, st, actual)
            return response
        final_rel = await asyncio.to_thread(_publish, dir_fd, made[0], parts, header.mode, profile)
        finished = True
        return files_pb2.WriteResponse(info=file_info(final_rel, st), sha256=actual)
    finally:
        if not finished and temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
        os.close(dir_fd)


async def _receive(body: AsyncIterator[bytes], fd: int, digest: hashlib._Hash, rel: str,
                   limit: int | None) -> None:
    """Write the upload to `fd` as it arrives, refusing it as soon as it passes the size limit."""
    received = 0
    async for data in body:
        received += len(data)
        if limit is not None and received > limit:
            raise ResourceExhausted(
                f"path {rel!r}: the upload is larger than the folder profile's limit of {limit} bytes; "
                "nothing written", reason="FILE_TOO_LARGE")
        with os_errors(rel):
            await asyncio.to_thread(_write_and_hash, fd, data, digest)


def _open_parent(profile: FolderProfile, parts: Parts, create: bool) -> int:
    """A readable descriptor of the target's folder (the temp file goes there; fsync needs it readable)."""
    rel, parent_rel = rel_of(parts), rel_of(parts[:-1])
    with open_profile_root(profile) as root_fd:
        with os_errors(parent_rel):
            try:
                dir_fd = open_parent(root_fd, parts, create=create, readable=True)
            except FileNotFoundError:
                raise NotFound(f"folder {parent_rel!r} does not exist; set create_parents to create it",
                               reason="PATH_NOT_FOUND") from None
        try:
            with os_errors(rel):
                try:
                    st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    return dir_fd
            # Said now rather than after the upload; the rename would not follow a link anyway.
            if stat.S_ISDIR(st.st_mode):
                raise FailedPrecondition(f"path {rel!r} is a folder", reason="IS_A_DIRECTORY")
            require_entry(rel, st)
            return dir_fd
        except BaseException:
            os.close(dir_fd)
            raise


def _publish(dir_fd: int, temp: str, parts: Parts, mode: int, profile: FolderProfile) -> str:
    """Give the temp file its final name in the same folder; returns the relative path it got."""
    name = parts[-1]
    prefix = rel_of(parts[:-1]) + "/" if len(parts) > 1 else ""
    rel = prefix + name
    with os_errors(rel):
        if mode == files_pb2.WRITE_MODE_OVERWRITE:
            # Replaces a file, or a symlink raced in as a name (never what it points to); fails on a folder.
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            for n in range(0, 10_000 if mode == files_pb2.WRITE_MODE_KEEP_BOTH else 1):
                candidate = name if n == 0 else _keep_both_name(name, n)
                if n and not name_allowed(candidate, profile.write_patterns):
                    raise PermissionDenied(
                        f"path {rel!r} exists, and its numbered name {prefix + candidate!r} is not one the "
                        f"folder profile allows writing ({', '.join(profile.write_patterns)})",
                        reason="NAME_NOT_ALLOWED")
                try:
                    _publish_new(dir_fd, temp, candidate)
                except FileExistsError:
                    if mode != files_pb2.WRITE_MODE_KEEP_BOTH:
                        raise AlreadyExists(f"path {rel!r} already exists", reason="PATH_EXISTS") from None
                    continue
                name = candidate
                break
            else:
                raise AlreadyExists(f"path {rel!r}: no free numbered name left", reason="PATH_EXISTS")
        os.fsync(dir_fd)  # make the rename itself durable
    return prefix + name


def _publish_keyed(profile: FolderProfile, key: tunnel_pb2.Idempotency, fingerprint: bytes, dir_fd: int,
                   temp: str, parts: Parts, mode: int, st: os.stat_result,
                   actual: str) -> tuple[files_pb2.WriteResponse, bool]:
    """Rename and record under the key's lock, or answer from the key's record; whether the temp was renamed
    (if not, the caller drops it)."""
    with open_profile_root(profile) as root, Ledger(root, profile.name, key).held() as ledger:
        recorded = ledger.recorded(fingerprint)
        if recorded is not None:
            return recorded[0].write, False
        if ledger.intent is not None:
            # An attempt died between its intent and its outcome: did its rename take effect?
            published = _published(dir_fd, ledger.intent, parts, mode, profile)
            if published is not None:
                response = files_pb2.WriteResponse(info=file_info(published[0], published[1]), sha256=actual)
                ledger.record([tunnel_pb2.ResponseChunk(write=response)], fingerprint)
                return response, False
            _drop_stale_temp(dir_fd, ledger.intent)
        ledger.intend(fingerprint, temp, st)
        failpoints.hit("files.before_rename")
        final_rel = _publish(dir_fd, temp, parts, mode, profile)
        failpoints.hit("files.before_record")
        response = files_pb2.WriteResponse(info=file_info(final_rel, st), sha256=actual)
        ledger.record([tunnel_pb2.ResponseChunk(write=response)], fingerprint)
        failpoints.hit("files.after_rename")
        return response, True


def _published(dir_fd: int, intent: dict[str, int | str], parts: Parts, mode: int,
               profile: FolderProfile) -> tuple[str, os.stat_result] | None:
    """The relative path and stat of the file the intent's temp file became, if its rename took effect."""
    name = parts[-1]
    prefix = rel_of(parts[:-1]) + "/" if len(parts) > 1 else ""
    # One pass over the folder (recovery is rare; numbered names may have gaps), then a stat to be sure.
    with os.scandir(dir_fd) as entries:
        found = [e.name for e in entries if e.inode() == intent["ino"]
                 and (e.name == name or (mode == files_pb2.WRITE_MODE_KEEP_BOTH and _is_numbered(e.name, name)))]
    for candidate in found:
        st = os.stat(candidate, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and _same_file(st, intent):
            return prefix + candidate, st
    return None


def _is_numbered(candidate: str, name: str) -> bool:
    """Whether `candidate` is one of KEEP_BOTH's numbered names for `name` ("a (3).csv" for "a.csv")."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        head, tail = name + " (", ")"
    else:
        head, tail = stem + " (", ")." + ext
    number = candidate[len(head):len(candidate) - len(tail)]
    return (candidate.startswith(head) and candidate.endswith(tail) and number.isdigit()
            and _keep_both_name(name, int(number)) == candidate)


def _drop_stale_temp(dir_fd: int, intent: dict[str, int | str]) -> None:
    """Remove the dead attempt's temp file, if it is still there and still that file."""
    temp = str(intent["temp"])
    with contextlib.suppress(OSError):
        st = os.stat(temp, dir_fd=dir_fd, follow_symlinks=False)
        if _same_file(st, intent):
            os.unlink(temp, dir_fd=dir_fd)


def _same_file(st: os.stat_result, intent: dict[str, int | str]) -> bool:
    """Whether `st` is the intent's file: the same inode, and not a later file given a freed inode."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
        intent["dev"], intent["ino"], intent["size"], intent["mtime_ns"])


def _keep_both_name(name: str, n: int) -> str:
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:  # "README" or ".profile": no extension to keep apart
        return f"{name} ({n})"
    return f"{stem} ({n}).{ext}"


def _publish_new(dir_fd: int, temp: str, name: str) -> None:
    """Give the temp file a name that must not exist yet (FileExistsError if it does), never replacing one."""
    if not rename_noreplace(dir_fd, temp, dir_fd, name):
        # Where renameat2 is missing: link() fails if the name exists, where rename() would replace it. For a
        # moment the file has two names, which is why the rename is tried first.
        os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        os.unlink(temp, dir_fd=dir_fd)


def _write_and_hash(fd: int, data: bytes, digest: hashlib._Hash) -> None:
    # In the worker thread: hashlib releases the GIL, so hashing overlaps the event loop's work.
    digest.update(data)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
