"""ListAgents while one enrolled agent attacks the control plane, against ListAgents at rest.

One real control plane with one well-behaved agent; a second identity,
enrolled like any agent, runs `tools.hostile_agent` in its own process: over-
full batches, ping floods, status floods and a reconnect storm, for as long as
the measurement lasts. The figures are ListAgents' latency (one call at a
time) at rest and under attack, and how much the control plane's resident
memory grew meanwhile. The budgets of `tunnel.budget` are what keep the first
close to the second: without them the same attack held the control plane's
event loop for seconds at a time and grew it by gigabytes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from onprem.v1 import agents_pb2
from tools.bench.common import Figure, rss_mib
from tools.bench.small_requests import start_cluster, wait_active
from tools.cluster import AgentProcess, ControlPlaneProcess, agents_stub, bearer, operator_channel

CALLS = 400
RSS_LIMIT_MIB = 50.0


async def _listing_latencies(cp: ControlPlaneProcess, token: str, calls: int) -> list[float]:
    async with operator_channel(cp) as channel:
        stub = agents_stub(channel)
        latencies = []
        for _ in range(calls):
            began = time.perf_counter()
            await stub.ListAgents(agents_pb2.ListAgentsRequest(), metadata=bearer(token), timeout=30)
            latencies.append(time.perf_counter() - began)
            await asyncio.sleep(0.01)
        return latencies


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] * 1000


def run_small(workdir: Path, *, calls: int = CALLS) -> list[Figure]:
    with start_cluster(workdir) as cluster:
        asyncio.run(wait_active(cluster))
        mallory = AgentProcess(workdir / "mallory", cluster.cp, name="mallory", profiles={})
        mallory.enroll("evil")
        asyncio.run(_listing_latencies(cluster.cp, cluster.token, 20))  # warm up
        quiet = asyncio.run(_listing_latencies(cluster.cp, cluster.token, calls))
        assert cluster.cp.proc is not None
        before = rss_mib(cluster.cp.proc.pid)
        attacker = subprocess.Popen(
            [sys.executable, "-m", "tools.hostile_agent", str(workdir / "mallory" / "identity"),
             str(cluster.cp.ca_file), f"127.0.0.1:{cluster.cp.agent_port}", "3600"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            time.sleep(2)  # the attack is in full swing
            busy = asyncio.run(_listing_latencies(cluster.cp, cluster.token, calls))
            grown = rss_mib(cluster.cp.proc.pid) - before
        finally:
            attacker.terminate()
            attacker.wait(10)
    return [
        Figure("ListAgents p50 while an enrolled agent floods the control plane (over-full batches, pings, "
               "statuses, reconnects)", _percentile(busy, 50), "ms", target="—", met=None,
               baseline_name="ListAgents at rest", baseline=_percentile(quiet, 50)),
        Figure("ListAgents p99 under the same attack", _percentile(busy, 99), "ms", target="—", met=None,
               baseline_name="ListAgents at rest", baseline=_percentile(quiet, 99)),
        Figure("control-plane RSS growth under the same attack", max(grown, 0.0), "MiB",
               target=f"< {RSS_LIMIT_MIB:.0f} MiB", met=grown < RSS_LIMIT_MIB),
    ]


def run(workdir: Path) -> list[Figure]:
    return run_small(workdir)
