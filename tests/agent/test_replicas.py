"""The agent's plan of streams to control-plane replicas (agent/replicas.py), driven without sockets or tasks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onprem.agent.replicas import Close, Dial, Landing, Open, StreamPlan
from onprem.v1 import tunnel_pb2

CP = "cp.example.com:8444"


def r(rid: str, address: str | None = None) -> tunnel_pb2.Replica:
    return tunnel_pb2.Replica(replica_id=rid, agent_address=f"{rid}:8444" if address is None else address)


R1, R2, R3, R4 = r("r1"), r("r2"), r("r3"), r("r4")


def opened(actions: list[Open | Close]) -> list[int]:
    return [a.slot for a in actions if isinstance(a, Open)]


def closed(actions: list[Open | Close]) -> list[int]:
    return [a.slot for a in actions if isinstance(a, Close)]


def joined(max_streams: int = 3, replicas: list[tunnel_pb2.Replica] | None = None,
           first: tunnel_pb2.Replica = R1) -> tuple[StreamPlan, list[Open | Close]]:
    """A plan whose first stream landed on `first`, which named `replicas`."""
    plan = StreamPlan(CP, max_streams)
    assert plan.start() == [Open(0, 0, wait=False)]
    assert plan.dial(0) == Dial(0, CP, None)
    landing, actions = plan.welcomed(0, first, replicas if replicas is not None else [R1, R2, R3], now=0.0)
    assert landing is Landing.HOLD
    return plan, actions


def hold(plan: StreamPlan, slot: int, replica: tunnel_pb2.Replica, named: list[tunnel_pb2.Replica],
         now: float = 0.0) -> tuple[Landing, list[Open | Close]]:
    plan.attempt(slot)
    assert plan.dial(slot) is not None
    return plan.welcomed(slot, replica, named, now)


def test_the_first_stream_dials_the_configured_address_at_once() -> None:
    plan = StreamPlan(CP, 3)
    assert plan.start() == [Open(0, 0, wait=False)]
    assert plan.start() == []
    assert plan.dial(0) == Dial(0, CP, None)


def test_a_welcome_without_a_replica_keeps_one_stream_to_the_configured_address_as_before() -> None:
    plan = StreamPlan(CP, 3)
    plan.start()
    plan.dial(0)
    assert plan.welcomed(0, None, [], now=0.0) == (Landing.SINGLE, [])
    assert plan.held == {0: None} and not plan.replica_mode
    assert plan.ended(0, lasted=5.0, now=5.0) == []
    assert plan.attempt(0) == 0 and plan.attempt(0) == 1  # the backoff of today's one stream
    assert plan.dial(0) == Dial(0, CP, None)
    assert plan.slots == [0]


def test_the_first_welcome_joins_every_other_replica_each_after_its_backoff() -> None:
    plan, actions = joined()
    assert actions == [Open(1, 0), Open(2, 0)]
    assert plan.held == {0: "r1"}
    assert plan.dial(1) == Dial(1, "r2:8444", "r2")
    assert plan.dial(2) == Dial(2, "r3:8444", "r3")
    assert hold(plan, 1, R2, [R1, R2, R3]) == (Landing.HOLD, [])
    assert hold(plan, 2, R3, [R1, R2, R3]) == (Landing.HOLD, [])
    assert plan.held == {0: "r1", 1: "r2", 2: "r3"}


def test_a_replica_that_appears_is_joined_and_one_that_is_gone_is_closed() -> None:
    plan, _ = joined(replicas=[R1, R2])
    hold(plan, 1, R2, [R1, R2])
    actions = plan.replicas_changed([R1, R2, R3], now=1.0)
    assert opened(actions) == [2] and plan.dial(2) == Dial(2, "r3:8444", "r3")
    actions = plan.replicas_changed([R1, R3], now=2.0)
    assert actions == [Close(1)]
    assert plan.closing == [1] and plan.held == {0: "r1"}
    # Closing, it still counts; once its requests finished and it ended, it is gone for good.
    assert plan.ended(1, lasted=3.0, now=5.0) == []
    assert plan.slots == [0, 2]


def test_a_replica_replaced_at_max_streams_is_joined_once_the_old_stream_closed() -> None:
    plan, _ = joined()
    hold(plan, 1, R2, [R1, R2, R3])
    hold(plan, 2, R3, [R1, R2, R3])
    actions = plan.replicas_changed([R1, R3, R4], now=1.0)
    # Never more than max_streams streams: r2's stream finishes its requests before r4 is dialed.
    assert actions == [Close(1)]
    actions = plan.ended(1, lasted=10.0, now=11.0)
    [new] = opened(actions)
    assert plan.dial(new) == Dial(new, "r4:8444", "r4")


def test_max_streams_caps_the_wanted_set_however_many_replicas_are_named() -> None:
    many = [r(f"r{i}", f"10.0.{i}.1:8444") for i in range(64)]
    plan, actions = joined(max_streams=3, replicas=many, first=many[40])
    assert len(opened(actions)) == 2 and len(plan.slots) == 3
    # The replica that welcomed us is kept; the others are the first ones named.
    assert plan.wanted() == ["r40", "r0", "r1"]


def test_max_streams_one_holds_only_the_first_replica() -> None:
    plan, actions = joined(max_streams=1)
    assert actions == [] and plan.wanted() == ["r1"]


def test_behind_a_load_balancer_a_landing_on_a_replica_held_is_a_duplicate_dialed_again_later() -> None:
    lb = [r("r1", ""), r("r2", ""), r("r3", "")]
    plan, actions = joined(replicas=lb, first=lb[0])
    assert opened(actions) == [1, 2]
    assert plan.attempt(1) == 0 and plan.attempt(2) == 0
    assert plan.dial(1) == Dial(1, CP, "r2")  # no address of its own: the configured one
    assert plan.dial(2) == Dial(2, CP, "r3")
    landing, actions = plan.welcomed(1, lb[0], lb, now=0.1)
    assert (landing, actions) == (Landing.DUPLICATE, [])
    assert plan.ended(1, lasted=0.01, now=0.1) == []
    assert plan.attempt(1) == 1  # its backoff went up: the next dial waits longer
    # The dial that landed on r2 while slot 1 looked for r3 is taken as it is.
    assert plan.welcomed(2, lb[1], lb, now=0.2) == (Landing.HOLD, [])
    assert plan.dial(1) == Dial(1, CP, "r3")
    assert plan.welcomed(1, lb[2], lb, now=0.3) == (Landing.HOLD, [])
    assert plan.held == {0: "r1", 1: "r3", 2: "r2"}


def test_one_address_named_under_many_ids_gets_one_stream() -> None:
    same = [r(f"r{i}", "10.0.0.9:8444") for i in range(64)]
    plan, actions = joined(replicas=same, first=same[0])
    assert actions == [] and plan.wanted() == ["r0"]


def test_a_nameless_welcome_among_replica_streams_is_unwanted() -> None:
    plan, _ = joined()
    plan.attempt(1)
    plan.dial(1)
    assert plan.welcomed(1, None, [], now=0.0) == (Landing.UNWANTED, [])
    assert plan.replica_mode and plan.held == {0: "r1"}


def test_a_landing_on_another_replica_than_dialed_is_taken_within_max_streams() -> None:
    plan, _ = joined(max_streams=2, replicas=[R1, R2, R3])
    assert plan.dial(1) == Dial(1, "r2:8444", "r2")
    assert plan.welcomed(1, R3, [R1, R2, R3], now=0.0) == (Landing.HOLD, [])
    assert plan.held == {0: "r1", 1: "r3"} and plan.wanted() == ["r1", "r3"]


def test_the_replica_that_welcomed_counts_as_live_though_its_list_omits_it() -> None:
    plan, actions = joined(replicas=[R2])
    assert plan.replicas == {"r1": "r1:8444", "r2": "r2:8444"} and opened(actions) == [1]


def test_the_newest_word_wins_whichever_stream_said_it() -> None:
    plan, _ = joined(replicas=[R1, R2])
    hold(plan, 1, R2, [R1, R2])
    plan.replicas_changed([R1, R2, R3], now=1.0)
    # A later welcome (slot 2 joins r3) names a set without r2: r2 goes.
    landing, actions = hold(plan, 2, R3, [R1, R3], now=2.0)
    assert landing is Landing.HOLD and actions == [Close(1)]


def test_a_stream_drained_by_its_replica_dials_that_replica_again() -> None:
    plan, _ = joined()
    hold(plan, 1, R2, [R1, R2, R3])
    hold(plan, 2, R3, [R1, R2, R3])
    assert plan.ended(1, lasted=100.0, now=100.0) == []
    assert plan.attempt(1) == 0  # it lasted: its backoff starts over
    assert plan.dial(1) == Dial(1, "r2:8444", "r2")


def test_while_no_stream_is_held_every_other_dial_goes_to_the_configured_address() -> None:
    plan, _ = joined(replicas=[R1, R2])
    hold(plan, 1, R2, [R1, R2])
    plan.ended(0, lasted=1.0, now=1.0)
    plan.ended(1, lasted=1.0, now=1.0)
    addresses = []
    for _ in range(4):
        plan.attempt(0)
        dial = plan.dial(0)
        assert dial is not None
        addresses.append(dial.address)
        plan.ended(0, lasted=0.0, now=1.0)
    assert set(addresses) == {CP, "r1:8444"}
    assert addresses[0] != addresses[1] and addresses[:2] == addresses[2:]


def test_a_set_that_names_no_replica_closes_every_stream_and_one_slot_learns_again() -> None:
    plan, _ = joined(replicas=[R1, R2])
    hold(plan, 1, R2, [R1, R2])
    actions = plan.replicas_changed([], now=1.0)
    assert sorted(closed(actions)) == [0, 1]
    [slot] = opened(actions)  # while r1's and r2's streams finish their requests
    assert plan.ended(0, lasted=1.0, now=2.0) == [] and plan.ended(1, lasted=1.0, now=2.0) == []
    plan.attempt(slot)
    assert plan.dial(slot) == Dial(slot, CP, None)


def test_a_welcome_without_a_replica_after_replicas_returns_to_one_stream() -> None:
    plan, _ = joined()
    plan.ended(0, lasted=1.0, now=1.0)  # r1 went, nothing is held; slots 1 and 2 are still seeking
    plan.attempt(0)
    plan.dial(0)
    landing, actions = plan.welcomed(0, None, [], now=2.0)
    assert landing is Landing.SINGLE and sorted(closed(actions)) == [1, 2]
    assert plan.slots == [0] and not plan.replica_mode


def test_a_set_that_flaps_opens_slots_further_up_the_backoff() -> None:
    plan, _ = joined(replicas=[R1])
    attempts = []
    for i in range(40):
        actions = plan.replicas_changed([R1, R2], now=i * 0.001)
        attempts += [a.attempt for a in actions if isinstance(a, Open)]
        plan.replicas_changed([R1], now=i * 0.001)
        assert len(plan.slots) <= 3
    assert attempts[:2] == [0, 0] and attempts[-1] >= 16  # Backoff: its cap
    assert plan.slots == [0]


def test_max_streams_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        StreamPlan(CP, 0)


# -- any sequence of lies keeps the rules --
_ids = st.sampled_from([f"r{i}" for i in range(6)])
_addresses = st.sampled_from(["", "a:1", "b:1", "c:1"])
_replica = st.builds(lambda rid, address: tunnel_pb2.Replica(replica_id=rid, agent_address=address), _ids, _addresses)
_set = st.lists(_replica, max_size=8, unique_by=lambda x: x.replica_id)
_step = st.one_of(
    st.tuples(st.just("welcome"), st.integers(0, 20), st.one_of(st.none(), _replica), _set),
    st.tuples(st.just("replicas"), _set),
    st.tuples(st.just("ended"), st.integers(0, 20), st.floats(0, 120)),
    st.tuples(st.just("dial"), st.integers(0, 20)),
)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4), st.lists(_step, max_size=60))
def test_no_sequence_of_events_breaks_the_rules(max_streams: int, steps: list[tuple[object, ...]]) -> None:
    plan = StreamPlan(CP, max_streams)
    plan.start()
    now = 0.0
    for step in steps:
        now += 0.01
        match step:
            case ("welcome", int(slot), replica, list(named)):
                if plan.dial(slot) is not None:
                    assert isinstance(replica, tunnel_pb2.Replica | None)
                    plan.welcomed(slot, replica, named, now)
            case ("replicas", list(named)):
                plan.replicas_changed(named, now)
            case ("ended", int(slot), float(lasted)):
                plan.ended(slot, lasted, now)
            case ("dial", int(slot)):
                plan.attempt(slot)
                plan.dial(slot)
        # Never more slots than max_streams, closing ones included; never two streams to one replica;
        # always a slot that can dial, unless every one is busy serving or closing.
        assert 1 <= len(plan.slots) <= max_streams
        held = [rid for rid in plan.held.values() if rid is not None]
        assert len(held) == len(set(held))
        assert len(plan.wanted()) <= max_streams
        if plan.replicas is None:
            assert len(plan.slots) == 1
