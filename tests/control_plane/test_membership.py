"""The replicas a replica announces to its agents, across an outage of the store they share.

No replica can heartbeat while the store is down, so when it comes back every other replica's row
looks aged out until that replica beats again. The first to beat must not tell its agents that the
others are gone: agents would drop healthy streams (seen in CI: a query to r1 found no agent, because r2
had just told the agent that r1 was gone). The store here is a fake whose rows the test sets.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from onprem.control_plane.replicas import Membership, ReplicaIdentity
from onprem.control_plane.store import DRAINING, SERVING, ReplicaRow
from onprem.v1 import tunnel_pb2

NOW = dt.datetime(2026, 12, 3, tzinfo=dt.UTC)


def row(replica_id: str, state: str = SERVING) -> ReplicaRow:
    return ReplicaRow(replica_id, f"{replica_id}:8444", "", "0.3.0", NOW, NOW, state)


class FakeStore:
    def __init__(self) -> None:
        self.rows: list[ReplicaRow] = []
        self.down = False

    def heartbeat_replica(self, replica_id: str, **_: Any) -> list[ReplicaRow]:
        if self.down:
            raise ConnectionError("connection refused")
        return list(self.rows)

    def forget_gone_replicas(self, *_: Any, **__: Any) -> int:
        return 0


class FakeControlPlane:
    def __init__(self) -> None:
        self.store = FakeStore()

    async def blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cp() -> FakeControlPlane:
    return FakeControlPlane()


@pytest.fixture
def r2(cp: FakeControlPlane, clock: Clock) -> tuple[Membership, list[list[str]]]:
    membership = Membership(cp, ReplicaIdentity("r2", "r2:8444"), heartbeat=2.0,  # type: ignore[arg-type]
                            missed_heartbeats=3, clock=clock)
    told: list[list[str]] = []

    def tell(replicas: list[tunnel_pb2.Replica]) -> None:
        told.append([r.replica_id for r in replicas])

    membership.on_change = tell
    return membership, told


def beat(membership: Membership) -> None:
    asyncio.run(membership._beat_once())


def test_the_first_beat_after_an_outage_keeps_the_replicas_whose_rows_aged_out(
        cp: FakeControlPlane, clock: Clock, r2: tuple[Membership, list[list[str]]]) -> None:
    membership, told = r2
    cp.store.rows = [row("r1"), row("r2")]
    beat(membership)
    cp.store.down = True
    beat(membership)
    cp.store.down, cp.store.rows = False, [row("r2")]  # r1's row aged out during the outage
    clock.now += 1
    beat(membership)
    assert told == [["r1", "r2"]]  # nothing new was announced
    assert membership.store_reachable


def test_a_replica_still_missing_after_the_grace_is_announced_gone(
        cp: FakeControlPlane, clock: Clock, r2: tuple[Membership, list[list[str]]]) -> None:
    membership, told = r2
    cp.store.rows = [row("r1"), row("r2")]
    beat(membership)
    cp.store.down = True
    beat(membership)
    cp.store.down, cp.store.rows = False, [row("r2")]
    beat(membership)
    clock.now += 6.0  # one max_age: r1 had every chance to beat again
    beat(membership)
    assert told == [["r1", "r2"], ["r2"]]


def test_a_replica_that_drains_during_the_grace_is_announced_gone_at_once(
        cp: FakeControlPlane, clock: Clock, r2: tuple[Membership, list[list[str]]]) -> None:
    membership, told = r2
    cp.store.rows = [row("r1"), row("r2")]
    beat(membership)
    cp.store.down = True
    beat(membership)
    cp.store.down, cp.store.rows = False, [row("r1", DRAINING), row("r2")]
    beat(membership)
    assert told == [["r1", "r2"], ["r2"]]


def test_without_an_outage_a_replica_that_ages_out_is_announced_gone(
        cp: FakeControlPlane, r2: tuple[Membership, list[list[str]]]) -> None:
    membership, told = r2
    cp.store.rows = [row("r1"), row("r2")]
    beat(membership)
    cp.store.rows = [row("r2")]
    beat(membership)
    assert told == [["r1", "r2"], ["r2"]]
