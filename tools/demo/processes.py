"""What both demos do with the processes they start."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def wait_for_port(address: str, proc: subprocess.Popen[bytes], what: str, logs: Path, timeout: float = 30) -> None:
    """Return once `proc` listens on `address`; exit the demo, saying why, if it dies or never does."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"demo: the {what} exited with code {proc.returncode}; see {logs}/*.log")
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.1)
    sys.exit(f"demo: the {what} did not listen on {address} within {timeout:.0f} s (port in use?)")


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt: a shell that starts us in the background leaves
    SIGINT ignored, and a service manager stops us with SIGTERM."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def stop_all(procs: list[subprocess.Popen[bytes]], timeout: float = 15) -> None:
    """SIGTERM the demo's processes, the last started first; kill those that do not exit in `timeout`."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
