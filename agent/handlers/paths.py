"""Confinement of profile-relative paths to a folder profile's root.

Two lines of defence. First the text: a path is refused before it touches the
disk when it could mean something else on some layer (NUL, backslashes, drive
letters, percent-encodings, "..", absolute paths, overlong names). Then the
disk: symlinks in the parent chain are resolved and the result must stay under
the root; files and folders are opened without following a final symlink, and
the opened descriptor's real path (from /proc/self/fd) is checked again, so a
symlink swapped in between the check and the open cannot lead outside.

Every message names the profile-relative path, never the absolute one.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass

from tunnel.errors import InvalidArgument, PermissionDenied

__all__ = ["ConfinedPath", "confine", "follow", "open_confined", "verify_fd"]

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096

_PERCENT_ENCODED = re.compile(r"%[0-9A-Fa-f]{2}")
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ConfinedPath:
    """A path checked to lie under `root`; `real` has no symlinks above its final component."""

    root: str
    rel: str  # normalized, "/"-separated, "" for the root itself
    real: str

    @property
    def is_root(self) -> bool:
        return self.rel == ""

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]

    @property
    def parent_real(self) -> str:
        return os.path.dirname(self.real) if not self.is_root else self.real


def _invalid(path: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"path {path!r} {why}", reason="INVALID_PATH", field="path")


def outside(rel: str) -> PermissionDenied:
    return PermissionDenied(f"path {rel!r} leads outside the folder profile's root", reason="PATH_OUTSIDE_ROOT")


def _components(path: str) -> list[str]:
    """Check the text of a relative path and split it; "" and "." name the root."""
    shown = path if len(path) <= 200 else path[:200] + "..."
    if "\x00" in path:
        raise _invalid(shown.replace("\x00", "\\0"), "contains a NUL byte")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise _invalid(shown, "contains a control character")
    if "\\" in path:
        raise _invalid(shown, "contains a backslash; separate folders with '/'")
    if _DRIVE.match(path):
        raise _invalid(shown, "starts with a drive letter")
    if _PERCENT_ENCODED.search(path):
        raise _invalid(shown, "contains a percent-encoded sequence; send the characters themselves")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(shown, "is not valid UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise _invalid(shown, f"is longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise outside(shown)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise outside(shown)
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise _invalid(shown, f"has a name longer than {MAX_COMPONENT_BYTES} bytes")
    return parts


def _inside(root: str, real: str) -> bool:
    return real == root or real.startswith(root.rstrip("/") + "/")


def confine(root: str, path: str) -> ConfinedPath:
    """Resolve `path` under `root` (itself a real path), without following its final component."""
    parts = _components(path)
    rel = "/".join(parts)
    if not parts:
        return ConfinedPath(root=root, rel="", real=root)
    parent = os.path.realpath(os.path.join(root, *parts[:-1]))
    if not _inside(root, parent):
        raise outside(rel)
    return ConfinedPath(root=root, rel=rel, real=os.path.join(parent, parts[-1]))


def follow(path: ConfinedPath) -> str:
    """The real path that `path` names, following a final symlink only if it stays under the root."""
    real = os.path.realpath(path.real)
    if not _inside(path.root, real):
        raise outside(path.rel)
    return real


def verify_fd(fd: int, path: ConfinedPath, expected: str | None = None) -> os.stat_result:
    """Check that an opened descriptor is where we meant, and is a file or folder."""
    try:
        actual = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: fall back to the device and inode of what we resolved
        actual = None
    info = os.fstat(fd)
    if actual is not None:
        if not _inside(path.root, actual) or (expected is not None and actual != expected):
            raise outside(path.rel)
    elif expected is not None:
        resolved = os.stat(expected, follow_symlinks=False)
        if (resolved.st_dev, resolved.st_ino) != (info.st_dev, info.st_ino):
            raise outside(path.rel)
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise PermissionDenied(f"path {path.rel!r} is a device, FIFO or socket", reason="SPECIAL_FILE")
    return info


def open_confined(path: ConfinedPath, flags: int, mode: int = 0o644) -> int:
    """Open `path` without following a final symlink, then check where the descriptor really is.

    A FIFO would block `open` itself, so everything is opened non-blocking and
    the flag is cleared once `verify_fd` has seen a regular file or folder.
    """
    real = follow(path)
    try:
        fd = os.open(real, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink was swapped in after follow()
            raise outside(path.rel) from None
        raise
    try:
        verify_fd(fd, path, real)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
