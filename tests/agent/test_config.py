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


def test_tracing_is_off_unless_configured() -> None:
    config = parse_config(raw(), base_dir=Path("/"))
    assert (config.otlp_endpoint, config.service_name) == (None, None)


def test_tracing_names_an_otlp_endpoint_and_a_service_name() -> None:
    config = parse_config({**raw(), "tracing": {"otlp_endpoint": "https://otel.internal:4317",
                                                "service_name": "erp-agent"}}, base_dir=Path("/"))
    assert (config.otlp_endpoint, config.service_name) == ("https://otel.internal:4317", "erp-agent")


@pytest.mark.parametrize(("tracing", "message"), [
    ({"otlp_endpoint": "otel.internal:4317"}, r"^tracing\.otlp_endpoint: expected http://host:port"),
    ({"otlp_endpoint": "ftp://otel.internal:4317"}, r"^tracing\.otlp_endpoint: expected http://host:port"),
    ({"otlp_endpoint": "http://otel.internal"}, r"^tracing\.otlp_endpoint: expected host:port"),
    ({"endpoint": "http://otel.internal:4317"}, r"^tracing: unknown keys: endpoint$"),
    ({"service_name": ""}, r"^tracing\.service_name: a non-empty string$"),
    ("http://otel.internal:4317", r"^tracing: a mapping"),
])
def test_a_bad_tracing_key_is_refused_by_name(tracing: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({**raw(), "tracing": tracing}, base_dir=Path("/"))
