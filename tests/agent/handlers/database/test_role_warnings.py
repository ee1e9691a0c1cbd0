"""Saying what read-only guarantees: checks warn when a read-only profile's role could write anyway.

The agent keeps a read-only profile's requests read-only, but only a role without write privileges
is a complete boundary. CheckProfile, `onprem-agent test-profile` and `onprem-agent doctor` report a
warning (the check passes, marked "!") for a role that could write, naming what it could do, and a
plain pass for a role that could not: both against real roles.
"""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml

from onprem.agent.handlers.database import DatabaseHandler
from onprem.agent.profile_check import run_test_profile
from onprem.agent.profiles import DatabaseProfile
from onprem.v1 import profiles_pb2
from tests.support.owned_database import OwnedDatabase, create_owned_database
from tests.support.postgres import PostgresServer
from tools.cluster import AgentProcess, ControlPlaneProcess

SELECT_ONLY = "onprem_select_only"


@pytest.fixture(scope="module")
def owned(postgres: PostgresServer) -> OwnedDatabase:
    return create_owned_database(postgres, "onprem_role_warnings")


@pytest.fixture(scope="module")
def select_only(owned: OwnedDatabase) -> PostgresServer:
    """A role that may only read one table: no attribute, ownership, grant or function that writes."""
    with psycopg.connect(owned.admin.dsn(), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (SELECT_ONLY,)).fetchone():
            conn.execute(f"CREATE ROLE {SELECT_ONLY} LOGIN PASSWORD '{owned.admin.password}'")
        conn.execute(f"GRANT SELECT ON accounts TO {SELECT_ONLY}")
        # Large objects can be created by any role unless these are revoked (per database).
        conn.execute("REVOKE EXECUTE ON FUNCTION lo_create(oid), lo_creat(integer), lo_from_bytea(oid, bytea) "
                     "FROM PUBLIC")
    a = owned.admin
    return PostgresServer(a.host, a.port, SELECT_ONLY, a.password, a.database)


async def checks_of(url: str) -> dict[str, profiles_pb2.ProfileCheck]:
    handler = DatabaseHandler({"ro": DatabaseProfile(name="ro", url=url, read_only=True)})
    try:
        return {c.name: c for c in await handler.check("ro")}
    finally:
        await handler.aclose()


async def test_a_role_that_owns_the_database_gets_a_warning_naming_what_it_could_write(owned: OwnedDatabase) -> None:
    checks = await checks_of(owned.owner.url())
    role = checks["role may not write"]
    assert (role.ok, role.warning) == (True, True)
    assert role.message.startswith("the role 'onprem_owner' could write outside this agent: ")
    for named in ("owns or may change the tables public.accounts, public.audit, public.rich",
                  "owns or may advance the sequences public.audit_id_seq, public.s",
                  "owns or may create objects in the schemas public",
                  "owns or may create schemas in the database onprem_role_warnings",
                  "owns or may write large objects"):
        assert named in role.message
    assert all(c.ok for c in checks.values())  # a warning never makes the profile unhealthy


async def test_role_attributes_and_write_grants_are_named(owned: OwnedDatabase, select_only: PostgresServer) -> None:
    with psycopg.connect(owned.admin.dsn(), autocommit=True) as conn:
        conn.execute("CREATE ROLE onprem_granted LOGIN CREATEDB CREATEROLE BYPASSRLS "
                     f"PASSWORD '{owned.admin.password}'")
        conn.execute("GRANT SELECT, UPDATE ON accounts TO onprem_granted")
        conn.execute("GRANT USAGE ON SEQUENCE s TO onprem_granted")
    try:
        url = select_only.url().replace(f"{SELECT_ONLY}:", "onprem_granted:", 1)
        message = (await checks_of(url))["role may not write"].message
        assert "has the attributes CREATEROLE, CREATEDB, BYPASSRLS" in message
        assert "owns or may change the tables public.accounts" in message
        assert "owns or may advance the sequences public.s" in message
    finally:
        with psycopg.connect(owned.admin.dsn(), autocommit=True) as conn:
            conn.execute("DROP OWNED BY onprem_granted")
            conn.execute("DROP ROLE onprem_granted")


async def test_extensions_that_reach_other_connections_are_named(owned: OwnedDatabase) -> None:
    # dblink opens a new connection whose transaction is not the agent's: only the role's rights stop it.
    with psycopg.connect(owned.admin.dsn(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS dblink")
    try:
        message = (await checks_of(owned.owner.url()))["role may not write"].message
        assert "may reach other connections or files through the extensions dblink" in message
    finally:
        with psycopg.connect(owned.admin.dsn(), autocommit=True) as conn:
            conn.execute("DROP EXTENSION dblink")


async def test_a_select_only_role_passes_without_a_warning(select_only: PostgresServer) -> None:
    checks = await checks_of(select_only.url())
    role = checks["role may not write"]
    assert (role.ok, role.warning) == (True, False)
    assert role.message == f"the role '{SELECT_ONLY}' has no privilege to write that the catalog shows"
    assert (checks["read-only"].ok, checks["read-only"].warning) == (True, False)


async def test_a_read_write_profile_gets_no_role_check(owned: OwnedDatabase) -> None:
    handler = DatabaseHandler({"rw": DatabaseProfile(name="rw", url=owned.owner.url())})
    try:
        names = [c.name for c in await handler.check("rw")]
    finally:
        await handler.aclose()
    assert "role may not write" not in names and "read-only" not in names


def _config(tmp_path: Path, profiles: dict[str, object]) -> Path:
    config = tmp_path / "agent.yaml"
    (tmp_path / "ca.pem").write_text("")
    config.write_text(yaml.safe_dump({"control_plane": {"address": "127.0.0.1:1", "ca_file": "ca.pem"},
                                      "identity_dir": "id", "profiles": {"databases": profiles}}))
    return config


async def test_test_profile_marks_the_warning_and_still_succeeds(owned: OwnedDatabase, tmp_path: Path) -> None:
    config = _config(tmp_path, {"ro": {"url": owned.owner.url(), "read_only": True}})
    out = io.StringIO()
    assert await run_test_profile(config, "ro", out) == 0
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "✓ reachable", "✓ credentials", "✓ database exists", "✓ dialect", "✓ may read", "✓ read-only",
        "! role may not write"]
    assert owned.owner.password not in out.getvalue()


def test_onprem_agent_test_profile_prints_no_warning_for_a_select_only_role(
    select_only: PostgresServer, tmp_path: Path
) -> None:
    config = _config(tmp_path, {"ro": {"url": select_only.url(), "read_only": True}})
    result = subprocess.run([str(Path(sys.executable).parent / "onprem-agent"), "test-profile", "ro", "--config",
                             str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"✓ role may not write: the role '{SELECT_ONLY}' has no privilege to write" in result.stdout


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    process = ControlPlaneProcess(tmp_path / "cp")
    process.start()
    yield process
    process.stop()


def test_doctor_prints_the_warning_and_passes(cp: ControlPlaneProcess, owned: OwnedDatabase, tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent", cp, profiles={"databases": {
        "ro": {"url": owned.owner.url(), "read_only": True}}})
    agent.enroll("doctor")
    doctor = [str(Path(sys.executable).parent / "onprem-agent"), "doctor", "--config", str(agent.config_file)]
    result = subprocess.run(doctor, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "! database profile ro: role may not write: the role 'onprem_owner' could write outside this agent" \
        in result.stdout
    assert "✓ database profile ro: read-only: " in result.stdout


async def test_sqlite_warns_when_the_agent_may_write_the_file_and_not_when_opened_read_only(tmp_path: Path) -> None:
    path = tmp_path / "lite.db"
    sqlite3.connect(path).close()
    writable = (await checks_of(f"sqlite:///{path}"))["role may not write"]
    assert (writable.ok, writable.warning) == (True, True)
    assert writable.message.startswith(f"the agent's OS user may write {path}")
    opened_ro = (await checks_of(f"sqlite:///file:{path}?mode=ro&uri=true"))["role may not write"]
    assert (opened_ro.ok, opened_ro.warning) == (True, False)
