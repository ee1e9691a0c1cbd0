"""Token buckets per caller address, in bounded memory: slowing down guessers, capping audit floods.

Written for an attacker with many addresses and many attempts:

- A key is the caller's IPv4 address, or its IPv6 /64 (one host can pick any of the
  2^64 addresses of its network, so finer keys would cost it nothing).
- At most `max_keys` buckets are kept. A bucket untouched for as long as a full
  refill takes carries no state and is dropped first (buckets are kept in touch
  order, so this is O(1) per touch). When the table is still full, new keys share
  one overflow bucket: an attacker with more addresses than the table slows down
  everyone who is new during the attack, but never grows the memory.

`KeyedBuckets` is plain arithmetic on a clock, so it is tested without waiting;
`AttemptThrottle` adds the asyncio wait and a cap on how many attempts of one key
may wait at once (beyond it: refused at once, so that waiting holds nothing).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

#: The key all callers share once the table is full.
OVERFLOW_KEY = "(overflow: too many addresses)"


def peer_host(peer: str) -> str:
    """The caller's address without its port, from gRPC's peer string ("ipv4:10.0.0.7:51234")."""
    scheme, _, rest = urllib.parse.unquote(peer).partition(":")
    if scheme == "ipv4":
        return rest.rsplit(":", 1)[0]
    if scheme == "ipv6":
        host = rest.rsplit(":", 1)[0] if rest.startswith("[") else rest
        return host.strip("[]")
    if scheme == "unix":
        return "unix"
    return peer[:64] or "unknown"


def peer_key(peer: str) -> str:
    """The throttling key of a gRPC peer: its IPv4 address, or its IPv6 /64."""
    host = peer_host(peer)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass
class _Bucket:
    tokens: float
    updated: float
    waiting: int = 0


class KeyedBuckets:
    """`burst` tokens per key, one more every `refill_seconds`, at most `max_keys` keys."""

    def __init__(self, *, burst: int, refill_seconds: float, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or refill_seconds <= 0 or max_keys < 1:
            raise ValueError("burst and max_keys must be at least 1, refill_seconds more than 0")
        self.burst = burst
        self.refill_seconds = refill_seconds
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._overflow = _Bucket(float(burst), clock())

    def __len__(self) -> int:
        return len(self._buckets)

    def bucket(self, key: str) -> tuple[str, _Bucket]:
        """The key's bucket refilled to now, and the key it is filed under (the overflow key when full)."""
        now = self._clock()
        found = self._buckets.get(key)
        if found is None:
            self._prune(now)
            if len(self._buckets) >= self.max_keys:
                key, found = OVERFLOW_KEY, self._overflow
            else:
                found = self._buckets[key] = _Bucket(float(self.burst), now)
        if key != OVERFLOW_KEY:
            self._buckets.move_to_end(key)
        found.tokens = min(float(self.burst), found.tokens + (now - found.updated) / self.refill_seconds)
        found.updated = now
        return key, found

    def _prune(self, now: float) -> None:
        # Touch order = time order: the front is the longest untouched. Untouched for a full refill
        # means full, i.e. no different from a bucket made anew, so dropping it loses nothing.
        full_after = self.burst * self.refill_seconds
        while self._buckets:
            key, oldest = next(iter(self._buckets.items()))
            if oldest.waiting or now - oldest.updated < full_after:
                return
            del self._buckets[key]

    def take(self, key: str) -> float:
        """Take a token and return 0, or return how many seconds until one is there (taking none)."""
        _, bucket = self.bucket(key)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) * self.refill_seconds

    def give_back(self, key: str) -> None:
        """Return a token taken for an attempt that turned out fine."""
        _, bucket = self.bucket(key)
        bucket.tokens = min(float(self.burst), bucket.tokens + 1)


class Throttled(Exception):
    """Too many attempts of one key are already waiting."""

    def __init__(self, key: str, retry_after: float) -> None:
        super().__init__(key)
        self.key = key
        self.retry_after = retry_after


class AttemptThrottle:
    """Lets `burst` attempts of a key through at once, then one per `refill_seconds`.

    Every attempt takes a token before it is looked at; one that succeeds gives it back, so
    only failures use up a key's budget, and concurrent attempts cannot all slip through
    before the first failure is counted. Past the budget an attempt waits for the next token;
    at most `max_waiting` attempts of a key wait at once, others raise `Throttled`.
    """

    def __init__(self, buckets: KeyedBuckets, *, max_waiting: int = 1,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self._buckets = buckets
        self._max_waiting = max_waiting
        self._sleep = sleep

    async def admit(self, key: str) -> float:
        """Wait until an attempt of `key` may go on; return how long it waited."""
        waited = 0.0
        while (wait := self._buckets.take(key)) > 0:
            filed, bucket = self._buckets.bucket(key)
            if bucket.waiting >= self._max_waiting:
                raise Throttled(filed, wait)
            bucket.waiting += 1
            try:
                await self._sleep(wait)
            finally:
                bucket.waiting -= 1
            waited += wait
        return waited

    def succeeded(self, key: str) -> None:
        self._buckets.give_back(key)


class RowLimiter:
    """Decides which refusals of a key get their own audit row; counts the others for a summary row.

    A flood of refused calls from one address writes `burst` rows, then one per `refill_seconds`,
    plus one summary row per flush saying how many were left out; `pending` is bounded like the
    buckets (keys past the table share the overflow key).
    """

    def __init__(self, buckets: KeyedBuckets) -> None:
        self._buckets = buckets
        self._pending: dict[str, int] = {}

    def allow(self, key: str) -> bool:
        if self._buckets.take(key) == 0:
            return True
        filed, _ = self._buckets.bucket(key)
        if filed not in self._pending and len(self._pending) >= self._buckets.max_keys:
            filed = OVERFLOW_KEY
        self._pending[filed] = self._pending.get(filed, 0) + 1
        return False

    def drain(self) -> dict[str, int]:
        """The refusals left out per key since the last drain."""
        pending, self._pending = self._pending, {}
        return pending
