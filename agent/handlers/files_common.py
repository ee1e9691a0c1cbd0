"""What the folder operations share: OS errors as statuses, FileInfo, name rules.

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

from agent.handlers.paths import ConfinedPath, follow
from onprem.v1 import files_pb2
from tunnel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RequestError,
    ResourceExhausted,
)

TEMP_PREFIX = ".onprem-tmp-"
#: Exactly the names uploads in progress get; only these are ever swept, and callers may not create them.
TEMP_NAME = re.compile(r"^\.onprem-tmp-[0-9a-f]{16}$")

# errno -> (error class, reason); the one table OS errors go through.
_ERRNO_TABLE: dict[int, tuple[type[RequestError], str]] = {
    errno.ENOENT: (NotFound, "PATH_NOT_FOUND"),
    errno.EEXIST: (AlreadyExists, "PATH_EXISTS"),
    errno.EACCES: (PermissionDenied, "OS_PERMISSION_DENIED"),
    errno.EPERM: (PermissionDenied, "OS_PERMISSION_DENIED"),
    errno.ENOSPC: (ResourceExhausted, "DISK_FULL"),
    errno.EDQUOT: (ResourceExhausted, "DISK_QUOTA"),
    errno.EFBIG: (ResourceExhausted, "FILE_TOO_LARGE"),
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
def os_errors(rel: str) -> Iterator[None]:
    """Turn OSError into a RequestError that names the relative path only."""
    try:
        yield
    except OSError as exc:
        cls, reason = _ERRNO_TABLE.get(exc.errno or 0, (FailedPrecondition, "OS_ERROR"))
        raise cls(f"path {rel!r}: {exc.strerror or type(exc).__name__}", reason=reason) from None


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


def stat_entry(path: ConfinedPath) -> os.stat_result:
    """Stat what `path` names, refusing symlinks that leave the root and special files."""
    with os_errors(path.rel):
        st = os.stat(follow(path))
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise PermissionDenied(f"path {path.rel!r} is a device, FIFO or socket", reason="SPECIAL_FILE")
    return st


def name_allowed(name: str, patterns: Sequence[str]) -> bool:
    """No patterns allow every name; otherwise the name must match one of them."""
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def require_name(path: ConfinedPath, patterns: Sequence[str], what: str) -> None:
    if not name_allowed(path.name, patterns):
        raise PermissionDenied(
            f"path {path.rel!r}: the folder profile allows {what} only names matching {', '.join(patterns)}",
            reason="NAME_NOT_ALLOWED",
        )


def refuse_reserved(path: ConfinedPath) -> None:
    """Temp names are ours: a caller's file by such a name would be swept as a stale upload."""
    if TEMP_NAME.match(path.name):
        raise InvalidArgument(f"path {path.rel!r}: names like {TEMP_PREFIX}… are reserved for uploads in progress",
                              reason="RESERVED_NAME")
