"""`onprem audit` against a real control plane whose audit rows the test writes into its store."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from onprem.control_plane.store import AuditEntry, Store
from onprem.operator_cli.audit import EXPORT_FIELDS
from tools.cluster import ControlPlaneProcess

ONPREM = str(Path(sys.executable).parent / "onprem")
T0 = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).replace(microsecond=0)
SINCE = T0.isoformat().replace("+00:00", "Z")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def row(seconds: float, detail: str, **values: Any) -> AuditEntry:
    base: dict[str, Any] = {
        "at": T0 + dt.timedelta(seconds=seconds), "principal": "ci", "role": "operator",
        "method": "/onprem.v1.DatabaseService/Query", "group_name": "plant", "agent_id": "agent-1", "profile": "erp",
        "kind": "database", "code": 0, "outcome": "OK", "bytes_out": 1234, "duration_ms": 12, "detail": detail,
        "token_id": "c1c1c1c1c1c1c1c1", "peer": "ipv4:10.0.0.7:51234"}
    base.update(values)
    return AuditEntry(**base)


class Site:
    def __init__(self, cp: ControlPlaneProcess, work: Path) -> None:
        self.cp = cp
        self.work = work
        self.admin = cp.admin_token("root")
        self.operator = cp.token("plant-operator", "operator", "plant")

    def env(self, token: str) -> dict[str, str]:
        return {**os.environ, "ONPREM_ADDRESS": self.cp.operator_address, "ONPREM_CACERT": str(self.cp.ca_file),
                "ONPREM_TOKEN": token}

    def onprem(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ONPREM, "audit", *args], capture_output=True, text=True, cwd=self.work,
                              env=self.env(token or self.admin), timeout=60)

    def add(self, *rows: AuditEntry) -> None:
        with Store(f"sqlite:///{self.cp.state_dir / 'control-plane.db'}") as store:
            store.add_audits(rows)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("cli-audit")
    cp = ControlPlaneProcess(base / "cp")
    cp.start()
    (base / "work").mkdir()
    s = Site(cp, base / "work")
    s.add(row(1, "first"), row(2, "second, \"quoted\"", group_name="erp", profile="ledger", outcome="NOT_FOUND", code=5),
          row(3, "third", trace_id=TRACE_ID))
    yield s
    cp.stop()


def test_the_table_shows_the_newest_first_with_a_header(site: Site) -> None:
    out = site.onprem("--since", SINCE, "--group", "plant")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["TIME", "PRINCIPAL", "KIND", "METHOD", "GROUP", "PROFILE", "OUTCOME", "MS", "DETAIL"]
    at = (T0 + dt.timedelta(seconds=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert lines[1].split() == [at, "ci", "database", "DatabaseService/Query", "plant", "erp", "OK", "12", "third"]
    assert [line.split()[-1] for line in lines[1:]] == ["third", "first"]


def test_jsonl_is_one_event_a_line_with_every_documented_field(site: Site) -> None:
    out = site.onprem("--since", SINCE, "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["detail"] for e in events] == ["third", 'second, "quoted"', "first"]
    assert all(list(e) == list(EXPORT_FIELDS) for e in events)
    third = events[0]
    assert {k: v for k, v in third.items() if k != "id"} == {
        "time": (T0 + dt.timedelta(seconds=3)).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "principal": "ci", "token_id": "c1c1c1c1c1c1c1c1", "role": "operator",
        "method": "/onprem.v1.DatabaseService/Query", "group": "plant", "agent_id": "agent-1", "profile": "erp",
        "kind": "database", "outcome": "OK", "code": 0, "bytes_out": 1234, "duration_ms": 12, "detail": "third",
        "peer": "ipv4:10.0.0.7:51234", "trace_id": TRACE_ID}
    assert isinstance(third["id"], int)
    assert events[1]["trace_id"] == ""  # a row of no trace (written before 0.3.0) has an empty one


def test_trace_id_lists_the_events_of_one_trace_in_any_case(site: Site) -> None:
    out = site.onprem("--since", SINCE, "--format", "csv", "--trace-id", TRACE_ID.upper())
    assert out.returncode == 0, out.stderr
    header, *rows = list(csv.reader(io.StringIO(out.stdout)))
    assert [(r[header.index("detail")], r[header.index("trace_id")]) for r in rows] == [("third", TRACE_ID)]


def test_a_malformed_trace_id_is_refused_naming_the_form(site: Site) -> None:
    out = site.onprem("--since", SINCE, "--trace-id", "not-a-trace")
    assert out.returncode != 0
    assert "32 lower-case hex digits" in out.stderr


def test_csv_has_a_header_of_the_fields_and_quotes_what_needs_it(site: Site) -> None:
    out = site.onprem("--since", SINCE, "--format", "csv", "--outcome", "not_found")
    assert out.returncode == 0, out.stderr
    header, *rows = list(csv.reader(io.StringIO(out.stdout)))
    assert tuple(header) == EXPORT_FIELDS
    assert [dict(zip(header, r, strict=True))["detail"] for r in rows] == ['second, "quoted"']


def test_json_is_one_response_as_grpcurl_prints_it(site: Site) -> None:
    out = site.onprem("--since", SINCE, "--format", "json", "--limit", "1")
    assert out.returncode == 0, out.stderr
    [event] = json.loads(out.stdout)["events"]
    assert (event["detail"], event["bytes_out"]) == ("third", "1234")  # protobuf's JSON: int64 as a string


def test_output_appends_to_a_file(site: Site) -> None:
    target = site.work / "audit.jsonl"
    for _ in range(2):
        out = site.onprem("--since", SINCE, "--format", "jsonl", "--group", "erp", "--output", str(target))
        assert (out.returncode, out.stdout) == (0, "")
    assert [json.loads(line)["detail"] for line in target.read_text().splitlines()] == ['second, "quoted"'] * 2


def test_an_operator_asking_for_another_group_exits_with_the_auth_code(site: Site) -> None:
    out = site.onprem("--group", "erp", token=site.operator)
    assert out.returncode == 5
    assert out.stderr.startswith("onprem: PERMISSION_DENIED: token 'plant-operator'")


def test_an_operator_sees_its_groups_events_only(site: Site) -> None:
    out = site.onprem("--since", SINCE, "--format", "jsonl", token=site.operator)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["detail"] for line in out.stdout.splitlines()] == ["third", "first"]


def test_a_bad_time_is_a_usage_error(site: Site) -> None:
    out = site.onprem("--since", "yesterday-ish")
    assert out.returncode == 2
    assert "invalid time 'yesterday-ish'" in out.stderr


class Lines:
    """A process's stdout, line by line, read by a thread (a pipe's buffer hides lines from select)."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        def read() -> None:
            for line in stream:
                self._lines.put(line)

        threading.Thread(target=read, daemon=True).start()

    def next(self, within: float = 15) -> str:
        return self._lines.get(timeout=within)

    def none_within(self, seconds: float) -> bool:
        try:
            self._lines.get(timeout=seconds)
        except queue.Empty:
            return True
        return False


def test_follow_prints_the_latest_oldest_first_then_new_events_and_ctrl_c_exits_0(site: Site) -> None:
    proc = subprocess.Popen([ONPREM, "audit", "--follow", "--since", SINCE, "--group", "plant", "--format", "jsonl",
                             "--interval", "0.2", "--limit", "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=site.env(site.admin), cwd=site.work)
    try:
        assert proc.stdout is not None
        lines = Lines(proc.stdout)
        assert [json.loads(lines.next())["detail"] for _ in range(2)] == ["first", "third"]
        # A row whose time is before the newest printed one (another replica's late batch) is printed too.
        site.add(row(2.5, "late batch"), row(10, "new"))
        assert {json.loads(lines.next())["detail"] for _ in range(2)} == {"late batch", "new"}
        assert lines.none_within(1.0)  # a few more polls: nothing is printed twice
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    assert proc.stderr is not None
    assert proc.stderr.read() == ""


def test_follow_takes_no_until(site: Site) -> None:
    out = site.onprem("--follow", "--until", SINCE)
    assert out.returncode == 2
    assert "takes no --until" in out.stderr
