"""500 agents connected to one control plane: its memory, and the routing latency to one of them.

500 agent identities are enrolled the way agents enroll (an admin creates a
single-use token per agent through `AgentService/CreateEnrollmentToken`; the
agent makes its own key and sends a CSR to `Enrollment/Enroll`), each in a
group of its own ("site-N", one agent per site). They then run as real agents
in a few simulator processes (`tools.bench.sim_agents`: the agent's own
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
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from onprem.agent.identity import make_key_and_csr
from onprem.v1 import agents_pb2, enrollment_pb2, enrollment_pb2_grpc
from tools.bench.common import Figure, rss_mib
from tools.bench.small_requests import Load, drive, make_sqlite, query_once
from tools.cluster import ControlPlaneProcess, agents_stub, bearer, operator_channel

ROOT = Path(__file__).resolve().parents[2]
AGENTS = 500
PER_PROCESS = 100
REQUESTS = 500
WARMUP = 50


async def _enroll(cp: ControlPlaneProcess, token: str, count: int) -> list[dict[str, str]]:
    """Enroll `count` agents, each in its own group "site-N", as real agents do (key made here, CSR sent)."""
    ca = cp.ca_file.read_bytes()
    identities: list[dict[str, str]] = []
    gate = asyncio.Semaphore(8)
    async with operator_channel(cp) as operator, grpc.aio.secure_channel(
            f"127.0.0.1:{cp.enroll_port}", grpc.ssl_channel_credentials(root_certificates=ca)) as enroll_channel:
        agents = agents_stub(operator)
        enrollment = enrollment_pb2_grpc.EnrollmentStub(enroll_channel)

        async def one(i: int) -> dict[str, str]:
            async with gate:
                group = f"site-{i}"
                created = await agents.CreateEnrollmentToken(
                    agents_pb2.CreateEnrollmentTokenRequest(group=group, description="bench"), metadata=bearer(token))
                key_pem, csr_pem = await asyncio.to_thread(make_key_and_csr, f"sim-{i}")
                response = await enrollment.Enroll(enrollment_pb2.EnrollRequest(
                    token=created.token, csr_pem=csr_pem.decode(), name=f"sim-{i}", hostname="bench"), timeout=60)
                return {"agent_id": response.agent_id, "group": response.group, "key_pem": key_pem.decode(),
                        "cert_pem": response.certificate_pem}

        identities = list(await asyncio.gather(*(one(i) for i in range(count))))
    return identities


@contextlib.contextmanager
def _simulators(workdir: Path, cp: ControlPlaneProcess, batches: list[list[dict[str, str]]],
                name: str) -> Iterator[list[subprocess.Popen[str]]]:
    """Start one simulator process per batch and wait until each says all its agents are connected."""
    db = make_sqlite(workdir / "lite.db")
    procs: list[subprocess.Popen[str]] = []
    try:
        for n, batch in enumerate(batches):
            home = workdir / f"{name}-{n}"
            home.mkdir(parents=True)
            (home / "agents.json").write_text(json.dumps(batch))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tools.bench.sim_agents", "--identities", str(home / "agents.json"),
                 "--address", f"127.0.0.1:{cp.agent_port}", "--ca", str(cp.ca_file), "--sqlite", str(db),
                 "--home", str(home)],
                stdout=subprocess.PIPE, text=True, cwd=ROOT))
        for proc, batch in zip(procs, batches, strict=True):
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != f"ready {len(batch)}":
                raise RuntimeError(f"an agent simulator did not connect its agents: {line!r}")
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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


async def _latency(cp: ControlPlaneProcess, token: str, group: str, requests: int, warmup: int) -> Load:
    async with operator_channel(cp) as channel:
        one = query_once(channel, token, group=group)
        await drive(one, warmup, 1)
        return await drive(one, requests, 1)


def run_small(workdir: Path, *, agents: int = AGENTS, per_process: int = PER_PROCESS,
              requests: int = REQUESTS, warmup: int = WARMUP) -> list[Figure]:
    cp = ControlPlaneProcess(workdir / "cp")
    try:
        cp.start()
        assert cp.proc is not None
        token = cp.admin_token()
        began = time.perf_counter()
        identities = asyncio.run(_enroll(cp, token, agents))
        enroll_s = time.perf_counter() - began
        with _simulators(workdir, cp, [identities[:1]], "first"):
            asyncio.run(_active(cp, token, 1))
            alone = asyncio.run(_latency(cp, token, "site-0", requests, warmup))
            rss_alone = rss_mib(cp.proc.pid)
            rest = identities[1:]
            batches = [rest[i:i + per_process] for i in range(0, len(rest), per_process)]
            began = time.perf_counter()
            with _simulators(workdir, cp, batches, "crowd"):
                connect_s = time.perf_counter() - began
                active = asyncio.run(_active(cp, token, agents))
                crowded = asyncio.run(_latency(cp, token, "site-0", requests, warmup))
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
