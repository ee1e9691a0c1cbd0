"""Small requests through control plane and agent, against a bare grpc.aio relay in the same layout.

A no-op query (`SELECT 1` on SQLite) with 64 in flight, from a client in this
process, through

* ours: a real control plane (`DatabaseService/Query`, TLS, bearer token,
  routing, audit) and a real agent over its one mTLS tunnel stream, which runs
  the query with SQLAlchemy in its pool of 4 threads and streams a columnar
  result back (header, one row batch, summary);
* the baseline: `tools.bench.bare_relay`, a relay process and a backend process
  holding ONE bidi stream to it over TLS with a client certificate, request ids,
  no flow control, the backend running the same SQL on SQLite in 4 threads.

After a warm-up, each side serves a few thousand requests, twice, alternately
(so that a burst of load elsewhere on the machine hits both alike), and the
faster run of each counts. Requests per second are compared; p50 and p99
latency are reported with the relay's as the baseline. A third side, for
diagnosis, is the same relay with a backend that answers each request with
three messages to the client (`bare_relay backend --shaped`), as the streamed
shape of `DatabaseService/Query` (header, rows, summary) must: what that shape
costs by itself, without protobuf, routing, credit, audit or metrics.

The pieces here (`Load`, `drive`, `start_cluster`, `query_once`) are shared by
the head-of-line, in-flight and footprint benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from onprem.v1 import agents_pb2, database_pb2
from tools.bench.bare_relay import CALL, make_self_signed
from tools.bench.common import Figure, ratio_figure
from tools.cluster import (
    AgentProcess,
    ControlPlaneProcess,
    bearer,
    database_stub,
    operator_channel,
    wait_for_agent_state,
)

ROOT = Path(__file__).resolve().parents[2]
GROUP = "bench"
PROFILE = "lite"
SQL = "SELECT 1"
CONCURRENCY = 64
WARMUP = 500
REQUESTS = 3000
ROUNDS = 2
MIN_RATIO = 0.6


@dataclass(frozen=True)
class Load:
    """What one run of `drive` measured."""

    requests: int
    seconds: float
    #: Per-request latency in seconds, in completion order.
    latencies: list[float]
    failures: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, p: float) -> float:
        """The p-th percentile latency (0 < p <= 100), in seconds, nearest rank."""
        ordered = sorted(self.latencies)
        rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1]

    @property
    def p50_ms(self) -> float:
        return self.percentile(50) * 1000

    @property
    def p99_ms(self) -> float:
        return self.percentile(99) * 1000


async def drive(one: Callable[[], Awaitable[None]], requests: int, concurrency: int,
                *, tolerate_failures: bool = False) -> Load:
    """Run `one()` `requests` times with `concurrency` in flight; time each call and the whole."""
    remaining = requests
    latencies: list[float] = []
    failures = 0

    async def worker() -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            began = time.perf_counter()
            try:
                await one()
            except grpc.aio.AioRpcError:
                if not tolerate_failures:
                    raise
                failures += 1
                continue
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    return Load(len(latencies), time.perf_counter() - began, latencies, failures)


def make_sqlite(path: Path) -> Path:
    """A small SQLite database for the agent's profile (and the relay's backend)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, name TEXT)")
        conn.executemany("INSERT OR REPLACE INTO t VALUES (?, ?)", [(i, f"name-{i}") for i in range(100)])
        conn.commit()
    return path


@dataclass
class Cluster:
    cp: ControlPlaneProcess
    agent: AgentProcess
    token: str

    @property
    def agent_pid(self) -> int:
        assert self.agent.proc is not None
        return self.agent.proc.pid

    @property
    def cp_pid(self) -> int:
        assert self.cp.proc is not None
        return self.cp.proc.pid


@contextlib.contextmanager
def start_cluster(workdir: Path, profiles: dict[str, Any] | None = None, *, max_in_flight: int = 64,
                  env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """A control plane and one enrolled agent in group `GROUP`, offering a SQLite profile `PROFILE`."""
    db = make_sqlite(workdir / "lite.db")
    profiles = profiles or {"databases": {PROFILE: {"url": f"sqlite:///{db}"}}}
    cp = ControlPlaneProcess(workdir / "cp")
    agent = AgentProcess(workdir / "agent", cp, profiles=profiles, max_in_flight=max_in_flight, env=env or {})
    try:
        cp.start()
        token = cp.admin_token()
        agent.enroll(GROUP)
        agent.start()
        yield Cluster(cp, agent, token)
    finally:
        agent.stop()
        cp.stop()


async def wait_active(cluster: Cluster) -> None:
    async with operator_channel(cluster.cp) as channel:
        await wait_for_agent_state(channel, cluster.token, cluster.agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)


def query_once(channel: grpc.aio.Channel, token: str, *, group: str = GROUP, profile: str = PROFILE,
               sql: str = SQL, timeout: float = 60) -> Callable[[], Awaitable[None]]:
    """A no-op query through the control plane; fails unless exactly one row comes back."""
    stub = database_stub(channel)
    request = database_pb2.QueryRequest(group=group, profile=profile, sql=sql)
    metadata = bearer(token)

    async def one() -> None:
        rows = -1
        async for response in stub.Query(request, metadata=metadata, timeout=timeout):
            if response.HasField("summary"):
                rows = response.summary.row_count
        if rows != 1:
            raise AssertionError(f"expected 1 row, got {rows}")

    return one


# --- the bare relay -----------------------------------------------------------


@contextlib.contextmanager
def bare_relay(workdir: Path, db: Path, *, shaped: bool = False) -> Iterator[tuple[int, bytes]]:
    """Start the relay and its backend; yield the relay's port and the certificate to trust."""
    cert, key = make_self_signed(workdir, "relay-shaped" if shaped else "relay")
    tls = ["--cert", str(cert), "--key", str(key)]
    relay = subprocess.Popen([sys.executable, "-m", "tools.bench.bare_relay", "relay", *tls],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    backend: subprocess.Popen[bytes] | None = None
    try:
        assert relay.stdout is not None
        line = relay.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the bare relay did not start: {line!r}")
        port = int(line)
        backend = subprocess.Popen([sys.executable, "-m", "tools.bench.bare_relay", "backend", *tls,
                                    "--address", f"127.0.0.1:{port}", "--sqlite", str(db),
                                    *(["--shaped"] if shaped else [])], cwd=ROOT)
        yield port, cert.read_bytes()
    finally:
        for proc in (backend, relay):
            if proc is not None:
                proc.kill()
                proc.wait()


@contextlib.asynccontextmanager
async def relay_channel(port: int, cert: bytes) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(cert)) as channel:
        yield channel


def relay_once(channel: grpc.aio.Channel, *, shaped: bool = False) -> Callable[[], Awaitable[None]]:
    call = channel.unary_stream(CALL, request_serializer=None, response_deserializer=None)
    payload = SQL.encode()
    expected = [b"header", b"[(1,)]", b"summary"] if shaped else [b"[(1,)]"]

    async def one() -> None:
        answers = [answer async for answer in call(payload, timeout=60)]
        if answers != expected:
            raise AssertionError(f"unexpected answer {answers!r}")

    return one


async def wait_relay_ready(one: Callable[[], Awaitable[None]], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            await one()
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# --- the benchmark ------------------------------------------------------------


async def _measure(cluster: Cluster, relays: list[tuple[int, bytes]], *, warmup: int, requests: int,
                   rounds: int, concurrency: int) -> tuple[Load, Load, Load]:
    """The best run of ours, of the bare relay and of the relay shaped like ours."""
    await wait_active(cluster)
    (plain_port, plain_cert), (shaped_port, shaped_cert) = relays
    async with (operator_channel(cluster.cp) as ours_ch, relay_channel(plain_port, plain_cert) as relay_ch,
                relay_channel(shaped_port, shaped_cert) as shaped_ch):
        sides = [query_once(ours_ch, cluster.token), relay_once(relay_ch), relay_once(shaped_ch, shaped=True)]
        for side in sides[1:]:
            await wait_relay_ready(side)
        for side in sides:
            await drive(side, warmup, concurrency)
        runs: list[list[Load]] = [[], [], []]
        for _ in range(rounds):
            # Alternated, so that a burst of load elsewhere on the machine hits each alike.
            for side, side_runs in zip(sides, runs, strict=True):
                side_runs.append(await drive(side, requests, concurrency))
    ours, relay, shaped = (max(side_runs, key=lambda load: load.rate) for side_runs in runs)
    return ours, relay, shaped


def figures(ours: Load, relay: Load, shaped: Load) -> list[Figure]:
    baseline = "bare grpc.aio relay, same layout"
    return [
        ratio_figure(f"small requests (SELECT 1 on SQLite, {CONCURRENCY} in flight) through control plane "
                     "and agent", ours.rate, "req/s", baseline, relay.rate, MIN_RATIO),
        Figure("small requests: p50 latency", ours.p50_ms, "ms", target="—", met=None,
               baseline_name=baseline, baseline=relay.p50_ms),
        Figure("small requests: p99 latency", ours.p99_ms, "ms", target="—", met=None,
               baseline_name=baseline, baseline=relay.p99_ms),
        Figure("small requests, for diagnosis: the bare relay answering with 3 messages per request (header, "
               "rows, summary, as Query streams them)", shaped.rate, "req/s", target="—",
               met=None, baseline_name=baseline, baseline=relay.rate),
    ]


def run_small(workdir: Path, *, requests: int = REQUESTS, warmup: int = WARMUP, rounds: int = ROUNDS,
              concurrency: int = CONCURRENCY) -> list[Figure]:
    with (start_cluster(workdir) as cluster, bare_relay(workdir, workdir / "lite.db") as plain,
          bare_relay(workdir, workdir / "lite.db", shaped=True) as shaped):
        ours, relay, shaped_relay = asyncio.run(_measure(cluster, [plain, shaped], warmup=warmup, requests=requests,
                                                         rounds=rounds, concurrency=concurrency))
    return figures(ours, relay, shaped_relay)


def run(workdir: Path) -> list[Figure]:
    return run_small(workdir)
