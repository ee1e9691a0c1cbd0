"""An expired agent certificate: the agent was stopped past its certificate's end, so it could not renew.

The control plane issues certificates that live a few seconds (`--agent-cert-days` takes fractions);
the agent starts only after its certificate expired. The control plane must refuse it (it never
becomes ACTIVE), the agent must report the refusal in its log, and `onprem-agent doctor` must say the
certificate expired.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import subprocess
from pathlib import Path

from cryptography import x509

from onprem.v1 import agents_pb2
from tests.faults.support import agent_info, log_of, until
from tools.cluster import BIN, AgentProcess, ControlPlaneProcess

GROUP = "fault-cert"
LIFETIME_DAYS = 6 / 86_400  # six seconds


def not_after(agent: AgentProcess) -> dt.datetime:
    return x509.load_pem_x509_certificate((agent.home / "identity" / "agent.pem").read_bytes()).not_valid_after_utc


async def test_an_agent_whose_certificate_expired_is_refused_says_so_and_doctor_reports_it(tmp_path: Path) -> None:
    db = tmp_path / "site.db"
    sqlite3.connect(db).close()
    cp = ControlPlaneProcess(tmp_path / "cp", extra_args=["--agent-cert-days", f"{LIFETIME_DAYS:.8f}"])
    cp.start()
    agent = AgentProcess(tmp_path / "agent", cp, profiles={"databases": {"lite": {"url": f"sqlite:///{db}"}}})
    try:
        token = cp.admin_token()
        agent.enroll(GROUP)
        expires = not_after(agent)
        assert expires - dt.datetime.now(dt.UTC) < dt.timedelta(minutes=1), f"the certificate lives until {expires}"
        # The agent stays stopped until its certificate has expired: it never had the chance to renew.
        await until(lambda: dt.datetime.now(dt.UTC) > expires + dt.timedelta(seconds=1), 30, "expiry")

        doctor = await asyncio.to_thread(
            subprocess.run, [str(BIN / "onprem-agent"), "doctor", "--config", str(agent.config_file)],
            capture_output=True, text=True, timeout=60)
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        assert "✗ certificate validity: expired on" in doctor.stdout, doctor.stdout
        assert "enroll the agent again" in doctor.stdout

        agent.start()
        # The TLS handshake is refused, and the agent keeps saying why, and what to do.
        await until(lambda: log_of(agent).count("failed to connect to all addresses") >= 2, 20,
                    "the agent's log reporting refused connections")
        assert "the agent's certificate expired on" in log_of(agent)
        assert "enroll the agent again" in log_of(agent)
        # Refused: it never gets a session, however long it retries.
        await asyncio.sleep(3)
        info = await agent_info(cp, token, agent.agent_id)
        assert info.state == agents_pb2.AGENT_STATE_INACTIVE
        assert info.session_id == ""
        assert "connected to " not in log_of(agent)
        assert agent.proc is not None
    finally:
        agent.stop(timeout=10)
        cp.stop(timeout=10)
