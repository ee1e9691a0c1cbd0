"""What the data services' RPCs share: relaying a request to a profile of the service's kind.

Each data service (DatabaseService, FileService, AppService) holds one `Relaying` for its kind; an
RPC builds its `RequestStart` and hands it over, getting the `relay.RelayedRequest` (to stream or to
upload to) or its one result.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
from google.protobuf.message import Message

from onprem.control_plane.core import ControlPlane
from onprem.control_plane.relay import RelayedRequest
from onprem.tunnel import idempotency
from onprem.tunnel.errors import InvalidArgument
from onprem.v1 import tunnel_pb2

Context = grpc.aio.ServicerContext[Any, Any]


class Relaying:
    """Relays requests to profiles of one kind (a `ProfileKind`)."""

    def __init__(self, cp: ControlPlane, kind: int) -> None:
        self._cp = cp
        self._kind = kind

    def __call__(self, context: Context, group: str, profile: str,
                 start: tunnel_pb2.RequestStart) -> AbstractAsyncContextManager[RelayedRequest]:
        """The request, sent to an agent of `group` offering `profile`, for as long as the block runs."""
        return self._cp.relay(context, group=group, kind=self._kind, profile=profile, start=start)

    async def single(self, context: Context, group: str, profile: str,
                     start: tunnel_pb2.RequestStart) -> tunnel_pb2.ResponseChunk:
        """The one result of a unary operation."""
        async with self(context, group, profile, start) as request:
            return await request.single()


def attach_key(context: Context, method: str, profile: str, request: Message,
               start: tunnel_pb2.RequestStart) -> tunnel_pb2.RequestStart:
    """Put the call's `idempotency-key` (if any) and the request's fingerprint in `start`.

    `method` is the RPC's full name, e.g. "/onprem.v1.DatabaseService/ExecuteBatch"; `request` the
    operator's message (for streamed calls, the head). Raises InvalidArgument for a bad key.
    """
    keys = [value for name, value in context.invocation_metadata() or ()
            if name == idempotency.METADATA_KEY]
    if not keys:
        return start
    if len(keys) > 1:
        raise InvalidArgument(f"send one {idempotency.METADATA_KEY}, not {len(keys)}",
                              reason="INVALID_IDEMPOTENCY_KEY", field=idempotency.METADATA_KEY)
    key = keys[0] if isinstance(keys[0], str) else keys[0].decode("ascii", "replace")
    start.idempotency.key = idempotency.check_key(key)
    start.idempotency.fingerprint = idempotency.fingerprint(method, profile, request)
    return start
