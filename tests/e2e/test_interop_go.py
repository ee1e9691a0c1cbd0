"""A Go program built from the generated Go stubs talks to a live control plane.

tools/stubs/go/interop is built offline against build/stubs/go (protoc-gen-go and
protoc-gen-go-grpc from Debian) and the Go sources Debian packages in /usr/share/gocode
(golang-google-grpc-dev and friends), in GOPATH mode: no Go module proxy is involved.
It does what the Node program does and must print the same JSON
(tools.stubs.interop.expected()). Under CI=true missing Go tools fail the test;
elsewhere it skips.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.stubs.interop import build, expected, running_site

GOCODE = Path("/usr/share/gocode/src/google.golang.org/grpc")


def _require() -> None:
    missing = [tool for tool in ("go", "protoc-gen-go", "protoc-gen-go-grpc") if shutil.which(tool) is None]
    if not GOCODE.is_dir():
        missing.append(f"{GOCODE} (golang-google-grpc-dev)")
    if not missing:
        return
    message = f"the Go interop test needs {', '.join(missing)}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: make setup installs them)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def printed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    _require()
    program = build("go")
    with running_site(tmp_path_factory.mktemp("interop-go")) as site:
        yield site.run([str(program)])


def test_the_go_stubs_hold_messages_and_clients_for_every_proto() -> None:
    _require()
    build("go")
    generated = Path(__file__).resolve().parents[2] / "build" / "stubs" / "go" / "onprem" / "v1"
    protos = {p.stem for p in (Path(__file__).resolve().parents[2] / "protos" / "onprem" / "v1").glob("*.proto")}
    assert {p.name.removesuffix(".pb.go") for p in generated.glob("*.pb.go") if "_grpc" not in p.name} == protos
    assert "NewDatabaseServiceClient" in (generated / "database_grpc.pb.go").read_text()


def test_go_lists_the_agents_of_its_group(printed: dict[str, Any]) -> None:
    assert printed["agents"] == expected()["agents"]


def test_go_streams_a_query_with_typed_columns_and_nulls(printed: dict[str, Any]) -> None:
    assert printed["query"] == expected()["query"]


def test_go_reads_a_multi_chunk_file_and_verifies_its_checksum(printed: dict[str, Any]) -> None:
    assert printed["file"] == expected()["file"]


def test_go_branches_on_error_reason_and_field_violation(printed: dict[str, Any]) -> None:
    assert printed["errors"] == expected()["errors"]


def test_go_prints_exactly_the_document_the_node_program_must_print(printed: dict[str, Any]) -> None:
    assert printed == expected()
