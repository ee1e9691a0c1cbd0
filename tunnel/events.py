"""What a tunnel `Connection` reports as it receives frames: one frozen dataclass per event.

The shells match on these (`match event: case ChunkReceived(rid): ...`); a
request's events come in the order its frames did.
"""

from __future__ import annotations

from dataclasses import dataclass

from onprem.tunnel.errors import Code
from onprem.v1 import tunnel_pb2

__all__ = [
    "CancelReceived", "ChunkReceived", "CreditGranted", "DataReceived", "DrainReceived", "Event", "FrameIgnored",
    "HelloReceived", "PingReceived", "PongReceived", "RequestEnded", "RequestStarted", "StatusReceived", "Welcomed",
]

@dataclass(frozen=True)
class HelloReceived:
    hello: tunnel_pb2.Hello


@dataclass(frozen=True)
class Welcomed:
    welcome: tunnel_pb2.Welcome


@dataclass(frozen=True)
class RequestStarted:
    request_id: int
    start: tunnel_pb2.RequestStart


@dataclass(frozen=True)
class DataReceived:
    request_id: int
    data: bytes
    end_of_data: bool


@dataclass(frozen=True)
class CancelReceived:
    request_id: int
    reason: str


@dataclass(frozen=True)
class ChunkReceived:
    request_id: int
    chunk: tunnel_pb2.ResponseChunk
    #: The chunk's serialized size: what consuming it gives back as credit.
    size: int


@dataclass(frozen=True)
class RequestEnded:
    request_id: int
    code: Code
    message: str
    reason: str
    field: str = ""
    #: Why the agent's own status was replaced by INTERNAL (AGENT_PROTOCOL_ERROR), for the log;
    #: empty when the status is the agent's.
    screened: str = ""


@dataclass(frozen=True)
class CreditGranted:
    """The peer granted credit for a request: a blocked sender may go on."""

    request_id: int
    size: int


@dataclass(frozen=True)
class PingReceived:
    """The shell answers it with `pong()`."""

    nonce: int


@dataclass(frozen=True)
class PongReceived:
    nonce: int


@dataclass(frozen=True)
class DrainReceived:
    drain: tunnel_pb2.Drain


@dataclass(frozen=True)
class ReplicasChanged:
    """The control plane's live replicas are now these (the agent holds a stream to each)."""

    replicas: tuple[tunnel_pb2.Replica, ...]


@dataclass(frozen=True)
class StatusReceived:
    status: tunnel_pb2.AgentStatus


@dataclass(frozen=True)
class FrameIgnored:
    """A frame for a request that already ended (e.g. chunks racing a cancel)."""

    request_id: int
    why: str


Event = (
    HelloReceived | Welcomed | RequestStarted | DataReceived | CancelReceived | ChunkReceived
    | RequestEnded | CreditGranted | PingReceived | PongReceived | DrainReceived | StatusReceived
    | ReplicasChanged | FrameIgnored
)
