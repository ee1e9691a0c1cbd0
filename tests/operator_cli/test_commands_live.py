"""Every `onprem` command, run as a process against a real control plane with real agents, prints what it says
and exits with the code of its outcome.

The site: group `site` with one agent offering a SQLite profile `shop` (with an idempotency table), a folder
profile `exchange` and an app profile `shopapp` (the demo's HTTP app, which wants the API key the agent injects);
group `spare` with a second agent, which the drain and revoke tests stop for good. The tests run in file order
and share the site; the last one checks that every command of the tree ran (`RAN`), so that a new command
cannot go untested here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from onprem.agent import __version__ as version
from onprem.agent.handlers.database.idempotency import ddl
from onprem.operator_cli import errors
from onprem.operator_cli.commands import subcommands, walk
from onprem.operator_cli.main import build_parser
from onprem.v1 import agents_pb2
from tools.cluster import AgentProcess, ControlPlaneProcess, operator_channel, wait_for_agent_state
from tools.ports import free_port

ONPREM = str(Path(sys.executable).parent / "onprem")
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
APP_KEY = "live-test-app-key-8c1f"
#: The command paths the tests ran, e.g. "files poll".
RAN: set[str] = set()
ROOT_PARSER = build_parser()


def command_path(argv: tuple[str, ...]) -> str:
    words = list(argv)
    if words and words[0] == "files" and (len(words) < 2 or words[1] not in subcommands(
            subcommands(ROOT_PARSER)["files"])):
        words.insert(1, "list")  # the older spelling, as `onprem` reads it
    parser, path = ROOT_PARSER, list[str]()
    for word in words:
        children = subcommands(parser)
        if word not in children:
            if children and not path:
                break
            continue
        path.append(word)
        parser = children[word]
    return " ".join(path)


@dataclass
class Site:
    cp: ControlPlaneProcess
    agent: AgentProcess
    spare: AgentProcess
    token: str
    db: Path
    folder: Path
    work: Path

    def env(self, token: str | None = None) -> dict[str, str]:
        return {**os.environ, "ONPREM_ADDRESS": self.cp.operator_address, "ONPREM_CACERT": str(self.cp.ca_file),
                "ONPREM_TOKEN": token or self.token}

    def onprem(self, *args: str, token: str | None = None, stdin: str | None = None
               ) -> subprocess.CompletedProcess[str]:
        RAN.add(command_path(args))
        return subprocess.run([ONPREM, *args], capture_output=True, text=True, env=self.env(token), cwd=self.work,
                              timeout=120, input=stdin)

    def sql(self, statement: str) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.db) as conn:
            return list(conn.execute(statement))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("live")
    db = base / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, price REAL)")
        conn.executemany("INSERT INTO items VALUES (?, ?, ?)", [(1, "bolt", 0.25), (2, "nut", 0.1), (3, "washer", 12.5)])
        conn.executescript(ddl("onprem_idempotency", "sqlite"))
    folder = base / "files"
    (folder / "reports").mkdir(parents=True)
    (folder / "hello.txt").write_text("hello\n")
    (folder / "reports" / "2026-10.csv").write_text("customer,total\nAcme,12\n")
    work = base / "work"
    work.mkdir()
    app_port = free_port()
    app = subprocess.Popen([sys.executable, "-m", "tools.demo.http_app", "--port", str(app_port), "--api-key-env",
                            "SHOP_APP_KEY"], env={**os.environ, "SHOP_APP_KEY": APP_KEY},
                           cwd=Path(__file__).resolve().parents[2])
    cp = ControlPlaneProcess(base / "cp")
    cp.start()
    token = cp.admin_token()
    agent = AgentProcess(base / "agent", cp, name="site-agent", env={"SHOP_APP_KEY": APP_KEY}, profiles={
        "databases": {"shop": {"url": f"sqlite:///{db}", "read_only": False,
                               "idempotency_table": "onprem_idempotency"},
                      "lost": {"url": f"sqlite:///{base / 'no-such-folder' / 'lost.db'}"}},
        "folders": {"exchange": {"root": str(folder), "read_only": False}},
        "apps": {"shopapp": {"base_url": f"http://127.0.0.1:{app_port}/api/",
                             "headers_from_env": {"X-Api-Key": "SHOP_APP_KEY"}}},
    })
    agent.enroll("site")
    agent.start()
    spare = AgentProcess(base / "spare", cp, name="spare-agent", profiles={
        "folders": {"spare-files": {"root": str(folder), "read_only": True}}})
    spare.enroll("spare")
    spare.start()

    async def ready() -> None:
        async with operator_channel(cp) as channel:
            for a in (agent, spare):
                await wait_for_agent_state(channel, token, a.agent_id, agents_pb2.AGENT_STATE_ACTIVE)

    try:
        asyncio.run(ready())
        yield Site(cp, agent, spare, token, db, folder, work)
    finally:
        spare.stop()
        agent.stop()
        cp.stop()
        app.terminate()
        app.wait(30)


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    assert out.stderr == "", out.stderr
    return out.stdout


def lines_match(text: str, patterns: list[str]) -> None:
    lines = text.splitlines()
    assert len(lines) == len(patterns), text
    for line, pattern in zip(lines, patterns, strict=True):
        assert re.fullmatch(pattern, line), f"{line!r} !~ {pattern!r}"


# --- agents, groups, replicas --------------------------------------------------------------------------------

def test_agents_alone_and_agents_list_print_the_same_table(site: Site) -> None:
    table = ok(site.onprem("agents"))
    assert ok(site.onprem("agents", "list")) == table
    v = re.escape(version.ljust(len("VERSION")))
    lines_match(table, [
        rf"NAME         ID                      GROUP  STATE   {'VERSION'.ljust(len(version))}  IN-FLIGHT  LAST SEEN"
        r"             CERT EXPIRES",
        rf"site-agent   {site.agent.agent_id}  site   ACTIVE  {v}       0/64  {TIME}  {TIME}",
        rf"spare-agent  {site.spare.agent_id}  spare  ACTIVE  {v}       0/64  {TIME}  {TIME}",
    ])


def test_agents_list_writes_csv_and_json_lines_for_programs(site: Site) -> None:
    csv_out = ok(site.onprem("agents", "list", "--group", "spare", "--format", "csv"))
    lines_match(csv_out, ["name,id,group,state,version,in_flight,last_seen,cert_expires",
                          rf"spare-agent,{site.spare.agent_id},spare,ACTIVE,{re.escape(version)},0/64,{TIME},{TIME}"])
    records = [json.loads(line) for line in ok(site.onprem("agents", "--format", "jsonl")).splitlines()]
    assert [(r["name"], r["state"]) for r in records] == [("site-agent", "AGENT_STATE_ACTIVE"),
                                                          ("spare-agent", "AGENT_STATE_ACTIVE")]


def test_agents_get_prints_the_agent_and_its_profiles_health(site: Site) -> None:
    out = ok(site.onprem("agents", "get", site.spare.agent_id))
    v = re.escape(version.ljust(len("VERSION")))
    lines_match(out, [
        rf"NAME         ID                      GROUP  STATE   {'VERSION'.ljust(len(version))}  IN-FLIGHT  LAST SEEN"
        r"             CERT EXPIRES",
        rf"spare-agent  {site.spare.agent_id}  spare  ACTIVE  {v}       0/64  {TIME}  {TIME}",
        "",
        "PROFILE      KIND    READ-ONLY  DIALECT  HEALTH  CHECKED",
        rf"spare-files  folder  yes        -        ok      {TIME}",
    ])
    response = json.loads(ok(site.onprem("agents", "get", site.spare.agent_id, "--format", "json")))
    assert response["agent"]["name"] == "spare-agent"


def test_agents_get_of_an_unknown_agent_is_not_found(site: Site) -> None:
    out = site.onprem("agents", "get", "agent-0000000000000000")
    assert (out.returncode, out.stdout) == (errors.EXIT_NOT_FOUND, "")
    assert out.stderr == "onprem: NOT_FOUND: no agent has the id 'agent-0000000000000000'\n"


def test_agents_check_finds_the_kind_and_prints_each_check(site: Site) -> None:
    out = ok(site.onprem("agents", "check", "site", "exchange"))
    assert out == (
        "CHECK        RESULT  MESSAGE\n"
        "root exists  ok      the root is a folder\n"
        "readable     ok      the agent may list and read the root\n"
        "writable     ok      the agent may create files in the root\n"
        f"site/exchange (folder) on {site.agent.agent_id}: healthy\n"
    )
    response = json.loads(ok(site.onprem("agents", "check", "site", "shop", "--kind", "database", "--format", "json")))
    assert response["ok"] is True and response["agent_id"] == site.agent.agent_id


def test_agents_check_of_a_failing_profile_exits_10(site: Site) -> None:
    out = site.onprem("agents", "check", "site", "lost")
    assert out.returncode == errors.EXIT_UNHEALTHY
    assert out.stdout.startswith("CHECK      RESULT  MESSAGE\nreachable  FAILED  ")
    assert out.stdout.endswith(f"site/lost (database) on {site.agent.agent_id}: UNHEALTHY\n")
    assert out.stderr == "onprem: UNHEALTHY: a check of site/lost failed\n"


def test_agents_check_of_a_profile_no_agent_offers_is_not_found(site: Site) -> None:
    out = site.onprem("agents", "check", "site", "crm")
    assert out.returncode == errors.EXIT_NOT_FOUND
    assert out.stderr == ("onprem: NOT_FOUND: no agent of group 'site' offers a profile named 'crm' "
                          "(offered: exchange, lost, shop, shopapp)\n")


def test_groups_and_replicas(site: Site) -> None:
    lines_match(ok(site.onprem("groups")), ["NAME   AGENTS  ACTIVE  CREATED", rf"site        1       1  {TIME}",
                                           rf"spare       1       1  {TIME}"])
    assert [json.loads(line)["name"] for line in ok(site.onprem("groups", "--format", "jsonl")).splitlines()] == [
        "site", "spare"]
    lines_match(ok(site.onprem("replicas")), [
        r"ID               STATE    VERSION\s+AGENT ADDRESS  OPERATOR ADDRESS  STARTED               HEARTBEAT",
        rf"cp-[0-9a-f]{{12}}  SERVING  {re.escape(version)}\s+-              -                 {TIME}  {TIME}"])


# --- database ---------------------------------------------------------------------------------------------------

INSERT = "INSERT INTO items (id, name, price) VALUES (:id, :name, :price)"


def test_batch_applies_json_lines_in_one_transaction(site: Site) -> None:
    rows = '{"id": 10, "name": "gear", "price": 3.5}\n{"id": 11, "name": "cog", "price": null}\n'
    out = ok(site.onprem("batch", "site", "shop", "--sql", INSERT, "--rows-jsonl", "-", stdin=rows))
    assert out == "applied 2 parameter sets in one transaction; rows affected: 2\n"
    assert site.sql("SELECT id, name, price FROM items WHERE id >= 10") == [(10, "gear", 3.5), (11, "cog", None)]


def test_batch_whose_set_fails_applies_none(site: Site) -> None:
    (site.work / "sets.json").write_text(json.dumps([{"id": 12, "name": "pin", "price": 1},
                                                     {"id": 10, "name": "again", "price": 1}]))
    out = site.onprem("batch", "site", "shop", "--sql", INSERT, "--params-file", "sets.json", "--format", "json")
    assert out.returncode == errors.EXIT_REFUSED
    assert out.stderr == "onprem: ALREADY_EXISTS: UNIQUE constraint failed: items.id\n"
    assert site.sql("SELECT count(*) FROM items WHERE id = 12") == [(0,)]


def test_a_keyed_batch_sent_twice_runs_once_and_answers_the_same(site: Site) -> None:
    rows = '{"id": 20, "name": "once", "price": 1}\n'
    first = site.onprem("batch", "site", "shop", "--sql", INSERT, "--rows-jsonl", "-", "--idempotency-key", "b-20",
                        stdin=rows)
    again = site.onprem("batch", "site", "shop", "--sql", INSERT, "--rows-jsonl", "-", "--idempotency-key", "b-20",
                        stdin=rows)
    assert ok(first) == ok(again) == "applied 1 parameter sets in one transaction; rows affected: 1\n"
    assert site.sql("SELECT name FROM items WHERE id = 20") == [("once",)]


def test_a_batch_key_reused_for_another_request_exits_refused(site: Site) -> None:
    out = site.onprem("batch", "site", "shop", "--sql", INSERT, "--rows-jsonl", "-", "--idempotency-key", "b-20",
                      stdin='{"id": 21, "name": "twice", "price": 1}\n')
    assert out.returncode == errors.EXIT_REFUSED
    assert out.stderr == ("onprem: FAILED_PRECONDITION: idempotency key 'b-20' was already used for another request "
                          "(another method, profile, SQL or parameters); use a new key for a new request\n")
    assert site.sql("SELECT count(*) FROM items WHERE id = 21") == [(0,)]


def test_an_idempotency_key_that_is_not_printable_ascii_is_invalid_argument(site: Site) -> None:
    out = site.onprem("batch", "site", "shop", "--sql", INSERT, "--rows-jsonl", "-", "--idempotency-key", "k" * 129,
                      stdin='{"id": 22, "name": "x", "price": 1}\n')
    assert out.returncode == errors.EXIT_REFUSED
    assert out.stderr.startswith("onprem: INVALID_ARGUMENT: ")
    assert site.sql("SELECT count(*) FROM items WHERE id = 22") == [(0,)]


def test_batch_input_that_is_not_json_is_a_usage_error(site: Site) -> None:
    out = site.onprem("batch", "site", "shop", "--sql", INSERT, "--rows-jsonl", "-", stdin="{id: 1}\n")
    assert out.returncode == errors.EXIT_USAGE
    assert out.stderr == ("onprem: USAGE: - line 1: not JSON: Expecting property name enclosed in double quotes: "
                          "line 1 column 2 (char 1)\n")


def test_transaction_runs_a_files_statements_in_order(site: Site) -> None:
    (site.work / "steps.json").write_text(json.dumps([
        {"sql": "UPDATE items SET price = :price WHERE id = :id", "parameters": {"price": 0.3, "id": 1}},
        {"sql": "DELETE FROM items WHERE id = 11"},
    ]))
    out = ok(site.onprem("transaction", "site", "shop", "--file", "steps.json"))
    assert out == "STATEMENT  ROWS AFFECTED\n        1              1\n        2              1\n"
    assert site.sql("SELECT price FROM items WHERE id = 1") == [(0.3,)]
    assert site.sql("SELECT count(*) FROM items WHERE id = 11") == [(0,)]


def test_a_transaction_whose_statement_fails_rolls_back_every_one(site: Site) -> None:
    out = site.onprem("transaction", "site", "shop", "--sql", "UPDATE items SET name = 'changed' WHERE id = 2",
                      "--sql", "INSERT INTO items (id, name) VALUES (1, 'dup')")
    assert out.returncode == errors.EXIT_REFUSED
    assert out.stderr == "onprem: ALREADY_EXISTS: UNIQUE constraint failed: items.id\n"
    assert site.sql("SELECT name FROM items WHERE id = 2") == [("nut",)]


def test_a_keyed_transaction_repeated_answers_from_its_record(site: Site) -> None:
    args = ("transaction", "site", "shop", "--sql", "INSERT INTO items (id, name) VALUES (30, 't')", "--format",
            "json", "--idempotency-key", "t-30")
    assert json.loads(ok(site.onprem(*args))) == json.loads(ok(site.onprem(*args))) == {
        "results": [{"rows_affected": "1"}]}


def test_a_keyed_query_that_writes_runs_once(site: Site) -> None:
    args = ("query", "site", "shop", "INSERT INTO items (id, name) VALUES (40, 'q')", "--idempotency-key", "q-40")
    first, again = site.onprem(*args), site.onprem(*args)
    assert (first.returncode, first.stdout, first.stderr) == (0, "", "rows affected: 1\n")
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "rows affected: 1\n")
    assert site.sql("SELECT count(*) FROM items WHERE id = 40") == [(1,)]


def test_changes_prints_rows_after_the_saved_watermark_only(site: Site) -> None:
    args = ("changes", "site", "shop", "--table", "items", "--watermark-column", "id", "--key-column", "id",
            "--state", "items.watermark", "--max-rows", "2")
    first = ok(site.onprem(*args))
    assert first.splitlines()[0] == "id,name,price"
    assert [line.split(",")[0] for line in first.splitlines()[1:]] == ["1", "2", "3", "10", "20", "30", "40"]
    assert json.loads((site.work / "items.watermark").read_text()) == {"value": {"int64_value": "40"},
                                                                        "key": {"int64_value": "40"}}
    assert ok(site.onprem(*args)) == "id,name,price\n"
    site.sql("INSERT INTO items VALUES (41, 'new', 2.0)")
    assert ok(site.onprem(*args, "--format", "jsonl")) == '{"id": 41, "name": "new", "price": 2.0}\n'


def test_changes_follow_prints_new_rows_until_interrupted(site: Site) -> None:
    RAN.add("changes")
    proc = subprocess.Popen([ONPREM, "changes", "site", "shop", "--sql", "SELECT id, name FROM items WHERE id > :min",
                             "--param", "min=41", "--watermark-column", "id", "--key-column", "id", "--follow",
                             "--interval", "0.2", "--format", "jsonl"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=site.env(), cwd=site.work)
    try:
        site.sql("INSERT INTO items VALUES (42, 'followed', 1.0)")
        assert proc.stdout is not None
        assert proc.stdout.readline() == '{"id": 42, "name": "followed"}\n'
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert proc.stderr is not None and proc.stderr.read() == ""
    finally:
        proc.kill()
        proc.wait()


# --- files ------------------------------------------------------------------------------------------------------

def test_files_lists_in_both_spellings(site: Site) -> None:
    old = ok(site.onprem("files", "site", "exchange", "--recursive"))
    assert ok(site.onprem("files", "list", "site", "exchange", "--recursive")) == old
    lines_match(old, [r"TYPE    SIZE  MODIFIED              PATH", rf"file       6  {TIME}  hello.txt",
                      rf"folder     -  {TIME}  reports", rf"file      23  {TIME}  reports/2026-10.csv"])


def test_files_stat_describes_one_path(site: Site) -> None:
    lines_match(ok(site.onprem("files", "stat", "site", "exchange", "reports/2026-10.csv")),
                [r"TYPE    SIZE  MODIFIED              PATH", rf"file      23  {TIME}  reports/2026-10.csv"])
    info = json.loads(ok(site.onprem("files", "stat", "site", "exchange", "reports", "--format", "json")))["info"]
    assert (info["path"], info["type"]) == ("reports", "FILE_TYPE_DIRECTORY")
    missing = site.onprem("files", "stat", "site", "exchange", "nope.txt")
    assert (missing.returncode, missing.stdout) == (errors.EXIT_NOT_FOUND, "")
    assert missing.stderr.startswith("onprem: NOT_FOUND: ")


def test_files_mkdir_with_a_key_answers_the_same_twice(site: Site) -> None:
    args = ("files", "mkdir", "site", "exchange", "archive/2026", "--parents", "--idempotency-key", "mk-1")
    assert ok(site.onprem(*args)) == ok(site.onprem(*args)) == "folder site/exchange:archive/2026 exists\n"
    assert (site.folder / "archive" / "2026").is_dir()
    again = site.onprem("files", "mkdir", "site", "exchange", "archive/2026")
    assert again.returncode == errors.EXIT_REFUSED
    assert again.stderr == "onprem: ALREADY_EXISTS: path 'archive/2026' already exists\n"


def test_upload_with_a_key_writes_once_and_refuses_the_key_for_other_bytes(site: Site) -> None:
    local = site.work / "order.csv"
    local.write_text("id,total\n1,12\n")
    sha = hashlib.sha256(local.read_bytes()).hexdigest()
    args = ("upload", "site", "exchange", str(local), "archive/order.csv", "--idempotency-key", "up-1")
    expected = f"uploaded {local} to site/exchange:archive/order.csv (14 bytes, sha256 {sha})\n"
    assert ok(site.onprem(*args)) == expected
    # Without the key a second upload to the same path would be ALREADY_EXISTS; with it, the first outcome.
    assert ok(site.onprem(*args)) == expected
    local.write_text("id,total\n1,13\n")
    reused = site.onprem(*args)
    assert reused.returncode == errors.EXIT_REFUSED
    assert reused.stderr == ("onprem: FAILED_PRECONDITION: idempotency key 'up-1' was already used for another "
                             "request (another method, profile, path or content); use a new key for a new request\n")
    assert (site.folder / "archive" / "order.csv").read_text() == "id,total\n1,12\n"


def test_download_verifies_and_writes_the_file(site: Site) -> None:
    out = ok(site.onprem("download", "site", "exchange", "archive/order.csv", "copy.csv"))
    sha = hashlib.sha256(b"id,total\n1,12\n").hexdigest()
    assert out == f"downloaded site/exchange:archive/order.csv to copy.csv (14 bytes, sha256 {sha})\n"
    assert (site.work / "copy.csv").read_text() == "id,total\n1,12\n"


def test_files_mv_moves_within_the_profile(site: Site) -> None:
    out = ok(site.onprem("files", "mv", "site", "exchange", "archive/order.csv", "archive/2026/order.csv",
                         "--idempotency-key", "mv-1"))
    assert out == "moved site/exchange:archive/order.csv to archive/2026/order.csv\n"
    assert (site.folder / "archive" / "2026" / "order.csv").exists()
    assert not (site.folder / "archive" / "order.csv").exists()


def test_files_rm_refuses_a_full_folder_without_recursive(site: Site) -> None:
    out = site.onprem("files", "rm", "site", "exchange", "archive")
    assert out.returncode == errors.EXIT_REFUSED
    assert out.stderr.startswith("onprem: FAILED_PRECONDITION: ")
    assert ok(site.onprem("files", "rm", "site", "exchange", "archive", "--recursive")) == (
        "deleted folder site/exchange:archive\n")
    assert not (site.folder / "archive").exists()


def test_files_poll_with_state_reports_each_file_once(site: Site) -> None:
    args = ("files", "poll", "site", "exchange", "--recursive", "--settle-ms", "50", "--state", "exchange.marker",
            "--format", "jsonl")
    first = [json.loads(line)["path"] for line in ok(site.onprem(*args)).splitlines()]
    assert first == sorted(first, key=lambda p: first.index(p)) and set(first) == {"hello.txt", "reports/2026-10.csv"}
    assert (site.work / "exchange.marker").read_text().strip()
    (site.folder / "reports" / "2026-11.csv").write_text("customer,total\n")
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while not seen and time.monotonic() < deadline:  # the new file is reported once it has settled
        seen = [json.loads(line)["path"] for line in ok(site.onprem(*args)).splitlines()]
    assert seen == ["reports/2026-11.csv"]
    assert ok(site.onprem(*args)) == ""


def test_files_poll_prints_a_table_for_people(site: Site) -> None:
    out = ok(site.onprem("files", "poll", "site", "exchange", "reports", "--glob", "*-11.csv", "--settle-ms", "50"))
    lines_match(out, [r"TYPE    SIZE  MODIFIED              PATH", rf"file      15  {TIME}  reports/2026-11.csv"])


# --- apps -------------------------------------------------------------------------------------------------------

ORDER_2 = '{\n  "id": 2,\n  "customer": "Globex Ltd",\n  "total": "87.50",\n  "status": "open"\n}\n'


def test_app_call_prints_the_body_and_with_include_the_head_on_stderr(site: Site) -> None:
    assert ok(site.onprem("app", "call", "site", "shopapp", "GET", "orders/2")) == ORDER_2
    out = site.onprem("app", "call", "site", "shopapp", "get", "orders/2", "--include")
    assert (out.returncode, out.stdout) == (0, ORDER_2)
    lines_match(out.stderr, [r"HTTP 200", r"server: demo-app/1\.0 Python/.*", r"date: .* GMT",
                             r"content-type: application/json", r"content-length: 82", ""])


def test_app_call_streams_a_file_body_with_its_length_and_a_key(site: Site) -> None:
    body = site.work / "order.json"
    body.write_text('{"customer": "Initech", "total": "99.00"}')
    out = ok(site.onprem("app", "call", "site", "shopapp", "POST", "orders", "--header",
                         "Content-Type: application/json", "--data", f"@{body}", "--idempotency-key", "order-1001",
                         "--output", "answer.json"))
    assert out == ""
    assert json.loads((site.work / "answer.json").read_text()) == {
        "received_bytes": 41, "echo": '{"customer": "Initech", "total": "99.00"}'}


def test_app_call_of_an_http_error_exits_0_unless_fail(site: Site) -> None:
    plain = site.onprem("app", "call", "site", "shopapp", "GET", "orders/9")
    assert (plain.returncode, plain.stdout) == (0, '{\n  "error": "no such order"\n}\n')
    failed = site.onprem("app", "call", "site", "shopapp", "GET", "orders/9", "--fail")
    assert failed.returncode == errors.EXIT_HTTP
    assert failed.stderr == "onprem: HTTP_ERROR: site/shopapp answered HTTP 404 to GET orders/9\n"


def test_app_call_may_not_send_the_header_the_agent_injects(site: Site) -> None:
    out = site.onprem("app", "call", "site", "shopapp", "GET", "orders", "-H", "X-Api-Key: guess")
    assert (out.returncode, out.stdout) == (errors.EXIT_AUTH, "")
    assert out.stderr == ("onprem: PERMISSION_DENIED: header 'X-Api-Key' is set by the agent for app profile "
                          "'shopapp' and cannot be sent by the caller\n")


# --- tokens -----------------------------------------------------------------------------------------------------

def test_create_token_prints_the_secret_and_revoke_token_locks_it_out(site: Site) -> None:
    created = site.onprem("create-token", "live-ci", "--groups", "site", "--ttl", "1h")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    token_id = re.fullmatch(r"onp_([0-9a-f]{16})_[A-Za-z0-9_-]+", secret)
    assert token_id is not None, secret
    assert re.fullmatch(rf"created operator token 'live-ci' \(onp_{token_id[1]}\) for groups site, expires {TIME}; "
                        r"it is shown only now\n", created.stderr)
    assert ok(site.onprem("groups", token=secret)).splitlines()[1].startswith("site ")
    denied = site.onprem("agents", "drain", site.agent.agent_id, token=secret)
    assert denied.returncode == errors.EXIT_AUTH and denied.stderr.startswith("onprem: PERMISSION_DENIED: ")
    tokens = ok(site.onprem("tokens"))
    assert re.search(rf"^live-ci +onp_{token_id[1]} +operator +site +ACTIVE ", tokens, re.MULTILINE), tokens
    revoked = ok(site.onprem("revoke-token", f"onp_{token_id[1]}", "--reason", "test over"))
    assert re.fullmatch(rf"revoked token 'live-ci' \(onp_{token_id[1]}\) at {TIME}\n", revoked)
    refused = site.onprem("groups", token=secret)
    assert refused.returncode == errors.EXIT_AUTH and refused.stderr.startswith("onprem: UNAUTHENTICATED: ")


def test_an_operator_token_of_another_group_is_permission_denied(site: Site) -> None:
    other = site.cp.token("other-ops", "operator", "other")
    out = site.onprem("query", "site", "shop", "SELECT 1", token=other)
    assert (out.returncode, out.stdout) == (errors.EXIT_AUTH, "")
    assert out.stderr.startswith("onprem: PERMISSION_DENIED: ")


def test_enrollment_tokens_create_list_and_revoke(site: Site) -> None:
    created = site.onprem("enrollment-tokens", "create", "staging", "--ttl", "10m", "--description", "live test")
    assert created.returncode == 0, created.stderr
    match = re.fullmatch(r"onpe_([0-9a-f]{16})_[A-Za-z0-9_-]+\n", created.stdout)
    assert match is not None, created.stdout
    assert re.fullmatch(rf"created an enrollment token for group staging, single use, expires {TIME}; it is shown "
                        r"only now\n", created.stderr)
    listed = ok(site.onprem("enrollment-tokens", "list", "--group", "staging"))
    lines_match(listed, [r"ID                     GROUP    STATE   CREATED               EXPIRES               USED BY"
                         r"  DESCRIPTION",
                         rf"onpe_{match[1]}  staging  ACTIVE  {TIME}  {TIME}  -        live test"])
    assert ok(site.onprem("enrollment-tokens", "--group", "staging")) == listed
    revoked = ok(site.onprem("enrollment-tokens", "revoke", f"onpe_{match[1]}", "--reason", "not needed"))
    assert re.fullmatch(rf"revoked enrollment token onpe_{match[1]} of group staging at {TIME}\n", revoked)
    states = json.loads(ok(site.onprem("enrollment-tokens", "list", "--group", "staging", "--json")))
    assert [t["state"] for t in states["enrollment_tokens"]] == ["ENROLLMENT_TOKEN_STATE_REVOKED"]


def test_a_used_enrollment_token_cannot_be_revoked(site: Site) -> None:
    used = json.loads(ok(site.onprem("enrollment-tokens", "--group", "spare", "--json")))["enrollment_tokens"][0]
    out = site.onprem("revoke-enrollment-token", f"onpe_{used['id']}")
    assert out.returncode == errors.EXIT_REFUSED
    assert out.stderr.startswith("onprem: FAILED_PRECONDITION: ")


# --- draining and revoking the spare agent, then the audit log ---------------------------------------------------

def test_agents_drain_stops_the_agent(site: Site) -> None:
    out = ok(site.onprem("agents", "drain", site.spare.agent_id, "--grace", "5s", "--reason", "live test"))
    assert out == (f"agent spare-agent ({site.spare.agent_id}) of group spare is DRAINING: it takes no new requests "
                   "and stops once those in flight finish (within 5s)\n")
    assert site.spare.proc is not None and site.spare.proc.wait(60) == 0


def test_agents_revoke_locks_the_agent_out(site: Site) -> None:
    out = ok(site.onprem("agents", "revoke", site.spare.agent_id, "--reason", "live test: done"))
    assert out == (f"agent spare-agent ({site.spare.agent_id}) of group spare is REVOKED: its stream is cut and it "
                   "can never connect again\n")
    state = json.loads(ok(site.onprem("agents", "get", site.spare.agent_id, "--format", "json")))["agent"]["state"]
    assert state == "AGENT_STATE_REVOKED"


def test_audit_lists_the_admin_actions(site: Site) -> None:
    methods: list[str] = []
    deadline = time.monotonic() + 60
    while "/onprem.v1.AgentService/RevokeAgent" not in methods and time.monotonic() < deadline:
        out = ok(site.onprem("audit", "--kind", "admin", "--limit", "0", "--format", "jsonl"))
        methods = [json.loads(line)["method"] for line in out.splitlines()]
    assert {"/onprem.v1.AgentService/DrainAgent", "/onprem.v1.AgentService/RevokeAgent",
            "/onprem.v1.TokenService/CreateToken"} <= set(methods)


def test_completion_needs_no_control_plane(site: Site) -> None:
    out = site.onprem("completion", "bash", token="unused")
    assert out.returncode == 0 and out.stdout.startswith("# onprem completion for bash")


# --- last: nothing left out --------------------------------------------------------------------------------------

def test_query_whole_prints_what_the_streamed_query_prints(site: Site) -> None:
    args = ("query", "site", "shop", "SELECT id, name FROM items WHERE id <= 3 ORDER BY id", "--format", "jsonl")
    whole = site.onprem(*args, "--whole")
    assert (whole.returncode, whole.stderr) == (0, "")
    assert whole.stdout == ok(site.onprem(*args))
    assert whole.stdout.splitlines()[0] == '{"id": 1, "name": "bolt"}'


def test_a_keyed_whole_query_and_a_streamed_one_share_the_key(site: Site) -> None:
    args = ("query", "site", "shop", "INSERT INTO items (id, name) VALUES (4242, 'w')", "--idempotency-key", "q-4242")
    first, again = site.onprem(*args, "--whole"), site.onprem(*args)
    assert (first.returncode, first.stderr) == (again.returncode, again.stderr) == (0, "rows affected: 1\n")
    assert site.sql("SELECT count(*) FROM items WHERE id = 4242") == [(1,)]


def test_every_command_of_the_tree_ran_here() -> None:
    runnable = {" ".join(path) for path, p in walk(ROOT_PARSER)
                if path and (p.get_default("run") or p.get_default("run_local"))}
    assert sorted(runnable - RAN) == []
