"""What the fault tests share: a control plane and an agent of their own, bounded waits, and statuses."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg

from onprem.v1 import agents_pb2, database_pb2, files_pb2, files_pb2_grpc
from tests.support.postgres import PostgresServer
from tools.cluster import (
    AgentProcess,
    ControlPlaneProcess,
    bearer,
    database_stub,
    operator_channel,
    wait_for_agent_state,
)

ACTIVE = agents_pb2.AGENT_STATE_ACTIVE
INACTIVE = agents_pb2.AGENT_STATE_INACTIVE

#: A hang guard for anything that must end by itself: never a timing claim, only "it does not hang".
HANG_GUARD = 30.0

#: A SQLite statement that runs for minutes unless cancelled, producing one row at the end.
SLOW_SQLITE = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000000000) "
               "SELECT max(i) FROM n")
#: `:rows` rows of ~200 bytes each, streamed lazily by SQLite, ids 1, 2, 3, ...
MANY_ROWS_SQLITE = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :rows) "
    "SELECT i, printf('%.200d', i) AS pad FROM n"
)


class Failed(Exception):
    """What an operator call ended with, when it did not succeed."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


async def outcome(awaitable: Any, within: float = HANG_GUARD) -> grpc.StatusCode:
    """The status an operator call ends with (OK when it succeeds), failing the test if it hangs."""
    try:
        await asyncio.wait_for(awaitable, within)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def error_of(awaitable: Any, within: float = HANG_GUARD) -> Failed:
    """The error an operator call must end with; fails the test when it succeeds or hangs."""
    try:
        await asyncio.wait_for(awaitable, within)
    except grpc.aio.AioRpcError as exc:
        return Failed(exc.code(), exc.details() or "")
    raise AssertionError("the call succeeded")


async def drain(call: Any) -> int:
    """Read a streaming call to its end; the number of rows it carried."""
    rows = 0
    async for response in call:
        if isinstance(response, database_pb2.QueryResponse) and response.HasField("rows"):
            rows += response.rows.row_count
    return rows


def query(group: str, profile: str, sql: str, **params: int | str) -> database_pb2.QueryRequest:
    from onprem.v1 import values_pb2

    values = {
        k: values_pb2.Value(int64_value=v) if isinstance(v, int) else values_pb2.Value(string_value=v)
        for k, v in params.items()
    }
    return database_pb2.QueryRequest(group=group, profile=profile, sql=sql, parameters=values)


async def rows_of(cp: ControlPlaneProcess, token: str, request: database_pb2.QueryRequest,
                  within: float = HANG_GUARD) -> int:
    async with operator_channel(cp) as channel:
        call = database_stub(channel).Query(request, metadata=bearer(token), timeout=within)
        return await asyncio.wait_for(drain(call), within)


async def wait_state(cp: ControlPlaneProcess, token: str, agent_id: str, state: int, within: float = 30) -> None:
    async with operator_channel(cp) as channel:
        await wait_for_agent_state(channel, token, agent_id, state, within=within)


async def agent_info(cp: ControlPlaneProcess, token: str, agent_id: str) -> agents_pb2.Agent:
    from tools.cluster import agents_stub

    async with operator_channel(cp) as channel:
        response = await agents_stub(channel).GetAgent(agents_pb2.GetAgentRequest(agent_id=agent_id),
                                                       metadata=bearer(token), timeout=10)
    return response.agent


def files_stub(channel: grpc.aio.Channel) -> files_pb2_grpc.FileServiceAsyncStub:
    return files_pb2_grpc.FileServiceStub(channel)  # type: ignore[return-value]


async def upload(header: files_pb2.WriteHeader, pieces: AsyncIterator[bytes]) -> AsyncIterator[files_pb2.WriteRequest]:
    yield files_pb2.WriteRequest(header=header)
    async for piece in pieces:
        yield files_pb2.WriteRequest(data=piece)


def temp_files(root: Path) -> list[Path]:
    """The agent's upload temp files (`.onprem-tmp-*`) anywhere under `root`."""
    return list(root.rglob(".onprem-tmp-*"))


async def until(predicate: Any, within: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within} s")
        await asyncio.sleep(every)


def log_of(agent: AgentProcess) -> str:
    path = agent.home / "agent.log"
    return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def cluster(base: Path, profiles: dict[str, Any], group: str, *, cp_args: list[str] | None = None,
            env: dict[str, str] | None = None) -> Iterator[tuple[ControlPlaneProcess, AgentProcess, str]]:
    """A control plane and one enrolled, started agent; both stopped (SIGCONT first) however the test ends."""
    cp = ControlPlaneProcess(base / "cp", extra_args=cp_args or [])
    cp.start()
    agent = AgentProcess(base / "agent", cp, profiles=profiles, env=env or {})
    try:
        token = cp.admin_token()
        agent.enroll(group)
        agent.start()
        yield cp, agent, token
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.send_signal(signal.SIGCONT)
        agent.stop(timeout=10)
        cp.stop(timeout=10)


# --- PostgreSQL ------------------------------------------------------------------------------------


def pg_backends(postgres: PostgresServer, wait_event: str = "PgSleep") -> list[int]:
    """Pids of the test database's backends waiting on `wait_event` right now (not this one)."""
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event = %s AND datname = current_database() "
            "AND pid <> pg_backend_pid()", (wait_event,)).fetchall()
    return [int(r[0]) for r in rows]


def pg_terminate_sleepers(postgres: PostgresServer) -> None:
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
                     "AND datname = current_database() AND pid <> pg_backend_pid()")


def pg_data_directory(postgres: PostgresServer) -> Path:
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    return Path(str(row[0]))


def pg_ctl(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run pg_ctl on the test server's data folder, as the `postgres` user when we are root."""
    bindir = next((c for c in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
                   if (c / "pg_ctl").exists()), None)
    binary = str(bindir / "pg_ctl") if bindir else "pg_ctl"
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    log = data.parent / "log"
    pwd.getpwnam("postgres")  # fails loudly when the user is missing
    return subprocess.run([*prefix, binary, "-D", str(data), "-l", str(log), *args],
                          capture_output=True, text=True, timeout=60, check=True)


def sync_write(cp: ControlPlaneProcess, token: str, header: files_pb2.WriteHeader, pieces: Iterator[bytes],
               timeout: float = HANG_GUARD) -> tuple[grpc.StatusCode, str, files_pb2.WriteResponse | None]:
    """Upload with the blocking client (run it in a thread): (status, details, response).

    The grpc.aio client is not used for uploads that the server ends early: while its request
    iterator is still being written, grpc.aio sometimes reports the server's status as INTERNAL
    "Internal error from Core"; the blocking client reports the status the server sent.
    """
    def requests() -> Iterator[files_pb2.WriteRequest]:
        yield files_pb2.WriteRequest(header=header)
        for piece in pieces:
            yield files_pb2.WriteRequest(data=piece)

    channel = grpc.secure_channel(cp.operator_address, grpc.ssl_channel_credentials(cp.ca_file.read_bytes()))
    try:
        stub = files_pb2_grpc.FileServiceStub(channel)
        response = stub.Write(requests(), metadata=bearer(token), timeout=timeout)
        return grpc.StatusCode.OK, "", response
    except grpc.RpcError as exc:
        code = exc.code()
        assert isinstance(code, grpc.StatusCode)
        return code, exc.details() or "", None
    finally:
        channel.close()


def names_in(folder: Path) -> list[str]:
    """Everything under `folder`, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
