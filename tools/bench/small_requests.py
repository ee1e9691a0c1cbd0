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
costs by itself, without protobuf, routing, credit, audit or metrics. A fourth
side is ours through `DatabaseService/ExecuteQuery`, which answers the same
request with one message, the relay's own shape.

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
from tools.bench.common import BENCH_LOG_LEVEL, CpuMeter, Figure, ratio_figure
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
#: Requests of the one-at-a-time run (latency without queueing), per round.
SERIAL_REQUESTS = 1000
MIN_RATIO = 0.7
#: Targets of issue 15: one request at a time, p50 within 1.25x the relay's; CPU per request within 1.4x.
MAX_SERIAL_P50 = 1.25
MAX_CPU_RATIO = 1.4


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
    cp = ControlPlaneProcess(workdir / "cp", log_level=BENCH_LOG_LEVEL)
    agent = AgentProcess(workdir / "agent", cp, profiles=profiles, max_in_flight=max_in_flight, env=env or {},
                         log_level=BENCH_LOG_LEVEL)
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


def execute_once(channel: grpc.aio.Channel, token: str, *, group: str = GROUP, profile: str = PROFILE,
                 sql: str = SQL, timeout: float = 60) -> Callable[[], Awaitable[None]]:
    """The same query through ExecuteQuery (its result in one message); fails unless one row comes back."""
    stub = database_stub(channel)
    request = database_pb2.ExecuteQueryRequest(group=group, profile=profile, sql=sql)
    metadata = bearer(token)

    async def one() -> None:
        response = await stub.ExecuteQuery(request, metadata=metadata, timeout=timeout)
        if response.summary.row_count != 1:
            raise AssertionError(f"expected 1 row, got {response.summary.row_count}")

    return one


# --- the bare relay -----------------------------------------------------------


@dataclass(frozen=True)
class BareRelay:
    """A running bare relay: where to reach it, what to trust, and its two processes."""

    port: int
    cert: bytes
    #: The relay's and the backend's process ids, whose CPU time is the baseline's cost.
    pids: tuple[int, int]


@contextlib.contextmanager
def bare_relay(workdir: Path, db: Path, *, shaped: bool = False) -> Iterator[BareRelay]:
    """Start the relay and its backend."""
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
        yield BareRelay(port, cert.read_bytes(), (relay.pid, backend.pid))
    finally:
        for proc in (backend, relay):
            if proc is not None:
                proc.kill()
                proc.wait()


@contextlib.asynccontextmanager
async def relay_channel(relay: BareRelay) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.secure_channel(f"127.0.0.1:{relay.port}", grpc.ssl_channel_credentials(relay.cert)) as channel:
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


@dataclass(frozen=True)
class Side:
    """One way of answering the requests, and the processes that do the work."""

    one: Callable[[], Awaitable[None]]
    #: The two processes between the client and the database: control plane and agent, or relay and backend.
    pids: tuple[int, int]


@dataclass(frozen=True)
class Measured:
    """The best run of one side, at full concurrency and one at a time."""

    loaded: Load
    #: CPU seconds per request over the loaded run, of each of the side's two processes.
    cpu_per_request: tuple[float, float]
    serial: Load


async def _drive_metered(side: Side, requests: int, concurrency: int) -> tuple[Load, tuple[float, float]]:
    meter = CpuMeter(list(side.pids))
    meter.start()
    load = await drive(side.one, requests, concurrency)
    first, second = meter.stop()
    return load, (first / load.requests, second / load.requests)


async def _measure(cluster: Cluster, relays: tuple[BareRelay, BareRelay], *, warmup: int, requests: int,
                   rounds: int, concurrency: int,
                   serial_requests: int) -> tuple[Measured, Measured, Measured, Measured]:
    """The best runs of ours (Query), of the bare relay, of the relay shaped like Query, and of ours
    through ExecuteQuery."""
    await wait_active(cluster)
    plain, shaped = relays
    async with (operator_channel(cluster.cp) as ours_ch, relay_channel(plain) as relay_ch,
                relay_channel(shaped) as shaped_ch):
        sides = [Side(query_once(ours_ch, cluster.token), (cluster.cp_pid, cluster.agent_pid)),
                 Side(relay_once(relay_ch), plain.pids), Side(relay_once(shaped_ch, shaped=True), shaped.pids),
                 Side(execute_once(ours_ch, cluster.token), (cluster.cp_pid, cluster.agent_pid))]
        for side in sides[1:3]:
            await wait_relay_ready(side.one)
        for side in sides:
            await drive(side.one, warmup, concurrency)
        loaded: list[list[tuple[Load, tuple[float, float]]]] = [[] for _ in sides]
        serial: list[list[Load]] = [[] for _ in sides]
        for _ in range(rounds):
            # Alternated, so that a burst of load elsewhere on the machine hits each alike.
            for side, side_runs in zip(sides, loaded, strict=True):
                side_runs.append(await _drive_metered(side, requests, concurrency))
            for side, side_serial in zip(sides, serial, strict=True):
                side_serial.append(await drive(side.one, serial_requests, 1))
    best = []
    for side_runs, side_serial in zip(loaded, serial, strict=True):
        load, cpu = max(side_runs, key=lambda run: run[0].rate)
        best.append(Measured(load, cpu, min(side_serial, key=lambda run: run.p50_ms)))
    return best[0], best[1], best[2], best[3]


def figures(ours: Measured, relay: Measured, shaped: Measured, unary: Measured) -> list[Figure]:
    baseline = "bare grpc.aio relay, same layout"
    ours_cpu, relay_cpu = (sum(m.cpu_per_request) * 1000 for m in (ours, relay))
    (cp_cpu, agent_cpu), (relay_only, backend_only) = ((c * 1000 for c in m.cpu_per_request) for m in (ours, relay))
    return [
        ratio_figure(f"small requests (SELECT 1 on SQLite, {CONCURRENCY} in flight) through control plane "
                     "and agent", ours.loaded.rate, "req/s", baseline, relay.loaded.rate, MIN_RATIO),
        Figure(f"small requests, {CONCURRENCY} in flight: p50 latency", ours.loaded.p50_ms, "ms", target="—",
               met=None, baseline_name=baseline, baseline=relay.loaded.p50_ms),
        Figure(f"small requests, {CONCURRENCY} in flight: p99 latency", ours.loaded.p99_ms, "ms", target="—",
               met=None, baseline_name=baseline, baseline=relay.loaded.p99_ms),
        Figure("small requests, one at a time: p50 latency", ours.serial.p50_ms, "ms",
               target=f"<= {MAX_SERIAL_P50:.0%} of baseline", met=ours.serial.p50_ms <= MAX_SERIAL_P50 * relay.serial.p50_ms,
               baseline_name=baseline, baseline=relay.serial.p50_ms),
        Figure("small requests, one at a time: p99 latency", ours.serial.p99_ms, "ms", target="—", met=None,
               baseline_name=baseline, baseline=relay.serial.p99_ms),
        Figure(f"CPU per small request, control plane + agent ({cp_cpu:.2f} + {agent_cpu:.2f} ms; the relay's "
               f"{relay_only:.2f} + {backend_only:.2f} ms)", ours_cpu, "ms",
               target=f"<= {MAX_CPU_RATIO:.0%} of baseline", met=ours_cpu <= MAX_CPU_RATIO * relay_cpu,
               baseline_name=f"{baseline}: relay + backend", baseline=relay_cpu),
        Figure("small requests, for diagnosis: the bare relay answering with 3 messages per request (header, "
               "rows, summary, as Query streams them)", shaped.loaded.rate, "req/s", target="—",
               met=None, baseline_name=baseline, baseline=relay.loaded.rate),
        Figure("small requests, for diagnosis: ours against that relay of 3 messages (what the tunnel costs "
               "beyond the proto's shape)", ours.loaded.rate, "req/s", target="—", met=None,
               baseline_name="bare relay, 3 messages per request", baseline=shaped.loaded.rate),
        Figure("small requests, for diagnosis: CPU per request of the relay of 3 messages, relay + backend",
               sum(shaped.cpu_per_request) * 1000, "ms", target="—", met=None,
               baseline_name=f"{baseline}: relay + backend", baseline=relay_cpu),
        ratio_figure(f"small requests through ExecuteQuery (the result in one message, the relay's shape), "
                     f"{CONCURRENCY} in flight", unary.loaded.rate, "req/s", baseline, relay.loaded.rate, MIN_RATIO),
        Figure("small requests through ExecuteQuery, one at a time: p50 latency", unary.serial.p50_ms, "ms",
               target=f"<= {MAX_SERIAL_P50:.0%} of baseline",
               met=unary.serial.p50_ms <= MAX_SERIAL_P50 * relay.serial.p50_ms,
               baseline_name=baseline, baseline=relay.serial.p50_ms),
        Figure(f"CPU per small request through ExecuteQuery, control plane + agent "
               f"({unary.cpu_per_request[0] * 1000:.2f} + {unary.cpu_per_request[1] * 1000:.2f} ms)",
               sum(unary.cpu_per_request) * 1000, "ms", target=f"<= {MAX_CPU_RATIO:.0%} of baseline",
               met=sum(unary.cpu_per_request) * 1000 <= MAX_CPU_RATIO * relay_cpu,
               baseline_name=f"{baseline}: relay + backend", baseline=relay_cpu),
    ]


def run_small(workdir: Path, *, requests: int = REQUESTS, warmup: int = WARMUP, rounds: int = ROUNDS,
              concurrency: int = CONCURRENCY, serial_requests: int = SERIAL_REQUESTS) -> list[Figure]:
    with (start_cluster(workdir) as cluster, bare_relay(workdir, workdir / "lite.db") as plain,
          bare_relay(workdir, workdir / "lite.db", shaped=True) as shaped):
        ours, relay, shaped_relay, unary = asyncio.run(_measure(
            cluster, (plain, shaped), warmup=warmup, requests=requests, rounds=rounds, concurrency=concurrency,
            serial_requests=serial_requests))
    return figures(ours, relay, shaped_relay, unary)


def run(workdir: Path) -> list[Figure]:
    return run_small(workdir)
