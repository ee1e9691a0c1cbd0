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
`AttemptThrottle` adds the asyncio wait for a turn, with caps on how many attempts
may wait (beyond them: refused at once, so that waiting holds bounded memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import Callable
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
    """Too many attempts of one key (or in all) are already waiting for their turn."""

    def __init__(self, key: str, retry_after: float) -> None:
        super().__init__(key)
        self.key = key
        self.retry_after = retry_after


class AttemptThrottle:
    """Lets `burst` attempts of a key run at once, and only failures use up the budget.

    Every attempt takes a token before it is looked at, and one that succeeds gives it back:
    so concurrent attempts cannot all slip through before the first failure is counted, yet
    many good attempts from one address (a fleet enrolling from behind one NAT) are only
    ever held to `burst` at a time. Past the budget an attempt waits for its turn: a token
    given back wakes the next waiter at once, a refill (one per `refill_seconds`) at the
    latest. At most `max_waiting` attempts of a key, and `max_waiting_total` in all, wait;
    others raise `Throttled` at once, so that waiting can never hold unbounded memory.
    """

    def __init__(self, buckets: KeyedBuckets, *, max_waiting: int = 16, max_waiting_total: int = 1000) -> None:
        self._buckets = buckets
        self._max_waiting = max_waiting
        self._max_waiting_total = max_waiting_total
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._waiting_total = 0

    @property
    def waiting(self) -> int:
        return self._waiting_total

    async def admit(self, key: str) -> float:
        """Wait until an attempt of `key` may go on (it then holds a token); return how long it waited."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        while (wait := self._buckets.take(key)) > 0:
            filed, bucket = self._buckets.bucket(key)
            if bucket.waiting >= self._max_waiting or self._waiting_total >= self._max_waiting_total:
                raise Throttled(filed, wait)
            turn: asyncio.Future[None] = loop.create_future()
            queue = self._waiters.setdefault(filed, deque())
            queue.append(turn)
            bucket.waiting += 1
            self._waiting_total += 1
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await turn
            finally:
                bucket.waiting -= 1
                self._waiting_total -= 1
                if turn in queue:
                    queue.remove(turn)
                if not queue:
                    self._waiters.pop(filed, None)
        return loop.time() - began

    def succeeded(self, key: str) -> None:
        """The attempt was good: give its token back, and wake the next waiter of its key."""
        self._buckets.give_back(key)
        filed, _ = self._buckets.bucket(key)
        queue = self._waiters.get(filed)
        while queue:
            turn = queue.popleft()
            if not turn.done():
                turn.set_result(None)
                return


class RowLimiter:
    """Decides which refusals of a key get their own audit row; counts the others for summary rows.

    A flood of refused calls from one address writes `burst` rows, then one per `refill_seconds`,
    plus, per drain, one count for each kind of refusal (`what`: e.g. the RPC and its outcome) that
    was left out. `pending` is bounded like the buckets: past `max_keys` entries, refusals of new
    addresses are counted under the overflow key.
    """

    def __init__(self, buckets: KeyedBuckets) -> None:
        self._buckets = buckets
        self._pending: dict[tuple[str, tuple[str, ...]], int] = {}

    def allow(self, key: str, what: tuple[str, ...] = ()) -> bool:
        if self._buckets.take(key) == 0:
            return True
        filed, _ = self._buckets.bucket(key)
        entry = (filed, what)
        if entry not in self._pending and len(self._pending) >= self._buckets.max_keys:
            entry = (OVERFLOW_KEY, what)
        self._pending[entry] = self._pending.get(entry, 0) + 1
        return False

    def drain(self) -> dict[tuple[str, tuple[str, ...]], int]:
        """The refusals left out per (key, what) since the last drain."""
        pending, self._pending = self._pending, {}
        return pending
