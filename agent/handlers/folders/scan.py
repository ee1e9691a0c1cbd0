"""Folder scans that scale: paged listings and polls for changed files.

Both run in a worker thread and hold at most one page of stat results,
whatever the size of the tree. Both read folders only through descriptors
(`agent.handlers.folders.paths`): each folder is opened from the root's descriptor
without following a symlink, and its entries are stat'ed relative to that
folder's descriptor, so a folder swapped for a symlink mid-scan is skipped,
never followed. Symlinks are not listed, not reported, never descended into.

A page ends at `page_size` entries (or `max_files`), or earlier when the next
entry would make the encoded ResponseChunk larger than the tunnel's chunk
limit: the page's size is computed exactly, entry by entry, with the room the
page token or marker will need, so that a folder of long names pages instead
of failing.

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
import contextlib
import fnmatch
import heapq
import json
import os
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from onprem.agent.handlers.folders.common import file_info, listable, name_allowed, rel_of
from onprem.agent.handlers.folders.paths import Parts, open_at, walk
from onprem.tunnel.errors import InvalidArgument, ResourceExhausted
from onprem.v1 import files_pb2, tunnel_pb2

DEFAULT_PAGE_SIZE = 1000
#: The largest `page_size` and `max_files` a caller may ask for (documented in files.proto).
MAX_PAGE_SIZE = 10_000
DEFAULT_MAX_FILES = 1000
DEFAULT_SETTLE_MS = 2000
#: Below this a file changed right after a poll could get a change time the
#: poll already passed (the kernel stamps files from a clock one tick coarse).
MIN_SETTLE_MS = 50


def checked_count(value: int, default: int, field: str) -> int:
    """A page size or file count from a request: 0 is the default; above the maximum is the caller's error."""
    if value > MAX_PAGE_SIZE:
        raise InvalidArgument(f"'{field}' is {value}, above the maximum of {MAX_PAGE_SIZE}; ask for fewer and "
                              "follow the pages", reason="PAGE_SIZE_TOO_LARGE", field=field)
    return value or default


def _varint_size(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _field_size(payload: int) -> int:
    """A length-delimited field with a one-byte tag (field numbers up to 15) and `payload` bytes."""
    return 1 + _varint_size(payload) + payload


def _chunk_size(body: int, kind: str) -> int:
    """The encoded size of a ResponseChunk whose `kind` field holds a message of `body` bytes."""
    return _OUTER_TAG[kind] + _varint_size(body) + body


# The tag of `list` / `poll` in ResponseChunk, measured rather than assumed.
_OUTER_TAG = {
    "list": tunnel_pb2.ResponseChunk(list=files_pb2.ListResponse()).ByteSize() - 1,
    "poll": tunnel_pb2.ResponseChunk(poll=files_pb2.PollResponse()).ByteSize() - 1,
}


def _too_large(rel: str, limit: int) -> ResourceExhausted:
    return ResourceExhausted(f"the entry {rel[:200]!r} alone does not fit in a chunk of {limit} bytes",
                             reason="ENTRY_TOO_LARGE")


def _may_hold_after(folder_key: str, token: str) -> bool:
    """Whether some path under `folder_key` ("a/") can sort after `token`."""
    return not token or token < folder_key or token.startswith(folder_key)


class _Folder:
    """A folder being listed: its open descriptor and its children after the page token, smallest first (a heap)."""

    __slots__ = ("fd", "names", "parts", "prefix")

    def __init__(self, root_fd: int, parts: Parts, page_token: str) -> None:
        self.parts = parts
        self.prefix = rel_of(parts) + "/" if parts else ""
        self.fd = open_at(root_fd, parts, os.O_RDONLY | os.O_DIRECTORY)
        try:
            names = os.listdir(self.fd)  # C speed; types are looked up only for the entries a page takes
        except BaseException:
            self.close()
            raise
        prefix = self.prefix
        if page_token:
            # A child at or before the token can still hold later paths only when it is a prefix of the
            # token: "a" holds "a/x", which sorts after the token "a-b".
            names = [n for n in names if (rel := prefix + n) > page_token or page_token.startswith(rel)]
        heapq.heapify(names)
        self.names = names

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def list_page(root_fd: int, top: Parts, *, recursive: bool, glob: str, page_token: str,
              page_size: int, max_chunk_bytes: int) -> files_pb2.ListResponse:
    """One page of the entries under `top` whose path sorts after `page_token`.

    A k-way merge: the heap holds one key per open folder (its smallest child not yet
    taken) and one per sub-folder to read ("a/", which sorts after "a" and "a-b" but
    before all of a's children), so entries come out in full-path order and a folder
    is read only when the page reaches it. A folder's descriptor stays open while it
    has children left in the merge (one per level of the path the merge is at).
    """
    heap: list[tuple[str, _Folder | Parts]] = []
    opened: list[_Folder] = []

    def read_folder(parts: Parts) -> None:
        folder = _Folder(root_fd, parts, page_token)
        opened.append(folder)
        if folder.names:
            heapq.heappush(heap, (folder.prefix + folder.names[0], folder))
        else:
            folder.close()

    page: list[files_pb2.FileInfo] = []
    size = 0  # of the ListResponse's entries so far, encoded
    more = False
    try:
        read_folder(top)
        while heap:
            key, item = heapq.heappop(heap)
            if not isinstance(item, _Folder):
                try:
                    read_folder(item)
                except OSError:
                    pass  # a sub-folder that vanished, turned into a symlink, or that we may not read is skipped
                continue
            name = heapq.heappop(item.names)
            if item.names:
                heapq.heappush(heap, (item.prefix + item.names[0], item))
            try:
                # Checked here, for the entries a page takes, not for the whole folder on every page.
                st = os.stat(name, dir_fd=item.fd, follow_symlinks=False) if listable(name) else None
            except OSError:
                st = None  # vanished since the folder was read
            finally:
                if not item.names:
                    item.close()
            if st is None or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                continue  # symlinks, devices, FIFOs, sockets: never listed
            if (not page_token or key > page_token) and (not glob or fnmatch.fnmatchcase(name, glob)):
                info = file_info(key, st)
                entry = _field_size(info.ByteSize())
                # Room for this entry and, should it end the page, for the token naming it.
                if len(page) >= page_size or _chunk_size(
                        size + entry + _field_size(len(key.encode())), "list") > max_chunk_bytes:
                    if not page:
                        raise _too_large(key, max_chunk_bytes)
                    more = True
                    break
                page.append(info)
                size += entry
            # Only real folders are descended into: a symlink is never a folder here.
            if recursive and stat.S_ISDIR(st.st_mode) and _may_hold_after(key + "/", page_token):
                heapq.heappush(heap, (key + "/", (*item.parts, name)))
    finally:
        for folder in opened:
            folder.close()
    return files_pb2.ListResponse(entries=page, next_page_token=page[-1].path if more else "")


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


def poll(root_fd: int, top: Parts, req: files_pb2.PollRequest, read_patterns: Sequence[str],
         max_chunk_bytes: int) -> files_pb2.PollResponse:
    """The files under `top` changed after `req.marker` and settled, in (change time, path) order.

    The key is ctime, not mtime: a rename into the folder, a copy or an extracted archive can
    carry an mtime from the past, but the kernel sets ctime to now on every such change, and
    nothing can set it back (short of the clock itself). Only files changed before `cutoff`
    are reported: any change not yet visible to this scan will get a ctime after the cutoff,
    so a marker at or before the cutoff can never pass over a file that appears later, even
    among files sharing one coarse ctime. The price: a file is reported `settle_ms` after its
    last change, a metadata change (chmod, a new hard link) reports it again, and a writer that
    pauses longer than `settle_ms` mid-file gets it reported twice, half-done and then whole.

    Poll reports what Read would stream: names the read patterns allow, and (with read patterns)
    only files with one name.
    """
    marker = Marker.decode(req.marker)
    limit = checked_count(req.max_files, DEFAULT_MAX_FILES, "max_files")
    settle_ms = max(req.settle_ms or DEFAULT_SETTLE_MS, MIN_SETTLE_MS)
    # Taken before the scan: whatever changes during or after it gets a later change time,
    # so the next poll finds it even when this scan already walked past its name.
    cutoff = time.time_ns() - settle_ms * 1_000_000

    def candidates() -> Iterator[tuple[int, str, os.stat_result]]:
        for rel, st in _files(root_fd, top, req.recursive):
            if st.st_ctime_ns >= cutoff or (marker is not None and not marker.before(st.st_ctime_ns, rel)):
                continue
            name = rel.rsplit("/", 1)[-1]
            if (req.glob and not fnmatch.fnmatchcase(name, req.glob)) or not name_allowed(name, read_patterns):
                continue
            if read_patterns and st.st_nlink > 1:
                continue  # Read refuses it (common.readable_content): so is it not reported
            yield st.st_ctime_ns, rel, st

    found = heapq.nsmallest(limit + 1, candidates(), key=lambda c: (c[0], c[1]))
    has_more = len(found) > limit
    found = found[:limit]
    # Fill the page by bytes too, with room for the marker of its last entry and for has_more.
    finished = Marker(cutoff - 1, None)
    finished_size = max(_field_size(len(m.encode())) for m in (finished, marker) if m is not None)
    entries: list[files_pb2.FileInfo] = []
    size = 0
    for changed_ns, rel, st in found:
        info = file_info(rel, st)
        entry = _field_size(info.ByteSize())
        room = max(_field_size(len(Marker(changed_ns, rel).encode())), finished_size) + 2
        if _chunk_size(size + entry + room, "poll") > max_chunk_bytes:
            if not entries:
                raise _too_large(rel, max_chunk_bytes)
            has_more = True
            break
        entries.append(info)
        size += entry
    if has_more:
        last = found[len(entries) - 1]
        next_marker = Marker(last[0], last[1])
    else:
        # Every file that changed before the cutoff has been seen: the next poll can start there.
        next_marker = finished
        if marker is not None and next_marker.at_most(marker):
            next_marker = marker  # the clock went back: never move the marker backwards
    return files_pb2.PollResponse(entries=entries, marker=next_marker.encode(), has_more=has_more)


def _files(root_fd: int, top: Parts, recursive: bool) -> Iterator[tuple[str, os.stat_result]]:
    """Regular files under `top` with their stat; symlinks are never followed, nor reported."""
    with contextlib.closing(walk(root_fd, top)) as folders:
        for parts, _fd, entries in folders:
            if not all(listable(part) for part in parts[len(top):]):
                continue  # under a folder List does not show (not UTF-8, or an upload's reserved name)
            for entry in entries:
                if not listable(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)  # relative to the folder's descriptor
                except OSError:
                    continue  # vanished
                if stat.S_ISREG(st.st_mode):
                    yield rel_of((*parts, entry.name)), st
            if not recursive:
                return
