"""The budget of whole results: ExecuteQuery calls together never hold more than its cap."""

from __future__ import annotations

import pytest

from onprem.control_plane.api.whole_results import WholeResultBudget
from onprem.tunnel.errors import ResourceExhausted


def test_calls_take_bytes_until_the_cap() -> None:
    budget = WholeResultBudget(cap=10)
    budget.take(6)
    budget.take(4)
    assert budget.held == 10


def test_a_take_past_the_cap_is_refused_and_takes_nothing() -> None:
    budget = WholeResultBudget(cap=3 * 1024 * 1024)
    budget.take(2 * 1024 * 1024)
    with pytest.raises(ResourceExhausted) as info:
        budget.take(1024 * 1024 + 1)
    assert info.value.reason == "WHOLE_RESULTS_BUDGET"
    assert str(info.value.message).startswith("the control plane holds 3 MiB of whole results")
    assert budget.held == 2 * 1024 * 1024


def test_bytes_given_back_can_be_taken_again() -> None:
    budget = WholeResultBudget(cap=10)
    budget.take(10)
    budget.give(10)
    budget.take(10)
    assert budget.held == 10


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        WholeResultBudget(cap=0)
