"""Keyed writes across a lost agent: the outcome is recorded with the write, so a retry never runs it twice.

Databases and folders record it on the agent's side; an app records it itself, told by the
`Idempotency-Key` header (tests/support/apps_upstream.py's /payments deduplicates as the IETF draft says).

Two agents of one group serve the same PostgreSQL profile, whose idempotency table `onprem-agent
create-idempotency-table` made. The first agent (the one the router picks: it connected first, both
idle) is armed with a failpoint that ends its process exactly after the commit, or exactly before it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from onprem.agent.failpoints import EXIT_STATUS
from onprem.v1 import apps_pb2, apps_pb2_grpc, database_pb2, profiles_pb2, values_pb2
from tests.faults.support import ACTIVE, error_of, wait_state
from tests.support.apps_upstream import UpstreamProcess
from tests.support.postgres import PostgresServer
from tools.cluster import BIN, AgentProcess, ControlPlaneProcess, bearer, database_stub, operator_channel
from tools.hostile_agent import HostileAgent, hello

GROUP = "once"
TABLE = "onprem_idempotency"
V = values_pb2.Value


@dataclass
class Site:
    cp: ControlPlaneProcess
    first: AgentProcess
    second: AgentProcess
    token: str
    db: PostgresServer

    def count(self, sql: str, *args: Any) -> int:
        with psycopg.connect(self.db.dsn(), autocommit=True) as conn:
            row = conn.execute(sql, args).fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture(scope="module")
def once_db(postgres: PostgresServer) -> PostgresServer:
    postgres.create_database("onprem_fault_once")
    server = PostgresServer(postgres.host, postgres.port, postgres.user, postgres.password, "onprem_fault_once")
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id text PRIMARY KEY, qty int NOT NULL)")
    return server


@contextmanager
def two_agents(tmp_path: Path, profiles: dict[str, Any], failpoint: str | None,
               prepare: Callable[[AgentProcess], None] | None = None,
               ) -> Iterator[tuple[ControlPlaneProcess, AgentProcess, AgentProcess, str]]:
    """A control plane and two agents of GROUP offering `profiles`, both ACTIVE; `first` carries the failpoint.

    `prepare` runs on `first` once both are enrolled and before either starts.
    """
    cp = ControlPlaneProcess(tmp_path / "cp")
    cp.start()
    env = {"ONPREM_FAILPOINTS": failpoint} if failpoint else {}
    first = AgentProcess(tmp_path / "first", cp, name="first", profiles=profiles, env=env)
    second = AgentProcess(tmp_path / "second", cp, name="second", profiles=profiles)
    try:
        token = cp.admin_token()
        first.enroll(GROUP)
        second.enroll(GROUP)
        if prepare is not None:
            prepare(first)
        first.start()
        asyncio.run(wait_state(cp, token, first.agent_id, ACTIVE))
        second.start()
        asyncio.run(wait_state(cp, token, second.agent_id, ACTIVE))
        yield cp, first, second, token
    finally:
        first.stop(timeout=10)
        second.stop(timeout=10)
        cp.stop(timeout=10)


def create_idempotency_table(agent: AgentProcess) -> None:
    made = subprocess.run([str(BIN / "onprem-agent"), "create-idempotency-table", "--profile", "shop",
                           "--config", str(agent.config_file)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr


def make_site(tmp_path: Path, db: PostgresServer, failpoint: str | None) -> Iterator[Site]:
    profiles = {"databases": {"shop": {"url": db.url(), "idempotency_table": TABLE}}}
    with two_agents(tmp_path, profiles, failpoint, create_idempotency_table) as (cp, first, second, token):
        yield Site(cp, first, second, token, db)


@pytest.fixture
def after_commit(tmp_path: Path, once_db: PostgresServer) -> Iterator[Site]:
    yield from make_site(tmp_path, once_db, "database.after_commit=exit")


@pytest.fixture
def before_commit(tmp_path: Path, once_db: PostgresServer) -> Iterator[Site]:
    yield from make_site(tmp_path, once_db, "database.before_commit=exit")


def order(order_id: str, qty: int = 1) -> database_pb2.ExecuteBatchRequest:
    return database_pb2.ExecuteBatchRequest(
        group=GROUP, profile="shop", sql="INSERT INTO orders VALUES (:id, :qty)",
        parameter_sets=[database_pb2.ParameterSet(parameters={"id": V(string_value=order_id),
                                                              "qty": V(int64_value=qty)})])


async def execute(cp: ControlPlaneProcess, token: str, request: database_pb2.ExecuteBatchRequest,
                  key: str | None) -> database_pb2.ExecuteBatchResponse:
    metadata = bearer(token) + ((("idempotency-key", key),) if key else ())
    async with operator_channel(cp) as channel:
        response: database_pb2.ExecuteBatchResponse = await database_stub(channel).ExecuteBatch(
            request, metadata=metadata, timeout=60)
        return response


def died_at_failpoint(agent: AgentProcess) -> bool:
    assert agent.proc is not None
    try:
        return agent.proc.wait(30) == EXIT_STATUS
    except subprocess.TimeoutExpired:
        return False


async def test_agent_lost_after_the_commit_the_control_planes_retry_answers_from_the_record(
        after_commit: Site) -> None:
    site = after_commit
    order_id, key = f"o-{uuid.uuid4().hex[:8]}", f"key-{uuid.uuid4().hex}"
    response = await execute(site.cp, site.token, order(order_id), key)
    assert response == database_pb2.ExecuteBatchResponse(rows_affected=1, sets_applied=1)
    assert died_at_failpoint(site.first)
    assert site.count("SELECT count(*) FROM orders WHERE id = %s", order_id) == 1
    # A manual retry with the same key: the recorded outcome, and still one row.
    assert await execute(site.cp, site.token, order(order_id), key) == response
    assert site.count("SELECT count(*) FROM orders WHERE id = %s", order_id) == 1
    assert site.count(f"SELECT count(*) FROM {TABLE} WHERE idempotency_key = %s", key) == 1


async def test_a_key_is_honoured_after_a_control_plane_restart(after_commit: Site) -> None:
    site = after_commit
    order_id, key = f"o-{uuid.uuid4().hex[:8]}", f"key-{uuid.uuid4().hex}"
    response = await execute(site.cp, site.token, order(order_id), key)
    assert died_at_failpoint(site.first)
    site.cp.stop()
    site.cp.start()
    await wait_state(site.cp, site.token, site.second.agent_id, ACTIVE, within=60)
    assert await execute(site.cp, site.token, order(order_id), key) == response
    assert site.count("SELECT count(*) FROM orders WHERE id = %s", order_id) == 1


async def test_the_same_key_with_another_request_is_refused_naming_the_key(after_commit: Site) -> None:
    site = after_commit
    order_id, key = f"o-{uuid.uuid4().hex[:8]}", f"key-{uuid.uuid4().hex}"
    await execute(site.cp, site.token, order(order_id), key)
    failure = await error_of(execute(site.cp, site.token, order(order_id, qty=2), key))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"idempotency key '{key}' was already used for another request" in failure.details


async def test_without_a_key_a_write_whose_agent_was_lost_fails_unavailable_and_may_have_run(
        after_commit: Site) -> None:
    site = after_commit
    order_id = f"o-{uuid.uuid4().hex[:8]}"
    failure = await error_of(execute(site.cp, site.token, order(order_id), None))
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    assert "it may have run in part or in full" in failure.details
    assert died_at_failpoint(site.first)
    assert site.count("SELECT count(*) FROM orders WHERE id = %s", order_id) == 1  # it ran, once: not retried


async def test_agent_lost_before_the_commit_the_retry_runs_the_write_once(before_commit: Site) -> None:
    site = before_commit
    order_id, key = f"o-{uuid.uuid4().hex[:8]}", f"key-{uuid.uuid4().hex}"
    response = await execute(site.cp, site.token, order(order_id), key)
    assert response == database_pb2.ExecuteBatchResponse(rows_affected=1, sets_applied=1)
    assert died_at_failpoint(site.first)
    assert site.count("SELECT count(*) FROM orders WHERE id = %s", order_id) == 1
    assert await execute(site.cp, site.token, order(order_id), key) == response
    assert site.count("SELECT count(*) FROM orders WHERE id = %s", order_id) == 1


async def test_a_key_longer_than_128_bytes_is_refused_naming_the_limit(after_commit: Site) -> None:
    site = after_commit
    failure = await error_of(execute(site.cp, site.token, order("never"), "k" * 129))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "1 to 128 printable ASCII characters" in failure.details
    assert site.first.proc is not None and site.first.proc.poll() is None  # refused before any agent saw it


async def test_a_keyed_write_is_refused_rather_than_sent_to_an_agent_that_would_ignore_the_key(
        tmp_path: Path) -> None:
    cp = ControlPlaneProcess(tmp_path / "cp")
    cp.start()
    try:
        token = cp.admin_token()
        old = AgentProcess(tmp_path / "old", cp, name="old", profiles={})
        old.enroll(GROUP)  # only the identity: the old agent's frames are hand-made, without "idempotency"
        agent = HostileAgent(old.home / "identity", cp.ca_file, f"127.0.0.1:{cp.agent_port}")
        offered = profiles_pb2.Profile(name="shop", kind=profiles_pb2.PROFILE_KIND_DATABASE)
        async with agent.channel() as channel, agent.stream(channel, hello(offered)) as stream:
            assert "idempotency" not in stream.welcome.capabilities
            await wait_state(cp, token, old.agent_id, ACTIVE)
            failure = await error_of(execute(cp, token, order("never"), "key-for-an-old-agent"))
            assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "honours idempotency keys" in failure.details
            # Without a key the old agent gets the write, as before.
            unkeyed = asyncio.create_task(execute(cp, token, order("as-before"), None))
            _, start = await asyncio.wait_for(stream.next_start(), 30)
            assert start.database_query.batch.sql == "INSERT INTO orders VALUES (:id, :qty)"
            assert not start.HasField("idempotency")
            unkeyed.cancel()
            await asyncio.gather(unkeyed, return_exceptions=True)
    finally:
        cp.stop(timeout=10)


FolderSite = tuple[ControlPlaneProcess, AgentProcess, AgentProcess, str, Path]


def make_folder_site(tmp_path: Path, failpoint: str) -> Iterator[FolderSite]:
    root = tmp_path / "shared"
    root.mkdir()
    with two_agents(tmp_path, {"folders": {"drop": {"root": str(root)}}}, failpoint) as (cp, first, second, token):
        yield cp, first, second, token, root


@pytest.fixture
def folder_site(tmp_path: Path) -> Iterator[FolderSite]:
    yield from make_folder_site(tmp_path, "files.after_rename=exit")


@pytest.fixture
def folder_before_rename(tmp_path: Path) -> Iterator[FolderSite]:
    yield from make_folder_site(tmp_path, "files.before_rename=exit")


@pytest.fixture
def folder_before_record(tmp_path: Path) -> Iterator[FolderSite]:
    yield from make_folder_site(tmp_path, "files.before_record=exit")


def visible(root: Path) -> list[str]:
    """The names a caller sees in the root (the ledger and temporary files start with a dot)."""
    return sorted(n for n in os.listdir(root) if not n.startswith("."))


def keyed_upload(cp: ControlPlaneProcess, token: str, path: str, content: bytes, key: str) -> Any:
    from onprem.v1 import files_pb2, files_pb2_grpc

    header = files_pb2.WriteHeader(group=GROUP, profile="drop", path=path, mode=files_pb2.WRITE_MODE_KEEP_BOTH)
    requests = iter([files_pb2.WriteRequest(header=header), files_pb2.WriteRequest(data=content)])
    channel = grpc.secure_channel(cp.operator_address, grpc.ssl_channel_credentials(cp.ca_file.read_bytes()))
    try:
        return files_pb2_grpc.FileServiceStub(channel).Write(
            requests, metadata=(*bearer(token), ("idempotency-key", key)), timeout=60)
    finally:
        channel.close()


async def test_an_upload_whose_agent_died_after_the_rename_is_answered_by_the_retry_and_written_once(
        folder_site: FolderSite) -> None:
    cp, first, _, token, root = folder_site
    response = await asyncio.to_thread(keyed_upload, cp, token, "report.csv", b"a,b\n1,2\n", "upload-77")
    assert response.info.path == "report.csv"
    assert died_at_failpoint(first)
    # KEEP_BOTH: an upload run twice would have made "report (1).csv".
    assert visible(root) == ["report.csv"]
    again = await asyncio.to_thread(keyed_upload, cp, token, "report.csv", b"a,b\n1,2\n", "upload-77")
    assert again == response
    assert visible(root) == ["report.csv"]


async def test_an_upload_whose_agent_died_before_the_rename_is_written_once_by_the_retry(
        folder_before_rename: FolderSite) -> None:
    cp, first, _, token, root = folder_before_rename
    response = await asyncio.to_thread(keyed_upload, cp, token, "report.csv", b"a,b\n3,4\n", "upload-78")
    assert died_at_failpoint(first)
    assert response.info.path == "report.csv"
    assert visible(root) == ["report.csv"]
    assert (root / "report.csv").read_bytes() == b"a,b\n3,4\n"
    assert await asyncio.to_thread(keyed_upload, cp, token, "report.csv", b"a,b\n3,4\n", "upload-78") == response
    assert sorted(os.listdir(root)) == [".onprem-ledger", "report.csv"]  # the dead attempt's temp file went too


async def test_an_upload_whose_agent_died_between_the_rename_and_its_record_is_not_written_twice(
        folder_before_record: FolderSite) -> None:
    cp, first, _, token, root = folder_before_record
    (root / "report.csv").write_bytes(b"yesterday's")
    response = await asyncio.to_thread(keyed_upload, cp, token, "report.csv", b"a,b\n5,6\n", "upload-79")
    assert died_at_failpoint(first)
    # The first agent's KEEP_BOTH rename made "report (1).csv"; the retry found it by its intent.
    assert response.info.path == "report (1).csv"
    assert visible(root) == ["report (1).csv", "report.csv"]
    assert await asyncio.to_thread(keyed_upload, cp, token, "report.csv", b"a,b\n5,6\n", "upload-79") == response
    assert visible(root) == ["report (1).csv", "report.csv"]


def keyed_delete(cp: ControlPlaneProcess, token: str, path: str, key: str) -> Any:
    from onprem.v1 import files_pb2, files_pb2_grpc

    channel = grpc.secure_channel(cp.operator_address, grpc.ssl_channel_credentials(cp.ca_file.read_bytes()))
    try:
        return files_pb2_grpc.FileServiceStub(channel).Delete(
            files_pb2.DeleteRequest(group=GROUP, profile="drop", path=path),
            metadata=(*bearer(token), ("idempotency-key", key)), timeout=60)
    finally:
        channel.close()


async def test_a_delete_whose_agent_died_after_it_took_effect_answers_the_retry_as_the_first_time(
        folder_site: FolderSite) -> None:
    cp, first, _, token, root = folder_site
    (root / "old.csv").write_bytes(b"x")
    response = await asyncio.to_thread(keyed_delete, cp, token, "old.csv", "delete-1")
    assert died_at_failpoint(first)
    assert visible(root) == []
    # Run again, a delete of a missing file would be NOT_FOUND; the record answers as the first time.
    assert await asyncio.to_thread(keyed_delete, cp, token, "old.csv", "delete-1") == response


# --- app calls: the key travels as Idempotency-Key to an app that deduplicates by it -----------------

@dataclass
class AppSite:
    cp: ControlPlaneProcess
    first: AgentProcess
    token: str
    app: UpstreamProcess


def make_app_site(tmp_path: Path, failpoint: str) -> Iterator[AppSite]:
    app = UpstreamProcess()
    try:
        with two_agents(tmp_path, {"apps": {"pay": {"base_url": app.base_url}}}, failpoint) as (cp, first, _, token):
            yield AppSite(cp, first, token, app)
    finally:
        app.stop()


@pytest.fixture
def app_after_response(tmp_path: Path) -> Iterator[AppSite]:
    yield from make_app_site(tmp_path, "apps.after_response=exit")


@pytest.fixture
def app_before_request(tmp_path: Path) -> Iterator[AppSite]:
    yield from make_app_site(tmp_path, "apps.before_request=exit")


def payment_calls(site: AppSite) -> list[dict[str, Any]]:
    """The calls the app received on /payments (the agents' profile checks GET its base URL too)."""
    return [r for r in site.app.requests() if r["path"] == "/api/payments"]


async def pay(site: AppSite, amount: int, key: str | None) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST /payments through AppService/Call; the status, headers and JSON body the caller gets."""
    head = apps_pb2.CallHead(group=GROUP, profile="pay", method="POST", path="payments",
                             headers=[apps_pb2.Header(name="Content-Type", value="application/json")])
    body = json.dumps({"amount": amount}).encode()

    async def requests() -> AsyncIterator[apps_pb2.CallRequest]:
        yield apps_pb2.CallRequest(head=head)
        yield apps_pb2.CallRequest(body=body)

    metadata = bearer(site.token) + ((("idempotency-key", key),) if key else ())
    async with operator_channel(site.cp) as channel:
        stub = apps_pb2_grpc.AppServiceStub(channel)
        responses = [r async for r in stub.Call(requests(), metadata=metadata, timeout=60)]
    got = responses[0].head
    return (got.status_code, {h.name.lower(): h.value for h in got.headers},
            json.loads(b"".join(r.body for r in responses[1:])))


async def test_an_app_call_whose_agent_died_after_the_apps_answer_is_retried_and_the_app_pays_once(
        app_after_response: AppSite) -> None:
    site = app_after_response
    status, headers, payment = await pay(site, 250, "pay-order-1")
    assert died_at_failpoint(site.first)
    # The first agent's call made the payment; the control plane's retry through the second agent got
    # the app's recorded answer to that same key.
    assert (status, headers["idempotent-replayed"]) == (201, "true")
    assert payment == {"payment": 1, "request": {"amount": 250}, "idempotency_key": "pay-order-1"}
    assert [p["payment"] for p in site.app.payments()] == [1]
    assert [r["headers"].get("Idempotency-Key") for r in payment_calls(site)] == ["pay-order-1", "pay-order-1"]
    # A manual retry by the caller: the same answer, still one payment.
    assert (await pay(site, 250, "pay-order-1"))[::2] == (201, payment)
    assert len(site.app.payments()) == 1


async def test_an_app_call_whose_agent_died_before_sending_it_is_sent_once_by_the_retry(
        app_before_request: AppSite) -> None:
    site = app_before_request
    status, headers, payment = await pay(site, 99, "pay-order-2")
    assert died_at_failpoint(site.first)
    assert (status, "idempotent-replayed" in headers) == (201, False)
    assert payment == {"payment": 1, "request": {"amount": 99}, "idempotency_key": "pay-order-2"}
    assert len(payment_calls(site)) == 1
    assert len(site.app.payments()) == 1


async def test_an_app_call_without_a_key_whose_agent_died_fails_unavailable_and_may_have_run(
        app_after_response: AppSite) -> None:
    site = app_after_response
    failure = await error_of(pay(site, 5, None))
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    assert "it may have run in part or in full" in failure.details
    assert died_at_failpoint(site.first)
    assert len(site.app.payments()) == 1  # it did run, and was not sent again


async def test_the_same_key_with_another_body_gets_the_apps_refusal(app_before_request: AppSite) -> None:
    site = app_before_request
    await pay(site, 10, "pay-order-3")
    status, _, refusal = await pay(site, 11, "pay-order-3")
    assert (status, refusal) == (422, {"error": "this Idempotency-Key was used with another body"})
    assert len(site.app.payments()) == 1
