"""`NotifiedCounter`: the token change counter kept in memory on replicas, and never trusted past what
its listener can vouch for. A revocation whose notification is lost, or that came while the listener was
away, must still be seen."""

from __future__ import annotations

from onprem.control_plane.credentials import NotifiedCounter


class Store:
    """The store's counter, as the store would answer; counts the reads that reached it."""

    def __init__(self) -> None:
        self.value = 0
        self.reads = 0

    async def read(self) -> int:
        self.reads += 1
        return self.value

    async def refresh(self) -> int:
        return await self.read()

    def close(self) -> None:
        pass


class Listener:
    def __init__(self) -> None:
        self.epoch: int | None = 1

    def __call__(self) -> int | None:
        return self.epoch


async def test_while_the_listener_listens_the_counter_is_read_once() -> None:
    store, listener = Store(), Listener()
    counter = NotifiedCounter(store, listener)
    assert [await counter.read() for _ in range(5)] == [0] * 5
    assert store.reads == 1


async def test_an_announced_change_makes_the_next_read_go_to_the_store() -> None:
    store, listener = Store(), Listener()
    counter = NotifiedCounter(store, listener)
    await counter.read()
    store.value = 1  # a revocation committed, then announced
    counter.invalidate()
    assert await counter.read() == 1


async def test_a_change_made_while_the_listener_was_away_is_seen_after_it_reconnects() -> None:
    store, listener = Store(), Listener()
    counter = NotifiedCounter(store, listener)
    await counter.read()
    listener.epoch = None  # the listening connection dropped: nothing heard from now on
    store.value = 1
    assert await counter.read() == 1  # read through while not listening
    store.value = 2
    listener.epoch = 2  # a new connection: what was learnt before it is stale
    assert await counter.read() == 2


async def test_a_lost_notification_is_caught_by_the_periodic_refresh() -> None:
    store, listener = Store(), Listener()
    counter = NotifiedCounter(store, listener)
    await counter.read()
    store.value = 1  # committed, but the notification never came
    assert await counter.read() == 0
    assert await counter.refresh() == 1
    assert await counter.read() == 1
