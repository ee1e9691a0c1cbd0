"""The memory that whole results (`DatabaseService.ExecuteQuery`) may hold in one control plane.

Query streams its result under the tunnel's credit, so a call holds a window of it at most; an
ExecuteQuery call holds its result until it is whole, up to 4 MiB. Without a bound, callers running
many at once (a token's worth of parallel calls, or an attacker with one) could make the control
plane hold gigabytes. Every call takes its bytes from one `WholeResultBudget` as they arrive and gives
them back when it ends; a call that finds the budget spent is refused at once (RESOURCE_EXHAUSTED)
rather than made to wait, since calls waiting for each other's bytes would never end.
"""

from __future__ import annotations

from onprem.tunnel.errors import ResourceExhausted

__all__ = ["DEFAULT_BUDGET_BYTES", "WholeResultBudget"]

#: Sixty-four whole results of 4 MiB at once.
DEFAULT_BUDGET_BYTES = 256 * 1024 * 1024


class WholeResultBudget:
    """Bytes of whole results held now, against a cap; plain arithmetic on the event loop's thread."""

    def __init__(self, cap: int = DEFAULT_BUDGET_BYTES) -> None:
        if cap <= 0:
            raise ValueError("the budget of whole results must be positive")
        self.cap = cap
        self.held = 0

    def take(self, size: int) -> None:
        """Hold `size` more bytes; ResourceExhausted when that would pass the cap (nothing taken then)."""
        if self.held + size > self.cap:
            raise ResourceExhausted(
                f"the control plane holds {self.cap // (1024 * 1024)} MiB of whole results for ExecuteQuery "
                "calls now, its limit; retry shortly, or stream the result with Query",
                reason="WHOLE_RESULTS_BUDGET")
        self.held += size

    def give(self, size: int) -> None:
        """Give back `size` bytes a call held."""
        self.held -= size
        assert self.held >= 0, "gave back more than was taken"
