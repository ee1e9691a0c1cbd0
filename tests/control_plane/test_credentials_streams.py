"""A token that stops being valid stops working at once: on its next call, and on the calls it has open.

A real control plane and a real agent (a SQLite profile, a folder profile with a large file). Each test opens
a long call with its own token — a query that never ends, a large read, an upload held open — then revokes
the token (over the API, with the local CLI, or by writing the store from this process, as another replica
would) or lets it expire, and reads on: the call must end with UNAUTHENTICATED naming the token and why.
Deadlines only bound a call that would otherwise run for ever; no assertion is about time.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc.aio import EOF  # type: ignore[attr-defined]

from onprem.control_plane.store import Store
from onprem.v1 import agents_pb2, database_pb2, files_pb2, files_pb2_grpc, tokens_pb2, tokens_pb2_grpc
from tools.cluster import (
    AgentProcess,
    ControlPlaneProcess,
    bearer,
    database_stub,
    operator_channel,
    wait_for_agent_state,
)

GROUP = "streams"
#: Rows for ever: the query only ends when the control plane ends it.
ENDLESS = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT x FROM n"
BIG_FILE_BYTES = 256 * 1024 * 1024
DEADLINE = 60.0
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"


@dataclass
class Site:
    cp: ControlPlaneProcess
    admin: str
    channel: grpc.aio.Channel | None = None

    def token(self, name: str, *extra: str) -> tuple[str, str]:
        """A new operator token for the group, and its id."""
        token = self.cp.cli("create-token", "--name", name, "--role", "operator", "--groups", GROUP, *extra)
        return token, token.split("_")[1]

    def revoke_from_another_process(self, token_id: str) -> None:
        # As another control-plane replica or a script would: straight into the store, not through this server.
        with Store(f"sqlite:///{self.cp.state_dir / 'control-plane.db'}") as store:
            store.revoke_api_token(token_id)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("token-streams")
    sqlite3.connect(base / "x.db").close()
    folder = base / "files"
    folder.mkdir()
    with open(folder / "big.bin", "wb") as f:
        f.truncate(BIG_FILE_BYTES)  # sparse: costs no disk
    cp = ControlPlaneProcess(base / "cp")
    cp.start()
    agent = AgentProcess(base / "agent", cp, profiles={
        "databases": {"db": {"url": f"sqlite:///{base / 'x.db'}"}},
        "folders": {"files": {"root": str(folder), "read_only": False}},
    })
    agent.enroll(GROUP)
    agent.start()
    admin = cp.admin_token()

    async def ready() -> None:
        async with operator_channel(cp) as channel:
            await wait_for_agent_state(channel, admin, agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)

    asyncio.run(ready())
    try:
        yield Site(cp, admin)
    finally:
        agent.stop()
        cp.stop()


async def revoke_over_the_api(channel: grpc.aio.Channel, admin: str, token_id: str, reason: str) -> None:
    stub = tokens_pb2_grpc.TokenServiceStub(channel)
    await stub.RevokeToken(tokens_pb2.RevokeTokenRequest(name=f"tokens/{token_id}", reason=reason),
                           metadata=bearer(admin))


async def read_until_refused(call: Any) -> grpc.aio.AioRpcError:
    """Read on (slowly, to spare the CPU) until the call fails; a call that ends fine fails the test."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        for _ in range(10_000_000):
            if (await call.read()) is EOF:
                break
            await asyncio.sleep(0.005)
    return info.value


def query(channel: grpc.aio.Channel, token: str) -> Any:
    request = database_pb2.QueryRequest(group=GROUP, profile="db", sql=ENDLESS)
    return database_stub(channel).Query(request, metadata=bearer(token), timeout=DEADLINE)


def revoked_message(name: str, token_id: str, by: str, reason: str = "") -> str:
    why = f" \\({re.escape(reason)}\\)" if reason else ""
    return (f"token '{name}' \\(onp_{token_id}\\) was revoked at {TIME}{by}{why}; ask an admin for a new one")


# --- the next call ----------------------------------------------------------------------------------------------


async def test_a_token_revoked_by_another_process_is_refused_on_its_very_next_call(site: Site) -> None:
    token, token_id = site.token("next-call")
    async with operator_channel(site.cp) as channel:
        stub = files_pb2_grpc.FileServiceStub(channel)
        request = files_pb2.StatRequest(group=GROUP, profile="files", path="big.bin")
        assert (await stub.Stat(request, metadata=bearer(token))).info.size == BIG_FILE_BYTES
        site.revoke_from_another_process(token_id)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Stat(request, metadata=bearer(token))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert re.fullmatch(revoked_message("next-call", token_id, ""), info.value.details() or "")


async def test_a_token_revoked_with_the_local_cli_is_refused_on_its_very_next_call(site: Site) -> None:
    token, token_id = site.token("cli-revoked")
    async with operator_channel(site.cp) as channel:
        stub = files_pb2_grpc.FileServiceStub(channel)
        request = files_pb2.StatRequest(group=GROUP, profile="files", path="big.bin")
        await stub.Stat(request, metadata=bearer(token))
        printed = site.cp.cli("revoke-token", f"onp_{token_id}", "--reason", "left the team")
        assert printed.startswith(f"revoked token 'cli-revoked' (onp_{token_id}) at ")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Stat(request, metadata=bearer(token))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert re.fullmatch(revoked_message("cli-revoked", token_id, r" by local CLI \([^)]+\)", "left the team"),
                        info.value.details() or "")


async def test_an_expired_token_is_refused_naming_when_it_expired(site: Site) -> None:
    token, token_id = site.token("short-lived", "--ttl", "1s")
    async with operator_channel(site.cp) as channel:
        stub = files_pb2_grpc.FileServiceStub(channel)
        request = files_pb2.StatRequest(group=GROUP, profile="files", path="big.bin")
        await asyncio.sleep(1.5)  # past its expiry
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Stat(request, metadata=bearer(token))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert re.fullmatch(f"token 'short-lived' \\(onp_{token_id}\\) expired at {TIME}; ask an admin for a new one",
                        info.value.details() or "")


# --- open calls ---------------------------------------------------------------------------------------------------


async def test_an_open_query_stream_ends_unauthenticated_when_its_token_is_revoked(site: Site) -> None:
    token, token_id = site.token("query-stream")
    async with operator_channel(site.cp) as channel:
        call = query(channel, token)
        assert (await call.read()).WhichOneof("result") == "header"  # type: ignore[attr-defined]
        await revoke_over_the_api(channel, site.admin, token_id, "leaked in a CI log")
        error = await read_until_refused(call)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert re.fullmatch(revoked_message("query-stream", token_id, r" by 'admin' \(onp_[0-9a-f]{16}\)",
                                        "leaked in a CI log"), error.details() or "")


async def test_an_open_file_read_ends_unauthenticated_when_another_process_revokes_its_token(site: Site) -> None:
    token, token_id = site.token("read-stream")
    async with operator_channel(site.cp) as channel:
        stub = files_pb2_grpc.FileServiceStub(channel)
        call = stub.Read(files_pb2.ReadRequest(group=GROUP, profile="files", path="big.bin"),
                         metadata=bearer(token), timeout=DEADLINE)
        await call.read()
        # The control plane learns of it from the store's change counter, within its watch interval.
        site.revoke_from_another_process(token_id)
        error = await read_until_refused(call)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert re.fullmatch(revoked_message("read-stream", token_id, ""), error.details() or "")


async def test_an_upload_in_progress_ends_unauthenticated_when_its_token_is_revoked(site: Site) -> None:
    token, token_id = site.token("upload")
    held = asyncio.Event()

    async def upload() -> AsyncIterator[files_pb2.WriteRequest]:
        yield files_pb2.WriteRequest(header=files_pb2.WriteHeader(
            group=GROUP, profile="files", path="incoming.bin", mode=files_pb2.WRITE_MODE_OVERWRITE))
        yield files_pb2.WriteRequest(data=b"x" * 65536)
        await held.wait()  # and never finish the upload

    async with operator_channel(site.cp) as channel:
        call = files_pb2_grpc.FileServiceStub(channel).Write(upload(), metadata=bearer(token), timeout=DEADLINE)
        await asyncio.sleep(0.5)  # the header and the first chunk are on their way to the agent
        await revoke_over_the_api(channel, site.admin, token_id, "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        held.set()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert re.fullmatch(revoked_message("upload", token_id, r" by 'admin' \(onp_[0-9a-f]{16}\)"),
                        info.value.details() or "")


async def test_an_upload_that_never_sends_its_header_ends_when_its_token_is_revoked(site: Site) -> None:
    token, token_id = site.token("silent-upload")
    held = asyncio.Event()

    async def nothing() -> AsyncIterator[files_pb2.WriteRequest]:
        await held.wait()
        yield files_pb2.WriteRequest()

    async with operator_channel(site.cp) as channel:
        call = files_pb2_grpc.FileServiceStub(channel).Write(nothing(), metadata=bearer(token), timeout=DEADLINE)
        await asyncio.sleep(0.5)  # the call is open, authenticated, waiting for its first message
        await revoke_over_the_api(channel, site.admin, token_id, "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        held.set()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert re.fullmatch(revoked_message("silent-upload", token_id, r" by 'admin' \(onp_[0-9a-f]{16}\)"),
                        info.value.details() or "")


async def test_a_stream_open_when_its_token_expires_ends_unauthenticated(site: Site) -> None:
    token, token_id = site.token("expiring-stream", "--ttl", "2s")
    async with operator_channel(site.cp) as channel:
        call = query(channel, token)
        await call.read()
        error = await read_until_refused(call)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert re.fullmatch(f"token 'expiring-stream' \\(onp_{token_id}\\) expired at {TIME}; ask an admin for a new "
                        "one", error.details() or "")


async def test_revoking_one_token_leaves_the_streams_of_others_running(site: Site) -> None:
    kept, _ = site.token("kept")
    doomed, doomed_id = site.token("doomed")
    async with operator_channel(site.cp) as channel:
        survivor, victim = query(channel, kept), query(channel, doomed)
        await survivor.read()
        await victim.read()
        await revoke_over_the_api(channel, site.admin, doomed_id, "")
        error = await read_until_refused(victim)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        for _ in range(5):
            assert (await survivor.read()) is not EOF
        survivor.cancel()


def test_the_control_plane_logs_which_calls_it_ended(site: Site) -> None:
    log = (site.cp.state_dir.parent / f"{site.cp.state_dir.name}.log").read_text()
    assert re.search(r"ending /onprem\.v1\.DatabaseService/Query of token 'query-stream' \(onp_[0-9a-f]{16}\): "
                     "TOKEN_REVOKED", log)
