"""PostgreSQL results: the next FETCH is sent before the last batch is encoded, and nothing else changes.

The same rows in the same order, the same statements (no row computed that fetching one batch after
the other would not compute), caps as before, and a request that ends while a FETCH is on its way
stops that FETCH on the server and gives its connection back clean.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from onprem.agent.handlers.base import RequestContext
from onprem.agent.handlers.database import DatabaseHandler
from onprem.agent.profiles import DatabaseProfile
from tests.agent.handlers.database.test_handler import collect, decode, reader_url, start
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.postgres

#: Small chunks: a few thousand rows make many batches, so many FETCHes go ahead.
SMALL_CHUNKS = 1024
# Rows 1..200 are the first FETCH; the FETCH sent ahead of them sleeps on the server at row 201.
SLEEPS_AFTER_FIRST_BATCH = (
    "SELECT i, CASE WHEN i > 200 THEN pg_sleep(30)::text END AS s FROM generate_series(1, 100000) AS i"
)


@pytest.fixture(scope="module")
def db(postgres: PostgresServer) -> Iterator[PostgresServer]:
    postgres.create_database("onprem_fetch_ahead_db")
    server = PostgresServer(postgres.host, postgres.port, postgres.user, postgres.password, "onprem_fetch_ahead_db")
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE counted")
    yield server


@pytest.fixture
async def handler(db: PostgresServer) -> AsyncIterator[DatabaseHandler]:
    handler = DatabaseHandler({
        "pg": DatabaseProfile(name="pg", url=db.url(), pool_size=1),
        "pg-ro": DatabaseProfile(name="pg-ro", url=reader_url(db), read_only=True, pool_size=1),
    })
    yield handler
    await handler.aclose()


def _sleeping(server: PostgresServer) -> int:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND datname = %s",
            (server.database,),
        ).fetchone()
        return int(row[0]) if row else 0


async def _until_sleeping(server: PostgresServer) -> None:
    for _ in range(100):
        if await asyncio.to_thread(_sleeping, server):
            return
        await asyncio.sleep(0.05)
    pytest.fail("the FETCH sent ahead never reached pg_sleep")


async def _until_nothing_sleeps(server: PostgresServer) -> None:
    for _ in range(60):
        if await asyncio.to_thread(_sleeping, server) == 0:
            return
        await asyncio.sleep(0.05)
    pytest.fail("the FETCH sent ahead still runs on the server")


async def test_many_batches_arrive_whole_and_in_order(handler: DatabaseHandler) -> None:
    sql = "SELECT i, 'row ' || i AS name FROM generate_series(1, 20000) AS i"
    responses = await collect(handler, start("pg-ro", sql), max_chunk_bytes=SMALL_CHUNKS)
    _, rows = decode(responses)
    assert sum(r.WhichOneof("result") == "rows" for r in responses) > 100
    assert rows == [[i, f"row {i}"] for i in range(1, 20001)]
    assert responses[-1].summary.row_count == 20000


async def test_a_capped_result_computes_the_rows_it_sends_and_one_more_as_before(
    handler: DatabaseHandler, db: PostgresServer
) -> None:
    # nextval counts the rows the server computed: the cap's rows, and the one that says it cut.
    sql = "SELECT nextval('counted') AS n FROM generate_series(1, 100000)"
    responses = await collect(handler, start("pg", sql, max_rows=3000), max_chunk_bytes=SMALL_CHUNKS)
    _, rows = decode(responses)
    assert rows == [[n] for n in range(1, 3001)]
    assert responses[-1].summary.truncated is True
    _, after = decode(await collect(handler, start("pg", "SELECT last_value FROM counted")))
    assert after == [[3001]]


async def test_a_result_that_fits_its_cap_exactly_is_not_truncated(handler: DatabaseHandler) -> None:
    sql = "SELECT i FROM generate_series(1, 5000) AS i"
    responses = await collect(handler, start("pg-ro", sql, max_rows=5000), max_chunk_bytes=SMALL_CHUNKS)
    assert responses[-1].summary.row_count == 5000
    assert responses[-1].summary.truncated is False


async def test_a_stream_dropped_between_batches_stops_the_fetch_sent_ahead(
    handler: DatabaseHandler, db: PostgresServer
) -> None:
    context = RequestContext(request_id=1, body=None, max_chunk_bytes=SMALL_CHUNKS)
    stream = handler.handle(start("pg-ro", SLEEPS_AFTER_FIRST_BATCH).database_query, context)
    async for chunk in stream:
        if chunk.query.WhichOneof("result") == "rows":
            break
    await _until_sleeping(db)
    began = time.monotonic()
    await stream.aclose()  # type: ignore[attr-defined]
    assert time.monotonic() - began < 5  # not the 30 s of the sleep
    await _until_nothing_sleeps(db)
    # pool_size=1: the next request gets the same connection, which must be clean.
    _, rows = decode(await asyncio.wait_for(collect(handler, start("pg-ro", "SELECT 7")), 5))
    assert rows == [[7]]


async def test_a_cancel_while_waiting_for_the_fetch_sent_ahead_stops_it_on_the_server(
    handler: DatabaseHandler, db: PostgresServer
) -> None:
    task = asyncio.create_task(collect(handler, start("pg-ro", SLEEPS_AFTER_FIRST_BATCH),
                                       max_chunk_bytes=SMALL_CHUNKS))
    await _until_sleeping(db)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until_nothing_sleeps(db)
    _, rows = decode(await asyncio.wait_for(collect(handler, start("pg-ro", "SELECT 7")), 5))
    assert rows == [[7]]
