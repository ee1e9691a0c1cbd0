"""A hostile local process for the folder race tests: swaps folders and symlinks inside a root, forever.

    python -m tests.support.folder_swapper ROOT

It works on the tree `tests.support.folder_race.build` makes. In a tight loop, with `renameat2(RENAME_EXCHANGE)`
(atomic: at every instant each name exists and is either the folder or the symlink) it swaps

- the folder `a` with the symlink `link` (to the folder outside the root),
- inside `a`: the folder `sub` with the symlink `sublink`, the file `file.txt` with the symlink `filelink`,

and with plain renames (so that for a moment the name is missing, then a symlink) it moves the folder `c` away,
puts a symlink to the outside folder at `c`, and moves the folder back. It works on descriptors of the folders it
opened at start, so it keeps swapping whatever names they have at the moment. It prints "ready" once it has
started and runs until it is killed.
"""

from __future__ import annotations

import ctypes
import os
import sys

RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def exchange(dir_fd: int, one: bytes, other: bytes) -> None:
    _renameat2(dir_fd, one, dir_fd, other, RENAME_EXCHANGE)  # a failure (a name missing) is just a lost turn


def dance(root_fd: int, outside: str) -> None:
    """c: a folder, then missing, then a symlink out of the root, then missing, then the folder again."""
    try:
        os.rename("c", "c-away", src_dir_fd=root_fd, dst_dir_fd=root_fd)
        os.symlink(outside, "c", dir_fd=root_fd)
        os.unlink("c", dir_fd=root_fd)
    except OSError:
        pass
    try:
        os.rename("c-away", "c", src_dir_fd=root_fd, dst_dir_fd=root_fd)
    except OSError:
        pass


def main(root: str) -> None:
    outside = os.readlink(os.path.join(root, "link"))
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    a_fd = os.open("a", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
    print("ready", flush=True)
    while True:
        for _ in range(20):
            exchange(root_fd, b"a", b"link")
            exchange(a_fd, b"sub", b"sublink")
            exchange(a_fd, b"file.txt", b"filelink")
            exchange(root_fd, b"a", b"link")
            exchange(a_fd, b"file.txt", b"filelink")
            exchange(a_fd, b"sub", b"sublink")
        dance(root_fd, outside)


if __name__ == "__main__":
    main(sys.argv[1])
