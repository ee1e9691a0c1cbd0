"""A folder profile's ledger of keyed writes: `.onprem-ledger/` in its root, which no caller can reach.

Every path that names `.onprem-ledger` at any depth is refused (`paths.split`) and listings and polls
never show it, so no operation (List, Stat, Read, Write, Delete, Move, MakeDirectory, Poll) reaches it;
the agent opens it from the root's descriptor without following a symlink, so a link put in its place
by a local user fails instead of being followed.

One file per key, named by the SHA-256 of the key, holds the request's fingerprint, the expiry and the
response (`tunnel.idempotency.encode_chunks`). A keyed Write, Delete, Move or MakeDirectory runs as:
take the key's lock (`fcntl.flock` on `<hash>.lock`: a second attempt with the key waits for the
first); answer from the key's record if there is one; else act, then write the record (a temp file,
fsync, rename, fsync of the folder).

A Write closes the gap between its final rename and its record with an *intent*: before the rename it
records, durably, the temp file's device, inode, size and modification time. A retry that finds an
intent instead of an outcome looks in the target's folder for that file (a rename keeps all four; an
inode reused by a later file differs in its times): found, the first attempt's
rename took effect and the retry answers with that file, recording the outcome; not found, the rename
never happened (the stale temp file is removed) and the retry writes. The one case it cannot tell is a
published file deleted or moved away by someone before the retry: then the retry writes it again.
Delete, Move and MakeDirectory record after acting; an agent that dies in between (one fsync apart)
leaves the retry to act again, which answers NOT_FOUND or ALREADY_EXISTS rather than acting twice.

Records expire after `TTL_SECONDS`; expired ones are deleted at most once a minute, when a record is made.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator

from onprem.agent.handlers.folders.paths import LEDGER_NAME
from onprem.tunnel import idempotency
from onprem.tunnel.errors import FailedPrecondition, Internal
from onprem.v1 import tunnel_pb2

__all__ = ["LEDGER_NAME", "TTL_SECONDS", "Ledger"]

#: How long a record answers retries: a day.
TTL_SECONDS = 86400
_PRUNE_INTERVAL_SECONDS = 60.0
_pruned_at: dict[str, float] = {}


class Ledger:
    """The ledger of one folder profile, for one keyed request."""

    def __init__(self, root_fd: int, profile: str, key: tunnel_pb2.Idempotency,
                 clock: Callable[[], float] = time.time) -> None:
        self._root_fd = root_fd
        self._profile = profile
        self.key = key.key
        self.fingerprint = key.fingerprint
        self._name = hashlib.sha256(key.key.encode()).hexdigest()
        self._clock = clock
        self._dir_fd: int | None = None
        #: The intent the key's entry holds (a Write that renamed, or was about to, and left no outcome).
        self.intent: dict[str, int | str] | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[Ledger]:
        """The key's lock, held for the block: one attempt with a key at a time."""
        dir_fd = self._open_dir()
        self._dir_fd = dir_fd
        try:
            lock = _lock(dir_fd, f"{self._name}.lock")
        except BaseException:
            os.close(dir_fd)
            self._dir_fd = None
            raise
        try:
            yield self
        finally:
            os.close(lock)  # drops the lock
            os.close(dir_fd)
            self._dir_fd = None

    def recorded(self, fingerprint: bytes | None = None) -> list[tunnel_pb2.ResponseChunk] | None:
        """The outcome recorded under the key, None when there is none (or it expired). An entry that holds
        an intent and no outcome yet sets `intent`.

        Raises FailedPrecondition (IDEMPOTENCY_KEY_REUSED) when it is another request's.
        """
        assert self._dir_fd is not None, "held() first"
        try:
            fd = os.open(self._name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir_fd)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            try:
                entry = json.loads(f.read())
                intent = entry.get("intent")
                outcome = None if intent is not None else idempotency.decode_chunks(bytes.fromhex(entry["outcome"]))
                if intent is not None:
                    intent = {"temp": str(intent["temp"]), "dev": int(intent["dev"]), "ino": int(intent["ino"]),
                              "size": int(intent["size"]), "mtime_ns": int(intent["mtime_ns"])}
                expires_at, recorded_fp = int(entry["expires_at"]), bytes.fromhex(entry["fingerprint"])
            except (ValueError, KeyError, TypeError, AttributeError):
                raise Internal(f"idempotency key '{self.key}': its ledger record in folder profile "
                               f"'{self._profile}' is damaged", reason="IDEMPOTENCY_RECORD") from None
        if expires_at < self._clock():
            return None
        if recorded_fp != (fingerprint or self.fingerprint):
            raise FailedPrecondition(
                f"idempotency key '{self.key}' was already used for another request (another method, profile, "
                "path or content); use a new key for a new request", reason=idempotency.REUSED)
        self.intent = intent
        return outcome

    def intend(self, fingerprint: bytes, temp: str, st: os.stat_result) -> None:
        """Record, durably, that the upload in temp file `temp` (`st`) is about to get its final name."""
        self._write({"fingerprint": fingerprint.hex(), "expires_at": int(self._clock()) + TTL_SECONDS,
                     "intent": {"temp": temp, "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
                                "mtime_ns": st.st_mtime_ns}})

    def record(self, chunks: list[tunnel_pb2.ResponseChunk], fingerprint: bytes | None = None) -> None:
        """Record the outcome under the key, durably, replacing an expired record or an intent."""
        now = self._clock()
        self._write({"fingerprint": (fingerprint or self.fingerprint).hex(), "expires_at": int(now) + TTL_SECONDS,
                     "outcome": idempotency.encode_chunks(chunks).hex()})
        if now - _pruned_at.get(self._profile, 0.0) >= _PRUNE_INTERVAL_SECONDS:
            _pruned_at[self._profile] = now
            self.prune()

    def _write(self, entry: dict[str, object]) -> None:
        """Replace the key's entry with `entry`: a temp file, fsync, rename, fsync of the folder."""
        dir_fd = self._dir_fd
        assert dir_fd is not None, "held() first"
        temp = f"{self._name}.{secrets.token_hex(4)}.new"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(entry).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self._name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)

    def prune(self) -> int:
        """Delete the expired records (and their lock files); how many."""
        dir_fd = self._dir_fd
        assert dir_fd is not None, "held() first"
        now = self._clock()
        pruned = 0
        for name in os.listdir(dir_fd):
            if len(name) != 64 or name == self._name:
                continue
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                with os.fdopen(fd, "rb") as f:
                    expires_at = int(json.loads(f.read())["expires_at"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if expires_at < now and self._prune_one(dir_fd, name):
                pruned += 1
        return pruned

    @staticmethod
    def _prune_one(dir_fd: int, name: str) -> bool:
        """Delete record `name` and its lock file, unless an attempt with that key holds the lock now."""
        try:
            lock = os.open(f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                           dir_fd=dir_fd)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # in use: its holder will replace the record
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
            # Unlinked while held: an attempt that opened it meanwhile sees it unlinked and opens anew.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{name}.lock", dir_fd=dir_fd)
            return True
        finally:
            os.close(lock)

    def _open_dir(self) -> int:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                return os.open(LEDGER_NAME, flags, dir_fd=self._root_fd)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(LEDGER_NAME, 0o700, dir_fd=self._root_fd)
            return os.open(LEDGER_NAME, flags, dir_fd=self._root_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise FailedPrecondition(
                    f"folder profile '{self._profile}': {LEDGER_NAME} in its root is not a folder (a symbolic "
                    "link or a file put there); remove it so that keyed writes can be recorded",
                    reason="IDEMPOTENCY_LEDGER") from None
            raise


def _lock(dir_fd: int, name: str) -> int:
    """Open and lock the lock file `name`, again if it was unlinked (pruned) while we waited for it."""
    while True:
        lock = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                linked = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino == os.fstat(lock).st_ino
            except FileNotFoundError:
                linked = False
        except BaseException:
            os.close(lock)
            raise
        if linked:
            return lock
        os.close(lock)
