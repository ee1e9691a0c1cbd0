"""`test-profile` checks of database profiles, and `run_test_profile`'s output, against real servers."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from onprem.agent.handlers.database import DatabaseHandler
from onprem.agent.profile_check import run_test_profile
from onprem.agent.profiles import DatabaseProfile
from tests.agent.handlers.database.test_handler import reader_url
from tests.support.postgres import PostgresServer
from tools.ports import free_port


async def checks_of(profile: DatabaseProfile) -> list[tuple[str, bool]]:
    handler = DatabaseHandler({profile.name: profile})
    try:
        checks = await handler.check(profile.name)
    finally:
        await handler.aclose()
    for c in checks:
        assert "onprem-test-secret" not in c.message and "wrong-Pa55" not in c.message
    return [(c.name, c.ok) for c in checks]


async def test_a_working_pg_profile_passes_every_check(postgres: PostgresServer) -> None:
    assert await checks_of(DatabaseProfile(name="ok", url=postgres.url())) == [
        ("reachable", True), ("credentials", True), ("database exists", True), ("dialect", True), ("may read", True)]


async def test_a_read_only_pg_profile_also_checks_the_database_enforces_it(postgres: PostgresServer) -> None:
    profile = DatabaseProfile(name="ro", url=reader_url(postgres), read_only=True)
    assert ("read-only", True) in await checks_of(profile)


async def test_a_closed_port_fails_reachable_and_stops(postgres: PostgresServer) -> None:
    url = f"postgresql+psycopg://onprem@127.0.0.1:{free_port()}/x"
    assert await checks_of(DatabaseProfile(name="down", url=url)) == [("reachable", False)]


async def test_a_wrong_password_fails_credentials(postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHECK_PW", "wrong-Pa55")
    profile = DatabaseProfile(name="pw", url=postgres.url(with_password=False), password_env="CHECK_PW")
    assert await checks_of(profile) == [("reachable", True), ("credentials", False)]


async def test_a_missing_database_passes_credentials_and_fails_database_exists(postgres: PostgresServer) -> None:
    profile = DatabaseProfile(name="nodb", url=postgres.url("no_such_db"))
    assert await checks_of(profile) == [("reachable", True), ("credentials", True), ("database exists", False)]


async def test_a_pg_dialect_pointed_at_another_server_fails_the_dialect_check(postgres: PostgresServer) -> None:
    # psqlODBC says "PostgreSQL" where an mssql profile expects "Microsoft SQL Server".
    import os

    from onprem.agent.profiles import parse_profiles

    os.environ["CHECK_MSSQL_PW"] = postgres.password
    profile = parse_profiles({"databases": {"m": {
        "dialect": "odbc", "connection_string": f"Driver={{PostgreSQL Unicode}};Server={postgres.host};"
                                                f"Port={postgres.port};Database={postgres.database}",
        "username": postgres.user, "password_env": "CHECK_MSSQL_PW"}}}).databases["m"]
    mssql = DatabaseProfile(name="m", url="mssql+pyodbc://", password_env="CHECK_MSSQL_PW",
                            odbc_connect=profile.odbc_connect)
    assert (await checks_of(mssql))[-1] == ("dialect", False)
    assert (await checks_of(profile))[-1] == ("may read", True)


async def test_a_missing_sqlite_file_fails_reachable(tmp_path: Path) -> None:
    assert await checks_of(DatabaseProfile(name="f", url=f"sqlite:///{tmp_path}/none.db")) == [("reachable", False)]


async def test_run_test_profile_prints_each_check_and_returns_its_status(postgres: PostgresServer, tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    (tmp_path / "ca.pem").write_text("")
    config.write_text(yaml.safe_dump({
        "control_plane": {"address": "127.0.0.1:1", "ca_file": "ca.pem"}, "identity_dir": "id",
        "profiles": {"databases": {
            "good": {"url": postgres.url(with_password=False), "password_file": str(tmp_path / "pw")},
            "bad": {"url": f"postgresql+psycopg://onprem@127.0.0.1:{free_port()}/x"}}},
    }))
    (tmp_path / "pw").write_text(postgres.password)
    out = io.StringIO()
    assert await run_test_profile(config, "good", out) == 0
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "✓ reachable", "✓ credentials", "✓ database exists", "✓ dialect", "✓ may read"]
    assert postgres.password not in out.getvalue()
    out = io.StringIO()
    assert await run_test_profile(config, "bad", out) == 1
    assert out.getvalue().startswith("✗ reachable: cannot open a TCP connection to 127.0.0.1:")
    out = io.StringIO()
    assert await run_test_profile(config, "nope", out) == 1
    assert "no profile named 'nope'" in out.getvalue()
