"""Three control-plane replicas on one PostgreSQL database: failover, a rolling restart, and what 300 agents cost.

Real processes: a private PostgreSQL server (`tools.postgres`), three replicas
r1, r2, r3 (`tools.replicas`, with their default heartbeat and check
intervals, as deployed), and agents enrolled for real and run in simulator
processes (`tools.bench.fleet`: the agent's own `TunnelClient`). Every agent
is configured with r1's address only; r1's welcome names the other two, and
the agent holds one stream to each (`max_streams` 3, the default). All is
measured in one run, in this order:

1. **Scale.** Agent 0 connects alone (a process of its own): each replica's
   RSS. Then the other 299 connect (3 processes): each replica's RSS again,
   so per-stream memory = (RSS with 300 - RSS with 1) / 300, and the latency
   of `SELECT 1` to agent 0's group through r1, one request at a time. Then r2
   and r3 stop (SIGTERM) and, once every agent holds r1 only, the same latency
   is measured through r1 alone: the baseline, same process, same agents. Then
   r2 and r3 start again, the agents come back to them, and the three-replica
   latency is measured again: half the requests of each before, half after
   the baseline (A B B A), so that a drift of the shared machine's load
   weighs on both alike. Agents not back on all three within 60 s of that
   restart are counted (a figure), and printed with what r1 lists of them.
2. **Failover.** The 300 agents leave, and 20 agents (a process of their own,
   with a folder profile) connect to all three replicas. r2 is SIGKILLed and started
   again at once; for each agent, the time from the SIGKILL until r2 itself
   lists it connected (`ListAgents` through r2: its own session, and streams
   to all three replicas).
3. **Rolling restart.** While 3 clients read in a loop (two `FileService/Stat`
   to the 20 agents' groups in turn, one `AgentService/ListAgents`) through
   one channel over the three replicas' addresses with the documented service
   config (`round_robin`, reads retried on UNAVAILABLE), each replica in turn
   is stopped with SIGTERM and started again, the next one only once every
   agent holds a stream to it again (or 60 s passed: those agents are
   counted). Every failed read is counted; the first few are printed, with
   what the restart was doing then.

The sessions in 2 and 3 are younger than the agent's `stable_after` (60 s),
so their reconnects start one step further up the backoff than after a long
session: slightly pessimistic.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from onprem.operator_cli.service_config import channel_options
from onprem.v1 import agents_pb2, files_pb2, files_pb2_grpc
from tools.bench.common import Figure, rss_mib
from tools.bench.fleet import Identity, batched, enroll, latency, simulators
from tools.bench.small_requests import Load
from tools.cluster import ControlPlaneProcess, agents_stub, bearer, operator_channel
from tools.postgres import PostgresServer, running_postgres
from tools.replicas import Replicas, new_database

AGENTS = 300
PER_PROCESS = 100
FAILOVER_AGENTS = 20
REQUESTS = 500
WARMUP = 50
#: How long agents may take to connect, or to come back to a replica, before the benchmark gives up on them.
WITHIN = 60.0
#: The agent's reconnect backoff is capped at 30 s (`agent.tunnel_client.Backoff`): once the replica listens
#: again, no agent should wait more than one capped backoff, plus the replica's restart.
FAILOVER_TARGET_S = 35.0
LATENCY_RATIO = 1.25
#: Quiet time after agents came or left, before latency is measured.
SETTLE_S = 2.0
RSS_LIMIT_MIB = 200.0
ALL = ["r1", "r2", "r3"]
ACTIVE = agents_pb2.AGENT_STATE_ACTIVE


async def _live_replicas(cp: ControlPlaneProcess, token: str, count: int, within: float = 60) -> None:
    """Until `cp` lists `count` serving replicas (so that the agents' welcome names them all)."""
    async with operator_channel(cp) as channel:
        stub = agents_stub(channel)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            listed = await stub.ListReplicas(agents_pb2.ListReplicasRequest(), metadata=bearer(token))
            if sum(r.state == agents_pb2.REPLICA_STATE_SERVING for r in listed.replicas) >= count:
                return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{cp.state_dir.name} did not list {count} serving replicas within {within:.0f} s")


async def _held(cp: ControlPlaneProcess, token: str, agent_ids: set[str], replica_ids: list[str], *,
                since: float | None = None, within: float = WITHIN) -> dict[str, float]:
    """Seconds from `since` (time.monotonic(); default now) until `cp` itself holds each agent's stream (its
    `ListAgents` row has a session) and lists it with streams to exactly `replica_ids`; agents not there within
    `within` are missing from the answer. `cp` may not listen yet: its refusals are waited out."""
    since = time.monotonic() if since is None else since
    back: dict[str, float] = {}
    async with operator_channel(cp) as channel:
        stub = agents_stub(channel)
        while len(back) < len(agent_ids) and time.monotonic() < since + within:
            try:
                listed = await stub.ListAgents(agents_pb2.ListAgentsRequest(), metadata=bearer(token), timeout=5)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
                continue
            now = time.monotonic()
            for agent in listed.agents:
                if (agent.agent_id in agent_ids and agent.agent_id not in back and agent.session_id
                        and agent.state == ACTIVE and list(agent.replica_ids) == replica_ids):
                    back[agent.agent_id] = now - since
            await asyncio.sleep(0.1)
    return back


def _ids(identities: list[Identity]) -> set[str]:
    return {i["agent_id"] for i in identities}


def _all_held(cp: ControlPlaneProcess, token: str, identities: list[Identity], replica_ids: list[str]) -> None:
    """Until every agent holds streams to `replica_ids`: the setup, which must succeed."""
    missing = _missing(cp, token, identities, replica_ids, "setup")
    if missing:
        raise RuntimeError(f"{missing} of {len(identities)} agents never held streams to {replica_ids}")


def _missing(cp: ControlPlaneProcess, token: str, identities: list[Identity], replica_ids: list[str],
             when: str) -> int:
    """How many agents do not hold streams to exactly `replica_ids` within `WITHIN` (what `cp` lists); those
    are printed, with what `cp` lists of them."""
    ids = _ids(identities)
    held = asyncio.run(_held(cp, token, ids, replica_ids))
    missing = ids - held.keys()
    if missing:
        asyncio.run(_print_stuck(cp, token, missing, replica_ids, when))
    return len(missing)


async def _print_stuck(cp: ControlPlaneProcess, token: str, agent_ids: set[str], replica_ids: list[str],
                       when: str) -> None:
    print(f"   {when}: {len(agent_ids)} agents hold no streams to {replica_ids} after {WITHIN:.0f} s; "
          f"{cp.state_dir.name} lists:", flush=True)
    async with operator_channel(cp) as channel:
        listed = await agents_stub(channel).ListAgents(agents_pb2.ListAgentsRequest(), metadata=bearer(token))
    for agent in listed.agents:
        if agent.agent_id in agent_ids:
            print(f"     {agent.name} ({agent.agent_id}): {agents_pb2.AgentState.Name(agent.state)}, streams to "
                  f"{list(agent.replica_ids)}", flush=True)


@dataclass
class Reads:
    """What the readers of the rolling restart did: reads that succeeded, and those that failed, by code."""

    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    #: What the restart is doing now, e.g. "r2: SIGTERM, waiting for it to exit".
    phase: str = "before the restarts"
    #: The first few failures, for the report: "HH:MM:SS.mmm (phase) method: CODE: details".
    examples: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(self.failed.values())


async def _reader(channel: grpc.aio.Channel, token: str, method: str, groups: list[str], reads: Reads,
                  stop: asyncio.Event) -> None:
    files = files_pb2_grpc.FileServiceStub(channel)
    agents = agents_stub(channel)
    n = 0
    while not stop.is_set():
        try:
            if method == "Stat":
                group = groups[n % len(groups)]
                await files.Stat(files_pb2.StatRequest(group=group, profile="files", path="hello.txt"),
                                 metadata=bearer(token), timeout=10)
            else:
                await agents.ListAgents(agents_pb2.ListAgentsRequest(), metadata=bearer(token), timeout=10)
            reads.ok += 1
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            reads.failed[code] = reads.failed.get(code, 0) + 1
            if len(reads.examples) < 10:
                at = dt.datetime.now(dt.UTC).strftime("%H:%M:%S.%f")[:-3]
                reads.examples.append(f"{at} UTC ({reads.phase}) {method}: {code}: {exc.details()}")
        n += 1
        await asyncio.sleep(0.01)


def _all_replicas_channel(replicas: Replicas) -> grpc.aio.Channel:
    """One channel over the replicas' operator addresses, with the documented service config."""
    target = "ipv4:" + ",".join(cp.operator_address for cp in replicas.members)
    credentials = grpc.ssl_channel_credentials(replicas[0].ca_file.read_bytes())
    return grpc.aio.secure_channel(target, credentials,
                                   options=[*channel_options(), ("grpc.ssl_target_name_override", "localhost")])


@dataclass
class Rolling:
    reads: Reads
    #: Per replica restarted: seconds from its SIGTERM until every agent held a stream to it again.
    back_s: list[float]
    #: Per replica: its exit code on SIGTERM.
    exits: list[int]
    #: Agents that did not come back to a restarted replica within `WITHIN`, summed over the restarts.
    missing: int


async def _rolling_restart(replicas: Replicas, token: str, fleet: list[Identity]) -> Rolling:
    reads = Reads()
    groups = [i["group"] for i in fleet]
    back_s: list[float] = []
    exits: list[int] = []
    missing = 0
    stop = asyncio.Event()
    async with _all_replicas_channel(replicas) as channel:
        readers = [asyncio.ensure_future(_reader(channel, token, method, groups, reads, stop))
                   for method in ("Stat", "Stat", "ListAgents")]
        try:
            await asyncio.sleep(1.0)
            for cp in replicas.members:
                name = cp.state_dir.name
                t0 = time.monotonic()
                reads.phase = f"{name}: SIGTERM, until it exits"
                exits.append(await asyncio.to_thread(cp.stop))
                reads.phase = f"{name}: starting"
                await asyncio.to_thread(cp.start)
                reads.phase = f"{name}: started, until the agents are back"
                back = await _held(cp, token, _ids(fleet), ALL, since=t0)
                reads.phase = f"{name}: agents back"
                if len(back) < len(fleet):
                    await _print_stuck(cp, token, _ids(fleet) - back.keys(), ALL, f"rolling restart of {name}")
                    missing += len(fleet) - len(back)
                back_s.append(max(back.values(), default=WITHIN))
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.gather(*readers)
    return Rolling(reads, back_s, exits, missing)


def _latency(cp: ControlPlaneProcess, token: str, requests: int, warmup: int) -> Load:
    """`SELECT 1` to agent 0's group through `cp`."""
    return asyncio.run(latency(cp, token, "site-0", requests, warmup))


def _pooled_ms(loads: list[Load]) -> tuple[float, float]:
    """p50 and p99, in ms, of the requests of all `loads` together."""
    pooled = Load(sum(x.requests for x in loads), sum(x.seconds for x in loads),
                  [t for x in loads for t in x.latencies])
    return pooled.p50_ms, pooled.p99_ms


@contextlib.contextmanager
def _database(postgres: PostgresServer | None) -> Iterator[str]:
    """A new database in `postgres`, or in a server of our own."""
    if postgres is not None:
        yield new_database(postgres)
        return
    with running_postgres(database="onprem_bench") as server:
        yield server.url()


def _pid(cp: ControlPlaneProcess) -> int:
    assert cp.proc is not None
    return cp.proc.pid


def run_small(workdir: Path, *, agents: int = AGENTS, per_process: int = PER_PROCESS,
              failover_agents: int = FAILOVER_AGENTS, requests: int = REQUESTS, warmup: int = WARMUP,
              postgres: PostgresServer | None = None) -> list[Figure]:
    assert agents >= 2 and 1 <= failover_agents <= agents
    with _database(postgres) as url:
        replicas = Replicas(workdir, url, fast=False)
        r1, r2, r3 = replicas.members
        try:
            replicas.start()
            token = r1.admin_token()
            asyncio.run(_live_replicas(r1, token, 3))
            identities = asyncio.run(enroll(r1, token, agents))

            # 1. Scale: 1 agent, then all; latency through three replicas, r1 alone, r1 alone, three (ABBA).
            with simulators(workdir, r1, [identities[:1]], "first"):
                _all_held(r1, token, identities[:1], ALL)
                rss_one = [rss_mib(_pid(cp)) for cp in replicas.members]
                crowd = batched(identities[1:], per_process)
                with simulators(workdir, r1, crowd, "crowd"):
                    _all_held(r1, token, identities, ALL)
                    time.sleep(SETTLE_S)
                    three = [_latency(r1, token, requests // 2, warmup)]
                    rss_all = [rss_mib(_pid(cp)) for cp in replicas.members]
                    r2.stop()
                    r3.stop()
                    _all_held(r1, token, identities, ["r1"])
                    time.sleep(SETTLE_S)
                    alone = [_latency(r1, token, requests // 2, warmup), _latency(r1, token, requests // 2, 0)]
                    r2.start()
                    r3.start()
                    not_back = _missing(r1, token, identities, ALL, "after r2 and r3 restarted")
                    time.sleep(SETTLE_S)
                    three.append(_latency(r1, token, requests // 2, warmup))
            three_ms, alone_ms = _pooled_ms(three), _pooled_ms(alone)

            # 2. Failover: SIGKILL r2, start it again at once.
            asyncio.run(_live_replicas(r1, token, 3))
            folder = workdir / "files"
            folder.mkdir()
            (folder / "hello.txt").write_text("hello\n")
            fleet = identities[:failover_agents]
            with simulators(workdir, r1, [fleet], "fleet", folder=folder):
                _all_held(r1, token, fleet, ALL)
                killed = time.monotonic()
                r2.stop(sig=signal.SIGKILL)
                r2.start()
                restart_s = time.monotonic() - killed
                back = asyncio.run(_held(r2, token, _ids(fleet), ALL, since=killed))
                if len(back) < failover_agents:
                    asyncio.run(_print_stuck(r2, token, _ids(fleet) - back.keys(), ALL, "failover"))

                # 3. Rolling restart under reads.
                rolling = asyncio.run(_rolling_restart(replicas, token, fleet))
        finally:
            replicas.stop()

    per_stream_kib = [(after - before) * 1024 / agents for before, after in zip(rss_one, rss_all, strict=True)]
    biggest = max(range(3), key=lambda i: rss_all[i])
    back_values = list(back.values()) or [WITHIN]
    back_max = max(back_values) if len(back) == failover_agents else WITHIN
    print(f"   failover: agents back on r2 after {', '.join(f'{v:.1f}' for v in sorted(back.values()))} s",
          flush=True)
    reads = rolling.reads
    if reads.examples:
        print("   rolling restart, failed reads (the first 10):", flush=True)
        for example in reads.examples:
            print(f"     {example}", flush=True)
    scale = f"3 replicas x {agents} agents"
    one = "1 agent connected"
    lone = "r1 alone, r2 and r3 stopped, same agents"
    return [
        Figure(f"{scale}: RSS of the largest replica ({replicas[biggest].state_dir.name}; the others "
               f"{', '.join(f'{v:.0f}' for i, v in enumerate(rss_all) if i != biggest)} MiB)",
               rss_all[biggest], "MiB", target=f"< {RSS_LIMIT_MIB:.0f} MiB", met=rss_all[biggest] < RSS_LIMIT_MIB,
               baseline_name=one, baseline=rss_one[biggest]),
        Figure(f"{scale}: memory per agent stream on a replica, (RSS with {agents} - RSS with 1) / {agents}, "
               f"the largest of the 3 (the others {', '.join(f'{v:.0f}' for v in sorted(per_stream_kib)[:-1])})",
               max(per_stream_kib), "KiB", target="— (docs/ha.md: about 100 KiB)", met=None),
        Figure(f"{scale}: routing latency p50 through r1 (SELECT 1 to a group of one agent, 1 in flight)",
               three_ms[0], "ms", target=f"<= {LATENCY_RATIO:.0%} of baseline",
               met=three_ms[0] <= LATENCY_RATIO * alone_ms[0], baseline_name=lone, baseline=alone_ms[0]),
        Figure(f"{scale}: routing latency p99 through r1", three_ms[1], "ms", target="—", met=None,
               baseline_name=lone, baseline=alone_ms[1]),
        Figure(f"{scale}: agents that did not come back to all 3 replicas within {WITHIN:.0f} s of r2 and r3's "
               "restart (SIGTERM, then started)", not_back, "agents", target="0", met=not_back == 0),
        Figure(f"failover, 3 replicas x {failover_agents} agents: SIGKILL of r2 and its restart at once, until "
               f"every agent holds a stream to it again: max over agents ({len(back)} of {failover_agents} back)",
               back_max, "s", target=f"< {FAILOVER_TARGET_S:.0f} s (reconnect backoff cap 30 s + the restart)",
               met=len(back) == failover_agents and back_max < FAILOVER_TARGET_S),
        Figure("failover: the same, p50 over agents", statistics.median(back_values), "s", target="—", met=None),
        Figure("failover: from the SIGKILL until r2 listened again", restart_s, "s", target="—", met=None),
        Figure(f"rolling restart of 3 replicas (SIGTERM, start, wait for the {failover_agents} agents), 3 clients "
               "reading (Stat, Stat, ListAgents) through one round_robin channel with the service config: "
               f"failed reads{' (' + ', '.join(f'{k} {v}' for k, v in sorted(reads.failed.items())) + ')' if reads.failed else ''}",
               reads.failures, "reads", target="0", met=reads.failures == 0),
        Figure("rolling restart: reads done", reads.ok + reads.failures, "reads", target="—", met=None),
        Figure("rolling restart: the longest time from a replica's SIGTERM until every agent held a stream to it "
               f"again (exit codes {', '.join(map(str, rolling.exits))})", max(rolling.back_s), "s",
               target="—", met=None),
        Figure(f"rolling restart: agents that did not come back to the restarted replica within {WITHIN:.0f} s, "
               "summed over the 3 restarts", rolling.missing, "agents", target="0", met=rolling.missing == 0),
    ]


def run(workdir: Path) -> list[Figure]:
    return run_small(workdir)

