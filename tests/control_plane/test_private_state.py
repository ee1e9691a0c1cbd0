"""The control plane's state folder is private to its user, whatever the umask it was started with.

Real `onprem-control-plane` processes, started under a permissive umask: the folder they make is 0700, and
every file in it (the SQLite store with its -wal and -shm, the CA's and the server's keys and certificates)
0600. A folder that already holds state with looser modes is left alone but reported, naming each path.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tools.ports import free_port

CONTROL_PLANE = str(Path(sys.executable).parent / "onprem-control-plane")


@contextmanager
def running(state_dir: Path, umask: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    ports = [free_port() for _ in range(3)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [CONTROL_PLANE, "serve", "--state-dir", str(state_dir),
             "--operator-listen", f"127.0.0.1:{ports[0]}", "--agent-listen", f"127.0.0.1:{ports[1]}",
             "--enroll-listen", f"127.0.0.1:{ports[2]}", "--grace-period", "1"],
            stdout=out, stderr=subprocess.STDOUT, umask=umask,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", ports[0])) == 0:
                    break
            assert time.monotonic() < deadline, "the control plane did not start"
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def modes(state_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(state_dir.parent)): stat.S_IMODE(p.stat().st_mode)
            for p in [state_dir, *state_dir.rglob("*")]}


def cli(state_dir: Path, *args: str, umask: int = 0o000) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CONTROL_PLANE, args[0], "--state-dir", str(state_dir), *args[1:]],
                          capture_output=True, text=True, umask=umask)


@pytest.mark.parametrize("umask", [0o000, 0o022], ids=["umask-000", "umask-022"])
def test_a_new_state_folder_and_every_file_in_it_are_private(tmp_path: Path, umask: int) -> None:
    state = tmp_path / "cp"
    with running(state, umask, tmp_path / "cp.log"):
        # A token makes the store write, so that SQLite's -wal and -shm files exist while we look.
        assert cli(state, "create-admin-token", "--name", "admin", umask=umask).returncode == 0
        found = modes(state)
    assert {"cp/control-plane.db", "cp/control-plane.db-wal", "cp/control-plane.db-shm", "cp/ca/ca.key",
            "cp/ca/ca.pem", "cp/ca/server.key", "cp/ca/server.pem"} <= set(found)
    assert {path: oct(mode) for path, mode in found.items() if mode != (0o700 if path in ("cp", "cp/ca") else 0o600)
            } == {}


def test_the_local_cli_alone_makes_the_state_folder_private_too(tmp_path: Path) -> None:
    state = tmp_path / "cp"
    assert cli(state, "create-enrollment-token", "--group", "g").returncode == 0
    assert modes(state) == {"cp": 0o700, "cp/control-plane.db": 0o600}


def test_an_empty_state_folder_made_beforehand_is_made_private(tmp_path: Path) -> None:
    state = tmp_path / "cp"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)  # as systemd's StateDirectory= or a packager makes it
    assert cli(state, "list-tokens").returncode == 0
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_looser_modes_found_at_start_are_reported_naming_each_path(tmp_path: Path) -> None:
    state = tmp_path / "cp"
    assert cli(state, "create-admin-token").returncode == 0
    os.chmod(state, 0o755)
    os.chmod(state / "control-plane.db", 0o644)
    log = tmp_path / "cp.log"
    with running(state, 0o022, log):
        pass
    printed = log.read_text()
    for path, mode, fix in ((state, "0755", "700"), (state / "control-plane.db", "0644", "600")):
        assert (f"WARNING onprem.control_plane.state: {path} is open to other users (mode {mode}), but holds the "
                f"control plane's keys and tokens; run: chmod {fix} {path}") in printed
    # Reported, not changed behind the admin's back.
    assert stat.S_IMODE(state.stat().st_mode) == 0o755


def test_a_token_written_to_a_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "admin.token"
    result = cli(tmp_path / "cp", "create-admin-token", "--output", str(target), umask=0o000)
    assert (result.returncode, result.stdout) == (0, "")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
