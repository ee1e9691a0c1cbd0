"""Everything the control plane refuses leaves an audit row saying who, what and why; enrollment is guarded.

A real control plane; rows are read from its SQLite store as an auditor would (the writer batches them, so a
read waits for the row to appear). Who: the token's name and id, or "anonymous" and the caller's address.
What: the RPC. Why: the status and the reason.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from onprem.agent.identity import make_key_and_csr
from onprem.v1 import agents_pb2, agents_pb2_grpc, database_pb2, enrollment_pb2, enrollment_pb2_grpc
from tools.cluster import ControlPlaneProcess, bearer, database_stub, operator_channel

S = grpc.StatusCode
UNKNOWN_ENROLLMENT_TOKEN = "onpe_0123456789abcdef_" + "x" * 43
PEER = r"ipv4:127\.0\.0\.1:\d+"


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    process = ControlPlaneProcess(tmp_path_factory.mktemp("refusals") / "cp")
    process.start()
    yield process
    process.stop()


@pytest.fixture
def own_cp(tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    """A control plane of the test's own: a flood spends its address's budget of audit rows, which the
    module's other tests must still have (they raced the refill of the shared one and sometimes lost)."""
    process = ControlPlaneProcess(tmp_path / "cp")
    process.start()
    yield process
    process.stop()


def audit_rows(cp: ControlPlaneProcess, where: str, *args: object, within: float = 15.0) -> list[dict[str, Any]]:
    """The audit rows matching `where`, once there is at least one (the writer runs in the background)."""
    deadline = time.monotonic() + within
    with sqlite3.connect(cp.state_dir / "control-plane.db") as db:
        db.row_factory = sqlite3.Row
        while True:
            rows = [dict(r) for r in db.execute(f"SELECT * FROM audit WHERE {where} ORDER BY id", args)]
            if rows or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)


def enroll_stub(cp: ControlPlaneProcess, channel: grpc.aio.Channel) -> enrollment_pb2_grpc.EnrollmentAsyncStub:
    # Typed through an aio channel, the generated stub's overload gives the async flavour.
    return enrollment_pb2_grpc.EnrollmentStub(channel)


def enroll_channel(cp: ControlPlaneProcess) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=cp.ca_file.read_bytes())
    return grpc.aio.secure_channel(f"127.0.0.1:{cp.enroll_port}", creds)


# --- operator calls -------------------------------------------------------------------------------------------------


async def test_an_admin_call_refused_to_an_operator_token_is_audited_with_who_what_and_why(
    cp: ControlPlaneProcess,
) -> None:
    token = cp.token("auditee", "operator", "*")
    async with operator_channel(cp) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await agents_pb2_grpc.AgentServiceStub(channel).CreateEnrollmentToken(
                agents_pb2.CreateEnrollmentTokenRequest(group="g"), metadata=bearer(token))
    assert info.value.code() == S.PERMISSION_DENIED
    rows = audit_rows(cp, "principal = ? AND method = ?", "auditee", "/onprem.v1.AgentService/CreateEnrollmentToken")
    assert [(r["role"], r["outcome"], r["code"], r["detail"]) for r in rows] == [
        ("operator", "PERMISSION_DENIED", 7,
         f"ADMIN_REQUIRED: token 'auditee' (onp_{token.split('_')[1]}) is not an admin token; ask an admin to do this")]
    assert rows[0]["token_id"] == token.split("_")[1]
    assert re.fullmatch(PEER, rows[0]["peer"])


async def test_a_call_without_a_token_is_audited_as_anonymous_with_the_callers_address(
    cp: ControlPlaneProcess,
) -> None:
    async with operator_channel(cp) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await agents_pb2_grpc.AgentServiceStub(channel).RevokeAgent(agents_pb2.RevokeAgentRequest(agent_id="x"))
    rows = audit_rows(cp, "method = ?", "/onprem.v1.AgentService/RevokeAgent")
    assert [(r["principal"], r["outcome"], r["token_id"]) for r in rows] == [("anonymous", "UNAUTHENTICATED", None)]
    assert rows[0]["detail"] == ("MISSING_TOKEN: missing or malformed credentials: send the metadata "
                                 "'authorization: Bearer <token>'")
    assert re.fullmatch(PEER, rows[0]["peer"])


async def test_a_call_with_a_revoked_token_is_audited_under_that_tokens_name(cp: ControlPlaneProcess) -> None:
    token = cp.token("gone", "operator", "*")
    token_id = token.split("_")[1]
    cp.cli("revoke-token", f"onp_{token_id}")
    async with operator_channel(cp) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await agents_pb2_grpc.AgentServiceStub(channel).ListGroups(agents_pb2.ListGroupsRequest(),
                                                                       metadata=bearer(token))
    rows = audit_rows(cp, "principal = ? AND method = ?", "gone", "/onprem.v1.AgentService/ListGroups")
    assert [(r["outcome"], r["token_id"]) for r in rows] == [("UNAUTHENTICATED", token_id)]
    assert rows[0]["detail"].startswith(f"TOKEN_REVOKED: token 'gone' (onp_{token_id}) was revoked at ")


async def test_a_request_for_a_group_the_token_may_not_use_is_audited_with_the_group(cp: ControlPlaneProcess) -> None:
    token = cp.token("team-a-only", "operator", "team-a")
    async with operator_channel(cp) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in database_stub(channel).Query(
                    database_pb2.QueryRequest(group="team-b", profile="db", sql="SELECT 1"), metadata=bearer(token)):
                pass
    rows = audit_rows(cp, "principal = ? AND method LIKE ?", "team-a-only", "%/Query")
    assert [(r["group_name"], r["profile"], r["outcome"], r["detail"]) for r in rows] == [
        ("team-b", "db", "PERMISSION_DENIED", "GROUP_NOT_ALLOWED")]


def test_a_flood_of_bad_tokens_writes_a_bounded_number_of_rows(own_cp: ControlPlaneProcess) -> None:
    cp = own_cp
    async def flood() -> None:
        async with operator_channel(cp) as channel:
            stub = agents_pb2_grpc.AgentServiceStub(channel)
            for _ in range(200):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.GetAgent(agents_pb2.GetAgentRequest(agent_id="x"), metadata=bearer("onp_flood"))

    asyncio.run(flood())
    summaries = audit_rows(cp, "method = ? AND detail LIKE 'SUMMARY:%'", "/onprem.v1.AgentService/GetAgent")
    rows = audit_rows(cp, "method = ? AND detail NOT LIKE 'SUMMARY:%'", "/onprem.v1.AgentService/GetAgent")
    # A burst of rows per address (plus what refilled meanwhile); the rest are counted in summary rows.
    assert len(rows) < 200
    counted = [re.fullmatch(r"SUMMARY: (\d+) more UNAUTHENTICATED refusals of calls without a valid token from "
                            r"127\.0\.0\.1, not audited one by one", r["detail"]) for r in summaries]
    assert all(counted)
    assert len(rows) + sum(int(m.group(1)) for m in counted if m) == 200


# --- enrollment ------------------------------------------------------------------------------------------------------


async def test_enroll_checks_the_token_before_looking_at_the_csr(cp: ControlPlaneProcess) -> None:
    async with enroll_channel(cp) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await enroll_stub(cp, channel).Enroll(enrollment_pb2.EnrollRequest(
                token=UNKNOWN_ENROLLMENT_TOKEN, csr_pem="not a CSR", name="intruder"))
    assert (info.value.code(), info.value.details()) == (S.PERMISSION_DENIED, "the enrollment token is not valid")


async def test_a_bad_enrollment_attempt_is_audited_with_the_address_and_the_token_id(cp: ControlPlaneProcess) -> None:
    _key, csr = make_key_and_csr("intruder")
    async with enroll_channel(cp) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await enroll_stub(cp, channel).Enroll(enrollment_pb2.EnrollRequest(
                token=UNKNOWN_ENROLLMENT_TOKEN, csr_pem=csr.decode(), name="intruder-2"))
    rows = audit_rows(cp, "method = ? AND outcome = ?", "/onprem.v1.Enrollment/Enroll", "PERMISSION_DENIED")
    assert rows, "no audit row for a refused enrollment"
    row = rows[-1]
    assert (row["principal"], row["role"], row["detail"]) == (
        "anonymous", "agent",
        "enrollment token onpe_0123456789abcdef: BAD_ENROLLMENT_TOKEN: the enrollment token is not valid")
    assert re.fullmatch(PEER, row["peer"])


async def test_repeated_bad_enrollments_from_one_address_are_slowed_down(cp: ControlPlaneProcess) -> None:
    _key, csr = make_key_and_csr("guesser")
    request = enrollment_pb2.EnrollRequest(token=UNKNOWN_ENROLLMENT_TOKEN, csr_pem=csr.decode(), name="guesser")
    async with enroll_channel(cp) as channel:
        stub = enroll_stub(cp, channel)
        # More at once than one address may run and have waiting: the rest are turned away at once.
        results = await asyncio.gather(*(stub.Enroll(request, timeout=5) for _ in range(40)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(errors) == 40
    assert {e.code() for e in errors} <= {S.PERMISSION_DENIED, S.RESOURCE_EXHAUSTED, S.DEADLINE_EXCEEDED}
    throttled = [e for e in errors if e.code() == S.RESOURCE_EXHAUSTED]
    assert throttled, [e.code() for e in errors]
    assert all(re.fullmatch(r"too many failed enrollment attempts from 127\.0\.0\.1; wait \d+ s and check the token "
                            r"\(enrollment tokens are single use: ask an admin for a new one\)", e.details() or "")
               for e in throttled)
    # Audited one by one or, past the address's budget of rows (the flood spends it), in a summary row.
    rows = audit_rows(cp, "method = ? AND outcome = ?", "/onprem.v1.Enrollment/Enroll", "RESOURCE_EXHAUSTED")
    assert rows and all(r["detail"].startswith(("enrollment token onpe_0123456789abcdef: ENROLLMENT_THROTTLED: ",
                                                "SUMMARY: ")) for r in rows)


async def test_a_good_enrollment_still_gets_its_turn_after_a_flood_of_bad_ones(cp: ControlPlaneProcess) -> None:
    token = cp.enrollment_token("after-flood")
    _key, csr = make_key_and_csr("legit")
    async with enroll_channel(cp) as channel:
        response = await enroll_stub(cp, channel).Enroll(
            enrollment_pb2.EnrollRequest(token=token, csr_pem=csr.decode(), name="legit"), timeout=60)
    assert response.group == "after-flood"
