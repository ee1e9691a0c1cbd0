"""What a peer may make us do, whatever it sends: budgets per stream, free of I/O.

The credit windows of `tunnel.flow` bound what a peer's *requests* cost. A
peer can still make us work through the frames that belong to no request: a
flood of pings (each one queues a pong), of status frames (each one may write
the store), of frames packed into one message, or by never reading what we
send so that our queue only grows. Each of these has a budget here, and a
peer that passes one breaks the stream: the shell ends the session with a
log line naming the peer and the budget, and the peer's requests fail
UNAVAILABLE. Both ends use the same budgets against each other: an agent
does not trust a control plane more than the control plane trusts it.

The clock is passed in (`now`, in seconds of any monotonic clock), so the
rules are tested without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onprem.tunnel.errors import RemoteProtocolError

__all__ = ["BudgetExceeded", "Budgets", "PeerMeter", "TokenBucket"]


class BudgetExceeded(RemoteProtocolError):
    """The peer went past one of its budgets; `budget` names which, for logs and tests."""

    def __init__(self, budget: str, message: str) -> None:
        super().__init__(message)
        self.budget = budget


@dataclass(frozen=True)
class Budgets:
    """The limits one end holds the other to. The defaults leave a well-behaved peer
    (a ping every few seconds, a status frame per health check or reload) a
    hundredfold margin."""

    #: Frames in one message (a frame batch); our own writer packs at most 256.
    max_frames_per_message: int = 1024
    #: Stream-level frames (ping, pong, status) per second, sustained ...
    control_frames_per_second: float = 50.0
    #: ... and in a burst.
    control_frame_burst: int = 500
    #: Status frames per second, sustained, and in a burst: each may change what the store holds.
    status_frames_per_second: float = 2.0
    status_frame_burst: int = 20
    #: Frames we queued for the peer and it has not read yet (pongs, credit, cancels, starts):
    #: past this the peer is not reading its stream.
    max_queued_frames: int = 16384
    #: How long one write may wait for a peer that does not read, in heartbeat intervals.
    write_stall_intervals: float = 3.0

    def __post_init__(self) -> None:
        if self.max_frames_per_message < 1 or self.max_queued_frames < 1:
            raise ValueError("frame budgets must be at least 1")
        for rate, burst in ((self.control_frames_per_second, self.control_frame_burst),
                            (self.status_frames_per_second, self.status_frame_burst)):
            if rate <= 0 or burst < 1:
                raise ValueError("rates must be positive and bursts at least 1")
        if self.write_stall_intervals <= 0:
            raise ValueError("write_stall_intervals must be positive")


@dataclass
class TokenBucket:
    """`rate` tokens a second, holding at most `burst`; it starts full."""

    rate: float
    burst: int
    tokens: float = field(init=False)
    _at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self, now: float) -> bool:
        """Spend one token; False when none is left."""
        if self._at is not None:
            self.tokens = min(float(self.burst), self.tokens + (now - self._at) * self.rate)
        self._at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class PeerMeter:
    """Counts what one peer sends against its budgets; raises `BudgetExceeded` past one."""

    def __init__(self, budgets: Budgets, peer: str = "the peer") -> None:
        self.budgets = budgets
        self._peer = peer
        self._control = TokenBucket(budgets.control_frames_per_second, budgets.control_frame_burst)
        self._status = TokenBucket(budgets.status_frames_per_second, budgets.status_frame_burst)

    def message(self, frames: int) -> None:
        """One message arrived holding `frames` frames (1 unless it is a batch)."""
        limit = self.budgets.max_frames_per_message
        if frames > limit:
            raise BudgetExceeded(
                "frames per message",
                f"{self._peer} sent a batch of {frames} frames; the limit is {limit} frames per message",
            )

    def control(self, kind: str, now: float) -> None:
        """A stream-level frame (`ping`, `pong`, `status`, ...) arrived at `now`."""
        if not self._control.take(now):
            budget = self.budgets
            raise BudgetExceeded(
                "control frames per second",
                f"{self._peer} sent stream-level frames ({kind}) faster than "
                f"{budget.control_frames_per_second:g} a second (bursts of {budget.control_frame_burst})",
            )
        if kind == "status" and not self._status.take(now):
            budget = self.budgets
            raise BudgetExceeded(
                "status frames per second",
                f"{self._peer} sent status frames faster than {budget.status_frames_per_second:g} a second "
                f"(bursts of {budget.status_frame_burst})",
            )
