"""What the folder operations share: the one table OS errors go through, FileInfo, the rules on names, and
the profile's root opened for one operation.

Every message names the profile-relative path, never the absolute one.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import re
import stat
from collections.abc import Iterator, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from onprem.agent.handlers.folders.paths import LEDGER_NAME, Escape, Parts, open_root, outside
from onprem.agent.profiles.folders import FolderProfile
from onprem.tunnel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RequestError,
    ResourceExhausted,
    Unavailable,
)
from onprem.v1 import files_pb2

TEMP_PREFIX = ".onprem-tmp-"
#: Exactly the names uploads in progress get; only these are ever swept, and callers may not create them.
TEMP_NAME = re.compile(r"^\.onprem-tmp-[0-9a-f]{16}$")

_SYMLINK = "is or passes through a symbolic link, and folder profiles never follow symbolic links"

# errno -> (error class, reason, what to say instead of strerror); the one table OS errors go through.
_ERRNO_TABLE: dict[int, tuple[type[RequestError], str, str | None]] = {
    errno.ENOENT: (NotFound, "PATH_NOT_FOUND", "does not exist"),
    errno.EEXIST: (AlreadyExists, "PATH_EXISTS", "already exists"),
    errno.ENOTEMPTY: (FailedPrecondition, "DIRECTORY_NOT_EMPTY", "is a folder that is not empty"),
    errno.EISDIR: (FailedPrecondition, "IS_A_DIRECTORY", "is a folder"),
    errno.ENOTDIR: (FailedPrecondition, "NOT_A_DIRECTORY", "is not a folder, or a folder on it is a file"),
    errno.ELOOP: (PermissionDenied, "SYMLINK_NOT_FOLLOWED", _SYMLINK),
    errno.EACCES: (PermissionDenied, "OS_PERMISSION_DENIED", "is not accessible to the agent's user"),
    errno.EPERM: (PermissionDenied, "OS_PERMISSION_DENIED", "may not be changed by the agent's user"),
    errno.ENXIO: (PermissionDenied, "SPECIAL_FILE", "is a device, FIFO or socket"),
    errno.ENODEV: (PermissionDenied, "SPECIAL_FILE", "is a device, FIFO or socket"),
    errno.EROFS: (FailedPrecondition, "READ_ONLY_FILESYSTEM", "is on a read-only file system"),
    errno.EXDEV: (FailedPrecondition, "CROSS_DEVICE", "is on another file system than the other path"),
    errno.EBUSY: (FailedPrecondition, "BUSY", "is in use (a mount point?)"),
    errno.ETXTBSY: (FailedPrecondition, "BUSY", "is a program being run"),
    errno.EOPNOTSUPP: (FailedPrecondition, "NOT_SUPPORTED", "does not support this operation"),
    errno.ENOSPC: (ResourceExhausted, "DISK_FULL", None),
    errno.EDQUOT: (ResourceExhausted, "DISK_QUOTA", None),
    errno.EFBIG: (ResourceExhausted, "FILE_TOO_LARGE", None),
    errno.EMLINK: (ResourceExhausted, "TOO_MANY_LINKS", None),
    errno.EMFILE: (ResourceExhausted, "TOO_MANY_OPEN_FILES", "cannot be opened: the agent has too many files open"),
    errno.ENFILE: (ResourceExhausted, "TOO_MANY_OPEN_FILES", "cannot be opened: the system has too many files open"),
    errno.ENOMEM: (ResourceExhausted, "OUT_OF_MEMORY", None),
    errno.ENAMETOOLONG: (InvalidArgument, "NAME_TOO_LONG", "is too long for the file system"),
    errno.EINVAL: (InvalidArgument, "INVALID_PATH", "is not valid here (a folder into itself?)"),
    errno.EILSEQ: (InvalidArgument, "INVALID_PATH", "has a name the file system does not accept"),
    errno.EAGAIN: (Unavailable, "TRY_AGAIN", "is busy; try again"),
    errno.EINTR: (Unavailable, "TRY_AGAIN", "was interrupted; try again"),
    errno.EIO: (Unavailable, "IO_ERROR", "could not be read or written: the disk reported an I/O error"),
    errno.ESTALE: (Unavailable, "STALE_FILE_HANDLE", "went stale on a network file system; try again"),
    errno.ETIMEDOUT: (Unavailable, "TIMED_OUT", "timed out on a network file system; try again"),
}
if errno.ENOTSUP != errno.EOPNOTSUPP:
    _ERRNO_TABLE[errno.ENOTSUP] = _ERRNO_TABLE[errno.EOPNOTSUPP]


def os_error(rel: str, exc: OSError, field: str = "path") -> RequestError:
    """The status an OSError on the profile-relative path `rel` stands for."""
    if isinstance(exc, Escape):
        return outside(rel)
    code = exc.errno or 0
    cls, reason, says = _ERRNO_TABLE.get(code, (FailedPrecondition, "OS_ERROR", None))
    shown = repr(rel) if rel else "'.' (the root)"
    what = says or exc.strerror or errno.errorcode.get(code, type(exc).__name__)
    message = f"path {shown} {what}" if says else f"path {shown}: {what}"
    if cls is InvalidArgument:
        return InvalidArgument(message, reason=reason, field=field)
    return cls(message, reason=reason)


@contextlib.contextmanager
def os_errors(rel: str, field: str = "path") -> Iterator[None]:
    """Turn OSError into a RequestError that names the relative path only (never the OS's own message
    with an absolute path in it)."""
    try:
        yield
    except OSError as exc:
        raise os_error(rel, exc, field) from None


def rel_of(parts: Parts) -> str:
    return "/".join(parts)


def _timestamp(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def file_info(rel: str, st: os.stat_result) -> files_pb2.FileInfo:
    kind = files_pb2.FILE_TYPE_DIRECTORY if stat.S_ISDIR(st.st_mode) else files_pb2.FILE_TYPE_FILE
    return files_pb2.FileInfo(
        path=rel,
        name=rel.rsplit("/", 1)[-1],
        type=kind,
        size=st.st_size if kind == files_pb2.FILE_TYPE_FILE else 0,
        modified_at=_timestamp(st.st_mtime_ns),
        changed_at=_timestamp(st.st_ctime_ns),
    )


def require_entry(rel: str, st: os.stat_result) -> os.stat_result:
    """Only regular files and folders are shown or touched: a symlink or special file is refused."""
    if stat.S_ISLNK(st.st_mode):
        raise PermissionDenied(f"path {rel!r} {_SYMLINK}", reason="SYMLINK_NOT_FOLLOWED")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise PermissionDenied(f"path {rel!r} is a device, FIFO or socket", reason="SPECIAL_FILE")
    return st


def name_allowed(name: str, patterns: Sequence[str]) -> bool:
    """No patterns allow every name; otherwise the name must match one of them."""
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def require_name(rel: str, patterns: Sequence[str], what: str) -> None:
    if not name_allowed(rel.rsplit("/", 1)[-1], patterns):
        raise PermissionDenied(
            f"path {rel!r}: the folder profile allows {what} only names matching {', '.join(patterns)}",
            reason="NAME_NOT_ALLOWED",
        )


def readable_content(rel: str, st: os.stat_result, read_patterns: Sequence[str]) -> None:
    """With read patterns, only a file with exactly one name is read: a hard link gives one content several
    names, and the other names (which the agent cannot find without searching the disk) may be hidden ones."""
    if read_patterns and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        raise PermissionDenied(
            f"path {rel!r} has {st.st_nlink} names (hard links); the folder profile's read patterns allow "
            "reading only files with one name, since another name may be one the patterns hide",
            reason="HARD_LINK")


def refuse_reserved(parts: Parts, field: str = "path") -> None:
    """Temp names are ours: a caller's file or folder by such a name would be hidden, or swept as a stale upload."""
    for part in parts:
        if TEMP_NAME.match(part):
            raise InvalidArgument(
                f"path {rel_of(parts)!r}: names like {TEMP_PREFIX}… are reserved for uploads in progress",
                reason="RESERVED_NAME", field=field)


def listable(name: str) -> bool:
    """Whether a name found on disk can be shown: uploads in progress are not files yet, and a name that is
    not UTF-8 (Python's surrogate escapes) cannot travel in a protobuf string nor be asked for."""
    if TEMP_NAME.match(name) or name == LEDGER_NAME:
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextlib.contextmanager
def open_profile_root(profile: FolderProfile) -> Iterator[int]:
    """The profile's root, open for one operation."""
    try:
        fd = open_root(profile.root)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES, errno.EPERM):
            raise os_error("", exc) from None  # e.g. EMFILE: the agent's state, not the root's
        raise FailedPrecondition(f"folder profile '{profile.name}': its root cannot be opened on the agent "
                                 f"({exc.strerror}); the site must fix it", reason="ROOT_UNAVAILABLE") from None
    try:
        yield fd
    finally:
        os.close(fd)
