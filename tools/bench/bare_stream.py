"""The baseline of the files benchmark: a bare grpc.aio server streaming a file.

    python -m tools.bench.bare_stream --file F --cert C --key K

Listens on a free loopback port with TLS (as the tunnel and the operator API
do), prints the port on one line, and answers `/bench.Bare/Read` by streaming
the file in chunks of the tunnel's size, read with `pread` in a worker thread
as the agent reads them. No protobuf: the bytes go as they are, which is the
least any gRPC stream of a file can cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

#: The tunnel's chunk limit, less the room the agent leaves for framing.
CHUNK = 256 * 1024 - 64
METHOD = "/bench.Bare/Read"


def _identity(data: bytes) -> bytes:
    return data


async def serve(path: str, cert: bytes, key: bytes) -> None:
    async def read(_request: bytes, _context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        fd = os.open(path, os.O_RDONLY)
        try:
            position = 0
            while data := await asyncio.to_thread(os.pread, fd, CHUNK, position):
                position += len(data)
                yield data
        finally:
            os.close(fd)

    handler = grpc.method_handlers_generic_handler("bench.Bare", {
        "Read": grpc.unary_stream_rpc_method_handler(read, request_deserializer=_identity,
                                                     response_serializer=_identity),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.bare_stream")
    parser.add_argument("--file", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args(argv)
    with open(args.cert, "rb") as c, open(args.key, "rb") as k:
        cert, key = c.read(), k.read()
    asyncio.run(serve(args.file, cert, key))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
