"""The baselines of the files benchmark: a bare grpc.aio server streaming a file, and a bare relay of it.

    python -m tools.bench.bare_stream --file F --cert C --key K
    python -m tools.bench.bare_stream --relay-to PORT --cert C --key K

Listens on a free loopback port with TLS (as the tunnel and the operator API
do), prints the port on one line, and answers `/bench.Bare/Read` by streaming
the file in chunks of the tunnel's size, read with `pread` in a worker thread
as the agent reads them. No protobuf: the bytes go as they are, which is the
least any gRPC stream of a file can cost.

With `--relay-to`, it serves the same method by reading it from the server on
PORT (over one TLS channel opened at start, as an agent's stream is) and
passing each message on untouched: the two hops of the tunnel (agent to
control plane, control plane to operator) and nothing else, the floor of a
relayed read on grpc.aio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

#: The tunnel's chunk limit, less the room the agent leaves for framing.
CHUNK = 256 * 1024 - 64
METHOD = "/bench.Bare/Read"


def _identity(data: bytes) -> bytes:
    return data


Read = Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]]


def file_reader(path: str) -> Read:
    async def read(_request: bytes, _context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        fd = os.open(path, os.O_RDONLY)
        try:
            position = 0
            while data := await asyncio.to_thread(os.pread, fd, CHUNK, position):
                position += len(data)
                yield data
        finally:
            os.close(fd)

    return read


def relay_reader(upstream: grpc.aio.Channel) -> Read:
    call = upstream.unary_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)

    async def read(request: bytes, _context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        async for data in call(request):
            yield data

    return read


async def serve(path: str | None, relay_to: int | None, cert: bytes, key: bytes) -> None:
    upstream = None
    if relay_to is not None:
        upstream = grpc.aio.secure_channel(f"127.0.0.1:{relay_to}", grpc.ssl_channel_credentials(root_certificates=cert))
        read = relay_reader(upstream)
    else:
        assert path is not None
        read = file_reader(path)
    handler = grpc.method_handlers_generic_handler("bench.Bare", {
        "Read": grpc.unary_stream_rpc_method_handler(read, request_deserializer=_identity,
                                                     response_serializer=_identity),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    await server.start()
    print(port, flush=True)
    try:
        await server.wait_for_termination()
    finally:
        if upstream is not None:
            await upstream.close(None)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.bare_stream")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", help="stream this file")
    source.add_argument("--relay-to", type=int, metavar="PORT", help="relay the stream of the server on PORT")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args(argv)
    with open(args.cert, "rb") as c, open(args.key, "rb") as k:
        cert, key = c.read(), k.read()
    asyncio.run(serve(args.file, args.relay_to, cert, key))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
