"""The control plane's state folder on disk: private to its user, whatever the umask.

The folder holds the CA key, the server key and the SQLite store (hashed tokens,
the audit log), so it is made 0700 and every file in it 0600. Modes are set
explicitly after creation (`fchmod`/`chmod`), because a mode passed to `open`
or `mkdir` is only an upper bound that the process's umask narrows.

SQLite gives its `-wal` and `-shm` files the mode of the database file, so
creating the database file 0600 before SQLite first opens it covers all three.

A folder or file found with a looser mode at start is reported with a warning
that names it and says how to fix it; it is not changed behind the admin's
back (a backup user may have been given access on purpose). The one exception
is a state folder that exists but is still empty (made for us by a service
manager, e.g. systemd's `StateDirectory=` makes it 0755, or by a packager):
populating it is creating it, so it is made 0700 first.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("onprem.control_plane.state")

DIR_MODE = 0o700
FILE_MODE = 0o600
_OTHERS = 0o077  # group and world bits


def private_dir(path: Path) -> Path:
    """Make `path` (and missing parents) a folder; the folder itself is created 0700.

    An existing folder keeps its mode, unless it is empty: then nothing of ours is in it
    yet, and it is made 0700 as if we had created it.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            return path  # made by a concurrent process; checked like any existing folder
        os.chmod(path, DIR_MODE)
    elif path.is_dir() and stat.S_IMODE(path.stat().st_mode) != DIR_MODE and not any(path.iterdir()):
        log.info("making the empty state folder %s private (mode 0700)", path)
        os.chmod(path, DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty and 0600 unless it exists (an existing file keeps its content and mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return path
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write `path` whole, 0600 from its first byte (never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
    finally:
        if fd != -1:
            os.close(fd)


def write_new_private(path: Path, data: bytes) -> None:
    """Write a new file 0600; refuses (FileExistsError) to replace one, e.g. a token file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
    finally:
        if fd != -1:
            os.close(fd)


def loose_modes(state_dir: Path) -> list[tuple[Path, int]]:
    """Folders and files under `state_dir` (itself included) that others may read or enter."""
    found: list[tuple[Path, int]] = []
    if not state_dir.exists():
        return found
    for path in [state_dir, *sorted(state_dir.rglob("*"))]:
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue  # e.g. a -shm file removed while we looked
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & _OTHERS:
            found.append((path, mode))
    return found


def warn_about_loose_modes(state_dir: Path) -> list[tuple[Path, int]]:
    """Log a warning for each folder or file under `state_dir` that others may read."""
    found = loose_modes(state_dir)
    for path, mode in found:
        fix = "700" if path.is_dir() else "600"
        log.warning("%s is open to other users (mode %04o), but holds the control plane's keys and tokens; "
                    "run: chmod %s %s", path, mode, fix, path)
    return found


def prepare_state_dir(state_dir: Path, *, sqlite_file: Path | None) -> None:
    """Make the state folder private, pre-create the SQLite store 0600, warn about loose modes."""
    private_dir(state_dir)
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        private_file(sqlite_file)
    warn_about_loose_modes(state_dir)
