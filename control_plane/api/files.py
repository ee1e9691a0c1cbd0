"""`onprem.v1.FileService`: file operations relayed to a folder profile of a group."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from onprem.control_plane.api import errors
from onprem.control_plane.api.relaying import Relaying, attach_key
from onprem.control_plane.api.uploads import result_while_uploading
from onprem.control_plane.core import ControlPlane
from onprem.control_plane.relay import RelayedRequest
from onprem.tunnel.errors import InvalidArgument
from onprem.v1 import files_pb2, files_pb2_grpc, profiles_pb2, tunnel_pb2

Context = grpc.aio.ServicerContext[Any, Any]
FOLDER = profiles_pb2.PROFILE_KIND_FOLDER


class FileService(files_pb2_grpc.FileServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._relay = Relaying(cp, FOLDER)

    async def _unary(self, context: Context, group: str, profile: str, op: files_pb2.FileOp) -> tunnel_pb2.ResponseChunk:
        return await self._relay.single(context, group, profile, tunnel_pb2.RequestStart(file_op=op))

    async def _keyed(self, context: Context, method: str, request: Any, op: files_pb2.FileOp) -> tunnel_pb2.ResponseChunk:
        start = attach_key(context, f"/onprem.v1.FileService/{method}", request.profile, request,
                           tunnel_pb2.RequestStart(file_op=op))
        return await self._relay.single(context, request.group, request.profile, start)

    @errors.unary
    async def List(self, request: files_pb2.ListRequest, context: Context) -> files_pb2.ListResponse:
        chunk = await self._unary(context, request.group, request.profile, files_pb2.FileOp(list=request))
        return chunk.list

    @errors.unary
    async def Stat(self, request: files_pb2.StatRequest, context: Context) -> files_pb2.StatResponse:
        chunk = await self._unary(context, request.group, request.profile, files_pb2.FileOp(stat=request))
        return chunk.stat

    @errors.unary
    async def Delete(self, request: files_pb2.DeleteRequest, context: Context) -> files_pb2.DeleteResponse:
        chunk = await self._keyed(context, "Delete", request, files_pb2.FileOp(delete=request))
        return chunk.delete

    @errors.unary
    async def Move(self, request: files_pb2.MoveRequest, context: Context) -> files_pb2.MoveResponse:
        chunk = await self._keyed(context, "Move", request, files_pb2.FileOp(move=request))
        return chunk.move

    @errors.unary
    async def MakeDirectory(
        self, request: files_pb2.MakeDirectoryRequest, context: Context
    ) -> files_pb2.MakeDirectoryResponse:
        chunk = await self._keyed(context, "MakeDirectory", request, files_pb2.FileOp(make_directory=request))
        return chunk.make_directory

    @errors.unary
    async def Poll(self, request: files_pb2.PollRequest, context: Context) -> files_pb2.PollResponse:
        chunk = await self._unary(context, request.group, request.profile, files_pb2.FileOp(poll=request))
        return chunk.poll

    @errors.streaming
    async def Read(self, request: files_pb2.ReadRequest, context: Context) -> AsyncIterator[files_pb2.ReadResponse]:
        start = tunnel_pb2.RequestStart(file_op=files_pb2.FileOp(read=request))
        async with self._relay(context, request.group, request.profile, start) as relayed:
            async for chunk in relayed:
                read = chunk.read
                if read.WhichOneof("part") == "data":
                    read = _coalesced(read, relayed)
                yield read

    @errors.unary
    async def Write(
        self, request_iterator: AsyncIterator[files_pb2.WriteRequest], context: Context
    ) -> files_pb2.WriteResponse:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("the first message of Write must carry 'header'", reason="MISSING_HEADER", field="header")
        header = first.header

        async def data() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.HasField("header"):
                    raise InvalidArgument("'header' may only come in the first message", reason="HEADER_REPEATED", field="header")
                yield message.data

        start = attach_key(context, "/onprem.v1.FileService/Write", header.profile, first,
                           tunnel_pb2.RequestStart(file_op=files_pb2.FileOp(write=header), has_body=True))
        async with self._relay(context, header.group, header.profile, start) as relayed:
            chunk = await result_while_uploading(relayed, data())
            return chunk.write


#: The most bytes of one `ReadResponse.data` (files.proto: "at most 1 MiB").
MAX_READ_DATA = 1024 * 1024


def _coalesced(first: files_pb2.ReadResponse, relayed: RelayedRequest) -> files_pb2.ReadResponse:
    """`first` and the data chunks that arrived behind it, as one message of at most 1 MiB.

    Under load the agent's chunks (256 KiB) queue up while the operator's stream sends; each
    gRPC message costs the control plane and the client far more than copying its bytes, so what
    is already here goes out together. Nothing waits for more: a lone chunk goes as it came.
    """
    size = len(first.data)

    def fits(chunk: tunnel_pb2.ResponseChunk) -> bool:
        return chunk.read.WhichOneof("part") == "data" and size + len(chunk.read.data) <= MAX_READ_DATA

    parts: list[bytes] = []
    while (more := relayed.take_ready(fits)) is not None:
        parts.append(more.read.data)
        size += len(more.read.data)
    if not parts:
        return first
    merged = files_pb2.ReadResponse()
    merged.data = b"".join([first.data, *parts])
    return merged
