"""Per-request credit windows, one per direction.

The sender spends credit as it sends payload bytes and may send a payload
only while its credit covers it. The receiver counts what it has consumed
(handed to its consumer) and grants that back in batches of at least half a
window, so a slow consumer holds at most one window of its request's data in
memory and stalls nobody else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onprem.tunnel.errors import LocalProtocolError, RemoteProtocolError


@dataclass
class SendWindow:
    """Credit we may spend sending payload bytes to the peer."""

    credit: int

    def covers(self, size: int) -> bool:
        return size <= self.credit

    def spend(self, size: int) -> None:
        if size > self.credit:
            raise LocalProtocolError(f"sent {size} bytes with only {self.credit} bytes of credit")
        self.credit -= size

    def grant(self, size: int) -> None:
        self.credit += size


@dataclass
class ReceiveWindow:
    """Credit the peer holds against us, and what we owe back to it."""

    window: int
    #: What the peer may still send before it runs out of credit.
    available: int = field(init=False)
    #: Consumed bytes not yet granted back to the peer.
    pending_grant: int = 0

    def __post_init__(self) -> None:
        self.available = self.window

    def receive(self, size: int) -> None:
        if size > self.available:
            raise RemoteProtocolError(
                f"peer sent {size} bytes with only {self.available} bytes of credit (window overrun)"
            )
        self.available -= size

    def consume(self, size: int) -> int:
        """Record `size` consumed bytes; return the credit to grant now, or 0."""
        self.pending_grant += size
        if self.pending_grant * 2 < self.window:
            return 0
        grant, self.pending_grant = self.pending_grant, 0
        self.available += grant
        return grant
