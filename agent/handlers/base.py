"""What every handler implements, and what it is given."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

from onprem.v1 import profiles_pb2, tunnel_pb2

#: The typed payload a handler runs: `DatabaseQuery`, `FileOp` or `AppCall` (see `tunnel.kinds`).
Payload = TypeVar("Payload", contravariant=True)

#: The largest `ResponseChunk` payload a handler should produce, in bytes.
#: The tunnel refuses chunks above the negotiated maximum (`Welcome.max_chunk_bytes`).
DEFAULT_MAX_CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class RequestContext:
    """What a handler knows about the request besides its payload."""

    request_id: int
    #: Request body bytes (file uploads, HTTP request bodies); None when the
    #: request has no body. Iterating it applies flow control to the sender.
    body: AsyncIterator[bytes] | None
    #: The largest chunk payload to yield, in serialized bytes.
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    #: The caller's idempotency key and the request's fingerprint, for a keyed write; None otherwise.
    idempotency: tunnel_pb2.Idempotency | None = None


class Handler(Protocol[Payload]):
    """Runs one kind of payload against the profiles of that kind."""

    def profiles(self) -> list[profiles_pb2.Profile]:
        """The profiles this handler offers, as advertised in Hello."""
        ...

    def handle(self, payload: Payload, context: RequestContext) -> AsyncIterator[tunnel_pb2.ResponseChunk]:
        """Run the request whose payload the dispatcher unwrapped, yielding result chunks; raise RequestError to fail.

        Cancellation arrives as `asyncio.CancelledError` at an await: stop the
        work (cancel the statement, close the file, abort the HTTP call) and
        re-raise it.
        """
        ...

    async def check(self, profile: str) -> list[profiles_pb2.ProfileCheck]:
        """Check that the profile works: reachable, credentials accepted, and what else the kind allows.

        Never raises for a failing check: each failure is a ProfileCheck with ok=False and a
        message saying what to fix. Raises NotFound for an unknown profile.
        """
        ...

    async def aclose(self) -> None:
        """Release pools, connections and threads."""
        ...
