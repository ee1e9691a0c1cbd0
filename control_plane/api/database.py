"""`onprem.v1.DatabaseService`: SQL relayed to a database profile of a group."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from onprem.control_plane.api import errors
from onprem.control_plane.api.relaying import Relaying, attach_key
from onprem.control_plane.core import ControlPlane
from onprem.tunnel.errors import InvalidArgument
from onprem.v1 import database_pb2, database_pb2_grpc, profiles_pb2, tunnel_pb2

Context = grpc.aio.ServicerContext[Any, Any]


class DatabaseService(database_pb2_grpc.DatabaseServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._relay = Relaying(cp, profiles_pb2.PROFILE_KIND_DATABASE)

    @errors.streaming
    async def Query(self, request: database_pb2.QueryRequest, context: Context) -> AsyncIterator[database_pb2.QueryResponse]:
        if not request.sql.strip():
            raise InvalidArgument("'sql' is required: the statement to run", reason="MISSING_SQL", field="sql")
        start = attach_key(context, "/onprem.v1.DatabaseService/Query", request.profile, request,
                           tunnel_pb2.RequestStart(database_query=database_pb2.DatabaseQuery(query=request)))
        async with self._relay(context, request.group, request.profile, start) as relayed:
            async for chunk in relayed:
                yield chunk.query

    @errors.unary
    async def ExecuteBatch(
        self, request: database_pb2.ExecuteBatchRequest, context: Context
    ) -> database_pb2.ExecuteBatchResponse:
        if not request.sql.strip():
            raise InvalidArgument("'sql' is required: the statement to run for each set", reason="MISSING_SQL",
                                  field="sql")
        start = attach_key(context, "/onprem.v1.DatabaseService/ExecuteBatch", request.profile, request,
                           tunnel_pb2.RequestStart(database_query=database_pb2.DatabaseQuery(batch=request)))
        return (await self._relay.single(context, request.group, request.profile, start)).batch

    @errors.unary
    async def ExecuteTransaction(
        self, request: database_pb2.ExecuteTransactionRequest, context: Context
    ) -> database_pb2.ExecuteTransactionResponse:
        if not request.statements:
            raise InvalidArgument("'statements' is required: the statements to run", reason="MISSING_SQL",
                                  field="statements")
        start = attach_key(context, "/onprem.v1.DatabaseService/ExecuteTransaction", request.profile, request,
                           tunnel_pb2.RequestStart(database_query=database_pb2.DatabaseQuery(transaction=request)))
        return (await self._relay.single(context, request.group, request.profile, start)).transaction

    @errors.streaming
    async def PollChanges(
        self, request: database_pb2.PollChangesRequest, context: Context
    ) -> AsyncIterator[database_pb2.PollChangesResponse]:
        start = tunnel_pb2.RequestStart(database_query=database_pb2.DatabaseQuery(poll_changes=request))
        async with self._relay(context, request.group, request.profile, start) as relayed:
            async for chunk in relayed:
                yield chunk.poll_changes
