"""The store's name rules (`store.values`)."""

from __future__ import annotations

import pytest

from onprem.control_plane.store import validate_agent_name, validate_group_name

# --- names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "plant-7", "EU_west", "x" * 63])
def test_valid_group_names_are_accepted(name: str) -> None:
    assert validate_group_name(name) == name


def test_agent_names_may_be_host_names_but_not_arbitrary_text() -> None:
    assert validate_agent_name("db01.frankfurt.example.com") == "db01.frankfurt.example.com"
    with pytest.raises(ValueError, match="agent name"):
        validate_agent_name("db01 frankfurt")
    with pytest.raises(ValueError):
        validate_agent_name("")
