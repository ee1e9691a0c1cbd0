"""The service config for reaching replicas: what docs/ha.md gives other clients is what the CLI uses,
and it retries only methods that exist and change nothing."""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf import descriptor_pool

import onprem.v1.agents_pb2
import onprem.v1.files_pb2
import onprem.v1.tokens_pb2  # noqa: F401  (registers the services)
from onprem.operator_cli.service_config import READS, SERVICE_CONFIG, channel_options

ROOT = Path(__file__).resolve().parents[2]
WRITES = {"CreateEnrollmentToken", "RevokeAgent", "DrainAgent", "Write", "Delete", "Move", "MakeDirectory",
          "CreateToken", "RevokeToken", "RevokeEnrollmentToken"}


def test_the_documented_service_config_is_the_one_the_cli_uses() -> None:
    assert json.loads((ROOT / "docs" / "service-config.json").read_text()) == SERVICE_CONFIG
    assert dict(channel_options())["grpc.service_config"] == json.dumps(SERVICE_CONFIG)


def test_every_retried_method_exists() -> None:
    pool = descriptor_pool.Default()
    for service, methods in READS.items():
        names = {m.name for m in pool.FindServiceByName(service).methods}
        assert set(methods) <= names, set(methods) - names


def test_no_write_is_retried_and_calls_spread_round_robin() -> None:
    retried = {name["method"] for config in SERVICE_CONFIG["methodConfig"] for name in config["name"]}
    assert not retried & WRITES
    assert "Query" not in retried and "ExecuteBatch" not in retried and "Call" not in retried
    assert SERVICE_CONFIG["loadBalancingConfig"] == [{"round_robin": {}}]
    [policy] = [c["retryPolicy"] for c in SERVICE_CONFIG["methodConfig"]]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
