"""The store's schema migrations (`store.migrations`), on a SQLite file and on a real PostgreSQL server.

Migrating an empty database to the head makes exactly the tables `Store.create_schema` makes, a
database of revision 0001 (release b333362) keeps its rows through the upgrade, and a downgrade
undoes an upgrade.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    Text,
    column,
    create_engine,
    insert,
    inspect,
    select,
    table,
)

from onprem.control_plane.store import (
    AdvertisedProfile,
    Store,
    current_revision,
    downgrade,
    head_revision,
    upgrade,
)
from onprem.control_plane.store.schema import UTCDateTime, change_counters_table
from tests.support.postgres import PostgresServer

NewUrl = Callable[[str], str]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_url(request: pytest.FixtureRequest, tmp_path: Path) -> NewUrl:
    """Makes an empty database of the test's kind and returns its URL."""
    if request.param == "sqlite":
        return lambda name: f"sqlite:///{tmp_path / name}.db"
    server: PostgresServer = request.getfixturevalue("postgres")

    def make(name: str) -> str:
        database = f"migrate_{name}_{uuid.uuid4().hex[:12]}"
        server.create_database(database)
        return server.url(database)

    return make


def schema_of(url: str) -> dict[str, Any]:
    """Every table's columns (in order), keys, foreign keys and indexes, as the database reports them."""
    engine = create_engine(url)
    try:
        inspector = inspect(engine)
        found: dict[str, Any] = {}
        for name in sorted(inspector.get_table_names()):
            if name == "alembic_version":
                continue
            found[name] = {
                "columns": [(c["name"], str(c["type"]), c["nullable"], c.get("default"), c.get("autoincrement"),
                             c.get("identity")) for c in inspector.get_columns(name)],
                "primary key": inspector.get_pk_constraint(name),
                "foreign keys": sorted((str(fk.get("name")), tuple(fk["constrained_columns"]), fk["referred_table"],
                                        tuple(fk["referred_columns"])) for fk in inspector.get_foreign_keys(name)),
                "indexes": sorted((str(ix["name"]), tuple(str(c) for c in ix["column_names"]), bool(ix["unique"]))
                                  for ix in inspector.get_indexes(name)),
                "unique": sorted((str(uc.get("name")), tuple(uc["column_names"]))
                                 for uc in inspector.get_unique_constraints(name)),
            }
        return found
    finally:
        engine.dispose()


def created_schema(url: str) -> dict[str, Any]:
    with Store(url) as store:
        store.create_schema()
    return schema_of(url)


def test_an_empty_database_migrated_to_the_head_has_exactly_the_schema_the_store_creates(new_url: NewUrl) -> None:
    migrated = new_url("migrated")
    assert current_revision(migrated) is None
    upgrade(migrated)
    assert current_revision(migrated) == head_revision() == "0005"
    expected = created_schema(new_url("created"))
    assert set(expected) == {"groups", "agents", "api_tokens", "enrollment_tokens", "audit", "change_counters",
                             "replicas", "agent_streams", "agent_drains",
                             "settings"}
    assert schema_of(migrated) == expected
    with Store(migrated) as store:
        store.create_schema()  # finds nothing missing
        assert store.change_counter() == 0
        with store.engine.connect() as conn:
            assert conn.execute(select(change_counters_table)).all() == [("api_tokens", 0)]


# --- rows written by release b333362 (revision 0001) ---------------------------------------------------------------

AT = datetime(2030, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)
SECRET = "A" * 43
ENROLL_SECRET = "B" * 43
PROFILES = [{"name": "crm", "kind": "database", "read_only": True, "dialect": "postgresql"}]

# The tables as revision 0001 has them (only the columns it has).
_groups = table("groups", column("name", String()), column("created_at", UTCDateTime()))
_agents = table("agents", *(column(n, String()) for n in (
    "agent_id", "name", "group_name", "hostname", "version", "cert_serial", "revoked_reason", "profiles")),
    *(column(n, UTCDateTime()) for n in ("enrolled_at", "last_seen_at", "cert_expires_at", "revoked_at")))
_api_tokens = table("api_tokens", *(column(n, String()) for n in ("token_id", "name", "secret_hash", "role", "groups")),
                    column("created_at", UTCDateTime()), column("revoked_at", UTCDateTime()))
_enrollment_tokens = table(
    "enrollment_tokens", *(column(n, String()) for n in ("token_id", "secret_hash", "group_name", "description",
                                                         "used_by_agent")),
    *(column(n, UTCDateTime()) for n in ("created_at", "expires_at", "used_at")))
_audit = table("audit", column("at", UTCDateTime()), column("code", Integer()), column("bytes_out", BigInteger()),
               column("duration_ms", BigInteger()), column("detail", Text()),
               *(column(n, String()) for n in ("principal", "role", "method", "group_name", "agent_id", "profile",
                                               "kind", "outcome")))


def write_release_b333362_rows(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(_groups).values(name="plant", created_at=AT))
            conn.execute(insert(_agents).values(
                agent_id="agent-1", name="db01", group_name="plant", hostname="db01.example.internal",
                version="0.1.0", enrolled_at=AT, last_seen_at=AT + timedelta(minutes=1),
                cert_serial=str(2**159 + 7), cert_expires_at=AT + timedelta(days=30), revoked_at=None,
                revoked_reason="", profiles=json.dumps(PROFILES)))
            conn.execute(insert(_api_tokens).values(
                token_id="0123456789abcdef", name="ci", secret_hash=hashlib.sha256(SECRET.encode()).hexdigest(),
                role="operator", groups=json.dumps(["plant"]), created_at=AT, revoked_at=None))
            conn.execute(insert(_enrollment_tokens), [
                {"token_id": "1111111111111111", "secret_hash": hashlib.sha256(b"used").hexdigest(),
                 "group_name": "plant", "description": "db01", "created_at": AT, "expires_at": AT + timedelta(hours=1),
                 "used_at": AT + timedelta(minutes=1), "used_by_agent": "agent-1"},
                {"token_id": "2222222222222222", "secret_hash": hashlib.sha256(ENROLL_SECRET.encode()).hexdigest(),
                 "group_name": "plant", "description": "db02", "created_at": AT,
                 "expires_at": AT + timedelta(days=365), "used_at": None, "used_by_agent": None},
            ])
            conn.execute(insert(_audit).values(
                at=AT, principal="ci", role="operator", method="/onprem.v1.DatabaseService/Query",
                group_name="plant", agent_id="agent-1", profile="crm", kind="database", code=0, outcome="OK",
                bytes_out=42, duration_ms=7, detail="select"))
    finally:
        engine.dispose()


def test_a_database_of_revision_0001_keeps_its_rows_when_upgraded(new_url: NewUrl) -> None:
    url = new_url("old")
    upgrade(url, "0001")
    assert current_revision(url) == "0001"
    write_release_b333362_rows(url)
    upgrade(url)
    assert current_revision(url) == head_revision()
    with Store(url, clock=lambda: AT + timedelta(days=1)) as store:
        store.create_schema()
        assert [(g.name, g.created_at) for g in store.list_groups()] == [("plant", AT)]
        agent = store.get_agent("agent-1")
        assert agent is not None
        assert (agent.name, agent.cert_serial, agent.last_seen_at, agent.profiles) == (
            "db01", 2**159 + 7, AT + timedelta(minutes=1), (AdvertisedProfile.from_mapping(PROFILES[0]),))
        # The operator token still authenticates, and never expires (it had no expiry).
        token = store.authenticate_api_token(f"onp_0123456789abcdef_{SECRET}")
        assert token is not None
        assert (token.name, token.groups, token.created_at, token.expires_at, token.last_used_at, token.created_by,
                token.revoked_by, token.revoke_reason) == ("ci", ("plant",), AT, None, None, "", "", "")
        assert [(t.token_id, t.used_by_agent, t.revoked_at, t.created_by) for t in store.list_enrollment_tokens()] == [
            ("1111111111111111", "agent-1", None, ""), ("2222222222222222", None, None, "")]
        assert store.check_enrollment_token(f"onpe_2222222222222222_{ENROLL_SECRET}").description == "db02"
        [entry] = store.list_audit()
        assert (entry.principal, entry.method, entry.bytes_out, entry.at, entry.token_id, entry.peer) == (
            "ci", "/onprem.v1.DatabaseService/Query", 42, AT, None, None)
        # The seeded change counter is there for the first revocation to bump.
        assert store.change_counter() == 0
        store.revoke_api_token("0123456789abcdef", by="admin", reason="rotated")
        assert store.change_counter() == 1


def test_a_downgrade_to_0001_undoes_the_upgrade_and_the_upgrade_can_be_done_again(new_url: NewUrl) -> None:
    url, at_0001 = new_url("round_trip"), new_url("at_0001")
    upgrade(at_0001, "0001")
    upgrade(url)
    downgrade(url, "0001")
    assert current_revision(url) == "0001"
    assert schema_of(url) == schema_of(at_0001)
    upgrade(url)
    assert schema_of(url) == created_schema(new_url("created"))


def test_0004_adds_the_audit_apis_index_and_its_downgrade_removes_it(new_url: NewUrl) -> None:
    url = new_url("audit_index")
    upgrade(url, "0003")
    assert "ix_audit_group_at" not in [i[0] for i in schema_of(url)["audit"]["indexes"]]
    upgrade(url, "0004")
    assert ("ix_audit_group_at", ("group_name", "at"), False) in schema_of(url)["audit"]["indexes"]
    downgrade(url, "0003")
    assert "ix_audit_group_at" not in [i[0] for i in schema_of(url)["audit"]["indexes"]]


def test_0005_adds_the_audit_trace_id_and_its_index_and_its_downgrade_removes_them(new_url: NewUrl) -> None:
    url = new_url("audit_trace_id")
    upgrade(url, "0004")
    assert "trace_id" not in [c[0] for c in schema_of(url)["audit"]["columns"]]
    upgrade(url, "0005")
    assert ("trace_id", "VARCHAR(32)", True) in [c[:3] for c in schema_of(url)["audit"]["columns"]]
    assert ("ix_audit_trace_id", ("trace_id",), False) in schema_of(url)["audit"]["indexes"]
    downgrade(url, "0004")
    assert "trace_id" not in [c[0] for c in schema_of(url)["audit"]["columns"]]
    assert "ix_audit_trace_id" not in [i[0] for i in schema_of(url)["audit"]["indexes"]]
