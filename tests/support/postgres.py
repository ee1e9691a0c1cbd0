"""A real PostgreSQL server for the tests, started in a temporary folder.

The server runs as the `postgres` OS user when the tests run as root (the
server refuses to run as root), listens on 127.0.0.1 at a free port, and is
stopped with its folder removed when the session ends.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tools.ports import free_port

PASSWORD = "onprem-test-secret"


def _bindir() -> Path:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("PostgreSQL server binaries not found: install the 'postgresql' package")


def bin_path(name: str) -> Path:
    """A PostgreSQL client or server program (e.g. pg_dump) of the installed version."""
    return _bindir() / name


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    database: str

    def url(self, database: str | None = None, *, with_password: bool = True) -> str:
        auth = f"{self.user}:{self.password}" if with_password else self.user
        return f"postgresql+psycopg://{auth}@{self.host}:{self.port}/{database or self.database}"

    def dsn(self, database: str | None = None) -> str:
        return (
            f"host={self.host} port={self.port} user={self.user} "
            f"password={self.password} dbname={database or self.database}"
        )

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    bindir = _bindir()
    root = Path(tempfile.mkdtemp(prefix="onprem-pg-"))
    data, sock = root / "data", root / "sock"
    data.mkdir()
    sock.mkdir()
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:
        pw = pwd.getpwnam("postgres")
        for p in (root, data, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD)
    if as_root:
        os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
    port = free_port()
    subprocess.run(
        [*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "onprem", "--pwfile", str(pwfile),
         "-A", "scram-sha-256", "--no-sync", "-E", "UTF8", "--locale", "C"],
        check=True, capture_output=True,
    )
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run(
        [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"],
        check=True, capture_output=True,
    )
    try:
        server = PostgresServer("127.0.0.1", port, "onprem", PASSWORD, "postgres")
        server.create_database("onprem_test")
        yield PostgresServer("127.0.0.1", port, "onprem", PASSWORD, "onprem_test")
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
