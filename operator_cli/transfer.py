"""Large file transfers: streamed in 256 KiB chunks both ways, never held whole, verified by SHA-256."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from onprem.operator_cli.errors import ChecksumMismatch, LocalFileError
from onprem.v1 import files_pb2

CHUNK_SIZE = 256 * 1024
PART_SUFFIX = ".onprem-part"


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """A one-line, plain-text progress bar on a stream (stderr), redrawn at most ten times a second."""

    def __init__(self, label: str, total: int | None, stream: IO[str] | None) -> None:
        self._label = label
        self._total = total
        self._stream = stream
        self._done = 0
        self._start = time.monotonic()
        self._drawn = 0.0
        self._width = 0

    def advance(self, n: int) -> None:
        self._done += n
        now = time.monotonic()
        if self._stream is not None and now - self._drawn >= 0.1:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        assert self._stream is not None
        elapsed = max(now - self._start, 1e-6)
        rate = f"{human_size(self._done / elapsed)}/s"
        if self._total:
            fraction = min(self._done / self._total, 1.0)
            bar = "#" * int(fraction * 30)
            line = (f"{self._label} [{bar:<30}] {fraction * 100:5.1f}%  "
                    f"{human_size(self._done)} / {human_size(self._total)}  {rate}")
        else:
            line = f"{self._label} {human_size(self._done)}  {rate}"
        # Plain text: blanks, not terminal escapes, clear what a longer previous line left.
        self._stream.write("\r" + line.ljust(self._width))
        self._width = len(line)
        self._stream.flush()

    def finish(self) -> None:
        if self._stream is not None:
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def finish_download(part: Path, dest: Path, local_sha256: str, remote_sha256: str) -> None:
    """Publish a downloaded file at `dest` only when what was written hashes to the agent's SHA-256;
    otherwise remove the partial file and raise ChecksumMismatch."""
    if not remote_sha256:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{dest}: the stream ended without the agent's SHA-256; the partial file was removed")
    if local_sha256 != remote_sha256.lower():
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{dest}: the bytes received hash to {local_sha256}, but the agent sent {remote_sha256.lower()}; "
            "the partial file was removed"
        )
    os.replace(part, dest)


def download_destination(remote_path: str, dest: str | None, force: bool) -> Path:
    """Where a download lands: DEST, DEST/<name> when DEST is a folder, or ./<name>."""
    name = remote_path.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise LocalFileError(f"{remote_path!r} names no file; give a destination")
    target = Path(dest) if dest else Path(name)
    if target.is_dir():
        target = target / name
    if target.exists() and not force:
        raise LocalFileError(f"{target} already exists; pass --force to replace it")
    return target


def write_download(
    responses: Iterable[files_pb2.ReadResponse], target: Path, progress_stream: IO[str] | None, label: str
) -> tuple[files_pb2.FileInfo, str]:
    """Write a Read stream to `target` through a partial file, verify it, and return (info, sha256)."""
    part = target.with_name(target.name + PART_SUFFIX)
    info = files_pb2.FileInfo()
    remote = ""
    digest = hashlib.sha256()
    try:
        try:
            out = part.open("wb")
        except OSError as e:
            raise LocalFileError(f"cannot write {part}: {e.strerror}") from None
        with out:
            progress: Progress | None = None
            for message in responses:
                kind = message.WhichOneof("part")
                if kind == "info":
                    info = message.info
                    progress = Progress(label, info.size, progress_stream)
                elif kind == "data":
                    try:
                        out.write(message.data)
                    except OSError as e:
                        raise LocalFileError(f"cannot write {part}: {e.strerror}") from None
                    digest.update(message.data)
                    if progress is not None:
                        progress.advance(len(message.data))
                elif kind == "sha256":
                    remote = message.sha256
            if progress is not None:
                progress.finish()
        finish_download(part, target, digest.hexdigest(), remote)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return info, remote.lower()


def upload_requests(
    header: files_pb2.WriteHeader, local: Path, progress: Progress
) -> Iterator[files_pb2.WriteRequest]:
    """The Write stream: the header, then the file in 256 KiB chunks, read as gRPC asks for them."""
    yield files_pb2.WriteRequest(header=header)
    with local.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            progress.advance(len(chunk))
            yield files_pb2.WriteRequest(data=chunk)
    progress.finish()


def local_file_size(local: Path) -> int:
    try:
        st = local.stat()
    except OSError as e:
        raise LocalFileError(f"cannot read {local}: {e.strerror}") from None
    if not local.is_file():
        raise LocalFileError(f"{local} is not a file")
    with contextlib.suppress(OSError), local.open("rb"):
        return st.st_size
    raise LocalFileError(f"cannot read {local}: permission denied")
