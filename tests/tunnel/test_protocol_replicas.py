"""The "replicas" capability of the tunnel protocol: the welcome names the replicas, frames follow changes."""

from __future__ import annotations

import pytest

from onprem.tunnel.errors import RemoteProtocolError
from onprem.tunnel.events import ReplicasChanged, StatusReceived, Welcomed
from onprem.tunnel.protocol import (
    MAX_IN_FLIGHT,
    MAX_REPLICAS,
    REPLICAS,
    AgentConnection,
    ControlFrame,
    ControlPlaneConnection,
)
from onprem.v1 import tunnel_pb2

R1 = tunnel_pb2.Replica(replica_id="r1", agent_address="10.0.0.1:8444")
R2 = tunnel_pb2.Replica(replica_id="r2", agent_address="10.0.0.2:8444")


def greet(*, offer: bool = True, name: bool = True) -> tuple[ControlPlaneConnection, AgentConnection, Welcomed]:
    cp, agent = ControlPlaneConnection(), AgentConnection()
    hello = agent.hello_frame(tunnel_pb2.Hello(agent_version="t", max_in_flight=4))
    if not offer:
        hello.hello.capabilities.remove(REPLICAS)
    cp.receive(hello)
    welcome = cp.welcome_frame(agent_id="a", group="g", session_id="s", replica=R1 if name else None,
                               replicas=[R1, R2] if name else [])
    [event] = agent.receive(welcome)
    assert isinstance(event, Welcomed)
    return cp, agent, event


def test_an_agent_offers_replicas_in_its_hello() -> None:
    assert REPLICAS in AgentConnection().hello_frame(tunnel_pb2.Hello()).hello.capabilities


def test_the_welcome_names_the_accepting_replica_and_every_live_one() -> None:
    _, agent, event = greet()
    assert event.welcome.replica == R1
    assert list(event.welcome.replicas) == [R1, R2]
    assert REPLICAS in event.welcome.capabilities and agent.replicas


def test_an_agent_that_did_not_offer_replicas_gets_none_and_no_replica_frames() -> None:
    cp, _, event = greet(offer=False)
    assert not event.welcome.HasField("replica") and not event.welcome.replicas
    assert REPLICAS not in event.welcome.capabilities
    assert cp.replicas_frame([R1]) is None


def test_a_control_plane_that_names_no_replica_does_not_agree_on_replicas() -> None:
    cp, agent, event = greet(name=False)
    assert REPLICAS not in event.welcome.capabilities
    assert not agent.replicas and cp.replicas_frame([R1]) is None


def test_a_replicas_frame_reaches_the_agent_as_the_new_set() -> None:
    cp, agent, _ = greet()
    frame = cp.replicas_frame([R2])
    assert frame is not None
    assert agent.receive(frame) == [ReplicasChanged((R2,))]


def test_a_replicas_frame_on_a_stream_that_did_not_agree_breaks_it() -> None:
    _, agent, _ = greet(offer=False)
    with pytest.raises(RemoteProtocolError, match="did not agree on replicas"):
        agent.receive(ControlFrame(replicas=tunnel_pb2.ReplicaSet(replicas=[R1])))


@pytest.mark.parametrize(("replicas", "why"), [
    ([tunnel_pb2.Replica(replica_id=f"r{i}") for i in range(MAX_REPLICAS + 1)], "the limit is 64"),
    ([tunnel_pb2.Replica(replica_id="")], "ids have 1 to 255 characters"),
    ([tunnel_pb2.Replica(replica_id="x" * 256)], "ids have 1 to 255 characters"),
    ([tunnel_pb2.Replica(replica_id="r", agent_address="h" * 256)], "an address of 256 characters"),
    ([R1, R1], "names replica 'r1' twice"),
], ids=["too-many", "empty-id", "long-id", "long-address", "twice"])
def test_a_lying_control_plane_cannot_name_impossible_replicas(replicas: list[tunnel_pb2.Replica], why: str) -> None:
    _, agent, _ = greet()
    with pytest.raises(RemoteProtocolError, match=why):
        agent.receive(ControlFrame(replicas=tunnel_pb2.ReplicaSet(replicas=replicas)))


def test_a_welcome_that_agrees_on_replicas_must_name_its_replica() -> None:
    cp, agent = ControlPlaneConnection(), AgentConnection()
    cp.receive(agent.hello_frame(tunnel_pb2.Hello(agent_version="t", max_in_flight=4)))
    welcome = cp.welcome_frame(agent_id="a", group="g", session_id="s", replica=R1, replicas=[R1])
    welcome.welcome.ClearField("replica")
    with pytest.raises(RemoteProtocolError, match="names no replica"):
        agent.receive(welcome)


def test_the_agents_load_over_all_its_streams_reaches_the_control_plane() -> None:
    cp, agent, _ = greet()
    [event] = cp.receive(agent.status(draining=False, in_flight=2, agent_in_flight=7))
    assert isinstance(event, StatusReceived) and event.status.agent_in_flight == 7


def test_an_agent_cannot_claim_more_load_than_an_agent_may_run() -> None:
    cp, agent, _ = greet()
    with pytest.raises(RemoteProtocolError, match="reports 10001 requests in flight"):
        cp.receive(agent.status(draining=False, in_flight=0, agent_in_flight=MAX_IN_FLIGHT + 1))


def test_an_agent_cannot_claim_to_hold_more_replicas_than_a_control_plane_may_have() -> None:
    cp, agent = ControlPlaneConnection(), AgentConnection()
    hello = agent.hello_frame(tunnel_pb2.Hello(agent_version="t", max_in_flight=4))
    hello.hello.held_replica_ids.extend(f"r{i}" for i in range(MAX_REPLICAS + 1))
    with pytest.raises(RemoteProtocolError, match="hello names 65 held replicas"):
        cp.receive(hello)


def test_an_agent_cannot_name_a_held_replica_with_an_empty_id() -> None:
    cp, agent = ControlPlaneConnection(), AgentConnection()
    hello = agent.hello_frame(tunnel_pb2.Hello(agent_version="t", max_in_flight=4))
    hello.hello.held_replica_ids.append("")
    with pytest.raises(RemoteProtocolError, match="ids of 1 to 255 characters"):
        cp.receive(hello)
