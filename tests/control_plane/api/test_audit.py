"""`AuditService/ListAuditEvents` against a real control plane: what each token sees, and what an attacker cannot.

The audit rows are written straight into the control plane's store (its SQLite file), at times a month
ahead, so that each test knows every row in its window; queries ask for that window (`start_time`) unless
the test is about every row a token sees. One row is written by a real refused request, through the audit
writer, to show the path from a call to its event.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from onprem.control_plane.store import AuditEntry, Store
from onprem.v1 import audit_pb2, audit_pb2_grpc, database_pb2, database_pb2_grpc
from tools.cluster import ControlPlaneProcess, bearer

S = grpc.StatusCode
#: The window the crafted rows are in: ahead of any row the control plane writes itself.
T0 = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).replace(microsecond=0)
CI_TOKEN = "c1c1c1c1c1c1c1c1"


def row(seconds: float, **values: Any) -> AuditEntry:
    base: dict[str, Any] = {
        "at": T0 + dt.timedelta(seconds=seconds), "principal": "ci", "role": "operator",
        "method": "/onprem.v1.DatabaseService/Query", "group_name": "plant", "agent_id": "agent-plant",
        "profile": "erp", "kind": "database", "code": 0, "outcome": "OK", "bytes_out": 42, "duration_ms": 7,
        "detail": "", "token_id": CI_TOKEN, "peer": "ipv4:10.0.0.7:51234"}
    base.update(values)
    return AuditEntry(**base)


ROWS = [
    row(1, detail="plant query"),
    row(2, group_name="erp", agent_id="agent-erp", profile="ledger", detail="erp query"),
    row(3, kind="admin", method="/onprem.v1.AgentService/DrainAgent", principal="root", role="admin",
        profile=None, detail="plant drain"),
    row(4, kind="enroll", method="/onprem.v1.Enrollment/Enroll", principal="onpe_x", role="agent", profile=None,
        token_id=None, detail="plant enrollment"),
    row(5, group_name=None, agent_id=None, profile=None, kind="admin", method="/onprem.v1.TokenService/CreateToken",
        principal="root", role="admin", detail="token created"),
    row(6, group_name=None, agent_id=None, profile=None, kind="auth", principal="anonymous", role="", token_id=None,
        code=16, outcome="UNAUTHENTICATED", detail="BAD_TOKEN: refused"),
    row(7, outcome="NOT_FOUND", code=5, detail="plant not found"),
]


class Tokens:
    def __init__(self, cp: ControlPlaneProcess) -> None:
        self.root = cp.admin_token("root")  # an admin of every group
        self.plant = cp.token("plant-operator", "operator", "plant")
        self.plant_admin = cp.token("plant-admin", "admin", "plant")
        self.everywhere = cp.token("all-operator", "operator", "*")


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    process = ControlPlaneProcess(tmp_path_factory.mktemp("audit") / "cp")
    process.start()
    with Store(f"sqlite:///{process.state_dir / 'control-plane.db'}") as store:
        store.add_audits(ROWS)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tokens(cp: ControlPlaneProcess) -> Tokens:
    return Tokens(cp)


@pytest.fixture
def audit(cp: ControlPlaneProcess) -> Iterator[audit_pb2_grpc.AuditServiceStub]:
    creds = grpc.ssl_channel_credentials(root_certificates=cp.ca_file.read_bytes())
    with grpc.secure_channel(cp.operator_address, creds) as channel:
        yield audit_pb2_grpc.AuditServiceStub(channel)


def window(**fields: Any) -> audit_pb2.ListAuditEventsRequest:
    request = audit_pb2.ListAuditEventsRequest(**fields)
    if not request.HasField("start_time"):
        request.start_time.FromDatetime(T0)
    return request


def listed(audit: audit_pb2_grpc.AuditServiceStub, token: str, request: audit_pb2.ListAuditEventsRequest) -> list[str]:
    """The details of every event of every page."""
    found: list[str] = []
    while True:
        page = audit.ListAuditEvents(request, metadata=bearer(token))
        found += [e.detail for e in page.events]
        if not page.next_page_token:
            return found
        request.page_token = page.next_page_token


def refused(audit: audit_pb2_grpc.AuditServiceStub, token: str | None, request: audit_pb2.ListAuditEventsRequest
            ) -> tuple[grpc.StatusCode, str, str, str]:
    """(code, message, ErrorInfo reason, BadRequest field) of a refused call."""
    with pytest.raises(grpc.RpcError) as info:
        audit.ListAuditEvents(request, metadata=bearer(token) if token else ())
    error = info.value
    assert isinstance(error, grpc.Call)
    reason = field = ""
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            message = error_details_pb2.ErrorInfo()
            detail.Unpack(message)
            reason = message.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            field = bad.field_violations[0].field
    return error.code(), error.details() or "", reason, field


# --- what each token sees --------------------------------------------------------------------------------------


def test_an_admin_of_every_group_sees_every_event_newest_first(audit: Any, tokens: Tokens) -> None:
    assert listed(audit, tokens.root, window()) == [
        "plant not found", "BAD_TOKEN: refused", "token created", "plant enrollment", "plant drain", "erp query",
        "plant query"]


def test_an_operator_sees_its_groups_data_requests_only(audit: Any, tokens: Tokens) -> None:
    assert listed(audit, tokens.plant, window()) == ["plant not found", "plant query"]


def test_an_operator_of_every_group_sees_every_groups_data_requests_and_no_admin_or_groupless_event(
        audit: Any, tokens: Tokens) -> None:
    assert listed(audit, tokens.everywhere, window()) == ["plant not found", "erp query", "plant query"]


def test_an_admin_of_some_groups_sees_all_of_their_events_and_no_groupless_one(audit: Any, tokens: Tokens) -> None:
    assert listed(audit, tokens.plant_admin, window()) == [
        "plant not found", "plant enrollment", "plant drain", "plant query"]


def test_an_event_carries_every_field_of_its_row(audit: Any, tokens: Tokens) -> None:
    [event] = audit.ListAuditEvents(window(outcome="NOT_FOUND"), metadata=bearer(tokens.root)).events
    assert event.time.ToDatetime(tzinfo=dt.UTC) == T0 + dt.timedelta(seconds=7)
    assert (event.principal, event.token_id, event.role, event.method, event.group, event.agent_id, event.profile,
            event.kind, event.outcome, event.code, event.bytes_out, event.duration_ms, event.detail, event.peer) == (
        "ci", CI_TOKEN, "operator", "/onprem.v1.DatabaseService/Query", "plant", "agent-plant", "erp", "database",
        "NOT_FOUND", 5, 42, 7, "plant not found", "ipv4:10.0.0.7:51234")
    assert event.id > 0


@pytest.mark.parametrize(("filters", "expected"), [
    ({"group": "erp"}, ["erp query"]),
    ({"token_id": f"onp_{CI_TOKEN}"}, ["plant not found", "token created", "plant drain", "erp query", "plant query"]),
    ({"token_id": f"tokens/{CI_TOKEN}"}, ["plant not found", "token created", "plant drain", "erp query",
                                          "plant query"]),
    ({"agent_id": "agent-erp"}, ["erp query"]),
    ({"profile": "ledger"}, ["erp query"]),
    ({"kind": "auth"}, ["BAD_TOKEN: refused"]),
    ({"outcome": "NOT_FOUND"}, ["plant not found"]),
])
def test_each_filter_narrows_the_listing(audit: Any, tokens: Tokens, filters: dict[str, str], expected: list[str]) -> None:
    assert listed(audit, tokens.root, window(**filters)) == expected


def test_the_time_range_includes_its_start_and_excludes_its_end(audit: Any, tokens: Tokens) -> None:
    request = window()
    request.start_time.FromDatetime(T0 + dt.timedelta(seconds=2))
    request.end_time.FromDatetime(T0 + dt.timedelta(seconds=4))
    assert listed(audit, tokens.root, request) == ["plant drain", "erp query"]


def test_pages_list_every_event_once_in_order(audit: Any, tokens: Tokens) -> None:
    assert listed(audit, tokens.root, window(page_size=2)) == listed(audit, tokens.root, window())


def test_a_real_refused_request_becomes_an_event(cp: ControlPlaneProcess, audit: Any, tokens: Tokens) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=cp.ca_file.read_bytes())
    with grpc.secure_channel(cp.operator_address, creds) as channel, pytest.raises(grpc.RpcError):
        list(database_pb2_grpc.DatabaseServiceStub(channel).Query(
            database_pb2.QueryRequest(group="erp", profile="ledger", sql="SELECT 1"), metadata=bearer(tokens.plant)))
    request = audit_pb2.ListAuditEventsRequest(kind="database", outcome="PERMISSION_DENIED")
    deadline = time.monotonic() + 10
    while not (events := audit.ListAuditEvents(request, metadata=bearer(tokens.root)).events):
        assert time.monotonic() < deadline, "the refused query left no event"
        time.sleep(0.1)
    [event] = events
    assert (event.principal, event.group, event.profile, event.method, event.detail) == (
        "plant-operator", "erp", "ledger", "/onprem.v1.DatabaseService/Query", "GROUP_NOT_ALLOWED")


# --- the attacker's tests --------------------------------------------------------------------------------------


def test_an_operator_asking_for_another_group_is_permission_denied(audit: Any, tokens: Tokens) -> None:
    code, message, reason, _ = refused(audit, tokens.plant, window(group="erp"))
    assert (code, reason) == (S.PERMISSION_DENIED, "GROUP_NOT_ALLOWED")
    assert message.startswith("token 'plant-operator' (onp_")
    assert message.endswith("may not use group 'erp' (its groups: plant)")


@pytest.mark.parametrize("kind", ["admin", "enroll"])
def test_an_operator_asking_for_admin_events_is_permission_denied(audit: Any, tokens: Tokens, kind: str) -> None:
    code, message, reason, _ = refused(audit, tokens.plant, window(kind=kind))
    assert (code, reason) == (S.PERMISSION_DENIED, "ADMIN_REQUIRED")
    assert message.endswith(f"is an operator token: events of kind '{kind}' are for admins")


@pytest.mark.parametrize("filters", [
    {"token_id": CI_TOKEN}, {"agent_id": "agent-erp"}, {"profile": "ledger"}, {"kind": "auth"},
    {"outcome": "UNAUTHENTICATED"}, {"kind": "database"}, {"outcome": "OK"},
])
def test_no_filter_shows_an_operator_another_groups_or_an_admin_event(
        audit: Any, tokens: Tokens, filters: dict[str, str]) -> None:
    shown = listed(audit, tokens.plant, window(**filters))
    assert set(shown) <= {"plant not found", "plant query"}


def test_an_operator_sees_nothing_outside_its_scope_in_the_whole_log(audit: Any, tokens: Tokens) -> None:
    request = audit_pb2.ListAuditEventsRequest(page_size=1000)
    page = audit.ListAuditEvents(request, metadata=bearer(tokens.plant))
    assert page.events
    assert {(e.group, e.kind) for e in page.events} == {("plant", "database")}


def test_another_callers_page_token_is_refused(audit: Any, tokens: Tokens) -> None:
    # The admin's pages cover erp's rows; their token must not carry an operator there.
    admin_page = audit.ListAuditEvents(window(page_size=1), metadata=bearer(tokens.root))
    assert admin_page.next_page_token
    code, message, reason, field = refused(audit, tokens.plant, window(page_size=1,
                                                                        page_token=admin_page.next_page_token))
    assert (code, reason, field) == (S.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token")
    assert message.startswith("'page_token' was made for other filters or another token")


def test_a_page_token_for_other_filters_is_refused(audit: Any, tokens: Tokens) -> None:
    page = audit.ListAuditEvents(window(page_size=1), metadata=bearer(tokens.root))
    code, _, reason, field = refused(audit, tokens.root, window(page_size=1, group="erp",
                                                                 page_token=page.next_page_token))
    assert (code, reason, field) == (S.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token")


def _forged(token: str) -> str:
    # The same cursor format with another position, under the genuine signature.
    payload, mac = token.split(".")
    version, _micros, row_id, digest = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = json.dumps([version, 0, row_id + 1000, digest], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(forged).decode().rstrip("=") + "." + mac


@pytest.mark.parametrize("make", [
    _forged, lambda t: "garbage", lambda t: t + "x", lambda t: "." + t.split(".")[1], lambda t: t.replace(".", ""),
    lambda t: base64.urlsafe_b64encode(b'[1,0,1,"x"]').decode() + ".AAAA", lambda t: "\u00e9" * 40,
])
def test_a_forged_or_garbled_page_token_is_invalid_argument_naming_the_field(audit: Any, tokens: Tokens, make: Any) -> None:
    page = audit.ListAuditEvents(window(page_size=1), metadata=bearer(tokens.plant))
    code, message, reason, field = refused(audit, tokens.plant, window(page_size=1, page_token=make(page.next_page_token)))
    assert (code, reason, field) == (S.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token")
    assert message == ("'page_token' is not one this API returned; pass the previous response's 'next_page_token', "
                       "or nothing for the first page")


def test_a_huge_page_size_is_served_as_the_maximum(cp: ControlPlaneProcess, audit: Any, tokens: Tokens) -> None:
    later = T0 + dt.timedelta(days=1)
    with Store(f"sqlite:///{cp.state_dir / 'control-plane.db'}") as store:
        store.add_audits([row(0, at=later + dt.timedelta(milliseconds=i), group_name="bulk", detail=f"bulk {i}")
                          for i in range(1003)])
    request = audit_pb2.ListAuditEventsRequest(group="bulk", page_size=2**31 - 1)
    page = audit.ListAuditEvents(request, metadata=bearer(tokens.root))
    assert len(page.events) == 1000
    assert page.events[0].detail == "bulk 1002"
    request.page_token = page.next_page_token
    rest = audit.ListAuditEvents(request, metadata=bearer(tokens.root))
    assert [e.detail for e in rest.events] == ["bulk 2", "bulk 1", "bulk 0"]
    assert rest.next_page_token == ""


@pytest.mark.parametrize(("fields", "field", "reason"), [
    ({"page_size": -1}, "page_size", "INVALID_PAGE_SIZE"),
    ({"kind": "nope"}, "kind", "INVALID_KIND"),
    ({"outcome": "ok"}, "outcome", "INVALID_OUTCOME"),
    ({"token_id": "not-a-token"}, "token_id", "INVALID_TOKEN_ID"),
    ({"group": "no such/group"}, "group", "INVALID_GROUP"),
    ({"agent_id": "a" * 129}, "agent_id", "INVALID_FILTER"),
    ({"profile": "p" * 201}, "profile", "INVALID_FILTER"),
])
def test_a_bad_filter_is_invalid_argument_naming_its_field(audit: Any, tokens: Tokens, fields: dict[str, Any],
                                                           field: str, reason: str) -> None:
    code, _, got_reason, got_field = refused(audit, tokens.root, window(**fields))
    assert (code, got_reason, got_field) == (S.INVALID_ARGUMENT, reason, field)


def test_an_end_before_the_start_is_invalid_argument(audit: Any, tokens: Tokens) -> None:
    request = window()
    request.end_time.FromDatetime(T0 - dt.timedelta(seconds=1))
    code, message, _, field = refused(audit, tokens.root, request)
    assert (code, message, field) == (S.INVALID_ARGUMENT, "'end_time' must not be before 'start_time'", "end_time")


def test_a_time_out_of_range_is_invalid_argument(audit: Any, tokens: Tokens) -> None:
    request = audit_pb2.ListAuditEventsRequest()
    request.start_time.seconds = 10**15
    code, message, _, field = refused(audit, tokens.root, request)
    assert (code, message, field) == (S.INVALID_ARGUMENT, "'start_time' is not a valid time", "start_time")


def test_without_a_token_it_is_unauthenticated(audit: Any) -> None:
    code, _, reason, _ = refused(audit, None, window())
    assert (code, reason) == (S.UNAUTHENTICATED, "MISSING_TOKEN")


def test_a_revoked_token_is_unauthenticated(cp: ControlPlaneProcess, audit: Any) -> None:
    token = cp.token("short-lived", "operator", "plant")
    cp.cli("revoke-token", token.split("_")[1])
    code, _, reason, _ = refused(audit, token, window())
    assert (code, reason) == (S.UNAUTHENTICATED, "TOKEN_REVOKED")
