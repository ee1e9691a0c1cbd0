"""Idempotency keys of writes: what both ends agree on.

A caller sends `idempotency-key` metadata with a write (ExecuteBatch, ExecuteTransaction, Query,
FileService Write/Delete/Move/MakeDirectory, AppService Call). The control plane checks the key,
binds it to a fingerprint of the request (`fingerprint`) and sends both in `RequestStart.idempotency`,
only to agents that offered the "idempotency" capability. The agent records the outcome under the key
where the write happens, so that a retry through any agent of the group answers from the record.

Keys are scoped to where the record lives: a database profile's idempotency table, a folder profile's
ledger, an app's own deduplication. Every agent of a group that offers the profile shares that scope;
the fingerprint names the method and the profile, so the same key sent for another request (or to
another profile sharing the table) is refused, never answered with the other request's outcome.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

from google.protobuf.message import Message

from onprem.tunnel.errors import InvalidArgument
from onprem.v1 import tunnel_pb2

__all__ = [
    "CAPABILITY", "MAX_KEY_BYTES", "METADATA_KEY", "REUSED", "check_key", "decode_chunks", "encode_chunks",
    "fingerprint", "is_keyed", "with_body",
]

#: The gRPC metadata that carries the key (`grpcurl -H 'idempotency-key: ...'`).
METADATA_KEY = "idempotency-key"
#: The Hello/Welcome capability of agents that honour keys.
CAPABILITY = "idempotency"
#: The longest key, in bytes (printable ASCII, so also in characters).
MAX_KEY_BYTES = 128
#: The ErrorInfo reason of a key sent again with another request.
REUSED = "IDEMPOTENCY_KEY_REUSED"


def check_key(key: str) -> str:
    """`key` if it is 1 to 128 printable ASCII characters; InvalidArgument naming the limit otherwise."""
    if not key or len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES or not all(
            " " <= ch <= "~" for ch in key):
        raise InvalidArgument(
            f"the {METADATA_KEY} metadata must be 1 to {MAX_KEY_BYTES} printable ASCII characters "
            f"(got {len(key.encode('utf-8', 'surrogatepass'))} bytes)",
            reason="INVALID_IDEMPOTENCY_KEY", field=METADATA_KEY)
    return key


def fingerprint(method: str, profile: str, request: Message) -> bytes:
    """SHA-256 over the method's full name, the profile and the request's deterministic serialization."""
    digest = hashlib.sha256()
    for part in (method.encode(), profile.encode(), request.SerializeToString(deterministic=True)):
        digest.update(struct.pack(">Q", len(part)))  # length-prefixed: no two requests share a byte string
        digest.update(part)
    return digest.digest()


def with_body(head: bytes, body_digest: bytes) -> bytes:
    """The fingerprint of a request with a body: its head's fingerprint and its body's SHA-256."""
    return hashlib.sha256(head + body_digest).digest()


def is_keyed(start: tunnel_pb2.RequestStart) -> bool:
    """Whether the request carries an idempotency key."""
    return start.HasField("idempotency") and bool(start.idempotency.key)


def encode_chunks(chunks: Iterable[tunnel_pb2.ResponseChunk]) -> bytes:
    """A recorded outcome: the response chunks, each prefixed by its length (4 bytes, big-endian)."""
    out = bytearray()
    for chunk in chunks:
        data = chunk.SerializeToString()
        out += struct.pack(">I", len(data))
        out += data
    return bytes(out)


def decode_chunks(data: bytes) -> list[tunnel_pb2.ResponseChunk]:
    """The chunks `encode_chunks` recorded; ValueError when the record is damaged."""
    chunks: list[tunnel_pb2.ResponseChunk] = []
    at = 0
    while at < len(data):
        if at + 4 > len(data):
            raise ValueError("truncated idempotency record")
        (size,) = struct.unpack_from(">I", data, at)
        at += 4
        if at + size > len(data):
            raise ValueError("truncated idempotency record")
        chunks.append(tunnel_pb2.ResponseChunk.FromString(data[at:at + size]))
        at += size
    return chunks
