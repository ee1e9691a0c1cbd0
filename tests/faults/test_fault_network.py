"""The network fails between the agent and the control plane: a partition, and a proxy that dies.

Partition: the agent runs in its own network namespace, linked to the control plane by a veth pair.
Mid-request, iptables inside the namespace drops every packet both ways: no FIN, no RST, only
silence. Heartbeats (1 s) end the stream on both sides; the operator gets UNAVAILABLE; once the
rules are flushed the agent reconnects by itself.

Proxy: the agent reaches the control plane only through tinyproxy (HTTP CONNECT) in a namespace of
its own. Mid-request the proxy is killed with SIGKILL: the in-flight call fails UNAVAILABLE, and the
agent reconnects through the proxy once it runs again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from tests.faults.support import (
    ACTIVE,
    INACTIVE,
    SLOW_SQLITE,
    drain,
    error_of,
    query,
    rows_of,
    wait_state,
)
from tests.support.netns_site import NamespacedAgent, control_plane_on
from tools import netns
from tools.cluster import bearer, database_stub, operator_channel
from tools.netns import NetLab, Tinyproxy

GROUP = "fault-net"
PROXY_USER, PROXY_PASSWORD = "onprem-agent", "fault-pass.1"


@pytest.fixture
def site_db(tmp_path: Path) -> Path:
    db = tmp_path / "site.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1, 4)])
    return db


async def test_a_partition_fails_the_in_flight_request_unavailable_and_the_agent_reconnects_after_healing(
    tmp_path: Path, site_db: Path,
) -> None:
    netns.require()
    with NetLab() as lab:
        site = lab.namespace("site")
        link = lab.link(site)  # root (control plane) .1 <-> site (agent) .2
        cp = control_plane_on(tmp_path / "cp", link.a_address)
        cp.extra_args = ["--heartbeat-interval", "1"]
        cp.start()
        try:
            token = cp.admin_token()
            agent = NamespacedAgent(lab, site, tmp_path / "agent", cp, link.a_address,
                                    profiles={"databases": {"lite": {"url": f"sqlite:///{site_db}"}}})
            assert agent.enroll(GROUP).returncode == 0
            agent.start()
            await wait_state(cp, token, agent.agent_id, ACTIVE)
            async with operator_channel(cp) as channel:
                call = database_stub(channel).Query(query(GROUP, "lite", SLOW_SQLITE), metadata=bearer(token),
                                                    timeout=120)
                await asyncio.sleep(0.5)
                for chain in ("INPUT", "OUTPUT"):  # the cable is cut: silence both ways
                    site.iptables("-A", chain, "!", "-i" if chain == "INPUT" else "-o", "lo", "-j", "DROP")
                cut_at = time.monotonic()
                failure = await error_of(drain(call))
                assert failure.code == grpc.StatusCode.UNAVAILABLE, failure
                assert "was lost while running the request" in failure.details
                assert time.monotonic() - cut_at < 15, "the partition was noticed only by the operator's deadline"
            await wait_state(cp, token, agent.agent_id, INACTIVE, within=10)
            assert site.packets("OUTPUT", "DROP") > 0  # the agent did try to talk through the cut
            await asyncio.sleep(3)  # the agent, too, notices the silence and starts redialling
            site.iptables("-F", "INPUT")
            site.iptables("-F", "OUTPUT")
            await wait_state(cp, token, agent.agent_id, ACTIVE, within=60)
            assert await rows_of(cp, token, query(GROUP, "lite", "SELECT id FROM t")) == 3
        finally:
            cp.stop(timeout=10)


async def test_a_proxy_killed_mid_stream_fails_the_request_unavailable_and_the_agent_reconnects_through_it(
    tmp_path: Path, site_db: Path,
) -> None:
    netns.require()
    with NetLab() as lab:
        proxy_ns, agent_ns = lab.namespace("proxy"), lab.namespace("agent")
        uplink = lab.link(proxy_ns)  # root (control plane) .1 <-> proxy .2
        sitelink = lab.link(agent_ns, a=proxy_ns)  # proxy .1 <-> agent .2
        proxy = Tinyproxy(lab, proxy_ns, sitelink.a_address, tmp_path / "tinyproxy", PROXY_USER, PROXY_PASSWORD)
        proxy.start()
        agent_ns.allow_outbound_only_to(proxy.listen, proxy.port)  # the proxy is the only way out
        cp = control_plane_on(tmp_path / "cp", uplink.a_address)
        cp.extra_args = ["--heartbeat-interval", "1"]
        cp.start()
        try:
            token = cp.admin_token()
            agent = NamespacedAgent(lab, agent_ns, tmp_path / "agent", cp, uplink.a_address,
                                    profiles={"databases": {"lite": {"url": f"sqlite:///{site_db}"}}},
                                    proxy=proxy.url, proxy_username=PROXY_USER,
                                    env={"ONPREM_TEST_PROXY_PW": PROXY_PASSWORD})
            enrolled = agent.enroll(GROUP)
            assert enrolled.returncode == 0, enrolled.stderr
            agent.start()
            await wait_state(cp, token, agent.agent_id, ACTIVE)
            async with operator_channel(cp) as channel:
                call = database_stub(channel).Query(query(GROUP, "lite", SLOW_SQLITE), metadata=bearer(token),
                                                    timeout=120)
                await asyncio.sleep(0.5)
                assert proxy.proc is not None
                for pid in proxy_ns.pids():  # tinyproxy and anything it started: gone at once
                    os.kill(pid, signal.SIGKILL)
                proxy.proc.wait(10)
                failure = await error_of(drain(call))
                assert failure.code == grpc.StatusCode.UNAVAILABLE, failure
                assert "was lost while running the request" in failure.details
            await wait_state(cp, token, agent.agent_id, INACTIVE, within=10)
            proxy.start()  # the proxy comes back on the same address
            await wait_state(cp, token, agent.agent_id, ACTIVE, within=60)
            assert await rows_of(cp, token, query(GROUP, "lite", "SELECT id FROM t")) == 3
            # And it came back through the proxy: a new CONNECT to the agent port after the restart.
            assert proxy.log().count(f"CONNECT {uplink.a_address}:{cp.agent_port} HTTP/1.1") >= 1
        finally:
            cp.stop(timeout=10)
