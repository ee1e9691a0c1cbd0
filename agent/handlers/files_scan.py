"""Folder scans that scale: paged listings and polls for changed files.

Both run in a worker thread and hold at most one page of stat results,
whatever the size of the tree.

Listing order is the full relative path as a string ("a", "a-b", "a/x"),
which is not per-folder depth-first order: a sibling "a-b" sorts between
folder "a" and its children. `list_page` merges lazily: each folder read so
far is a heap of its child names, and a sub-folder waits in the merge as the
key "a/" (after "a" and "a-b", before every "a/..."), to be read only when
the page reaches it; names before the page token are dropped as a folder is
read. A page of a flat 100,000-entry folder therefore costs one `listdir`
and a heapify of names (about 0.1 s), plus an lstat per entry it returns,
never a stat or FileInfo per entry of the folder.

Polls must look at every file (there is no index to ask), but keep only the
`max_files` + 1 oldest changes after the marker, with `heapq.nsmallest`.
Why change time and a settle delay make polls never miss or repeat a file
is documented on `FileService.Poll` in files.proto and on `poll` below.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import heapq
import json
import os
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from agent.handlers.files_common import TEMP_NAME, file_info, name_allowed, stat_entry
from agent.handlers.paths import ConfinedPath, follow, open_confined
from onprem.v1 import files_pb2
from tunnel.errors import InvalidArgument, RequestError

DEFAULT_MAX_FILES = 1000
DEFAULT_SETTLE_MS = 2000
#: Below this a file changed right after a poll could get a change time the
#: poll already passed (the kernel stamps files from a clock one tick coarse).
MIN_SETTLE_MS = 50


def _children(folder: ConfinedPath) -> Iterator[os.DirEntry[str]]:
    """The entries of a folder, opened so that a symlink swapped in for it cannot lead outside."""
    fd = open_confined(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if not TEMP_NAME.match(entry.name):  # uploads in progress are not files yet
                    yield entry
    finally:
        os.close(fd)


def _child(folder: ConfinedPath, name: str) -> ConfinedPath:
    rel = f"{folder.rel}/{name}" if folder.rel else name
    return ConfinedPath(root=folder.root, rel=rel, real=os.path.join(folder.real, name))


def _may_hold_after(folder_key: str, token: str) -> bool:
    """Whether some path under `folder_key` ("a/") can sort after `token`."""
    return not token or token < folder_key or token.startswith(folder_key)


class _Folder:
    """A folder being listed: its children after the page token, smallest first (a heap)."""

    __slots__ = ("names", "path", "prefix")

    def __init__(self, path: ConfinedPath, page_token: str) -> None:
        self.path = path
        self.prefix = path.rel + "/" if path.rel else ""
        fd = open_confined(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            names = os.listdir(fd)  # C speed; types are looked up only for the entries a page takes
        finally:
            os.close(fd)
        prefix = self.prefix
        if page_token:
            # A child at or before the token can still hold later paths only when it is a prefix of the
            # token: "a" holds "a/x", which sorts after the token "a-b".
            names = [n for n in names if (rel := prefix + n) > page_token or page_token.startswith(rel)]
        heapq.heapify(names)
        self.names = names


def list_page(top: ConfinedPath, *, recursive: bool, glob: str, page_token: str,
              page_size: int) -> files_pb2.ListResponse:
    """One page of the entries under `top` whose path sorts after `page_token`.

    A k-way merge: the heap holds one key per open folder (its smallest child not yet
    taken) and one per sub-folder to read ("a/", which sorts after "a" and "a-b" but
    before all of a's children), so entries come out in full-path order and a folder
    is read only when the page reaches it.
    """
    heap: list[tuple[str, _Folder | ConfinedPath]] = []

    def read_folder(path: ConfinedPath) -> None:
        folder = _Folder(path, page_token)
        if folder.names:
            heapq.heappush(heap, (folder.prefix + folder.names[0], folder))

    read_folder(top)
    page: list[files_pb2.FileInfo] = []
    while heap and len(page) <= page_size:
        key, item = heapq.heappop(heap)
        if isinstance(item, ConfinedPath):
            try:
                read_folder(item)
            except (RequestError, OSError):
                pass  # a sub-folder that vanished or that we may not read is skipped
            continue
        name = heapq.heappop(item.names)
        if item.names:
            heapq.heappush(heap, (item.prefix + item.names[0], item))
        info = _entry(item.path, name, key)
        if info is None:
            continue
        st, is_folder = info
        if (not page_token or key > page_token) and (not glob or fnmatch.fnmatchcase(name, glob)):
            page.append(file_info(key, st))
        # Only real folders are descended into, so symlink loops cannot recurse.
        if recursive and is_folder and _may_hold_after(key + "/", page_token):
            heapq.heappush(heap, (key + "/", _child(item.path, name)))
    more = len(page) > page_size
    page = page[:page_size]
    return files_pb2.ListResponse(entries=page, next_page_token=page[-1].path if more else "")


def _entry(folder: ConfinedPath, name: str, rel: str) -> tuple[os.stat_result, bool] | None:
    """What a listing shows for a child, and whether it is a real folder; None: not listed."""
    if TEMP_NAME.match(name):
        return None  # an upload in progress is not a file yet
    try:
        st = os.lstat(os.path.join(folder.real, name))
        if stat.S_ISLNK(st.st_mode):
            # Listed with its target's type when that stays inside the root; never descended into.
            return stat_entry(ConfinedPath(root=folder.root, rel=rel, real=os.path.join(folder.real, name))), False
    except (RequestError, OSError):
        return None  # vanished, or a symlink out of the root
    if stat.S_ISDIR(st.st_mode):
        return st, True
    return (st, False) if stat.S_ISREG(st.st_mode) else None  # devices, FIFOs, sockets: never


# --- polls -------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=False)
class Marker:
    """A position in (change time, path) order: everything up to it has been delivered.

    `path` None means every path at `changed_ns`.
    """

    changed_ns: int
    path: str | None

    def before(self, changed_ns: int, path: str) -> bool:
        """Whether the file key (changed_ns, path) comes after this marker."""
        if changed_ns != self.changed_ns:
            return changed_ns > self.changed_ns
        return self.path is not None and path > self.path

    def at_most(self, other: Marker) -> bool:
        if self.changed_ns != other.changed_ns:
            return self.changed_ns < other.changed_ns
        return other.path is None or (self.path is not None and self.path <= other.path)

    def encode(self) -> str:
        raw = json.dumps({"v": 1, "t": self.changed_ns, "p": self.path}, separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @staticmethod
    def decode(text: str) -> Marker | None:
        if not text:
            return None
        try:
            raw = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            if raw.get("v") == 1 and isinstance(raw["t"], int) and isinstance(raw["p"], str | None):
                return Marker(raw["t"], raw["p"])
        except (ValueError, binascii.Error, KeyError, AttributeError, TypeError):
            pass
        raise InvalidArgument("'marker' is not a marker this agent returned; pass the last poll's marker, "
                              "or none to start over", reason="INVALID_MARKER")


def poll(top: ConfinedPath, req: files_pb2.PollRequest, read_patterns: Sequence[str]) -> files_pb2.PollResponse:
    """The files under `top` changed after `req.marker` and settled, in (change time, path) order.

    The key is ctime, not mtime: a rename into the folder, a copy or an extracted archive can
    carry an mtime from the past, but the kernel sets ctime to now on every such change, and
    nothing can set it back (short of the clock itself). Only files changed before `cutoff`
    are reported: any change not yet visible to this scan will get a ctime after the cutoff,
    so a marker at or before the cutoff can never pass over a file that appears later, even
    among files sharing one coarse ctime. The price: a file is reported `settle_ms` after its
    last change, a metadata change (chmod, a new hard link) reports it again, and a writer that
    pauses longer than `settle_ms` mid-file gets it reported twice, half-done and then whole.
    """
    marker = Marker.decode(req.marker)
    limit = req.max_files or DEFAULT_MAX_FILES
    settle_ms = max(req.settle_ms or DEFAULT_SETTLE_MS, MIN_SETTLE_MS)
    # Taken before the scan: whatever changes during or after it gets a later change time,
    # so the next poll finds it even when this scan already walked past its name.
    cutoff = time.time_ns() - settle_ms * 1_000_000

    def candidates() -> Iterator[tuple[int, str, os.stat_result]]:
        for path, st in _files(top, req.recursive):
            if st.st_ctime_ns >= cutoff or (marker is not None and not marker.before(st.st_ctime_ns, path.rel)):
                continue
            if (req.glob and not fnmatch.fnmatchcase(path.name, req.glob)) or not name_allowed(path.name, read_patterns):
                continue
            yield st.st_ctime_ns, path.rel, st

    found = heapq.nsmallest(limit + 1, candidates(), key=lambda c: (c[0], c[1]))
    has_more = len(found) > limit
    found = found[:limit]
    if has_more:
        next_marker = Marker(found[-1][0], found[-1][1])
    else:
        # Every file that changed before the cutoff has been seen: the next poll can start there.
        next_marker = Marker(cutoff - 1, None)
        if marker is not None and next_marker.at_most(marker):
            next_marker = marker  # the clock went back: never move the marker backwards
    return files_pb2.PollResponse(
        entries=[file_info(rel, st) for _, rel, st in found], marker=next_marker.encode(), has_more=has_more)


def _files(top: ConfinedPath, recursive: bool) -> Iterator[tuple[ConfinedPath, os.stat_result]]:
    """Regular files under `top` (through symlinks that stay inside the root), with their stat."""
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            # Consumed while the folder's descriptor is open: DirEntry.stat works relative to it.
            for entry in _children(folder):
                child = _child(folder, entry.name)
                try:
                    st = os.stat(follow(child)) if entry.is_symlink() else entry.stat(follow_symlinks=False)
                except (RequestError, OSError):
                    continue  # vanished, or a symlink out of the root
                if stat.S_ISREG(st.st_mode):
                    yield child, st
                elif recursive and stat.S_ISDIR(st.st_mode) and not entry.is_symlink():
                    stack.append(child)
        except (RequestError, OSError):
            if folder is top:
                raise
            # A sub-folder that vanished or that we may not read holds nothing to report.
