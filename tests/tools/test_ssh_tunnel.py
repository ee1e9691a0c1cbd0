"""tools/ssh_tunnel.py: a real OpenSSH server and `ssh -R`, started and stopped by one context manager."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support.postgres import PostgresServer
from tools import ssh_tunnel
from tools.ports import free_port
from tools.ssh_tunnel import SshTunnelError, descendants, reverse_tunnel, running


@pytest.mark.postgres
def test_a_row_is_read_through_the_forwarded_port(tmp_path: Path, postgres: PostgresServer) -> None:
    with reverse_tunnel(tmp_path, postgres.port) as tunnel, psycopg.connect(
        host="127.0.0.1", port=tunnel.port, user=postgres.user, password=postgres.password,
        dbname=postgres.database, connect_timeout=10,
    ) as conn:
        row = conn.execute("SELECT 'through ssh -R', pg_catalog.inet_server_port()").fetchone()
    assert tunnel.port != postgres.port
    assert row == ("through ssh -R", postgres.port)


def test_nothing_it_started_runs_after_it_closes(tmp_path: Path) -> None:
    with reverse_tunnel(tmp_path, free_port()) as tunnel:
        # sshd's per-connection children live in sessions of their own: they must be stopped too.
        sessions = descendants(tunnel.sshd_pid)
        started = [tunnel.sshd_pid, tunnel.ssh_pid, *sessions]
    assert sessions
    assert [pid for pid in started if running(pid)] == []
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", tunnel.port)) != 0


@contextlib.contextmanager
def _taken_port() -> Iterator[int]:
    """A loopback port that something else listens on (IPv4 and, where there is one, IPv6 loopback)."""
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(socket.socket())
        first.bind(("127.0.0.1", 0))
        first.listen()
        port = int(first.getsockname()[1])
        with contextlib.suppress(OSError):
            second = stack.enter_context(socket.socket(socket.AF_INET6))
            second.bind(("::1", port))
            second.listen()
        yield port


def test_a_forward_the_server_cannot_listen_for_fails_with_the_logs_and_leaves_nothing_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = set(ssh_tunnel.children(os.getpid()))
    with _taken_port() as taken:
        ports = iter([free_port(), taken])  # sshd's own port, then the one to forward
        monkeypatch.setattr(ssh_tunnel, "free_port", lambda: next(ports))
        with pytest.raises(SshTunnelError, match=f"remote port forwarding failed for listen port {taken}"), \
                reverse_tunnel(tmp_path, free_port()):
            pass
    assert [pid for pid in ssh_tunnel.children(os.getpid()) if pid not in before and running(pid)] == []
