"""Request bodies from operators (file uploads, HTTP request bodies) on their way to the agent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from onprem.control_plane.relay import RelayedRequest
from onprem.tunnel.errors import RequestError
from onprem.v1 import tunnel_pb2


async def pump_body(request: RelayedRequest, parts: AsyncIterator[bytes]) -> None:
    """Forward an operator's body to the agent, within the request's credit.

    A bad body message fails the request for whoever reads its result.
    """
    try:
        async for data in parts:
            await request.send_body(data)
        await request.send_body(b"", end_of_data=True)
    except RequestError as exc:
        request.fail(exc)


async def refuse_body(request: RelayedRequest, parts: AsyncIterator[bytes], error: RequestError) -> None:
    """Fail the request if the operator sends a body where none is allowed."""
    async for data in parts:
        if data:
            request.fail(error)
            return


async def result_while_uploading(request: RelayedRequest, parts: AsyncIterator[bytes]) -> tunnel_pb2.ResponseChunk:
    """Upload and wait for the one result; an early error from the agent stops the upload."""
    pump = asyncio.get_running_loop().create_task(pump_body(request, parts))
    try:
        return await request.single()
    finally:
        if not pump.done():
            pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
