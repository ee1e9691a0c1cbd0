"""Where a path is confined: every folder operation reaches the disk through this module.

Two lines of defence.

1. **The text.** A path is refused before it touches the disk when it could mean something else on some layer:
   NUL, control characters, backslashes, drive letters, percent-encodings, "..", absolute paths, overlong names
   (`split`).
2. **The disk.** A path is resolved from an open descriptor of the profile's root, one component at a time,
   never through a symbolic link: with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`
   where the kernel has it (Linux 5.6; probed once), else by a walk that opens each component with
   `O_PATH | O_NOFOLLOW` relative to the one before and checks on the opened descriptor that it is a folder. The
   operation then acts on the final name with the `*at` calls on the parent's descriptor (`unlink(dir_fd=)`,
   `rename(src_dir_fd=, dst_dir_fd=)`, `mkdir(dir_fd=)`, `stat(dir_fd=, follow_symlinks=False)`), so nothing is
   checked by name and then used by name: a folder swapped for a symlink between two steps makes the next step
   fail with ELOOP (PERMISSION_DENIED), never leave the root.

Symlinks are never followed, not even those that stay inside the root: whether a link stays inside can only be
decided by following it, and a local user can change it between that decision and the use. Every operation
refuses a path that is, or passes through, a symlink; listings and polls leave symlinks out, and a recursive
Delete removes a symlink inside the folder as a name, never what it points to.

What this cannot stop, because it is not a path: a folder that a local user moves out of the root while an
operation holds it open (the operation finishes in that folder, which holds only what that user put there), a
hard link a local user made to a file elsewhere (see `FolderHandler` for what read patterns do about links),
and mount points inside the root, which the site made.

Errors leave this module as OSError (ELOOP for "a symlink was in the way"); `common.os_errors` turns them
into statuses. Nothing here knows a profile.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import stat
from collections.abc import Generator, Sequence

from onprem.tunnel.errors import InvalidArgument, PermissionDenied

__all__ = [
    "MAX_COMPONENT_BYTES",
    "MAX_PATH_BYTES",
    "Escape",
    "Parts",
    "open_at",
    "open_folder",
    "open_parent",
    "open_root",
    "openat2_supported",
    "outside",
    "remove_tree",
    "rename_noreplace",
    "split",
    "walk",
]

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096

#: A path as its components, e.g. ("docs", "2026", "report.csv"); () is the root.
Parts = tuple[str, ...]

_PERCENT_ENCODED = re.compile(r"%[0-9A-Fa-f]{2}")
_DRIVE = re.compile(r"^[A-Za-z]:")


# --- the text ----------------------------------------------------------------------------------------------


def _invalid(path: str, why: str, field: str) -> InvalidArgument:
    return InvalidArgument(f"path {path!r} {why}", reason="INVALID_PATH", field=field)


#: The folder in a root where the agent records keyed writes (`ledger`); reserved at every depth.
LEDGER_NAME = ".onprem-ledger"


def outside(rel: str) -> PermissionDenied:
    return PermissionDenied(f"path {rel!r} leads outside the folder profile's root", reason="PATH_OUTSIDE_ROOT")


def split(path: str, field: str = "path") -> Parts:
    """Check the text of a profile-relative path and split it; "" and "." name the root."""
    shown = path if len(path) <= 200 else path[:200] + "..."
    if "\x00" in path:
        raise _invalid(shown.replace("\x00", "\\0"), "contains a NUL byte", field)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise _invalid(shown, "contains a control character", field)
    if "\\" in path:
        raise _invalid(shown, "contains a backslash; separate folders with '/'", field)
    if _DRIVE.match(path):
        raise _invalid(shown, "starts with a drive letter", field)
    if _PERCENT_ENCODED.search(path):
        raise _invalid(shown, "contains a percent-encoded sequence; send the characters themselves", field)
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(shown, "is not valid UTF-8", field) from None
    if len(encoded) > MAX_PATH_BYTES:
        raise _invalid(shown, f"is longer than {MAX_PATH_BYTES} bytes", field)
    if path.startswith("/"):
        raise outside(shown)
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    for part in parts:
        if part == "..":
            raise outside(shown)
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise _invalid(shown, f"has a name longer than {MAX_COMPONENT_BYTES} bytes", field)
        if part == LEDGER_NAME:
            # The agent's ledger of keyed writes (`ledger`): no operation may reach it, lists included.
            raise PermissionDenied(f"path {shown!r}: the name {LEDGER_NAME} is reserved for the agent's records",
                                   reason="RESERVED_NAME")
    return parts


# --- openat2 -----------------------------------------------------------------------------------------------

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
#: Not RESOLVE_NO_XDEV: a mount inside the root is the site's choice (an NFS share under an export folder),
#: and an unprivileged local user cannot make one that the agent's mount namespace sees.
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
#: openat2's number in the generic syscall table, which x86-64 and the 64-bit ARM and RISC-V tables share.
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "riscv64": 437, "ppc64le": 437, "s390x": 437}.get(os.uname().machine)
_RENAME_NOREPLACE = 1


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_OpenHow), ctypes.c_size_t]
_renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28
if _renameat2 is not None:
    _renameat2.restype = ctypes.c_int
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]

#: None until probed; tests set it to False to run the walk.
_openat2_available: bool | None = None if _SYS_OPENAT2 is not None else False


def _openat2(dir_fd: int, path: str, flags: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE)
    encoded = os.fsencode(path)
    for _ in range(8):
        fd = _syscall(_SYS_OPENAT2, dir_fd, encoded, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return int(fd)
        code = ctypes.get_errno()
        if code not in (errno.EAGAIN, errno.EINTR):  # EAGAIN: a rename raced the lookup; the kernel asks to retry
            raise OSError(code, os.strerror(code))
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))


def openat2_supported() -> bool:
    """Whether this kernel (and any seccomp filter around us) lets openat2 resolve beneath a descriptor."""
    global _openat2_available
    if _openat2_available is None:
        top = os.open("/", os.O_PATH | os.O_CLOEXEC)
        try:
            os.close(_openat2(top, ".", os.O_PATH))
        except OSError:  # ENOSYS (old kernel), EPERM (seccomp), E2BIG/EINVAL (an older struct): walk instead
            _openat2_available = False
        else:
            _openat2_available = True
        finally:
            os.close(top)
    return _openat2_available


# --- resolving ---------------------------------------------------------------------------------------------


class Escape(OSError):
    """The kernel refused a resolution that would have left the folder it started from."""


def _symlink_in_the_way() -> OSError:
    return OSError(errno.ELOOP, "is or passes through a symbolic link")


def _walk_to(dir_fd: int, parts: Sequence[str], *, create: bool = False) -> int:
    """An O_PATH descriptor of the folder `parts` under `dir_fd`, opened one component at a time.

    O_PATH | O_NOFOLLOW opens whatever the name is at that instant, a symlink included, and the check is then
    made on the descriptor itself, so there is no window between the check and the next step.
    """
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for part in parts:
            for _ in range(8):
                try:
                    child = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):  # a racing creator made it: use theirs
                        os.mkdir(part, 0o777, dir_fd=fd)
                    continue
                break
            else:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
            mode = os.fstat(child).st_mode
            os.close(fd)
            fd = child
            if stat.S_ISLNK(mode):
                raise _symlink_in_the_way()
            if not stat.S_ISDIR(mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_at(dir_fd: int, parts: Sequence[str], flags: int) -> int:
    """Open `parts` under the folder `dir_fd`, never through a symlink, the last component with `flags`.

    A symlink anywhere, the last component included, fails with ELOOP. `flags` must not hold O_NOFOLLOW or
    O_CREAT (files are created with a single-name `os.open` on the parent's descriptor), and O_PATH only with
    O_DIRECTORY (an O_PATH | O_NOFOLLOW open of a final symlink would return the link itself).
    """
    if not parts:
        return os.open(".", flags | os.O_CLOEXEC, dir_fd=dir_fd)
    if openat2_supported():
        try:
            return _openat2(dir_fd, "/".join(parts), flags)
        except OSError as exc:
            if exc.errno == errno.EXDEV:  # RESOLVE_BENEATH stopped an escape (split() refuses ".." already)
                raise Escape(errno.EXDEV, "leads outside the root") from None
            raise
    parent = _walk_to(dir_fd, parts[:-1])
    try:
        if flags & os.O_DIRECTORY:
            # O_DIRECTORY | O_NOFOLLOW reports a symlink as ENOTDIR, like a file: tell them apart on a descriptor.
            leaf = _walk_to(parent, parts[-1:])
            try:
                return os.open(".", flags | os.O_CLOEXEC, dir_fd=leaf)
            finally:
                os.close(leaf)
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    finally:
        os.close(parent)


def open_folder(dir_fd: int, parts: Sequence[str], *, create: bool = False, readable: bool = False) -> int:
    """A descriptor of the folder `parts` under `dir_fd`, creating missing folders when asked.

    O_PATH unless `readable`: enough for the *at calls and needs only search permission; a readable
    descriptor is needed to list the folder or to fsync it.
    """
    if not create:
        return open_at(dir_fd, parts, (os.O_RDONLY if readable else os.O_PATH) | os.O_DIRECTORY)
    fd = _walk_to(dir_fd, parts, create=True)
    if not readable:
        return fd
    try:
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def open_parent(dir_fd: int, parts: Sequence[str], *, create: bool = False, readable: bool = False) -> int:
    """A descriptor of the folder holding the last component of `parts` (which must not be empty)."""
    return open_folder(dir_fd, parts[:-1], create=create, readable=readable)


def open_root(root: str) -> int:
    """A descriptor of a profile's root. The path itself is trusted: the site wrote it, and the config loader
    resolved its symlinks; O_NOFOLLOW still refuses a root replaced by a symlink since."""
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


# --- acting ------------------------------------------------------------------------------------------------


def rename_noreplace(src_fd: int, src: str, dst_fd: int, dst: str) -> bool:
    """Rename without ever replacing `dst` (EEXIST if it exists); False where the kernel or the file system
    cannot do that atomically, and the caller must fall back."""
    if _renameat2 is None:
        return False
    if _renameat2(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL):
        # EINVAL is also "a folder into itself", but the fallback's own rename then fails the same way.
        return False
    raise OSError(code, os.strerror(code))


def walk(dir_fd: int, parts: Parts = ()) -> Generator[tuple[Parts, int, list[os.DirEntry[str]]], None, None]:
    """Every folder from `parts` down (`parts` itself first), depth first, never through a symlink.

    Yields the folder's parts relative to `dir_fd`, a readable descriptor of it and its entries, which are
    valid until the caller asks for the next folder (DirEntry.stat works relative to that descriptor). A
    sub-folder that vanishes or turns into a symlink before its turn is skipped; an error on `parts` itself
    propagates. One descriptor is open at a time, however wide or deep the tree.
    """
    stack: list[Parts] = [parts]
    while stack:
        here = stack.pop()
        try:
            fd = open_at(dir_fd, here, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            if here == parts:
                raise
            continue
        try:
            with os.scandir(fd) as it:
                entries = list(it)
            yield here, fd, entries
            # While the descriptor is open: without d_type from the file system, is_dir() stats relative to it.
            stack.extend((*here, e.name) for e in reversed(entries) if e.is_dir(follow_symlinks=False))
        finally:
            os.close(fd)


def remove_tree(parent_fd: int, name: str) -> None:
    """Delete the folder `name` in `parent_fd` and everything in it, never through a symlink.

    Each folder is opened from its parent's descriptor with the same no-symlink rule, so a sub-folder
    swapped for a symlink mid-way fails the delete (ELOOP) instead of emptying what the link points to; a
    symlink inside is removed as a name. Descriptors open: one per level.
    """
    stack: list[tuple[int, str, int, list[str]]] = []  # (parent fd, name, fd, sub-folders still to remove)

    def descend(pfd: int, child: str) -> None:
        fd = open_at(pfd, (child,), os.O_RDONLY | os.O_DIRECTORY)
        subfolders: list[str] = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        subfolders.append(entry.name)
                    else:
                        os.unlink(entry.name, dir_fd=fd)
        except BaseException:
            os.close(fd)
            raise
        stack.append((pfd, child, fd, subfolders))

    try:
        descend(parent_fd, name)
        while stack:
            pfd, child, fd, subfolders = stack[-1]
            if subfolders:
                descend(fd, subfolders.pop())
                continue
            stack.pop()
            os.close(fd)
            os.rmdir(child, dir_fd=pfd)
    finally:
        for _pfd, _child, fd, _subfolders in stack:
            os.close(fd)
