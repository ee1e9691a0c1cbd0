"""`onprem.v1.AppService`: HTTP calls relayed to an app profile of a group."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from control_plane.api import errors
from control_plane.api.files import pump_body
from control_plane.app import ControlPlane
from onprem.v1 import apps_pb2, apps_pb2_grpc, profiles_pb2, tunnel_pb2
from tunnel.errors import InvalidArgument

Context = grpc.aio.ServicerContext[Any, Any]


class AppService(apps_pb2_grpc.AppServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp

    @errors.streaming
    async def Call(
        self, request_iterator: AsyncIterator[apps_pb2.CallRequest], context: Context
    ) -> AsyncIterator[apps_pb2.CallResponse]:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("head"):
            raise InvalidArgument("the first message of Call must carry 'head'", reason="MISSING_HEAD")
        head = first.head

        async def body() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.HasField("head"):
                    raise InvalidArgument("'head' may only come in the first message", reason="HEAD_REPEATED")
                yield message.body

        start = tunnel_pb2.RequestStart(app_call=apps_pb2.AppCall(head=head), has_body=True)
        async with self._cp.relay(
            context, method="/onprem.v1.AppService/Call", group=head.group,
            kind=profiles_pb2.PROFILE_KIND_APP, profile=head.profile, start=start,
        ) as exchange:
            pump = asyncio.get_running_loop().create_task(pump_body(exchange, body()))
            try:
                async for chunk in exchange:
                    yield chunk.call
            finally:
                if not pump.done():
                    pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
