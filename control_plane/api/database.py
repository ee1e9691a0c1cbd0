"""`onprem.v1.DatabaseService`: SQL relayed to a database profile of a group."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from control_plane.api import errors
from control_plane.app import ControlPlane
from onprem.v1 import database_pb2, database_pb2_grpc, tunnel_pb2
from tunnel.errors import InvalidArgument

Context = grpc.aio.ServicerContext[Any, Any]


class DatabaseService(database_pb2_grpc.DatabaseServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp

    @errors.streaming
    async def Query(self, request: database_pb2.QueryRequest, context: Context) -> AsyncIterator[database_pb2.QueryResponse]:
        if not request.sql.strip():
            raise InvalidArgument("'sql' is required: the statement to run", reason="MISSING_SQL")
        start = tunnel_pb2.RequestStart(database_query=database_pb2.DatabaseQuery(query=request))
        async with self._cp.relay(
            context, method="/onprem.v1.DatabaseService/Query", group=request.group,
            kind=tunnel_pb2.PROFILE_KIND_DATABASE, profile=request.profile, start=start,
        ) as exchange:
            async for chunk in exchange:
                yield chunk.query
