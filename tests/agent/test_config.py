"""The agent's config: `control_plane.max_streams`, the most streams it holds to control-plane replicas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from onprem.agent.config import parse_config
from onprem.agent.profiles import ConfigError


def raw(**control_plane: Any) -> dict[str, Any]:
    return {"control_plane": {"address": "cp.example.com:8444", "ca_file": "ca.pem", **control_plane},
            "identity_dir": "id"}


def test_max_streams_defaults_to_three() -> None:
    assert parse_config(raw(), base_dir=Path("/etc/onprem-agent")).control_plane.max_streams == 3


@pytest.mark.parametrize("value", [1, 16])
def test_max_streams_takes_one_to_sixteen(value: int) -> None:
    assert parse_config(raw(max_streams=value), base_dir=Path("/")).control_plane.max_streams == value


@pytest.mark.parametrize("value", [0, 17, -1, "3", 2.5, True, None])
def test_max_streams_outside_one_to_sixteen_is_refused_by_name(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^control_plane\.max_streams: an integer from 1 to 16 \(the most streams "
                                          r"the agent holds, one per control-plane replica\), got "):
        parse_config(raw(max_streams=value), base_dir=Path("/"))
