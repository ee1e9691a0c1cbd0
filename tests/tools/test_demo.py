"""`make run`'s demo: it comes up, the commands it prints work when pasted, and Ctrl-C stops it all."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _free_block(size: int) -> int:
    for _ in range(100):
        base = random.randint(20_000, 40_000)
        ports = range(base, base + size)
        with socket.socket() as probe:
            if all(probe.connect_ex(("127.0.0.1", p)) != 0 for p in ports):
                return base
    raise RuntimeError("no free block of ports")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _until_ready(demo: subprocess.Popen[str]) -> list[str]:
    """What the demo printed up to its "Press Ctrl-C" line; fails if it ended before."""
    assert demo.stdout is not None
    printed: list[str] = []
    for line in demo.stdout:
        printed.append(line)
        if "Press Ctrl-C" in line:
            return printed
    raise AssertionError("the demo ended early:\n" + "".join(printed))


def test_the_demo_prints_commands_that_work_and_stops_cleanly(tmp_path: Path) -> None:
    base = _free_block(4)
    demo = subprocess.Popen(
        [sys.executable, "-m", "tools.demo", "--dir", str(tmp_path / "demo"), "--base-port", str(base),
         "--app-port", str(base + 3)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        printed = _until_ready(demo)
        commands = [line.strip() for line in printed if "grpcurl -cacert" in line]
        assert len(commands) == 9
        outputs = {}
        for command in commands:
            result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, f"{command}\n{result.stderr}"
            outputs[command] = result.stdout
        by_rpc = {c.rsplit(" ", 1)[-1]: out for c, out in outputs.items()}
        assert "onprem.v1.DatabaseService" in by_rpc["list"]
        assert json.loads(by_rpc["grpc.health.v1.Health/Check"]) == {"status": "SERVING"}
        assert json.loads(by_rpc["onprem.v1.AgentService/ListAgents"])["agents"][0]["state"] == "AGENT_STATE_ACTIVE"
        assert '"Acme GmbH"' in by_rpc["onprem.v1.DatabaseService/Query"]
        assert '"reports/2026-10.csv"' in by_rpc["onprem.v1.FileService/List"]
        assert '"sha256"' in by_rpc["onprem.v1.FileService/Read"]
        assert '"status_code": 200' in by_rpc["onprem.v1.AppService/Call"]
        # The API key the agent injects never reaches the caller.
        key = (tmp_path / "demo" / "app.key").read_text().strip()
        assert all(key not in out for out in outputs.values())
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
    for port in range(base, base + 4):
        assert not _listening(port), f"port {port} still listening after Ctrl-C"


def test_the_replicas_demo_serves_through_every_replica_and_stops_cleanly(tmp_path: Path) -> None:
    # PostgreSQL runs as its own user, which must reach the demo's folder: pytest's are private.
    for folder in (tmp_path, tmp_path.parent, tmp_path.parent.parent):
        folder.chmod(0o711)
    base = _free_block(31)
    demo = subprocess.Popen(
        [sys.executable, "-m", "tools.demo", "--replicas", "3", "--dir", str(tmp_path / "ha"), "--base-port",
         str(base)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        printed = _until_ready(demo)
        assert "holding streams to r1, r2, r3" in "".join(printed)
        commands = [line.strip() for line in printed if "grpcurl -cacert" in line]
        assert len(commands) == 4
        results = [subprocess.run(["bash", "-c", c], cwd=ROOT, capture_output=True, text=True, timeout=60)
                   for c in commands]
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        replicas = json.loads(results[0].stdout)["replicas"]
        assert [r["replica_id"] for r in replicas] == ["r1", "r2", "r3"]
        # The same rows from each replica.
        assert len({r.stdout for r in results[1:]}) == 1 and '"Acme"' in results[1].stdout
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0
    for port in (base, base + 10, base + 20, base + 30):
        assert not _listening(port), f"port {port} still listening after Ctrl-C"
