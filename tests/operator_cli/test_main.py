"""`onprem`, the operator CLI, against a real control plane and agent (a SQLite profile and a folder profile)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from onprem.agent import __version__ as agent_version
from onprem.operator_cli import errors
from onprem.operator_cli.rows import decode_batch, parse_parameter
from onprem.operator_cli.transfer import CHUNK_SIZE, PART_SUFFIX, finish_download
from onprem.v1 import agents_pb2, values_pb2
from tools.cluster import AgentProcess, ControlPlaneProcess, operator_channel, wait_for_agent_state

ONPREM = str(Path(sys.executable).parent / "onprem")
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@dataclass
class Site:
    cp: ControlPlaneProcess
    agent: AgentProcess
    token: str
    folder: Path
    work: Path

    def onprem(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ONPREM_ADDRESS": self.cp.operator_address, "ONPREM_CACERT": str(self.cp.ca_file),
               "ONPREM_TOKEN": token or self.token}
        return subprocess.run([ONPREM, *args], capture_output=True, text=True, env=env, cwd=self.work, timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("cli")
    db = base / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL, note TEXT, code BLOB)")
        conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?)", [
            (1, "bolt", 0.25, None, b"\x00\x01"),
            (2, "nut, hex", 0.1, "say \"hi\"", None),
            (3, "washer", 12.5, "ü", b"\xff"),
        ])
    folder = base / "files"
    folder.mkdir()
    (folder / "hello.txt").write_text("hello\n")
    work = base / "work"
    work.mkdir()
    cp = ControlPlaneProcess(base / "cp")
    cp.start()
    token = cp.admin_token()
    agent = AgentProcess(base / "agent", cp, name="site-agent", profiles={
        "databases": {"shop": {"url": f"sqlite:///{db}"}},
        "folders": {"exchange": {"root": str(folder), "read_only": False}},
    })
    agent.enroll("site")
    agent.start()

    async def ready() -> None:
        async with operator_channel(cp) as channel:
            await wait_for_agent_state(channel, token, agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)

    asyncio.run(ready())
    try:
        yield Site(cp, agent, token, folder, work)
    finally:
        agent.stop()
        cp.stop()


# --- listing -----------------------------------------------------------------------------------------

def test_agents_prints_one_aligned_row_per_agent(site: Site) -> None:
    out = site.onprem("agents")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # The VERSION column is as wide as the longest version, so the expected lines follow the package's.
    version = agent_version.ljust(len("VERSION"))
    assert lines[0] == (f"NAME        ID                      GROUP  STATE   {'VERSION'.ljust(len(version))}"
                        "  IN-FLIGHT  LAST SEEN             CERT EXPIRES")
    assert len(lines) == 2
    assert re.fullmatch(rf"site-agent  {site.agent.agent_id}  site   ACTIVE  {re.escape(version)}       0/64"
                        rf"  {TIME}  {TIME}", lines[1]), lines[1]


def test_agents_json_prints_the_list_agents_response(site: Site) -> None:
    out = site.onprem("agents", "--json")
    assert out.returncode == 0, out.stderr
    agents = json.loads(out.stdout)["agents"]
    assert [(a["name"], a["agent_id"], a["group"], a["state"]) for a in agents] == [
        ("site-agent", site.agent.agent_id, "site", "AGENT_STATE_ACTIVE")]
    assert {p["name"] for p in agents[0]["profiles"]} == {"shop", "exchange"}


def test_groups_prints_agent_counts(site: Site) -> None:
    out = site.onprem("groups")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "NAME  AGENTS  ACTIVE  CREATED"
    assert re.fullmatch(rf"site       1       1  {TIME}", lines[1]), lines[1]
    assert len(lines) == 2


# --- queries -----------------------------------------------------------------------------------------

SQL = "SELECT id, name, price, note, code FROM items WHERE id >= :min ORDER BY id"


def test_query_writes_csv_with_empty_nulls_and_quoted_fields(site: Site) -> None:
    out = site.onprem("query", "site", "shop", SQL, "--param", "min=1")
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        "id,name,price,note,code\n"
        "1,bolt,0.25,,AAE=\n"
        '2,"nut, hex",0.1,"say ""hi""",\n'
        "3,washer,12.5,ü,/w==\n"
    )


def test_query_writes_one_json_object_per_row(site: Site) -> None:
    out = site.onprem("query", "site", "shop", SQL, "--param", "min:int=2", "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        '{"id": 2, "name": "nut, hex", "price": 0.1, "note": "say \\"hi\\"", "code": null}\n'
        '{"id": 3, "name": "washer", "price": 12.5, "note": "ü", "code": "/w=="}\n'
    )


def test_query_writes_an_aligned_table_with_numbers_right_aligned(site: Site) -> None:
    out = site.onprem("query", "site", "shop", SQL, "--param", "min=1", "--format", "table")
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        "id  name      price  note      code\n"
        "--  --------  -----  --------  ----\n"
        " 1  bolt       0.25  NULL      AAE=\n"
        " 2  nut, hex    0.1  say \"hi\"  NULL\n"
        " 3  washer     12.5  ü         /w==\n"
    )


def test_query_of_a_statement_without_rows_reports_rows_affected_on_stderr(site: Site) -> None:
    out = site.onprem("query", "site", "shop", "UPDATE items SET note = :note WHERE id = 99", "--param", "note=x")
    assert out.returncode == 0, out.stderr
    assert (out.stdout, out.stderr) == ("", "rows affected: 0\n")


def test_parameters_are_typed_by_inference_or_by_name() -> None:
    assert parse_parameter("n=42")[1] == values_pb2.Value(int64_value=42)
    assert parse_parameter("x=1.5")[1] == values_pb2.Value(double_value=1.5)
    assert parse_parameter("ok=true")[1] == values_pb2.Value(bool_value=True)
    assert parse_parameter("s=Acme GmbH")[1] == values_pb2.Value(string_value="Acme GmbH")
    assert parse_parameter("code:str=007") == ("code", values_pb2.Value(string_value="007"))
    assert parse_parameter("d:date=2026-01-02")[1] == values_pb2.Value(date_value="2026-01-02")
    assert parse_parameter("amount:decimal=12.50")[1] == values_pb2.Value(decimal_value="12.50")
    assert parse_parameter("gone:null=")[1] == values_pb2.Value(null_value=True)
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        parse_parameter("novalue")
    with pytest.raises(ValueError, match="unknown type"):
        parse_parameter("x:money=3")


def test_a_malformed_param_is_a_usage_error(site: Site) -> None:
    out = site.onprem("query", "site", "shop", SQL, "--param", "min")
    assert out.returncode == errors.EXIT_USAGE
    assert out.stderr == "onprem: USAGE: --param 'min': expected NAME=VALUE or NAME:TYPE=VALUE\n"


def test_a_row_batch_is_decoded_column_by_column_with_nulls() -> None:
    columns = [values_pb2.Column(name="n", type=values_pb2.VALUE_TYPE_INT64),
               values_pb2.Column(name="d", type=values_pb2.VALUE_TYPE_DECIMAL),
               values_pb2.Column(name="b", type=values_pb2.VALUE_TYPE_BOOL)]
    batch = values_pb2.RowBatch(row_count=2, columns=[
        values_pb2.ColumnValues(int64_values=[7, 0], nulls=[False, True]),
        values_pb2.ColumnValues(string_values=["1.10", "2.00"]),
        values_pb2.ColumnValues(bool_values=[True, False]),
    ])
    assert decode_batch(columns, batch) == [[7, "1.10", True], [None, "2.00", False]]


# --- transfers ---------------------------------------------------------------------------------------

def test_a_50_mib_file_round_trips_with_matching_checksums(site: Site) -> None:
    local = site.work / "big.bin"
    block = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    with local.open("wb") as f:
        for i in range(50):
            chunk = bytes([i]) + block[1:]
            f.write(chunk)
            digest.update(chunk)
    sha = digest.hexdigest()
    up = site.onprem("upload", "site", "exchange", str(local), "in/big.bin", "--create-parents")
    assert up.returncode == 0, up.stderr
    assert up.stdout == f"uploaded {local} to site/exchange:in/big.bin (52428800 bytes, sha256 {sha})\n"
    assert up.stderr == ""  # no progress bar when stderr is not a terminal
    assert hashlib.sha256((site.folder / "in" / "big.bin").read_bytes()).hexdigest() == sha

    down = site.onprem("download", "site", "exchange", "in/big.bin", "copy.bin", "--progress")
    assert down.returncode == 0, down.stderr
    assert down.stdout == f"downloaded site/exchange:in/big.bin to copy.bin (52428800 bytes, sha256 {sha})\n"
    assert "100.0%  50.0 MiB / 50.0 MiB" in down.stderr  # --progress draws it even into a pipe
    copy = site.work / "copy.bin"
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == sha
    assert not (site.work / ("copy.bin" + PART_SUFFIX)).exists()


def test_upload_with_a_wrong_expected_checksum_is_refused_by_the_agent(site: Site) -> None:
    local = site.work / "small.txt"
    local.write_bytes(b"x" * (CHUNK_SIZE + 10))
    wrong = hashlib.sha256(b"something else").hexdigest()
    out = site.onprem("upload", "site", "exchange", str(local), "small.txt", "--expected-sha256", wrong)
    assert out.returncode == errors.EXIT_CHECKSUM
    actual = hashlib.sha256(local.read_bytes()).hexdigest()
    assert out.stderr == (f"onprem: FAILED_PRECONDITION: path 'small.txt': the upload's SHA-256 is {actual}, "
                          f"not the expected {wrong}; nothing written\n")
    assert not (site.folder / "small.txt").exists()


def test_upload_modes_keep_both_and_refuse_an_existing_file(site: Site) -> None:
    local = site.work / "hello.txt"
    local.write_text("bonjour\n")
    refused = site.onprem("upload", "site", "exchange", str(local), "hello.txt")
    assert refused.returncode == errors.EXIT_REFUSED
    assert refused.stderr.startswith("onprem: ALREADY_EXISTS: ")
    kept = site.onprem("upload", "site", "exchange", str(local), "hello.txt", "--keep-both")
    assert kept.returncode == 0, kept.stderr
    assert "to site/exchange:hello (1).txt (8 bytes," in kept.stdout
    assert (site.folder / "hello.txt").read_text() == "hello\n"


def test_a_download_whose_bytes_do_not_match_the_agents_checksum_is_removed(tmp_path: Path) -> None:
    part, dest = tmp_path / ("report.csv" + PART_SUFFIX), tmp_path / "report.csv"
    part.write_bytes(b"customer,total\nAcme,12\n")
    local = hashlib.sha256(part.read_bytes()).hexdigest()
    agents = hashlib.sha256(b"customer,total\nAcme,13\n").hexdigest()
    with pytest.raises(errors.ChecksumMismatch) as failure:
        finish_download(part, dest, local, agents)
    assert failure.value.exit_code == errors.EXIT_CHECKSUM
    assert failure.value.line() == (f"onprem: CHECKSUM_MISMATCH: {dest}: the bytes received hash to {local}, but "
                                    f"the agent sent {agents}; the partial file was removed")
    assert not part.exists() and not dest.exists()
    # With the right checksum the file appears at its destination.
    part.write_bytes(b"customer,total\nAcme,12\n")
    finish_download(part, dest, local, local.upper())
    assert dest.read_bytes() == b"customer,total\nAcme,12\n" and not part.exists()


def test_download_refuses_to_replace_an_existing_file_without_force(site: Site) -> None:
    (site.work / "hello.txt").write_text("mine\n")
    out = site.onprem("download", "site", "exchange", "hello.txt")
    assert out.returncode == errors.EXIT_LOCAL
    assert out.stderr == "onprem: LOCAL_FILE: hello.txt already exists; pass --force to replace it\n"
    forced = site.onprem("download", "site", "exchange", "hello.txt", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (site.work / "hello.txt").read_text() == "hello\n"


def test_download_of_a_missing_file_is_not_found_and_leaves_nothing(site: Site) -> None:
    out = site.onprem("download", "site", "exchange", "nope.txt")
    assert out.returncode == errors.EXIT_NOT_FOUND
    assert out.stderr.startswith("onprem: NOT_FOUND: ")
    assert not (site.work / "nope.txt").exists()
    assert not (site.work / ("nope.txt" + PART_SUFFIX)).exists()


# --- errors ------------------------------------------------------------------------------------------

def test_a_bad_token_exits_with_the_auth_code_and_the_servers_message(site: Site) -> None:
    out = site.onprem("agents", token="onp_0000000000000000_wrong")
    assert out.returncode == errors.EXIT_AUTH
    assert out.stderr == "onprem: UNAUTHENTICATED: the bearer token is not valid (unknown, revoked or mistyped)\n"
    assert out.stdout == ""


def test_an_unknown_profile_exits_with_the_not_found_code(site: Site) -> None:
    out = site.onprem("query", "site", "crm", "SELECT 1")
    assert out.returncode == errors.EXIT_NOT_FOUND
    assert out.stderr == ("onprem: NOT_FOUND: no agent of group 'site' offers a database profile named 'crm' "
                          "(offered: shop)\n")


def test_an_unreachable_control_plane_exits_with_the_unavailable_code(site: Site, tmp_path: Path) -> None:
    env = {**os.environ, "ONPREM_TOKEN": site.token}
    out = subprocess.run([ONPREM, "--address", "127.0.0.1:1", "--cacert", str(site.cp.ca_file), "groups",
                          "--timeout", "10"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == errors.EXIT_UNAVAILABLE
    assert out.stderr.startswith("onprem: UNAVAILABLE: ")


def test_help_documents_the_exit_codes() -> None:
    out = subprocess.run([ONPREM, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "exit codes:" in out.stdout
    for code in range(10):
        assert re.search(rf"^  {code}  ", out.stdout, re.MULTILINE), code


def test_no_token_is_a_usage_error() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONPREM_")}
    out = subprocess.run([ONPREM, "groups"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == errors.EXIT_USAGE
    assert out.stderr == "onprem: USAGE: no token: pass --token or --token-file, or set ONPREM_TOKEN\n"
