"""`make run`'s demo: it comes up, the commands it prints work when pasted, its console takes the demo's token,
and Ctrl-C stops it all."""

from __future__ import annotations

import http.cookiejar
import json
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request
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


def _console_login(url: str, ca: Path, token: str) -> str:
    """Log in to the console as its login form does; the principal line of the page it leads to."""
    context = ssl.create_default_context(cafile=str(ca))
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                         urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    with opener.open(url + "/login", timeout=10) as response:
        form = response.read().decode()
    [csrf] = re.findall(r'name="csrf_token" value="([^"]+)"', form)
    data = urllib.parse.urlencode({"token": token, "csrf_token": csrf, "next": "/"}).encode()
    request = urllib.request.Request(url + "/login", data=data, headers={"Origin": url})
    with opener.open(request, timeout=10) as response:  # follows the 303 to the fleet page
        page = response.read().decode()
    [principal] = re.findall(r'<span id="principal" title="[^"]+">([^<]+)</span>', page)
    return str(principal)


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
    base = _free_block(5)
    demo = subprocess.Popen(
        [sys.executable, "-m", "tools.demo", "--dir", str(tmp_path / "demo"), "--base-port", str(base),
         "--app-port", str(base + 4)],
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
        # The console: its address is printed, and the demo's token logs in to it over TLS with the demo's CA.
        assert f"The web console: https://127.0.0.1:{base + 3}/\n" in printed
        token = (tmp_path / "demo" / "admin.token").read_text().strip()
        assert _console_login(f"https://127.0.0.1:{base + 3}", tmp_path / "demo" / "ca.pem", token) == (
            "demo-admin · admin · groups: *")
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
    for port in range(base, base + 5):
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
