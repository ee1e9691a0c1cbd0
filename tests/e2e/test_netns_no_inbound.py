"""No inbound port: an agent, a PostgreSQL server and a folder live in a
network namespace whose firewall drops every NEW inbound connection, and the
operator API still reaches them, because the agent dials out.

    root ns: control plane (10.a.b.1)  ──veth──  site ns (10.a.b.2): agent, PostgreSQL, folder
                                                 INPUT: ESTABLISHED,RELATED accept; lo accept; DROP
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from onprem.v1 import agents_pb2, database_pb2, files_pb2, files_pb2_grpc
from tests.support.netns_site import NamespacedAgent, control_plane_on, postgres_in
from tests.support.postgres import PostgresServer
from tools import netns
from tools.cluster import ControlPlaneProcess, bearer, database_stub, operator_channel, wait_for_agent_state
from tools.netns import Link, Namespace, NetLab

GROUP = "sealed-site"


@dataclass
class Site:
    cp: ControlPlaneProcess
    token: str
    ns: Namespace
    link: Link
    postgres: PostgresServer
    agent: NamespacedAgent
    report: bytes


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    netns.require()
    base = tmp_path_factory.mktemp("no-inbound")
    folder = base / "share"
    (folder / "reports").mkdir(parents=True)
    report = os.urandom(3 * 1024 * 1024 + 123)  # several 1 MiB chunks
    (folder / "reports" / "2026-q3.bin").write_bytes(report)
    with NetLab() as lab:
        ns = lab.namespace("site")
        link = lab.link(ns)  # root (control plane) .1 <-> site .2
        ns.run("ip", "route", "add", "default", "via", link.a_address)
        ns.deny_inbound()
        cp = control_plane_on(base / "cp", link.a_address)
        try:
            cp.start()
            with postgres_in(ns, listen=link.b_address) as pg:
                agent = NamespacedAgent(
                    lab, ns, base / "agent", cp, link.a_address, name="sealed",
                    profiles={
                        "databases": {"pg": {"url": pg.url(with_password=False), "password_env": "SITE_PG_PW"}},
                        "folders": {"share": {"root": str(folder), "read_only": True}},
                    },
                    env={"SITE_PG_PW": pg.password},
                )
                enrolled = agent.enroll(GROUP)  # an outbound connection too
                assert enrolled.returncode == 0, enrolled.stderr
                agent.start()
                yield Site(cp, cp.admin_token(), ns, link, pg, agent, report)
        finally:
            cp.stop()


async def test_queries_reach_postgres_inside_a_namespace_that_drops_inbound_connections(site: Site) -> None:
    sql = ("SELECT current_setting('port')::int AS port, inet_server_addr()::text AS server, n "
           "FROM generate_series(1, 3) AS n ORDER BY n")
    async with operator_channel(site.cp) as channel:
        await wait_for_agent_state(channel, site.token, site.agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)
        columns: dict[str, list[object]] = {}
        names: list[str] = []
        async for r in database_stub(channel).Query(
            database_pb2.QueryRequest(group=GROUP, profile="pg", sql=sql), metadata=bearer(site.token)
        ):
            if r.HasField("header"):
                names = [c.name for c in r.header.columns]
            if r.HasField("rows"):
                for name, col in zip(names, r.rows.columns, strict=True):
                    columns.setdefault(name, []).extend(col.int64_values or col.string_values)
    # The namespace's own server: its port, reached by the agent on the namespace's loopback.
    assert columns == {"port": [site.postgres.port] * 3, "server": ["127.0.0.1/32"] * 3, "n": [1, 2, 3]}


async def test_file_reads_work_from_a_namespace_that_drops_inbound_connections(site: Site) -> None:
    async with operator_channel(site.cp) as channel:
        await wait_for_agent_state(channel, site.token, site.agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)
        stub: files_pb2_grpc.FileServiceAsyncStub = files_pb2_grpc.FileServiceStub(channel)
        data, sha256, size = bytearray(), "", -1
        async for r in stub.Read(files_pb2.ReadRequest(group=GROUP, profile="share", path="reports/2026-q3.bin"),
                                 metadata=bearer(site.token)):
            if r.HasField("info"):
                size = r.info.size
            elif r.HasField("data"):
                data += r.data
            else:
                sha256 = r.sha256
    assert size == len(site.report)
    assert bytes(data) == site.report
    assert sha256 == hashlib.sha256(site.report).hexdigest()


async def test_a_connection_from_outside_into_the_site_namespace_is_dropped(site: Site) -> None:
    pg_port = site.postgres.port
    # PostgreSQL does listen on the site's veth address: from inside, it accepts.
    assert site.ns.tcp_connects(site.link.b_address, pg_port) == "connected"
    dropped = site.ns.packets("INPUT", "DROP")
    # From the control plane's side, the SYN is dropped: no answer at all, not even a refusal.
    assert netns.probe_tcp(site.link.b_address, pg_port, timeout=2.0) == "timeout"
    assert site.ns.packets("INPUT", "DROP") > dropped
    # Meanwhile the agent holds its stream, which it opened outbound, and listens on nothing.
    assert site.agent.proc is not None
    mine = f"pid={site.agent.proc.pid},"
    established = site.ns.run("ss", "-Htnp", "state", "established").stdout.splitlines()
    peers = {line.split()[3].replace("[::ffff:", "").replace("]", "") for line in established if mine in line}
    assert f"{site.link.a_address}:{site.cp.agent_port}" in peers
    listening = site.ns.run("ss", "-Hltnup").stdout
    assert mine not in listening


def test_the_site_firewall_is_exactly_the_no_inbound_policy(site: Site) -> None:
    rules = site.ns.run("iptables", "-w", "-S", "INPUT").stdout.splitlines()
    assert rules == [
        "-P INPUT ACCEPT",
        "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -j DROP",
    ]
