"""Errors that end a request, each with the gRPC status it maps to.

    OnpremError
    ├── RequestError                 ends one request; `code` is its gRPC status
    │   ├── InvalidArgument          the caller's input is malformed
    │   ├── NotFound                 no such group, profile, path, agent, token
    │   ├── AlreadyExists
    │   │   └── AgentAlreadyExists   an agent with this id is recorded already (store)
    │   ├── PermissionDenied         authenticated, but not allowed
    │   │   ├── AgentRevoked         an admin revoked the agent (store)
    │   │   └── EnrollmentTokenRefused   the token cannot enroll an agent (store)
    │   │       ├── EnrollmentTokenInvalid   malformed, unknown or a wrong secret
    │   │       ├── EnrollmentTokenExpired   its lifetime ended it
    │   │       ├── EnrollmentTokenRevoked   an admin ended it
    │   │       └── EnrollmentTokenUsed      an agent enrolled with it (single use)
    │   ├── Unauthenticated          no or bad credentials
    │   │   └── TokenRefused         an operator token an admin revoked, or its lifetime ended (credentials)
    │   ├── FailedPrecondition       valid, but not in this state (read-only ...)
    │   │   ├── UsedEnrollmentTokenNotRevocable  an agent enrolled with it: revoke the agent (store)
    │   │   └── GuardMissing         a read-only session's guard row is gone (agent.handlers.sql_guard)
    │   ├── ResourceExhausted        a size or concurrency limit was hit
    │   ├── Unavailable              the agent or the system behind it is unreachable
    │   │   ├── AgentRefused         an agent refused the request before starting it (draining, full)
    │   │   └── AgentLost            the agent's stream ended while it ran the request
    │   ├── DeadlineExceeded
    │   ├── Cancelled
    │   ├── Aborted                  e.g. a transaction conflict
    │   ├── Unimplemented
    │   └── Internal                 a bug; details go to the log, not the caller
    ├── StoreError                   the store cannot work, e.g. a database of an older release (store)
    ├── ProtocolError                a peer broke the tunnel protocol
    │   ├── LocalProtocolError       we did
    │   └── RemoteProtocolError      the other side did
    │       └── BudgetExceeded       ... by making us do too much (tunnel.budget)
    ├── StreamEnded                  a tunnel stream ended; nothing more goes over it
    │   ├── PeerClosedStream         the peer ended it, or the transport failed
    │   ├── PeerSilent               the peer missed its heartbeats
    │   ├── StreamClosed             we closed it (sending on it fails)
    │   └── DrainedToExit            the control plane drained the agent to stop it
    └── RequestGone                  a request ended while its sender waited for credit

Kinds marked (store) live in `control_plane.store.errors`: the store raises them
with the reason and message the caller gets, so no caller translates them.

Handlers raise these; exactly one place per process turns them into a
status (the operator API's error boundary, the agent's request runner).
`Code` mirrors gRPC's numbering so that this module needs no grpc import.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """gRPC status codes, by their wire numbers."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class OnpremError(Exception):
    """The root of every error this project raises on purpose."""


class RequestError(OnpremError):
    """Ends one request with `code` and a message a person can act on.

    `reason` is a stable UPPER_SNAKE_CASE word a program can branch on.
    """

    code: Code = Code.UNKNOWN
    default_reason: str = "UNKNOWN"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        #: Why, in words, when the error stands for something that happened elsewhere
        #: (e.g. why an agent was lost); part of `message` too.
        self.cause = ""

    @staticmethod
    def from_status(code: int, message: str, reason: str = "", field: str = "") -> RequestError:
        """Rebuild the error a peer reported in a final status."""
        try:
            cls = _BY_CODE[Code(code)]
        except (ValueError, KeyError):
            cls = Internal
        if cls is InvalidArgument:
            return InvalidArgument(message, reason=reason or None, field=field or None)
        if cls is Unavailable and reason in AgentRefused.REASONS:
            return AgentRefused(message, reason=reason)
        return cls(message, reason=reason or None)


class InvalidArgument(RequestError):
    """`field`, when given, names the request field at fault (e.g. "sql",
    "head.method"); the operator API reports it as a `BadRequest` violation."""

    code = Code.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, reason: str | None = None, field: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.field = field


class NotFound(RequestError):
    code = Code.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(RequestError):
    code = Code.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(RequestError):
    code = Code.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(RequestError):
    code = Code.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class FailedPrecondition(RequestError):
    code = Code.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(RequestError):
    code = Code.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(RequestError):
    code = Code.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class AgentRefused(Unavailable):
    """An agent answered a request by refusing it before it started: it is draining, or at its limit.

    Nothing ran, so the request may go to another agent of the group. The agent says so with one of
    `REASONS` in its final status (`from_status` rebuilds this class from them).
    """

    REASONS = frozenset({"AGENT_DRAINING", "AGENT_BUSY"})
    default_reason = "AGENT_BUSY"


class AgentLost(Unavailable):
    """The stream of the agent running a request ended before the request did.

    The request may have run in part or in full; `cause` says why the stream ended. Only the control
    plane raises it: an agent cannot claim it (`tunnel.protocol` screens the reason).
    """

    default_reason = "AGENT_LOST"


class DeadlineExceeded(RequestError):
    code = Code.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(RequestError):
    code = Code.CANCELLED
    default_reason = "CANCELLED"


class Aborted(RequestError):
    code = Code.ABORTED
    default_reason = "ABORTED"


class Unimplemented(RequestError):
    code = Code.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Internal(RequestError):
    code = Code.INTERNAL
    default_reason = "INTERNAL"


_BY_CODE: dict[Code, type[RequestError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        Unauthenticated,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Aborted,
        Unimplemented,
        Internal,
    )
}


class ProtocolError(OnpremError):
    """A peer broke the tunnel protocol; the stream cannot be trusted any more."""

    def __init__(self, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message)


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class StreamEnded(OnpremError):
    """A tunnel stream ended; the message says who ended it and why."""


class PeerClosedStream(StreamEnded):
    """The peer ended the stream (or its transport failed)."""


class PeerSilent(StreamEnded):
    """The peer sent nothing for three heartbeat intervals."""


class StreamClosed(StreamEnded):
    """We closed the stream: nothing more can be sent on it."""


class DrainedToExit(StreamEnded):
    """The control plane drained this agent and asked it to stop (DrainAgent)."""


class RequestGone(OnpremError):
    """The request ended while its sender waited for credit."""
