"""The gRPC service config operators' clients use to reach control-plane replicas (docs/ha.md).

Behind one DNS name with an address per replica (`dns:///cp.example.com:8443`), `round_robin` spreads
calls over the replicas and the retry policy sends a read that failed UNAVAILABLE (its replica
stopping or gone) to another; a replica that just started waits briefly for its agents before it
says a group has none (`router`), so a retry that lands there is served. Only reads are retried: a write that failed UNAVAILABLE may have run
(the control plane says so in the message), and retrying it is the caller's decision. The same
JSON is in docs/service-config.json for other clients; a test keeps the two equal.
"""

from __future__ import annotations

import json
from typing import Any, Final

#: Methods that change nothing, and so may be sent again to another replica.
READS: Final = {
    "onprem.v1.AgentService": ["ListAgents", "GetAgent", "ListGroups", "ListReplicas", "CheckProfile"],
    "onprem.v1.FileService": ["List", "Stat", "Read", "Poll"],
    "onprem.v1.TokenService": ["ListTokens", "ListEnrollmentTokens"],
}

SERVICE_CONFIG: Final[dict[str, Any]] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": service, "method": method} for service, methods in READS.items() for method in methods],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.1s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            # CANCELLED too: grpcio (1.85) answers it for calls a stopping server had not picked up yet
            # (grpc/grpc#41785); a read is safe to send again, and a caller's own cancel is never retried.
            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
        },
    }],
}


def channel_options() -> list[tuple[str, Any]]:
    """grpc channel options that apply the service config (retries are off by default in some versions)."""
    return [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1)]
