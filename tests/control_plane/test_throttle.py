"""Per-address budgets in bounded memory: against one address with many attempts, and many addresses.

The buckets run on a clock the tests set; the async throttle never refills during a test (an hour per token),
so what it admits depends only on what the test does, never on how fast the machine is.
"""

from __future__ import annotations

import asyncio

import pytest

from onprem.control_plane.throttle import (
    OVERFLOW_KEY,
    AttemptThrottle,
    KeyedBuckets,
    RowLimiter,
    Throttled,
    peer_host,
    peer_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("peer", "host", "key"), [
    ("ipv4:10.0.0.7:51234", "10.0.0.7", "10.0.0.7"),
    ("ipv6:[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("ipv6:%5B2001:db8:1:2::9%5D:443", "2001:db8:1:2::9", "2001:db8:1:2::/64"),
    ("ipv6:[::ffff:10.0.0.7]:80", "::ffff:10.0.0.7", "10.0.0.7"),
    ("unix:/run/onprem.sock", "unix", "unix"),
])
def test_a_peer_is_keyed_by_its_address_or_its_ipv6_network(peer: str, host: str, key: str) -> None:
    assert (peer_host(peer), peer_key(peer)) == (host, key)


def test_one_ipv6_host_cannot_escape_its_budget_by_changing_address() -> None:
    keys = {peer_key(f"ipv6:[2001:db8:1:2::{i:x}]:1") for i in range(1, 1000)}
    assert keys == {"2001:db8:1:2::/64"}


def test_a_key_has_its_burst_then_one_token_per_refill() -> None:
    clock = Clock()
    buckets = KeyedBuckets(burst=3, refill_seconds=2.0, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a") == pytest.approx(2.0)
    clock.now += 1.0
    assert buckets.take("a") == pytest.approx(1.0)
    clock.now += 1.0
    assert buckets.take("a") == 0
    assert buckets.take("b") == 0  # another key has its own budget


def test_a_token_given_back_is_there_for_the_next_attempt() -> None:
    buckets = KeyedBuckets(burst=1, refill_seconds=60.0, clock=Clock())
    assert buckets.take("a") == 0
    buckets.give_back("a")
    assert buckets.take("a") == 0


def test_many_addresses_share_one_overflow_budget_rather_than_grow_the_table() -> None:
    clock = Clock()
    buckets = KeyedBuckets(burst=2, refill_seconds=60.0, max_keys=100, clock=clock)
    for i in range(100):
        buckets.take(f"10.0.{i // 256}.{i % 256}")
    assert len(buckets) == 100
    # Every new address now lands in the one overflow bucket, and spends it for all of them.
    assert [buckets.take(f"192.168.0.{i}") for i in range(2)] == [0, 0]
    assert buckets.take("192.168.0.99") > 0
    assert buckets.bucket("192.168.0.100")[0] == OVERFLOW_KEY
    assert len(buckets) == 100


def test_buckets_untouched_for_a_full_refill_are_dropped_to_make_room() -> None:
    clock = Clock()
    buckets = KeyedBuckets(burst=2, refill_seconds=10.0, max_keys=10, clock=clock)
    for i in range(10):
        buckets.take(f"old-{i}")
    clock.now += 20.0  # long enough for every one to be full again: nothing to remember
    assert buckets.take("new") == 0
    assert buckets.bucket("new")[0] == "new"
    assert len(buckets) == 1


async def test_attempts_past_the_budget_wait_and_a_success_lets_the_next_one_in() -> None:
    throttle = AttemptThrottle(KeyedBuckets(burst=2, refill_seconds=3600.0), max_waiting=4)
    await throttle.admit("a")
    await throttle.admit("a")
    waiting = asyncio.create_task(throttle.admit("a"))
    await asyncio.sleep(0)
    assert not waiting.done() and throttle.waiting == 1
    throttle.succeeded("a")  # the first attempt turned out fine: its token goes to the waiter
    await asyncio.wait_for(waiting, 5)
    assert throttle.waiting == 0


async def test_only_so_many_attempts_of_one_address_may_wait_the_rest_are_refused_at_once() -> None:
    throttle = AttemptThrottle(KeyedBuckets(burst=1, refill_seconds=3600.0), max_waiting=2)
    await throttle.admit("a")
    waiters = [asyncio.create_task(throttle.admit("a")) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Throttled) as info:
        await throttle.admit("a")
    assert info.value.key == "a"
    assert info.value.retry_after == pytest.approx(3600.0, rel=0.01)
    await throttle.admit("b")  # other addresses are not held up
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert throttle.waiting == 0


async def test_the_number_of_waiting_attempts_in_all_is_bounded() -> None:
    throttle = AttemptThrottle(KeyedBuckets(burst=1, refill_seconds=3600.0), max_waiting=5, max_waiting_total=3)
    waiters = []
    for i in range(3):
        await throttle.admit(f"k{i}")
        waiters.append(asyncio.create_task(throttle.admit(f"k{i}")))
    await asyncio.sleep(0)
    await throttle.admit("k3")
    with pytest.raises(Throttled):
        await throttle.admit("k3")
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


def test_refusal_rows_past_the_burst_are_counted_per_kind_for_a_summary() -> None:
    limiter = RowLimiter(KeyedBuckets(burst=3, refill_seconds=60.0, clock=Clock()))
    what = ("/onprem.v1.AgentService/GetAgent", "UNAUTHENTICATED", "auth")
    other = ("/onprem.v1.Enrollment/Enroll", "PERMISSION_DENIED", "enroll")
    assert [limiter.allow("10.0.0.7", what) for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow("10.0.0.7", other) is False
    assert limiter.allow("10.0.0.8", what) is True
    assert limiter.drain() == {("10.0.0.7", what): 2, ("10.0.0.7", other): 1}
    assert limiter.drain() == {}
