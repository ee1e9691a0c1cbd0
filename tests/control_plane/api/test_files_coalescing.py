"""FileService.Read merges the data chunks that arrived together into messages of at most 1 MiB."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from onprem.control_plane.api.files import MAX_READ_DATA, _coalesced
from onprem.control_plane.relay import RelayedRequest
from onprem.control_plane.sessions import Exchange, _End
from onprem.tunnel.errors import Unavailable
from onprem.tunnel.events import ChunkReceived
from onprem.v1 import files_pb2, tunnel_pb2

PIECE = 256 * 1024 - 64


def data(fill: bytes, size: int = PIECE) -> tunnel_pb2.ResponseChunk:
    chunk = tunnel_pb2.ResponseChunk()
    chunk.read.data = fill * size
    return chunk


def digest() -> tunnel_pb2.ResponseChunk:
    return tunnel_pb2.ResponseChunk(read=files_pb2.ReadResponse(sha256="ab" * 32))


class Queued:
    """What `RelayedRequest.take_ready` sees: chunks that already arrived."""

    def __init__(self, *chunks: tunnel_pb2.ResponseChunk) -> None:
        self.chunks = list(chunks)

    def take_ready(self, fits: Callable[[tunnel_pb2.ResponseChunk], bool]) -> tunnel_pb2.ResponseChunk | None:
        if self.chunks and fits(self.chunks[0]):
            return self.chunks.pop(0)
        return None


def coalesce(first: tunnel_pb2.ResponseChunk, queued: Queued) -> files_pb2.ReadResponse:
    return _coalesced(first.read, cast(RelayedRequest, queued))


def test_chunks_that_arrived_together_go_out_as_one_message_up_to_1_mib() -> None:
    queued = Queued(data(b"b"), data(b"c"), data(b"d"), data(b"e"))
    merged = coalesce(data(b"a"), queued)
    assert merged.data == b"a" * PIECE + b"b" * PIECE + b"c" * PIECE + b"d" * PIECE
    assert len(merged.data) <= MAX_READ_DATA
    assert [c.read.data[:1] for c in queued.chunks] == [b"e"]  # the fifth would pass 1 MiB: it waits


def test_a_lone_chunk_goes_as_it_came() -> None:
    first = data(b"a")
    assert coalesce(first, Queued()) is first.read


def test_the_digest_behind_the_data_is_never_merged_into_it() -> None:
    queued = Queued(data(b"b"), digest())
    merged = coalesce(data(b"a"), queued)
    assert merged.data == b"a" * PIECE + b"b" * PIECE
    assert queued.chunks[0].read.sha256 == "ab" * 32


class Session:
    """The part of AgentSession an Exchange uses when its chunks are consumed."""

    def __init__(self) -> None:
        self.consumed: list[int] = []

    def _consumed(self, rid: int, size: int) -> None:
        self.consumed.append(size)

    def _cancel(self, rid: int, reason: str) -> None:
        pass


def exchange() -> tuple[Exchange, Session]:
    session = Session()
    return Exchange(cast(Any, session), 1), session


async def test_take_ready_takes_only_what_arrived_and_fits_and_credits_it_with_the_chunk_before() -> None:
    ex, session = exchange()
    ex._deliver(ChunkReceived(1, data(b"a", 10), 100))
    ex._deliver(ChunkReceived(1, data(b"b", 10), 100))
    ex._deliver(ChunkReceived(1, digest(), 50))
    first = await ex.__anext__()
    assert first.read.data == b"a" * 10
    assert ex.take_ready(lambda c: c.read.WhichOneof("part") == "data") is not None
    assert ex.take_ready(lambda c: c.read.WhichOneof("part") == "data") is None  # the digest does not fit
    assert ex.bytes_out == 200
    assert session.consumed == []
    last = await ex.__anext__()
    assert last.read.sha256 == "ab" * 32
    assert session.consumed == [200]  # both merged chunks, credited when the operator asked for more


async def test_take_ready_never_takes_the_end_of_the_request() -> None:
    ex, _ = exchange()
    ex._deliver(ChunkReceived(1, data(b"a", 10), 100))
    ex._deliver(_End(Unavailable("the agent went away", reason="AGENT_LOST")))
    await ex.__anext__()
    assert ex.take_ready(lambda _c: True) is None
    assert not ex.ended
