"""A live site for the interop programs built from generated stubs (tests/e2e/test_interop_*.py).

`running_site` starts a real control plane and one enrolled agent offering a
SQLite database profile and a folder profile, and gives an operator token
limited to the agent's group. `InteropSite.env` is what the programs
(tools/stubs/ts/interop.ts, tools/stubs/go/interop) read; `InteropSite.expected`
is exactly the JSON each must print, so that every language is held to the
same answer. `build` compiles a program through tools/stubs/build_interop.sh.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onprem.v1 import agents_pb2
from tools.cluster import AgentProcess, ControlPlaneProcess, operator_channel, wait_for_agent_state

ROOT = Path(__file__).resolve().parents[2]
GROUP = "interop"
FOREIGN_GROUP = "elsewhere"
DATABASE_PROFILE = "shop"
FOLDER_PROFILE = "reports"
FILE_PATH = "2024/q1.bin"
SQL = "SELECT id, name, balance, note FROM customers ORDER BY id"
#: (id, name, balance, note): an integer, text, a double and a nullable text column.
CUSTOMERS = [(1, "Acme", 12.5, "first"), (2, "Globex", -3.25, None), (3, "Initech", 0.0, "ünïcødé")]
#: Bigger than one 1 MiB chunk, so the read streams several.
FILE_BYTES = bytes(range(256)) * 10_000 + b"tail"


class ToolMissing(RuntimeError):
    """A tool the interop program needs (node, npm, go ...) is not installed."""


@dataclass
class InteropSite:
    cp: ControlPlaneProcess
    token: str

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "ONPREM_ADDRESS": self.cp.operator_address,
            "ONPREM_CA_FILE": str(self.cp.ca_file),
            "ONPREM_TOKEN": self.token,
            "ONPREM_GROUP": GROUP,
            "ONPREM_DATABASE_PROFILE": DATABASE_PROFILE,
            "ONPREM_SQL": SQL,
            "ONPREM_FOLDER_PROFILE": FOLDER_PROFILE,
            "ONPREM_FILE_PATH": FILE_PATH,
            "ONPREM_FOREIGN_GROUP": FOREIGN_GROUP,
        }

    def run(self, command: list[str], timeout: float = 60) -> dict[str, Any]:
        out = subprocess.run(command, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise AssertionError(f"{command} exited with {out.returncode}:\n{out.stderr}")
        result: dict[str, Any] = json.loads(out.stdout)
        return result


def expected() -> dict[str, Any]:
    """The JSON every interop program must print against `running_site`."""
    return {
        "agents": [{
            "name": "interop-agent",
            "group": GROUP,
            "state": "AGENT_STATE_ACTIVE",
            "profiles": [f"PROFILE_KIND_DATABASE:{DATABASE_PROFILE}", f"PROFILE_KIND_FOLDER:{FOLDER_PROFILE}"],
        }],
        "query": {
            "columns": [
                {"name": "id", "type": "VALUE_TYPE_INT64"},
                {"name": "name", "type": "VALUE_TYPE_STRING"},
                {"name": "balance", "type": "VALUE_TYPE_DOUBLE"},
                {"name": "note", "type": "VALUE_TYPE_STRING"},
            ],
            # 64-bit integers travel as JSON strings, as in protobuf's JSON mapping.
            "rows": [[str(i), name, balance, note] for i, name, balance, note in CUSTOMERS],
            "rowCount": str(len(CUSTOMERS)),
        },
        "file": {
            "info": {"path": FILE_PATH, "name": Path(FILE_PATH).name, "size": str(len(FILE_BYTES))},
            "bytes": len(FILE_BYTES),
            "sha256": hashlib.sha256(FILE_BYTES).hexdigest(),
            "sha256Verified": True,
        },
        "errors": {
            "missingSql": {
                "code": 3,  # INVALID_ARGUMENT
                "reason": "MISSING_SQL",
                "domain": "onprem.dev",
                "fieldViolations": [{"field": "sql", "description": "'sql' is required: the statement to run"}],
            },
            "foreignGroup": {
                "code": 7,  # PERMISSION_DENIED
                "reason": "GROUP_NOT_ALLOWED",
                "domain": "onprem.dev",
            },
        },
    }


@contextmanager
def running_site(base: Path) -> Iterator[InteropSite]:
    database = base / "shop.db"
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, balance REAL, note TEXT)")
        conn.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)", CUSTOMERS)
    conn.close()
    folder = base / "reports"
    (folder / FILE_PATH).parent.mkdir(parents=True)
    (folder / FILE_PATH).write_bytes(FILE_BYTES)

    cp = ControlPlaneProcess(base / "cp")
    cp.start()
    agent = AgentProcess(base / "agent", cp, name="interop-agent", profiles={
        "databases": {DATABASE_PROFILE: {"url": f"sqlite:///{database}"}},
        "folders": {FOLDER_PROFILE: {"root": str(folder), "read_only": True}},
    })
    try:
        admin = cp.admin_token()
        agent.enroll(GROUP)
        agent.start()

        async def active() -> None:
            async with operator_channel(cp) as channel:
                await wait_for_agent_state(channel, admin, agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)

        asyncio.run(active())
        yield InteropSite(cp, cp.token("interop-client", "operator", GROUP))
    finally:
        agent.stop()
        cp.stop()


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise ToolMissing(f"not installed: {', '.join(missing)}")


def build(language: str, timeout: float = 600) -> Path:
    """Generates the stubs and builds the interop program of `language` (node or go); returns its path."""
    out = subprocess.run(
        [str(ROOT / "tools" / "stubs" / "build_interop.sh"), language],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )
    if out.returncode != 0:
        raise AssertionError(f"building the {language} interop program failed:\n{out.stderr}")
    return Path(out.stdout.strip().splitlines()[-1])
