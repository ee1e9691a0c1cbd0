"""The benchmarks must not rot: import each, and run the tiniest version of those with their own programs.

`make bench` runs the real sizes; these only prove that the bare relay, the
agent simulator and the measuring code still work against the current
control plane and agent. No figure's value is asserted (timings are never
tested), only that each figure is well formed and the counts add up.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import os
from pathlib import Path

import grpc
import pytest

from tests.support.postgres import PostgresServer
from tools.bench.__main__ import SUBJECTS
from tools.bench.common import Figure


@pytest.mark.parametrize("subject", SUBJECTS)
def test_every_benchmark_module_imports_and_has_run(subject: str) -> None:
    module = importlib.import_module(f"tools.bench.{subject}")
    assert callable(module.run)


def _well_formed(figures: list[Figure]) -> None:
    assert figures
    for figure in figures:
        assert figure.name and figure.unit and figure.target
        assert math.isfinite(figure.value) and figure.value >= 0


def test_small_requests_against_the_bare_relay(tmp_path: Path) -> None:
    from tools.bench.small_requests import run_small

    figures = run_small(tmp_path, requests=40, warmup=10, rounds=1, concurrency=8, serial_requests=10)
    _well_formed(figures)
    rate = figures[0]
    assert rate.unit == "req/s" and rate.baseline is not None and rate.baseline > 0
    assert rate.met is not None


def test_the_bare_relay_of_the_files_benchmark_passes_every_byte_on(tmp_path: Path) -> None:
    from tools.bench.bare_stream import CHUNK, METHOD
    from tools.bench.files import _self_signed, _start_bare

    file = tmp_path / "data.bin"
    file.write_bytes(os.urandom(3 * CHUNK + 12345))
    cert, key = _self_signed(tmp_path)
    source, port = _start_bare(["--file", str(file)], cert, key)
    relay, relay_port = _start_bare(["--relay-to", str(port)], cert, key)

    async def read(at: int) -> list[bytes]:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{at}", creds) as channel:
            call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
            return [bytes(m) async for m in call(b"")]

    try:
        direct, relayed = asyncio.run(read(port)), asyncio.run(read(relay_port))
    finally:
        for proc in (relay, source):
            proc.kill()
            proc.wait()
    assert relayed == direct and b"".join(relayed) == file.read_bytes() and len(relayed) == 4


def test_database_against_sqlalchemy_directly_and_psycopg_through_ssh_reverse_tunnel(tmp_path: Path) -> None:
    from tools.bench.database import run_small

    figures = run_small(tmp_path, rows=2000, rounds=1)
    _well_formed(figures)
    direct, ssh = figures[0], figures[1]
    assert direct.value == ssh.value  # ours, against each baseline
    assert direct.baseline_name == "SQLAlchemy server-side cursor, direct"
    assert ssh.baseline_name == "psycopg server-side cursor through OpenSSH ssh -R"
    assert [f.target for f in figures] == [">= 90% of baseline", ">= 150% of baseline", "< 200 MiB", "< 200 MiB"]
    assert direct.baseline is not None and direct.baseline > 0 and ssh.baseline is not None and ssh.baseline > 0


def test_many_agents_with_simulated_agents(tmp_path: Path) -> None:
    from tools.bench.many_agents import run_small

    figures = run_small(tmp_path, agents=3, per_process=1, requests=10, warmup=2)
    _well_formed(figures)
    active = figures[0]
    assert active.value == 3 and active.met is True


def test_list_agents_under_a_hostile_agents_attack(tmp_path: Path) -> None:
    from tools.bench.hostile import run_small

    figures = run_small(tmp_path, calls=10)
    _well_formed(figures)
    assert [f.unit for f in figures] == ["ms", "ms", "MiB"]
    assert figures[0].baseline is not None and figures[0].baseline > 0


@pytest.mark.postgres
def test_replicas_failover_rolling_restart_and_scale(tmp_path: Path, postgres: PostgresServer) -> None:
    from tools.bench.replicas import run_small

    figures = run_small(tmp_path, agents=3, per_process=2, failover_agents=2, requests=10, warmup=2,
                        postgres=postgres)
    _well_formed(figures)
    by_unit = {f.unit: [g for g in figures if g.unit == f.unit] for f in figures}
    assert figures[0].name.startswith("3 replicas x 3 agents: RSS") and figures[0].met is not None
    latency = by_unit["ms"][0]
    assert latency.baseline is not None and latency.baseline > 0 and latency.met is not None
    failover = next(f for f in figures if f.name.startswith("failover, 3 replicas x 2 agents"))
    assert failover.unit == "s" and failover.met is not None
    reads = by_unit["reads"]
    assert len(reads) == 2 and reads[1].value > 0
