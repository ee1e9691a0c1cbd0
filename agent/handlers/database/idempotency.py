"""A database profile's idempotency table: keyed writes recorded in the same transaction as the write.

A profile that names `idempotency_table:` keeps one row per key there:

    idempotency_key  VARCHAR(128) PRIMARY KEY   the caller's key
    fingerprint      the request's SHA-256       (tunnel.idempotency.fingerprint)
    outcome          the response, serialized    (tunnel.idempotency.encode_chunks)
    expires_at       BIGINT, Unix seconds        past it the row is ignored, then pruned

`DDL` prints the table for each dialect; `onprem-agent create-idempotency-table --profile NAME`
creates it. A keyed write runs as:

1. `claim`, in the write's own transaction: the key's row, if one is there and not expired, answers
   the request (its outcome, or IDEMPOTENCY_KEY_REUSED when the fingerprint differs) and the write does
   not run. Otherwise a row for the key is inserted. The primary key serializes two attempts with the
   same key: the second INSERT waits on the first's row lock (PostgreSQL, SQL Server) or on the
   database's write lock (SQLite, up to its busy timeout) until the first commits, then finds the row
   and answers from it, or rolls back, and then runs itself.
2. The write runs, then `record` puts its outcome in the row, and the transaction commits: the row and
   the write are one commit, so a row exists exactly when the write took effect.

A write that fails rolls back with its row: a retry runs it again, which is right, as it changed nothing.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.schema import CreateIndex, CreateTable

from onprem.tunnel import idempotency
from onprem.tunnel.errors import Aborted, FailedPrecondition, Internal
from onprem.v1 import tunnel_pb2

__all__ = ["DDL_DIALECTS", "MAX_RECORDED_BYTES", "IdempotencyTable", "ddl"]

_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")
#: The largest outcome recorded with a key: a keyed query's whole result is kept in its row.
MAX_RECORDED_BYTES = 1024 * 1024
#: How often a profile deletes its expired rows, at most (seconds).
PRUNE_INTERVAL_SECONDS = 60.0
DDL_DIALECTS = ("postgresql", "sqlite", "mssql")


def check_table_name(name: str) -> str:
    """`name` if it is `table` or `schema.table` of plain identifiers; ValueError otherwise."""
    if not _TABLE_NAME.match(name):
        raise ValueError(f"{name!r} must be 'table' or 'schema.table', letters, digits and _ only")
    return name


def _table(name: str) -> sa.Table:
    schema, _, table = name.rpartition(".")
    metadata = sa.MetaData()
    t = sa.Table(
        table, metadata,
        sa.Column("idempotency_key", sa.String(idempotency.MAX_KEY_BYTES), primary_key=True),
        sa.Column("fingerprint", sa.LargeBinary(32), nullable=False),
        sa.Column("outcome", sa.LargeBinary(), nullable=True),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        schema=schema or None,
    )
    sa.Index(f"{table}_expires_at", t.c.expires_at)
    return t


def ddl(name: str, dialect: str) -> str:
    """The CREATE TABLE and CREATE INDEX statements of table `name` in `dialect`."""
    # SQL Server: VARBINARY(max), not the deprecated IMAGE that a dialect not told the server's version picks.
    options = {"deprecate_large_types": True} if dialect == "mssql" else {}
    compiler = sa.make_url(f"{dialect}://").get_dialect()(**options)
    table = _table(name)
    statements = [str(CreateTable(table).compile(dialect=compiler)).strip()]
    statements += [str(CreateIndex(index).compile(dialect=compiler)).strip() for index in table.indexes]
    return ";\n".join(statements) + ";\n"


@dataclass(frozen=True)
class Recorded:
    """What a key's row answers with."""

    chunks: list[tunnel_pb2.ResponseChunk]


class IdempotencyTable:
    """One profile's table of keyed writes."""

    def __init__(self, name: str, ttl_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.name = check_table_name(name)
        self.ttl_seconds = ttl_seconds
        self._table = _table(name)
        #: The time in Unix seconds (tests move it forward to expire records).
        self.clock = clock
        self._pruned_at: float | None = None

    def create(self, conn: sa.Connection) -> bool:
        """Create the table (and its index) unless it exists; True when created."""
        inspector = sa.inspect(conn)
        if inspector.has_table(self._table.name, schema=self._table.schema):
            return False
        self._table.metadata.create_all(conn)
        return True

    def claim(self, conn: sa.Connection, key: str, fingerprint: bytes, begin: Callable[[], None]) -> Recorded | None:
        """Take `key` for this transaction (None), or the recorded outcome that answers the request.

        `begin` starts the request's transaction again (with its limits) after a rollback here.
        Raises FailedPrecondition (IDEMPOTENCY_KEY_REUSED) when the key's record is of another request.
        """
        t = self._table
        now = int(self.clock())
        try:
            self._maybe_prune(conn, now, begin)
        except sa.exc.DBAPIError:
            self._pruned_at = None
            conn.rollback()
            if not sa.inspect(conn).has_table(t.name, schema=t.schema):
                raise FailedPrecondition(
                    f"the idempotency table '{self.name}' does not exist; create it with 'onprem-agent "
                    "create-idempotency-table --profile NAME' (or the DDL in docs/operators.md)",
                    reason="IDEMPOTENCY_TABLE_MISSING") from None
            raise
        for _ in range(3):
            recorded = self._lookup(conn, key, fingerprint, now)
            if recorded is not None:
                return recorded
            try:
                # An expired row of the key would make the INSERT fail: it goes first.
                conn.execute(sa.delete(t).where(t.c.idempotency_key == key, t.c.expires_at < now))
                conn.execute(sa.insert(t).values(idempotency_key=key, fingerprint=fingerprint, outcome=None,
                                                 expires_at=now + max(1, int(self.ttl_seconds))))
                return None
            except sa.exc.IntegrityError:
                # Another attempt with the key committed while this one waited on it: read its row.
                conn.rollback()
                begin()
        raise Internal(f"idempotency key '{key}': its row kept changing while this request looked at it",
                       reason="IDEMPOTENCY_RACE")

    def record(self, conn: sa.Connection, key: str, chunks: Sequence[tunnel_pb2.ResponseChunk]) -> None:
        """Put the outcome in the key's row, inside the write's transaction (before it commits)."""
        outcome = idempotency.encode_chunks(chunks)
        if len(outcome) > MAX_RECORDED_BYTES:
            raise FailedPrecondition(
                f"the result of a request with an idempotency key is recorded with the key and may be at most "
                f"{MAX_RECORDED_BYTES} bytes (this one: {len(outcome)}); nothing was committed. Return fewer rows, "
                "or send it without a key", reason="IDEMPOTENT_RESULT_TOO_LARGE")
        t = self._table
        conn.execute(sa.update(t).where(t.c.idempotency_key == key).values(outcome=outcome))

    def prune(self, conn: sa.Connection) -> int:
        """Delete the expired rows (committed by the caller); how many."""
        t = self._table
        result = conn.execute(sa.delete(t).where(t.c.expires_at < int(self.clock())))
        return max(0, result.rowcount or 0)

    def _maybe_prune(self, conn: sa.Connection, now: int, begin: Callable[[], None]) -> None:
        # In a transaction of its own, before the write's: the write's then holds only its own key's row.
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_INTERVAL_SECONDS:
            return
        self._pruned_at = now
        self.prune(conn)
        conn.commit()
        begin()

    def _lookup(self, conn: sa.Connection, key: str, fingerprint: bytes, now: int) -> Recorded | None:
        t = self._table
        row = conn.execute(sa.select(t.c.fingerprint, t.c.outcome).where(
            t.c.idempotency_key == key, t.c.expires_at >= now)).first()
        if row is None:
            return None
        if bytes(row.fingerprint) != fingerprint:
            raise FailedPrecondition(
                f"idempotency key '{key}' was already used for another request (another method, profile, SQL "
                "or parameters); use a new key for a new request", reason=idempotency.REUSED)
        if row.outcome is None:
            # Committed rows always hold an outcome; one without is from a write still running (SQL Server
            # under READ UNCOMMITTED) and must not be answered as if it were done.
            raise Aborted(f"idempotency key '{key}': its request is still running; retry shortly",
                          reason="IDEMPOTENCY_KEY_IN_PROGRESS")
        try:
            return Recorded(idempotency.decode_chunks(bytes(row.outcome)))
        except ValueError:
            raise Internal(f"idempotency key '{key}': its recorded outcome is damaged", reason="IDEMPOTENCY_RECORD")\
                from None
