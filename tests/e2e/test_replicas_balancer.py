"""Replicas behind one TCP load balancer: the agent dials the one address until it holds every replica.

The replicas advertise no agent address. Every dial of the agent lands on the next replica; one that
lands on a replica the agent holds is refused (ALREADY_EXISTS, REPLICA_ALREADY_HELD) and never replaces
the stream it holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_replicas_store import wait_for_streams
from tests.support.postgres import PostgresServer
from tests.support.replicas import FAST, new_database, share_ca
from tests.support.tcp_balancer import tcp_balancer
from tools.cluster import AgentProcess, ControlPlaneProcess

pytestmark = pytest.mark.postgres


async def test_behind_one_address_the_agent_comes_to_hold_every_replica_without_replacing_a_stream(
    tmp_path: Path, postgres: PostgresServer,
) -> None:
    url = new_database(postgres)
    replicas = [ControlPlaneProcess(tmp_path / f"r{i}", database_url=url,
                                    extra_args=["--replica-id", f"r{i}", *FAST]) for i in (1, 2, 3)]
    replicas[0].start()
    for cp in replicas[1:]:
        share_ca(replicas[0], cp)
        cp.start()
    token = replicas[0].admin_token()
    folder = tmp_path / "files"
    folder.mkdir()
    async with tcp_balancer([cp.agent_port for cp in replicas]) as port:
        agent = AgentProcess(tmp_path / "a", replicas[0], {"folders": {"files": {"root": str(folder)}}})
        agent.extra_config = {"control_plane": {"address": f"127.0.0.1:{port}",
                                                "enroll_address": f"127.0.0.1:{replicas[0].enroll_port}",
                                                "ca_file": str(replicas[0].ca_file), "max_streams": 3}}
        agent.enroll("plant", token=replicas[0].enrollment_token("plant"))
        agent.start()
        try:
            await wait_for_streams(replicas[0], token, agent.agent_id, ["r1", "r2", "r3"])
            for cp in replicas:
                log = (cp.state_dir.parent / f"{cp.state_dir.name}.log").read_text()
                # No stream of the agent was ever replaced by a duplicate landing.
                assert "closing its older session" not in log
        finally:
            agent.stop()
            for cp in replicas:
                cp.stop()
