"""A real PostgreSQL server of our own, for the tests and for the replicas demo.

The server runs as the `postgres` OS user when we run as root (the server
refuses to run as root) and listens on 127.0.0.1. In a temporary folder (the
tests) it is removed when it stops; in a folder given (the demo) it is kept
and reused on the next start.
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
def running_postgres(root: Path | None = None, port: int | None = None,
                     database: str = "onprem_test") -> Iterator[PostgresServer]:
    """A server in `root` (kept) or in a temporary folder (removed), with `database` made in it."""
    bindir = _bindir()
    keep = root is not None
    root = root if root is not None else Path(tempfile.mkdtemp(prefix="onprem-pg-"))
    data, sock = root / "data", root / "sock"
    made = (data / "PG_VERSION").exists()
    data.mkdir(parents=True, exist_ok=True)
    sock.mkdir(exist_ok=True)
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:
        pw = pwd.getpwnam("postgres")
        for p in (root, data, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
        if subprocess.run([*prefix, "test", "-x", str(root)], capture_output=True).returncode != 0:
            raise RuntimeError(f"the postgres user cannot reach {root}: a folder above it is private (chmod o+x "
                               "the folders on the way, or choose another folder)")
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD)
    if as_root:
        os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
    port = port or free_port()
    if not made:
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
        if not (made and keep):
            server.create_database(database)
        yield PostgresServer("127.0.0.1", port, "onprem", PASSWORD, database)
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast" if keep else "immediate",
                        "stop"], capture_output=True)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
