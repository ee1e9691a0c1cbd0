"""Hostile input to every operator RPC of a real control plane and a real agent (property-based).

One control plane and one agent (a SQLite database, two folders, an HTTP app) serve the whole module.
Hypothesis throws random paths, URLs, SQL, parameters and fields of a few MiB at each RPC; every
answer must be a precise status from that RPC's allowed set (never UNKNOWN or INTERNAL), both
processes must stay alive, and at the end they still serve an ordinary request.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onprem.v1 import (
    agents_pb2,
    agents_pb2_grpc,
    apps_pb2,
    apps_pb2_grpc,
    database_pb2,
    database_pb2_grpc,
    files_pb2,
    files_pb2_grpc,
    profiles_pb2,
    values_pb2,
)
from tests.support.apps_upstream import Upstream
from tools.cluster import AgentProcess, ControlPlaneProcess

GROUP = "fuzz"
MiB = 1024 * 1024
S = grpc.StatusCode

FUZZ = settings(
    max_examples=int(os.environ.get("ONPREM_FUZZ_EXAMPLES", "40")),
    deadline=None,
    derandomize=os.environ.get("CI", "").lower() == "true",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

# What a relayed request may answer: the caller's mistake, the site's refusal, or a limit. UNAVAILABLE
# is not here: the one agent is up all along, so "unreachable" would be a wrong answer.
RELAYED = frozenset({S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.PERMISSION_DENIED, S.FAILED_PRECONDITION,
                     S.RESOURCE_EXHAUSTED, S.ALREADY_EXISTS})
DATABASE = RELAYED
FILES = RELAYED
APPS = RELAYED | {S.UNAVAILABLE}  # the upstream may refuse a hostile request line by closing the connection
AGENTS = frozenset({S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.PERMISSION_DENIED, S.FAILED_PRECONDITION})


@dataclass(repr=False)
class Site:
    cp: ControlPlaneProcess
    agent: AgentProcess
    token: str
    channel: grpc.Channel
    root: Path
    app: Upstream

    def __repr__(self) -> str:  # hypothesis prints the fixture with each failing example: keep it short
        return f"Site({self.cp.operator_address})"

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.token}"),)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("fuzz-api")
    db = base / "fuzz.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, changed INTEGER)")
        conn.executemany("INSERT INTO t VALUES (?, ?, ?)", [(i, f"row {i}", i) for i in range(1, 11)])
    root = base / "folder"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("hello")
    app = Upstream().start()
    cp = ControlPlaneProcess(base / "cp")
    cp.start()
    token = cp.admin_token()
    agent = AgentProcess(base / "agent", cp, profiles={
        "databases": {"lite": {"url": f"sqlite:///{db}"}, "ro": {"url": f"sqlite:///{db}", "read_only": True}},
        "folders": {"drop": {"root": str(root)}, "ro": {"root": str(root), "read_only": True}},
        "apps": {"app": {"base_url": app.base_url}},
    })
    agent.enroll(GROUP)
    agent.start()
    options = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
    channel = grpc.secure_channel(cp.operator_address, grpc.ssl_channel_credentials(cp.ca_file.read_bytes()),
                                  options=options)
    try:
        stub = agents_pb2_grpc.AgentServiceStub(channel)
        deadline = time.monotonic() + 30
        while stub.GetAgent(agents_pb2.GetAgentRequest(agent_id=agent.agent_id),
                            metadata=(("authorization", f"Bearer {token}"),)).agent.state != agents_pb2.AGENT_STATE_ACTIVE:
            assert time.monotonic() < deadline, "the agent never became active"
            time.sleep(0.1)
        yield Site(cp, agent, token, channel, root, app)
    finally:
        channel.close()
        agent.stop()
        cp.stop()
        app.stop()


# --- strategies -----------------------------------------------------------------------------------

HOSTILE_TEXT = [
    "", " ", ".", "..", "../", "../../etc/passwd", "/etc/passwd", "sub/../../x", "sub/./a.txt", "~root",
    "\x00", "a\x00b", "\n", "\r\n", "%2e%2e/x", "..\\..\\x", "C:\\Windows", "//host/share", "💥", "\u202e",
    "*", "**/*", "[", "sub/a.txt", "x" * 300, "a/" * 200, "http://evil.example/", "https://127.0.0.1:1/",
    "//evil.example/x", "file:///etc/passwd", "?a=b", "#frag", "%", "%00", "'; DROP TABLE t; --",
]


def huge_text(max_mib: int = 3) -> st.SearchStrategy[str]:
    """Strings of up to a few MiB (cheap to make: one character repeated)."""
    return st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "\x00", "'", "/", "💥"]),
                     st.integers(0, max_mib * MiB // 4))


texts = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=40), huge_text())
short_texts = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=40))
groups = st.one_of(st.just(GROUP), st.just(GROUP), short_texts)
uint32s = st.one_of(st.integers(0, 10), st.integers(0, 2**32 - 1))
uint64s = st.one_of(st.integers(0, 10), st.integers(0, 2**64 - 1))


def profiles(*known: str) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(known), st.sampled_from(known), short_texts)


leaf_values = st.one_of(
    st.builds(values_pb2.Value, null_value=st.booleans()),
    st.builds(values_pb2.Value, bool_value=st.booleans()),
    st.builds(values_pb2.Value, int64_value=st.integers(-(2**63), 2**63 - 1)),
    st.builds(values_pb2.Value, double_value=st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(values_pb2.Value, decimal_value=texts),
    st.builds(values_pb2.Value, string_value=texts),
    st.builds(values_pb2.Value, bytes_value=st.binary(max_size=64)),
    st.builds(values_pb2.Value, date_value=short_texts),
    st.builds(values_pb2.Value, time_value=short_texts),
    st.builds(values_pb2.Value, timestamp_value=short_texts),
    st.builds(values_pb2.Value, uuid_value=short_texts),
    st.builds(values_pb2.Value, json_value=short_texts),
    st.builds(values_pb2.Value, interval_value=short_texts),
    st.just(values_pb2.Value()),
)
values = st.one_of(
    leaf_values,
    st.builds(lambda vs: values_pb2.Value(array_value=values_pb2.ValueList(values=vs)),
              st.lists(leaf_values, max_size=4)),
)
parameters = st.dictionaries(st.one_of(st.sampled_from(["id", "n", "name", ""]), short_texts), values, max_size=4)

SQL = [
    "SELECT 1", "SELECT id, name FROM t WHERE id = :id", "SELECT * FROM t", "UPDATE t SET name = :name WHERE id = 0",
    "INSERT INTO t (name) VALUES (:name)", "SELECT :n", "SELECT 1; SELECT 2", "SELEC", "", ";", "--", "/*",
    "PRAGMA writable_schema = 1", "ATTACH DATABASE '/tmp/fuzz-attached.db' AS x", "SELECT zeroblob(100000000)",
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) SELECT i FROM n",
    "SELECT * FROM t WHERE name = :name", "SELECT ?", "SELECT $1", "SELECT :a, :a",
]
sql_texts = st.one_of(st.sampled_from(SQL), texts)


# Durations up to protobuf's own range (about 10,000 years) and beyond: once, a huge ttl overflowed
# datetime.timedelta and answered INTERNAL; descriptions of any length (once INTERNAL past 500).
DURATION_SECONDS_MAX = 2**62


def durations() -> st.SearchStrategy[duration_pb2.Duration | None]:
    return st.one_of(
        st.none(),
        st.builds(duration_pb2.Duration, seconds=st.integers(-DURATION_SECONDS_MAX, DURATION_SECONDS_MAX),
                  nanos=st.integers(-(2**31), 2**31 - 1)),
        st.builds(duration_pb2.Duration, seconds=st.integers(-10, 10**6)),
    )


# --- the check --------------------------------------------------------------------------------------

CALL_TIMEOUT = 30.0


def outcome(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            for _ in result:
                pass
    except grpc.RpcError as exc:
        code = exc.code()
        assert isinstance(code, grpc.StatusCode)
        return code
    return S.OK


def check(site: Site, rpc: str, allowed: frozenset[grpc.StatusCode], call: Callable[[], Any], request: Any) -> None:
    code = outcome(call)
    assert site.cp.proc is not None and site.agent.proc is not None
    assert site.cp.proc.poll() is None, f"the control plane died on {rpc}"
    assert site.agent.proc.poll() is None, f"the agent died on {rpc}"
    shown = str(request)[:2000]
    assert code in allowed, f"{rpc} answered {code.name} to:\n{shown}"


# --- DatabaseService ----------------------------------------------------------------------------------


@FUZZ
@given(group=groups, profile=profiles("lite", "ro"), sql=sql_texts, params=parameters, max_rows=uint64s)
def test_query_answers_hostile_sql_and_parameters_with_a_precise_status(
    site: Site, group: str, profile: str, sql: str, params: dict[str, values_pb2.Value], max_rows: int,
) -> None:
    request = database_pb2.QueryRequest(group=group, profile=profile, sql=sql, parameters=params, max_rows=max_rows)
    stub = database_pb2_grpc.DatabaseServiceStub(site.channel)
    check(site, "Query", DATABASE, lambda: stub.Query(request, metadata=site.metadata, timeout=CALL_TIMEOUT), request)


@FUZZ
@given(group=groups, profile=profiles("lite", "ro"), sql=sql_texts,
       sets=st.lists(st.builds(database_pb2.ParameterSet, parameters=parameters), max_size=5))
def test_execute_batch_answers_hostile_input_with_a_precise_status(
    site: Site, group: str, profile: str, sql: str, sets: list[database_pb2.ParameterSet],
) -> None:
    request = database_pb2.ExecuteBatchRequest(group=group, profile=profile, sql=sql, parameter_sets=sets)
    stub = database_pb2_grpc.DatabaseServiceStub(site.channel)
    check(site, "ExecuteBatch", DATABASE,
          lambda: stub.ExecuteBatch(request, metadata=site.metadata, timeout=CALL_TIMEOUT), request)


@FUZZ
@given(group=groups, profile=profiles("lite", "ro"),
       statements=st.lists(st.builds(database_pb2.Statement, sql=sql_texts, parameters=parameters), max_size=4))
def test_execute_transaction_answers_hostile_input_with_a_precise_status(
    site: Site, group: str, profile: str, statements: list[database_pb2.Statement],
) -> None:
    request = database_pb2.ExecuteTransactionRequest(group=group, profile=profile, statements=statements)
    stub = database_pb2_grpc.DatabaseServiceStub(site.channel)
    check(site, "ExecuteTransaction", DATABASE,
          lambda: stub.ExecuteTransaction(request, metadata=site.metadata, timeout=CALL_TIMEOUT), request)


@FUZZ
@given(group=groups, profile=profiles("lite", "ro"), table=st.one_of(st.just("t"), short_texts),
       sql=st.one_of(st.just(""), sql_texts), watermark=st.one_of(st.just("changed"), short_texts),
       key=st.one_of(st.just("id"), st.just(""), short_texts),
       after=st.one_of(st.none(), st.builds(database_pb2.Watermark, value=values, key=values)),
       max_rows=uint32s, params=parameters)
def test_poll_changes_answers_hostile_input_with_a_precise_status(
    site: Site, group: str, profile: str, table: str, sql: str, watermark: str, key: str,
    after: database_pb2.Watermark | None, max_rows: int, params: dict[str, values_pb2.Value],
) -> None:
    request = database_pb2.PollChangesRequest(group=group, profile=profile, table=table, sql=sql,
                                              watermark_column=watermark, key_column=key, after=after,
                                              max_rows=max_rows, parameters=params)
    stub = database_pb2_grpc.DatabaseServiceStub(site.channel)
    check(site, "PollChanges", DATABASE,
          lambda: stub.PollChanges(request, metadata=site.metadata, timeout=CALL_TIMEOUT), request)


# --- FileService ----------------------------------------------------------------------------------------

paths = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=40), huge_text(1))
folders = profiles("drop", "ro")


@FUZZ
@given(group=groups, profile=folders, path=paths, recursive=st.booleans(), glob=short_texts,
       page_size=uint32s, page_token=short_texts)
def test_list_answers_hostile_paths_with_a_precise_status(
    site: Site, group: str, profile: str, path: str, recursive: bool, glob: str, page_size: int, page_token: str,
) -> None:
    request = files_pb2.ListRequest(group=group, profile=profile, path=path, recursive=recursive, glob=glob,
                                    page_size=page_size, page_token=page_token)
    stub = files_pb2_grpc.FileServiceStub(site.channel)
    check(site, "List", FILES, lambda: stub.List(request, metadata=site.metadata, timeout=CALL_TIMEOUT), request)


@FUZZ
@given(group=groups, profile=folders, path=paths)
def test_stat_answers_hostile_paths_with_a_precise_status(site: Site, group: str, profile: str, path: str) -> None:
    request = files_pb2.StatRequest(group=group, profile=profile, path=path)
    stub = files_pb2_grpc.FileServiceStub(site.channel)
    check(site, "Stat", FILES, lambda: stub.Stat(request, metadata=site.metadata, timeout=CALL_TIMEOUT), request)


@FUZZ
@given(group=groups, profile=folders, path=paths, offset=uint64s, length=uint64s)
def test_read_answers_hostile_paths_and_ranges_with_a_precise_status(
    site: Site, group: str, profile: str, path: str, offset: int, length: int,
) -> None:
    request = files_pb2.ReadRequest(group=group, profile=profile, path=path, offset=offset, length=length)
    stub = files_pb2_grpc.FileServiceStub(site.channel)
    check(site, "Read", FILES, lambda: stub.Read(request, metadata=site.metadata, timeout=CALL_TIMEOUT), request)


@FUZZ
@given(group=groups, profile=folders, path=paths, mode=st.integers(-3, 6), create_parents=st.booleans(),
       expected=st.one_of(st.just(""), short_texts),
       parts=st.lists(st.one_of(st.binary(max_size=100), st.integers(0, 3 * MiB).map(lambda n: b"\x5a" * n)),
                      max_size=3),
       extra_header=st.booleans(), no_header=st.booleans())
def test_write_answers_hostile_uploads_with_a_precise_status(
    site: Site, group: str, profile: str, path: str, mode: int, create_parents: bool, expected: str,
    parts: list[bytes], extra_header: bool, no_header: bool,
) -> None:
    header = files_pb2.WriteHeader(group=group, profile=profile, path=path, mode=mode, create_parents=create_parents,  # type: ignore[arg-type]
                                   expected_sha256=expected)
    messages = [] if no_header else [files_pb2.WriteRequest(header=header)]
    messages += [files_pb2.WriteRequest(data=p) for p in parts]
    if extra_header:
        messages.append(files_pb2.WriteRequest(header=header))
    stub = files_pb2_grpc.FileServiceStub(site.channel)
    check(site, "Write", FILES,
          lambda: stub.Write(iter(messages), metadata=site.metadata, timeout=CALL_TIMEOUT), header)


@FUZZ
@given(group=groups, profile=folders, path=paths, recursive=st.booleans())
def test_delete_answers_hostile_paths_with_a_precise_status(
    site: Site, group: str, profile: str, path: str, recursive: bool,
) -> None:
    request = files_pb2.DeleteRequest(group=group, profile=profile, path=path, recursive=recursive)
    stub = files_pb2_grpc.FileServiceStub(site.channel)
    check(site, "Delete", FILES, lambda: stub.Delete(request, metadata=site.metadata, timeout=CALL_TIMEOUT), request)


@FUZZ
@given(group=groups, profile=folders, path=paths, destination=paths, overwrite=st.booleans())
def test_move_answers_hostile_paths_with_a_precise_status(
    site: Site, group: str, profile: str, path: str, destination: str, overwrite: bool,
) -> None:
    request = files_pb2.MoveRequest(group=group, profile=profile, path=path, destination_path=destination,
                                    overwrite=overwrite)
    stub = files_pb2_grpc.FileServiceStub(site.channel)
    check(site, "Move", FILES, lambda: stub.Move(request, metadata=site.metadata, timeout=CALL_TIMEOUT), request)


@FUZZ
@given(group=groups, profile=folders, path=paths, parents=st.booleans())
def test_make_directory_answers_hostile_paths_with_a_precise_status(
    site: Site, group: str, profile: str, path: str, parents: bool,
) -> None:
    request = files_pb2.MakeDirectoryRequest(group=group, profile=profile, path=path, parents=parents)
    stub = files_pb2_grpc.FileServiceStub(site.channel)
    check(site, "MakeDirectory", FILES,
          lambda: stub.MakeDirectory(request, metadata=site.metadata, timeout=CALL_TIMEOUT), request)


@FUZZ
@given(group=groups, profile=folders, path=paths, recursive=st.booleans(), glob=short_texts, marker=texts,
       max_files=uint32s, settle_ms=st.one_of(st.integers(0, 50), st.integers(0, 2**32 - 1)))
def test_poll_answers_hostile_markers_and_paths_with_a_precise_status(
    site: Site, group: str, profile: str, path: str, recursive: bool, glob: str, marker: str, max_files: int,
    settle_ms: int,
) -> None:
    request = files_pb2.PollRequest(group=group, profile=profile, path=path, recursive=recursive, glob=glob,
                                    marker=marker, max_files=max_files, settle_ms=settle_ms)
    stub = files_pb2_grpc.FileServiceStub(site.channel)
    # A huge settle time is the caller's to wait out: the deadline is a fine answer to it.
    check(site, "Poll", FILES | {S.DEADLINE_EXCEEDED},
          lambda: stub.Poll(request, metadata=site.metadata, timeout=CALL_TIMEOUT), request)


# --- AppService -----------------------------------------------------------------------------------------

methods = st.one_of(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT",
                                     "TRACE", "get", "", "G ET", "GET\r\nX: y"]), short_texts)
headers = st.lists(st.builds(apps_pb2.Header, name=st.one_of(st.sampled_from(
    ["Host", "Content-Length", "Transfer-Encoding", "X-A", "", "Bad Name", "X\r\nY"]), short_texts),
    value=st.one_of(st.sampled_from(["evil.example", "-1", "chunked", "x\r\nInjected: 1"]), short_texts)),
    max_size=4)


@FUZZ
@given(group=groups, profile=profiles("app"), method=methods,
       path=st.one_of(st.sampled_from(["echo", "echo/x", "nowhere"]), paths),
       query=st.lists(st.builds(apps_pb2.QueryParameter, name=short_texts, value=short_texts), max_size=3),
       hdrs=headers, body=st.lists(st.one_of(st.binary(max_size=100), st.integers(0, 2 * MiB).map(lambda n: b"b" * n)),
                                   max_size=2),
       no_head=st.booleans(), extra_head=st.booleans())
def test_call_answers_hostile_requests_with_a_precise_status(
    site: Site, group: str, profile: str, method: str, path: str, query: list[apps_pb2.QueryParameter],
    hdrs: list[apps_pb2.Header], body: list[bytes], no_head: bool, extra_head: bool,
) -> None:
    head = apps_pb2.CallHead(group=group, profile=profile, method=method, path=path, query=query, headers=hdrs)
    messages = [] if no_head else [apps_pb2.CallRequest(head=head)]
    messages += [apps_pb2.CallRequest(body=b) for b in body]
    if extra_head:
        messages.append(apps_pb2.CallRequest(head=head))
    stub = apps_pb2_grpc.AppServiceStub(site.channel)
    check(site, "Call", APPS, lambda: stub.Call(iter(messages), metadata=site.metadata, timeout=CALL_TIMEOUT), head)


# --- AgentService ---------------------------------------------------------------------------------------

agent_ids = st.one_of(st.sampled_from(["", "x", "00000000-0000-0000-0000-000000000000"]), short_texts)


@FUZZ
@given(group=groups, agent_id=agent_ids, rpc=st.sampled_from(["ListAgents", "GetAgent", "ListGroups"]))
def test_agent_queries_answer_hostile_ids_with_a_precise_status(site: Site, group: str, agent_id: str, rpc: str) -> None:
    stub = agents_pb2_grpc.AgentServiceStub(site.channel)
    request: Any
    if rpc == "ListAgents":
        request = agents_pb2.ListAgentsRequest(group=group)
        call: Callable[[], Any] = lambda: stub.ListAgents(request, metadata=site.metadata, timeout=CALL_TIMEOUT)  # noqa: E731
    elif rpc == "GetAgent":
        request = agents_pb2.GetAgentRequest(agent_id=agent_id)
        call = lambda: stub.GetAgent(request, metadata=site.metadata, timeout=CALL_TIMEOUT)  # noqa: E731
    else:
        request = agents_pb2.ListGroupsRequest()
        call = lambda: stub.ListGroups(request, metadata=site.metadata, timeout=CALL_TIMEOUT)  # noqa: E731
    check(site, rpc, AGENTS, call, request)


@FUZZ
@given(group=groups, ttl=durations(), description=st.one_of(short_texts, huge_text()))
def test_create_enrollment_token_answers_hostile_input_with_a_precise_status(
    site: Site, group: str, ttl: duration_pb2.Duration | None, description: str,
) -> None:
    request = agents_pb2.CreateEnrollmentTokenRequest(group=group, ttl=ttl, description=description)
    stub = agents_pb2_grpc.AgentServiceStub(site.channel)
    check(site, "CreateEnrollmentToken", AGENTS,
          lambda: stub.CreateEnrollmentToken(request, metadata=site.metadata, timeout=CALL_TIMEOUT), request)


@FUZZ
@given(agent_id=agent_ids, reason=texts, grace=durations(), rpc=st.sampled_from(["RevokeAgent", "DrainAgent"]))
def test_revoke_and_drain_answer_hostile_ids_with_a_precise_status(
    site: Site, agent_id: str, reason: str, grace: duration_pb2.Duration | None, rpc: str,
) -> None:
    assert agent_id != site.agent.agent_id  # random ids never name the one agent that serves the others
    stub = agents_pb2_grpc.AgentServiceStub(site.channel)
    request: Any
    if rpc == "RevokeAgent":
        request = agents_pb2.RevokeAgentRequest(agent_id=agent_id, reason=reason)
        call: Callable[[], Any] = lambda: stub.RevokeAgent(request, metadata=site.metadata, timeout=CALL_TIMEOUT)  # noqa: E731
    else:
        request = agents_pb2.DrainAgentRequest(agent_id=agent_id, reason=reason, grace_period=grace)
        call = lambda: stub.DrainAgent(request, metadata=site.metadata, timeout=CALL_TIMEOUT)  # noqa: E731
    check(site, rpc, AGENTS, call, request)


@FUZZ
@given(group=groups, profile=profiles("lite", "drop", "app"), kind=st.integers(-2, 6))
def test_check_profile_answers_hostile_input_with_a_precise_status(site: Site, group: str, profile: str, kind: int) -> None:
    request = profiles_pb2.CheckProfileRequest(group=group, profile=profile, kind=kind)  # type: ignore[arg-type]
    stub = agents_pb2_grpc.AgentServiceStub(site.channel)
    check(site, "CheckProfile", RELAYED,
          lambda: stub.CheckProfile(request, metadata=site.metadata, timeout=CALL_TIMEOUT), request)


@FUZZ
@given(token=st.one_of(st.sampled_from(["", "onp_", "onp_x", "Bearer", "onp_" + "A" * 4000]), st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80)),
    scheme=st.sampled_from(["Bearer ", "bearer ", "Basic ", "", "Bearer  "]))
def test_hostile_bearer_tokens_are_refused_with_unauthenticated(site: Site, token: str, scheme: str) -> None:
    # Printable ASCII only: gRPC clients refuse control characters in metadata themselves (the call never
    # leaves the process; grpcio reports that as INTERNAL "metadata was invalid").
    request = agents_pb2.ListGroupsRequest()
    stub = agents_pb2_grpc.AgentServiceStub(site.channel)

    def call() -> Any:
        return stub.ListGroups(request, metadata=(("authorization", f"{scheme}{token}"),), timeout=CALL_TIMEOUT)

    check(site, "ListGroups (token)", frozenset({S.UNAUTHENTICATED}), call, f"{scheme}{token}")


# --- afterwards -----------------------------------------------------------------------------------------


def test_after_the_fuzzing_both_processes_still_serve_and_logged_no_traceback(site: Site) -> None:
    """Runs last in the module (pytest keeps file order): an ordinary query still works."""
    stub = database_pb2_grpc.DatabaseServiceStub(site.channel)
    rows = 0
    for response in stub.Query(database_pb2.QueryRequest(group=GROUP, profile="lite", sql="SELECT 1 AS x"),
                               metadata=site.metadata, timeout=CALL_TIMEOUT):
        if response.HasField("rows"):
            rows += response.rows.row_count
    assert rows == 1
    listing = files_pb2_grpc.FileServiceStub(site.channel).List(
        files_pb2.ListRequest(group=GROUP, profile="ro", path=""), metadata=site.metadata, timeout=CALL_TIMEOUT)
    assert isinstance(listing, files_pb2.ListResponse)
    assert site.cp.proc is not None and site.cp.proc.poll() is None
    assert site.agent.proc is not None and site.agent.proc.poll() is None
    cp_log = (site.cp.state_dir.parent / f"{site.cp.state_dir.name}.log").read_text(errors="replace")
    agent_log = (site.agent.home / "agent.log").read_text(errors="replace")
    assert "Traceback" not in cp_log, cp_log[cp_log.index("Traceback") - 2000:][:6000]
    assert "Traceback" not in agent_log, agent_log[agent_log.index("Traceback") - 2000:][:6000]
