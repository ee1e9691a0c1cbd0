"""Prometheus metrics of the control plane (`--metrics-listen`).

Requests by kind, method and outcome, their latency and bytes, requests in
flight, agents by state, and agent sessions opened and lost. Agent states are
computed when scraped, from the live registry and the store's list, so they
never drift.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter("onprem_requests", "Operator requests relayed to agents, by outcome.",
                   ["kind", "method", "code"], registry=REGISTRY)
LATENCY = Histogram("onprem_request_duration_seconds", "Time from an operator request to its final status.",
                    ["kind"], registry=REGISTRY,
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
RESPONSE_BYTES = Counter("onprem_response_bytes", "Result bytes relayed to operators.", ["kind"], registry=REGISTRY)
IN_FLIGHT = Gauge("onprem_requests_in_flight", "Operator requests being relayed now.", ["kind"], registry=REGISTRY)
SESSIONS_OPENED = Counter("onprem_agent_sessions_opened", "Agent streams accepted (connects and reconnects).",
                          registry=REGISTRY)
SESSIONS_LOST = Counter("onprem_agent_sessions_closed", "Agent streams that ended.", registry=REGISTRY)
RETRIES = Counter("onprem_request_reroutes", "Requests re-routed to another agent of their group.", ["why"],
                  registry=REGISTRY)


@functools.lru_cache(maxsize=1024)
def child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, looked up once: every request touches four, and `labels` validates
    and locks each time. The label values here come from small fixed sets (kinds, methods, codes)."""
    return metric.labels(*values)


class AgentStates(Collector):
    """`onprem_agents{group, state}`, counted at scrape time."""

    def __init__(self, states: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self._states = states

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("onprem_agents", "Enrolled agents by group and state.", labels=["group", "state"])
        counts: dict[tuple[str, str], int] = {}
        for key in self._states():
            counts[key] = counts.get(key, 0) + 1
        for (group, state), n in sorted(counts.items()):
            family.add_metric([group, state], n)
        yield family


def serve(address: str, states: Callable[[], Iterable[tuple[str, str]]]) -> None:
    """Serve /metrics on `address` (host:port) from a thread of its own."""
    REGISTRY.register(AgentStates(states))
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1", registry=REGISTRY)
