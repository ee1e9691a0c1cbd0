"""The agent reaches the control plane through a corporate HTTP CONNECT proxy
with basic auth, proven with real network namespaces and a real tinyproxy.

    agent ns ──veth── proxy ns (tinyproxy, BasicAuth) ──veth── root ns (control plane)
    10.a.b.2          10.a.b.1 : 10.c.d.2                       10.c.d.1

The agent's namespace has a route to the proxy's /24 only (no default route),
and its OUTPUT chain accepts nothing but loopback and the proxy's address and
port: the only way out is tinyproxy. The proxy namespace does not forward
packets (ip_forward is 0 there), so no route could bypass it.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from onprem.v1 import agents_pb2, database_pb2
from tests.support.netns_site import NamespacedAgent, control_plane_on
from tools import netns
from tools.cluster import (
    ControlPlaneProcess,
    agents_stub,
    bearer,
    database_stub,
    operator_channel,
    wait_for_agent_state,
)
from tools.netns import Namespace, NetLab, Tinyproxy

GROUP = "behind-proxy"
PROXY_USER = "onprem-agent"
PROXY_PASSWORD = "s3cret-pass_word.1"  # tinyproxy accepts only [-a-z0-9._] in BasicAuth
ACTIVE = agents_pb2.AGENT_STATE_ACTIVE
INACTIVE = agents_pb2.AGENT_STATE_INACTIVE


@dataclass
class ProxySite:
    lab: NetLab
    base: Path
    cp: ControlPlaneProcess
    token: str
    cp_host: str
    agent_ns: Namespace
    proxy: Tinyproxy
    agent_address: str
    db: Path

    def agent(self, name: str) -> NamespacedAgent:
        """An agent in the agent namespace, configured with the proxy and its right credentials."""
        return NamespacedAgent(
            self.lab, self.agent_ns, self.base / name, self.cp, self.cp_host,
            profiles={"databases": {"lite": {"url": f"sqlite:///{self.db}"}}},
            name=name, proxy=self.proxy.url, proxy_username=PROXY_USER,
            env={"ONPREM_TEST_PROXY_PW": PROXY_PASSWORD},
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxySite]:
    netns.require()
    base = tmp_path_factory.mktemp("proxy")
    db = base / "site.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
        conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"row {i}") for i in range(1, 6)])
    with NetLab() as lab:
        proxy_ns, agent_ns = lab.namespace("proxy"), lab.namespace("agent")
        uplink = lab.link(proxy_ns)  # root (control plane) .1 <-> proxy .2
        sitelink = lab.link(agent_ns, a=proxy_ns)  # proxy .1 <-> agent .2
        proxy_ns.sysctl("net.ipv4.ip_forward", "0")  # the default; said out loud: the proxy host routes nothing
        proxy = Tinyproxy(lab, proxy_ns, sitelink.a_address, base / "tinyproxy", PROXY_USER, PROXY_PASSWORD)
        proxy.start()
        agent_ns.allow_outbound_only_to(proxy.listen, proxy.port)
        cp = control_plane_on(base / "cp", uplink.a_address)
        try:
            cp.start()
            yield ProxySite(lab, base, cp, cp.admin_token(), uplink.a_address, agent_ns, proxy,
                            sitelink.b_address, db)
        finally:
            cp.stop()


def agent_peers(agent: NamespacedAgent, site: ProxySite) -> list[str]:
    """The peers (host:port) of the agent process's established TCP connections, seen in its namespace."""
    assert agent.proc is not None
    out = site.agent_ns.run("ss", "-Htnp", "state", "established").stdout
    peers = [line.split()[3] for line in out.splitlines() if f"pid={agent.proc.pid}," in line]
    return [p.replace("[::ffff:", "").replace("]", "") for p in peers]


async def test_the_agent_namespace_cannot_reach_the_control_plane_directly(site: ProxySite) -> None:
    assert site.agent_ns.tcp_connects(site.cp_host, site.cp.agent_port) == "ENETUNREACH"
    assert site.agent_ns.tcp_connects(site.cp_host, site.cp.enroll_port) == "ENETUNREACH"
    # The proxy's port is reachable; any other port on its host is refused by the agent's own OUTPUT chain.
    assert site.agent_ns.tcp_connects(site.proxy.listen, site.proxy.port) == "connected"
    rejected = site.agent_ns.packets("OUTPUT", "REJECT")
    assert site.agent_ns.tcp_connects(site.proxy.listen, 22) == "ECONNREFUSED"
    assert site.agent_ns.packets("OUTPUT", "REJECT") == rejected + 1


async def test_agent_enrolls_and_serves_queries_through_an_authenticating_proxy(site: ProxySite) -> None:
    agent = site.agent("via-proxy")
    enrolled = agent.enroll(GROUP)
    assert enrolled.returncode == 0, enrolled.stderr
    agent.start()
    async with operator_channel(site.cp) as channel:
        await wait_for_agent_state(channel, site.token, agent.agent_id, ACTIVE)
        ids: list[int] = []
        async for r in database_stub(channel).Query(
            database_pb2.QueryRequest(group=GROUP, profile="lite", sql="SELECT id FROM t ORDER BY id"),
            metadata=bearer(site.token),
        ):
            if r.HasField("rows"):
                ids.extend(r.rows.columns[0].int64_values)
    assert ids == [1, 2, 3, 4, 5]
    # Its one stream is a connection to the proxy, the only peer it has.
    assert agent_peers(agent, site) == [f"{site.proxy.listen}:{site.proxy.port}"]
    log = site.proxy.log()
    # tinyproxy saw the agent's CONNECTs (enrollment, then the tunnel) and, with the
    # credentials accepted, opened the upstream connections itself.
    assert re.search(rf"Connect \(file descriptor \d+\): {re.escape(site.agent_address)}$", log, re.MULTILINE)
    assert f"CONNECT {site.cp_host}:{site.cp.enroll_port} HTTP/1.1" in log
    assert f"CONNECT {site.cp_host}:{site.cp.agent_port} HTTP/1.1" in log
    assert f"opensock: opening connection to {site.cp_host}:{site.cp.agent_port}" in log


def tunnel_connects(site: ProxySite) -> int:
    """How many CONNECT requests for the control plane's agent port tinyproxy has received."""
    return site.proxy.log().count(f"CONNECT {site.cp_host}:{site.cp.agent_port} HTTP/1.1")


def upstream_connections(site: ProxySite) -> int:
    """How many connections tinyproxy has opened to the control plane's agent port."""
    return site.proxy.log().count(f"opensock: opening connection to {site.cp_host}:{site.cp.agent_port}")


async def refused_and_inactive(site: ProxySite, agent: NamespacedAgent, code: int) -> None:
    """Start `agent`, see the proxy refuse its tunnel with `code` at least twice (first attempt and a
    retry), and the control plane never see it: it stays INACTIVE, with no session."""
    connects_before, upstream_before = tunnel_connects(site), upstream_connections(site)
    agent.start()
    deadline = time.monotonic() + 15  # the agent's backoff is jittered, at most 0.5 s then 1 s
    refused = rf"ipv4:{re.escape(site.proxy.listen)}:{site.proxy.port}: HTTP proxy returned response code (\d+)"
    # Both counted: the proxy's CONNECTs, and the agent's log line for each refused dial (written once the
    # dial has failed, a moment after the proxy answered it).
    while tunnel_connects(site) < connects_before + 2 or len(re.findall(refused, agent.log())) < 2:
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()
        assert time.monotonic() < deadline, f"the agent did not retry through the proxy:\n{agent.log()}"
        await asyncio.sleep(0.05)
    refusals = re.findall(refused, agent.log())
    assert refusals and set(refusals) == {str(code)}, agent.log()
    async with operator_channel(site.cp) as channel:
        got = (await agents_stub(channel).GetAgent(agents_pb2.GetAgentRequest(agent_id=agent.agent_id),
                                                 metadata=bearer(site.token))).agent
    assert got.state == INACTIVE
    assert got.session_id == ""
    # The proxy opened no connection to the control plane for any of those CONNECTs.
    assert upstream_connections(site) == upstream_before


# tinyproxy 1.11 answers 407 to a CONNECT without a Proxy-Authorization header and 401 to one whose
# credentials are wrong: a 401 proves that gRPC sent the header, with the wrong password in it.


async def test_agent_with_a_wrong_proxy_password_is_refused_with_401_and_never_becomes_active(
    site: ProxySite,
) -> None:
    agent = site.agent("wrong-password")
    enrolled = agent.enroll(GROUP)
    assert enrolled.returncode == 0, enrolled.stderr
    agent.env = {"ONPREM_TEST_PROXY_PW": "not-the-password"}
    await refused_and_inactive(site, agent, 401)


async def test_agent_without_proxy_credentials_is_refused_with_407_and_never_becomes_active(
    site: ProxySite,
) -> None:
    agent = site.agent("no-credentials")
    enrolled = agent.enroll(GROUP)
    assert enrolled.returncode == 0, enrolled.stderr
    agent.proxy_username, agent.env = None, {}
    await refused_and_inactive(site, agent, 407)
