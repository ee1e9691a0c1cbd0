"""A PostgreSQL database whose login role owns everything in it, and what "unchanged" means for it.

The read-only tests log in as a role that owns the database, its tables, sequences, functions and
large objects, but is not a superuser (read-only profiles refuse superusers): the database's own
privileges stop nothing, so only the agent's enforcement stands between a caller and a write.

`snapshot()` is what must not change: a pg_dump taken as the superuser (rows, schema, grants,
comments, sequence values, large objects with their contents) plus what pg_dump leaves out: the
relfilenodes (CLUSTER, REINDEX and VACUUM FULL change them), prepared transactions, and the files of
a folder the server could write to. `PROBE` is the session state of a pooled connection that must
not outlive a request.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.support.postgres import PostgresServer, bin_path

OWNER = "onprem_owner"
LARGE_OBJECT = 424242
#: The channel a listener watches: a NOTIFY that got committed would arrive there.
CHANNEL = "onprem_evil"

_SCHEMA = f"""
CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance numeric(12,2));
INSERT INTO accounts VALUES (1, 'ann', 10.50), (2, 'bob', NULL);
CREATE INDEX accounts_owner ON accounts (owner);
CREATE TABLE audit (id bigserial PRIMARY KEY, note text);
INSERT INTO audit (note) VALUES ('created');
CREATE SEQUENCE s;
SELECT setval('s', 41);
CREATE VIEW rich AS SELECT * FROM accounts WHERE balance > 5;
CREATE FUNCTION add_audit(n text) RETURNS bigint LANGUAGE sql AS $$ INSERT INTO audit (note) VALUES (n) RETURNING id $$;
CREATE PROCEDURE audit_and_commit(n text) LANGUAGE plpgsql AS $$ BEGIN INSERT INTO audit (note) VALUES (n); COMMIT; END $$;
CREATE PROCEDURE audit_only(n text) LANGUAGE plpgsql AS $$ BEGIN INSERT INTO audit (note) VALUES (n); END $$;
SELECT lo_from_bytea({LARGE_OBJECT}, 'large object contents');
COMMENT ON TABLE accounts IS 'the accounts';
"""

# What pg_dump does not show: a rewrite of a table or index (new relfilenode), a prepared transaction.
_CATALOG = """
SELECT coalesce(string_agg(format('%s %s', c.oid::regclass, c.relfilenode), E'\\n' ORDER BY c.oid::regclass::text), '')
  || E'\\nprepared transactions: ' || (SELECT count(*) FROM pg_prepared_xacts)
FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace
"""

#: Session state of the connection that runs it, one column each; compared before and after a request.
PROBE = """
SELECT pg_backend_pid() AS pid,
  (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory') AS advisory_locks,
  (SELECT count(*) FROM pg_prepared_statements) AS prepared_statements,
  (SELECT count(*) FROM pg_cursors WHERE name <> 'onprem_stream') AS cursors,
  (SELECT count(*) FROM pg_listening_channels()) AS listening,
  (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()) AS temp_relations,
  (SELECT coalesce(string_agg(name || '=' || setting, ',' ORDER BY name), '') FROM pg_settings
     WHERE source = 'session' AND name NOT IN ('application_name', 'statement_timeout')) AS settings,
  current_user AS current_user_, session_user AS session_user_,
  current_setting('default_transaction_read_only') AS default_read_only,
  current_setting('transaction_read_only') AS read_only,
  current_setting('search_path') AS search_path
"""


@dataclass(frozen=True)
class OwnedDatabase:
    #: The superuser, on this database: for snapshots and set-up.
    admin: PostgresServer
    #: The owning role, on this database: what the profiles under test log in as.
    owner: PostgresServer
    #: A folder the server's OS user may write to: COPY ... TO and lo_export must leave it empty.
    server_folder: Path

    def snapshot(self) -> str:
        env = {**os.environ, "PGPASSWORD": self.admin.password}
        dump = subprocess.run(
            [str(bin_path("pg_dump")), *_fixed_restrict_key(), "--no-password", "-h", self.admin.host,
             "-p", str(self.admin.port), "-U", self.admin.user, "-d", self.admin.database],
            check=True, capture_output=True, env=env, text=True,
        ).stdout
        with psycopg.connect(self.admin.dsn(), autocommit=True) as conn:
            row = conn.execute(_CATALOG).fetchone()
        files = sorted(p.name for p in self.server_folder.iterdir())
        return f"{dump}\n-- catalog\n{row[0] if row else ''}\n-- server files\n{files}"


@functools.cache
def _fixed_restrict_key() -> list[str]:
    """Recent pg_dump writes a random `\\restrict` key into every dump unless given one."""
    help_text = subprocess.run([str(bin_path("pg_dump")), "--help"], check=True, capture_output=True, text=True).stdout
    return ["--restrict-key=onprem"] if "--restrict-key" in help_text else []


def create_owned_database(server: PostgresServer, name: str, server_folder: Path | None = None) -> OwnedDatabase:
    """A fresh database `name`, owned (with everything in it) by the non-superuser role `OWNER`.

    Called again with the same name, it drops the database (ending its sessions) and builds it anew.
    """
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (OWNER,)).fetchone():
            conn.execute(f"CREATE ROLE {OWNER} LOGIN PASSWORD '{server.password}'")
        conn.execute(f'CREATE DATABASE "{name}" OWNER {OWNER}')
    owner = PostgresServer(server.host, server.port, OWNER, server.password, name)
    with psycopg.connect(owner.dsn(), autocommit=True) as conn:
        conn.execute(_SCHEMA)
    folder = server_folder or Path(tempfile.mkdtemp(prefix="onprem-server-files-"))
    for leftover in folder.iterdir():
        leftover.unlink()
    folder.chmod(0o777)  # the server runs as another OS user: nothing but its rights may stop a write here
    admin = PostgresServer(server.host, server.port, server.user, server.password, name)
    return OwnedDatabase(admin=admin, owner=owner, server_folder=folder)


class Listener:
    """A session that LISTENs on `CHANNEL`: a NOTIFY that a request managed to commit shows up here."""

    def __init__(self, server: PostgresServer) -> None:
        self.conn = psycopg.connect(server.dsn(), autocommit=True)
        self.received: list[str] = []
        self.conn.add_notify_handler(lambda n: self.received.append(n.payload))
        self.conn.execute(f"LISTEN {CHANNEL}")

    def notifications(self) -> list[str]:
        # A notification committed before this query starts is delivered by the time it returns.
        self.conn.execute("SELECT 1")
        return list(self.received)

    def close(self) -> None:
        self.conn.close()
