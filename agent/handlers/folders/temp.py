"""Temp files of uploads in progress, and the sweep of those a killed agent left behind.

An upload writes to `.onprem-tmp-<16 hex>` beside its target and holds an
exclusive `flock` on it for its whole life; the kernel drops that lock when
the process dies, however it dies. A temp file is stale exactly when its
name is ours and nobody holds its lock, so the sweep never deletes a live
upload, neither this agent's nor that of another agent sharing the folder
(network file systems map `flock` to byte-range locks). Names of this exact
form are reserved: callers cannot create them, so the sweep deletes only
files we made.

The sweep walks the whole tree of each writable root, because a temp file
sits beside its target at any depth. It runs once per agent start, in one
background thread, so it delays neither start-up nor requests (listings and
polls already hide temp names); its cost is one walk of each tree,
roughly a second per 100,000 entries.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import stat
import threading
from collections.abc import Iterable

from onprem.agent.handlers.folders.common import TEMP_NAME, TEMP_PREFIX
from onprem.agent.handlers.folders.paths import open_root, walk

log = logging.getLogger("onprem.agent.files")


def new_temp(dir_fd: int) -> tuple[str, int]:
    """Create and lock a fresh temp file in the folder `dir_fd`; returns its name and descriptor."""
    name = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        os.unlink(name, dir_fd=dir_fd)
        raise
    return name, fd


def sweep_root(root: str) -> int:
    """Delete the stale temp files under `root`; returns how many went.

    The walk is `paths.walk` from the root's descriptor: a folder swapped for a symlink during the sweep is
    skipped, never followed, so the sweep deletes nothing outside the root.
    """
    removed = 0
    root_fd = open_root(root)
    try:
        for _parts, dir_fd, entries in walk(root_fd):
            for entry in entries:
                if TEMP_NAME.match(entry.name) and _remove_if_stale(entry.name, dir_fd):
                    removed += 1
    finally:
        os.close(root_fd)
    return removed


def _remove_if_stale(name: str, dir_fd: int) -> bool:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False  # gone already, or a symlink: not ours
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # an upload in progress holds it
        # Holding the lock, nobody can be writing it; check the name still means this file.
        by_name = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        mine = os.fstat(fd)
        if (by_name.st_dev, by_name.st_ino) != (mine.st_dev, mine.st_ino):
            return False
        os.unlink(name, dir_fd=dir_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class Sweeper:
    """Runs one sweep of the writable roots in a background thread."""

    def __init__(self, roots: Iterable[tuple[str, str]]) -> None:
        self._roots = list(roots)  # (profile name, root)
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="onprem-temp-sweep", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            for profile, root in self._roots:
                try:
                    removed = sweep_root(root)
                except OSError as exc:
                    log.warning("folder profile %s: could not sweep stale uploads: %s", profile, exc.strerror)
                    continue
                if removed:
                    log.info("folder profile %s: removed %d stale temp files of interrupted uploads",
                             profile, removed)
        finally:
            self.done.set()
