"""The tunnel protocol, free of I/O: frames in, events out (as h11 and h2 are).

`Connection` is one end of one agent stream, and its `role` says which: the
same state machine serves the control plane and the agent. `receive` turns
the peer's frames into events (`tunnel.events`) through one dispatch table
per role, and every request moves by the transition table of `tunnel.state`,
whichever end is asking; the role's subclass (`ControlPlaneConnection`,
`AgentConnection`) adds the frames that end may send. The rules checked on
the way: handshake first, request ids that only increase, per-request credit
in each direction, chunk size limits, one `end` per request, and what a
peer may say about itself (`tunnel.budget` has what it may make us do).

Blame goes to one side. A frame the peer may not send raises
`RemoteProtocolError`, and the error sticks: every later `receive` raises
too, since nothing after a broken frame can be trusted; the shell closes the
stream. Sending what we may not raises `LocalProtocolError` (a bug of ours),
and that sticks the same way. The asyncio shell (`tunnel.shell`) owns the
stream, the tasks and the clocks; tests drive this module with no network.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

from onprem.tunnel import idempotency, kinds
from onprem.tunnel.errors import Code, LocalProtocolError, ProtocolError, RemoteProtocolError
from onprem.tunnel.events import (
    CancelReceived,
    ChunkReceived,
    CreditGranted,
    DataReceived,
    DrainReceived,
    Event,
    FrameIgnored,
    HelloReceived,
    PingReceived,
    PongReceived,
    ReplicasChanged,
    RequestEnded,
    RequestStarted,
    StatusReceived,
    Welcomed,
)
from onprem.tunnel.flow import ReceiveWindow, SendWindow
from onprem.tunnel.state import Caller, RequestEvent, Role, Worker, next_caller_state, next_worker_state
from onprem.v1 import profiles_pb2, tunnel_pb2

__all__ = [
    "AGENT_CODES",
    "CAPABILITIES",
    "FRAME_BATCH",
    "IDEMPOTENCY",
    "MAX_END_MESSAGE",
    "MAX_IN_FLIGHT",
    "MAX_PROFILES",
    "MAX_REPLICAS",
    "PROTOCOL_REVISION",
    "REPLICAS",
    "AgentConnection",
    "AgentFrame",
    "CancelReceived",
    "ChunkReceived",
    "Connection",
    "ControlFrame",
    "ControlPlaneConnection",
    "CreditGranted",
    "DataReceived",
    "DrainReceived",
    "Event",
    "FrameIgnored",
    "HelloReceived",
    "Limits",
    "PingReceived",
    "PongReceived",
    "RequestEnded",
    "RequestStarted",
    "Role",
    "StatusReceived",
    "Welcomed",
    "check_profiles",
    "screen_end",
]

PROTOCOL_REVISION = 1
SUPPORTED_REVISIONS = (1,)
#: Optional features, offered in Hello and agreed in Welcome.
FRAME_BATCH = "frame-batch"
#: The control plane runs as replicas: the welcome names them, `replicas` frames follow changes.
REPLICAS = "replicas"
#: The agent honours `RequestStart.idempotency` (`tunnel.idempotency`): keyed writes may go to it, and
#: be retried on it. An agent without it would ignore the key, so the control plane sends it none.
IDEMPOTENCY = idempotency.CAPABILITY
CAPABILITIES = (FRAME_BATCH, REPLICAS, IDEMPOTENCY)

AgentFrame = tunnel_pb2.ConnectRequest
ControlFrame = tunnel_pb2.ConnectResponse

#: The most profiles one agent may offer (Hello, or a status after a reload).
MAX_PROFILES = 1024
#: The longest profile name, in characters.
MAX_PROFILE_NAME = 255
#: The most requests an agent may ask to run at once (its config allows no more either).
MAX_IN_FLIGHT = 10_000
#: The most replicas a control plane may name to an agent, and the longest id or address of one.
MAX_REPLICAS = 64
MAX_REPLICA_FIELD = 255

#: The codes with which an agent may end a request (tunnel.proto lists them). An agent speaks for
#: its own work only: it cannot say the caller is unauthenticated (that is the control plane's
#: word), and UNKNOWN explains nothing. Any other code reaches the operator as INTERNAL.
AGENT_CODES = frozenset({
    Code.OK, Code.CANCELLED, Code.INVALID_ARGUMENT, Code.DEADLINE_EXCEEDED, Code.NOT_FOUND,
    Code.ALREADY_EXISTS, Code.PERMISSION_DENIED, Code.RESOURCE_EXHAUSTED, Code.FAILED_PRECONDITION,
    Code.ABORTED, Code.UNIMPLEMENTED, Code.INTERNAL, Code.UNAVAILABLE,
})
#: Reasons only the control plane gives: they steer its retries and explanations.
CONTROL_PLANE_REASONS = frozenset({"AGENT_LOST", "AGENT_PROTOCOL_ERROR"})
#: What the operator sees of an agent's status that was screened out.
AGENT_PROTOCOL_ERROR = "AGENT_PROTOCOL_ERROR"
#: The longest message of an agent's final status that reaches the operator, in characters.
MAX_END_MESSAGE = 2048
_REASON = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


@dataclass(frozen=True)
class Limits:
    """What both ends agree on in Hello/Welcome."""

    #: Credit per request for result chunks (agent → control plane), bytes.
    response_window_bytes: int = 4 * 1024 * 1024
    #: Credit per request for request data (control plane → agent), bytes.
    request_window_bytes: int = 4 * 1024 * 1024
    #: The largest chunk or data payload, bytes.
    max_chunk_bytes: int = 256 * 1024
    #: How often a quiet side pings; three silent intervals end the stream.
    heartbeat_interval: timedelta = timedelta(seconds=10)

    def __post_init__(self) -> None:
        # With chunks of at most half a window, a fully consumed request
        # always has credit for one more chunk, so credit can never deadlock.
        for window in (self.response_window_bytes, self.request_window_bytes):
            if self.max_chunk_bytes * 2 > window:
                raise ValueError("max_chunk_bytes must be at most half of each window")
        if self.heartbeat_interval <= timedelta(0):
            raise ValueError("heartbeat_interval must be positive")


# --- checks of what a peer says ---------------------------------------------


def check_profiles(profiles: Sequence[profiles_pb2.Profile], where: str) -> None:
    """Refuse a profile list that no agent config could produce; raises `RemoteProtocolError`."""
    if len(profiles) > MAX_PROFILES:
        raise RemoteProtocolError(f"{where} offers {len(profiles)} profiles; the limit is {MAX_PROFILES}")
    for profile in profiles:
        if not profile.name or len(profile.name) > MAX_PROFILE_NAME:
            raise RemoteProtocolError(
                f"{where} offers a profile named {profile.name[:40]!r}; names have 1 to {MAX_PROFILE_NAME} characters"
            )


def check_replicas(replicas: Sequence[tunnel_pb2.Replica], where: str) -> None:
    """Refuse a replica list no control plane could mean; raises `RemoteProtocolError`."""
    if len(replicas) > MAX_REPLICAS:
        raise RemoteProtocolError(f"{where} names {len(replicas)} replicas; the limit is {MAX_REPLICAS}")
    seen: set[str] = set()
    for replica in replicas:
        if not replica.replica_id or len(replica.replica_id) > MAX_REPLICA_FIELD:
            raise RemoteProtocolError(f"{where} names a replica with the id {replica.replica_id[:40]!r}; ids have "
                                      f"1 to {MAX_REPLICA_FIELD} characters")
        if len(replica.agent_address) > MAX_REPLICA_FIELD:
            raise RemoteProtocolError(f"{where} names replica {replica.replica_id!r} with an address of "
                                      f"{len(replica.agent_address)} characters; the limit is {MAX_REPLICA_FIELD}")
        if replica.replica_id in seen:
            raise RemoteProtocolError(f"{where} names replica {replica.replica_id!r} twice")
        seen.add(replica.replica_id)


def _check_grant(window: SendWindow, grant: int, size: int, rid: int) -> None:
    # A receiver gives back only what it consumed, so credit never exceeds the window: a larger or
    # empty grant is a peer playing with credit, not a race.
    if grant <= 0 or window.credit + grant > size:
        raise RemoteProtocolError(
            f"window update of {grant} bytes for request {rid} would give {window.credit + grant} bytes of "
            f"credit; the window is {size}"
        )


def screen_end(rid: int, end: tunnel_pb2.ResponseEnd) -> RequestEnded:
    """An agent's final status as the operator may see it.

    An agent speaks for its own work only: a code outside `AGENT_CODES`, a reason that only the
    control plane gives or that is not UPPER_SNAKE_CASE becomes INTERNAL with reason
    AGENT_PROTOCOL_ERROR, and `screened` says what the agent sent, for the log.
    """
    message = end.message if len(end.message) <= MAX_END_MESSAGE else end.message[:MAX_END_MESSAGE] + "…"
    why = ""
    try:
        code = Code(end.code)
    except ValueError:
        code, why = Code.INTERNAL, f"status code {end.code}, which gRPC does not define"
    if not why and code not in AGENT_CODES:
        why = f"status {code.name}, which agents may not give"
    elif not why and end.reason and (end.reason in CONTROL_PLANE_REASONS or not _REASON.fullmatch(end.reason)):
        why = f"reason {end.reason[:80]!r}, which agents may not give"
    if why:
        return RequestEnded(
            rid, Code.INTERNAL,
            "the agent answered with a status it may not give; the control plane's log names the agent",
            AGENT_PROTOCOL_ERROR, "", why,
        )
    return RequestEnded(rid, code, message, end.reason, end.field[:200])


# --- one end of a stream ---------------------------------------------------------

OutFrame = TypeVar("OutFrame", AgentFrame, ControlFrame)
_AnyFrame = AgentFrame | ControlFrame


@dataclass
class _Request:
    """One open request, as either end tracks it."""

    caller: Caller
    worker: Worker
    #: What the peer may still send us for this request (chunks at the control plane, data at the agent).
    inbound: ReceiveWindow
    #: What we may still send (data from the control plane, chunks from the agent) ...
    outbound: SendWindow
    #: ... out of a window of this size.
    outbound_window: int
    #: The `ResponseChunk.body` its answer must use (tracked at the control plane; None: not checked).
    body: str | None = None


#: The frame each role must receive first.
_HANDSHAKE = {Role.CONTROL_PLANE: "hello", Role.AGENT: "welcome"}
#: The payload each role receives under a request (the other sends it), and its limit's name.
_INBOUND_PAYLOAD = {Role.CONTROL_PLANE: "chunk", Role.AGENT: "data"}


class Connection(Generic[OutFrame]):
    """One end of one tunnel stream; `role` says which. Use the role's subclass to send."""

    #: The frame type this end sends, and its batch.
    _frame: Callable[..., OutFrame]
    _batch: Callable[..., object]
    _batch_field = "batch"

    def __init__(self, role: Role, limits: Limits | None = None, *,
                 request_window_bytes: int = 4 * 1024 * 1024) -> None:
        self.role = role
        self.limits = limits or Limits()
        #: The Hello of the stream (the agent's), once sent or received.
        self.hello: tunnel_pb2.Hello | None = None
        #: The Welcome of the stream (the control plane's), once sent or received.
        self.welcome: tunnel_pb2.Welcome | None = None
        #: Whether both sides agreed to batch frames (FRAME_BATCH).
        self.batching = False
        #: Whether both sides agreed on replicas (REPLICAS): offered by the agent, kept by the welcome.
        self.replicas = False
        #: The agent's credit window for each request's data: its own at the agent, learned from Hello here.
        self.request_window_bytes = request_window_bytes
        self._requests: dict[int, _Request] = {}
        #: The highest request id started on this stream.
        self._last_id = 0
        #: The error that broke the stream, once one did: it sticks.
        self._broken: ProtocolError | None = None

    # -- state --
    @property
    def peer(self) -> str:
        return self.role.peer.value

    @property
    def handshaken(self) -> bool:
        return self.hello is not None and self.welcome is not None

    @property
    def max_chunk_bytes(self) -> int:
        """The largest chunk or data payload; raises LocalProtocolError before the handshake."""
        if self.welcome is None:
            raise LocalProtocolError("not welcomed yet")
        return self.welcome.max_chunk_bytes

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def is_open(self, rid: int) -> bool:
        return rid in self._requests

    def open_request_ids(self) -> list[int]:
        return list(self._requests)

    def credit(self, rid: int) -> int | None:
        """Bytes of payload we may send for `rid` now; None once we may send none again (it ended, or
        the control plane cancelled it)."""
        request = self._requests.get(rid)
        if request is None or (self.role is Role.CONTROL_PLANE and request.caller is Caller.CANCELLED):
            return None
        return request.outbound.credit

    # -- receiving --
    def receive(self, frame: _AnyFrame) -> list[Event]:
        """The events of one frame from the peer.

        Raises RemoteProtocolError when the peer broke the protocol, and again on every later call.
        """
        if self._broken is not None:
            raise RemoteProtocolError(f"the stream is broken: {self._broken}")
        try:
            return self._receive(frame)
        except RemoteProtocolError as exc:
            self._broken = exc
            raise

    def _receive(self, frame: _AnyFrame) -> list[Event]:
        kind = frame.WhichOneof("frame")
        first = _HANDSHAKE[self.role]
        greeted = (self.hello if self.role is Role.CONTROL_PLANE else self.welcome) is not None
        if not greeted:
            if kind != first or frame.request_id != 0:
                raise RemoteProtocolError(f"the first frame must be {first}, got {kind or 'an empty frame'}")
        elif kind == first:
            raise RemoteProtocolError(f"{first} sent twice")
        if kind is None:
            raise RemoteProtocolError("empty frame")
        handler = _RECEIVE[self.role].get(kind)
        if handler is None:
            raise RemoteProtocolError(f"unexpected {kind} frame from {self.peer}")
        return handler(self, frame)

    def _on_batch(self, frame: _AnyFrame) -> list[Event]:
        if not self.batching:
            raise RemoteProtocolError("a frame batch, which was not agreed in the handshake")
        events: list[Event] = []
        for inner in frame.batch.frames:
            inner_kind = inner.WhichOneof("frame")
            if inner_kind in ("batch", _HANDSHAKE[self.role]):
                raise RemoteProtocolError(f"a {inner_kind} frame inside a batch")
            events.extend(self._receive(inner))
        return events

    def _on_ping(self, frame: _AnyFrame) -> list[Event]:
        return [PingReceived(frame.ping.nonce)]

    def _on_pong(self, frame: _AnyFrame) -> list[Event]:
        return [PongReceived(frame.pong.nonce)]

    def _request(self, frame: _AnyFrame, kind: str) -> _Request | None:
        """The open request a frame names; None when it ended on our side and the frame raced that."""
        rid = frame.request_id
        if rid == 0 or rid > self._last_id:
            raise RemoteProtocolError(f"{kind} frame for request {rid}, which was never started")
        request = self._requests.get(rid)
        if request is None and self.role is Role.CONTROL_PLANE:
            # Only the agent's own `end` closes a request here, so nothing of it can be in flight.
            raise RemoteProtocolError(f"{kind} frame for request {rid} after the agent ended it")
        return request

    def _on_window_update(self, frame: _AnyFrame) -> list[Event]:
        rid, grant = frame.request_id, frame.window_update.bytes
        request = self._request(frame, "window_update")
        if request is None:
            return [FrameIgnored(rid, "window_update after the request ended")]
        # A receiver gives back only what it consumed, so credit never exceeds the window: a larger or
        # empty grant is a peer playing with credit, not a race.
        if grant <= 0 or request.outbound.credit + grant > request.outbound_window:
            raise RemoteProtocolError(
                f"window update of {grant} bytes for request {rid} would give {request.outbound.credit + grant} "
                f"bytes of credit; the window is {request.outbound_window}")
        request.outbound.grant(grant)
        return [CreditGranted(rid, grant)]

    def _payload_size(self, rid: int, size: int) -> None:
        # The control plane's own limits hold from its first frame; the agent's come with the welcome.
        limit = self.limits.max_chunk_bytes if self.role is Role.CONTROL_PLANE else self.max_chunk_bytes
        if size > limit:
            which = "the limit" if self.role is Role.CONTROL_PLANE else "the chunk limit"
            raise RemoteProtocolError(f"{_INBOUND_PAYLOAD[self.role]} of {size} bytes exceeds {which} of {limit}")

    # -- the control plane receives --
    def _on_hello(self, frame: AgentFrame) -> list[Event]:
        hello = frame.hello
        common = set(SUPPORTED_REVISIONS) & set(hello.protocol_revisions)
        if not common:
            raise RemoteProtocolError(
                f"no common protocol revision: agent speaks {list(hello.protocol_revisions)}, "
                f"control plane speaks {list(SUPPORTED_REVISIONS)}")
        window = hello.request_window_bytes
        if window < 2 * self.limits.max_chunk_bytes:
            raise RemoteProtocolError(
                f"request window {window} is below twice the chunk size {self.limits.max_chunk_bytes}")
        if hello.max_in_flight > MAX_IN_FLIGHT:
            raise RemoteProtocolError(
                f"hello asks to run {hello.max_in_flight} requests at once; the limit is {MAX_IN_FLIGHT}")
        check_profiles(hello.profiles, "hello")
        if len(hello.held_replica_ids) > MAX_REPLICAS or any(
                not r or len(r) > MAX_REPLICA_FIELD for r in hello.held_replica_ids):
            raise RemoteProtocolError(f"hello names {len(hello.held_replica_ids)} held replicas; at most "
                                      f"{MAX_REPLICAS}, with ids of 1 to {MAX_REPLICA_FIELD} characters")
        self.hello = hello
        self.request_window_bytes = window
        self.batching = FRAME_BATCH in hello.capabilities
        self.replicas = REPLICAS in hello.capabilities
        return [HelloReceived(hello)]

    def _on_status(self, frame: AgentFrame) -> list[Event]:
        if frame.status.agent_in_flight > MAX_IN_FLIGHT:
            raise RemoteProtocolError(f"status reports {frame.status.agent_in_flight} requests in flight; an agent "
                                      f"runs at most {MAX_IN_FLIGHT}")
        if frame.status.profiles_changed:
            check_profiles(frame.status.profiles, "status")
        if len(frame.status.profile_health) > MAX_PROFILES:
            raise RemoteProtocolError(f"status reports the health of {len(frame.status.profile_health)} profiles; "
                                      f"the limit is {MAX_PROFILES}")
        return [StatusReceived(frame.status)]

    def _on_chunk(self, frame: AgentFrame) -> list[Event]:
        rid = frame.request_id
        request = self._request(frame, "chunk")
        assert request is not None  # the control plane never ignores: see _request
        size = frame.chunk.ByteSize()
        self._payload_size(rid, size)
        if request.body is not None and frame.chunk.WhichOneof("body") != request.body:
            raise RemoteProtocolError(f"chunk for request {rid} carries {frame.chunk.WhichOneof('body') or 'no body'}; "
                                      f"the request's answer is {request.body}")
        request.inbound.receive(size)
        if request.caller is Caller.CANCELLED:
            return [FrameIgnored(rid, "chunk after cancel")]
        return [ChunkReceived(rid, frame.chunk, size)]

    def _on_end(self, frame: AgentFrame) -> list[Event]:
        rid = frame.request_id
        self._request(frame, "end")
        del self._requests[rid]
        return [screen_end(rid, frame.end)]

    # -- the agent receives --
    def _on_welcome(self, frame: ControlFrame) -> list[Event]:
        welcome = frame.welcome
        if welcome.protocol_revision not in SUPPORTED_REVISIONS:
            raise RemoteProtocolError(f"control plane chose revision {welcome.protocol_revision}")
        if welcome.max_chunk_bytes == 0 or welcome.max_chunk_bytes * 2 > welcome.response_window_bytes:
            raise RemoteProtocolError("welcome: max_chunk_bytes must be positive and at most half the window")
        if REPLICAS in welcome.capabilities:
            if not welcome.HasField("replica"):
                raise RemoteProtocolError("welcome agreed on replicas but names no replica")
            check_replicas([welcome.replica], "welcome")
            check_replicas(welcome.replicas, "welcome")
        self.welcome = welcome
        self.batching = FRAME_BATCH in welcome.capabilities
        self.replicas = REPLICAS in welcome.capabilities
        return [Welcomed(welcome)]

    def _on_replicas(self, frame: ControlFrame) -> list[Event]:
        if not self.replicas:
            raise RemoteProtocolError("a replicas frame, but the stream did not agree on replicas")
        check_replicas(frame.replicas.replicas, "replicas frame")
        return [ReplicasChanged(tuple(frame.replicas.replicas))]

    def _on_drain(self, frame: ControlFrame) -> list[Event]:
        return [DrainReceived(frame.drain)]

    def _on_start(self, frame: ControlFrame) -> list[Event]:
        rid, start = frame.request_id, frame.start
        if rid <= self._last_id:
            raise RemoteProtocolError(f"request id {rid} is not above the last one, {self._last_id}")
        assert self.welcome is not None
        self._open(rid, has_body=start.has_body, inbound=self.request_window_bytes,
                   outbound=self.welcome.response_window_bytes)
        return [RequestStarted(rid, start)]

    def _on_data(self, frame: ControlFrame) -> list[Event]:
        rid, data = frame.request_id, frame.data
        request = self._request(frame, "data")
        if request is None:
            return [FrameIgnored(rid, "data after the request ended")]
        self._payload_size(rid, len(data.data))
        event = RequestEvent.LAST_DATA if data.end_of_data else RequestEvent.DATA
        state = next_caller_state(request.caller, event)
        if state is None:
            raise RemoteProtocolError(f"data for request {rid}, which takes no (more) data")
        request.inbound.receive(len(data.data))
        request.caller = state
        return [DataReceived(rid, data.data, data.end_of_data)]

    def _on_cancel(self, frame: ControlFrame) -> list[Event]:
        rid = frame.request_id
        request = self._request(frame, "cancel")
        if request is None:
            return [FrameIgnored(rid, "cancel after the request ended")]
        state = next_caller_state(request.caller, RequestEvent.CANCEL)
        if state is None:
            raise RemoteProtocolError(f"cancel for request {rid}, which was already cancelled")
        request.caller = state
        return [CancelReceived(rid, frame.cancel.reason)]

    # -- sending --
    def _open(self, rid: int, *, has_body: bool, inbound: int, outbound: int) -> None:
        self._last_id = rid
        self._requests[rid] = _Request(
            caller=Caller.SENDING_BODY if has_body else Caller.BODY_DONE, worker=Worker.RUNNING,
            inbound=ReceiveWindow(inbound), outbound=SendWindow(outbound), outbound_window=outbound)

    def _sending(self) -> None:
        if self._broken is not None:
            raise LocalProtocolError(f"the stream is broken: {self._broken}")

    def _local(self, rid: int, what: str) -> _Request:
        """The open request we are about to send `what` for; raises LocalProtocolError."""
        self._sending()
        request = self._requests.get(rid)
        if request is None:
            raise self._fail(LocalProtocolError(f"{what} for request {rid}, which is not open"))
        return request

    def _fail(self, error: LocalProtocolError) -> LocalProtocolError:
        self._broken = error
        return error

    def consumed(self, rid: int, size: int) -> OutFrame | None:
        """Our consumer took `size` bytes of `rid`'s payload: the credit frame to send now, if any."""
        request = self._requests.get(rid)
        if request is None:
            return None
        grant = request.inbound.consume(size)
        if not grant:
            return None
        return self._frame(request_id=rid, window_update=tunnel_pb2.WindowUpdate(bytes=grant))

    @classmethod
    def batch(cls, frames: list[OutFrame]) -> OutFrame:
        return cls._frame(batch=cls._batch(frames=frames))

    @classmethod
    def ping(cls, nonce: int) -> OutFrame:
        return cls._frame(ping=tunnel_pb2.Ping(nonce=nonce))

    @classmethod
    def pong(cls, nonce: int) -> OutFrame:
        return cls._frame(pong=tunnel_pb2.Pong(nonce=nonce))


# Each role's handlers take the frame type its peer sends; `_receive` only calls them for that role.
_Handler = Callable[[Any, Any], list[Event]]

#: Which frames each role receives, and what handles them.
_RECEIVE: dict[Role, dict[str, _Handler]] = {
    Role.CONTROL_PLANE: {
        "hello": Connection._on_hello,
        "chunk": Connection._on_chunk,
        "end": Connection._on_end,
        "window_update": Connection._on_window_update,
        "ping": Connection._on_ping,
        "pong": Connection._on_pong,
        "status": Connection._on_status,
        "batch": Connection._on_batch,
    },
    Role.AGENT: {
        "welcome": Connection._on_welcome,
        "start": Connection._on_start,
        "data": Connection._on_data,
        "cancel": Connection._on_cancel,
        "window_update": Connection._on_window_update,
        "ping": Connection._on_ping,
        "pong": Connection._on_pong,
        "drain": Connection._on_drain,
        "replicas": Connection._on_replicas,
        "batch": Connection._on_batch,
    },
}


class ControlPlaneConnection(Connection[ControlFrame]):
    """The control plane's end of one agent stream: it starts requests, sends their bodies and cancels them."""

    _frame = ControlFrame
    _batch = tunnel_pb2.ControlFrameBatch

    def __init__(self, limits: Limits | None = None) -> None:
        super().__init__(Role.CONTROL_PLANE, limits)
        #: The revision this stream's welcome chose; 0 before it.
        self.protocol_revision = 0

    def welcome_frame(self, *, agent_id: str, group: str, session_id: str,
                      replica: tunnel_pb2.Replica | None = None,
                      replicas: Sequence[tunnel_pb2.Replica] = ()) -> ControlFrame:
        """The answer to the agent's hello; raises LocalProtocolError before it.

        `replica` (this one) and `replicas` (every live one) go to an agent that offered the
        "replicas" capability; an agent that did not gets neither, and no replicas frames later.
        """
        self._sending()
        if self.hello is None:
            raise self._fail(LocalProtocolError("welcome before hello"))
        # The highest revision both speak: an agent a release ahead or behind still meets us on one.
        self.protocol_revision = max(set(SUPPORTED_REVISIONS) & set(self.hello.protocol_revisions))
        welcome = tunnel_pb2.Welcome(
            protocol_revision=self.protocol_revision, agent_id=agent_id, group=group, session_id=session_id,
            response_window_bytes=self.limits.response_window_bytes, max_chunk_bytes=self.limits.max_chunk_bytes,
            capabilities=[c for c in CAPABILITIES if c in self.hello.capabilities],
        )
        welcome.heartbeat_interval.FromTimedelta(self.limits.heartbeat_interval)
        if replica is not None and self.replicas:
            welcome.replica.CopyFrom(replica)
            welcome.replicas.extend(replicas)
        else:
            # A control plane that names no replica has not agreed on replicas, whatever the agent offers.
            if REPLICAS in welcome.capabilities:
                welcome.capabilities.remove(REPLICAS)
            self.replicas = False
        self.welcome = welcome
        return ControlFrame(welcome=welcome)

    def replicas_frame(self, replicas: Sequence[tunnel_pb2.Replica]) -> ControlFrame | None:
        """The frame that tells the agent the live replicas now; None if the stream did not agree on them."""
        if not self.replicas or self._broken is not None:
            return None
        return ControlFrame(replicas=tunnel_pb2.ReplicaSet(replicas=list(replicas)))

    def start_request(self, start: tunnel_pb2.RequestStart) -> tuple[int, ControlFrame]:
        """A new request's id and frame; raises LocalProtocolError before the handshake."""
        self._sending()
        if self.hello is None:
            raise self._fail(LocalProtocolError("request before hello"))
        rid = self._last_id + 1
        self._open(rid, has_body=start.has_body, inbound=self.limits.response_window_bytes,
                   outbound=self.request_window_bytes)
        self._requests[rid].body = kinds.expected_body(start)
        return rid, ControlFrame(request_id=rid, start=start)

    def send_data(self, rid: int, data: bytes, *, end_of_data: bool) -> ControlFrame:
        """Part of `rid`'s body; raises LocalProtocolError past its credit, its body's end, a cancel or
        the chunk limit."""
        request = self._local(rid, "data")
        state = next_caller_state(request.caller, RequestEvent.LAST_DATA if end_of_data else RequestEvent.DATA)
        if state is None:
            raise self._fail(LocalProtocolError(f"request {rid} takes no (more) data: it has {request.caller.value}"))
        if len(data) > self.limits.max_chunk_bytes:
            raise self._fail(LocalProtocolError(f"data of {len(data)} bytes exceeds the chunk limit"))
        request.outbound.spend(len(data))
        request.caller = state
        return ControlFrame(request_id=rid, data=tunnel_pb2.RequestData(data=data, end_of_data=end_of_data))

    def cancel(self, rid: int, reason: str) -> ControlFrame | None:
        """Cancel an open request; None when it already ended or was cancelled."""
        request = self._requests.get(rid)
        if request is None or self._broken is not None:
            return None
        state = next_caller_state(request.caller, RequestEvent.CANCEL)
        if state is None:
            return None
        request.caller = state
        return ControlFrame(request_id=rid, cancel=tunnel_pb2.Cancel(reason=reason))

    def drain(self, reason: str, grace: timedelta, *, exit_after: bool = False) -> ControlFrame:
        drain = tunnel_pb2.Drain(reason=reason, exit_after=exit_after)
        drain.grace_period.FromTimedelta(grace)
        return ControlFrame(drain=drain)


class AgentConnection(Connection[AgentFrame]):
    """The agent's end of its stream: it runs requests, sends their chunks and ends each once."""

    _frame = AgentFrame
    _batch = tunnel_pb2.AgentFrameBatch

    def __init__(self, request_window_bytes: int = 4 * 1024 * 1024) -> None:
        super().__init__(Role.AGENT, request_window_bytes=request_window_bytes)

    def hello_frame(self, hello: tunnel_pb2.Hello) -> AgentFrame:
        """`hello`, completed with what this end speaks, as the stream's first frame."""
        hello.protocol_revisions[:] = list(SUPPORTED_REVISIONS)
        hello.request_window_bytes = self.request_window_bytes
        hello.capabilities[:] = list(CAPABILITIES)
        self.hello = hello
        return AgentFrame(hello=hello)

    def send_chunk(self, rid: int, chunk: tunnel_pb2.ResponseChunk, size: int | None = None) -> AgentFrame:
        """Part of `rid`'s result; raises LocalProtocolError past its credit or the chunk limit."""
        request = self._local(rid, "chunk")
        size = chunk.ByteSize() if size is None else size
        if size > self.max_chunk_bytes:
            raise self._fail(LocalProtocolError(f"chunk of {size} bytes exceeds the limit of {self.max_chunk_bytes}"))
        request.outbound.spend(size)
        return AgentFrame(request_id=rid, chunk=chunk)

    def end(self, rid: int, code: Code, message: str = "", reason: str = "", field: str = "") -> AgentFrame:
        """`rid`'s final status; raises LocalProtocolError when it is not open (ended already)."""
        request = self._local(rid, "end")
        if next_worker_state(request.worker, RequestEvent.END) is None:
            raise self._fail(LocalProtocolError(f"end for request {rid}, which has {request.worker.value}"))
        del self._requests[rid]
        # The control plane shows at most MAX_END_MESSAGE characters; a message that quotes a caller's
        # multi-megabyte input must not make a frame past the stream's message limit.
        if len(message) > MAX_END_MESSAGE:
            message = message[:MAX_END_MESSAGE] + "…"
        return AgentFrame(request_id=rid, end=tunnel_pb2.ResponseEnd(
            code=int(code), message=message, reason=reason[:64], field=field[:200]))

    @staticmethod
    def status(*, draining: bool, in_flight: int, agent_in_flight: int = 0) -> AgentFrame:
        """A status frame: this stream's requests, and (with replicas) the agent's over all its streams."""
        return AgentFrame(status=tunnel_pb2.AgentStatus(draining=draining, in_flight=in_flight,
                                                        agent_in_flight=agent_in_flight))
