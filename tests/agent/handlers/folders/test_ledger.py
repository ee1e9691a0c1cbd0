"""Keyed file writes: the folder's ledger answers a retry as the first attempt was answered, and no caller reaches it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from onprem.agent.handlers.base import RequestContext
from onprem.agent.handlers.folders import FolderHandler
from onprem.agent.handlers.folders.common import TEMP_PREFIX
from onprem.agent.handlers.folders.ledger import TTL_SECONDS, Ledger
from onprem.agent.profiles import FolderProfile
from onprem.tunnel import idempotency
from onprem.tunnel.errors import AlreadyExists, FailedPrecondition, NotFound, PermissionDenied
from onprem.v1 import files_pb2, tunnel_pb2

LEDGER = ".onprem-ledger"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


@pytest.fixture
def handler(root: Path) -> FolderHandler:
    return FolderHandler({"f": FolderProfile(name="f", root=str(root))}, sweep=False)


async def body_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def run(handler: FolderHandler, op: files_pb2.FileOp, key: str | None = None,
              *body: bytes) -> list[tunnel_pb2.ResponseChunk]:
    kind = op.WhichOneof("operation")
    message = getattr(op, kind or "")
    keyed = None
    if key is not None:
        fp = idempotency.fingerprint(f"/onprem.v1.FileService/{kind}", message.profile, message)
        keyed = tunnel_pb2.Idempotency(key=key, fingerprint=fp)
    context = RequestContext(request_id=1, body=body_of(*body) if kind == "write" else None, idempotency=keyed)
    return [chunk async for chunk in handler.handle(op, context)]


def write(path: str) -> files_pb2.FileOp:
    return files_pb2.FileOp(write=files_pb2.WriteHeader(profile="f", path=path, mode=files_pb2.WRITE_MODE_KEEP_BOTH))


async def test_a_keyed_upload_retried_answers_as_the_first_time_and_leaves_one_file(
        handler: FolderHandler, root: Path) -> None:
    first = await run(handler, write("report.csv"), "upload-1", b"a,b\n")
    # KEEP_BOTH would make report (1).csv if the upload ran again.
    again = await run(handler, write("report.csv"), "upload-1", b"a,b\n")
    assert again == first
    assert sorted(os.listdir(root)) == [LEDGER, "report.csv"]


async def test_the_same_key_with_other_content_is_refused(handler: FolderHandler) -> None:
    await run(handler, write("x.csv"), "upload-2", b"one")
    with pytest.raises(FailedPrecondition, match="idempotency key 'upload-2' was already used") as info:
        await run(handler, write("x.csv"), "upload-2", b"two")
    assert info.value.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_a_keyed_delete_retried_answers_as_the_first_time_instead_of_not_found(
        handler: FolderHandler, root: Path) -> None:
    (root / "old.txt").write_text("x")
    op = files_pb2.FileOp(delete=files_pb2.DeleteRequest(profile="f", path="old.txt"))
    first = await run(handler, op, "delete-1")
    assert await run(handler, op, "delete-1") == first
    with pytest.raises(NotFound):
        await run(handler, op)  # without the key: as today


async def test_a_keyed_move_and_make_directory_answer_their_retries(handler: FolderHandler, root: Path) -> None:
    (root / "a.txt").write_text("x")
    move = files_pb2.FileOp(move=files_pb2.MoveRequest(profile="f", path="a.txt", destination_path="b.txt"))
    assert await run(handler, move, "move-1") == await run(handler, move, "move-1")
    mkdir = files_pb2.FileOp(make_directory=files_pb2.MakeDirectoryRequest(profile="f", path="new"))
    assert await run(handler, mkdir, "mkdir-1") == await run(handler, mkdir, "mkdir-1")
    assert sorted(os.listdir(root)) == [LEDGER, "b.txt", "new"]


@pytest.mark.parametrize("op", [
    files_pb2.FileOp(list=files_pb2.ListRequest(profile="f", path=LEDGER)),
    files_pb2.FileOp(stat=files_pb2.StatRequest(profile="f", path=LEDGER)),
    files_pb2.FileOp(read=files_pb2.ReadRequest(profile="f", path=f"{LEDGER}/anything")),
    files_pb2.FileOp(delete=files_pb2.DeleteRequest(profile="f", path=LEDGER, recursive=True)),
    files_pb2.FileOp(move=files_pb2.MoveRequest(profile="f", path=LEDGER, destination_path="stolen")),
    files_pb2.FileOp(move=files_pb2.MoveRequest(profile="f", path="x", destination_path=f"{LEDGER}/x")),
    files_pb2.FileOp(make_directory=files_pb2.MakeDirectoryRequest(profile="f", path=f"./{LEDGER}//y")),
    files_pb2.FileOp(write=files_pb2.WriteHeader(profile="f", path=f"docs/../{LEDGER}/z")),
], ids=["list", "stat", "read", "delete", "move-from", "move-into", "mkdir", "write"])
async def test_every_operation_is_refused_the_ledger(handler: FolderHandler, root: Path,
                                                      op: files_pb2.FileOp) -> None:
    await run(handler, write("seed.txt"), "seed", b"s")  # the ledger exists now
    with pytest.raises((PermissionDenied,)) as info:
        await run(handler, op, None, b"")
    assert info.value.reason in ("RESERVED_NAME", "PATH_OUTSIDE_ROOT")
    assert len(list((root / LEDGER).iterdir())) == 2  # the seed's record and its lock, untouched


async def test_a_listing_of_the_root_does_not_show_the_ledger(handler: FolderHandler) -> None:
    await run(handler, write("seed.txt"), "seed", b"s")
    [chunk] = await run(handler, files_pb2.FileOp(list=files_pb2.ListRequest(profile="f", path="")))
    assert [entry.path for entry in chunk.list.entries] == ["seed.txt"]


async def test_a_symlink_put_in_place_of_the_ledger_is_not_followed(handler: FolderHandler, root: Path,
                                                                  tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, root / LEDGER)
    with pytest.raises(FailedPrecondition) as info:
        await run(handler, write("y.txt"), "via-link", b"y")
    assert info.value.reason == "IDEMPOTENCY_LEDGER"
    assert list(elsewhere.iterdir()) == []


# --- an attempt that died between its intent and its outcome -----------------------------------------

def dead_attempt(root: Path, path: str, content: bytes, key: str) -> Path:
    """What an agent killed right after its intent leaves: a complete temp file and the intent naming it."""
    temp = root / f"{TEMP_PREFIX}deadbeefdeadbeef"
    temp.write_bytes(content)
    op = write(path)
    head = idempotency.fingerprint("/onprem.v1.FileService/write", "f", op.write)
    fingerprint = idempotency.with_body(head, hashlib.sha256(content).digest())
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with Ledger(root_fd, "f", tunnel_pb2.Idempotency(key=key, fingerprint=head)).held() as ledger:
            ledger.intend(fingerprint, temp.name, temp.stat())
    finally:
        os.close(root_fd)
    return temp


async def test_a_retry_after_the_dead_attempts_rename_answers_with_its_file_instead_of_writing_again(
        handler: FolderHandler, root: Path) -> None:
    temp = dead_attempt(root, "report.csv", b"a,b\n", "upload-9")
    (root / "report.csv").write_bytes(b"older")
    os.rename(temp, root / "report (1).csv")  # the dead attempt's KEEP_BOTH rename took effect
    [chunk] = await run(handler, write("report.csv"), "upload-9", b"a,b\n")
    assert (chunk.write.info.path, chunk.write.info.size) == ("report (1).csv", 4)
    assert sorted(os.listdir(root)) == [LEDGER, "report (1).csv", "report.csv"]  # no "report (2).csv"
    assert await run(handler, write("report.csv"), "upload-9", b"a,b\n") == [chunk]


async def test_a_retry_after_a_dead_attempt_that_never_renamed_writes_once_and_drops_its_temp(
        handler: FolderHandler, root: Path) -> None:
    dead_attempt(root, "report.csv", b"a,b\n", "upload-10")
    [chunk] = await run(handler, write("report.csv"), "upload-10", b"a,b\n")
    assert chunk.write.info.path == "report.csv"
    assert sorted(os.listdir(root)) == [LEDGER, "report.csv"]  # the dead attempt's temp file is gone
    assert (root / "report.csv").read_bytes() == b"a,b\n"


async def test_a_file_that_only_shares_the_name_is_not_taken_for_the_dead_attempts(
        handler: FolderHandler, root: Path) -> None:
    temp = dead_attempt(root, "report.csv", b"a,b\n", "upload-11")
    temp.unlink()
    (root / "report.csv").write_bytes(b"a,b\n")  # same name, same content, another inode: not the attempt's
    [chunk] = await run(handler, write("report.csv"), "upload-11", b"a,b\n")
    assert chunk.write.info.path == "report (1).csv"


async def test_an_intent_left_by_another_request_refuses_the_key(handler: FolderHandler, root: Path) -> None:
    dead_attempt(root, "report.csv", b"a,b\n", "upload-12")
    with pytest.raises(FailedPrecondition) as info:
        await run(handler, write("report.csv"), "upload-12", b"other content")
    assert info.value.reason == "IDEMPOTENCY_KEY_REUSED"


# --- expiry ------------------------------------------------------------------------------------------

def keyed(key: str) -> tunnel_pb2.Idempotency:
    return tunnel_pb2.Idempotency(key=key, fingerprint=hashlib.sha256(key.encode()).digest())


def record_at(root_fd: int, key: str, when: float) -> None:
    mkdir = tunnel_pb2.ResponseChunk(make_directory=files_pb2.MakeDirectoryResponse())
    with Ledger(root_fd, "f", keyed(key), clock=lambda: when).held() as ledger:
        ledger.record([mkdir])


@pytest.fixture
def root_fd(root: Path) -> Iterator[int]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_an_expired_record_no_longer_answers(root_fd: int) -> None:
    record_at(root_fd, "old", time.time() - TTL_SECONDS - 5)
    with Ledger(root_fd, "f", keyed("old")).held() as ledger:
        assert ledger.recorded() is None


def test_prune_deletes_the_expired_records_and_keeps_the_live_ones(root_fd: int, root: Path) -> None:
    record_at(root_fd, "old", time.time() - TTL_SECONDS - 5)
    record_at(root_fd, "new", time.time())
    with Ledger(root_fd, "f", keyed("other")).held() as ledger:
        assert ledger.prune() == 1
    names = {hashlib.sha256(k.encode()).hexdigest() for k in ("new", "other")}
    assert {n.removesuffix(".lock") for n in os.listdir(root / LEDGER)} == names


def test_prune_leaves_a_record_whose_key_an_attempt_holds(root_fd: int, root: Path) -> None:
    record_at(root_fd, "old", time.time() - TTL_SECONDS - 5)
    with Ledger(root_fd, "f", keyed("old")).held() as holder:
        with Ledger(root_fd, "f", keyed("pruner")).held() as pruner:
            assert pruner.prune() == 0
        assert holder.recorded() is None  # expired, but its holder may replace it under its lock
    with Ledger(root_fd, "f", keyed("pruner")).held() as pruner:
        assert pruner.prune() == 1


async def test_a_key_whose_record_expired_runs_its_write_again(handler: FolderHandler, root: Path,
                                                               root_fd: int) -> None:
    mkdir = files_pb2.FileOp(make_directory=files_pb2.MakeDirectoryRequest(profile="f", path="new"))
    await run(handler, mkdir, "mkdir-9")
    path = root / LEDGER / hashlib.sha256(b"mkdir-9").hexdigest()
    entry = json.loads(path.read_bytes())
    path.write_text(json.dumps({**entry, "expires_at": int(time.time()) - 1}))
    with pytest.raises(AlreadyExists):
        await run(handler, mkdir, "mkdir-9")  # ran again: the folder is there
