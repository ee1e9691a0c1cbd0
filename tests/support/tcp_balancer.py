"""An L4 load balancer for tests: each TCP connection goes to the next backend, round robin.

TLS passes through untouched, as through a real TCP balancer; a backend that refuses is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextlib.asynccontextmanager
async def tcp_balancer(backends: Sequence[int]) -> AsyncIterator[int]:
    """Listen on a free loopback port (yielded) and spread connections over `backends` (ports)."""
    turn = itertools.cycle(range(len(backends)))
    tasks: set[asyncio.Task[None]] = set()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        for _ in range(len(backends)):
            port = backends[next(turn)]
            try:
                backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                continue
        else:
            client_writer.close()
            return
        both = [asyncio.ensure_future(_pipe(client_reader, backend_writer)),
                asyncio.ensure_future(_pipe(backend_reader, client_writer))]
        tasks.update(both)
        await asyncio.wait(both, return_when=asyncio.ALL_COMPLETED)
        tasks.difference_update(both)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
