"""What a program can branch on when the operator API refuses a request.

Every error carries a `google.rpc.Status` in `grpc-status-details-bin` with an
`ErrorInfo` (a stable reason, domain "onprem.dev"); an invalid field adds a
`BadRequest` naming it. These tests read them the way any Python client would,
through grpcio-status, from a real control plane.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from onprem.tunnel.errors import Code, InvalidArgument, RequestError
from onprem.v1 import agents_pb2, agents_pb2_grpc, database_pb2, database_pb2_grpc, files_pb2, files_pb2_grpc
from tools.cluster import AgentProcess, ControlPlaneProcess, bearer


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    #: field -> description, from the BadRequest detail; empty when there is none.
    fields: dict[str, str]


@dataclass
class Api:
    channel: grpc.Channel
    admin: str

    def refusal(self, call: Callable[[], object]) -> Refusal:
        with pytest.raises(grpc.RpcError) as info:
            call()
        error = info.value
        assert isinstance(error, grpc.Call)
        # from_call also checks that the rich status agrees with the call's own code and message.
        status = rpc_status.from_call(error)
        assert status is not None, "no grpc-status-details-bin trailer"
        reason = domain = ""
        fields: dict[str, str] = {}
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info_detail = error_details_pb2.ErrorInfo()
                detail.Unpack(info_detail)
                reason, domain = info_detail.reason, info_detail.domain
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields.update({v.field: v.description for v in bad.field_violations})
        return Refusal(error.code(), error.details() or "", reason, domain, fields)

    def query(self, *, group: str = "", profile: str = "", sql: str = "") -> Refusal:
        stub = database_pb2_grpc.DatabaseServiceStub(self.channel)
        request = database_pb2.QueryRequest(group=group, profile=profile, sql=sql)
        return self.refusal(lambda: list(stub.Query(request, metadata=bearer(self.admin))))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    base = tmp_path_factory.mktemp("error-details")
    cp = ControlPlaneProcess(base / "cp")
    cp.start()
    sqlite3.connect(base / "x.db").close()
    (base / "files").mkdir()
    # An agent for errors that the agent itself finds (parameters, paths).
    agent = AgentProcess(base / "agent", cp, profiles={
        "databases": {"db": {"url": f"sqlite:///{base / 'x.db'}"}},
        "folders": {"files": {"root": str(base / "files")}},
    })
    agent.enroll("agents")
    agent.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cp.ca_file.read_bytes())
        with grpc.secure_channel(cp.operator_address, creds) as channel:
            token = cp.admin_token()
            stub = agents_pb2_grpc.AgentServiceStub(channel)
            for _ in range(300):
                state = stub.GetAgent(agents_pb2.GetAgentRequest(agent_id=agent.agent_id), metadata=bearer(token))
                if state.agent.state == agents_pb2.AGENT_STATE_ACTIVE:
                    break
                time.sleep(0.1)
            yield Api(channel, token)
    finally:
        agent.stop()
        cp.stop()


def test_a_parameter_the_agent_finds_missing_is_named_across_the_tunnel(api: Api) -> None:
    refusal = api.query(group="agents", profile="db", sql="SELECT :id")
    assert (refusal.code, refusal.reason, list(refusal.fields)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PARAMETER", ["parameters.id"])


def test_a_path_the_agent_refuses_as_malformed_names_the_path_field(api: Api) -> None:
    stub = files_pb2_grpc.FileServiceStub(api.channel)
    request = files_pb2.StatRequest(group="agents", profile="files", path="a\\b")
    refusal = api.refusal(lambda: stub.Stat(request, metadata=bearer(api.admin)))
    assert (refusal.code, refusal.reason, list(refusal.fields)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PATH", ["path"])


def test_a_query_without_sql_names_the_sql_field(api: Api) -> None:
    refusal = api.query(group="g", profile="p", sql="  ")
    assert refusal == Refusal(
        grpc.StatusCode.INVALID_ARGUMENT, "'sql' is required: the statement to run", "MISSING_SQL", "onprem.dev",
        {"sql": "'sql' is required: the statement to run"},
    )


@pytest.mark.parametrize(("group", "profile", "reason", "field"), [
    ("", "p", "MISSING_GROUP", "group"),
    ("g", "", "MISSING_PROFILE", "profile"),
])
def test_a_request_without_group_or_profile_names_that_field(
    api: Api, group: str, profile: str, reason: str, field: str
) -> None:
    refusal = api.query(group=group, profile=profile, sql="SELECT 1")
    assert (refusal.code, refusal.reason, list(refusal.fields)) == (grpc.StatusCode.INVALID_ARGUMENT, reason, [field])


def test_a_file_write_that_starts_without_a_header_names_the_header_field(api: Api) -> None:
    stub = files_pb2_grpc.FileServiceStub(api.channel)
    refusal = api.refusal(lambda: stub.Write(iter([files_pb2.WriteRequest(data=b"x")]), metadata=bearer(api.admin)))
    assert (refusal.reason, list(refusal.fields)) == ("MISSING_HEADER", ["header"])


def test_an_agent_lookup_without_an_id_names_the_agent_id_field(api: Api) -> None:
    stub = agents_pb2_grpc.AgentServiceStub(api.channel)
    refusal = api.refusal(lambda: stub.GetAgent(agents_pb2.GetAgentRequest(), metadata=bearer(api.admin)))
    assert (refusal.reason, list(refusal.fields)) == ("MISSING_AGENT_ID", ["agent_id"])


def test_an_enrollment_token_with_a_negative_ttl_names_the_ttl_field(api: Api) -> None:
    stub = agents_pb2_grpc.AgentServiceStub(api.channel)
    request = agents_pb2.CreateEnrollmentTokenRequest(group="g", ttl=duration_pb2.Duration(seconds=-1))
    refusal = api.refusal(lambda: stub.CreateEnrollmentToken(request, metadata=bearer(api.admin)))
    assert (refusal.code, refusal.reason, list(refusal.fields)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TTL", ["ttl"])


def test_an_error_that_is_not_about_a_field_has_a_reason_and_no_bad_request(api: Api) -> None:
    refusal = api.query(group="atlantis", profile="p", sql="SELECT 1")
    assert (refusal.code, refusal.reason, refusal.domain, refusal.fields) == (
        grpc.StatusCode.NOT_FOUND, "GROUP_NOT_FOUND", "onprem.dev", {})


def test_a_client_can_branch_on_reason_and_field_instead_of_message_text(api: Api) -> None:
    def what_to_fix(refusal: Refusal) -> str:
        if refusal.domain != "onprem.dev":
            return "unknown"
        if refusal.fields:
            return "fix the input: " + ", ".join(sorted(refusal.fields))
        return {"GROUP_NOT_FOUND": "pick another group"}.get(refusal.reason, "report: " + refusal.reason)

    assert what_to_fix(api.query(profile="p", sql="SELECT 1")) == "fix the input: group"
    assert what_to_fix(api.query(group="g", profile="p")) == "fix the input: sql"
    assert what_to_fix(api.query(group="atlantis", profile="p", sql="SELECT 1")) == "pick another group"


def test_an_invalid_argument_keeps_its_field_and_a_relayed_status_rebuilds_without_one() -> None:
    error = InvalidArgument("'sql' is required", reason="MISSING_SQL", field="sql")
    assert (error.code, error.reason, error.field) == (Code.INVALID_ARGUMENT, "MISSING_SQL", "sql")
    rebuilt = RequestError.from_status(int(Code.INVALID_ARGUMENT), "bad parameter", "INVALID_PARAMETER")
    assert isinstance(rebuilt, InvalidArgument)
    assert (rebuilt.message, rebuilt.reason, rebuilt.field) == ("bad parameter", "INVALID_PARAMETER", None)
