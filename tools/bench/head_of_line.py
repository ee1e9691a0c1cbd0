"""Head-of-line: small requests on an agent while other requests' consumers read large results slowly.

One real control plane and agent. Two slow consumers share the agent's one
tunnel stream with the small requests:

* a read of a 1 GiB file (sparse, so making it costs nothing), and
* a 5,000,000-row SQLite query,

each read by a client that takes one message per second, so that their
results back up: the operator's HTTP/2 window, the control plane's buffer for
the request, then the request's credit window on the tunnel, after which the
agent must stop sending that request, and only that one.

Meanwhile `SELECT 1` queries run with a few in flight; their p99 latency is the
figure, with the same load on the same agent without the slow readers as the
baseline. The slow readers are checked to be still open, and stalled, when
the measurement ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import grpc

from onprem.tunnel.aio import EOF
from onprem.v1 import database_pb2, files_pb2, files_pb2_grpc
from tools.bench.common import Figure
from tools.bench.small_requests import (
    PROFILE,
    Cluster,
    Load,
    drive,
    make_sqlite,
    query_once,
    start_cluster,
    wait_active,
)
from tools.cluster import bearer, database_stub, operator_channel

GROUP = "bench"
CONCURRENCY = 8
REQUESTS = 3000
WARMUP = 300
BIG_FILE = 1024 ** 3
ROWS = 5_000_000
BIG_SQL = ("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :n) "
           "SELECT i, 'customer-' || i AS name, i * 1.25 AS amount FROM s")
LIMIT_MS = 100.0


class SlowReader:
    """Reads one message of a streamed result per second, until told to stop."""

    def __init__(self, name: str, call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
        self.name = name
        self._call = call
        self.messages = 0
        self.ended: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                message = await self._call.read()
                if message is EOF:
                    self.ended = "EOF"
                    return
                self.messages += 1
                await asyncio.sleep(1.0)
        except grpc.aio.AioRpcError as exc:
            self.ended = f"{exc.code().name}: {exc.details()}"

    async def stop(self) -> None:
        self._call.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _measure(cluster: Cluster, *, requests: int, warmup: int) -> tuple[Load, Load, list[SlowReader]]:
    await wait_active(cluster)
    async with operator_channel(cluster.cp) as channel, operator_channel(cluster.cp) as slow_channel:
        small = query_once(channel, cluster.token)
        await drive(small, warmup, CONCURRENCY)
        quiet = await drive(small, requests, CONCURRENCY)

        files = files_pb2_grpc.FileServiceStub(slow_channel)
        query = database_pb2.QueryRequest(group=GROUP, profile=PROFILE, sql=BIG_SQL)
        query.parameters["n"].int64_value = ROWS
        readers = [
            SlowReader("1 GiB file", files.Read(files_pb2.ReadRequest(group=GROUP, profile="big", path="big.bin"),
                                                metadata=bearer(cluster.token))),
            SlowReader(f"{ROWS:,}-row query", database_stub(slow_channel).Query(query, metadata=bearer(cluster.token))),
        ]
        for reader in readers:
            reader.start()
        try:
            # Let the slow results fill every buffer on their way, up to their credit windows.
            await asyncio.sleep(5)
            busy = await drive(small, requests, CONCURRENCY)
            for reader in readers:
                if reader.ended is not None or reader.messages == 0:
                    raise RuntimeError(f"the slow reader of the {reader.name} is not reading slowly: "
                                       f"{reader.messages} messages, ended: {reader.ended}")
        finally:
            for reader in readers:
                await reader.stop()
    return busy, quiet, readers


def run_small(workdir: Path, *, requests: int = REQUESTS, warmup: int = WARMUP) -> list[Figure]:
    folder = workdir / "folder"
    folder.mkdir()
    with open(folder / "big.bin", "wb") as f:
        f.truncate(BIG_FILE)  # sparse: reads as zeros, costs no disk
    db = make_sqlite(workdir / "lite.db")
    profiles = {"databases": {PROFILE: {"url": f"sqlite:///{db}"}},
                "folders": {"big": {"root": str(folder), "read_only": True}}}
    with start_cluster(workdir, profiles) as cluster:
        busy, quiet, readers = asyncio.run(_measure(cluster, requests=requests, warmup=warmup))
    slow = " and ".join(f"a {r.name}" for r in readers)
    return [
        Figure(f"head-of-line: p99 of SELECT 1 ({CONCURRENCY} in flight) while {slow} are read at one "
               "message/s on the same agent", busy.p99_ms, "ms", target=f"< {LIMIT_MS:.0f} ms",
               met=busy.p99_ms < LIMIT_MS, baseline_name="same load, no slow readers", baseline=quiet.p99_ms),
        Figure("head-of-line: p50 of the same", busy.p50_ms, "ms", target="—", met=None,
               baseline_name="same load, no slow readers", baseline=quiet.p50_ms),
    ]


def run(workdir: Path) -> list[Figure]:
    return run_small(workdir)
