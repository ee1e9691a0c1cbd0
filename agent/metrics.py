"""Prometheus metrics of the agent (`metrics_listen` in its config; off by default).

The endpoint is a listening port inside the private network, so it is opt-in
and meant for a local scraper (bind it to 127.0.0.1 unless the site wants more).
"""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter("onprem_agent_requests", "Requests run by the agent, by kind and outcome.", ["kind", "code"],
                   registry=REGISTRY)
LATENCY = Histogram("onprem_agent_request_duration_seconds", "Time the agent spent on a request.", ["kind"],
                    registry=REGISTRY,
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
RESPONSE_BYTES = Counter("onprem_agent_response_bytes", "Result bytes sent to the control plane.", ["kind"],
                         registry=REGISTRY)
IN_FLIGHT = Gauge("onprem_agent_requests_in_flight", "Requests the agent is running now.", registry=REGISTRY)
CONNECTED = Gauge("onprem_agent_connected", "1 while at least one stream to the control plane is up.",
                  registry=REGISTRY)
STREAMS = Gauge("onprem_agent_streams", "Streams held to the control plane, one per replica (at most max_streams).",
                registry=REGISTRY)
RECONNECTS = Counter("onprem_agent_reconnects", "Streams to the control plane that ended and were re-dialled.",
                     registry=REGISTRY)
PROFILE_UP = Gauge("onprem_agent_profile_up", "1 when the profile's latest health check passed.",
                   ["kind", "profile"], registry=REGISTRY)


@functools.lru_cache(maxsize=256)
def child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, looked up once: `labels` validates and locks on every call, and every
    request touches three. Label values here come from small fixed sets (request kinds, codes)."""
    return metric.labels(*values)


def serve(address: str) -> None:
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1", registry=REGISTRY)
