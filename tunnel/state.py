"""The life of one request on a tunnel stream, as a transition table (the way h11's `_state.py` is).

A request has two sides. The **caller** is the control plane: it starts the
request, sends its body (when it has one) and may cancel it. The **worker**
is the agent: it sends result chunks and exactly one `end`. Each side moves
through its own states, and only by the events this table lists; anything
else is a protocol error, blamed on whoever sent it. The table ignores which
end of the stream is asking: both ends track the same request the same way.

    caller  SENDING_BODY --data--> SENDING_BODY --last data--> BODY_DONE
            SENDING_BODY | BODY_DONE --cancel--> CANCELLED
    worker  RUNNING --chunk--> RUNNING --end--> ENDED

A request without a body starts in BODY_DONE. Credit (`window_update`) may
flow in either direction while the worker runs.
"""

from __future__ import annotations

import enum

__all__ = ["Caller", "RequestEvent", "Role", "Worker", "next_caller_state", "next_worker_state"]


class Role(enum.Enum):
    """Which end of the stream a `Connection` is."""

    CONTROL_PLANE = "the control plane"
    AGENT = "the agent"

    @property
    def peer(self) -> Role:
        return Role.AGENT if self is Role.CONTROL_PLANE else Role.CONTROL_PLANE


class Caller(enum.Enum):
    """The control plane's side of one request."""

    SENDING_BODY = "sending its body"
    BODY_DONE = "sent its body"
    CANCELLED = "cancelled"


class Worker(enum.Enum):
    """The agent's side of one request."""

    RUNNING = "running"
    ENDED = "ended"


class RequestEvent(enum.Enum):
    DATA = "data"
    LAST_DATA = "the last data"
    CANCEL = "cancel"
    CHUNK = "chunk"
    END = "end"


_CALLER: dict[Caller, dict[RequestEvent, Caller]] = {
    Caller.SENDING_BODY: {
        RequestEvent.DATA: Caller.SENDING_BODY,
        RequestEvent.LAST_DATA: Caller.BODY_DONE,
        RequestEvent.CANCEL: Caller.CANCELLED,
    },
    Caller.BODY_DONE: {RequestEvent.CANCEL: Caller.CANCELLED},
    Caller.CANCELLED: {},
}

_WORKER: dict[Worker, dict[RequestEvent, Worker]] = {
    Worker.RUNNING: {RequestEvent.CHUNK: Worker.RUNNING, RequestEvent.END: Worker.ENDED},
    Worker.ENDED: {},
}


def next_caller_state(state: Caller, event: RequestEvent) -> Caller | None:
    """The caller's state after `event`, or None when `event` may not happen in `state`."""
    return _CALLER[state].get(event)


def next_worker_state(state: Worker, event: RequestEvent) -> Worker | None:
    """The worker's state after `event`, or None when `event` may not happen in `state`."""
    return _WORKER[state].get(event)
