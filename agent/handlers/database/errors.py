"""Driver errors to request errors: one table from SQLSTATE to gRPC status, and credential scrubbing.

PostgreSQL (psycopg) and ODBC (pyodbc) report a SQLSTATE; SQLite reports none,
so its messages are matched instead. The database's own message is kept (first
lines only: drivers append the SQL and a caret line), with every secret the
profile knows replaced by `***`.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence

import psycopg
import sqlalchemy as sa

from onprem.agent.profiles.database import DatabaseProfile
from onprem.tunnel.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PermissionDenied,
    RequestError,
    ResourceExhausted,
    Unavailable,
)

__all__ = ["first_lines", "map_error", "scrub"]

# SQLSTATE prefix -> (error class, reason), most specific first.
_SQLSTATE_TABLE: tuple[tuple[str, type[RequestError], str], ...] = (
    ("25006", FailedPrecondition, "READ_ONLY_PROFILE"),
    ("57014", DeadlineExceeded, "STATEMENT_TIMEOUT"),
    ("HYT00", DeadlineExceeded, "STATEMENT_TIMEOUT"),  # ODBC: timeout expired
    ("HY008", DeadlineExceeded, "STATEMENT_TIMEOUT"),  # ODBC: operation cancelled
    ("23505", AlreadyExists, "UNIQUE_VIOLATION"),
    ("42501", PermissionDenied, "INSUFFICIENT_PRIVILEGE"),
    ("42000", InvalidArgument, "SQL_ERROR"),
    ("3D000", FailedPrecondition, "DATABASE_NOT_FOUND"),
    ("57P0", Unavailable, "DATABASE_UNAVAILABLE"),
    ("08", Unavailable, "DATABASE_UNAVAILABLE"),
    ("28", Unavailable, "DATABASE_AUTH_FAILED"),
    ("23", FailedPrecondition, "INTEGRITY_VIOLATION"),
    ("42", InvalidArgument, "SQL_ERROR"),
    ("22", InvalidArgument, "INVALID_DATA"),
    ("0A", InvalidArgument, "SQL_ERROR"),
    ("07", InvalidArgument, "INVALID_PARAMETER"),  # ODBC: dynamic SQL error (parameter count, type)
    ("40", Aborted, "TRANSACTION_CONFLICT"),
    # Transaction control where the database does not allow it (e.g. COMMIT inside a procedure called
    # in a transaction block, SET TRANSACTION after the first query, DISCARD ALL inside a transaction).
    ("2D", FailedPrecondition, "INVALID_TRANSACTION_TERMINATION"),
    ("25", FailedPrecondition, "INVALID_TRANSACTION_STATE"),
    ("0B", FailedPrecondition, "INVALID_TRANSACTION_STATE"),
    ("55", FailedPrecondition, "OBJECT_NOT_IN_PREREQUISITE_STATE"),
    ("26", InvalidArgument, "SQL_ERROR"),  # no such prepared statement
    ("34", InvalidArgument, "SQL_ERROR"),  # no such cursor
    ("53", ResourceExhausted, "DATABASE_RESOURCES"),
)

# SQLite reports no SQLSTATE: (message fragment, error class, reason), first match wins. The
# SQLite ODBC driver reports a generic HY000 with the same messages, so it goes through here too.
_MESSAGE_TABLE: tuple[tuple[str, type[RequestError], str], ...] = (
    ("readonly database", FailedPrecondition, "READ_ONLY_PROFILE"),
    ("not authorized", FailedPrecondition, "READ_ONLY_PROFILE"),
    ("authorization denied", FailedPrecondition, "READ_ONLY_PROFILE"),
    ("unique constraint failed", AlreadyExists, "UNIQUE_VIOLATION"),
    ("constraint failed", FailedPrecondition, "INTEGRITY_VIOLATION"),
    ("unable to open database", Unavailable, "DATABASE_UNAVAILABLE"),
    ("database is locked", Unavailable, "DATABASE_LOCKED"),
    ("statement timeout", DeadlineExceeded, "STATEMENT_TIMEOUT"),
    ("interrupted", DeadlineExceeded, "STATEMENT_TIMEOUT"),
    ("syntax error", InvalidArgument, "SQL_ERROR"),
    ("no such", InvalidArgument, "SQL_ERROR"),
    ("one statement at a time", InvalidArgument, "SQL_ERROR"),
    ("incomplete input", InvalidArgument, "SQL_ERROR"),
    ("binding", InvalidArgument, "SQL_ERROR"),
    ("has no column", InvalidArgument, "SQL_ERROR"),
    ("already exists", InvalidArgument, "SQL_ERROR"),
    # "cannot start a transaction within a transaction", "cannot VACUUM from within a transaction"
    ("within a transaction", FailedPrecondition, "INVALID_TRANSACTION_STATE"),
    ("no transaction is active", FailedPrecondition, "INVALID_TRANSACTION_STATE"),
)

# pyodbc puts the SQLSTATE first in its args; its message also starts with "[SQLSTATE] ".
_ODBC_STATE = re.compile(r"^[0-9A-Z]{5}$")


def _sqlstate(orig: BaseException) -> str | None:
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate
    if type(orig).__module__ == "pyodbc" and orig.args and isinstance(orig.args[0], str):
        state = orig.args[0]
        # HY000 is ODBC's "general error": the message says more than the state.
        if _ODBC_STATE.match(state) and state != "HY000":
            return state
    return None


def _message(orig: BaseException) -> str:
    if type(orig).__module__ == "pyodbc" and len(orig.args) >= 2:
        # "[HY000] [unixODBC][Driver]message (1) (SQLExecDirectW)": keep the driver's words.
        text = re.sub(r"^\[[0-9A-Z]{5}\]\s*", "", str(orig.args[1]))
        text = re.sub(r"\s*\(\d+\)\s*\(SQL\w+\)\s*$", "", text)
        return text
    return str(orig)


def map_error(exc: BaseException, profile: DatabaseProfile, secrets: Sequence[str], connecting: bool) -> RequestError:
    """Turn a driver error into the RequestError the caller gets; the one table lookup."""
    if isinstance(exc, RequestError):
        return exc
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None else exc
    message = scrub(first_lines(_message(orig)), secrets)
    sqlstate = _sqlstate(orig)
    if connecting or (isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated):
        reason = "DATABASE_AUTH_FAILED" if sqlstate and sqlstate.startswith("28") else "DATABASE_UNAVAILABLE"
        if sqlstate == "3D000":
            reason = "DATABASE_NOT_FOUND"
        return Unavailable(
            f"database profile '{profile.name}' ({profile.display_url()}) is unreachable: {message}", reason=reason
        )
    if sqlstate is not None:
        for prefix, cls, reason in _SQLSTATE_TABLE:
            if sqlstate.startswith(prefix):
                return cls(f"{message} (SQLSTATE {sqlstate})", reason=reason)
        return Internal(f"{message} (SQLSTATE {sqlstate})", reason="DATABASE_ERROR")
    if isinstance(orig, psycopg.ProgrammingError):
        # No SQLSTATE: psycopg refused the statement itself.
        if "COPY" in message:  # psycopg runs COPY only through its copy() API
            return InvalidArgument("COPY ... TO STDOUT and COPY ... FROM STDIN cannot run through the agent; "
                                   "use SELECT (results stream at any size) or INSERT with ExecuteBatch",
                                   reason="SQL_ERROR")
        return InvalidArgument(message, reason="SQL_ERROR")
    if isinstance(orig, psycopg.OperationalError):  # no SQLSTATE: the connection broke
        return Unavailable(
            f"database profile '{profile.name}' ({profile.display_url()}) failed: {message}",
            reason="DATABASE_UNAVAILABLE",
        )
    if isinstance(orig, sqlite3.Error) or type(orig).__module__ == "pyodbc":
        lowered = message.lower()
        for fragment, cls, reason in _MESSAGE_TABLE:
            if fragment in lowered:
                return cls(message, reason=reason)
    if isinstance(exc, sa.exc.StatementError | sa.exc.ArgumentError):
        return InvalidArgument(message, reason="SQL_ERROR")
    return Internal(f"database profile '{profile.name}': {message}", reason="DATABASE_ERROR")


def first_lines(text: str) -> str:
    # Driver messages append the SQL and a caret line; the first lines say what went wrong.
    return " ".join(line.strip() for line in text.strip().splitlines()[:2])


def scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
