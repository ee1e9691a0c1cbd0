"""What both demos do with the processes they start."""

from __future__ import annotations

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
