"""FETCH from a PostgreSQL server-side cursor, the next FETCH sent before the rows of this one are used.

A server-side cursor computes rows only while a FETCH is running: fetched one
after the other, the server waits while the agent encodes and sends a batch,
and the agent waits while the server computes the next (a third of the time
of a 1M-row query). Sent ahead, the next FETCH runs on the server's core
while this batch is encoded and sent on the agent's.

The statements are exactly those of fetching one after the other (the same
FETCH FORWARD n, in the same order, none more: `ask` is only called for a
FETCH the cursor path would also run), only sent earlier; their rows are
loaded by the cursor's own loaders (psycopg's Transformer from the cursor's
context), so the values are the same too. The FETCH is sent with libpq's
extended protocol like every statement of the profile, and its result read
without blocking the GIL (waiting in poll(2)).

Between `ask` and `take` the connection is busy: nothing else may use it,
which `Query` ensures (the header's catalog query runs before the first
`ask`; `drain` runs before the cursor is closed or the connection reset).
"""

from __future__ import annotations

import select
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.adapt import Transformer
from psycopg.pq import ExecStatus, Format
from psycopg.pq.abc import PGresult
from psycopg.rows import tuple_row

__all__ = ["FetchAhead"]

#: How long `drain` lets a FETCH that is still running finish before it cancels it.
_DRAIN_GRACE_SECONDS = 0.05
#: How long a drained FETCH may take to stop after its cancel before the connection is given up.
_DRAIN_CANCEL_SECONDS = 10.0


class FetchAhead:
    """FETCH FORWARD from one declared cursor: `ask(n)` sends it, `take()` waits for its rows."""

    def __init__(self, cursor: psycopg.ServerCursor[Any]) -> None:
        self._conn = cursor.connection
        self._pgconn = self._conn.pgconn
        # The name is the agent's own constant (no quote in it): quoted as an identifier, nothing to escape.
        self._fetch = b'FETCH FORWARD %d FROM "' + cursor.name.encode() + b'"'
        # The cursor's adapters (the agent's text loaders among them) and its rows (tuples): what
        # `fetchmany` would return, value for value.
        self._tx = Transformer.from_context(cursor)
        self._make_row = tuple_row(cursor)
        #: The rows asked for by the FETCH on its way, or None.
        self.asked: int | None = None

    def ask(self, rows: int) -> None:
        """Send FETCH FORWARD `rows`; its result waits in the socket (at most one batch) until `take`."""
        if self.asked is not None:
            raise RuntimeError("a FETCH is already on its way")
        pgconn = self._pgconn
        pgconn.send_query_params(self._fetch % rows, None, result_format=Format.TEXT)
        self.asked = rows
        # libpq in non-blocking mode: the FETCH may still be in its output buffer.
        while pgconn.flush() != 0:
            if self._wait(select.POLLIN | select.POLLOUT, None) & select.POLLIN:
                pgconn.consume_input()

    def take(self) -> list[Sequence[Any]]:
        """The rows of the FETCH on its way: waits for them; raises the server's error as psycopg does."""
        if self.asked is None:
            raise RuntimeError("no FETCH was asked for")
        result = self._result(None)
        self.asked = None
        assert result is not None
        if result.status != ExecStatus.TUPLES_OK:
            raise psycopg.errors.error_from_result(result, encoding=self._conn.info.encoding)
        self._tx.set_pgresult(result)
        return self._tx.load_rows(0, result.ntuples, self._make_row)

    def drain(self) -> None:
        """Finish the FETCH on its way, if any, dropping its rows: the connection is idle again.

        For a request that ends early (cancelled, failed while encoding). A FETCH that is still running
        after a moment is cancelled on the server: it may have minutes of work left.
        """
        if self.asked is None:
            return
        self.asked = None
        if self._result(_DRAIN_GRACE_SECONDS) is None:
            self._conn.cancel_safe(timeout=5)
            if self._result(_DRAIN_CANCEL_SECONDS) is None:
                raise TimeoutError("a cancelled FETCH did not stop")  # the caller closes the connection

    def _result(self, timeout: float | None) -> PGresult | None:
        """The one result of the statement sent, once complete and followed by ReadyForQuery.

        None when `timeout` (seconds) passed first. After it, libpq's transaction status is what the
        statement left (INTRANS, or INERROR after an error), as the read-only guard expects.
        """
        pgconn = self._pgconn
        result = None
        while True:
            while pgconn.is_busy():
                if not self._wait(select.POLLIN, timeout):
                    return None
                pgconn.consume_input()
            part = pgconn.get_result()
            if part is None:
                return result
            if result is None or result.status == ExecStatus.TUPLES_OK:
                result = part  # an error after the rows wins

    def _wait(self, events: int, timeout: float | None) -> int:
        """Wait in poll(2), which releases the GIL; the events that came, 0 on timeout."""
        poller = select.poll()
        poller.register(self._pgconn.socket, events | select.POLLERR | select.POLLHUP)
        ready = poller.poll(None if timeout is None else int(timeout * 1000))
        return ready[0][1] if ready else 0
