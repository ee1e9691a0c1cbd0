"""The tunnel protocol's state, free of I/O: frames in, events out.

`ControlPlaneConnection` is the control plane's end of one agent stream and
`AgentConnection` the agent's. Each turns received frames into events
(`receive`) and builds the frames to send (`start_request`, `send_chunk`,
...), checking the rules of `onprem.v1.AgentTunnel` on the way: handshake
first, request ids that only increase, per-request credit in each direction,
chunk size limits, one `end` per request. The asyncio shells in
`control_plane.sessions` and `agent.session` own the stream, the tasks and
the clocks; tests drive these classes directly, with no network.

A peer's mistake in a frame that names a request the protocol can pin down
ends only that request; a mistake that breaks the stream as a whole
(handshake, overrun of credit, ids out of order) raises `RemoteProtocolError`
and the shell closes the stream.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from onprem.v1 import profiles_pb2, tunnel_pb2
from tunnel.errors import Code, LocalProtocolError, RemoteProtocolError
from tunnel.flow import ReceiveWindow, SendWindow

PROTOCOL_REVISION = 1
SUPPORTED_REVISIONS = (1,)
#: Optional features, offered in Hello and agreed in Welcome.
FRAME_BATCH = "frame-batch"
CAPABILITIES = (FRAME_BATCH,)

AgentFrame = tunnel_pb2.ConnectRequest
ControlFrame = tunnel_pb2.ConnectResponse

#: The most profiles one agent may offer (Hello, or a status after a reload).
MAX_PROFILES = 1024
#: The longest profile name, in characters.
MAX_PROFILE_NAME = 255
#: The most requests an agent may ask to run at once (its config allows no more either).
MAX_IN_FLIGHT = 10_000

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


# --- events -----------------------------------------------------------------


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
    | FrameIgnored
)


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


# --- the control plane's end ------------------------------------------------


@dataclass
class _OutgoingRequest:
    """A request the control plane sent, as the control plane tracks it."""

    chunks: ReceiveWindow
    data: SendWindow
    has_body: bool
    body_done: bool = False
    cancelled: bool = False


@dataclass
class ControlPlaneConnection:
    """The control plane's end of one agent stream."""

    limits: Limits = field(default_factory=Limits)
    hello: tunnel_pb2.Hello | None = None
    #: Whether both sides agreed to batch frames (FRAME_BATCH).
    batching: bool = False
    _next_id: int = 1
    _requests: dict[int, _OutgoingRequest] = field(default_factory=dict)
    #: What the agent granted per request for request data, before we learn
    #: it from Hello (then fixed).
    _request_window: int = 0

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def receive(self, frame: AgentFrame) -> list[Event]:
        kind = frame.WhichOneof("frame")
        rid = frame.request_id
        if self.hello is None:
            if kind != "hello" or rid != 0:
                raise RemoteProtocolError(f"the first frame must be hello, got {kind or 'an empty frame'}")
            if PROTOCOL_REVISION not in frame.hello.protocol_revisions:
                raise RemoteProtocolError(
                    f"no common protocol revision: agent speaks {list(frame.hello.protocol_revisions)}, "
                    f"control plane speaks {list(SUPPORTED_REVISIONS)}"
                )
            window = frame.hello.request_window_bytes
            if window < 2 * self.limits.max_chunk_bytes:
                raise RemoteProtocolError(
                    f"request window {window} is below twice the chunk size {self.limits.max_chunk_bytes}"
                )
            if frame.hello.max_in_flight > MAX_IN_FLIGHT:
                raise RemoteProtocolError(
                    f"hello asks to run {frame.hello.max_in_flight} requests at once; the limit is {MAX_IN_FLIGHT}"
                )
            check_profiles(frame.hello.profiles, "hello")
            self.hello = frame.hello
            self._request_window = window
            self.batching = FRAME_BATCH in frame.hello.capabilities
            return [HelloReceived(frame.hello)]
        if kind == "hello":
            raise RemoteProtocolError("hello sent twice")
        if kind == "batch":
            if not self.batching:
                raise RemoteProtocolError("a frame batch, which was not agreed in the handshake")
            events: list[Event] = []
            for inner in frame.batch.frames:
                if inner.WhichOneof("frame") in ("batch", "hello"):
                    raise RemoteProtocolError(f"a {inner.WhichOneof('frame')} frame inside a batch")
                events.extend(self.receive(inner))
            return events
        if kind == "ping":
            return [PingReceived(frame.ping.nonce)]
        if kind == "pong":
            return [PongReceived(frame.pong.nonce)]
        if kind == "status":
            if frame.status.profiles_changed:
                check_profiles(frame.status.profiles, "status")
            return [StatusReceived(frame.status)]
        if kind is None:
            raise RemoteProtocolError("empty frame")
        if rid == 0 or rid >= self._next_id:
            raise RemoteProtocolError(f"{kind} frame for request {rid}, which was never started")
        request = self._requests.get(rid)
        if request is None:
            # Only the agent's own `end` closes a request here, so nothing of it can be in flight.
            raise RemoteProtocolError(f"{kind} frame for request {rid} after the agent ended it")
        if kind == "chunk":
            size = frame.chunk.ByteSize()
            if size > self.limits.max_chunk_bytes:
                raise RemoteProtocolError(f"chunk of {size} bytes exceeds the limit of {self.limits.max_chunk_bytes}")
            request.chunks.receive(size)
            if request.cancelled:
                return [FrameIgnored(rid, "chunk after cancel")]
            return [ChunkReceived(rid, frame.chunk, size)]
        if kind == "end":
            del self._requests[rid]
            return [screen_end(rid, frame.end)]
        if kind == "window_update":
            _check_grant(request.data, frame.window_update.bytes, self._request_window, rid)
            request.data.grant(frame.window_update.bytes)
            return [CreditGranted(rid, frame.window_update.bytes)]
        raise RemoteProtocolError(f"unexpected {kind} frame from the agent")

    def welcome(self, *, agent_id: str, group: str, session_id: str) -> ControlFrame:
        if self.hello is None:
            raise LocalProtocolError("welcome before hello")
        interval = self.limits.heartbeat_interval
        welcome = tunnel_pb2.Welcome(
            protocol_revision=PROTOCOL_REVISION,
            agent_id=agent_id,
            group=group,
            session_id=session_id,
            response_window_bytes=self.limits.response_window_bytes,
            max_chunk_bytes=self.limits.max_chunk_bytes,
            capabilities=[c for c in CAPABILITIES if c in self.hello.capabilities],
        )
        welcome.heartbeat_interval.FromTimedelta(interval)
        return ControlFrame(welcome=welcome)

    def start_request(self, start: tunnel_pb2.RequestStart) -> tuple[int, ControlFrame]:
        if self.hello is None:
            raise LocalProtocolError("request before hello")
        rid = self._next_id
        self._next_id += 1
        self._requests[rid] = _OutgoingRequest(
            chunks=ReceiveWindow(self.limits.response_window_bytes),
            data=SendWindow(self._request_window),
            has_body=start.has_body,
        )
        return rid, ControlFrame(request_id=rid, start=start)

    def data_credit(self, rid: int) -> int | None:
        """Bytes of request data we may send now; None once the request ended."""
        request = self._requests.get(rid)
        return request.data.credit if request is not None else None

    def is_open(self, rid: int) -> bool:
        return rid in self._requests

    def send_data(self, rid: int, data: bytes, *, end_of_data: bool) -> ControlFrame:
        request = self._requests.get(rid)
        if request is None:
            raise LocalProtocolError(f"data for request {rid}, which is not open")
        if not request.has_body or request.body_done:
            raise LocalProtocolError(f"request {rid} takes no (more) data")
        if len(data) > self.limits.max_chunk_bytes:
            raise LocalProtocolError(f"data of {len(data)} bytes exceeds the chunk limit")
        request.data.spend(len(data))
        request.body_done = end_of_data
        return ControlFrame(request_id=rid, data=tunnel_pb2.RequestData(data=data, end_of_data=end_of_data))

    def consumed(self, rid: int, size: int) -> ControlFrame | None:
        """The operator took a chunk of `size` bytes; maybe grant credit back."""
        request = self._requests.get(rid)
        if request is None:
            return None
        grant = request.chunks.consume(size)
        if not grant:
            return None
        return ControlFrame(request_id=rid, window_update=tunnel_pb2.WindowUpdate(bytes=grant))

    def cancel(self, rid: int, reason: str) -> ControlFrame | None:
        """Cancel an open request; None when it already ended or was cancelled."""
        request = self._requests.get(rid)
        if request is None or request.cancelled:
            return None
        request.cancelled = True
        return ControlFrame(request_id=rid, cancel=tunnel_pb2.Cancel(reason=reason))

    def open_request_ids(self) -> list[int]:
        return list(self._requests)

    @staticmethod
    def batch(frames: list[ControlFrame]) -> ControlFrame:
        return ControlFrame(batch=tunnel_pb2.ControlFrameBatch(frames=frames))

    @staticmethod
    def ping(nonce: int) -> ControlFrame:
        return ControlFrame(ping=tunnel_pb2.Ping(nonce=nonce))

    @staticmethod
    def pong(nonce: int) -> ControlFrame:
        return ControlFrame(pong=tunnel_pb2.Pong(nonce=nonce))

    def drain(self, reason: str, grace: timedelta, *, exit_after: bool = False) -> ControlFrame:
        drain = tunnel_pb2.Drain(reason=reason, exit_after=exit_after)
        drain.grace_period.FromTimedelta(grace)
        return ControlFrame(drain=drain)


# --- the agent's end --------------------------------------------------------


@dataclass
class _IncomingRequest:
    """A request the agent is running, as the agent tracks it."""

    chunks: SendWindow
    data: ReceiveWindow
    has_body: bool
    body_done: bool = False


@dataclass
class AgentConnection:
    """The agent's end of its stream."""

    request_window_bytes: int = 4 * 1024 * 1024
    welcome: tunnel_pb2.Welcome | None = None
    #: Whether both sides agreed to batch frames (FRAME_BATCH).
    batching: bool = False
    _last_id: int = 0
    _requests: dict[int, _IncomingRequest] = field(default_factory=dict)

    @property
    def max_chunk_bytes(self) -> int:
        if self.welcome is None:
            raise LocalProtocolError("not welcomed yet")
        return self.welcome.max_chunk_bytes

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def hello(self, hello: tunnel_pb2.Hello) -> AgentFrame:
        hello.protocol_revisions[:] = list(SUPPORTED_REVISIONS)
        hello.request_window_bytes = self.request_window_bytes
        hello.capabilities[:] = list(CAPABILITIES)
        return AgentFrame(hello=hello)

    def receive(self, frame: ControlFrame) -> list[Event]:
        kind = frame.WhichOneof("frame")
        rid = frame.request_id
        if self.welcome is None:
            if kind != "welcome":
                raise RemoteProtocolError(f"the first frame must be welcome, got {kind or 'an empty frame'}")
            welcome = frame.welcome
            if welcome.protocol_revision not in SUPPORTED_REVISIONS:
                raise RemoteProtocolError(f"control plane chose revision {welcome.protocol_revision}")
            if welcome.max_chunk_bytes == 0 or welcome.max_chunk_bytes * 2 > welcome.response_window_bytes:
                raise RemoteProtocolError("welcome: max_chunk_bytes must be positive and at most half the window")
            self.welcome = welcome
            self.batching = FRAME_BATCH in welcome.capabilities
            return [Welcomed(welcome)]
        if kind == "welcome":
            raise RemoteProtocolError("welcome sent twice")
        if kind == "batch":
            if not self.batching:
                raise RemoteProtocolError("a frame batch, which was not agreed in the handshake")
            events: list[Event] = []
            for inner in frame.batch.frames:
                if inner.WhichOneof("frame") in ("batch", "welcome"):
                    raise RemoteProtocolError(f"a {inner.WhichOneof('frame')} frame inside a batch")
                events.extend(self.receive(inner))
            return events
        if kind == "ping":
            return [PingReceived(frame.ping.nonce)]
        if kind == "pong":
            return [PongReceived(frame.pong.nonce)]
        if kind == "drain":
            return [DrainReceived(frame.drain)]
        if kind is None:
            raise RemoteProtocolError("empty frame")
        if kind == "start":
            if rid <= self._last_id:
                raise RemoteProtocolError(f"request id {rid} is not above the last one, {self._last_id}")
            self._last_id = rid
            self._requests[rid] = _IncomingRequest(
                chunks=SendWindow(self.welcome.response_window_bytes),
                data=ReceiveWindow(self.request_window_bytes),
                has_body=frame.start.has_body,
            )
            return [RequestStarted(rid, frame.start)]
        if rid == 0 or rid > self._last_id:
            raise RemoteProtocolError(f"{kind} frame for request {rid}, which was never started")
        request = self._requests.get(rid)
        if request is None:
            return [FrameIgnored(rid, f"{kind} after the request ended")]
        if kind == "data":
            size = len(frame.data.data)
            if size > self.max_chunk_bytes:
                raise RemoteProtocolError(f"data of {size} bytes exceeds the chunk limit of {self.max_chunk_bytes}")
            if not request.has_body or request.body_done:
                raise RemoteProtocolError(f"data for request {rid}, which takes no (more) data")
            request.data.receive(size)
            request.body_done = frame.data.end_of_data
            return [DataReceived(rid, frame.data.data, frame.data.end_of_data)]
        if kind == "cancel":
            return [CancelReceived(rid, frame.cancel.reason)]
        if kind == "window_update":
            _check_grant(request.chunks, frame.window_update.bytes, self.welcome.response_window_bytes, rid)
            request.chunks.grant(frame.window_update.bytes)
            return [CreditGranted(rid, frame.window_update.bytes)]
        raise RemoteProtocolError(f"unexpected {kind} frame from the control plane")

    def chunk_credit(self, rid: int) -> int | None:
        """Bytes of chunks we may send now; None once the request ended."""
        request = self._requests.get(rid)
        return request.chunks.credit if request is not None else None

    def send_chunk(self, rid: int, chunk: tunnel_pb2.ResponseChunk, size: int | None = None) -> AgentFrame:
        request = self._requests.get(rid)
        if request is None:
            raise LocalProtocolError(f"chunk for request {rid}, which is not open")
        size = chunk.ByteSize() if size is None else size
        if size > self.max_chunk_bytes:
            raise LocalProtocolError(f"chunk of {size} bytes exceeds the limit of {self.max_chunk_bytes}")
        request.chunks.spend(size)
        return AgentFrame(request_id=rid, chunk=chunk)

    def data_consumed(self, rid: int, size: int) -> AgentFrame | None:
        request = self._requests.get(rid)
        if request is None:
            return None
        grant = request.data.consume(size)
        if not grant:
            return None
        return AgentFrame(request_id=rid, window_update=tunnel_pb2.WindowUpdate(bytes=grant))

    def end(self, rid: int, code: Code, message: str = "", reason: str = "", field: str = "") -> AgentFrame:
        if self._requests.pop(rid, None) is None:
            raise LocalProtocolError(f"end for request {rid}, which is not open")
        return AgentFrame(request_id=rid, end=tunnel_pb2.ResponseEnd(
            code=int(code), message=message, reason=reason, field=field))

    def open_request_ids(self) -> list[int]:
        return list(self._requests)

    @staticmethod
    def batch(frames: list[AgentFrame]) -> AgentFrame:
        return AgentFrame(batch=tunnel_pb2.AgentFrameBatch(frames=frames))

    @staticmethod
    def ping(nonce: int) -> AgentFrame:
        return AgentFrame(ping=tunnel_pb2.Ping(nonce=nonce))

    @staticmethod
    def pong(nonce: int) -> AgentFrame:
        return AgentFrame(pong=tunnel_pb2.Pong(nonce=nonce))

    @staticmethod
    def status(*, draining: bool, in_flight: int) -> AgentFrame:
        return AgentFrame(status=tunnel_pb2.AgentStatus(draining=draining, in_flight=in_flight))
