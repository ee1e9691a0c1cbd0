"""List and Poll pages are sized by bytes: a page ends before the entry that would make its chunk pass the
tunnel's limit, the next page carries on, and `page_size` / `max_files` have a maximum (issue 11, finding 5)."""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path

import pytest

from onprem.agent.handlers.base import DEFAULT_MAX_CHUNK_BYTES, RequestContext
from onprem.agent.handlers.folders import FolderHandler
from onprem.agent.handlers.folders.scan import MAX_PAGE_SIZE
from onprem.agent.profiles import FolderProfile
from onprem.tunnel.errors import InvalidArgument
from onprem.v1 import files_pb2, tunnel_pb2

LONG = 250  # bytes per name: 600 of them made one List chunk of 321,004 bytes, above the 262,144 limit


def handler_for(root: Path) -> FolderHandler:
    return FolderHandler({"f": FolderProfile(name="f", root=str(root.resolve()))}, sweep=False)


async def call(handler: FolderHandler, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
               **op: object) -> tunnel_pb2.ResponseChunk:
    return await run_op(handler, files_pb2.FileOp(**op), max_chunk_bytes)  # type: ignore[arg-type]


async def run_op(handler: FolderHandler, op: files_pb2.FileOp,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> tunnel_pb2.ResponseChunk:
    context = RequestContext(request_id=1, body=None, max_chunk_bytes=max_chunk_bytes)
    [chunk] = [c async for c in handler.handle(op, context)]
    return chunk


def long_names(folder: Path, count: int, prefix: str = "") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{prefix}{i:05d}-".ljust(LONG, "x") for i in range(count)]
    for name in names:
        (folder / name).write_bytes(b"")
        os.utime(folder / name, (1_600_000_000, 1_600_000_000))
    return names


async def list_pages(handler: FolderHandler, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                     **kw: object) -> list[tunnel_pb2.ResponseChunk]:
    pages: list[tunnel_pb2.ResponseChunk] = []
    token = ""
    while True:
        chunk = await call(handler, max_chunk_bytes, list=files_pb2.ListRequest(
            profile="f", page_token=token, **kw))  # type: ignore[arg-type]
        pages.append(chunk)
        token = chunk.list.next_page_token
        if not token or len(pages) > 1000:
            return pages


async def poll_pages(handler: FolderHandler, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                     **kw: object) -> list[tunnel_pb2.ResponseChunk]:
    await asyncio.sleep(0.1)  # past the settle time of the files just made (Poll orders by change time)
    pages: list[tunnel_pb2.ResponseChunk] = []
    marker = ""
    while True:
        chunk = await call(handler, max_chunk_bytes, poll=files_pb2.PollRequest(
            profile="f", marker=marker, settle_ms=50, **kw))  # type: ignore[arg-type]
        pages.append(chunk)
        marker = chunk.poll.marker
        if not chunk.poll.has_more or len(pages) > 1000:
            return pages


async def test_a_list_of_600_long_names_comes_in_pages_each_within_the_chunk_limit(tmp_path: Path) -> None:
    names = long_names(tmp_path, 600)
    pages = await list_pages(handler_for(tmp_path))
    assert max(c.ByteSize() for c in pages) <= DEFAULT_MAX_CHUNK_BYTES
    assert len(pages) >= 2
    assert [e.path for c in pages for e in c.list.entries] == names


async def test_a_page_ends_only_when_the_next_entry_would_not_fit(tmp_path: Path) -> None:
    long_names(tmp_path, 600)
    pages = await list_pages(handler_for(tmp_path))
    assert len(pages) >= 2
    for page, following in itertools.pairwise(pages):
        fuller = tunnel_pb2.ResponseChunk()
        fuller.CopyFrom(page)
        fuller.list.entries.append(following.list.entries[0])
        fuller.list.next_page_token = following.list.entries[0].path
        assert fuller.ByteSize() > DEFAULT_MAX_CHUNK_BYTES


async def test_a_recursive_list_of_long_nested_paths_pages_within_a_small_chunk_limit(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 200) / ("e" * 200)
    names = long_names(deep, 40)
    pages = await list_pages(handler_for(tmp_path), max_chunk_bytes=8192, recursive=True)
    assert max(c.ByteSize() for c in pages) <= 8192
    expected = ["d" * 200, f"{'d' * 200}/{'e' * 200}"] + [f"{'d' * 200}/{'e' * 200}/{n}" for n in names]
    assert [e.path for c in pages for e in c.list.entries] == expected


async def test_a_poll_of_600_long_names_comes_in_pages_each_within_the_chunk_limit(tmp_path: Path) -> None:
    names = long_names(tmp_path, 600)
    pages = await poll_pages(handler_for(tmp_path))
    assert max(c.ByteSize() for c in pages) <= DEFAULT_MAX_CHUNK_BYTES
    assert len(pages) >= 2
    assert sorted(e.path for c in pages for e in c.poll.entries) == names  # each once: none missed or repeated


async def test_a_poll_page_cut_by_bytes_says_has_more_and_its_marker_carries_on(tmp_path: Path) -> None:
    long_names(tmp_path, 600)
    await asyncio.sleep(0.1)
    first = await call(handler_for(tmp_path), poll=files_pb2.PollRequest(profile="f", settle_ms=50))
    assert first.poll.has_more
    assert 0 < len(first.poll.entries) < 600


@pytest.mark.parametrize(("operation", "field"), [("list", "page_size"), ("poll", "max_files")])
async def test_a_page_size_above_the_maximum_is_invalid_argument_naming_the_field(
        tmp_path: Path, operation: str, field: str) -> None:
    op = (files_pb2.FileOp(list=files_pb2.ListRequest(profile="f", page_size=MAX_PAGE_SIZE + 1))
          if operation == "list" else
          files_pb2.FileOp(poll=files_pb2.PollRequest(profile="f", max_files=MAX_PAGE_SIZE + 1)))
    with pytest.raises(InvalidArgument) as info:
        await run_op(handler_for(tmp_path), op)
    assert info.value.field == field
    assert str(MAX_PAGE_SIZE) in info.value.message


@pytest.mark.parametrize(("operation", "count"), [("list", "page_size"), ("poll", "max_files")])
async def test_a_page_size_at_the_maximum_is_accepted(tmp_path: Path, operation: str, count: str) -> None:
    (tmp_path / "a.txt").write_text("a")
    await asyncio.sleep(0.1)
    op = (files_pb2.FileOp(list=files_pb2.ListRequest(profile="f", page_size=MAX_PAGE_SIZE))
          if operation == "list" else
          files_pb2.FileOp(poll=files_pb2.PollRequest(profile="f", max_files=MAX_PAGE_SIZE, settle_ms=50)))
    chunk = await run_op(handler_for(tmp_path), op)
    assert chunk.WhichOneof("body") == operation


def test_the_documented_maximum_is_the_enforced_one() -> None:
    proto = (Path(__file__).resolve().parents[4] / "protos" / "onprem" / "v1" / "files.proto").read_text()
    assert proto.count(f"at most {MAX_PAGE_SIZE:,}") == 2  # page_size and max_files
