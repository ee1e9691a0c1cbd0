"""500 agents connected to one control plane: its memory, and the routing latency to one of them.

500 agent identities are enrolled the way agents enroll (an admin creates a
single-use token per agent through `AgentService/CreateEnrollmentToken`; the
agent makes its own key and sends a CSR to `Enrollment/Enroll`), each in a
group of its own ("site-N", one agent per site). They then run as real agents
in a few simulator processes (`tools.bench.fleet`, `tools.bench.sim_agents`: the agent's own
`TunnelClient`, dispatcher and SQLite handler; each agent with its own
channel, TLS connection, certificate and tunnel stream).

First only agent 0 is connected (in a process of its own), and the control
plane's RSS and the latency of `SELECT 1` to group "site-0" (one request at a
time) are measured; then the other 499 connect from 5 more processes and the
same is measured again. Agent 0's process is the same in both runs, so the
difference is what 499 more sessions cost the control plane.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from onprem.v1 import agents_pb2
from tools.bench.common import BENCH_LOG_LEVEL, Figure, rss_mib
from tools.bench.fleet import batched, enroll, latency, simulators
from tools.cluster import ControlPlaneProcess, agents_stub, bearer, operator_channel

AGENTS = 500
PER_PROCESS = 100
REQUESTS = 500
WARMUP = 50


async def _active(cp: ControlPlaneProcess, token: str, expected: int, within: float = 60) -> int:
    async with operator_channel(cp) as channel:
        stub = agents_stub(channel)
        deadline = time.monotonic() + within
        while True:
            listed = await stub.ListAgents(agents_pb2.ListAgentsRequest(), metadata=bearer(token))
            active = sum(a.state == agents_pb2.AGENT_STATE_ACTIVE for a in listed.agents)
            if active >= expected or time.monotonic() > deadline:
                return active
            await asyncio.sleep(0.5)


def run_small(workdir: Path, *, agents: int = AGENTS, per_process: int = PER_PROCESS,
              requests: int = REQUESTS, warmup: int = WARMUP) -> list[Figure]:
    cp = ControlPlaneProcess(workdir / "cp", log_level=BENCH_LOG_LEVEL)
    try:
        cp.start()
        assert cp.proc is not None
        token = cp.admin_token()
        began = time.perf_counter()
        identities = asyncio.run(enroll(cp, token, agents))
        enroll_s = time.perf_counter() - began
        with simulators(workdir, cp, [identities[:1]], "first"):
            asyncio.run(_active(cp, token, 1))
            alone = asyncio.run(latency(cp, token, "site-0", requests, warmup))
            rss_alone = rss_mib(cp.proc.pid)
            rest = identities[1:]
            batches = batched(rest, per_process)
            began = time.perf_counter()
            with simulators(workdir, cp, batches, "crowd"):
                connect_s = time.perf_counter() - began
                active = asyncio.run(_active(cp, token, agents))
                crowded = asyncio.run(latency(cp, token, "site-0", requests, warmup))
                rss_crowded = rss_mib(cp.proc.pid)
    finally:
        cp.stop()
    baseline = "1 agent connected"
    return [
        Figure(f"{agents} agents (own certificate and stream each, {len(batches) + 1} processes): "
               "active on one control plane", active, "agents", target=f"{agents} of {agents}",
               met=active == agents),
        Figure(f"{agents} agents: control plane RSS", rss_crowded, "MiB", target="—", met=None,
               baseline_name=baseline, baseline=rss_alone),
        Figure(f"{agents} agents: routing latency p50 (SELECT 1 to a group of one agent, 1 in flight)",
               crowded.p50_ms, "ms", target="—", met=None, baseline_name=baseline, baseline=alone.p50_ms),
        Figure(f"{agents} agents: routing latency p99", crowded.p99_ms, "ms", target="—", met=None,
               baseline_name=baseline, baseline=alone.p99_ms),
        Figure(f"{agents} agents: time to enroll them all (token + CSR each, 8 at a time)", enroll_s, "s",
               target="—", met=None),
        Figure(f"{agents} agents: time until {agents - 1} agents connected", connect_s, "s", target="—", met=None),
    ]


def run(workdir: Path) -> list[Figure]:
    return run_small(workdir)
