"""Many enrolled agent identities run as real agents in simulator processes: shared by the many-agents and
replicas benchmarks.

`enroll` makes the identities the way agents enroll (an admin creates a
single-use token per agent through `AgentService/CreateEnrollmentToken`; the
agent makes its own key and sends a CSR to `Enrollment/Enroll`), each in a
group of its own ("site-N", one agent per site). `simulators` runs them in
`tools.bench.sim_agents` processes: the agent's own `TunnelClient`, dispatcher
and SQLite handler (and a folder profile, if asked), each agent with its own
channel, TLS connection, certificate and streams (one to each replica, with
replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc

from onprem.agent.identity import make_key_and_csr
from onprem.v1 import agents_pb2, enrollment_pb2, enrollment_pb2_grpc
from tools.bench.small_requests import Load, drive, make_sqlite, query_once
from tools.cluster import ControlPlaneProcess, agents_stub, bearer, operator_channel

ROOT = Path(__file__).resolve().parents[2]
Identity = dict[str, str]


async def enroll(cp: ControlPlaneProcess, token: str, count: int) -> list[Identity]:
    """Enroll `count` agents, each in its own group "site-N", as real agents do (key made here, CSR sent)."""
    ca = cp.ca_file.read_bytes()
    gate = asyncio.Semaphore(8)
    async with operator_channel(cp) as operator, grpc.aio.secure_channel(
            f"127.0.0.1:{cp.enroll_port}", grpc.ssl_channel_credentials(root_certificates=ca)) as enroll_channel:
        agents = agents_stub(operator)
        enrollment = enrollment_pb2_grpc.EnrollmentStub(enroll_channel)

        async def one(i: int) -> Identity:
            async with gate:
                group = f"site-{i}"
                created = await agents.CreateEnrollmentToken(
                    agents_pb2.CreateEnrollmentTokenRequest(group=group, description="bench"), metadata=bearer(token))
                key_pem, csr_pem = await asyncio.to_thread(make_key_and_csr, f"sim-{i}")
                response = await enrollment.Enroll(enrollment_pb2.EnrollRequest(
                    token=created.token, csr_pem=csr_pem.decode(), name=f"sim-{i}", hostname="bench"), timeout=60)
                return {"agent_id": response.agent_id, "group": response.group, "key_pem": key_pem.decode(),
                        "cert_pem": response.certificate_pem}

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def batched(identities: list[Identity], per_process: int) -> list[list[Identity]]:
    return [identities[i:i + per_process] for i in range(0, len(identities), per_process)]


@contextlib.contextmanager
def simulators(workdir: Path, cp: ControlPlaneProcess, batches: list[list[Identity]], name: str, *,
               folder: Path | None = None) -> Iterator[list[subprocess.Popen[str]]]:
    """Start one simulator process per batch, its agents dialing `cp`, and wait until each says all its agents
    are connected (welcomed by `cp`; with replicas, the streams to the others follow). `folder`: also a folder
    profile "files" on it."""
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
                 "--home", str(home), *(["--folder", str(folder)] if folder is not None else [])],
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


async def latency(cp: ControlPlaneProcess, token: str, group: str, requests: int, warmup: int) -> Load:
    """`SELECT 1` to `group` through `cp`, one request at a time, after `warmup` untimed ones."""
    async with operator_channel(cp) as channel:
        one = query_once(channel, token, group=group)
        await drive(one, warmup, 1)
        return await drive(one, requests, 1)
