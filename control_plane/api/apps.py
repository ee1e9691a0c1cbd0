"""`onprem.v1.AppService`: HTTP calls relayed to an app profile of a group."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from onprem.control_plane.api import errors
from onprem.control_plane.api.relaying import Relaying, attach_key
from onprem.control_plane.api.uploads import pump_body, refuse_body
from onprem.control_plane.core import ControlPlane
from onprem.tunnel.errors import InvalidArgument
from onprem.v1 import apps_pb2, apps_pb2_grpc, profiles_pb2, tunnel_pb2

Context = grpc.aio.ServicerContext[Any, Any]

BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class AppService(apps_pb2_grpc.AppServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._relay = Relaying(cp, profiles_pb2.PROFILE_KIND_APP)

    @errors.streaming
    async def Call(
        self, request_iterator: AsyncIterator[apps_pb2.CallRequest], context: Context
    ) -> AsyncIterator[apps_pb2.CallResponse]:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("head"):
            raise InvalidArgument("the first message of Call must carry 'head'", reason="MISSING_HEAD", field="head")
        head = first.head

        async def body() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.HasField("head"):
                    raise InvalidArgument("'head' may only come in the first message", reason="HEAD_REPEATED", field="head")
                yield message.body

        # Bodiless methods travel without a body, so that they can be re-routed
        # to another agent if theirs is lost.
        bodiless = (head.method or "GET").upper() in BODILESS_METHODS
        start = attach_key(context, "/onprem.v1.AppService/Call", head.profile, first,
                           tunnel_pb2.RequestStart(app_call=apps_pb2.AppCall(head=head), has_body=not bodiless))
        async with self._relay(context, head.group, head.profile, start) as relayed:
            if bodiless:
                refused = InvalidArgument(f"{head.method or 'GET'} requests take no body", reason="BODY_NOT_ALLOWED",
                                          field="body")
                feeder = refuse_body(relayed, body(), refused)
            else:
                feeder = pump_body(relayed, body())
            pump = asyncio.get_running_loop().create_task(feeder)
            try:
                async for chunk in relayed:
                    yield chunk.call
            finally:
                if not pump.done():
                    pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
