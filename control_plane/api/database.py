"""`onprem.v1.DatabaseService`: SQL relayed to a database profile of a group."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from onprem.control_plane.api import errors
from onprem.control_plane.api.relaying import Relaying, attach_key
from onprem.control_plane.api.whole_results import WholeResultBudget
from onprem.control_plane.core import ControlPlane
from onprem.tunnel.errors import InvalidArgument, ResourceExhausted
from onprem.v1 import database_pb2, database_pb2_grpc, profiles_pb2, tunnel_pb2

Context = grpc.aio.ServicerContext[Any, Any]

#: The largest ExecuteQuery result: gRPC clients' default receive limit, so that any client can read it.
MAX_RESULT_BYTES = 4 * 1024 * 1024
#: A sub-message's field tag and length prefix in the response, at most (lengths under 2**28).
_FIELD_OVERHEAD = 5
#: Room kept for the summary, which comes last (three small fields: under 40 bytes).
_SUMMARY_RESERVE = 64
#: Query and ExecuteQuery run one request, so a key answers across them: both fingerprint as Query.
_QUERY_METHOD = "/onprem.v1.DatabaseService/Query"


class DatabaseService(database_pb2_grpc.DatabaseServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._relay = Relaying(cp, profiles_pb2.PROFILE_KIND_DATABASE)
        self._whole_results = WholeResultBudget(cp.settings.whole_results_budget_bytes)

    @errors.streaming
    async def Query(self, request: database_pb2.QueryRequest, context: Context) -> AsyncIterator[database_pb2.QueryResponse]:
        if not request.sql.strip():
            raise InvalidArgument("'sql' is required: the statement to run", reason="MISSING_SQL", field="sql")
        start = attach_key(context, _QUERY_METHOD, request.profile, request,
                           tunnel_pb2.RequestStart(database_query=database_pb2.DatabaseQuery(query=request)))
        async with self._relay(context, request.group, request.profile, start) as relayed:
            async for chunk in relayed:
                yield chunk.query

    @errors.unary
    async def ExecuteQuery(
        self, request: database_pb2.ExecuteQueryRequest, context: Context
    ) -> database_pb2.ExecuteQueryResponse:
        if not request.sql.strip():
            raise InvalidArgument("'sql' is required: the statement to run", reason="MISSING_SQL", field="sql")
        # The two requests share their field numbers: the agent runs it as the Query it is.
        query = database_pb2.QueryRequest.FromString(request.SerializeToString())
        start = attach_key(context, _QUERY_METHOD, query.profile, query,
                           tunnel_pb2.RequestStart(database_query=database_pb2.DatabaseQuery(query=query)))
        response = database_pb2.ExecuteQueryResponse()
        size = rows = 0
        try:
            async with self._relay(context, query.group, query.profile, start) as relayed:
                async for chunk in relayed:
                    part = chunk.query
                    which = part.WhichOneof("result")
                    if which == "summary":
                        response.summary.CopyFrom(part.summary)
                        continue
                    grown = (part.rows.ByteSize() if which == "rows" else part.header.ByteSize()) + _FIELD_OVERHEAD
                    if size + grown > MAX_RESULT_BYTES - _SUMMARY_RESERVE:
                        # Leaving the block cancels the statement on the agent.
                        raise ResourceExhausted(
                            f"the result passed {MAX_RESULT_BYTES // (1024 * 1024)} MiB, the most one message "
                            f"carries, after {rows} rows; stream it with Query, or set max_rows",
                            reason="RESULT_TOO_LARGE")
                    self._whole_results.take(grown)
                    size += grown
                    if which == "rows":
                        rows += part.rows.row_count
                        response.batches.append(part.rows)
                    else:
                        response.header.CopyFrom(part.header)
        finally:
            # Given back as the servicer returns; gRPC then serializes the message and drops it.
            self._whole_results.give(size)
        return response

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
